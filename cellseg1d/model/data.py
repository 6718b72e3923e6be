"""Training data for CellSeg1: one annotated image -> augmented tiles with point prompts.

The pipeline, for one image and its instance label mask:

1. :func:`to_uint8_rgb` turns the image (grayscale, 2-3 channels, any dtype)
   into uint8 RGB, the input SAM expects.
2. :func:`make_tiles` optionally resizes the image (longest side
   ``resize_to``), cuts square tiles with 50% overlap and repeats the list
   until there are at least ``min_items`` items per epoch.
3. :func:`augment` applies brightness/contrast, flips, a random resized crop
   and shift-scale-rotate identically to the tile and its mask (bilinear for
   the image, nearest for the labels, so no new label values appear), and
   resizes to the model input size, all as one affine resampling.
4. :func:`sample_prompts` draws one positive point per cell and some negative
   (background) points; every point is one prompt with its own target mask.
5. :class:`CellTileDataset` ties it together; item ``i`` of epoch ``e`` is a
   deterministic function of ``(seed, e, i)``.

Coordinates: points are ``(x, y)`` in model-input pixels (SAM's convention),
masks are indexed ``[row, col]``. Sizes and distances of the prompt rules are
measured in model-input pixels, i.e. after augmentation and resizing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from cellseg1d.errors import CellsegError

__all__ = [
    "AugmentSettings",
    "CellTileDataset",
    "PromptSettings",
    "Prompts",
    "TrainingDataError",
    "augment",
    "check_training_pair",
    "collate_items",
    "low_res_size",
    "make_tiles",
    "sample_prompts",
    "to_uint8_rgb",
]

#: Percentiles mapped to 0 and 255 by :func:`to_uint8_rgb`.
LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5
#: SAM's low-resolution mask logits are this many times smaller than its input.
LOW_RES_FACTOR = 4


class TrainingDataError(CellsegError, ValueError):
    """The training image or mask cannot be used; the message says what to do."""


# --------------------------------------------------------------------------
# Image conversion
# --------------------------------------------------------------------------


def _rescale(channel: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map the ``low``/``high`` percentiles of ``channel`` to 0/255 (clipped), as uint8."""
    values = np.asarray(channel, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.uint8)
    lo, hi = np.percentile(values[finite], [low, high])
    if hi <= lo:  # (nearly) constant channel: keep it dark rather than noise-amplified
        lo, hi = float(values[finite].min()), float(values[finite].max())
        if hi <= lo:
            return np.zeros(values.shape, dtype=np.uint8)
    scaled = (np.where(finite, values, lo) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_uint8_rgb(
    image: np.ndarray,
    channels: int | tuple[int, ...] | list[int] | None = None,
    *,
    low: float = LOW_PERCENTILE,
    high: float = HIGH_PERCENTILE,
) -> np.ndarray:
    """Convert an image of any dtype to the uint8 RGB image SAM expects.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W) grayscale, (C, H, W) channel-first with C >= 1, or an (H, W, 3)
        uint8 RGB image (returned unchanged, as a copy).
    channels : int or sequence of int, optional
        Channels of a (C, H, W) image to use, at most 3 (required when C > 3).
        One channel is shown as gray; two or three are mapped to red, green
        (and blue) in the given order.
    low, high : float, optional
        Percentiles of every channel mapped to 0 and 255 (robust rescaling;
        values outside are clipped).

    Returns
    -------
    numpy.ndarray
        uint8 (H, W, 3).
    """
    arr = np.asarray(image)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TrainingDataError(f"image must be numeric, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 3 and arr.dtype == np.uint8 and arr.shape[0] > 4 and channels is None:
        return arr.copy()
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
    scaled = [_rescale(p, low, high) for p in planes]
    if len(scaled) == 1:
        scaled = scaled * 3
    while len(scaled) < 3:
        scaled.append(np.zeros_like(scaled[0]))
    return np.stack(scaled, axis=-1)


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


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length`` pixels."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def _resize_pair(image: np.ndarray, mask: np.ndarray, longest: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize so that the longest side is ``longest``: bilinear image, nearest mask."""
    h, w = mask.shape
    scale = longest / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    if (new_h, new_w) == (h, w):
        return image, mask
    matrix = np.diag([h / new_h, w / new_w])
    offset = 0.5 * np.array([h / new_h, w / new_w]) - 0.5
    if scale < 1:  # smooth before shrinking to avoid aliasing
        sigma = [max(0.0, (1 / scale - 1) / 2)] * 2 + [0]
        image = ndimage.gaussian_filter(image.astype(np.float32), sigma=sigma)
    channels = [
        ndimage.affine_transform(image[..., c].astype(np.float32), matrix, offset, (new_h, new_w), order=1,
                                 mode="nearest")
        for c in range(image.shape[-1])
    ]
    out_image = np.clip(np.rint(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)
    out_mask = ndimage.affine_transform(mask, matrix, offset, (new_h, new_w), order=0, mode="nearest")
    return out_image, out_mask


def make_tiles(
    image: np.ndarray,
    mask: np.ndarray,
    tile: int = 256,
    overlap: float = 0.5,
    min_items: int = 32,
    resize_to: int | None = None,
    *,
    min_cells: int = 3,
    channels: int | tuple[int, ...] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut an image and its label mask into overlapping square tiles.

    Parameters
    ----------
    image : numpy.ndarray
        The training image, any form :func:`to_uint8_rgb` accepts.
    mask : numpy.ndarray
        Integer (H, W) instance labels (0 = background).
    tile : int, optional
        Tile side in pixels. Images smaller than that in one dimension get
        square tiles of their smaller side.
    overlap : float, optional
        Fraction of a tile shared with its neighbour (0.5: stride tile / 2).
        The last row/column of tiles is aligned with the image edge.
    min_items : int, optional
        The tile list is repeated (whole passes) until it has at least this
        many items; every item is augmented differently during training.
    resize_to : int, optional
        Resize the image first so that its longest side has this length
        (bilinear image, nearest labels).
    min_cells : int, optional
        Fewer labelled cells in the mask raise :class:`TrainingDataError`.
    channels : optional
        Passed to :func:`to_uint8_rgb`.

    Returns
    -------
    list of (uint8 (t, t, 3), labels (t, t))
        Tiles in row-major order, repeated.
    """
    check_training_pair(image, mask, min_cells=min_cells)
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if tile < 1 or min_items < 1:
        raise ValueError(f"tile and min_items must be positive, got {tile} and {min_items}")
    rgb = to_uint8_rgb(image, channels)
    labels = np.asarray(mask)
    if resize_to is not None:
        rgb, labels = _resize_pair(rgb, labels, int(resize_to))
    h, w = labels.shape
    side = min(tile, h, w)
    stride = max(1, int(round(side * (1 - overlap))))
    tiles = [
        (rgb[y : y + side, x : x + side].copy(), labels[y : y + side, x : x + side].copy())
        for y in _tile_starts(h, side, stride)
        for x in _tile_starts(w, side, stride)
    ]
    repeats = math.ceil(min_items / len(tiles))
    return [t for _ in range(repeats) for t in tiles]


# --------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentSettings:
    """Random augmentations of a training tile (probabilities and ranges)."""

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


def augment(
    image: np.ndarray,
    mask: np.ndarray,
    size: int,
    rng: np.random.Generator,
    settings: AugmentSettings | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Randomly augment a tile and its labels identically, and resize to ``size`` x ``size``.

    Order: brightness/contrast, flip, random resized crop, shift-scale-rotate,
    resize. The geometric steps are composed into one affine map and the tile
    is resampled once (``torch.nn.functional.grid_sample``): bilinear for the
    image, nearest for the labels (so the
    output has no label values the input did not have). Pixels mapped from
    outside the tile get the tile's per-channel median (a background-like
    value) in the image and 0 in the labels. ``settings=None`` only resizes.

    Returns
    -------
    image : uint8 (size, size, 3)
    mask : (size, size), dtype of ``mask``
    """
    h, w = mask.shape
    img = image.astype(np.float32)
    if settings is not None and rng.random() < settings.p_brightness_contrast:
        alpha = 1.0 + rng.uniform(-settings.contrast, settings.contrast)
        beta = 255.0 * rng.uniform(-settings.brightness, settings.brightness)
        img = np.clip(img * alpha + beta, 0, 255)
    forward = _random_geometry(h, w, size, settings, rng)
    theta = _sampling_theta(np.linalg.inv(forward), (h, w), (size, size))
    # The sampling grid of affine_grid(theta, align_corners=False), built directly (faster on CPU).
    centres = (2.0 * np.arange(size) + 1.0) / size - 1.0
    gx = theta[0, 0] * centres[None, :] + theta[0, 1] * centres[:, None] + theta[0, 2]
    gy = theta[1, 0] * centres[None, :] + theta[1, 1] * centres[:, None] + theta[1, 2]
    grid = torch.from_numpy(np.stack([gx, gy], axis=-1)[None])
    # Out-of-tile pixels get the fill value: sample (image - fill) with zero padding, add it back.
    fill = np.median(img[::4, ::4].reshape(-1, img.shape[-1]), axis=0).astype(np.float32)
    source = torch.from_numpy(np.ascontiguousarray((img - fill).transpose(2, 0, 1)))[None]
    sampled = F.grid_sample(source, grid.float(), mode="bilinear", padding_mode="zeros", align_corners=False)
    out = sampled[0].numpy().transpose(1, 2, 0) + fill
    out_image = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    # float64 holds every label value up to 2**53 exactly; nearest never invents values.
    labels = torch.from_numpy(np.asarray(mask).astype(np.float64))[None, None]
    picked = F.grid_sample(labels, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    out_mask = picked[0, 0].numpy().astype(mask.dtype)
    return out_image, out_mask


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
    """Rules for drawing point prompts from a (model-input sized) label mask."""

    #: At most this many cells get a positive point (a random subset if more).
    max_cells: int = 30
    #: Cells with this area or less (pixels) get no point.
    min_cell_area: int = 100
    #: Cells with a pixel closer than this to the image edge get no point.
    border: int = 20
    #: Points are drawn from this fraction of a cell's (or the background's)
    #: pixels that lie farthest from its edge (distance transform).
    top_fraction: float = 0.2
    #: Negative points: this many per positive point (rounded down) ...
    negative_ratio: float = 0.5
    #: ... at most this many ...
    max_negatives: int = 30
    #: ... and at most background_area // this + 1 ...
    background_area_per_negative: int = 1000
    #: ... and none when foreground area / background area exceeds this.
    max_foreground_ratio: float = 5.0


@dataclass
class Prompts:
    """Point prompts of one tile: positives first, then negatives."""

    #: float32 (N, 2): (x, y) in pixels of the mask.
    points: np.ndarray
    #: int64 (N,): 1 positive (inside a cell), 0 negative (on background).
    labels: np.ndarray
    #: int64 (N,): label value of the prompted cell, 0 for negatives.
    cell_ids: np.ndarray
    #: Bounding box (rows, cols) of the prompted cell, None for negatives.
    boxes: list[tuple[slice, slice] | None] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _top_pixels(distance: np.ndarray, region: np.ndarray, fraction: float) -> np.ndarray:
    """Flat indices of the ``fraction`` of ``region`` pixels with the largest ``distance``."""
    index = np.flatnonzero(region)
    if index.size == 0:
        return index
    values = distance.ravel()[index]
    threshold = np.quantile(values, 1.0 - fraction) if fraction < 1 else -np.inf
    return index[values >= threshold]


def sample_prompts(
    mask: np.ndarray,
    rng: np.random.Generator,
    settings: PromptSettings | None = None,
) -> Prompts:
    """Draw point prompts from an instance label mask.

    Positive points: one per cell, for at most ``max_cells`` cells (a random
    subset), skipping cells of area <= ``min_cell_area`` and cells with a
    pixel closer than ``border`` to the image edge; each point is drawn
    uniformly from the ``top_fraction`` of the cell's pixels that are
    farthest from the cell's edge.

    Negative points: ``negative_ratio`` x the number of positive points,
    capped at ``max_negatives`` and ``background_area // background_area_per_negative + 1``,
    none when foreground / background area > ``max_foreground_ratio``; drawn
    without replacement from the ``top_fraction`` of background pixels that
    are farthest from any cell (skipped cells included).
    """
    settings = settings or PromptSettings()
    labels = np.asarray(mask)
    h, w = labels.shape
    ids, compact = _compact_labels(labels)
    objects = ndimage.find_objects(compact)
    eligible: list[int] = []
    for k, box in enumerate(objects, start=1):
        if box is None:
            continue
        ys, xs = box
        if (ys.start < settings.border or xs.start < settings.border
                or ys.stop > h - settings.border or xs.stop > w - settings.border):
            continue
        if np.count_nonzero(compact[box] == k) <= settings.min_cell_area:
            continue
        eligible.append(k)
    if len(eligible) > settings.max_cells:
        eligible = sorted(rng.choice(eligible, size=settings.max_cells, replace=False).tolist())

    points: list[tuple[float, float]] = []
    cell_ids: list[int] = []
    boxes: list[tuple[slice, slice] | None] = []
    for k in eligible:
        ys, xs = objects[k - 1]
        cell = np.pad(compact[ys, xs] == k, 1)
        distance = ndimage.distance_transform_edt(cell)
        pick = int(rng.choice(_top_pixels(distance, cell, settings.top_fraction)))
        row, col = divmod(pick, cell.shape[1])
        points.append((xs.start + col - 1, ys.start + row - 1))
        cell_ids.append(int(ids[k]))
        boxes.append((ys, xs))
    n_pos = len(points)

    background = compact == 0
    bg_area = int(background.sum())
    fg_area = h * w - bg_area
    n_neg = 0
    if bg_area > 0 and fg_area / bg_area <= settings.max_foreground_ratio:
        n_neg = min(int(settings.negative_ratio * n_pos), settings.max_negatives,
                    bg_area // settings.background_area_per_negative + 1)
    if n_neg > 0:
        distance = ndimage.distance_transform_edt(background)
        candidates = _top_pixels(distance, background, settings.top_fraction)
        chosen = rng.choice(candidates, size=min(n_neg, candidates.size), replace=False)
        for pick in np.sort(chosen):
            row, col = divmod(int(pick), w)
            points.append((col, row))
            cell_ids.append(0)
            boxes.append(None)

    n = len(points)
    return Prompts(
        points=np.asarray(points, dtype=np.float32).reshape(n, 2),
        labels=np.array([1] * n_pos + [0] * (n - n_pos), dtype=np.int64),
        cell_ids=np.asarray(cell_ids, dtype=np.int64).reshape(n),
        boxes=boxes,
    )


def _compact_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, compact): ``compact`` numbers the cells 1..K (0 background), ``ids[k]`` is the label."""
    flat = labels.ravel()
    if flat.size and int(flat.max()) <= 4 * flat.size + 1024:
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


def _low_res_targets(mask: np.ndarray, prompts: Prompts) -> np.ndarray:
    """Per-prompt target masks area-averaged to low resolution (empty for negatives)."""
    size = mask.shape[0]
    f = LOW_RES_FACTOR
    low = size // f
    targets = np.zeros((len(prompts), low, low), dtype=np.float32)
    for i, (cell, box) in enumerate(zip(prompts.cell_ids, prompts.boxes, strict=True)):
        if cell == 0 or box is None:
            continue
        y0, x0 = box[0].start // f, box[1].start // f
        y1, x1 = -(-box[0].stop // f), -(-box[1].stop // f)
        full = (mask[y0 * f : y1 * f, x0 * f : x1 * f] == cell).astype(np.float32)
        targets[i, y0:y1, x0:x1] = full.reshape(y1 - y0, f, x1 - x0, f).mean(axis=(1, 3))
    return targets


@dataclass
class CellTileDataset(torch.utils.data.Dataset):
    """Augmented training items with point prompts, deterministic per (seed, epoch, index).

    Every item is a dict:

    - ``image``: float32 (3, S, S), RGB 0..255 (SAM normalises it itself);
    - ``points``: float32 (N, 2), (x, y) in input pixels;
    - ``point_labels``: int64 (N,), the label the prompt encoder gets for every
      point: 1 (a foreground click) for all of them. Background prompts are
      foreground clicks on background whose right answer is an empty mask and
      a low score, exactly like the grid points of automatic segmentation that
      fall between cells (with label 0 the model could tell them apart from
      the label alone and would learn nothing about the image);
    - ``targets``: float32 (N, S/4, S/4), the prompted cell's mask at the
      resolution of SAM's low-res logits (area fractions), empty for negatives;
    - ``cell_prob``: float32 (N,), 1 for cell prompts, 0 for background.

    N may be 0 (a tile without usable cells).
    """

    tiles: list[tuple[np.ndarray, np.ndarray]]
    image_size: int = 512
    seed: int = 0
    augment: AugmentSettings | None = field(default_factory=AugmentSettings)
    prompts: PromptSettings = field(default_factory=PromptSettings)
    epoch: int = 0

    def __post_init__(self) -> None:
        if self.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16, got {self.image_size}")
        if not self.tiles:
            raise ValueError("no tiles to train on")

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

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, mask = self.tiles[index]
        rng = self.rng(index)
        image, mask = augment(image, mask, self.image_size, rng, self.augment)
        prompts = sample_prompts(mask, rng, self.prompts)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float(),
            "points": torch.from_numpy(prompts.points),
            "point_labels": torch.ones(len(prompts), dtype=torch.int64),
            "targets": torch.from_numpy(_low_res_targets(mask, prompts)),
            "cell_prob": torch.from_numpy(prompts.labels.astype(np.float32)),
        }


def collate_items(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch items: images stacked (B, 3, S, S); prompts stay per-item lists."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "points": [it["points"] for it in items],
        "point_labels": [it["point_labels"] for it in items],
        "targets": [it["targets"] for it in items],
        "cell_prob": [it["cell_prob"] for it in items],
    }
