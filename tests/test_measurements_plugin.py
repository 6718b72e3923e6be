"""The cellseg1d-measurements plugin in a daemon subprocess: loaded from its config, recorded in the catalog.

The plugin's own tests (every image kind, the measures, the settings) are in
``plugins/cellseg1d-measurements/tests``; this one checks the daemon side: the
start-up line, the files published beside the image and the export record in
the catalog's result row. The plugin must be installed
(``pip install -e plugins/cellseg1d-measurements``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.helpers import catalog_rows, done_images, jobs_for, wait_for


@pytest.mark.slow
def test_daemon_writes_measurements_and_records_them(tmp_path: Path, acquisition: Path, make_image, daemons) -> None:
    import pyarrow.parquet as pq

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

    out = acquisition / "cells.zarr.cellseg1d"
    with open(out / "measurements.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    table = pq.read_table(out / "measurements.parquet")
    (exports_json, object_count), = catalog_rows(
        state,
        "SELECT results.exports, results.object_count FROM results "
        "JOIN images ON images.id = results.image_id WHERE images.path = ?",
        (path,),
    )
    (record,) = [r for r in json.loads(exports_json)["records"] if r.get("kind") == "measurements"]
    assert record["files"] == ["measurements.parquet", "measurements.csv"]
    assert record["rows"] == record["cells"] == len(rows) == table.num_rows == object_count > 0
    assert record["mean_area_px"] == pytest.approx(sum(table.column("area_px").to_pylist()) / object_count)
    assert record["mean_area_um2"] is not None
    assert jobs_for(state, path)[-1][0] == "done"
    assert daemon.stop() == 0
