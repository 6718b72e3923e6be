"""Point prompts for training: positive points inside cells (chamfer distance), negative points outside."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage


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


def at_edge(box: tuple[slice, slice], distance: int, shape: tuple[int, int]) -> bool:
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
        if at_edge(box, 2 * e, padded.shape):
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
