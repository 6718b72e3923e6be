"""Writing synthetic images as OME-Zarr (NGFF 0.4 or 0.5), plates included, as a microscope would."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

#: Canonical order of the NGFF axes; every ``axes`` string is a subsequence.
CANONICAL_AXES = "tczyx"

_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
_SPACE_UNIT = "micrometer"
_COLORS = ["0000FF", "00FF00", "FF0000", "FF00FF", "FFFF00", "00FFFF"]


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
