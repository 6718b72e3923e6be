"""Clean-up of candidate masks and painting them into one instance label image.

Masks are binary arrays (N, H, W) in the image frame. Every operation works on
the masks' bounding boxes only: masks are cut to their boxes, grouped by box
size, padded to a common size with a one-pixel background ring, stacked
(k, h + 2, w + 2) and labelled in one ``scipy.ndimage.label`` call whose
structuring element connects pixels within a plane but never across planes.
Component sizes and owners then come from ``bincount`` and fancy indexing.

* :func:`remove_small_regions`: fill holes (background regions enclosed by the
  mask) and remove islands (foreground components) smaller than a minimum
  area, 8-connected; a mask whose components are all small keeps its largest.
* :func:`largest_component`: keep each mask's largest 4-connected component.
* :func:`paint_labels`: the label image: masks painted largest first, so that
  a smaller mask wins where masks overlap, each reduced to its largest
  component (before painting, and again if painting split it), labels
  renumbered 1..N.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from scipy import ndimage

from cellseg1d.model.nms import mask_boxes
from cellseg1d.stitch import keep_largest_regions, relabel_sequential

#: Masks stacked per ``ndimage.label`` call.
GROUP_SIZE = 64


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


def _largest_per_plane(sizes: np.ndarray, plane_of: np.ndarray, n_planes: int) -> np.ndarray:
    """(n + 1,) bool: the largest component of each plane (lowest label on ties); label 0 excluded."""
    ids = np.arange(1, len(sizes))
    best_size = np.zeros(n_planes, dtype=np.int64)
    np.maximum.at(best_size, plane_of[ids], sizes[ids])
    is_max = sizes[ids] == best_size[plane_of[ids]]
    best_id = np.full(n_planes, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(best_id, plane_of[ids][is_max], ids[is_max])
    chosen = np.zeros(len(sizes), dtype=bool)
    chosen[best_id[best_id < np.iinfo(np.int64).max]] = True
    return chosen


def _fill_small_holes(stack: np.ndarray, min_area: int) -> np.ndarray:
    """(k,) bool: whether a hole was filled; fills enclosed background regions < min_area in place."""
    labels, sizes, plane_of = _label_planes(~stack, connectivity=2)
    outside = labels[:, 0, 0]  # the ring is background and connected: the outside of each plane
    fill = sizes < min_area
    fill[0] = False
    fill[outside] = False
    changed = np.zeros(stack.shape[0], dtype=bool)
    changed[plane_of[np.flatnonzero(fill)]] = True
    stack |= fill[labels]
    return changed


def _remove_small_islands(stack: np.ndarray, min_area: int) -> np.ndarray:
    """(k,) bool: whether an island was removed; removes components < min_area in place.

    A plane whose components are all smaller than ``min_area`` keeps its largest.
    """
    labels, sizes, plane_of = _label_planes(stack, connectivity=2)
    keep = sizes >= min_area
    keep |= _largest_per_plane(sizes, plane_of, stack.shape[0])
    keep[0] = False
    removed = np.flatnonzero(~keep)
    removed = removed[removed > 0]
    changed = np.zeros(stack.shape[0], dtype=bool)
    changed[plane_of[removed]] = True
    stack &= keep[labels]
    return changed


def remove_small_regions(
    masks: np.ndarray, min_area: int, boxes: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fill holes, then remove islands, smaller than ``min_area`` pixels (8-connected).

    Returns the cleaned masks (N, H, W) bool (a new array) and ``changed``
    (N,) bool: which masks were modified.
    """
    out = np.array(masks, dtype=bool, copy=True)
    changed = np.zeros(out.shape[0], dtype=bool)
    if out.shape[0] == 0 or min_area <= 0:
        return out, changed
    boxes = boxes_of(out) if boxes is None else boxes
    for idx in _groups(boxes):
        stack = _stack(out, boxes, idx)
        changed[idx] |= _fill_small_holes(stack, min_area)
        changed[idx] |= _remove_small_islands(stack, min_area)
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


def paint_labels(masks: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Instance label image (H, W) uint32 from masks (N, H, W): larger masks first, smaller ones win.

    Each mask is first reduced to its largest 4-connected component; masks
    are painted in decreasing order of area (ties: input order), each
    overwriting what is under it; a label that a smaller mask cut into pieces
    keeps its largest piece; the labels that remain visible are renumbered
    1..N in painting order. Every label is one 4-connected region.
    """
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
        window[parts[i, y0:y1, x0:x1]] = rank
    return relabel_sequential(keep_largest_regions(labels))
