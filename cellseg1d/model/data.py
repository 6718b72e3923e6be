"""Training data for CellSeg1: one annotated image -> tiles -> point prompts -> augmented items.

The pipeline follows the CellSeg1 reference implementation rule by rule
(docs/engine.md, "Training: faithfulness to the reference"), for one image
and its instance label mask:

1. :func:`to_uint8_rgb` turns the image (grayscale, 2-3 channels, any dtype)
   into uint8 RGB: a min-max stretch with truncation, per the reference's
   channel rules (``normalize="percentile"`` is cellseg1d's robust stretch).
2. :func:`make_tiles` resizes the image (``resize_to``; the reference's
   512 x 512, aspect not kept, bilinear/nearest with OpenCV's "exact"
   semantics, :func:`resize_linear_exact` / :func:`resize_nearest_exact`),
   cuts square tiles at cellpose's positions (:func:`tile_starts`),
   renumbers every tile's cells 1..N and repeats the list
   (``min_items // n + 1`` times when there are fewer than ``min_items``).
3. :func:`sample_prompts` draws point prompts on the *tile* (before any
   augmentation): positive points for a random subset of all cells, filtered
   afterwards, negative points in the far background (the image border
   counts as foreground). Distances are OpenCV's 5x5 chamfer distance
   (:func:`chamfer_distance`), which is what the reference's call computes.
4. :func:`augment_item` applies brightness/contrast, flips, a random resized
   crop and shift-scale-rotate to the tile, its labels *and the points*, and
   resizes to the model input; pixels from outside the tile are black. The
   moved positive points are checked again (on a cell, large enough, not in
   the edge band).
5. :class:`CellTileDataset` ties it together; item ``i`` of epoch ``e`` is a
   deterministic function of ``(seed, e, i)``. An item whose points all left
   the image is ``None`` (the reference drops it from its batch); a batch
   holding an item without points is skipped by the training loop.

Coordinates: points are ``(x, y)`` integer pixel indices (SAM's convention),
masks are indexed ``[row, col]``. The prompt rules' sizes are in pixels of the
tile when sampling and of the model input when re-checking after
augmentation, as in the reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from cellseg1d.errors import CellsegError

__all__ = [
    "AugmentSettings",
    "AugmentedItem",
    "CellTileDataset",
    "NORMALIZE_MODES",
    "PromptSettings",
    "Prompts",
    "TrainingDataError",
    "augment",
    "augment_item",
    "chamfer_distance",
    "check_training_pair",
    "collate_items",
    "low_res_size",
    "make_tiles",
    "nearest_exact_index",
    "renumber_labels",
    "resize_linear_exact",
    "resize_nearest_exact",
    "sample_prompts",
    "tile_starts",
    "to_uint8_rgb",
]

#: Percentiles mapped to 0 and 255 by ``to_uint8_rgb(normalize="percentile")``.
LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5
#: ``to_uint8_rgb`` modes: "minmax" (the reference: min..max to 0..255, truncated) or "percentile".
NORMALIZE_MODES = ("minmax", "percentile")
#: SAM's low-resolution mask logits are this many times smaller than its input.
LOW_RES_FACTOR = 4
#: Fill of pixels an augmentation maps from outside the tile: "zero" (the reference) or "median".
FILL_MODES = ("zero", "median")
#: Items without augmentation: "pad" (the reference: the tile as it is, SAM pads it) or "resize".
UNAUGMENTED_MODES = ("pad", "resize")


class TrainingDataError(CellsegError, ValueError):
    """The training image or mask cannot be used; the message says what to do."""


# --------------------------------------------------------------------------
# Image conversion
# --------------------------------------------------------------------------


def _rescale(channel: np.ndarray, low: float, high: float,
             bounds: tuple[float, float] | None = None) -> np.ndarray:
    """Map the ``low``/``high`` percentiles of ``channel`` (or ``bounds``) to 0/255 (clipped, rounded), as uint8."""
    values = np.asarray(channel, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.uint8)
    lo, hi = bounds if bounds is not None else np.percentile(values[finite], [low, high])
    if hi <= lo:  # (nearly) constant channel: keep it dark rather than noise-amplified
        lo, hi = float(values[finite].min()), float(values[finite].max())
        if hi <= lo:
            return np.zeros(values.shape, dtype=np.uint8)
    scaled = (np.where(finite, values, lo) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _float_type(dtype: np.dtype) -> type:
    """The float type the reference's stretch computes in: float32 for float16/32 input, else float64."""
    return np.float32 if dtype in (np.float16, np.float32) else np.float64


def _minmax_uint8(values: np.ndarray, bounds: tuple[float, float] | None = None) -> np.ndarray:
    """Stretch min..max of ``values`` (or ``bounds``: those of the whole plane) to 0..255 and truncate.

    The reference calls ``skimage.exposure.rescale_intensity(x, out_range=(0, 255)).astype(np.uint8)``;
    this does the same arithmetic (same dtype of the intermediate: float32 for
    float16/float32 input, float64 otherwise; a constant image is clipped to
    0..255 and truncated). Unlike the reference, non-finite values do not
    spread NaN over the image: the range is that of the finite values, NaN and
    -inf become the minimum, +inf the maximum (0 everywhere if none is finite).
    """
    x = np.asarray(values)
    if x.dtype == np.float16:
        x = x.astype(np.float32)
    elif x.dtype == np.bool_:
        x = x.astype(np.uint8)
    if np.issubdtype(x.dtype, np.floating):
        finite = np.isfinite(x)
        if not finite.all():
            if not finite.any():
                return np.zeros(x.shape, dtype=np.uint8)
            lo, hi = (x[finite].min(), x[finite].max()) if bounds is None else bounds
            x = np.where(np.isnan(x) | (x == -np.inf), lo, np.where(x == np.inf, hi, x)).astype(x.dtype)
    work = _float_type(x.dtype)
    imin, imax = (float(x.min()), float(x.max())) if bounds is None else (float(bounds[0]), float(bounds[1]))
    if imin != imax:
        clipped = np.clip(x, imin, imax)
        scaled = (clipped - imin) / (imax - imin)
        out = (scaled * (255.0 - 0.0) + 0.0).astype(work)
    else:
        out = np.clip(x.astype(np.float64), 0.0, 255.0).astype(work)
    return out.astype(np.uint8)


def _reference_rgb(planes: list[np.ndarray], bounds: list[tuple[float, float]] | None = None) -> np.ndarray:
    """The reference's channel rules on 1-3 planes (one plane: grayscale; 2-3: red, green[, blue]).

    Grayscale is stretched and stacked x3. Of an RGB image only channels that
    are not all zero count: none -> black (the reference refuses such an
    image; a blank plane must not stop the daemon); one -> that channel
    stretched and stacked x3; two -> stacked x3 if identical, else each
    stretched on its own (the empty channel stays 0); three -> one joint
    stretch over all three channels. ``bounds`` (one (min, max) per plane,
    those of the whole image the planes are a block of) replace the planes'
    own ranges, and a channel is empty when its bounds are (0, 0).
    """
    if len(planes) == 1:
        gray = _minmax_uint8(planes[0], bounds[0] if bounds else None)
        return np.stack([gray] * 3, axis=-1)
    rgb = list(planes) + [np.zeros_like(planes[0])] * (3 - len(planes))
    ranges: list[tuple[float, float] | None] = (list(bounds) + [(0.0, 0.0)] * (3 - len(bounds)) if bounds
                                                 else [None] * 3)
    if bounds:
        nonempty = [i for i, r in enumerate(ranges) if r is not None and tuple(r) != (0.0, 0.0)]
    else:
        nonempty = [i for i, plane in enumerate(rgb) if not np.all(plane == 0)]
    h, w = rgb[0].shape
    if not nonempty:
        return np.zeros((h, w, 3), dtype=np.uint8)
    if len(nonempty) == 1:
        return np.stack([_minmax_uint8(rgb[nonempty[0]], ranges[nonempty[0]])] * 3, axis=-1)
    if len(nonempty) == 2:
        c0, c1 = nonempty
        if np.all(rgb[c0] == rgb[c1]):
            return np.stack([_minmax_uint8(rgb[c0], ranges[c0])] * 3, axis=-1)
        out = np.zeros((h, w, 3), dtype=np.uint8)
        out[..., c0] = _minmax_uint8(rgb[c0], ranges[c0])
        out[..., c1] = _minmax_uint8(rgb[c1], ranges[c1])
        return out
    joint = None
    if bounds:
        joint = (min(float(r[0]) for r in ranges if r), max(float(r[1]) for r in ranges if r))
    return _minmax_uint8(np.stack(rgb, axis=-1), joint)


def to_uint8_rgb(
    image: np.ndarray,
    channels: int | tuple[int, ...] | list[int] | None = None,
    *,
    normalize: str = "minmax",
    low: float = LOW_PERCENTILE,
    high: float = HIGH_PERCENTILE,
    ranges: Sequence[tuple[float, float]] | None = None,
) -> np.ndarray:
    """Convert an image of any dtype to the uint8 RGB image SAM expects.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W) grayscale, (C, H, W) channel-first with C >= 1, or an (H, W, 3)
        uint8 RGB image.
    channels : int or sequence of int, optional
        Channels of a (C, H, W) image to use, at most 3 (required when C > 3).
        One channel is grayscale; two or three are red, green (and blue) in
        the given order.
    normalize : {"minmax", "percentile"}, optional
        "minmax" (default, the reference): the range min..max becomes 0..255,
        truncated to integers; grayscale is stacked x3; of 2-3 channels, those
        that are all zero are ignored, one non-empty channel is shown as gray,
        two are stretched each on its own (or shown as gray if identical),
        three get one joint stretch (an (H, W, 3) uint8 image too).
        "percentile": every channel's ``low``/``high`` percentiles become
        0/255 (robust to hot pixels; rounded); uint8 RGB is returned as it is.
    low, high : float, optional
        Percentiles of ``normalize="percentile"``.
    ranges : sequence of (float, float), optional
        One (lo, hi) per used channel, the range mapped to 0..255 instead of
        the image's own: a block of a plane passes the whole plane's (min,
        max) for "minmax" or its (low, high) percentiles for "percentile", so
        every block is stretched alike.

    Returns
    -------
    numpy.ndarray
        uint8 (H, W, 3).
    """
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZE_MODES)}, got {normalize!r}")
    arr = np.asarray(image)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TrainingDataError(f"image must be numeric, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 3 and arr.dtype == np.uint8 and arr.shape[0] > 4 and channels is None:
        if normalize == "percentile":
            return arr.copy()
        return _reference_rgb([arr[..., 0], arr[..., 1], arr[..., 2]])
    if arr.ndim == 2:
        planes = arr[None]
    elif arr.ndim == 3:
        planes = arr
    else:
        raise TrainingDataError(
            f"image must be 2-D (H, W) or 3-D (C, H, W), got shape {arr.shape}; "
            "select one plane/time point first"
        )
    if channels is not None:
        picked = [channels] if isinstance(channels, int) else list(channels)
        if not 1 <= len(picked) <= 3:
            raise TrainingDataError(f"channels must name 1 to 3 channels, got {channels!r}")
        for c in picked:
            if not -planes.shape[0] <= c < planes.shape[0]:
                raise TrainingDataError(
                    f"channel {c} does not exist: the image has {planes.shape[0]} channel(s)"
                )
        planes = planes[picked]
    elif planes.shape[0] > 3:
        raise TrainingDataError(
            f"image has {planes.shape[0]} channels; pass channels=(i,) or up to 3 channel indices "
            "to choose which ones to train on"
        )
    if planes.shape[0] == 0 or planes.shape[1] == 0 or planes.shape[2] == 0:
        raise TrainingDataError(f"image is empty (shape {arr.shape})")
    if ranges is not None and len(ranges) != planes.shape[0]:
        raise ValueError(f"ranges: one (lo, hi) per channel needed, got {len(ranges)} for {planes.shape[0]}")
    if normalize == "minmax":
        return _reference_rgb(list(planes), list(ranges) if ranges is not None else None)
    scaled = [_rescale(p, low, high, ranges[i] if ranges is not None else None) for i, p in enumerate(planes)]
    if len(scaled) == 1:
        scaled = scaled * 3
    while len(scaled) < 3:
        scaled.append(np.zeros_like(scaled[0]))
    return np.stack(scaled, axis=-1)


# --------------------------------------------------------------------------
# Resizing with OpenCV's "exact" semantics
# --------------------------------------------------------------------------


def nearest_exact_index(src: int, dst: int) -> np.ndarray:
    """Source index of every destination index of a nearest-neighbour resize ``src`` -> ``dst``.

    OpenCV's ``INTER_NEAREST_EXACT`` (the reference's choice for masks):
    pixel centres are mapped, ``floor((i + 0.5) * src / dst)``, in its 16-bit
    fixed-point arithmetic (so the result is OpenCV's, bit for bit).
    """
    step = ((src << 16) + dst // 2) // dst
    offset = step // 2 - src % 2
    index = (step * np.arange(dst, dtype=np.int64) + offset) >> 16
    return np.minimum(index, src - 1)


def resize_nearest_exact(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a label image (or any array, on its first two axes) to ``size`` = (h, w), nearest, pixel centres."""
    arr = np.asarray(labels)
    rows = nearest_exact_index(arr.shape[0], int(size[0]))
    cols = nearest_exact_index(arr.shape[1], int(size[1]))
    return arr[rows[:, None], cols[None, :]]


def _linear_exact_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(first index, second index, first weight, second weight) of OpenCV's bit-exact bilinear resize.

    Weights are fixed point with 8 fractional bits (they sum to 256):
    ``f = (i + 0.5) * scale - 0.5`` in double precision, ``scale = 1 / (dst / src)``;
    the second weight is ``round_half_even((f - floor f) * 256)``; positions
    left of the first or right of the last source pixel take that pixel.
    """
    scale = 1.0 / (dst / src)
    f = scale * (np.arange(dst, dtype=np.float64) + 0.5) - 0.5
    i0 = np.floor(f).astype(np.int64)
    w1 = np.rint((f - i0) * 256.0).astype(np.int64)
    left = (i0 < 0) | (src <= 1)
    right = ~left & (i0 >= src - 1)
    i0 = np.where(left, 0, np.where(right, src - 1, i0))
    w1 = np.where(left | right, 0, w1)
    i1 = np.minimum(i0 + 1, src - 1)
    return i0, i1, 256 - w1, w1


def resize_linear_exact(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a uint8 image (H, W) or (H, W, C) to ``size`` = (h, w) like OpenCV's ``INTER_LINEAR_EXACT``.

    Bilinear with pixel centres aligned (half-pixel offsets), edge pixels
    repeated, integer arithmetic as OpenCV's bit-exact path: a horizontal pass
    with 8-bit weights, then a vertical one, rounded half up to uint8. An
    exact 2x reduction is OpenCV's 2x2 mean, ``(a + b + c + d + 2) >> 2``.
    Verified bit-equal against OpenCV 4.10 (docs/engine.md).
    """
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"resize_linear_exact takes uint8 images, got {arr.dtype}")
    h, w = int(size[0]), int(size[1])
    src_h, src_w = arr.shape[:2]
    if (h, w) == (src_h, src_w):
        return arr.copy()
    values = arr.astype(np.int64)
    if src_h == 2 * h and src_w == 2 * w and (arr.ndim == 2 or arr.shape[2] != 2):
        total = values[0::2, 0::2] + values[0::2, 1::2] + values[1::2, 0::2] + values[1::2, 1::2]
        return ((total + 2) >> 2).astype(np.uint8)
    x0, x1, wx0, wx1 = _linear_exact_taps(src_w, w)
    y0, y1, wy0, wy1 = _linear_exact_taps(src_h, h)
    extra = (None,) * (arr.ndim - 2)
    horizontal = values[:, x0] * wx0[(None, slice(None)) + extra] + values[:, x1] * wx1[(None, slice(None)) + extra]
    total = horizontal[y0] * wy0[(slice(None), None) + extra] + horizontal[y1] * wy1[(slice(None), None) + extra]
    return np.minimum((total + (1 << 15)) >> 16, 255).astype(np.uint8)


def _resize_to_short_edge(image: np.ndarray, labels: np.ndarray, short: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's ``resize_to_short_edge``: the shorter side becomes ``short``.

    The other side becomes ``int(long * short / short_side)``; skimage's
    ``resize`` with order 1 (image, values in 0..1 times 255, truncated) and
    order 0 (labels), no anti-aliasing, as the reference calls it.
    """
    from skimage.transform import resize

    h, w = labels.shape
    if h < w:
        new_h, new_w = short, int(w * short / h)
    else:
        new_w, new_h = short, int(h * short / w)
    out_image = (255.0 * resize(image, (new_h, new_w), order=1, anti_aliasing=False)).astype(image.dtype)
    out_labels = (1.0 * resize(labels, (new_h, new_w), order=0, anti_aliasing=False)).astype(labels.dtype)
    return out_image, out_labels


# --------------------------------------------------------------------------
# Validation and tiling
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentSettings:
    """Random augmentations of a training tile (the reference's probabilities and ranges)."""

    #: Brightness shift as a fraction of 255, +-.
    brightness: float = 0.1
    #: Contrast factor 1 +- this.
    contrast: float = 0.1
    p_brightness_contrast: float = 0.5
    #: Flip horizontally, vertically or both (one of the three, at random).
    p_flip: float = 0.75
    #: Random resized crop: area fraction and aspect-ratio range of the crop.
    p_crop: float = 0.5
    crop_scale: tuple[float, float] = (0.3, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    #: Shift-scale-rotate: shift as a fraction of the tile, scale 1 +- scale, angle +- rotate degrees.
    p_shift_scale_rotate: float = 0.8
    shift: float = 0.0625
    scale: float = 0.5
    rotate: float = 45.0
    #: Image value of pixels mapped from outside the tile: "zero" (black, the
    #: reference) or "median" (the tile's per-channel median, cellseg1d's earlier fill).
    fill: str = "zero"

    def __post_init__(self) -> None:
        if self.fill not in FILL_MODES:
            raise ValueError(f"fill must be one of {', '.join(FILL_MODES)}, got {self.fill!r}")


def _translate(dy: float, dx: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dy], [0.0, 1.0, dx], [0.0, 0.0, 1.0]])


def _scale(sy: float, sx: float) -> np.ndarray:
    return np.array([[sy, 0.0, 0.0], [0.0, sx, 0.0], [0.0, 0.0, 1.0]])


def _crop_box(h: int, w: int, settings: AugmentSettings, rng: np.random.Generator) -> tuple[float, ...]:
    """A random crop (y0, x0, height, width) of area fraction and aspect ratio in range."""
    area = h * w
    log_lo, log_hi = math.log(settings.crop_ratio[0]), math.log(settings.crop_ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*settings.crop_scale)
        ratio = math.exp(rng.uniform(log_lo, log_hi))  # width / height
        cw, ch = math.sqrt(target * ratio), math.sqrt(target / ratio)
        if cw <= w and ch <= h:
            return rng.uniform(0, h - ch), rng.uniform(0, w - cw), ch, cw
    return 0.0, 0.0, float(h), float(w)


def _random_geometry(h: int, w: int, size: int, settings: AugmentSettings | None,
                     rng: np.random.Generator) -> np.ndarray:
    """The 3x3 map (row, col, 1) of a (h, w) tile to the (size, size) output, continuous coords."""
    matrix = np.eye(3)
    if settings is not None:
        if rng.random() < settings.p_flip:
            kind = int(rng.integers(3))  # 0 horizontal, 1 vertical, 2 both
            if kind in (0, 2):
                matrix = np.array([[1.0, 0, 0], [0, -1.0, w], [0, 0, 1]]) @ matrix
            if kind in (1, 2):
                matrix = np.array([[-1.0, 0, h], [0, 1.0, 0], [0, 0, 1]]) @ matrix
        if rng.random() < settings.p_crop:
            y0, x0, ch, cw = _crop_box(h, w, settings, rng)
            matrix = _scale(h / ch, w / cw) @ _translate(-y0, -x0) @ matrix
        if rng.random() < settings.p_shift_scale_rotate:
            s = rng.uniform(1 - settings.scale, 1 + settings.scale)
            angle = math.radians(rng.uniform(-settings.rotate, settings.rotate))
            dy, dx = rng.uniform(-settings.shift, settings.shift, size=2) * (h, w)
            cos, sin = math.cos(angle), math.sin(angle)
            rotation = np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
            matrix = (_translate(h / 2 + dy, w / 2 + dx) @ rotation @ _scale(s, s)
                      @ _translate(-h / 2, -w / 2) @ matrix)
    return _scale(size / h, size / w) @ matrix


def _brightness_contrast(image: np.ndarray, settings: AugmentSettings, rng: np.random.Generator) -> np.ndarray:
    """The reference's uint8 brightness/contrast: a float32 look-up table, clipped and truncated."""
    alpha = 1.0 + rng.uniform(-settings.contrast, settings.contrast)
    beta = rng.uniform(-settings.brightness, settings.brightness)
    lut = np.arange(256).astype(np.float32)
    lut *= alpha
    lut += beta * 255
    return np.clip(lut, 0, 255).astype(np.uint8)[image]


@dataclass
class AugmentedItem:
    """A tile after :func:`augment_item`."""

    #: uint8 (size, size, 3).
    image: np.ndarray
    #: (size, size) labels, the input's dtype.
    mask: np.ndarray
    #: float32 (K, 2) (x, y) pixel indices of the points that stayed in the image.
    points: np.ndarray
    #: int64 (K,) indices (into the input points) of those points, in input order.
    kept: np.ndarray


def augment_item(
    image: np.ndarray,
    mask: np.ndarray,
    points: np.ndarray | None,
    size: int,
    rng: np.random.Generator,
    settings: AugmentSettings | None = None,
) -> AugmentedItem:
    """Randomly augment a tile, its labels and its point prompts identically; resize to ``size`` x ``size``.

    Order (the reference's): brightness/contrast (a uint8 look-up table),
    flip, random resized crop, shift-scale-rotate, resize. The geometric steps
    are composed into one affine map and the tile resampled once
    (``torch.nn.functional.grid_sample``): bilinear for the image, nearest for
    the labels (no new label values). Pixels mapped from outside the tile are
    0 in the labels and black in the image (``settings.fill == "zero"``, the
    reference) or the tile's per-channel median. ``settings=None`` only resizes.

    A point ``(x, y)`` moves with its pixel's centre and lands on the output
    pixel containing it (the reference truncates its moved keypoints to
    integers); points that leave the image are dropped (``kept`` lists the others).
    """
    h, w = mask.shape
    img = image
    if settings is not None and rng.random() < settings.p_brightness_contrast:
        img = _brightness_contrast(np.asarray(image, dtype=np.uint8), settings, rng)
    img = img.astype(np.float32)
    forward = _random_geometry(h, w, size, settings, rng)
    theta = _sampling_theta(np.linalg.inv(forward), (h, w), (size, size))
    # The sampling grid of affine_grid(theta, align_corners=False), built directly (faster on CPU).
    centres = (2.0 * np.arange(size) + 1.0) / size - 1.0
    gx = theta[0, 0] * centres[None, :] + theta[0, 1] * centres[:, None] + theta[0, 2]
    gy = theta[1, 0] * centres[None, :] + theta[1, 1] * centres[:, None] + theta[1, 2]
    grid = torch.from_numpy(np.stack([gx, gy], axis=-1)[None])
    if settings is not None and settings.fill == "median":
        # Out-of-tile pixels get the fill value: sample (image - fill) with zero padding, add it back.
        fill = np.median(img[::4, ::4].reshape(-1, img.shape[-1]), axis=0).astype(np.float32)
    else:
        fill = np.zeros(img.shape[-1], dtype=np.float32)
    source = torch.from_numpy(np.ascontiguousarray((img - fill).transpose(2, 0, 1)))[None]
    sampled = F.grid_sample(source, grid.float(), mode="bilinear", padding_mode="zeros", align_corners=False)
    out = sampled[0].numpy().transpose(1, 2, 0) + fill
    out_image = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    # float64 holds every label value up to 2**53 exactly; nearest never invents values.
    labels = torch.from_numpy(np.asarray(mask).astype(np.float64))[None, None]
    picked = F.grid_sample(labels, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    out_mask = picked[0, 0].numpy().astype(mask.dtype)
    pts = np.zeros((0, 2), dtype=np.float32) if points is None else np.asarray(points, dtype=np.float64)
    if pts.shape[0]:
        centres_in = np.stack([pts[:, 1] + 0.5, pts[:, 0] + 0.5, np.ones(len(pts))])  # (row, col, 1)
        rows, cols = (forward @ centres_in)[:2]
        inside = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
        kept = np.flatnonzero(inside)
        moved = np.stack([np.floor(cols[kept]), np.floor(rows[kept])], axis=1).astype(np.float32)
    else:
        kept = np.zeros(0, dtype=np.int64)
        moved = np.zeros((0, 2), dtype=np.float32)
    return AugmentedItem(image=out_image, mask=out_mask, points=moved, kept=kept.astype(np.int64))


def augment(
    image: np.ndarray,
    mask: np.ndarray,
    size: int,
    rng: np.random.Generator,
    settings: AugmentSettings | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`augment_item` without points: (uint8 (size, size, 3) image, (size, size) labels)."""
    item = augment_item(image, mask, None, size, rng, settings)
    return item.image, item.mask


def _sampling_theta(inverse: np.ndarray, src: tuple[int, int], dst: tuple[int, int]) -> np.ndarray:
    """``inverse`` (output -> source, continuous (row, col)) as an ``affine_grid`` theta.

    ``affine_grid`` works in normalised (x, y) coordinates, -1 and 1 being the
    outer edges of the image (``align_corners=False``).
    """
    def to_continuous(shape: tuple[int, int]) -> np.ndarray:
        return np.array([[shape[0] / 2, 0, shape[0] / 2], [0, shape[1] / 2, shape[1] / 2], [0, 0, 1.0]])

    normalised = np.linalg.inv(to_continuous(src)) @ inverse @ to_continuous(dst)
    swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1.0]])
    return (swap @ normalised @ swap)[:2]


# --------------------------------------------------------------------------
# Point prompts
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSettings:
    """Rules for drawing point prompts from a tile's label mask (the reference's ``sample_points``)."""

    #: Positive points: ``min(max_cells, ceil(n_cells * positive_rate))`` cells
    #: are picked at random from all cells, then filtered (below).
    max_cells: int = 30
    positive_rate: float = 1.0
    #: A picked cell of this area or less (pixels) gets no point.
    min_cell_area: int = 100
    #: The edge band (pixels; the reference's ``edge_distance``). A picked cell
    #: whose bounding box lies entirely within ``border`` of the tile's edge
    #: (in the tile padded by ``border``: box stop < 2 border or box start >
    #: padded size - 2 border) gets no point; negatives keep this far from the
    #: edge (the border counts as foreground); after augmentation, a moved
    #: positive point's cell is dropped when its box lies within ``border`` of the edge.
    border: int = 20
    #: Points are drawn (equal probability) among the pixels whose chamfer
    #: distance to the cell's (or the background's) edge is at least that of the
    #: ``top_fraction`` x area-th farthest pixel.
    top_fraction: float = 0.2
    #: Negative points: ``min(max_negatives, ceil(n_cells * negative_ratio))`` ...
    negative_ratio: float = 0.5
    max_negatives: int = 30
    #: ... and at most int(candidate background area / this) + 1 (drawn with replacement) ...
    background_area_per_negative: int = 1000
    #: ... and none when foreground area / background area exceeds this.
    max_foreground_ratio: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.top_fraction <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction}")
        if not 0 <= self.positive_rate <= 1 or self.negative_ratio < 0:
            raise ValueError(f"positive_rate must be in [0, 1] and negative_ratio >= 0, got {self.positive_rate} "
                             f"and {self.negative_ratio}")


@dataclass
class Prompts:
    """Point prompts of one tile: positives first, then negatives."""

    #: float32 (N, 2): (x, y) pixel indices in the mask.
    points: np.ndarray
    #: int64 (N,): 1 positive (inside a cell), 0 negative (on background).
    labels: np.ndarray
    #: int64 (N,): label value of the prompted cell, 0 for negatives.
    cell_ids: np.ndarray
    #: Bounding box (rows, cols) of the prompted cell, None for negatives.
    boxes: list[tuple[slice, slice] | None] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


#: OpenCV's 5x5 chamfer weights for DIST_L2 (1, 1.4, 2.1969) in 16.16 fixed point.
_CHAMFER_HV, _CHAMFER_DIAG, _CHAMFER_LONG = 65536, 91750, 143976
_CHAMFER_INIT = 1 << 40


def chamfer_distance(image: np.ndarray) -> np.ndarray:
    """OpenCV's 5x5 chamfer distance transform (DIST_L2, 5x5 mask) of ``image`` (non-zero pixels), float32.

    The reference calls ``cv2.distanceTransformWithLabels(..., DIST_L2,
    DIST_MASK_PRECISE)``; with labels OpenCV does not run the exact Euclidean
    transform but its 5x5 chamfer approximation (steps 1, 1.4 and 2.1969),
    which is what this computes, in the same fixed-point arithmetic: two
    raster passes, distances to the nearest zero pixel *inside* the array (its
    outside is not zero). An array without a zero pixel gets one large
    constant everywhere (as in OpenCV, whose constant differs).
    """
    src = np.asarray(image) != 0
    h, w = src.shape
    if h == 0 or w == 0:
        return np.zeros((h, w), dtype=np.float32)
    if src.all():
        return np.full((h, w), np.float32(65535.0), dtype=np.float32)
    hv, diag, long = _CHAMFER_HV, _CHAMFER_DIAG, _CHAMFER_LONG
    temp = np.full((h + 4, w + 4), _CHAMFER_INIT, dtype=np.int64)
    ramp = hv * np.arange(w, dtype=np.int64)
    c = slice(2, w + 2)
    for i in range(h):
        r = i + 2
        up2, up1 = temp[r - 2], temp[r - 1]
        best = np.minimum.reduce([
            up2[1:w + 1] + long, up2[3:w + 3] + long, up1[0:w] + long, up1[1:w + 1] + diag,
            up1[c] + hv, up1[3:w + 3] + diag, up1[4:w + 4] + long,
        ])
        best[~src[i]] = 0
        temp[r, c] = np.minimum.accumulate(best - ramp) + ramp  # t[j] = min(best[j], t[j-1] + hv)
    for i in range(h - 1, -1, -1):
        r = i + 2
        dn1, dn2 = temp[r + 1], temp[r + 2]
        best = np.minimum.reduce([
            temp[r, c], dn2[3:w + 3] + long, dn2[1:w + 1] + long, dn1[4:w + 4] + long, dn1[3:w + 3] + diag,
            dn1[c] + hv, dn1[1:w + 1] + diag, dn1[0:w] + long,
        ])
        rev = best[::-1]
        temp[r, c] = (np.minimum.accumulate(rev - ramp) + ramp)[::-1]  # t[j] = min(best[j], t[j+1] + hv)
    return temp[2:h + 2, c].astype(np.float32) * np.float32(1.0 / 65536)


def _filter_small_distance(distance: np.ndarray, fraction: float) -> np.ndarray:
    """The reference's ``filter_small_distance``: keep values >= the (fraction x non-zero count)-th largest."""
    flat = distance.ravel()
    k = int(np.count_nonzero(flat) * fraction)
    threshold = flat.min() if k == 0 else np.partition(flat, flat.size - k)[flat.size - k]
    return np.where(distance < threshold, 0, distance).astype(distance.dtype)


def _at_edge(box: tuple[slice, slice], distance: int, shape: tuple[int, int]) -> bool:
    """The reference's ``check_at_edge``: the box lies entirely within ``distance`` of an edge."""
    rows, cols = box
    return (rows.stop < distance or cols.stop < distance
            or rows.start > shape[0] - distance or cols.start > shape[1] - distance)


def sample_prompts(
    mask: np.ndarray,
    rng: np.random.Generator,
    settings: PromptSettings | None = None,
) -> Prompts:
    """Draw point prompts from an instance label mask (a tile), as the reference's ``sample_points``.

    Cells are numbered 1..n (in the order of their label values) and the mask
    padded by ``e = border`` pixels.

    Positive points: ``min(max_cells, ceil(n positive_rate))`` cells are
    picked at random from all n cells (random order); a picked cell is skipped
    if its box lies entirely in the edge band (padded box stop < 2e or start >
    padded size - 2e) or its area is <= ``min_cell_area``; otherwise one point
    is drawn, with equal probability, among the cell's pixels whose
    :func:`chamfer_distance` in the cell's bounding box (the box border is not
    an edge) is among the ``top_fraction`` largest.

    Negative points: ``min(max_negatives, ceil(n negative_ratio))``, none if
    foreground / background area > ``max_foreground_ratio``, one if there
    would be no point at all; the background's chamfer distance is computed
    in the mask padded with *foreground*, so the image border counts as
    foreground; the candidates are the ``top_fraction`` largest distances,
    their number caps the count at ``int(area / background_area_per_negative)
    + 1``; drawn with replacement, equal probability.
    """
    s = settings or PromptSettings()
    labels = np.asarray(mask)
    h, w = labels.shape
    ids, compact = _compact_labels(labels)
    n = int(ids.size - 1)
    e = int(s.border)
    pos_num = min(s.max_cells, math.ceil(n * s.positive_rate))
    neg_num = min(s.max_negatives, math.ceil(n * s.negative_ratio))
    fg = int(np.count_nonzero(compact))
    bg = h * w - fg
    if (fg / bg if bg else math.inf) > s.max_foreground_ratio:
        neg_num = 0
    if pos_num == 0 and neg_num == 0:
        neg_num = 1

    padded = np.pad(compact, e)
    objects = ndimage.find_objects(padded) if n else []
    points: list[tuple[float, float]] = []
    cell_ids: list[int] = []
    boxes: list[tuple[slice, slice] | None] = []
    chosen = rng.choice(n, size=pos_num, replace=False) if pos_num else []
    for k in chosen:
        box = objects[int(k)]
        if box is None:
            continue
        if _at_edge(box, 2 * e, padded.shape):
            continue
        cell = padded[box] == int(k) + 1
        if np.count_nonzero(cell) <= s.min_cell_area:
            continue
        distance = chamfer_distance(cell)
        distance[~cell] = 0
        candidates = np.flatnonzero(_filter_small_distance(distance, s.top_fraction))
        pick = int(rng.choice(candidates))
        row, col = divmod(pick, cell.shape[1])
        y, x = box[0].start + row - e, box[1].start + col - e
        points.append((x, y))
        cell_ids.append(int(ids[int(k) + 1]))
        boxes.append((slice(box[0].start - e, box[0].stop - e), slice(box[1].start - e, box[1].stop - e)))
    n_pos = len(points)

    background = np.pad(compact == 0, e, constant_values=False)  # padded with foreground
    kept = _filter_small_distance(chamfer_distance(background), s.top_fraction)
    candidates = np.flatnonzero(kept)
    neg_num = min(neg_num, int(candidates.size / s.background_area_per_negative) + 1)
    if candidates.size and neg_num > 0:
        for pick in rng.choice(candidates, size=neg_num, replace=True):
            row, col = divmod(int(pick), w + 2 * e)
            points.append((col - e, row - e))
            cell_ids.append(0)
            boxes.append(None)

    count = len(points)
    return Prompts(
        points=np.asarray(points, dtype=np.float32).reshape(count, 2),
        labels=np.array([1] * n_pos + [0] * (count - n_pos), dtype=np.int64),
        cell_ids=np.asarray(cell_ids, dtype=np.int64).reshape(count),
        boxes=boxes,
    )


def _compact_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, compact): ``compact`` numbers the cells 1..K (0 background), ``ids[k]`` is the label."""
    flat = labels.ravel()
    if flat.size and int(flat.min()) >= 0 and int(flat.max()) <= 4 * flat.size + 1024:
        present = np.bincount(flat.astype(np.intp), minlength=1) > 0
        present[0] = True
        ids = np.flatnonzero(present)
        lut = np.zeros(present.size, dtype=np.intp)
        lut[ids] = np.arange(ids.size)
        return ids, lut[flat.astype(np.intp)].reshape(labels.shape)
    ids, inverse = np.unique(flat, return_inverse=True)
    if ids.size == 0 or ids[0] != 0:  # no background pixel: keep 0 for "background"
        ids, inverse = np.concatenate([[0], ids]), inverse + 1
    return ids, inverse.reshape(labels.shape)


# --------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------


def low_res_size(image_size: int) -> int:
    """Side of SAM's low-resolution mask logits for an input of ``image_size``."""
    return image_size // LOW_RES_FACTOR


def _low_res_targets(mask: np.ndarray, cells: np.ndarray, low: int) -> np.ndarray:
    """Every prompt's target (its cell's mask; empty for 0) resized to ``low`` x ``low``, nearest-exact.

    The reference resizes each target with ``cv2.INTER_NEAREST_EXACT`` to the
    logits' size, whatever the item's size.
    """
    rows = nearest_exact_index(mask.shape[0], low)
    cols = nearest_exact_index(mask.shape[1], low)
    small = mask[rows[:, None], cols[None, :]]
    targets = np.zeros((len(cells), low, low), dtype=np.float32)
    for i, cell in enumerate(cells):
        if cell != 0:
            targets[i] = small == cell
    return targets


@dataclass
class CellTileDataset(torch.utils.data.Dataset):
    """Training items with point prompts, deterministic per (seed, epoch, index).

    Every item is a dict, or None when the augmentation moved all of the
    tile's points out of the image (the reference drops such an item from its
    batch):

    - ``image``: float32 (3, S, S), RGB 0..255 (SAM normalises it itself);
      without augmentation the tile as it is, (3, t, t) (SAM pads it to S x S,
      as in the reference), unless ``unaugmented="resize"``;
    - ``points``: float32 (N, 2), (x, y) pixel indices of the image;
    - ``point_labels``: int64 (N,), the label the prompt encoder gets for every
      point: 1 (a foreground click) for all of them, as in the reference:
      background prompts differ only by their targets;
    - ``targets``: float32 (N, S/4, S/4), the prompted cell's mask resized to
      SAM's low-res logits (nearest-exact), empty for negatives;
    - ``cell_prob``: float32 (N,), 1 for cell prompts, 0 for background and
      for a cell whose low-res target is empty.

    N may be 0 (no usable point): the training loop skips such a batch.
    """

    tiles: list[tuple[np.ndarray, np.ndarray]]
    image_size: int = 512
    seed: int = 0
    augment: AugmentSettings | None = field(default_factory=AugmentSettings)
    prompts: PromptSettings = field(default_factory=PromptSettings)
    epoch: int = 0
    #: Without augmentation: "pad" (the reference) or "resize" (the tile and
    #: its points are resized to the model input, so targets line up with it).
    unaugmented: str = "pad"

    def __post_init__(self) -> None:
        if self.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16, got {self.image_size}")
        if not self.tiles:
            raise ValueError("no tiles to train on")
        if self.unaugmented not in UNAUGMENTED_MODES:
            raise ValueError(f"unaugmented must be one of {', '.join(UNAUGMENTED_MODES)}, got {self.unaugmented!r}")
        if self.augment is None and self.unaugmented == "pad":
            side = max(max(mask.shape) for _, mask in self.tiles)
            if side > self.image_size:
                raise TrainingDataError(
                    f"without augmentation the {side} px tiles go to the model as they are, but its input is "
                    f"{self.image_size} px; use tiles of at most {self.image_size} px or unaugmented='resize'"
                )

    def __len__(self) -> int:
        return len(self.tiles)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentations of ``epoch`` (every epoch sees new random ones)."""
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        """The generator of item ``index`` in the current epoch."""
        return np.random.default_rng([self.seed, 0, self.epoch, index])

    def order(self, epoch: int) -> np.ndarray:
        """The (shuffled) order in which the items of ``epoch`` are visited."""
        return np.random.default_rng([self.seed, 1, epoch]).permutation(len(self))

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        image, mask = self.tiles[index]
        rng = self.rng(index)
        prompts = sample_prompts(mask, rng, self.prompts)
        size = self.image_size
        if self.augment is not None:
            moved = augment_item(image, mask, prompts.points, size, rng, self.augment)
            if moved.kept.size == 0:
                return None
            image, mask = moved.image, moved.mask
            points, labels = moved.points, prompts.labels[moved.kept]
            cells = np.where(labels == 1, _labels_at(mask, points), 0)
            keep = (labels == 0) | self._usable(mask, cells)
            points, labels, cells = points[keep], labels[keep], cells[keep]
        elif self.unaugmented == "resize" and mask.shape != (size, size):
            points = np.stack([np.floor((prompts.points[:, 0] + 0.5) * size / mask.shape[1]),
                               np.floor((prompts.points[:, 1] + 0.5) * size / mask.shape[0])],
                              axis=1).astype(np.float32).reshape(-1, 2)
            image, mask = resize_linear_exact(image, (size, size)), resize_nearest_exact(mask, (size, size))
            labels, cells = prompts.labels, prompts.cell_ids
        else:
            points, labels, cells = prompts.points, prompts.labels, prompts.cell_ids
        targets = _low_res_targets(mask, cells, low_res_size(size))
        cell_prob = ((labels == 1) & (targets.reshape(len(labels), -1).max(axis=1, initial=0) > 0))
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float(),
            "points": torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32).reshape(-1, 2)),
            "point_labels": torch.ones(len(labels), dtype=torch.int64),
            "targets": torch.from_numpy(targets),
            "cell_prob": torch.from_numpy(cell_prob.astype(np.float32)),
        }

    def _usable(self, mask: np.ndarray, cells: np.ndarray) -> np.ndarray:
        """The reference's check of moved positive points: on a cell, area > min, not in the edge band."""
        ok = np.zeros(len(cells), dtype=bool)
        for i, cell in enumerate(cells):
            if cell == 0:
                continue
            inside = mask == cell
            if np.count_nonzero(inside) <= self.prompts.min_cell_area:
                continue
            rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
            box = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
            ok[i] = not _at_edge(box, self.prompts.border, mask.shape)
        return ok


def _labels_at(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Label under every (x, y) point."""
    if len(points) == 0:
        return np.zeros(0, dtype=np.int64)
    xy = points.astype(np.int64)
    return mask[xy[:, 1], xy[:, 0]].astype(np.int64)


def collate_items(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch items: images stacked (B, 3, S, S); prompts stay per-item lists."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "points": [it["points"] for it in items],
        "point_labels": [it["point_labels"] for it in items],
        "targets": [it["targets"] for it in items],
        "cell_prob": [it["cell_prob"] for it in items],
    }
