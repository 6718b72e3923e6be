"""The shipped plugins together in a real daemon on the demo data: measurements, geojson and webhook.

The demo's simulated microscope writes its acquisitions (plain images in NGFF
0.4 and 0.5 and an HCS plate) chunk by chunk into a watched folder; a
``cellseg1d run`` subprocess with the three plugins enabled processes them;
a local HTTP server receives the webhook. Every file is checked against the
label image the daemon published.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import zarr

from cellseg1d.cli.demo import Microscope, plan_acquisitions
from tests.helpers import done_images, wait_for

pytestmark = pytest.mark.slow


class Receiver(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver():
    Receiver.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def labels_of(image: Path) -> np.ndarray:
    """The published label image, full resolution, as (planes, y, x)."""
    data = np.asarray(zarr.open_array(str(image / "labels" / "cellseg1d" / "0"), mode="r"))
    return data.reshape(-1, *data.shape[-2:])


def export_dir(acq: Path, image: Path) -> Path:
    rel = image.relative_to(acq)
    container = acq / rel.parts[0]
    return container.parent / (container.name + ".cellseg1d") / Path(*rel.parts[1:])


def test_measurements_geojson_and_webhook_on_the_demo_data(tmp_path: Path, acquisition: Path, daemons,
                                                          receiver) -> None:
    import pyarrow.parquet as pq
    from shapely.geometry import shape

    acq = acquisition.resolve()
    state = tmp_path / "state"
    host, port = receiver.server_address[:2]
    config = tmp_path / "cellseg1d.toml"
    config.write_text(f'''state_dir = "{state}"
[[watch.roots]]
path = "{acq}"
[readiness]
settle_seconds = 1.0
[plugins]
enable = ["measurements", "geojson", "webhook"]
[plugin_settings.webhook]
url = "http://{host}:{port}/hook"
timeout_seconds = 5
''')
    daemons(state, "--config", str(config))
    acquisitions = plan_acquisitions(5, acq, settle_seconds=1.0)
    images = [img.path for a in acquisitions for img in a.images]
    microscope = Microscope(acquisitions, acq)
    microscope.start()
    wait_for(lambda: set(map(str, images)) <= done_images(state), 180, what="every demo image done")
    microscope.join(timeout=30)
    assert microscope.error is None

    for image in images:
        labels = labels_of(image)
        ids, counts = np.unique(labels[labels > 0], return_counts=True)
        n_labels = len(ids)
        assert n_labels > 0
        out = export_dir(acq, image)

        table = pq.read_table(out / "measurements.parquet").to_pylist()
        assert len(table) == n_labels, image  # one row per cell (each plane: these images have one)
        assert sorted(r["label"] for r in table) == ids.tolist()
        assert (out / "measurements.csv").read_text().count("\n") == n_labels + 1

        features = json.loads((out / "cells.geojson").read_text())["features"]
        assert len(features) == n_labels, image
        area_of = dict(zip(ids.tolist(), counts.tolist(), strict=True))
        for feature in features:
            polygon = shape(feature["geometry"])
            assert polygon.is_valid
            assert feature["properties"]["objectType"] == "detection"
            pixels = area_of[feature["properties"]["label"]]
            assert abs(polygon.area - pixels) <= 0.15 * pixels, (image, feature["properties"], polygon.area)

    wait_for(lambda: len(Receiver.received) >= len(images), 30, what="one webhook POST per image")
    posts = sorted(Receiver.received, key=lambda p: p["image_path"])
    assert [p["image_path"] for p in posts] == sorted(map(str, images))
    assert all(p["event"] == "image_done" and p["status"] == "done" and p["cell_count"] > 0 for p in posts)
