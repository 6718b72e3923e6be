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

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from scipy import ndimage

__all__ = [
    "make_cells",
    "make_czyx",
    "to_uint16",
    "write_ome_zarr",
    "write_plate",
]

#: Canonical order of the NGFF axes; every ``axes`` string is a subsequence.
CANONICAL_AXES = "tczyx"

_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
_SPACE_UNIT = "micrometer"
_COLORS = ["0000FF", "00FF00", "FF0000", "FF00FF", "FFFF00", "00FFFF"]

_BACKGROUND = 0.08  # background level of rendered images (before noise)
_NOISE_SIGMA = 0.03  # standard deviation of the additive gaussian noise
_EDGE_WIDTH = 0.7  # width (pixels) of the soft logistic cell edge
_UINT16_OFFSET = 100.0  # camera offset of :func:`to_uint16`
_UINT16_GAIN = 3900.0  # counts per unit intensity of :func:`to_uint16`


# --------------------------------------------------------------------------
# Cell geometry
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cell:
    """One elliptical cell: center, semi-axes, orientation and brightness."""

    cy: float
    cx: float
    a: float  # semi-major axis (pixels)
    b: float  # semi-minor axis (pixels)
    theta: float  # orientation of the major axis (radians)
    intensity: float  # peak brightness of the nuclear signal, 0.5..1.0
    membrane: float  # peak brightness of the membrane signal

    @property
    def extent(self) -> float:
        """Largest distance from the center to the cell boundary."""
        return self.a


def _place_cells(
    shape: tuple[int, int],
    n_cells: int,
    radius: tuple[float, float],
    rng: np.random.Generator,
    min_gap: float,
) -> list[_Cell]:
    """Place up to ``n_cells`` non-overlapping cells by rejection sampling.

    Parameters
    ----------
    shape : tuple of int
        Image size (Y, X).
    n_cells : int
        Number of cells wanted.
    radius : tuple of float
        Range (low, high) of the mean cell radius in pixels.
    rng : numpy.random.Generator
        Source of randomness; the result is deterministic given its state.
    min_gap : float
        Minimum distance in pixels between the extents of two cells.

    Returns
    -------
    list of _Cell
        The cells placed, at most ``n_cells`` (fewer when they do not fit).
    """
    r_lo, r_hi = float(min(radius)), float(max(radius))
    if r_lo <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    height, width = shape
    cells: list[_Cell] = []
    centers = np.empty((0, 2))
    extents = np.empty(0)
    max_attempts = 200 * n_cells + 1000
    for _ in range(max_attempts):
        if len(cells) >= n_cells:
            break
        r = rng.uniform(r_lo, r_hi)
        elongation = rng.uniform(1.0, 1.35)
        a, b = r * math.sqrt(elongation), r / math.sqrt(elongation)
        theta = rng.uniform(0.0, math.pi)
        margin = a + 1.0
        if height - 1 - 2 * margin < 0 or width - 1 - 2 * margin < 0:
            continue
        cy = rng.uniform(margin, height - 1 - margin)
        cx = rng.uniform(margin, width - 1 - margin)
        if len(cells):
            dist = np.hypot(centers[:, 0] - cy, centers[:, 1] - cx)
            if np.any(dist < extents + a + min_gap):
                continue
        cell = _Cell(
            cy=cy,
            cx=cx,
            a=a,
            b=b,
            theta=theta,
            intensity=rng.uniform(0.5, 1.0),
            membrane=rng.uniform(0.35, 0.6),
        )
        cells.append(cell)
        centers = np.vstack([centers, [cy, cx]])
        extents = np.append(extents, a)
    return cells


def _cell_window(
    cell: _Cell, shape: tuple[int, int], pad: int = 4
) -> tuple[tuple[slice, slice], np.ndarray]:
    """Return the bounding window of a cell and the normalised radius inside it.

    The normalised radius ``d`` is 1 on the ellipse boundary, 0 at the center.
    """
    half = int(math.ceil(cell.extent)) + pad
    y0, y1 = max(int(cell.cy) - half, 0), min(int(cell.cy) + half + 1, shape[0])
    x0, x1 = max(int(cell.cx) - half, 0), min(int(cell.cx) + half + 1, shape[1])
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dy, dx = yy - cell.cy, xx - cell.cx
    cos, sin = math.cos(cell.theta), math.sin(cell.theta)
    u = dx * cos + dy * sin
    v = -dx * sin + dy * cos
    d = np.sqrt((u / cell.a) ** 2 + (v / cell.b) ** 2)
    return (slice(y0, y1), slice(x0, x1)), d


def _render_mask(cells: list[_Cell], shape: tuple[int, int]) -> np.ndarray:
    """Render the label mask: cell ``i`` gets label ``i + 1``, background 0."""
    mask = np.zeros(shape, dtype=np.uint32)
    for label, cell in enumerate(cells, start=1):
        window, d = _cell_window(cell, shape)
        region = mask[window]
        region[d <= 1.0] = label
    return mask


def _render_nuclei(cells: list[_Cell], shape: tuple[int, int]) -> np.ndarray:
    """Render filled cells with a soft edge (half maximum on the mask boundary)."""
    signal = np.zeros(shape, dtype=np.float64)
    for cell in cells:
        window, d = _cell_window(cell, shape)
        mean_r = math.sqrt(cell.a * cell.b)
        edge = 1.0 / (1.0 + np.exp(np.clip((d - 1.0) * mean_r / _EDGE_WIDTH, -50, 50)))
        shading = 1.0 - 0.15 * np.minimum(d, 1.0) ** 2
        np.maximum(signal[window], cell.intensity * edge * shading, out=signal[window])
    return signal


def _render_membrane(cells: list[_Cell], shape: tuple[int, int]) -> np.ndarray:
    """Render dimmer rings along the cell boundaries over a faint interior."""
    signal = np.zeros(shape, dtype=np.float64)
    for cell in cells:
        window, d = _cell_window(cell, shape)
        mean_r = math.sqrt(cell.a * cell.b)
        ring = np.exp(-(((d - 1.0) * mean_r) ** 2) / (2 * 1.2**2))
        interior = 0.12 / (1.0 + np.exp(np.clip((d - 1.0) * mean_r / _EDGE_WIDTH, -50, 50)))
        np.maximum(signal[window], cell.membrane * (ring + interior), out=signal[window])
    return signal


def _add_noise(signal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Add the background level and gaussian noise; return float32."""
    noisy = signal + _BACKGROUND + rng.normal(0.0, _NOISE_SIGMA, size=signal.shape)
    return noisy.astype(np.float32)


def make_cells(
    shape: tuple[int, int],
    n_cells: int,
    radius: tuple[float, float] = (6, 11),
    seed: int = 0,
    min_gap: float = 2.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a 2-D image of bright, non-overlapping cells and its label mask.

    Parameters
    ----------
    shape : tuple of int
        Image size (Y, X).
    n_cells : int
        Number of cells wanted. When they do not all fit, as many as fit are
        placed (deterministically for a given ``seed``).
    radius : tuple of float, optional
        Range (low, high) of the mean cell radius in pixels. Cells are
        slightly elongated ellipses with a random orientation.
    seed : int, optional
        Seed of the random generator; equal seeds give equal results.
    min_gap : float, optional
        Minimum gap in pixels kept between the extents of two cells.

    Returns
    -------
    image : numpy.ndarray
        float32 (Y, X): cells of brightness 0.5..1.0 with a soft edge on a
        dark background (about 0.08), plus gaussian noise (sigma 0.03).
    mask : numpy.ndarray
        uint32 (Y, X): labels 1..N, one per cell, 0 for the background.
    """
    shape = (int(shape[0]), int(shape[1]))
    rng = np.random.default_rng(seed)
    cells = _place_cells(shape, n_cells, radius, rng, min_gap)
    image = _add_noise(_render_nuclei(cells, shape), rng)
    return image, _render_mask(cells, shape)


def make_realistic_cells(
    shape: tuple[int, int],
    n_cells: int,
    radius: tuple[float, float] = (6, 12),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A harder image than :func:`make_cells`: what real widefield nuclei images look like.

    Cells of very different brightness (a quarter to all of the brightest),
    with texture inside; a textured background; illumination that falls off
    by half from the brightest corner to the opposite one; noise. Whatever
    normalises or thresholds on part of the image only (a block) sees other
    numbers than on the whole.

    Returns
    -------
    image : float32 (Y, X), roughly 0..1
    mask : uint32 (Y, X), labels 1..N
    """
    shape = (int(shape[0]), int(shape[1]))
    rng = np.random.default_rng(seed)
    cells = _place_cells(shape, n_cells, radius, rng, 2.0)
    for index, cell in enumerate(cells):
        cells[index] = dataclasses.replace(cell, intensity=float(rng.uniform(0.25, 1.0)))
    signal = _render_nuclei(cells, shape)
    texture = ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape), 2.0)
    texture /= max(float(np.abs(texture).max()), 1e-9)
    signal *= 1.0 + 0.25 * texture  # chromatin-like texture inside the cells
    background = 0.06 + 0.03 * ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape), 6.0) / 0.05
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    illumination = 1.0 - 0.5 * (yy / max(shape[0] - 1, 1) + xx / max(shape[1] - 1, 1)) / 2.0
    image = (signal + np.clip(background, 0.0, None)) * illumination + rng.normal(0.0, 0.02, shape)
    return image.astype(np.float32), _render_mask(cells, shape)


def to_uint16(image: np.ndarray) -> np.ndarray:
    """Scale an image of intensities around 0..1 to a camera-like 16-bit range.

    Parameters
    ----------
    image : numpy.ndarray
        Float image, 0 meaning no light and 1 a bright cell.

    Returns
    -------
    numpy.ndarray
        uint16 image ``100 + 3900 * image`` (so 0 maps to 100 and 1 to 4000),
        rounded and clipped to the uint16 range.
    """
    scaled = _UINT16_OFFSET + _UINT16_GAIN * np.asarray(image, dtype=np.float64)
    return np.clip(np.rint(scaled), 0, np.iinfo(np.uint16).max).astype(np.uint16)


def make_czyx(
    shape_yx: tuple[int, int],
    n_cells: int,
    n_channels: int = 2,
    n_z: int = 1,
    n_t: int = 1,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a multi-channel, multi-plane acquisition of one field of cells.

    The same cells appear in every plane. Channel 0 ("nuclei") shows filled
    bright cells; channel 1 ("membrane") shows dimmer rings along the cell
    boundaries. Further channels alternate between the two patterns, dimmer.
    Planes away from the middle of the stack are dimmer (out of focus), later
    time points slightly bleached, and every plane has its own noise.

    Parameters
    ----------
    shape_yx : tuple of int
        Plane size (Y, X).
    n_cells : int
        Number of cells wanted (see :func:`make_cells`).
    n_channels, n_z, n_t : int, optional
        Number of channels, z planes and time points (each at least 1).
    seed : int, optional
        Seed of the random generator. The mask equals the mask that
        :func:`make_cells` returns for the same shape, count and seed.

    Returns
    -------
    data : numpy.ndarray
        uint16, always 5-D with axes (t, c, z, y, x).
    mask : numpy.ndarray
        uint32 (Y, X) label mask of the cells, shared by all planes.
    """
    if min(n_channels, n_z, n_t) < 1:
        raise ValueError("n_channels, n_z and n_t must all be at least 1")
    shape = (int(shape_yx[0]), int(shape_yx[1]))
    rng = np.random.default_rng(seed)
    cells = _place_cells(shape, n_cells, (6, 11), rng, 2.0)
    patterns = [_render_nuclei(cells, shape), _render_membrane(cells, shape)]
    data = np.empty((n_t, n_channels, n_z, *shape), dtype=np.uint16)
    z_mid = (n_z - 1) / 2.0
    for t in range(n_t):
        bleach = 0.98**t
        for c in range(n_channels):
            dim = 1.0 / (1 + c // 2)
            for z in range(n_z):
                focus = 0.6 + 0.4 * math.exp(-(((z - z_mid) / max(n_z / 3.0, 1.0)) ** 2))
                plane = patterns[c % 2] * (bleach * dim * focus)
                data[t, c, z] = to_uint16(_add_noise(plane, rng))
    return data, _render_mask(cells, shape)


# --------------------------------------------------------------------------
# OME-Zarr writing
# --------------------------------------------------------------------------


def _check_axes(axes: str) -> None:
    """Raise ValueError unless ``axes`` is a valid NGFF axes string."""
    if len(set(axes)) != len(axes) or any(a not in CANONICAL_AXES for a in axes):
        raise ValueError(f"axes must be distinct letters of {CANONICAL_AXES!r}, got {axes!r}")
    if list(axes) != sorted(axes, key=CANONICAL_AXES.index):
        raise ValueError(f"axes must follow the order {CANONICAL_AXES!r}, got {axes!r}")
    if "y" not in axes or "x" not in axes:
        raise ValueError(f"axes must contain 'y' and 'x', got {axes!r}")


def _default_chunks(axes: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Chunks of 1 along t/c/z and up to 256 along y/x."""
    return tuple(min(256, n) if a in "yx" else 1 for a, n in zip(axes, shape, strict=True))


def _downsample_yx(data: np.ndarray) -> np.ndarray:
    """Halve the last two axes by 2x2 block mean, keeping the dtype.

    Odd sizes are padded by repeating the edge, so a size ``n`` becomes
    ``ceil(n / 2)``.
    """
    pad = [(0, 0)] * (data.ndim - 2) + [(0, data.shape[-2] % 2), (0, data.shape[-1] % 2)]
    padded = np.pad(data, pad, mode="edge") if any(p[1] for p in pad) else data
    h, w = padded.shape[-2] // 2, padded.shape[-1] // 2
    blocks = padded.reshape(*padded.shape[:-2], h, 2, w, 2)
    mean = blocks.mean(axis=(-3, -1))
    if np.issubdtype(data.dtype, np.integer):
        info = np.iinfo(data.dtype)
        mean = np.clip(np.rint(mean), info.min, info.max)
    return mean.astype(data.dtype)


def _axes_metadata(axes: str) -> list[dict[str, str]]:
    """NGFF axes entries: name, type and, for space axes, unit."""
    entries = []
    for name in axes:
        entry = {"name": name, "type": _AXIS_TYPES[name]}
        if entry["type"] == "space":
            entry["unit"] = _SPACE_UNIT
        entries.append(entry)
    return entries


def _multiscales_metadata(
    axes: str, n_levels: int, pixel_size: float, name: str, ngff_version: str
) -> dict[str, Any]:
    """The single multiscales entry of an image."""
    datasets = []
    for level in range(n_levels):
        scale = [pixel_size * 2**level if a in "yx" else 1.0 for a in axes]
        datasets.append(
            {"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        )
    entry: dict[str, Any] = {
        "name": name,
        "axes": _axes_metadata(axes),
        "datasets": datasets,
        "type": "mean",
        "metadata": {"description": "2x2 block mean in y and x per level"},
    }
    if ngff_version == "0.4":
        entry = {"version": "0.4", **entry}
    return entry


def _omero_metadata(data: np.ndarray, axes: str, channel_names: list[str]) -> dict[str, Any]:
    """omero rendering settings: one channel entry per channel label."""
    if np.issubdtype(data.dtype, np.integer):
        info = np.iinfo(data.dtype)
        lo, hi = float(info.min), float(info.max)
    else:
        lo, hi = float(np.min(data)), float(np.max(data))
    channels = []
    for index, label in enumerate(channel_names):
        plane = np.take(data, index, axis=axes.index("c")) if "c" in axes else data
        color = _COLORS[index % len(_COLORS)] if len(channel_names) > 1 else "FFFFFF"
        channels.append(
            {
                "label": label,
                "color": color,
                "active": True,
                "window": {
                    "start": float(np.min(plane)),
                    "end": float(np.max(plane)),
                    "min": lo,
                    "max": hi,
                },
            }
        )
    return {"channels": channels, "rdefs": {"model": "color"}}


def _chunk_regions(shape: tuple[int, ...], chunks: tuple[int, ...]) -> Iterator[tuple[slice, ...]]:
    """Yield the region of every chunk of an array, in C order of the chunk grid."""
    grid = [math.ceil(n / c) for n, c in zip(shape, chunks, strict=True)]
    for index in np.ndindex(*grid):
        yield tuple(
            slice(i * c, min((i + 1) * c, n))
            for i, c, n in zip(index, chunks, shape, strict=True)
        )


def _open_group(path: Path, ngff_version: str) -> zarr.Group:
    """Create (overwriting) a zarr group of the format of the NGFF version."""
    if ngff_version not in ("0.4", "0.5"):
        raise ValueError(f"ngff_version must be '0.4' or '0.5', got {ngff_version!r}")
    zarr_format = 3 if ngff_version == "0.5" else 2
    return zarr.open_group(str(path), mode="w", zarr_format=zarr_format)


def _ngff_attrs(ngff_version: str, content: dict[str, Any]) -> dict[str, Any]:
    """Wrap NGFF metadata as group attributes of the given version."""
    if ngff_version == "0.5":
        return {"ome": {"version": "0.5", **content}}
    return content


def write_ome_zarr(
    path: str | Path,
    data: np.ndarray,
    *,
    axes: str = "czyx",
    ngff_version: str = "0.5",
    chunks: tuple[int, ...] | None = None,
    channel_names: list[str] | None = None,
    n_levels: int = 2,
    pixel_size: float = 0.65,
    pause: float = 0.0,
    attrs: dict[str, Any] | None = None,
    on_chunk: Callable[[], None] | None = None,
) -> Path:
    """Write an image as OME-Zarr the way an acquiring microscope would.

    The group, its NGFF metadata and all (empty) arrays are created first;
    then level 0 is written chunk by chunk, optionally pausing between
    chunks; then the lower resolution levels; and last the extra ``attrs``
    are merged into the group attributes (e.g. a completion marker).

    Parameters
    ----------
    path : str or pathlib.Path
        Directory of the image group; replaced if it exists.
    data : numpy.ndarray
        Full-resolution pixels, one dimension per letter of ``axes``.
    axes : str, optional
        Axis names in the canonical relative order ``tczyx``; must contain
        ``y`` and ``x``.
    ngff_version : {"0.5", "0.4"}, optional
        "0.5" writes zarr v3 with the metadata under the ``ome`` attribute;
        "0.4" writes zarr v2 with the metadata at the top of ``.zattrs``.
    chunks : tuple of int, optional
        Chunk shape of level 0 (lower levels use it clipped to their shape).
        Defaults to 1 along t/c/z and ``min(256, size)`` along y/x.
    channel_names : list of str, optional
        omero channel labels; defaults to ``ch0``, ``ch1``, ...
    n_levels : int, optional
        Number of resolution levels; level ``i`` is downsampled by ``2**i``
        in y and x by block mean.
    pixel_size : float, optional
        Pixel size in micrometers along y and x at level 0.
    pause : float, optional
        Seconds to sleep between two level-0 chunks.
    attrs : dict, optional
        Extra attributes merged into the group attributes at the very end,
        at the top level (beside ``ome`` for 0.5).
    on_chunk : callable, optional
        Called with no argument after each level-0 chunk is written.

    Returns
    -------
    pathlib.Path
        The path of the image group.
    """
    path = Path(path)
    data = np.asarray(data)
    _check_axes(axes)
    if data.ndim != len(axes):
        raise ValueError(f"data has {data.ndim} dimensions but axes {axes!r} has {len(axes)}")
    if n_levels < 1:
        raise ValueError(f"n_levels must be at least 1, got {n_levels}")
    chunks = tuple(chunks) if chunks is not None else _default_chunks(axes, data.shape)
    if len(chunks) != data.ndim or any(c < 1 for c in chunks):
        raise ValueError(f"chunks {chunks} do not fit data of shape {data.shape}")
    n_channels = data.shape[axes.index("c")] if "c" in axes else 1
    if channel_names is None:
        channel_names = [f"ch{i}" for i in range(n_channels)]
    if len(channel_names) != n_channels:
        raise ValueError(f"{len(channel_names)} channel names given for {n_channels} channels")

    levels = [data]
    for _ in range(1, n_levels):
        levels.append(_downsample_yx(levels[-1]))

    group = _open_group(path, ngff_version)
    content = {
        "multiscales": [
            _multiscales_metadata(axes, n_levels, pixel_size, path.name, ngff_version)
        ],
        "omero": _omero_metadata(data, axes, list(channel_names)),
    }
    group.attrs.update(_ngff_attrs(ngff_version, content))

    arrays = []
    for index, level in enumerate(levels):
        kwargs: dict[str, Any] = {}
        if ngff_version == "0.5":
            kwargs["dimension_names"] = list(axes)
        else:
            kwargs["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
        arrays.append(
            group.create_array(
                str(index),
                shape=level.shape,
                chunks=tuple(min(c, n) for c, n in zip(chunks, level.shape, strict=True)),
                dtype=level.dtype,
                fill_value=0,
                **kwargs,
            )
        )

    regions = list(_chunk_regions(data.shape, chunks))
    for number, region in enumerate(regions):
        arrays[0][region] = data[region]
        if on_chunk is not None:
            on_chunk()
        if pause > 0 and number + 1 < len(regions):
            time.sleep(pause)

    for array, level in zip(arrays[1:], levels[1:], strict=True):
        array[...] = level

    if attrs:
        group.attrs.update(dict(attrs))
    return path


def _column_key(name: str) -> tuple[int, int | str]:
    """Sort columns numerically when their names are numbers."""
    return (0, int(name)) if name.isdigit() else (1, name)


def write_plate(
    path: str | Path,
    fields: dict[tuple[str, str, str], np.ndarray],
    *,
    axes: str = "czyx",
    ngff_version: str = "0.5",
    **kwargs: Any,
) -> Path:
    """Write a high-content-screening plate of OME-Zarr field images.

    The plate and well groups (with their metadata) are written first, then
    every field image with :func:`write_ome_zarr` at ``path/row/col/field``.

    Parameters
    ----------
    path : str or pathlib.Path
        Directory of the plate group; replaced if it exists.
    fields : dict
        Maps ``(row, column, field)`` names, e.g. ``("A", "1", "0")``, to the
        pixels of that field, laid out as ``axes``.
    axes : str, optional
        Axes of every field (see :func:`write_ome_zarr`).
    ngff_version : {"0.5", "0.4"}, optional
        NGFF version of the plate, wells and images.
    **kwargs
        Forwarded to :func:`write_ome_zarr` for every field (``pause``,
        ``chunks``, ``attrs``, ...).

    Returns
    -------
    pathlib.Path
        The path of the plate group.
    """
    path = Path(path)
    if not fields:
        raise ValueError("a plate needs at least one field")
    for key in fields:
        if len(key) != 3 or any(not str(k) or "/" in str(k) for k in key):
            raise ValueError(f"field key must be (row, column, field) names, got {key!r}")
    keys = [(str(r), str(c), str(f)) for r, c, f in fields]
    rows = sorted({r for r, _, _ in keys})
    columns = sorted({c for _, c, _ in keys}, key=_column_key)
    wells: dict[tuple[str, str], list[str]] = {}
    for r, c, f in keys:
        wells.setdefault((r, c), []).append(f)
    for names in wells.values():
        names.sort(key=_column_key)
    well_keys = sorted(wells, key=lambda rc: (rows.index(rc[0]), columns.index(rc[1])))

    plate: dict[str, Any] = {
        "name": path.stem,
        "rows": [{"name": r} for r in rows],
        "columns": [{"name": c} for c in columns],
        "wells": [
            {"path": f"{r}/{c}", "rowIndex": rows.index(r), "columnIndex": columns.index(c)}
            for r, c in well_keys
        ],
        "field_count": max(len(names) for names in wells.values()),
    }
    if ngff_version == "0.4":
        plate["version"] = "0.4"
    root = _open_group(path, ngff_version)
    root.attrs.update(_ngff_attrs(ngff_version, {"plate": plate}))

    for r in rows:
        row_group = root.create_group(r)
        for c in columns:
            if (r, c) not in wells:
                continue
            well: dict[str, Any] = {"images": [{"path": f} for f in wells[(r, c)]]}
            if ngff_version == "0.4":
                well["version"] = "0.4"
            well_group = row_group.create_group(c)
            well_group.attrs.update(_ngff_attrs(ngff_version, {"well": well}))

    for (r, c, f), data in zip(keys, fields.values(), strict=True):
        write_ome_zarr(path / r / c / f, data, axes=axes, ngff_version=ngff_version, **kwargs)
    return path
