"""Overlapping tiles of a plane and the stitching of their label images into one (no torch).

Used twice: the SAM segmenter tiles a large plane internally
(:func:`cellseg1d.model.tiling.segment_large`, ``sam.tile``), and the
pipeline splits a plane larger than ``executor.block_size`` into blocks that
are segmented one after another (local executor) or on different Dask
workers, then stitched here. :func:`tile_boxes` cuts a plane into ``tile`` x
``tile`` windows that overlap by at least ``overlap`` pixels (the last
row/column of tiles is aligned with the plane edge, so it may overlap more).

The stitching rule
------------------
A tile edge that is not an image edge is an *interior* edge. The *core* of a
tile is the tile minus ``overlap / 2`` on each interior side.

1. An object that touches an interior edge of its tile is dropped: it is cut,
   and a neighbouring tile holds it whole.
2. Every remaining object is ranked: objects whose centroid lies in their
   tile's core first; then by the distance from the centroid to the nearest
   interior edge (deeper inside first); then by area; then by tile order.
3. Objects are placed in that order. An object that covers at least
   ``duplicate_overlap`` of an already placed object, or is covered by one
   to that fraction (overlap / the smaller area), is a second view of the same
   cell and is skipped. Otherwise it takes the pixels that are still free.
4. An object left in pieces by step 3 keeps its largest 4-connected piece;
   labels are renumbered 1..N.

Guarantee: a cell that lies entirely within the image and reaches no further
than ``overlap / 2`` from its centroid is whole in the tile whose core holds
its centroid (it cannot reach that tile's interior edges), so it is placed
from the tile whose view of it ranks first and every other view is a
duplicate: it appears exactly once and uncut. Objects that touch interior
edges in every tile that sees them (larger than the overlap) are lost, never
cut: choose ``overlap`` at least twice the largest cell diameter.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from skimage.measure import label as label_regions

#: A tile's result: (y0, x0, labels (h, w)) with (y0, x0) its top-left corner in the image.
Tile = tuple[int, int, np.ndarray]


def relabel_sequential(labels: np.ndarray) -> np.ndarray:
    """Renumber the non-zero labels to 1..N in increasing order of their old values (uint32).

    Linear time (a look-up table from ``bincount``) when the values are dense; sparse or huge
    values (a plugin's hashes) go through ``unique`` and ``searchsorted``, never a giant table.
    """
    labels = np.asarray(labels)
    top = int(labels.max()) if labels.size else 0
    if top <= 0:
        return np.zeros(labels.shape, dtype=np.uint32)
    if labels.dtype.kind in "ui" and top <= 4 * labels.size:
        present = np.bincount(labels.ravel(), minlength=top + 1) > 0
        present[0] = False
        lut = np.zeros(top + 1, dtype=np.uint32)
        lut[present] = np.arange(1, int(present.sum()) + 1, dtype=np.uint32)
        return lut[labels]
    values = np.unique(labels)
    values = values[values != 0]
    out = np.zeros(labels.shape, dtype=np.uint32)
    mask = labels != 0
    out[mask] = (np.searchsorted(values, labels[mask]) + 1).astype(np.uint32)
    return out


def keep_largest_regions(labels: np.ndarray) -> np.ndarray:
    """Each label of (H, W) ``labels`` reduced to its largest 4-connected region (others become 0)."""
    labels = np.asarray(labels)
    regions = label_regions(labels, background=0, connectivity=1)  # equal-valued connected regions
    n = int(regions.max())
    if n == 0:
        return labels.copy()
    sizes = np.bincount(regions.ravel(), minlength=n + 1)
    owner = np.zeros(n + 1, dtype=np.int64)
    owner[regions.ravel()] = labels.ravel()
    ids = np.arange(1, n + 1)
    # the largest region of every owner (lowest region id on ties)
    order = np.lexsort((ids, -sizes[ids], owner[ids]))
    first = np.ones(order.size, dtype=bool)
    first[1:] = owner[ids][order][1:] != owner[ids][order][:-1]
    keep = np.zeros(n + 1, dtype=bool)
    keep[ids[order][first]] = True
    return np.where(keep[regions], labels, 0).astype(labels.dtype, copy=False)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length`` with at least ``overlap`` overlap."""
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return starts


def tile_boxes(shape: tuple[int, int], tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Tile windows ``(y0, x0, y1, x1)`` (exclusive ends), row by row."""
    height, width = int(shape[0]), int(shape[1])
    return [
        (y0, x0, min(y0 + tile, height), min(x0 + tile, width))
        for y0 in tile_starts(height, tile, overlap)
        for x0 in tile_starts(width, tile, overlap)
    ]


def _tile_objects(y0: int, x0: int, labels: np.ndarray, shape: tuple[int, int], overlap: int) -> dict[str, np.ndarray]:
    """Per-object arrays of one tile: ids, global boxes, areas, in-core flags, depths; cut objects removed."""
    height, width = shape
    th, tw = labels.shape
    y1, x1 = y0 + th, x0 + tw
    counts = np.bincount(labels.ravel())
    ids = np.flatnonzero(counts)
    ids = ids[ids > 0]
    if ids.size == 0:
        return {"ids": ids}
    slices = ndimage.find_objects(labels)
    boxes = np.array([[s[0].start, s[1].start, s[0].stop, s[1].stop] for s in (slices[i - 1] for i in ids)])
    yy, xx = np.indices(labels.shape)
    cy = np.bincount(labels.ravel(), weights=yy.ravel())[ids] / counts[ids] + y0  # (n,) global
    cx = np.bincount(labels.ravel(), weights=xx.ravel())[ids] / counts[ids] + x0

    interior = {"top": y0 > 0, "bottom": y1 < height, "left": x0 > 0, "right": x1 < width}
    cut = np.zeros(ids.size, dtype=bool)
    cut |= interior["top"] & (boxes[:, 0] == 0)
    cut |= interior["left"] & (boxes[:, 1] == 0)
    cut |= interior["bottom"] & (boxes[:, 2] == th)
    cut |= interior["right"] & (boxes[:, 3] == tw)

    half = overlap / 2.0
    core_y0 = y0 + half if interior["top"] else 0.0
    core_y1 = y1 - half if interior["bottom"] else float(height)
    core_x0 = x0 + half if interior["left"] else 0.0
    core_x1 = x1 - half if interior["right"] else float(width)
    in_core = (cy >= core_y0) & (cy < core_y1) & (cx >= core_x0) & (cx < core_x1)

    depth = np.full(ids.size, np.inf)
    for side, distance in (("top", cy - y0), ("bottom", y1 - cy), ("left", cx - x0), ("right", x1 - cx)):
        if interior[side]:
            depth = np.minimum(depth, distance)

    keep = ~cut
    offset = np.array([y0, x0, y0, x0])
    return {
        "ids": ids[keep],
        "boxes": boxes[keep] + offset,  # (n, 4) global (y0, x0, y1, x1)
        "local": boxes[keep],  # (n, 4) tile frame
        "areas": counts[ids][keep],
        "in_core": in_core[keep],
        "depth": depth[keep],
    }


def stitch(
    tiles: Sequence[Tile], shape: tuple[int, int], overlap: int, *, duplicate_overlap: float = 0.5
) -> np.ndarray:
    """Merge the label images of overlapping tiles into one (H, W) uint32 label image (see module doc)."""
    height, width = int(shape[0]), int(shape[1])
    out = np.zeros((height, width), dtype=np.uint32)
    placed_area = [0]  # placed_area[label]
    per_tile = []
    for index, (y0, x0, labels) in enumerate(tiles):
        labels = relabel_sequential(np.asarray(labels))
        if y0 < 0 or x0 < 0 or y0 + labels.shape[0] > height or x0 + labels.shape[1] > width:
            raise ValueError(f"tile {index} at ({y0}, {x0}) of size {labels.shape} is outside {shape}")
        objects = _tile_objects(int(y0), int(x0), labels, (height, width), overlap)
        per_tile.append((labels, objects))

    # One row per object: (tile, position in tile); ranked by the rule.
    rows = [(t, k) for t, (_, obj) in enumerate(per_tile) for k in range(obj["ids"].size)]
    if not rows:
        return out
    tile_idx = np.array([t for t, _ in rows])
    in_core = np.array([per_tile[t][1]["in_core"][k] for t, k in rows])
    depth = np.array([per_tile[t][1]["depth"][k] for t, k in rows])
    area = np.array([per_tile[t][1]["areas"][k] for t, k in rows])
    order = np.lexsort((tile_idx, -area, -depth, ~in_core))  # last key is the primary one

    for row in order:
        t, k = rows[row]
        labels, obj = per_tile[t]
        ly0, lx0, ly1, lx1 = obj["local"][k]
        gy0, gx0, gy1, gx1 = obj["boxes"][k]
        mask = labels[ly0:ly1, lx0:lx1] == obj["ids"][k]
        window = out[gy0:gy1, gx0:gx1]
        under = window[mask]
        hit_ids, hit_counts = np.unique(under[under > 0], return_counts=True)
        own = int(obj["areas"][k])
        if hit_ids.size:
            smaller = np.minimum(own, np.array([placed_area[i] for i in hit_ids]))
            if np.any(hit_counts >= duplicate_overlap * np.maximum(smaller, 1)):
                continue  # a second view of a placed cell
        free = mask & (window == 0)
        new_id = len(placed_area)
        window[free] = new_id
        placed_area.append(int(free.sum()))
    return relabel_sequential(keep_largest_regions(out))
