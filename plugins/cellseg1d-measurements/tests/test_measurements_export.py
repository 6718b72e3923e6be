"""Tests of the cellseg1d-measurements plugin, through the real pipeline (cellseg1d.testing kit).

The plugin is loaded from its entry point (``enable=["measurements"]``), as the daemon loads it;
install it first: ``pip install -e plugins/cellseg1d-measurements``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from cellseg1d_measurements import (
    channel_columns,
    column_name,
    measure_plane,
    pixel_size_um,
    schema,
    settings_from_config,
)

from cellseg1d.errors import PluginError
from cellseg1d.hookspecs import hookimpl
from cellseg1d.testing import FixedSegmenter

PIXEL = 0.65  # the kit's pixel size, micrometres
STATS = ("mean", "max", "min", "integrated")


class PlaneSpy:
    """An export plugin keeping copies of the raw planes the export context reads."""

    __name__ = "plane-spy"

    def __init__(self) -> None:
        self.planes: dict[tuple[int, int], np.ndarray] = {}

    @hookimpl
    def export(self, labels, context):
        for t, z in labels.planes:
            self.planes[(t, z)] = np.array(context.read_image_plane(t, z))



def _tables(run) -> tuple[pa.Table, pa.Table]:
    return pq.read_table(run.exports["measurements.parquet"]), pa_csv.read_csv(run.exports["measurements.csv"])


def _pairs(run) -> list[tuple[int, int, int]]:
    """(label, t, z) of every label present in every plane of the label image."""
    out = []
    for t in range(run.labels.shape[0]):
        for z in range(run.labels.shape[1]):
            plane = run.labels[t, z]
            out += [(int(i), t, z) for i in np.unique(plane[plane > 0])]
    return out


# ---------------------------------------------------------------------------
# Every kind of image, NGFF 0.4 and 0.5
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["2d", "zstack", "timelapse", "plate"])
@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_one_row_per_cell_and_plane_with_exact_measures(synthetic_image, run_pipeline, kind, version):
    image = synthetic_image(kind, version)
    spy = PlaneSpy()
    run = run_pipeline(image, plugins=[spy], enable=["measurements"])
    table, csv_table = _tables(run)
    pairs = _pairs(run)
    assert len(pairs) >= 0.8 * image.n_cells * run.labels.shape[0] * run.labels.shape[1]

    # Explicit types: int64 label, int32 t/z, float64 measures; every channel measured.
    types = {f.name: str(f.type) for f in table.schema}
    assert types["label"] == "int64" and types["t"] == types["z"] == "int32" and types["area_px"] == "int64"
    assert all(types[c] == "double" for c in ("area_um2", "centroid_y", "eccentricity", "solidity",
                                              "perimeter", "perimeter_um"))
    channel_cols = [f"{stat}_{ch}" for ch in ("nuclei", "membrane") for stat in STATS]
    assert all(types[c] == "double" for c in channel_cols)
    assert table.schema == schema(["nuclei", "membrane"])

    rows = table.to_pylist()
    assert sorted((r["label"], r["t"], r["z"]) for r in rows) == sorted(pairs)
    assert csv_table.num_rows == table.num_rows and csv_table.column_names == table.column_names
    assert csv_table.column("label").to_pylist() == table.column("label").to_pylist()
    np.testing.assert_allclose(csv_table.column("mean_nuclei").to_numpy(), table.column("mean_nuclei").to_numpy())

    rng = np.random.default_rng(0)
    for (t, z), plane_rows in _by_plane(rows).items():
        plane = run.labels[t, z]
        counts = np.bincount(plane.ravel())
        for r in plane_rows:
            assert r["area_px"] == counts[r["label"]]
            assert r["area_um2"] == pytest.approx(r["area_px"] * PIXEL**2, rel=1e-12)
            assert r["perimeter_um"] == pytest.approx(r["perimeter"] * PIXEL, rel=1e-12)
            assert 0 <= r["eccentricity"] < 1 and 0 < r["solidity"] <= 1 and r["perimeter"] > 0
        raw = spy.planes[(t, z)].astype(np.float64)
        for r in rng.choice(plane_rows, size=min(3, len(plane_rows)), replace=False):
            mask = plane == r["label"]
            ys, xs = np.nonzero(mask)
            assert (r["bbox_min_y"], r["bbox_min_x"], r["bbox_max_y"], r["bbox_max_x"]) == (
                ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
            assert r["centroid_y"] == pytest.approx(ys.mean()) and r["centroid_x"] == pytest.approx(xs.mean())
            for c, ch in enumerate(("nuclei", "membrane")):
                values = raw[c][mask]
                assert r[f"mean_{ch}"] == pytest.approx(values.mean(), rel=1e-12)
                assert r[f"max_{ch}"] == values.max() and r[f"min_{ch}"] == values.min()
                assert r[f"integrated_{ch}"] == values.sum()

    record = run.record("measurements")
    areas = [r["area_px"] for r in rows]
    assert record == {
        "kind": "measurements",
        "files": ["measurements.parquet", "measurements.csv"],
        "rows": len(pairs),
        "cells": len({label for label, _, _ in pairs}),
        "mean_area_px": pytest.approx(np.mean(areas)),
        "mean_area_um2": pytest.approx(np.mean(areas) * PIXEL**2),
    }
    json.dumps(record)
    assert not [p for p in run.export_dir.rglob("*") if ".partial-" in p.name]


def _by_plane(rows: list[dict]) -> dict[tuple[int, int], list[dict]]:
    out: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        out.setdefault((r["t"], r["z"]), []).append(r)
    return out


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------


def test_intensity_off_and_one_format(synthetic_image, run_pipeline):
    image = synthetic_image("zstack")
    run = run_pipeline(image, enable=["measurements"], settings={"measurements": {"intensity": False}})
    table, csv_table = _tables(run)
    assert not [c for c in table.column_names if c.split("_")[0] in STATS]
    assert table.num_rows == csv_table.num_rows == len(_pairs(run))

    run = run_pipeline(synthetic_image("2d"), enable=["measurements"], settings={"measurements": {"formats": ["csv"]}})
    assert run.record("measurements")["files"] == ["measurements.csv"]
    assert "measurements.parquet" not in run.exports


def test_channel_selection(synthetic_image, run_pipeline):
    run = run_pipeline(synthetic_image("2d"), enable=["measurements"],
                       settings={"measurements": {"channels": ["membrane"], "formats": ["parquet"]}})
    columns = pq.read_table(run.exports["measurements.parquet"]).column_names
    assert [c for c in columns if c.split("_")[0] in STATS] == [f"{s}_membrane" for s in STATS]


@pytest.mark.parametrize("settings, key", [
    ({"intensity": "no"}, "plugin_settings.measurements.intensity"),
    ({"formats": ["xlsx"]}, "plugin_settings.measurements.formats"),
    ({"formats": []}, "plugin_settings.measurements.formats"),
    ({"formats": "csv"}, "plugin_settings.measurements.formats"),
    ({"channels": "nuclei"}, "plugin_settings.measurements.channels"),
    ({"colour": True}, "plugin_settings.measurements.colour: unknown setting"),
])
def test_a_bad_setting_is_refused_at_start(synthetic_image, run_pipeline, settings, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        run_pipeline(synthetic_image("2d", size=32), enable=["measurements"], settings={"measurements": settings})


def test_an_unknown_channel_fails_the_image_naming_the_plugin(synthetic_image, run_pipeline):
    image = synthetic_image("2d", size=32)
    with pytest.raises(PluginError) as info:
        run_pipeline(image, enable=["measurements"], settings={"measurements": {"channels": ["dapi"]}})
    assert info.value.plugin == "measurements" and "no channel named 'dapi'" in str(info.value)
    assert not (image.path / "labels" / "cellseg1d").exists()


def test_defaults():
    assert settings_from_config(SimpleNamespace(plugin_settings={})) == settings_from_config(
        SimpleNamespace(plugin_settings={"measurements": {"intensity": True, "formats": ["parquet", "csv"]}}))


# ---------------------------------------------------------------------------
# Physical units, channel names, empty images
# ---------------------------------------------------------------------------


def _set_units(image_path: Path, unit: str | None, factor: float) -> None:
    """Rewrite an NGFF 0.4 image's y/x unit and scale (as another writer would have written it)."""
    attrs_file = image_path / ".zattrs"
    attrs = json.loads(attrs_file.read_text())
    multiscale = attrs["multiscales"][0]
    for axis in multiscale["axes"]:
        if axis["name"] in ("y", "x"):
            if unit is None:
                axis.pop("unit", None)
            else:
                axis["unit"] = unit
    for dataset in multiscale["datasets"]:
        for transform in dataset["coordinateTransformations"]:
            if transform["type"] == "scale":
                transform["scale"] = transform["scale"][:-2] + [v * factor for v in transform["scale"][-2:]]
    attrs_file.write_text(json.dumps(attrs))


@pytest.mark.parametrize("unit, factor, um2_per_px", [
    ("nanometer", 1000.0, PIXEL**2),      # 650 nm pixels
    (None, 1.0, PIXEL**2),                # no unit: micrometres
    ("pixel", 1.0, None),                 # not a length unit: no physical area
])
def test_physical_area_follows_the_declared_unit(synthetic_image, run_pipeline, unit, factor, um2_per_px):
    image = synthetic_image("2d", "0.4")
    _set_units(image.path, unit, factor)
    run = run_pipeline(image, enable=["measurements"], settings={"measurements": {"intensity": False}})
    rows = pq.read_table(run.exports["measurements.parquet"]).to_pylist()
    assert rows
    record = run.record("measurements")
    if um2_per_px is None:
        assert all(r["area_um2"] is None and r["perimeter_um"] is None for r in rows)
        assert record["mean_area_um2"] is None
        assert pa_csv.read_csv(run.exports["measurements.csv"]).column("area_um2").null_count == len(rows)
    else:
        assert all(r["area_um2"] == pytest.approx(r["area_px"] * um2_per_px) for r in rows)
        assert record["mean_area_um2"] == pytest.approx(record["mean_area_px"] * um2_per_px)


def test_pixel_size_um_without_scale_and_in_millimetres():
    def image(scale, unit):
        axes = [{"name": "y", "type": "space", "unit": unit}, {"name": "x", "type": "space", "unit": unit}]
        transforms = [{"type": "scale", "scale": scale}] if scale else [{"type": "identity"}]
        return SimpleNamespace(levels=[SimpleNamespace(transforms=transforms)], axes=("y", "x"),
                               axes_metadata=axes)

    assert pixel_size_um(image(None, "micrometer")) is None
    assert pixel_size_um(image([0.001, 0.002], "millimeter")) == pytest.approx((1.0, 2.0))
    assert pixel_size_um(image([0.5, 0.5], "furlong")) is None


def test_channel_names_become_column_safe_identifiers():
    assert column_name("DAPI 405", 0) == "DAPI_405"
    assert column_name("GFP-2 (ex 488)", 1) == "GFP_2_ex_488"
    assert column_name("488nm", 2) == "ch488nm"
    assert column_name("???", 3) == "ch3"
    image = SimpleNamespace(n_channels=4, channel_names=["DAPI 405", "DAPI-405", "Ph", ], path="img.zarr")
    assert channel_columns(image, None) == [(0, "DAPI_405"), (1, "DAPI_405_1"), (2, "Ph"), (3, "ch3")]
    assert channel_columns(image, ["Ph", 0]) == [(2, "Ph"), (0, "DAPI_405")]
    with pytest.raises(ValueError, match="channel index 7 is out of range"):
        channel_columns(image, [7])


def test_an_empty_label_image_gives_empty_tables(synthetic_image, run_pipeline):
    image = synthetic_image("timelapse", size=32)
    run = run_pipeline(image, plugins=[FixedSegmenter(np.zeros((32, 32), np.uint32))], enable=["measurements"])
    table, csv_table = _tables(run)
    assert table.num_rows == csv_table.num_rows == 0
    assert table.schema == schema(["nuclei", "membrane"])
    assert run.record("measurements") == {"kind": "measurements", "files": ["measurements.parquet",
                                          "measurements.csv"], "rows": 0, "cells": 0,
                                          "mean_area_px": None, "mean_area_um2": None}


# ---------------------------------------------------------------------------
# measure_plane on hand-made labels (exact values)
# ---------------------------------------------------------------------------


def test_measure_plane_exact_values():
    labels = np.zeros((6, 8), np.uint32)
    labels[1:3, 1:4] = 5  # 2 x 3 block: area 6, centroid (1.5, 2.0), bbox (1, 1, 3, 4)
    labels[4, 6] = 9  # a single pixel
    labels[5, 0:2] = 7  # 1 x 2 block
    intensities = np.stack([np.arange(48, dtype=np.uint16).reshape(6, 8), np.full((6, 8), 3, np.uint16)])
    m = measure_plane(labels, intensities)
    assert m["label"].tolist() == [5, 7, 9]
    assert m["area_px"].tolist() == [6, 2, 1]
    assert m["centroid_y"].tolist() == [1.5, 5.0, 4.0]
    assert m["centroid_x"].tolist() == [2.0, 0.5, 6.0]
    assert [m[k].tolist() for k in ("bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x")] == [
        [1, 5, 4], [1, 0, 6], [3, 6, 5], [4, 2, 7]]
    assert m["solidity"].tolist() == [1.0, 1.0, 1.0]
    assert m["eccentricity"][2] == 0.0 and m["eccentricity"][1] == 1.0  # a pixel; a line
    flat = intensities[0].astype(float)
    for k, label in enumerate((5, 7, 9)):
        values = flat[labels == label]
        assert m["mean"][k, 0] == pytest.approx(values.mean())
        assert (m["max"][k, 0], m["min"][k, 0], m["integrated"][k, 0]) == (values.max(), values.min(), values.sum())
    assert m["mean"][:, 1].tolist() == [3.0, 3.0, 3.0] and m["integrated"][:, 1].tolist() == [18.0, 6.0, 3.0]


def test_measure_plane_sparse_huge_ids_offsets_and_empty():
    labels = np.zeros((4, 4), np.uint32)
    labels[0, 0:2] = 3
    labels[3, 3] = 4_000_000_000  # ids spanning more than the plane: the np.unique path
    m = measure_plane(labels)
    assert m["label"].tolist() == [3, 4_000_000_000] and m["area_px"].tolist() == [2, 1]
    assert "mean" not in m
    offset = np.where(labels == 3, 1_000_001, np.where(labels > 0, 1_000_003, 0)).astype(np.uint32)
    m = measure_plane(offset)  # offset ids with a gap, as in later planes of an image
    assert m["label"].tolist() == [1_000_001, 1_000_003] and m["area_px"].tolist() == [2, 1]
    empty = measure_plane(np.zeros((5, 5), np.uint16), np.zeros((2, 5, 5)))
    assert empty["label"].size == 0 and empty["mean"].shape == (0, 2)
