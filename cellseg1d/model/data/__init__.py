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

from cellseg1d.model.data.augment import (
    AugmentedItem,
    AugmentSettings,
    augment,
    augment_item,
)
from cellseg1d.model.data.convert import (
    FILL_MODES,
    HIGH_PERCENTILE,
    LOW_PERCENTILE,
    LOW_RES_FACTOR,
    NORMALIZE_MODES,
    UNAUGMENTED_MODES,
    TrainingDataError,
    to_uint8_rgb,
)
from cellseg1d.model.data.dataset import (
    CellTileDataset,
    collate_items,
    low_res_size,
)
from cellseg1d.model.data.prompts import (
    Prompts,
    PromptSettings,
    chamfer_distance,
    sample_prompts,
)
from cellseg1d.model.data.resize import (
    nearest_exact_index,
    resize_linear_exact,
    resize_nearest_exact,
)
from cellseg1d.model.data.tiles import (
    check_training_pair,
    make_tiles,
    renumber_labels,
    tile_starts,
)

__all__ = [
    "augment",
    "augment_item",
    "AugmentedItem",
    "AugmentSettings",
    "CellTileDataset",
    "chamfer_distance",
    "check_training_pair",
    "collate_items",
    "FILL_MODES",
    "HIGH_PERCENTILE",
    "LOW_PERCENTILE",
    "LOW_RES_FACTOR",
    "low_res_size",
    "make_tiles",
    "nearest_exact_index",
    "NORMALIZE_MODES",
    "Prompts",
    "PromptSettings",
    "renumber_labels",
    "resize_linear_exact",
    "resize_nearest_exact",
    "sample_prompts",
    "tile_starts",
    "to_uint8_rgb",
    "TrainingDataError",
    "UNAUGMENTED_MODES",
]
