"""cellseg1d plugin: a per-cell measurements table for every segmented image.

Implements ``configure`` and ``export``. For each (t, z) label plane of the
finished segmentation it measures every cell (CellProfiler-like: area in
pixels and square micrometres, centroid, bounding box, eccentricity,
solidity, perimeter and, per image channel, the mean, max, min and integrated
intensity) and writes one row per cell and plane to ``measurements.parquet``
and ``measurements.csv`` in the image's export folder
(``<container>.cellseg1d/<image path inside the container>/``).

Enable it in the daemon config::

    [plugins]
    enable = ["measurements"]

    [plugin_settings.measurements]   # optional
    intensity = true                 # false: no intensity columns (raw planes not read)
    channels = ["nuclei"]            # channels (names or 0-based indices) to measure; default all
    formats = ["parquet", "csv"]     # files to write

Label planes are read one at a time; shape measures come from
``skimage.measure.regionprops_table`` and sums from ``np.bincount``-based
whole-plane reductions, never from a Python loop over pixels.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cellseg1d.hookspecs import hookimpl
from cellseg1d.pipeline import pixel_size

#: The cellseg1d plugin API version this plugin was written for.
CELLSEG1D_PLUGIN_API = 1

__version__ = "0.2.0"

#: The plugin's name: its entry point and its ``[plugin_settings.<NAME>]`` table.
NAME = "measurements"
#: File written for each format.
FILENAMES = {"parquet": "measurements.parquet", "csv": "measurements.csv"}

#: Columns before the per-channel ones, in order, with their Arrow type names.
BASE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("label", "int64"), ("t", "int32"), ("z", "int32"),
    ("area_px", "int64"), ("area_um2", "float64"),
    ("centroid_y", "float64"), ("centroid_x", "float64"),
    ("bbox_min_y", "int32"), ("bbox_min_x", "int32"), ("bbox_max_y", "int32"), ("bbox_max_x", "int32"),
    ("eccentricity", "float64"), ("solidity", "float64"),
    ("perimeter", "float64"), ("perimeter_um", "float64"),
)
#: Per-channel statistics: column ``<stat>_<channel>``.
CHANNEL_STATS = ("mean", "max", "min", "integrated")

_SI_PREFIXES = {
    "yocto": -24, "zepto": -21, "atto": -18, "femto": -15, "pico": -12, "nano": -9, "micro": -6,
    "milli": -3, "centi": -2, "deci": -1, "": 0, "deca": 1, "hecto": 2, "kilo": 3, "mega": 6,
    "giga": 9, "tera": 12, "peta": 15, "exa": 18, "zetta": 21, "yotta": 24,
}
#: Micrometres per unit, for the NGFF (UDUNITS-2) space units an image may declare, and a few abbreviations.
MICROMETRES_PER: dict[str, float] = {
    **{f"{prefix}meter": 10.0 ** (power + 6) for prefix, power in _SI_PREFIXES.items()},
    "angstrom": 1e-4, "inch": 25_400.0, "foot": 304_800.0, "yard": 914_400.0, "mile": 1_609_344_000.0,
    "parsec": 3.0856775814913673e22, "micron": 1.0, "nm": 1e-3, "um": 1.0, "µm": 1.0, "mm": 1e3,
}

_ROWS_PER_BATCH = 65536


@dataclass(frozen=True)
class Settings:
    """The ``[plugin_settings.measurements]`` table of the daemon config."""

    #: Measure channel intensities (``mean_/max_/min_/integrated_<channel>`` columns).
    intensity: bool = True
    #: Channels to measure, by name or 0-based index; None: every channel.
    channels: tuple[str | int, ...] | None = None
    #: Files to write, in order: ``"parquet"`` and/or ``"csv"``.
    formats: tuple[str, ...] = ("parquet", "csv")


def settings_from_config(config: Any) -> Settings:
    """Read and check ``config.plugin_settings["measurements"]`` (defaults when absent).

    Raises ValueError naming the setting (``plugin_settings.measurements.<key>``)
    when a value is wrong or a key unknown.
    """
    table = (getattr(config, "plugin_settings", None) or {}).get(NAME) or {}
    prefix = f"setting plugin_settings.{NAME}"
    if not isinstance(table, dict):
        raise ValueError(f"{prefix}: expected a table, got {table!r}")  # noqa: TRY004 - a config error
    known = ("intensity", "channels", "formats")
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ValueError(f"{prefix}.{unknown[0]}: unknown setting (known: {', '.join(known)})")
    intensity = table.get("intensity", True)
    if not isinstance(intensity, bool):
        raise ValueError(f"{prefix}.intensity: expected true or false, got {intensity!r}")  # noqa: TRY004
    channels = table.get("channels")
    if channels is not None:
        if not isinstance(channels, list | tuple) or not channels or not all(
            isinstance(c, str) or (isinstance(c, int) and not isinstance(c, bool) and c >= 0) for c in channels
        ):
            raise ValueError(f"{prefix}.channels: expected a non-empty list of channel names or 0-based "
                             f"indices, got {channels!r}")
        channels = tuple(channels)
    formats = table.get("formats", ["parquet", "csv"])
    if (not isinstance(formats, list | tuple) or not formats or len(set(formats)) != len(formats)
            or not all(f in FILENAMES for f in formats)):
        raise ValueError(f"{prefix}.formats: expected a non-empty list of {', '.join(map(repr, FILENAMES))} "
                         f"without repeats, got {formats!r}")
    return Settings(intensity=intensity, channels=channels, formats=tuple(formats))


# ---------------------------------------------------------------------------
# Channels and physical units
# ---------------------------------------------------------------------------


def column_name(name: str, index: int) -> str:
    """A column-safe identifier for a channel name: letters, digits and ``_``, not starting with a digit."""
    safe = re.sub(r"[^0-9A-Za-z_]+", "_", str(name)).strip("_")
    if not safe:
        return f"ch{index}"
    return f"ch{safe}" if safe[0].isdigit() else safe


def channel_columns(image: Any, selection: Sequence[str | int] | None) -> list[tuple[int, str]]:
    """(channel index, column-safe channel name) of the channels to measure.

    Names come from the image's omero channel labels (``ch<i>`` where it names
    none); a name that repeats after sanitising gets ``_<index>`` appended.
    """
    n = int(image.n_channels)
    labels = [str(image.channel_names[i]) if i < len(image.channel_names) else f"ch{i}" for i in range(n)]
    if selection is None:
        indices = list(range(n))
    else:
        indices = []
        for item in selection:
            if isinstance(item, int):
                if not 0 <= item < n:
                    raise ValueError(f"setting plugin_settings.{NAME}.channels: channel index {item} is out of "
                                     f"range; {image.path} has {n} channel(s)")
                indices.append(item)
            elif item in labels:
                indices.append(labels.index(item))
            else:
                raise ValueError(f"setting plugin_settings.{NAME}.channels: no channel named {item!r} in "
                                 f"{image.path}; its channels: {', '.join(map(repr, labels))}")
    columns: list[tuple[int, str]] = []
    seen: set[str] = set()
    for i in indices:
        name = column_name(labels[i], i)
        if name in seen:
            name = f"{name}_{i}"
        seen.add(name)
        columns.append((i, name))
    return columns


def pixel_size_um(image: Any) -> tuple[float, float] | None:
    """(y, x) pixel size in micrometres, or None when unknown.

    From the scale transform of the full-resolution level
    (:func:`cellseg1d.pipeline.pixel_size`) in the unit of the y and x axes;
    an axis without a unit counts as micrometres, an unknown unit gives None.
    """
    size = pixel_size(image)
    if size is None:
        return None
    units = {}
    for axis in getattr(image, "axes_metadata", None) or []:
        if isinstance(axis, dict) and str(axis.get("name", "")).lower() in ("y", "x"):
            units[str(axis["name"]).lower()] = axis.get("unit")
    factors = []
    for name in ("y", "x"):
        unit = units.get(name)
        factor = 1.0 if not unit else MICROMETRES_PER.get(str(unit).strip().lower())
        if factor is None:
            return None
        factors.append(factor)
    return size[0] * factors[0], size[1] * factors[1]


# ---------------------------------------------------------------------------
# Measuring one plane
# ---------------------------------------------------------------------------


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index plane 0..n with 0 background, the ids it stands for, pixel count per id).

    cellseg1d's ids are consecutive within a plane but offset by the planes
    before it: shifting them keeps ``regionprops`` from scanning the ids of
    other planes. Sparse ids take the ``np.unique`` path.
    """
    nonzero = labels != 0
    if not nonzero.any():
        return np.zeros(labels.shape, np.int32), np.empty(0, np.int64), np.empty(0, np.int64)
    lo, hi = int(labels[nonzero].min()), int(labels.max())
    if hi - lo < labels.size:
        shifted = np.where(nonzero, labels.astype(np.int64) - (lo - 1), 0)
        counts = np.bincount(shifted.ravel(), minlength=hi - lo + 2)
        present = np.flatnonzero(counts[1:]) + 1
        ids = present.astype(np.int64) + (lo - 1)
        if present.size == hi - lo + 1:
            return shifted.astype(np.int32), ids, counts[present].astype(np.int64)
        lut = np.zeros(hi - lo + 2, np.int32)
        lut[present] = np.arange(1, present.size + 1, dtype=np.int32)
        return lut[shifted], ids, counts[present].astype(np.int64)
    values, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(labels.shape).astype(np.int32)
    if values[0] == 0:
        return inverse, values[1:].astype(np.int64), counts[1:].astype(np.int64)
    return inverse + 1, values.astype(np.int64), counts.astype(np.int64)


def measure_plane(labels: np.ndarray, intensities: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Measure every cell of one (Y, X) label plane, in increasing label order.

    ``intensities``: optional (C, Y, X) raw channels. Returns 1-D arrays:
    ``label``, ``area_px``, ``centroid_y``, ``centroid_x``, ``bbox_min_y``,
    ``bbox_min_x``, ``bbox_max_y``, ``bbox_max_x`` (max exclusive, numpy slice
    bounds), ``eccentricity``, ``solidity``, ``perimeter`` (pixels) and, with
    intensities, ``mean``, ``max``, ``min``, ``integrated`` as (N, C) arrays.
    """
    from scipy import ndimage as ndi
    from skimage.measure import regionprops_table

    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        raise ValueError(f"expected a (Y, X) integer label plane, got shape {labels.shape}, dtype {labels.dtype}")
    index, ids, area = _compact(labels)
    n = ids.size
    if intensities is not None:
        intensities = np.asarray(intensities)
        if intensities.ndim != 3 or intensities.shape[1:] != labels.shape:
            raise ValueError(f"intensities of shape {intensities.shape} do not match labels of shape {labels.shape}")
    properties = ["label", "centroid", "bbox", "eccentricity", "solidity", "perimeter"]
    if intensities is not None and n:
        properties += ["intensity_max", "intensity_min"]
    table = regionprops_table(
        index, intensity_image=np.moveaxis(intensities, 0, -1) if intensities is not None and n else None,
        properties=properties,
    )
    if n:
        assert np.array_equal(table["label"], np.arange(1, n + 1))
    out: dict[str, np.ndarray] = {
        "label": ids,
        "area_px": area,
        "centroid_y": np.asarray(table["centroid-0"], np.float64),
        "centroid_x": np.asarray(table["centroid-1"], np.float64),
        "bbox_min_y": np.asarray(table["bbox-0"], np.int64),
        "bbox_min_x": np.asarray(table["bbox-1"], np.int64),
        "bbox_max_y": np.asarray(table["bbox-2"], np.int64),
        "bbox_max_x": np.asarray(table["bbox-3"], np.int64),
        "eccentricity": np.asarray(table["eccentricity"], np.float64),
        "solidity": np.asarray(table["solidity"], np.float64),
        "perimeter": np.asarray(table["perimeter"], np.float64),
    }
    if intensities is not None:
        c = intensities.shape[0]
        integrated = np.empty((n, c))
        for k in range(c):
            integrated[:, k] = ndi.sum_labels(intensities[k].astype(np.float64), index, np.arange(1, n + 1))
        out["integrated"] = integrated
        out["mean"] = integrated / area[:, None] if n else np.empty((0, c))
        out["max"] = np.stack([np.asarray(table[f"intensity_max-{k}"], np.float64) for k in range(c)], 1) \
            if n else np.empty((0, c))
        out["min"] = np.stack([np.asarray(table[f"intensity_min-{k}"], np.float64) for k in range(c)], 1) \
            if n else np.empty((0, c))
    return out


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


def schema(channels: Sequence[str]) -> Any:
    """The Arrow schema of the table: :data:`BASE_COLUMNS`, then ``<stat>_<channel>`` (float64)."""
    import pyarrow as pa

    fields = [pa.field(name, getattr(pa, kind)()) for name, kind in BASE_COLUMNS]
    fields += [pa.field(f"{stat}_{ch}", pa.float64()) for ch in channels for stat in CHANNEL_STATS]
    return pa.schema(fields)


def plane_batch(t: int, z: int, m: dict[str, np.ndarray], size_um: tuple[float, float] | None,
                channels: Sequence[str], table_schema: Any) -> Any:
    """One plane's measurements as a ``pyarrow.RecordBatch`` of ``table_schema``."""
    import pyarrow as pa

    n = int(m["label"].size)
    physical = size_um is not None
    columns: dict[str, Any] = {
        "label": m["label"], "t": np.full(n, t), "z": np.full(n, z), "area_px": m["area_px"],
        "area_um2": m["area_px"] * (size_um[0] * size_um[1]) if physical else None,
        "perimeter_um": m["perimeter"] * math.sqrt(size_um[0] * size_um[1]) if physical else None,
    }
    for name, _ in BASE_COLUMNS:
        columns.setdefault(name, m.get(name))
    for k, ch in enumerate(channels):
        for stat in CHANNEL_STATS:
            columns[f"{stat}_{ch}"] = m[stat][:, k]
    arrays = [
        pa.nulls(n, field.type) if columns[field.name] is None
        else pa.array(np.asarray(columns[field.name]), type=field.type)
        for field in table_schema
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=table_schema)


class _Writers:
    """The open Parquet and/or CSV writers of one table, fed record batches."""

    def __init__(self, paths: dict[str, Any], table_schema: Any):
        import pyarrow.csv as pa_csv
        import pyarrow.parquet as pq

        self.schema = table_schema
        self._pending: list[Any] = []
        self._rows = 0
        self._writers = []
        try:
            for fmt, path in paths.items():
                if fmt == "parquet":
                    self._writers.append(pq.ParquetWriter(str(path), table_schema))
                else:
                    self._writers.append(pa_csv.CSVWriter(str(path), table_schema))
        except BaseException:
            self.close()
            raise

    def write(self, batch: Any) -> None:
        if batch.num_rows:
            self._pending.append(batch)
            self._rows += batch.num_rows
            if self._rows >= _ROWS_PER_BATCH:
                self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if self._pending:
            table = pa.Table.from_batches(self._pending, schema=self.schema)
            for writer in self._writers:
                writer.write_table(table)
        self._pending, self._rows = [], 0

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers = []


# ---------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------


@hookimpl
def configure(config: Any) -> None:
    """Check ``[plugin_settings.measurements]`` at start: a bad value stops the daemon with its name."""
    settings_from_config(config)


@hookimpl
def export(image: Any, labels: Any, context: Any) -> dict[str, Any]:
    """Write the measurements table: one row per cell of every label plane."""
    settings = settings_from_config(context.config)
    measured = channel_columns(image, settings.channels) if settings.intensity else []
    channel_index = [i for i, _ in measured]
    channels = [name for _, name in measured]
    size_um = pixel_size_um(image)
    table_schema = schema(channels)
    files = [FILENAMES[fmt] for fmt in settings.formats]
    writers = _Writers({fmt: context.atomic_path(FILENAMES[fmt]) for fmt in settings.formats}, table_schema)
    rows, total_area, cell_ids = 0, 0, []
    try:
        for t, z in labels.planes:
            plane = np.asarray(labels.read_plane(t, z))
            intensities = None
            if channel_index and plane.any():
                intensities = np.asarray(context.read_image_plane(t, z))[channel_index]
            m = measure_plane(plane, intensities)
            if not m["label"].size:
                continue
            writers.write(plane_batch(t, z, m, size_um, channels, table_schema))
            rows += int(m["label"].size)
            total_area += int(m["area_px"].sum())
            cell_ids.append(m["label"])
        writers.flush()
    finally:
        writers.close()
    mean_area = total_area / rows if rows else None
    return {
        "kind": NAME,
        "files": files,
        "rows": rows,
        "cells": int(np.unique(np.concatenate(cell_ids)).size) if cell_ids else 0,
        "mean_area_px": mean_area,
        "mean_area_um2": mean_area * size_um[0] * size_um[1] if mean_area is not None and size_um else None,
    }
