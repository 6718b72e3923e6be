"""cellseg1d plugin: the outline of every segmented cell as GeoJSON (``cells.geojson``).

Implements ``configure`` and ``export``. For each (t, z) label plane of the
finished segmentation it traces every cell's outline along pixel edges and
writes one GeoJSON Feature per cell and plane into ``cells.geojson`` in the
image's export folder, as QuPath imports detections (File > Import objects):

* geometry in pixel coordinates of the full-resolution image, ``[x, y]`` =
  ``[column, row]``, the top-left corner of the image at ``[0, 0]``; the
  polygon runs along pixel edges, so it covers exactly the cell's pixels;
* a ``Polygon`` for a cell in one piece, a ``MultiPolygon`` (largest piece
  first) for a cell whose pixels form several pieces (pixels touching only at
  a corner are separate pieces), or only its largest piece with
  ``pieces = "largest"``;
* holes (background enclosed by the cell) are kept as interior rings, or
  dropped with ``holes = false``;
* ``properties``: ``objectType`` ("detection"), ``label``, ``area_px`` (the
  cell's pixel count in that plane), ``t``, ``z``, ``name`` ("cell <label>")
  and, with the ``classification`` setting, ``classification`` ({name, color}).

Every geometry is checked with shapely's ``is_valid``; one that is not (none
is expected from the tracer, see :mod:`cellseg1d_geojson.outline`) is
repaired with ``shapely.make_valid`` and counted in the export record.

Enable it in the daemon config::

    [plugins]
    enable = ["geojson"]

    [plugin_settings.geojson]        # optional
    classification = "Cell"          # QuPath class of every detection; default none
    color = [255, 0, 0]              # its colour; default derived from the name
    holes = true                     # false: outer boundaries only
    pieces = "all"                   # "largest": one Polygon, the largest piece
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from cellseg1d.hookspecs import hookimpl
from cellseg1d_geojson.outline import Outline, trace_outlines

#: The cellseg1d plugin API version this plugin was written for.
CELLSEG1D_PLUGIN_API = 1

__version__ = "0.1.0"

#: The plugin's name: its entry point and its ``[plugin_settings.<NAME>]`` table.
NAME = "geojson"
#: The file written into the image's export folder.
FILENAME = "cells.geojson"

_PIECES = ("all", "largest")


@dataclass(frozen=True)
class Settings:
    """The ``[plugin_settings.geojson]`` table of the daemon config."""

    #: QuPath classification name given to every feature (None: no classification).
    classification: str | None = None
    #: Its colour, (r, g, b) in 0..255.
    color: tuple[int, int, int] | None = None
    #: Keep holes as interior rings.
    holes: bool = True
    #: "all": every piece of a cell (MultiPolygon when several); "largest": only the largest.
    pieces: str = "all"


def settings_from_config(config: Any) -> Settings:
    """Read and check ``config.plugin_settings["geojson"]`` (defaults when absent).

    Raises ValueError naming the setting (``plugin_settings.geojson.<key>``) when a
    value is wrong or a key unknown.
    """
    table = (getattr(config, "plugin_settings", None) or {}).get(NAME) or {}
    prefix = f"setting plugin_settings.{NAME}"
    if not isinstance(table, dict):
        raise ValueError(f"{prefix}: expected a table, got {table!r}")  # noqa: TRY004 - a config error
    known = ("classification", "color", "holes", "pieces")
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ValueError(f"{prefix}.{unknown[0]}: unknown setting (known: {', '.join(known)})")
    classification = table.get("classification")
    if classification is not None and (not isinstance(classification, str) or not classification.strip()):
        raise ValueError(f"{prefix}.classification: expected a class name such as \"Cell\", got {classification!r}")
    color = table.get("color")
    if color is not None:
        if classification is None:
            raise ValueError(f"{prefix}.color: needs plugin_settings.{NAME}.classification (the class it colours)")
        if (not isinstance(color, list | tuple) or len(color) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in color)):
            raise ValueError(f"{prefix}.color: expected [r, g, b] with integers 0..255, got {color!r}")
        color = tuple(color)
    elif classification is not None:
        color = default_color(classification)
    holes = table.get("holes", True)
    if not isinstance(holes, bool):
        raise ValueError(f"{prefix}.holes: expected true or false, got {holes!r}")  # noqa: TRY004
    pieces = table.get("pieces", "all")
    if pieces not in _PIECES:
        raise ValueError(f"{prefix}.pieces: expected one of {', '.join(map(repr, _PIECES))}, got {pieces!r}")
    return Settings(classification=classification, color=color, holes=holes, pieces=pieces)


def default_color(name: str) -> tuple[int, int, int]:
    """A stable colour for a class name (the same name always gets the same colour)."""
    value = zlib.crc32(name.encode("utf-8"))
    return (value >> 16) & 0xFF, (value >> 8) & 0xFF, value & 0xFF


# ---------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------


def _closed(ring: np.ndarray) -> list[list[int]]:
    coords = ring.tolist()
    coords.append(coords[0])
    return coords


def outline_geometry(outline: Outline, settings: Settings = Settings()) -> dict[str, Any]:
    """The GeoJSON geometry (a dict) of one outline, as the settings ask."""
    pieces = outline.pieces[:1] if settings.pieces == "largest" else outline.pieces
    if not settings.holes and len(pieces) > 1 and outline.n_holes:
        pieces = _outermost(pieces)
    polygons = [
        [_closed(shell), *(_closed(h) for h in holes)] if settings.holes else [_closed(shell)]
        for shell, holes in pieces
    ]
    if len(polygons) == 1:
        return {"type": "Polygon", "coordinates": polygons[0]}
    return {"type": "MultiPolygon", "coordinates": polygons}


def _outermost(pieces: list[tuple[np.ndarray, list[np.ndarray]]]) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """The pieces not lying inside another piece's outer ring (islands in a hole go with the hole)."""
    import shapely

    filled = [shapely.Polygon(shell) for shell, _ in pieces]
    # Pieces come largest first: a piece can only lie inside a larger one.
    return [piece for i, piece in enumerate(pieces) if not any(filled[j].covers(filled[i]) for j in range(i))]


def _shapely(geometry: dict[str, Any]) -> Any:
    import shapely

    if geometry["type"] == "Polygon":
        shell, *holes = geometry["coordinates"]
        return shapely.Polygon(shell, holes)
    return shapely.MultiPolygon([shapely.Polygon(shell, holes) for shell, *holes in geometry["coordinates"]])


def _plain(value: Any) -> Any:
    """Tuples to lists and integral floats to ints, for the repaired geometries' coordinates."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def repair(geometry: dict[str, Any], largest_only: bool = False) -> dict[str, Any]:
    """A valid (Multi)Polygon geometry covering the same area, from ``shapely.make_valid``."""
    import shapely
    from shapely.geometry import mapping

    fixed = shapely.make_valid(_shapely(geometry))
    parts = [p for p in shapely.get_parts(fixed) if p.geom_type in ("Polygon", "MultiPolygon")]
    polygons = [q for p in parts for q in shapely.get_parts(p)]
    polygons.sort(key=lambda p: -p.area)
    if largest_only:
        polygons = polygons[:1]
    if not polygons:
        raise ValueError(f"no polygon left after repairing {geometry['type']} geometry")
    out = polygons[0] if len(polygons) == 1 else shapely.MultiPolygon(polygons)
    fixed = mapping(out)
    return {"type": fixed["type"], "coordinates": _plain(fixed["coordinates"])}


def plane_features(labels: np.ndarray, t: int, z: int, settings: Settings = Settings()) -> tuple[list[dict], int]:
    """The GeoJSON features of one (Y, X) label plane, and how many geometries needed repair."""
    import shapely

    outlines = trace_outlines(labels)
    geometries = [outline_geometry(o, settings) for o in outlines]
    valid = np.asarray(shapely.is_valid(np.array([_shapely(g) for g in geometries], dtype=object)), bool)
    repaired = 0
    for i in np.flatnonzero(~valid):
        geometries[i] = repair(geometries[i], largest_only=settings.pieces == "largest")
        repaired += 1
    features = []
    for outline, geometry in zip(outlines, geometries, strict=True):
        properties: dict[str, Any] = {
            "objectType": "detection",
            "label": outline.label,
            "area_px": outline.area_px,
            "t": int(t),
            "z": int(z),
            "name": f"cell {outline.label}",
        }
        if settings.classification is not None:
            properties["classification"] = {"name": settings.classification, "color": list(settings.color or ())}
        features.append({"type": "Feature", "geometry": geometry, "properties": properties})
    return features, repaired


def _features(labels: Any, settings: Settings, counts: dict[str, int]) -> Iterator[dict[str, Any]]:
    for t, z in labels.planes:
        features, repaired = plane_features(labels.read_plane(t, z), t, z, settings)
        counts["repaired"] += repaired
        yield from features


# ---------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------


@hookimpl
def configure(config: Any) -> None:
    """Check ``[plugin_settings.geojson]`` at start: a bad value stops the daemon with its name."""
    settings_from_config(config)


@hookimpl
def export(labels: Any, context: Any) -> dict[str, Any]:
    """Write ``cells.geojson``: one feature per cell and plane, written as it is traced."""
    settings = settings_from_config(context.config)
    counts = {"features": 0, "repaired": 0}
    tmp = context.atomic_path(FILENAME)
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write('{"type":"FeatureCollection","features":[')
        for feature in _features(labels, settings, counts):
            handle.write(",\n" if counts["features"] else "\n")
            handle.write(json.dumps(feature, separators=(",", ":")))
            counts["features"] += 1
        handle.write("\n]}\n")
    return {"kind": NAME, "file": FILENAME, "features": counts["features"], "repaired": counts["repaired"]}
