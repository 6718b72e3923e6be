"""Clean-up of candidate masks and painting them into one instance label image.

Masks are binary arrays (N, H, W) in the image frame. Every operation works on
the masks' bounding boxes only: masks are cut to their boxes, grouped by box
size, padded to a common size with a one-pixel background ring, stacked
(k, h + 2, w + 2) and labelled in one ``scipy.ndimage.label`` call whose
structuring element connects pixels within a plane but never across planes.
Component sizes and owners then come from ``bincount`` and fancy indexing.

* :func:`remove_small_regions`: fill holes and remove islands smaller than a
  minimum area, 8-connected, as segment-anything's ``remove_small_regions``
  (used by the CellSeg1 reference) does on the whole image: a "hole" is any
  background component of the image smaller than the area, including one
  that touches the image border; a mask whose components are all small keeps
  its largest, and still counts as changed.
* :func:`largest_component`: keep each mask's largest 4-connected component.
* :func:`paint_labels`: the label image: masks painted largest first, so that
  a smaller mask wins where masks overlap. The reference's rule (default):
  each mask first clears its whole area, then paints its largest
  4-connected component. ``mode="largest_piece"`` paints only the largest
  component (the rest of the area stays with the larger masks) and then
  reduces every label that a smaller mask cut into pieces to its largest
  piece. Labels renumbered 1..N in painting order.

Bounding boxes cut the work, never the result: a background component that
reaches a box side which is not an image border continues outside the box,
into the background around the mask, and is never a hole (that outside
region is at least as large as the shorter image side; images whose shorter
side is below the minimum area are labelled whole instead).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from scipy import ndimage

from cellseg1d.model.nms import mask_boxes
from cellseg1d.model.stitch import keep_largest_regions, relabel_sequential

#: Masks stacked per ``ndimage.label`` call.
GROUP_SIZE = 64
#: How :func:`paint_labels` paints a mask over larger ones.
PAINT_MODES = ("reference", "largest_piece")


def boxes_of(masks: np.ndarray) -> np.ndarray:
    """Bounding boxes (N, 4) int64 ``(x0, y0, x1, y1)`` (exclusive ends) of masks (N, H, W)."""
    return mask_boxes(torch.from_numpy(np.ascontiguousarray(masks, dtype=bool))).numpy()


def _plane_structure(connectivity: int) -> np.ndarray:
    """3-D structuring element: 2-D ``connectivity`` (1: 4-, 2: 8-neighbours) inside each plane only."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, connectivity)
    return structure


def _groups(boxes: np.ndarray, group_size: int = GROUP_SIZE) -> Iterator[np.ndarray]:
    """Mask indices in groups of similar box size (smallest first)."""
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = np.argsort(areas, kind="stable")
    for start in range(0, len(order), group_size):
        yield order[start : start + group_size]


def _stack(masks: np.ndarray, boxes: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The masks ``idx`` cut to their boxes, stacked (k, ph + 2, pw + 2) with a background ring."""
    hs = boxes[idx, 3] - boxes[idx, 1]
    ws = boxes[idx, 2] - boxes[idx, 0]
    stack = np.zeros((len(idx), int(hs.max()) + 2, int(ws.max()) + 2), dtype=bool)
    for r, i in enumerate(idx):
        x0, y0, x1, y1 = boxes[i]
        stack[r, 1 : 1 + y1 - y0, 1 : 1 + x1 - x0] = masks[i, y0:y1, x0:x1]
    return stack


def _unstack(masks: np.ndarray, boxes: np.ndarray, idx: np.ndarray, stack: np.ndarray) -> None:
    """Write the stacked patches back into ``masks`` (in place)."""
    for r, i in enumerate(idx):
        x0, y0, x1, y1 = boxes[i]
        masks[i, y0:y1, x0:x1] = stack[r, 1 : 1 + y1 - y0, 1 : 1 + x1 - x0]


def _label_planes(stack: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label each plane's components; (labels (k, h, w), sizes (n + 1,), plane of each label (n + 1,))."""
    labels, n = ndimage.label(stack, structure=_plane_structure(connectivity))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    plane_of = np.zeros(n + 1, dtype=np.int64)
    plane_of[labels] = np.broadcast_to(np.arange(stack.shape[0])[:, None, None], labels.shape)
    return labels, sizes, plane_of


def _largest_per_plane(
    sizes: np.ndarray, plane_of: np.ndarray, n_planes: int, rank: np.ndarray | None = None
) -> np.ndarray:
    """(n + 1,) bool: the largest component of each plane; label 0 excluded.

    Ties go to the lowest ``rank`` (n + 1,) of a component, by default its
    label (raster order of its first pixel).
    """
    ids = np.arange(1, len(sizes))
    rank = np.arange(len(sizes), dtype=np.int64) if rank is None else rank
    best_size = np.zeros(n_planes, dtype=np.int64)
    np.maximum.at(best_size, plane_of[ids], sizes[ids])
    is_max = sizes[ids] == best_size[plane_of[ids]]
    best_rank = np.full(n_planes, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(best_rank, plane_of[ids][is_max], rank[ids][is_max])
    chosen = np.zeros(len(sizes), dtype=bool)
    winners = ids[is_max & (rank[ids] == best_rank[plane_of[ids]])]
    chosen[winners] = True
    return chosen


def _block_rank(labels: np.ndarray, n_labels: int, boxes: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(n + 1,) int64: for each component, the first 2 x 2 pixel block of the image that holds a pixel of it.

    Blocks are counted row pair by row pair, in image coordinates. It is the
    order in which OpenCV's block-based 8-connected labelling (used by
    segment-anything's ``remove_small_regions``) numbers components, so a tie
    between equally large islands is broken as the reference breaks it.
    """
    planes, rows, cols = np.nonzero(labels)
    y = rows + boxes[idx[planes], 1] - 1
    x = cols + boxes[idx[planes], 0] - 1
    key = (y // 2) * (1 << 31) + x // 2
    rank = np.full(n_labels + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(rank, labels[planes, rows, cols], key)
    return rank


def _open_ring(boxes: np.ndarray, idx: np.ndarray, shape: tuple[int, ...], image_hw: tuple[int, int]) -> np.ndarray:
    """(k, ph, pw) bool: ring pixels of each stacked patch that lie inside the image.

    Patch pixel (r, c) of mask ``i`` is image pixel (y0 - 1 + r, x0 - 1 + c);
    its ring is the one-pixel frame around the box. Where a box side lies on
    the image border, that part of the ring is outside the image.
    """
    height, width = image_hw
    ring = np.zeros(shape, dtype=bool)
    for r, i in enumerate(idx):
        x0, y0, x1, y1 = (int(v) for v in boxes[i])
        h, w = y1 - y0, x1 - x0
        rows = (np.arange(h + 2) + y0 - 1 >= 0) & (np.arange(h + 2) + y0 - 1 < height)
        cols = (np.arange(w + 2) + x0 - 1 >= 0) & (np.arange(w + 2) + x0 - 1 < width)
        frame = np.ones((h + 2, w + 2), dtype=bool)
        frame[1:-1, 1:-1] = False
        ring[r, : h + 2, : w + 2] = frame & rows[:, None] & cols[None, :]
    return ring


def _interior(boxes: np.ndarray, idx: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(k, ph, pw) bool: the box of each stacked patch."""
    inside = np.zeros(shape, dtype=bool)
    for r, i in enumerate(idx):
        x0, y0, x1, y1 = (int(v) for v in boxes[i])
        inside[r, 1 : 1 + y1 - y0, 1 : 1 + x1 - x0] = True
    return inside


def _fill_small_holes(stack: np.ndarray, min_area: int, open_ring: np.ndarray, interior: np.ndarray) -> np.ndarray:
    """(k,) bool: whether a hole was filled; fills background components < min_area in place.

    Background is the box's non-mask pixels plus the ring pixels inside the
    image (standing for the background around the box); components that
    reach those ring pixels are not holes.
    """
    background = ~stack & (interior | open_ring)
    labels, sizes, plane_of = _label_planes(background, connectivity=2)
    fill = sizes < min_area
    fill[0] = False
    fill[np.unique(labels[open_ring])] = False
    changed = np.zeros(stack.shape[0], dtype=bool)
    changed[plane_of[np.flatnonzero(fill)]] = True
    stack |= fill[labels] & interior
    return changed


def _remove_small_islands(stack: np.ndarray, min_area: int, boxes: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(k,) bool: whether a mask had an island < min_area; removes them in place.

    A plane whose components are all smaller than ``min_area`` keeps its
    largest (ties: see :func:`_block_rank`) and still counts as changed (the
    reference's rule).
    """
    labels, sizes, plane_of = _label_planes(stack, connectivity=2)
    small = sizes < min_area
    small[0] = False
    rank = _block_rank(labels, len(sizes) - 1, boxes, idx) if small.any() else None
    keep = ~small | _largest_per_plane(sizes, plane_of, stack.shape[0], rank)
    keep[0] = False
    changed = np.zeros(stack.shape[0], dtype=bool)
    changed[plane_of[np.flatnonzero(small)]] = True
    stack &= keep[labels]
    return changed


def remove_small_regions(
    masks: np.ndarray, min_area: int, boxes: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fill holes, then remove islands, smaller than ``min_area`` pixels (8-connected).

    ``masks`` (N, H, W) are in the image frame. Returns the cleaned masks
    (a new array) and ``changed`` (N,) bool: whether a hole or an island
    smaller than ``min_area`` was found (segment-anything's flag, also set
    when a mask's only component is small and is kept).
    """
    out = np.array(masks, dtype=bool, copy=True)
    changed = np.zeros(out.shape[0], dtype=bool)
    if out.shape[0] == 0 or min_area <= 0:
        return out, changed
    image_hw = (int(out.shape[1]), int(out.shape[2]))
    if min(image_hw) <= min_area:  # the outside of a box may be small: label the whole image
        boxes = np.tile(np.array([0, 0, image_hw[1], image_hw[0]], dtype=np.int64), (out.shape[0], 1))
    elif boxes is None:
        boxes = boxes_of(out)
    for idx in _groups(boxes):
        stack = _stack(out, boxes, idx)
        interior = _interior(boxes, idx, stack.shape)
        changed[idx] |= _fill_small_holes(stack, min_area, _open_ring(boxes, idx, stack.shape, image_hw), interior)
        changed[idx] |= _remove_small_islands(stack, min_area, boxes, idx)
        _unstack(out, boxes, idx, stack)
    return out, changed


def largest_component(masks: np.ndarray, boxes: np.ndarray | None = None) -> np.ndarray:
    """Each mask (N, H, W) reduced to its largest 4-connected component (a new array)."""
    out = np.array(masks, dtype=bool, copy=True)
    if out.shape[0] == 0:
        return out
    boxes = boxes_of(out) if boxes is None else boxes
    for idx in _groups(boxes):
        stack = _stack(out, boxes, idx)
        labels, sizes, plane_of = _label_planes(stack, connectivity=1)
        keep = _largest_per_plane(sizes, plane_of, stack.shape[0])
        keep[0] = False
        _unstack(out, boxes, idx, keep[labels])
    return out


def paint_labels(masks: np.ndarray, shape: tuple[int, int] | None = None, mode: str = "reference") -> np.ndarray:
    """Instance label image (H, W) uint32 from masks (N, H, W): larger masks first, smaller ones win.

    Masks are painted in decreasing order of area (ties: input order), each
    overwriting what is under it, and reduced to their largest 4-connected
    component. ``mode="reference"`` (the CellSeg1 reference's rule): a mask
    first clears its whole area, then paints its largest component, so the
    rest of its area is left empty. ``mode="largest_piece"``: a mask paints
    only its largest component, and afterwards a label that smaller masks cut
    into pieces keeps its largest piece. The visible labels are renumbered
    1..N in painting order.
    """
    if mode not in PAINT_MODES:
        raise ValueError(f"paint mode must be one of {', '.join(PAINT_MODES)}, got {mode!r}")
    masks = np.asarray(masks, dtype=bool)
    if shape is None:
        shape = masks.shape[1:]
    labels = np.zeros(shape, dtype=np.uint32)
    if masks.shape[0] == 0:
        return labels
    if tuple(masks.shape[1:]) != tuple(shape):
        raise ValueError(f"masks are {masks.shape[1:]}, label image {shape}")
    boxes = boxes_of(masks)
    parts = largest_component(masks, boxes)
    areas = masks.sum(axis=(1, 2))
    order = np.argsort(-areas, kind="stable")
    for rank, i in enumerate(order, start=1):
        x0, y0, x1, y1 = boxes[i]
        window = labels[y0:y1, x0:x1]
        if mode == "reference":
            window[masks[i, y0:y1, x0:x1]] = 0
        window[parts[i, y0:y1, x0:x1]] = rank
    if mode == "largest_piece":
        labels = keep_largest_regions(labels)
    return relabel_sequential(labels)
