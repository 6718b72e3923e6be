"""cellseg1d plugin: a per-object measurements table for every segmented image.

Implements the ``export`` hook. For each label plane of the finished
segmentation it measures every object (label id, t, z, area in pixels and in
physical units, centroid, bounding box and the mean intensity of each image
channel) and writes them all to ``measurements.csv`` in the image's export
folder (``<container>.cellseg1d/<image path inside the container>/``).

Enable it in the daemon config::

    [plugins]
    enable = ["measurements"]

    [plugin_settings.measurements]   # optional
    intensity = true                 # false: no mean_<channel> columns
    channels = ["nuclei"]            # channels (names or 0-based indices) to measure; default all

Every measurement is computed with whole-plane numpy/scipy operations
(``np.bincount`` with weights and ``scipy.ndimage.find_objects``), never with
a loop over objects that scans the plane.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from cellseg1d.hookspecs import hookimpl
from cellseg1d.pipeline import pixel_size

__version__ = "0.1.0"

#: The plugin's name: its entry point and its ``[plugin_settings.<NAME>]`` table.
NAME = "measurements"
#: The file written into the image's export folder.
FILENAME = "measurements.csv"

#: Columns before the per-channel ``mean_<channel>`` columns, in order.
BASE_COLUMNS = (
    "label", "t", "z",
    "area_pixels", "area_physical", "area_unit",
    "centroid_y", "centroid_x",
    "bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x",
)

_DECIMALS = 6


@dataclass(frozen=True)
class Settings:
    """The ``[plugin_settings.measurements]`` table of the daemon config."""

    #: Measure the mean intensity of channels (``mean_<channel>`` columns).
    intensity: bool = True
    #: Channels to measure, by name or 0-based index; None: every channel.
    channels: tuple[str | int, ...] | None = None


def settings_from_config(config: Any) -> Settings:
    """Read and check ``config.plugin_settings["measurements"]`` (defaults when absent).

    Raises ValueError naming the setting when a value is wrong or a key unknown.
    """
    table = (getattr(config, "plugin_settings", None) or {}).get(NAME, {}) or {}
    prefix = f"setting plugin_settings.{NAME}"
    known = {"intensity", "channels"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(f"{prefix}.{unknown[0]}: unknown setting (known: {', '.join(sorted(known))})")
    intensity = table.get("intensity", True)
    if not isinstance(intensity, bool):
        raise ValueError(f"{prefix}.intensity: expected true or false, got {intensity!r}")
    channels = table.get("channels")
    if channels is not None:
        if not isinstance(channels, list) or not all(
            isinstance(c, str) or (isinstance(c, int) and not isinstance(c, bool)) for c in channels
        ):
            raise ValueError(f"{prefix}.channels: expected a list of channel names or indices, got {channels!r}")
        channels = tuple(channels)
    return Settings(intensity=intensity, channels=channels)


def channel_columns(image: Any, selection: Sequence[str | int] | None) -> list[tuple[int, str]]:
    """(channel index, column name) of the channels to measure.

    Channel names come from ``image.channel_names`` (``ch<i>`` where the image
    names none); a repeated name gets its index appended so columns stay unique.
    """
    n = int(image.n_channels)
    names = [
        str(image.channel_names[i]) if i < len(image.channel_names) else f"ch{i}" for i in range(n)
    ]
    if selection is None:
        indices = list(range(n))
    else:
        indices = []
        for item in selection:
            if isinstance(item, int):
                if not 0 <= item < n:
                    raise ValueError(
                        f"setting plugin_settings.{NAME}.channels: channel index {item} is out of range; "
                        f"{image.path} has {n} channel(s)"
                    )
                indices.append(item)
            elif item in names:
                indices.append(names.index(item))
            else:
                raise ValueError(
                    f"setting plugin_settings.{NAME}.channels: no channel named {item!r} in {image.path}; "
                    f"its channels: {', '.join(map(repr, names))}"
                )
    columns = []
    seen: set[str] = set()
    for i in indices:
        column = f"mean_{names[i]}"
        if column in seen:
            column = f"mean_{names[i]}_{i}"
        seen.add(column)
        columns.append((i, column))
    return columns


def area_unit(image: Any) -> str:
    """The unit of an area, e.g. ``micrometer^2``, from the y axis's unit ("" when undeclared)."""
    for axis in getattr(image, "axes_metadata", None) or []:
        if isinstance(axis, dict) and str(axis.get("name", "")).lower() == "y" and axis.get("unit"):
            return f"{axis['unit']}^2"
    return ""


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Object ids present in ``labels`` and a same-shape index image: 0 background, k for ids[k-1].

    Uses an offset when the ids span a range no larger than the plane (always
    the case for cellseg1d's sequential ids), else ``np.unique``.
    """
    nonzero = labels != 0
    if not nonzero.any():
        return np.empty(0, np.int64), np.zeros(labels.shape, np.intp)
    lo = int(labels[nonzero].min())
    hi = int(labels.max())
    if hi - lo < labels.size:
        shifted = np.where(nonzero, labels.astype(np.int64) - (lo - 1), 0)
        present = np.flatnonzero(np.bincount(shifted.ravel(), minlength=hi - lo + 2)[1:])
        ids = present.astype(np.int64) + lo
        remap = np.zeros(hi - lo + 2, np.intp)
        remap[present + 1] = np.arange(1, present.size + 1)
        return ids, remap[shifted]
    values, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape)
    if values[0] == 0:
        return values[1:].astype(np.int64), inverse.astype(np.intp)
    return values.astype(np.int64), (inverse + 1).astype(np.intp)


def measure_plane(
    labels: np.ndarray,
    intensities: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Measure every object of one (Y, X) label plane.

    Parameters
    ----------
    labels : (Y, X) integer array, 0 background.
    intensities : optional (C, Y, X) array of the raw channels to average per object.

    Returns
    -------
    dict of 1-D arrays, one entry per object in increasing label order:
    ``label``, ``area`` (pixels), ``centroid_y``, ``centroid_x``,
    ``bbox`` (N, 4: min_y, min_x, max_y, max_x; max exclusive) and, with
    ``intensities``, ``mean`` (N, C).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"expected a (Y, X) label plane, got shape {labels.shape}")
    ids, index = _compact(labels)
    n = ids.size
    out: dict[str, np.ndarray] = {"label": ids}
    if n == 0:
        out.update(area=np.empty(0, np.int64), centroid_y=np.empty(0), centroid_x=np.empty(0),
                   bbox=np.empty((0, 4), np.int64))
        if intensities is not None:
            out["mean"] = np.empty((0, np.asarray(intensities).shape[0]))
        return out
    height, width = labels.shape
    flat = index.ravel()
    area = np.bincount(flat, minlength=n + 1)[1:]
    # Coordinate sums per object: row sums weighted by y, column sums weighted by x.
    rows = np.bincount(flat, weights=np.repeat(np.arange(height, dtype=np.float64), width), minlength=n + 1)[1:]
    cols = np.bincount(flat, weights=np.tile(np.arange(width, dtype=np.float64), height), minlength=n + 1)[1:]
    slices = ndi.find_objects(index, max_label=n)
    bbox = np.array([(s[0].start, s[1].start, s[0].stop, s[1].stop) for s in slices], dtype=np.int64)
    out.update(area=area.astype(np.int64), centroid_y=rows / area, centroid_x=cols / area, bbox=bbox)
    if intensities is not None:
        intensities = np.asarray(intensities)
        if intensities.ndim != 3 or intensities.shape[1:] != labels.shape:
            raise ValueError(
                f"intensities of shape {intensities.shape} do not match labels of shape {labels.shape}"
            )
        means = np.empty((n, intensities.shape[0]))
        for c in range(intensities.shape[0]):
            sums = np.bincount(flat, weights=intensities[c].ravel().astype(np.float64), minlength=n + 1)[1:]
            means[:, c] = sums / area
        out["mean"] = means
    return out


def _rounded(values: np.ndarray) -> list[float]:
    return np.round(np.asarray(values, dtype=np.float64), _DECIMALS).tolist()


def plane_rows(
    t: int, z: int, m: dict[str, np.ndarray], pixel_area: float | None, unit: str,
) -> list[tuple[Any, ...]]:
    """CSV rows (in :data:`BASE_COLUMNS` order, then the means) for one plane's measurements."""
    n = int(m["label"].size)
    if n == 0:
        return []
    area = m["area"]
    physical = _rounded(area * pixel_area) if pixel_area is not None else [""] * n
    columns: list[list[Any]] = [
        m["label"].tolist(), [t] * n, [z] * n,
        area.tolist(), physical, [unit] * n,
        _rounded(m["centroid_y"]), _rounded(m["centroid_x"]),
        *(m["bbox"][:, k].tolist() for k in range(4)),
    ]
    if "mean" in m:
        columns.extend(_rounded(m["mean"][:, c]) for c in range(m["mean"].shape[1]))
    return list(zip(*columns, strict=True))


@hookimpl
def export(image: Any, labels: Any, context: Any) -> dict[str, Any]:
    """Write ``measurements.csv``: one row per object of every label plane."""
    settings = settings_from_config(context.config)
    measured = channel_columns(image, settings.channels) if settings.intensity else []
    size = pixel_size(image)
    pixel_area = size[0] * size[1] if size is not None else None
    unit = area_unit(image) if size is not None else ""
    header = [*BASE_COLUMNS, *(column for _, column in measured)]
    channel_index = [i for i, _ in measured]
    tmp = context.atomic_path(FILENAME)
    objects = 0
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for t, z, plane in labels:
            intensities = None
            if channel_index:
                intensities = np.asarray(context.read_image_plane(t, z))[channel_index]
            m = measure_plane(plane, intensities)
            writer.writerows(plane_rows(t, z, m, pixel_area, unit))
            objects += int(m["label"].size)
    final: Path = context.output_dir / FILENAME
    return {"kind": NAME, "path": str(final), "objects": objects}
