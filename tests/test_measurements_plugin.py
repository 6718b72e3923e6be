"""Tests of the cellseg1d-measurements plugin (plugins/cellseg1d-measurements).

The plugin must be installed in the test environment
(``pip install -e plugins/cellseg1d-measurements``): it is loaded through its
entry point exactly as the daemon loads it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from cellseg1d.config import Config, build_config
from cellseg1d.errors import PluginError
from cellseg1d.ngff.reader import open_image
from cellseg1d.pipeline import Pipeline, PipelineResult
from cellseg1d.plugins import build_plugin_manager
from cellseg1d.synthetic import make_czyx, write_ome_zarr
from tests.helpers import catalog_rows, done_images, jobs_for, wait_for

PIXEL_SIZE = 0.5


def _config(acquisition: Path, tmp_path: Path, **extra) -> Config:
    return build_config({
        "state_dir": str(tmp_path / "state"),
        "watch": {"roots": [{"path": str(acquisition)}]},
        "plugins": {"enable": ["measurements"]},
        **extra,
    })


def _run(config: Config, image: Path) -> PipelineResult:
    pm = build_plugin_manager(config.plugins.enable, config.plugins.disable)
    return Pipeline(config, pm).run(image, config.watch.roots[0], image)


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _label_planes(labels_path: str) -> dict[tuple[int, int], np.ndarray]:
    labels = open_image(Path(labels_path))
    return {(t, z): labels.read_plane(t, z, [0])[0] for t, z in labels.planes()}


# ---------------------------------------------------------------------------
# measure_plane on hand-made labels (exact values)
# ---------------------------------------------------------------------------


def test_measure_plane_exact_values() -> None:
    from cellseg1d_measurements import measure_plane

    labels = np.zeros((6, 8), np.uint32)
    labels[1:3, 1:4] = 5  # 2 x 3 block: area 6, centroid (1.5, 2.0), bbox (1, 1, 3, 4)
    labels[4, 6] = 9  # a single pixel
    labels[5, 0:2] = 7  # 1 x 2 block
    intensities = np.stack([
        np.arange(48, dtype=np.uint16).reshape(6, 8),
        np.full((6, 8), 3, np.uint16),
    ])
    m = measure_plane(labels, intensities)
    assert m["label"].tolist() == [5, 7, 9]
    assert m["area"].tolist() == [6, 2, 1]
    assert m["centroid_y"].tolist() == [1.5, 5.0, 4.0]
    assert m["centroid_x"].tolist() == [2.0, 0.5, 6.0]
    assert m["bbox"].tolist() == [[1, 1, 3, 4], [5, 0, 6, 2], [4, 6, 5, 7]]
    flat = intensities[0].astype(float)
    assert m["mean"][:, 0].tolist() == pytest.approx([
        flat[labels == 5].mean(), flat[labels == 7].mean(), flat[labels == 9].mean(),
    ])
    assert m["mean"][:, 1].tolist() == [3.0, 3.0, 3.0]


def test_measure_plane_sparse_huge_ids_and_empty() -> None:
    """Ids spanning more than the plane size take the np.unique path; same answers."""
    from cellseg1d_measurements import measure_plane

    labels = np.zeros((4, 4), np.uint32)
    labels[0, 0:2] = 3
    labels[3, 3] = 4_000_000_000
    m = measure_plane(labels)
    assert m["label"].tolist() == [3, 4_000_000_000]
    assert m["area"].tolist() == [2, 1]
    assert m["bbox"].tolist() == [[0, 0, 1, 2], [3, 3, 4, 4]]
    assert "mean" not in m

    empty = measure_plane(np.zeros((5, 5), np.uint16), np.zeros((2, 5, 5)))
    assert empty["label"].size == 0 and empty["mean"].shape == (0, 2)


# ---------------------------------------------------------------------------
# Through the pipeline: the plugin loaded from its entry point
# ---------------------------------------------------------------------------


def test_measurements_csv_matches_labels(tmp_path: Path, acquisition: Path, make_image) -> None:
    image, mask = make_image(acquisition / "cells.zarr", n_cells=12, pixel_size=PIXEL_SIZE)
    config = _config(acquisition, tmp_path)

    result = _run(config, image)

    csv_path = acquisition / "cells.zarr.cellseg1d" / "measurements.csv"
    assert csv_path.is_file()
    assert result.exports == [{"kind": "measurements", "path": str(csv_path), "objects": result.object_count}]
    header, rows = _read_csv(csv_path)
    assert header[:3] == ["label", "t", "z"]
    assert "mean_nuclei" in header and "mean_membrane" in header

    # One row per object, matching the published label image.
    assert result.object_count >= 10  # the classical segmenter finds (nearly) all 12 cells
    assert len(rows) == result.object_count
    planes = _label_planes(result.labels_path)
    labels = planes[(0, 0)]
    ids = np.unique(labels[labels > 0])
    assert sorted(int(r["label"]) for r in rows) == ids.tolist()
    areas = {int(r["label"]): int(r["area_pixels"]) for r in rows}
    assert sum(areas.values()) == int(np.count_nonzero(labels))
    for label_id in ids[:3]:
        assert areas[int(label_id)] == int(np.count_nonzero(labels == label_id))

    # Physical area from the image's scale (0.5 um pixels) and its unit.
    for r in rows:
        assert float(r["area_physical"]) == pytest.approx(int(r["area_pixels"]) * PIXEL_SIZE**2, abs=1e-6)
        assert r["area_unit"] == "micrometer^2"

    # Centroids and boxes lie on their object.
    for r in rows:
        label_id = int(r["label"])
        y0, x0, y1, x1 = (int(r[k]) for k in ("bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x"))
        ys, xs = np.nonzero(labels == label_id)
        assert (y0, x0, y1, x1) == (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
        assert float(r["centroid_y"]) == pytest.approx(ys.mean(), abs=1e-5)
        assert float(r["centroid_x"]) == pytest.approx(xs.mean(), abs=1e-5)

    # Nuclei are bright: every object is brighter than the background of the raw image.
    raw = open_image(image).read_plane(0, 0, [0, 1])
    background = float(raw[0][mask == 0].mean())
    means = [float(r["mean_nuclei"]) for r in rows]
    assert min(means) > background
    first = int(rows[0]["label"])
    assert float(rows[0]["mean_nuclei"]) == pytest.approx(float(raw[0][labels == first].mean()), abs=1e-4)
    assert float(rows[0]["mean_membrane"]) == pytest.approx(float(raw[1][labels == first].mean()), abs=1e-4)

    # Nothing temporary stays behind.
    assert not [p for p in acquisition.rglob("*") if ".partial-" in p.name]


def test_multi_plane_image_has_rows_for_every_plane(tmp_path: Path, acquisition: Path) -> None:
    data, _ = make_czyx((96, 96), 8, n_z=2, n_t=2, seed=3)
    image = write_ome_zarr(acquisition / "stack.zarr", data, axes="tczyx", channel_names=["nuclei", "nuclei"])
    config = _config(acquisition, tmp_path)

    result = _run(config, image)

    header, rows = _read_csv(acquisition / "stack.zarr.cellseg1d" / "measurements.csv")
    # A repeated channel name still gives distinct columns.
    assert header[-2:] == ["mean_nuclei", "mean_nuclei_1"]
    assert len(rows) == result.object_count == result.exports[0]["objects"]
    planes = _label_planes(result.labels_path)
    assert set(planes) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    for (t, z), labels in planes.items():
        plane_rows = [r for r in rows if (int(r["t"]), int(r["z"])) == (t, z)]
        assert plane_rows, f"no rows for plane t={t} z={z}"
        assert sorted(int(r["label"]) for r in plane_rows) == np.unique(labels[labels > 0]).tolist()
        assert sum(int(r["area_pixels"]) for r in plane_rows) == int(np.count_nonzero(labels))
    # Ids are unique across planes.
    assert len({r["label"] for r in rows}) == len(rows)


def test_intensity_off_and_channel_selection(tmp_path: Path, acquisition: Path, make_image) -> None:
    image, _ = make_image(acquisition / "cells.zarr")
    csv_path = acquisition / "cells.zarr.cellseg1d" / "measurements.csv"

    _run(_config(acquisition, tmp_path, plugin_settings={"measurements": {"intensity": False}}), image)
    header, rows = _read_csv(csv_path)
    assert rows and not [h for h in header if h.startswith("mean_")]

    _run(_config(acquisition, tmp_path, plugin_settings={"measurements": {"channels": ["membrane"]}}), image)
    header, rows = _read_csv(csv_path)
    assert rows and [h for h in header if h.startswith("mean_")] == ["mean_membrane"]


@pytest.mark.parametrize("settings, message", [
    ({"intensity": "no"}, "plugin_settings.measurements.intensity"),
    ({"colour": True}, "plugin_settings.measurements.colour: unknown setting"),
    ({"channels": ["dapi"]}, "no channel named 'dapi'"),
])
def test_bad_settings_fail_the_image_naming_the_plugin(
    tmp_path: Path, acquisition: Path, make_image, settings: dict, message: str,
) -> None:
    image, _ = make_image(acquisition / "cells.zarr")
    config = _config(acquisition, tmp_path, plugin_settings={"measurements": settings})

    with pytest.raises(PluginError) as info:
        _run(config, image)

    assert info.value.plugin == "measurements"
    assert info.value.hook == "export"
    assert message in str(info.value)
    assert not (image / "labels" / "cellseg1d").exists()
    assert not (acquisition / "cells.zarr.cellseg1d" / "measurements.csv").exists()


# ---------------------------------------------------------------------------
# End to end: the daemon subprocess loads the plugin from its config file
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_daemon_writes_measurements_and_records_them(tmp_path: Path, acquisition: Path, make_image, daemons) -> None:
    state = tmp_path / "state"
    config_file = tmp_path / "cellseg1d.toml"
    config_file.write_text(
        f"state_dir = {json.dumps(str(state))}\n"
        "[[watch.roots]]\n"
        f"path = {json.dumps(str(acquisition))}\n"
        "[readiness]\n"
        "settle_seconds = 0.5\n"
        "[plugins]\n"
        'enable = ["measurements"]\n'
    )
    daemon = daemons(state, "--config", str(config_file))
    assert "measurements" in daemon.log()  # the start-up line lists the loaded plugins

    image, _ = make_image(acquisition / "cells.zarr")
    path = str(image.resolve())
    wait_for(lambda: path in done_images(state), 90, what=f"{path} done\n{daemon.log()}")

    csv_path = acquisition / "cells.zarr.cellseg1d" / "measurements.csv"
    assert csv_path.is_file()
    _, rows = _read_csv(csv_path)
    (exports_json, object_count), = catalog_rows(
        state,
        "SELECT results.exports, results.object_count FROM results "
        "JOIN images ON images.id = results.image_id WHERE images.path = ?",
        (path,),
    )
    exports = json.loads(exports_json)
    assert {"kind": "measurements", "path": str(csv_path), "objects": object_count} in exports["records"]
    assert len(rows) == object_count > 0
    assert jobs_for(state, path)[-1][0] == "done"
    assert daemon.stop() == 0
