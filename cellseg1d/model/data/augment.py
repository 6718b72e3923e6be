"""Augmentation of a training item: random crop, scale, flips and brightness/contrast, prompts moved along."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cellseg1d.model.data.convert import FILL_MODES


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
