"""Segmenting images larger than one tile: overlapping tiles through SAM, stitched without seams.

:func:`segment_large` cuts the image into ``tile`` x ``tile`` windows
(:func:`cellseg1d.model.stitch.tile_boxes`), segments each with
:func:`cellseg1d.model.inference.segment_image` (each tile at model scale) and
merges the tiles' label images with :func:`cellseg1d.model.stitch.stitch`, whose
module documents the stitching rule and its guarantee.
"""

from __future__ import annotations

import numpy as np
import torch
from segment_anything.modeling import Sam

from cellseg1d.model.inference import InferenceSettings, as_rgb_uint8, segment_image
from cellseg1d.model.stitch import Tile, stitch, tile_boxes


def segment_large(
    sam: Sam,
    image: np.ndarray,
    settings: InferenceSettings | None = None,
    device: torch.device | str | None = None,
    tile: int = 1024,
    overlap: int = 256,
    *,
    autocast: torch.dtype | None = None,
) -> np.ndarray:
    """Segment an image of any size: overlapping tiles through :func:`segment_image`, then :func:`stitch`.

    An image that fits in one tile is segmented directly. Returns (H, W) uint32 labels 1..N.
    """
    rgb = as_rgb_uint8(image)
    height, width = rgb.shape[:2]
    if height <= tile and width <= tile:
        return segment_image(sam, rgb, settings, device, autocast=autocast)
    results: list[Tile] = []
    for y0, x0, y1, x1 in tile_boxes((height, width), tile, overlap):
        labels = segment_image(sam, rgb[y0:y1, x0:x1], settings, device, autocast=autocast)
        results.append((y0, x0, labels))
    return stitch(results, (height, width), overlap)
