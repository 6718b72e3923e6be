"""Tests of the cellseg1d-geojson plugin, through the real pipeline (cellseg1d.testing kit).

The plugin is loaded from its entry point (``enable=["geojson"]``), as the daemon loads it;
install it first: ``pip install -e plugins/cellseg1d-geojson``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
from cellseg1d_geojson import Settings, default_color, plane_features, repair
from cellseg1d_geojson.outline import trace_outlines
from scipy import ndimage as ndi

from cellseg1d.testing import FixedSegmenter

KEYS = {"objectType", "label", "area_px", "t", "z", "name"}



def _geometry(feature: dict) -> shapely.Geometry:
    return shapely.geometry.shape(feature["geometry"])


def _collection(run) -> dict:
    text = run.exports["cells.geojson"].read_text(encoding="utf-8")
    data = json.loads(text)
    assert data["type"] == "FeatureCollection"
    return data


def _rings(geometry: dict) -> list[list[list[int]]]:
    polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    return [ring for polygon in polygons for ring in polygon]


def _check_covers_exactly(geom: shapely.Geometry, mask: np.ndarray, rng: np.random.Generator, n: int = 40) -> None:
    """Centres of the mask's pixels lie inside; centres of other pixels in its box lie outside."""
    ys, xs = np.nonzero(mask)
    pick = rng.choice(ys.size, size=min(n, ys.size), replace=False)
    assert shapely.contains(geom, shapely.points(xs[pick] + 0.5, ys[pick] + 0.5)).all()
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    by, bx = np.nonzero(~mask[y0:y1, x0:x1])
    if by.size:
        pick = rng.choice(by.size, size=min(n, by.size), replace=False)
        outside = shapely.points(bx[pick] + x0 + 0.5, by[pick] + y0 + 0.5)
        assert not shapely.intersects(geom, outside).any()


def _check_features(run, features: list[dict], rng: np.random.Generator, *, exact: bool = True) -> None:
    by_plane: dict[tuple[int, int], list[dict]] = {}
    for feature in features:
        assert feature["type"] == "Feature"
        props = feature["properties"]
        assert KEYS <= set(props)
        assert props["objectType"] == "detection" and props["name"] == f"cell {props['label']}"
        assert all(isinstance(props[k], int) for k in ("label", "area_px", "t", "z"))
        by_plane.setdefault((props["t"], props["z"]), []).append(feature)
    n_t, n_z = run.labels.shape[:2]
    for t in range(n_t):
        for z in range(n_z):
            plane = run.labels[t, z]
            ids = np.unique(plane[plane > 0])
            found = by_plane.pop((t, z), [])
            assert sorted(f["properties"]["label"] for f in found) == ids.tolist()
            counts = np.bincount(plane.ravel())
            for feature in found:
                label = feature["properties"]["label"]
                mask = plane == label
                assert feature["properties"]["area_px"] == counts[label]
                for ring in _rings(feature["geometry"]):
                    assert len(ring) >= 5 and ring[0] == ring[-1]
                    assert all(isinstance(v, int) for xy in ring for v in xy)
                geom = _geometry(feature)
                assert geom.is_valid, shapely.is_valid_reason(geom)
                if exact:  # holes kept: the polygon is the cell's pixels, whatever its shape
                    assert geom.area == counts[label]
                    _check_covers_exactly(geom, mask, rng)
    assert not by_plane, f"features of planes without labels: {sorted(by_plane)}"


# ---------------------------------------------------------------------------
# Real images of every kind, the plugin from its entry point
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["2d", "zstack", "timelapse", "plate"])
@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_one_valid_exact_polygon_per_cell_and_plane(synthetic_image, run_pipeline, kind, version):
    image = synthetic_image(kind, version)
    run = run_pipeline(image, enable=["geojson"])
    data = _collection(run)
    features = data["features"]
    n_pairs = sum(len(np.unique(p[p > 0])) for p in run.labels.reshape(-1, *run.labels.shape[2:]))
    assert len(features) == n_pairs >= image.n_cells * 0.8 * run.labels.shape[0] * run.labels.shape[1]
    _check_features(run, features, np.random.default_rng(0))
    # Outer rings counter-clockwise, holes clockwise (GeoJSON's right-hand rule).
    for feature in features:
        geom = _geometry(feature)
        for polygon in shapely.get_parts(geom):
            assert polygon.exterior.is_ccw
            assert not any(hole.is_ccw for hole in polygon.interiors)
    assert run.record("geojson") == {"kind": "geojson", "file": "cells.geojson", "features": n_pairs, "repaired": 0}
    assert "classification" not in features[0]["properties"]


# ---------------------------------------------------------------------------
# Hand-made shapes through the pipeline
# ---------------------------------------------------------------------------


def _shapes(size: int = 64) -> tuple[np.ndarray, dict[str, int]]:
    labels = np.zeros((size, size), np.uint32)
    labels[2:10, 2:12] = 1  # a rectangle
    labels[14:24, 2:12] = 2  # a ring with a 4 x 4 hole
    labels[17:21, 5:9] = 0
    labels[2:6, 20:24] = 3  # two pieces
    labels[12:15, 26:30] = 3
    labels[30, 30] = 4  # two pixels touching at a corner only: two pieces
    labels[31, 31] = 4
    # a frame whose top-left corner is missing: its two ends touch at a corner
    labels[40:48, 2:10] = 5
    labels[41:47, 3:9] = 0
    labels[40, 2] = 0
    # a frame with an island of the same cell in its hole
    labels[40:52, 20:32] = 6
    labels[42:50, 22:30] = 0
    labels[45:47, 25:27] = 6
    labels[56:60, 40:44] = 7  # an L touching the image's border
    labels[56:64, 40:42] = 7
    names = {"rectangle": 1, "ring": 2, "two pieces": 3, "corner pieces": 4, "open frame": 5,
             "island": 6, "border": 7}
    return labels, names


def _by_label(data: dict) -> dict[int, dict]:
    return {f["properties"]["label"]: f for f in data["features"]}


def test_holes_pieces_and_corners(synthetic_image, run_pipeline):
    labels, names = _shapes()
    image = synthetic_image("2d", size=64)
    run = run_pipeline(image, plugins=[FixedSegmenter(labels)], enable=["geojson"])
    assert (run.labels[0, 0] == labels).all()
    features = _by_label(_collection(run))
    _check_features(run, list(features.values()), np.random.default_rng(1))

    rect = features[names["rectangle"]]["geometry"]
    assert rect == {"type": "Polygon", "coordinates": [[[2, 2], [12, 2], [12, 10], [2, 10], [2, 2]]]}

    ring = _geometry(features[names["ring"]])
    assert ring.geom_type == "Polygon" and len(ring.interiors) == 1
    assert shapely.Polygon(ring.interiors[0]).area == 16 and ring.area == 100 - 16

    two = features[names["two pieces"]]["geometry"]
    assert two["type"] == "MultiPolygon" and len(two["coordinates"]) == 2
    assert [shapely.Polygon(p[0]).area for p in two["coordinates"]] == [16, 12]  # largest first

    corner = _geometry(features[names["corner pieces"]])
    assert corner.geom_type == "MultiPolygon" and len(corner.geoms) == 2 and corner.area == 2

    frame = _geometry(features[names["open frame"]])  # one piece, its hole touching the outside at a point
    assert frame.geom_type == "Polygon" and len(frame.interiors) == 1 and frame.is_valid

    island = _geometry(features[names["island"]])
    assert island.geom_type == "MultiPolygon" and [len(p.interiors) for p in island.geoms] == [1, 0]
    assert island.area == (labels == names["island"]).sum()

    assert run.record("geojson")["repaired"] == 0


def test_holes_false_and_largest_piece(synthetic_image, run_pipeline):
    labels, names = _shapes()
    image = synthetic_image("2d", size=64)
    run = run_pipeline(image, plugins=[FixedSegmenter(labels)], enable=["geojson"],
                       settings={"geojson": {"holes": False, "pieces": "largest"}})
    features = _by_label(_collection(run))
    for label, feature in features.items():
        geometry = feature["geometry"]
        assert geometry["type"] == "Polygon" and len(geometry["coordinates"]) == 1
        mask = labels == label
        biggest = ndi.label(mask)[0]
        biggest = biggest == np.argmax(np.bincount(biggest.ravel())[1:]) + 1
        assert _geometry(feature).area == ndi.binary_fill_holes(biggest).sum()
        assert feature["properties"]["area_px"] == mask.sum()  # the cell's pixels, whatever is drawn
    _check_features(run, list(features.values()), np.random.default_rng(2), exact=False)  # areas checked above

    # holes = false with every piece: an island in the hole goes with the filled outer piece.
    run = run_pipeline(image, plugins=[FixedSegmenter(labels)], enable=["geojson"],
                       settings={"geojson": {"holes": False}})
    features = _by_label(_collection(run))
    island = features[names["island"]]["geometry"]
    assert island["type"] == "Polygon" and _geometry(features[names["island"]]).area == 144
    assert features[names["two pieces"]]["geometry"]["type"] == "MultiPolygon"
    assert run.record("geojson")["repaired"] == 0


def test_an_empty_label_image_gives_an_empty_collection(synthetic_image, run_pipeline):
    image = synthetic_image("zstack", size=32)
    run = run_pipeline(image, plugins=[FixedSegmenter(np.zeros((32, 32), np.uint32))], enable=["geojson"])
    assert json.loads(run.exports["cells.geojson"].read_text()) == {"type": "FeatureCollection", "features": []}
    assert run.record("geojson") == {"kind": "geojson", "file": "cells.geojson", "features": 0, "repaired": 0}


def test_classification_for_qupath(synthetic_image, run_pipeline):
    image = synthetic_image("2d")
    run = run_pipeline(image, enable=["geojson"], settings={"geojson": {"classification": "Cell"}})
    props = [f["properties"] for f in _collection(run)["features"]]
    assert props and all(p["classification"] == {"name": "Cell", "color": list(default_color("Cell"))}
                         for p in props)
    run = run_pipeline(image, enable=["geojson"],
                       settings={"geojson": {"classification": "Tumor", "color": [200, 0, 10]}})
    assert _collection(run)["features"][0]["properties"]["classification"] == {"name": "Tumor",
                                                                              "color": [200, 0, 10]}


@pytest.mark.parametrize("settings, key", [
    ({"holes": "no"}, "plugin_settings.geojson.holes"),
    ({"pieces": "biggest"}, "plugin_settings.geojson.pieces"),
    ({"classification": ""}, "plugin_settings.geojson.classification"),
    ({"classification": "Cell", "color": [300, 0, 0]}, "plugin_settings.geojson.color"),
    ({"color": [1, 2, 3]}, "plugin_settings.geojson.color"),
    ({"outline": True}, "plugin_settings.geojson.outline: unknown setting"),
])
def test_a_bad_setting_is_refused_at_start(synthetic_image, run_pipeline, settings, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        run_pipeline(synthetic_image("2d", size=32), enable=["geojson"], settings={"geojson": settings})


# ---------------------------------------------------------------------------
# The tracer on its own: exact and valid on noise, so repairs are (almost) never needed
# ---------------------------------------------------------------------------


def test_random_masks_trace_exactly_without_repair():
    rng = np.random.default_rng(7)
    outlines = 0
    for _ in range(200):
        density = rng.uniform(0.3, 0.75)
        plane = ((rng.random((24, 24)) < density) * rng.integers(1, 4, (24, 24))).astype(np.uint16)
        features, repaired = plane_features(plane, 0, 0)
        assert repaired == 0
        counts = np.bincount(plane.ravel())
        assert [f["properties"]["label"] for f in features] == (np.flatnonzero(counts[1:]) + 1).tolist()
        for feature in features:
            geom = _geometry(feature)
            assert geom.is_valid and geom.area == counts[feature["properties"]["label"]]
        outlines += len(features)
    assert outlines > 400


def test_outlines_of_a_blank_plane_and_of_large_ids():
    assert trace_outlines(np.zeros((8, 8), np.uint32)) == []
    assert plane_features(np.zeros((8, 8), np.uint32), 0, 0) == ([], 0)
    plane = np.zeros((4, 5), np.uint64)
    plane[1:3, 1:4] = 2**40
    (outline,) = trace_outlines(plane)
    assert outline.label == 2**40 and outline.area_px == 6
    assert outline.pieces[0][0].tolist() == [[1, 1], [4, 1], [4, 3], [1, 3]]


def test_repair_is_the_fallback_for_an_invalid_geometry():
    # A ring touching itself at (2, 2): the shape the tracer avoids, as some tools write it.
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [2, 0], [2, 2], [4, 2], [4, 4], [2, 4], [2, 2],
                                                   [0, 2], [0, 0]]]}
    assert not _geometry({"geometry": bowtie}).is_valid
    fixed = repair(bowtie)
    geom = shapely.geometry.shape(fixed)
    assert geom.is_valid and geom.area == 8 and fixed["type"] == "MultiPolygon"
    assert all(isinstance(v, int) for ring in _rings(fixed) for xy in ring for v in xy)
    largest = repair(bowtie, largest_only=True)
    assert largest["type"] == "Polygon" and shapely.geometry.shape(largest).area == 4


def test_default_settings():
    assert Settings() == Settings(classification=None, color=None, holes=True, pieces="all")
