"""Exact pixel-edge outlines of every object of a label plane, traced with whole-array numpy.

The outline of an object runs along pixel edges, in pixel coordinates: pixel
``(row, col)`` is the square ``col <= x <= col + 1``, ``row <= y <= row + 1``
(QuPath's convention too: the top-left corner of the image is ``(0, 0)``).
The polygon therefore covers exactly the object's pixels; its area equals the
pixel count, holes included.

How it works, for all objects of a plane at once:

1. every pixel edge between two different labels is a boundary edge of each
   non-zero label beside it, directed so that the object lies on its right
   when drawn with y pointing down (outer rings run counter-clockwise in the
   usual x/y orientation, as GeoJSON's right-hand rule asks; holes clockwise);
2. each edge's successor is the edge of the same label that starts where it
   ends (``searchsorted`` on sorted keys). Where two pixels of an object touch
   only at a corner (a saddle), the boundary turns to stay with the pixel it
   came from, so diagonal neighbours are separate pieces (4-connectivity) and
   no ring passes twice through one vertex;
3. the successor map is a permutation whose cycles are the rings; ring ids
   and the order of edges along each ring come from pointer doubling
   (``O(n log L)`` vectorised steps for ``n`` edges and rings of length ``L``);
4. a ring that still touches itself (a piece whose boundary closes on itself
   at a corner, e.g. a "C" whose tips touch diagonally) is split at that
   corner into an outer ring and a hole touching it at one point, as the
   OGC rules for valid polygons want;
5. only corners are kept (collinear vertices dropped); the signed area of a
   ring tells outer rings (positive) from holes (negative).

Pieces (outer rings) of one object are returned largest first, each with its
holes; a hole is assigned to the smallest piece that covers it (only objects
of several pieces with holes need that geometric test, done with shapely).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np

#: Edge directions, in the order of a right (clockwise, y down) turn: east, south, west, north.
EAST, SOUTH, WEST, NORTH = 0, 1, 2, 3

#: At most this many rounds of splitting self-touching rings (each round splits every such ring once).
_MAX_SPLIT_ROUNDS = 64

Ring = np.ndarray  # (k, 2) int64 corners (x, y), not closed


@dataclass
class Outline:
    """The outline of one object in one plane."""

    label: int
    #: Number of pixels of the object (outer areas minus hole areas).
    area_px: int
    #: (outer ring, holes) per piece, largest piece first; rings are (k, 2) int arrays
    #: of (x, y) corners, not closed (the first corner is not repeated at the end).
    pieces: list[tuple[Ring, list[Ring]]] = field(default_factory=list)

    @property
    def n_holes(self) -> int:
        return sum(len(holes) for _, holes in self.pieces)


def _boundary_edges(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label, start vertex id, direction) of every directed boundary edge of every object."""
    nx = labels.shape[1] + 1
    padded = np.pad(labels, 1)
    above, below = padded[:-1, 1:-1], padded[1:, 1:-1]  # (H+1, W): horizontal edges at rows 0..H
    r, c = np.nonzero(above != below)
    left, right = padded[1:-1, :-1], padded[1:-1, 1:]  # (H, W+1): vertical edges at columns 0..W
    r2, c2 = np.nonzero(left != right)
    r, c, r2, c2 = (a.astype(np.int64) for a in (r, c, r2, c2))
    lab = np.concatenate([below[r, c], above[r, c], right[r2, c2], left[r2, c2]])
    start = np.concatenate([r * nx + c, r * nx + c + 1, (r2 + 1) * nx + c2, r2 * nx + c2])
    direction = np.concatenate([
        np.full(r.size, EAST, np.int8), np.full(r.size, WEST, np.int8),
        np.full(r2.size, NORTH, np.int8), np.full(r2.size, SOUTH, np.int8),
    ])
    keep = lab != 0
    return lab[keep], start[keep], direction[keep]


def _cycle_min(succ: np.ndarray) -> np.ndarray:
    """For a permutation ``succ``, the smallest index on each element's cycle."""
    low = np.arange(succ.size)
    jump = succ
    while True:
        lower = np.minimum(low, low[jump])
        if np.array_equal(lower, low):
            return low
        low = lower
        jump = jump[jump]


def _rank_from_head(succ: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Steps from each element to the end of its cycle when the cycle starts at ``head``."""
    tail = succ == head
    nxt = np.where(tail, np.arange(succ.size), succ)
    dist = (~tail).astype(np.int64)
    while not tail[nxt].all():
        dist = dist + dist[nxt]
        nxt = nxt[nxt]
    return dist


def trace_outlines(labels: np.ndarray) -> list[Outline]:
    """Outlines of every non-zero label of a ``(Y, X)`` integer plane, in increasing label order."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"expected a (Y, X) label plane, got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"expected an integer label plane, got dtype {labels.dtype}")
    lab, start, direction = _boundary_edges(labels)
    if lab.size == 0:
        return []
    height, width = labels.shape
    nx = width + 1
    n_vertices = (height + 1) * nx
    ids, index = np.unique(lab, return_inverse=True)
    index = index.astype(np.int64)

    # Sort the edges by (label, start vertex, direction); find each edge's successor.
    key = index * n_vertices + start
    order = np.lexsort((direction, key))
    key, start, direction, index = key[order], start[order], direction[order], index[order]
    step = np.array([1, nx, -1, -nx], np.int64)
    target = index * n_vertices + start + step[direction]
    succ = np.searchsorted(key, target, side="left")
    n = key.size
    has_next = succ + 1 < n
    saddle = np.zeros(n, bool)
    saddle[has_next] = key[succ[has_next] + 1] == target[has_next]
    # At a saddle two edges leave the vertex: take the right turn (stay with this pixel).
    succ = succ + (saddle & (direction[succ] != (direction + 1) % 4))

    # Incoming edge pairs at each saddle vertex (for splitting self-touching rings).
    incoming = np.flatnonzero(saddle)
    incoming = incoming[np.argsort(target[incoming], kind="stable")]
    pair_a, pair_b = incoming[0::2], incoming[1::2]

    ring = _cycle_min(succ)
    for _ in range(_MAX_SPLIT_ROUNDS):
        if pair_a.size == 0:
            break
        same = np.flatnonzero(ring[pair_a] == ring[pair_b])
        if same.size == 0:
            break
        # One split per ring per round: splitting twice in one round could re-join.
        _, first = np.unique(ring[pair_a[same]], return_index=True)
        pick = same[first]
        a, b = pair_a[pick], pair_b[pick]
        succ[a], succ[b] = succ[b].copy(), succ[a].copy()
        ring = _cycle_min(succ)

    # Order the edges along each ring, starting from the ring's first edge.
    dist = _rank_from_head(succ, ring)
    along = np.lexsort((-dist, ring))
    ring, direction, start, index = ring[along], direction[along], start[along], index[along]
    first_of_ring = np.r_[True, ring[1:] != ring[:-1]]
    starts = np.flatnonzero(first_of_ring)
    ends = np.r_[starts[1:], n] - 1
    previous = np.roll(direction, 1)
    previous[starts] = direction[ends]
    corner = direction != previous

    ring_of = (np.cumsum(first_of_ring) - 1)[corner]
    vertex = start[corner]
    x, y = vertex % nx, vertex // nx
    corner_starts = np.flatnonzero(np.r_[True, ring_of[1:] != ring_of[:-1]])
    following = np.arange(1, x.size + 1)
    following[np.r_[corner_starts[1:], x.size] - 1] = corner_starts
    twice_area = np.add.reduceat(x * y[following] - x[following] * y, corner_starts)
    ring_label = index[corner][corner_starts]
    coords = np.split(np.stack([x, y], axis=1), corner_starts[1:])

    # Rings are grouped by label (a ring's first edge is its smallest, and edges are sorted by label).
    outlines = []
    bounds = np.flatnonzero(np.r_[True, ring_label[1:] != ring_label[:-1], True])
    for lo, hi in pairwise(bounds):
        areas = twice_area[lo:hi]
        shells = [coords[k] for k in range(lo, hi) if twice_area[k] > 0]
        shell_areas = [int(twice_area[k]) for k in range(lo, hi) if twice_area[k] > 0]
        holes = [coords[k] for k in range(lo, hi) if twice_area[k] < 0]
        outline = Outline(int(ids[ring_label[lo]]), int(areas.sum()) // 2)
        by_size = sorted(range(len(shells)), key=lambda i: -shell_areas[i])
        if len(shells) == 1:
            outline.pieces = [(shells[0], holes)]
        else:
            owners = _assign_holes([shells[i] for i in by_size], [shell_areas[i] for i in by_size], holes)
            outline.pieces = [
                (shells[i], [h for h, o in zip(holes, owners, strict=True) if o == rank])
                for rank, i in enumerate(by_size)
            ]
        outlines.append(outline)
    return outlines


def _assign_holes(shells: list[Ring], areas: list[int], holes: list[Ring]) -> list[int]:
    """For each hole, the index of the smallest shell that covers it (shells sorted largest first)."""
    if not holes:
        return []
    import shapely

    shell_polygons = np.array([shapely.Polygon(s) for s in shells], dtype=object)
    owners = []
    for hole in holes:
        inside = np.flatnonzero(shapely.covers(shell_polygons, shapely.Polygon(hole)))
        # Shells are sorted by decreasing area: the last covering one is the smallest.
        owners.append(int(inside[-1]) if inside.size else int(np.argmax(areas)))
    return owners
