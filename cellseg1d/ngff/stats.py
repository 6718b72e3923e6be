"""Intensity statistics of a whole plane, computed once and sent with every block of it.

A plane larger than ``executor.block_size`` is segmented block by block. A
segmenter that normalised or thresholded each block on its own would give a
cell a different outline depending on its block; :class:`PlaneStats` (min,
max, percentiles and a regular-grid sample per channel) lets every block use
the plane's numbers instead.

Where they come from: the full-resolution plane when it has at most
:data:`STATS_MAX_PIXELS` pixels (4096 x 4096, 32 MB per uint16 channel), which
covers every plane a microscope PC segments whole. A larger plane (a slide
scan) is read from the finest pyramid level at or under that size: reading
16k x 16k pixels once more on the daemon only for statistics would cost
about 512 MB of I/O and memory per channel, while a 4x-downsampled level
holds the same intensity distribution (a downsampled level averages away
some extreme pixels, so its min and max are slightly less extreme; the
percentiles barely move). Without such a level, every k-th row and column
of the full plane is read.
"""

from __future__ import annotations

import math

import numpy as np

from cellseg1d.ngff.reader import OmeImage
from cellseg1d.types import STATS_PERCENTILES, STATS_SAMPLE_SIZE, ChannelStats, PlaneStats

#: Planes with more pixels than this get their statistics from a pyramid level.
STATS_MAX_PIXELS = 4096 * 4096


def _strides(height: int, width: int) -> tuple[int, int]:
    """Pixels per sample value along y and x: at most STATS_SAMPLE_SIZE values, square cells where possible."""
    stride = max(1, math.ceil(math.sqrt(height * width / STATS_SAMPLE_SIZE)))
    sy = min(stride, height)
    sx = min(width, stride if sy == stride else math.ceil(height * width / (STATS_SAMPLE_SIZE * sy)))
    return sy, max(1, sx)


def _channel_stats(channel: np.ndarray) -> ChannelStats:
    """Statistics of one (Y, X) channel; non-finite values are left out (and sampled as 0)."""
    values = np.asarray(channel, dtype=np.float64)
    finite = values[np.isfinite(values)]
    height, width = values.shape
    sy, sx = _strides(height, width)
    rows, cols = height // sy, width // sx
    cells = np.where(np.isfinite(values), values, 0.0)[: rows * sy, : cols * sx]
    sample = cells.reshape(rows, sy, cols, sx).mean(axis=(1, 3)).astype(np.float32)  # (rows, cols)
    if finite.size == 0:
        return ChannelStats(0.0, 0.0, tuple((q, 0.0) for q in STATS_PERCENTILES), sample, (sy, sx))
    levels = np.percentile(finite, STATS_PERCENTILES)
    return ChannelStats(float(finite.min()), float(finite.max()),
                        tuple((q, float(v)) for q, v in zip(STATS_PERCENTILES, levels, strict=True)), sample,
                        (sy, sx))


def plane_stats(plane: np.ndarray, source: str = "plane") -> PlaneStats:
    """:class:`PlaneStats` of a (C, Y, X) or (Y, X) plane."""
    arr = np.asarray(plane)
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    if arr.ndim != 3:
        raise ValueError(f"expected a (C, Y, X) or (Y, X) plane, got shape {arr.shape}")
    return PlaneStats(tuple(_channel_stats(c) for c in arr), source)


def _stats_level(image: OmeImage) -> int | None:
    """The finest pyramid level with at most STATS_MAX_PIXELS per plane and the same t, z, c; None if none."""
    axes = image.axes
    full = image.levels[0].array.shape
    for index, level in enumerate(image.levels[1:], start=1):
        shape = level.array.shape
        if any(shape[axes.index(a)] != full[axes.index(a)] for a in "tzc" if a in axes):
            continue
        if shape[axes.index("y")] * shape[axes.index("x")] <= STATS_MAX_PIXELS:
            return index
    return None


def image_plane_stats(image: OmeImage, t: int, z: int, channels: list[int] | tuple[int, ...]) -> PlaneStats:
    """The statistics of plane (t, z) of ``image`` over ``channels`` (see the module doc for the source)."""
    height, width = image.size("y"), image.size("x")
    if height * width <= STATS_MAX_PIXELS:
        return plane_stats(image.read_plane(t, z, channels), "plane")
    index = _stats_level(image)
    if index is not None:
        return plane_stats(image.read_plane(t, z, channels, level_index=index), f"level {index}")
    step = math.ceil(math.sqrt(height * width / STATS_MAX_PIXELS))
    band = step * max(1, 1024 // step)  # whole chunks' worth of rows at a time, a multiple of the step
    parts = [image.read_plane(t, z, channels, (y0, 0, min(y0 + band, height), width))[:, ::step, ::step]
             for y0 in range(0, height, band)]
    return plane_stats(np.concatenate(parts, axis=1), f"every {step}th pixel")
