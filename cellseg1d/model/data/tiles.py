"""Validation of a training pair and its tiles (the reference's cellpose-style tiles)."""

from __future__ import annotations

import numpy as np

from cellseg1d.model.data.convert import TrainingDataError, to_uint8_rgb
from cellseg1d.model.data.prompts import _compact_labels
from cellseg1d.model.data.resize import _resize_to_short_edge, resize_linear_exact, resize_nearest_exact


def check_training_pair(image: np.ndarray, mask: np.ndarray, min_cells: int = 3) -> None:
    """Raise :class:`TrainingDataError` unless ``mask`` is a usable label image for ``image``.

    ``image`` is (H, W), (C, H, W) or uint8 (H, W, 3); ``mask`` must be an
    integer (H, W) label image with at least ``min_cells`` cells.
    """
    img = np.asarray(image)
    msk = np.asarray(mask)
    if img.ndim == 3 and img.shape[-1] == 3 and img.dtype == np.uint8 and img.shape[0] > 4:
        spatial = img.shape[:2]
    else:
        spatial = img.shape[-2:]
    if msk.ndim != 2:
        raise TrainingDataError(
            f"mask must be a 2-D (H, W) instance label image, got shape {msk.shape}"
        )
    if msk.shape != tuple(spatial):
        raise TrainingDataError(
            f"mask shape {msk.shape} does not match the image's spatial shape {tuple(spatial)}; "
            "pass the label image that was drawn on this image (same height and width)"
        )
    if msk.dtype == np.bool_ or not np.issubdtype(msk.dtype, np.integer):
        raise TrainingDataError(
            f"mask must be an integer instance label image (0 = background, 1..N = cells), got dtype "
            f"{msk.dtype}; label a binary mask first, e.g. skimage.measure.label(mask)"
        )
    if msk.size and np.issubdtype(msk.dtype, np.signedinteger) and msk.min() < 0:
        raise TrainingDataError("mask contains negative labels; use 0 for background and 1..N for cells")
    n_cells = int(np.unique(msk).size - (1 if (msk == 0).any() else 0))
    if n_cells == 0:
        raise TrainingDataError(
            "mask is empty (no labelled cells); annotate the cells of the training image "
            "(0 = background, one integer per cell)"
        )
    if n_cells < min_cells:
        raise TrainingDataError(
            f"mask has only {n_cells} cell(s), at least {min_cells} are needed to train; "
            "annotate more cells (a few dozen work best) or pick an image with more cells"
        )


def tile_starts(length: int, tile: int, overlap: float = 0.5) -> list[int]:
    """Start offsets of the tiles along one axis, as cellpose's ``make_tiles`` places them (the reference).

    ``overlap`` is clamped to 0.05..0.5; a side no longer than ``tile`` has
    one tile; otherwise ``ceil((1 + 2 overlap) * length / tile)`` tiles are
    spread evenly from 0 to ``length - tile`` (``linspace``, truncated).
    512 px, tile 256, overlap 0.5: starts 0, 85, 170, 256.
    """
    overlap = min(0.5, max(0.05, overlap))
    side = min(tile, length)
    count = 1 if length <= tile else int(np.ceil((1.0 + 2 * overlap) * length / tile))
    return [int(s) for s in np.linspace(0, length - side, count).astype(int)]


def renumber_labels(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..N in the order of their values (0 stays background), as int32."""
    ids, compact = _compact_labels(np.asarray(labels))
    return compact.astype(np.int32)


def _resize_size(shape: tuple[int, int], resize_to: int | tuple[int, int]) -> tuple[int, int]:
    h, w = shape
    if isinstance(resize_to, (int, np.integer)):
        scale = int(resize_to) / max(h, w)
        return max(1, round(h * scale)), max(1, round(w * scale))
    new_h, new_w = (int(v) for v in resize_to)
    if new_h < 1 or new_w < 1:
        raise ValueError(f"resize_to must be positive, got {resize_to!r}")
    return new_h, new_w


def make_tiles(
    image: np.ndarray,
    mask: np.ndarray,
    tile: int = 256,
    overlap: float = 0.5,
    min_items: int = 32,
    resize_to: int | tuple[int, int] | None = None,
    *,
    min_cells: int = 3,
    channels: int | tuple[int, ...] | None = None,
    normalize: str = "minmax",
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut an image and its label mask into overlapping square tiles, as the reference does.

    Parameters
    ----------
    image : numpy.ndarray
        The training image, any form :func:`to_uint8_rgb` accepts.
    mask : numpy.ndarray
        Integer (H, W) instance labels (0 = background).
    tile : int, optional
        Tile side in pixels (the reference's ``patch_size``). An image whose
        shorter side is smaller is first resized so that it is ``tile``
        (the reference's ``resize_to_short_edge``).
    overlap : float, optional
        cellpose's ``tile_overlap`` (clamped to 0.05..0.5), see :func:`tile_starts`.
    min_items : int, optional
        The reference's ``duplicate_data``: with n < ``min_items`` tiles the
        list is repeated ``min_items // n + 1`` times (16 tiles, 32 -> 48 items).
    resize_to : (h, w) or int, optional
        Resize the image first: (h, w) exactly (the reference's
        ``resize_size``, aspect not kept; bilinear image, nearest labels, OpenCV's
        exact variants), an int: the longest side, aspect kept. None: no resize.
    min_cells : int, optional
        Fewer labelled cells in the mask raise :class:`TrainingDataError`.
    channels, normalize : optional
        Passed to :func:`to_uint8_rgb`.

    Returns
    -------
    list of (uint8 (t, t, 3), int32 labels (t, t) numbered 1..N)
        Tiles in row-major order, repeated.
    """
    check_training_pair(image, mask, min_cells=min_cells)
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if tile < 1 or min_items < 1:
        raise ValueError(f"tile and min_items must be positive, got {tile} and {min_items}")
    rgb = to_uint8_rgb(image, channels, normalize=normalize)
    labels = renumber_labels(mask)
    if resize_to is not None:
        size = _resize_size(labels.shape, resize_to)
        if size != labels.shape:
            rgb, labels = resize_linear_exact(rgb, size), resize_nearest_exact(labels, size)
    if min(labels.shape) < tile:
        rgb, labels = _resize_to_short_edge(rgb, labels, tile)
    h, w = labels.shape
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    th, tw = min(tile, h), min(tile, w)
    tiles = [
        (rgb[y : y + th, x : x + tw].copy(), renumber_labels(labels[y : y + th, x : x + tw]))
        for y in ys
        for x in xs
    ]
    repeats = min_items // len(tiles) + 1 if len(tiles) < min_items else 1
    return [t for _ in range(repeats) for t in tiles]
