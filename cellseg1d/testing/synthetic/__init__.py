"""Synthetic microscopy images with known instance masks, written as OME-Zarr.

The demo, the tests and the benchmarks of cellseg1d need images whose correct
segmentation is known, and they need those images to arrive on disk the way a
microscope writes them: metadata first, then the pixels chunk by chunk, then
the lower-resolution levels, and finally (optionally) a completion marker.
This module provides both halves:

* :func:`make_cells` and :func:`make_czyx` draw non-overlapping ellipse-like
  cells and render them as images together with the ground-truth label mask;
* :func:`write_ome_zarr` and :func:`write_plate` write arrays as OME-Zarr
  (NGFF 0.4 on zarr v2, or NGFF 0.5 on zarr v3), optionally slowly.
"""

from __future__ import annotations

from cellseg1d.testing.synthetic.cells import (
    make_cells,
    make_czyx,
    make_realistic_cells,
    to_uint16,
)
from cellseg1d.testing.synthetic.writer import (
    CANONICAL_AXES,
    write_ome_zarr,
    write_plate,
)

__all__ = [
    "CANONICAL_AXES",
    "make_cells",
    "make_czyx",
    "make_realistic_cells",
    "to_uint16",
    "write_ome_zarr",
    "write_plate",
]
