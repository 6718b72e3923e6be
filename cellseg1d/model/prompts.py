"""Where the automatic segmentation asks SAM for masks: crop boxes and point grids.

CellSeg1 prompts SAM with a regular grid of foreground points, once on the
whole image and once on each crop of a "crop layer": layer ``i`` cuts the
image into ``2**i x 2**i`` overlapping crops. Each crop is segmented as if it
were an image of its own (resized so that its longest side is the model input
size), so crops see the cells larger than the whole-image pass does.

Coordinates: boxes are ``(x0, y0, x1, y1)`` with exclusive ends, in pixels of
the image; points are ``(x, y)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CropBox:
    """One region of the image that is segmented on its own."""

    x0: int
    y0: int
    x1: int
    y1: int
    #: 0 for the whole image, i for the 2**i x 2**i crops of layer i.
    layer: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.x1, self.y1)


def point_grid(points_per_side: int) -> np.ndarray:
    """A ``points_per_side**2`` grid of (x, y) points at the cell centres of the unit square.

    Row-major: x varies fastest. Returns float64 (n*n, 2) in (0, 1). The
    ticks are ``linspace(1 / 2n, 1 - 1 / 2n, n)``, the same float64 values
    as the reference's grid (an ``arange`` formula differs in the last bit).
    """
    if points_per_side < 1:
        raise ValueError(f"points_per_side must be >= 1, got {points_per_side}")
    offset = 1.0 / (2 * points_per_side)
    ticks = np.linspace(offset, 1.0 - offset, points_per_side)  # (n,)
    ys, xs = np.meshgrid(ticks, ticks, indexing="ij")  # (n, n) each
    return np.stack([xs.ravel(), ys.ravel()], axis=1)  # (n*n, 2)


def points_in_crop(grid: np.ndarray, crop: CropBox) -> np.ndarray:
    """Scale a unit-square grid (N, 2) to (x, y) pixel coordinates inside ``crop`` (crop frame)."""
    return grid * np.array([crop.width, crop.height], dtype=np.float64)[None, :]


def _crop_length(length: int, n_crops: int, overlap: int) -> int:
    """Length of each of ``n_crops`` crops that cover ``length`` pixels overlapping by ``overlap``."""
    return int(math.ceil((overlap * (n_crops - 1) + length) / n_crops))


def crop_boxes(shape: tuple[int, int], n_layers: int, overlap_ratio: float) -> list[CropBox]:
    """The whole image followed by the crops of layers 1..``n_layers``.

    In layer ``i`` (``n = 2**i`` crops per side) neighbouring crops overlap by
    ``int(overlap_ratio * short_side * 2 / n)`` pixels, where ``short_side``
    is the shorter image side. Crops are listed column by column (x outer, y
    inner) and clipped to the image.
    """
    height, width = int(shape[0]), int(shape[1])
    if height < 1 or width < 1:
        raise ValueError(f"image shape must be positive, got {shape}")
    boxes = [CropBox(0, 0, width, height, 0)]
    short_side = min(height, width)
    for layer in range(1, n_layers + 1):
        n = 2**layer
        overlap = int(overlap_ratio * short_side * 2 / n)
        crop_w = _crop_length(width, n, overlap)
        crop_h = _crop_length(height, n, overlap)
        xs = [int((crop_w - overlap) * i) for i in range(n)]
        ys = [int((crop_h - overlap) * i) for i in range(n)]
        for x0 in xs:
            for y0 in ys:
                boxes.append(CropBox(x0, y0, min(x0 + crop_w, width), min(y0 + crop_h, height), layer))
    return boxes


def resized_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) after scaling so that the longer side is ``long_side`` (rounded half up)."""
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)
