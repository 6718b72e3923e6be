"""The daemon as a systemd service: notify protocol, watchdog, reload, drain, JSON logs, metrics.

Every test runs ``cellseg1d run`` as a real subprocess. systemd is played by a
datagram socket the test binds and passes as ``NOTIFY_SOCKET``.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cellseg1d.testing.synthetic import make_czyx, write_ome_zarr
from tests import badinput
from tests.helpers import catalog_rows, done_images, image_status, jobs_for, wait_for

pytestmark = pytest.mark.slow


class FakeSystemd:
    """A bound AF_UNIX datagram socket that records every notification with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._halt.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def first(self, key: str, value: str | None = None, after: float = 0.0) -> float | None:
        """Arrival time of the first message after ``after`` that sets ``key`` (to ``value``)."""
        for when, fields in list(self.messages):
            if when > after and key in fields and (value is None or fields[key] == value):
                return when
        return None

    def times(self, key: str) -> list[float]:
        return [when for when, fields in list(self.messages) if key in fields]

    def close(self) -> None:
        self._halt.set()
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(tmp_path / "notify.sock")
    yield fake
    fake.close()


def write_config(path: Path, state: Path, roots: list[Path], extra: str = "") -> Path:
    body = f'state_dir = "{state}"\n{extra}\n[readiness]\nsettle_seconds = 0.5\n'
    body += "".join(f'[[watch.roots]]\npath = "{r}"\n' for r in roots)
    path.write_text(body)
    return path


def image(folder: Path, name: str, seed: int = 0, n_z: int = 1) -> Path:
    """A small synthetic image written elsewhere and moved in whole."""
    staging = folder.parent / f".staging-{name}"
    data, _ = make_czyx((96, 96), 8, n_z=n_z, seed=seed)
    write_ome_zarr(staging, data[0], axes="czyx", ngff_version="0.5", channel_names=["nuclei", "membrane"],
                   n_levels=1)
    return Path(shutil.move(str(staging), folder / name))


def test_notify_protocol_ready_status_watchdog_reload_stopping(
        tmp_path: Path, acquisition: Path, daemons, systemd: FakeSystemd) -> None:
    state = tmp_path / "state"
    config = write_config(tmp_path / "cellseg1d.toml", state, [acquisition])
    d = daemons(state, "--config", str(config),
                env={"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "1000000"})
    ready = wait_for(lambda: systemd.first("READY", "1"), 30, what="READY=1")
    # READY comes after the catalog is migrated and the watches are up (both logged before it).
    log = d.log()
    assert "watching 1 folder(s)" in log
    assert catalog_rows(state, "SELECT version_num FROM alembic_version")
    ready_fields = next(f for t, f in systemd.messages if t == ready)
    assert ready_fields.get("STATUS", "").startswith("watching 1 root, 0 queued, 0 running")
    assert not [f for _, f in systemd.messages if "STOPPING" in f]

    # Watchdog pings at half of WATCHDOG_USEC (1 s) from the scheduler loop.
    time.sleep(4.0)
    pings = [t for t in systemd.times("WATCHDOG") if t >= ready]
    assert 6 <= len(pings) <= 10, len(pings)
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    assert max(gaps) < 1.0, gaps  # never close to the watchdog timeout

    # An image: STATUS lines keep coming (every few seconds) and say what is happening.
    img = image(acquisition, "a.zarr")
    wait_for(lambda: str(img) in done_images(state), 60, what="image done")
    wait_for(lambda: len([f for _, f in systemd.messages if "STATUS" in f]) >= 2, 15, what="a STATUS update")

    # SIGHUP: RELOADING=1 (with MONOTONIC_USEC), then READY=1 again.
    hup = time.monotonic()
    d.proc.send_signal(signal.SIGHUP)
    reloading = wait_for(lambda: systemd.first("RELOADING", "1", after=hup), 15, what="RELOADING=1")
    reload_fields = next(f for t, f in systemd.messages if t == reloading)
    assert int(reload_fields["MONOTONIC_USEC"]) > 0
    ready_again = wait_for(lambda: systemd.first("READY", "1", after=reloading), 15, what="READY=1 after reload")
    assert "configuration reloaded" in d.log()

    # SIGTERM: STOPPING=1, then a clean exit.
    assert d.stop() == 0
    stopping = systemd.first("STOPPING", "1")
    assert stopping is not None and stopping > ready_again
    assert [j[0] for j in jobs_for(state, str(img))] == ["done"]


def test_no_notify_socket_no_notifications_and_no_errors(tmp_path: Path, acquisition: Path, daemons) -> None:
    state = tmp_path / "state"
    d = daemons(state, "--watch", str(acquisition), "--settle-seconds", "0.5",
                env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock"), "WATCHDOG_USEC": "400000"})
    img = image(acquisition, "a.zarr")
    wait_for(lambda: str(img) in done_images(state), 60, what="image done")
    assert d.stop() == 0
    # One warning about the unreachable socket, not one per message.
    assert d.log().count("cannot notify systemd") == 1, d.log()


def test_sighup_adds_and_removes_roots_and_refuses_a_bad_config(tmp_path: Path, daemons) -> None:
    state = tmp_path / "state"
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    config = write_config(tmp_path / "cellseg1d.toml", state, [a])
    d = daemons(state, "--config", str(config))
    first = image(a, "first.zarr", seed=1)
    wait_for(lambda: str(first) in done_images(state), 60, what="image in a done")
    waiting = image(b, "waiting.zarr", seed=2)
    time.sleep(2.0)
    assert str(waiting) not in image_status(state)  # b is not watched yet

    write_config(config, state, [a, b])
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: str(waiting) in done_images(state), 60, what="image in the added root done")
    later = image(b, "later.zarr", seed=3)
    wait_for(lambda: str(later) in done_images(state), 60, what="new image in the added root done")
    assert "added [" in d.log()

    # A config with an error is refused; the running one (a and b) is kept.
    config.write_text(config.read_text() + "\n[readiness\nbroken = \n")
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration reload refused" in d.log(), 15, what="refusal logged")
    assert "is not valid TOML" in d.log()
    after_bad = image(b, "after-bad.zarr", seed=4)
    wait_for(lambda: str(after_bad) in done_images(state), 60, what="image after a refused reload done")

    # A root removed: its new images are no longer picked up.
    write_config(config, state, [a])
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "removed [" in d.log(), 15, what="root removal logged")
    ignored = image(b, "ignored.zarr", seed=5)
    still = image(a, "still.zarr", seed=6)
    wait_for(lambda: str(still) in done_images(state), 60, what="image in the kept root done")
    time.sleep(1.5)
    assert str(ignored) not in image_status(state)

    # Nothing was processed twice across the reloads.
    for path in (first, waiting, later, after_bad, still):
        assert [j[0] for j in jobs_for(state, str(path))] == ["done"], path
    assert d.alive()
    assert d.stop() == 0


def test_sigterm_drains_then_releases_unfinished_jobs(tmp_path: Path, acquisition: Path, daemons) -> None:
    state = tmp_path / "state"
    config = write_config(tmp_path / "cellseg1d.toml", state, [acquisition], "shutdown_timeout_seconds = 1")
    d = daemons(state, "--config", str(config))
    big = image(acquisition, "big.zarr", seed=3, n_z=400)
    wait_for(lambda: f"processing {big}" in d.log(), 60, interval=0.05, what="big image started")
    time.sleep(0.3)
    stopped = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=60) == 0
    took = time.monotonic() - stopped
    log = d.log()
    assert "shutdown_timeout_seconds (1 s) passed" in log, log[-3000:]
    assert "released job" in log
    assert took < 15, took
    assert [j[0] for j in jobs_for(state, str(big))] == ["queued"]
    assert not (big / "labels" / "cellseg1d").exists()  # nothing partial published
    # The next start finishes it.
    daemons(state, "--config", str(config))
    wait_for(lambda: str(big) in done_images(state), 240, what="big image done after restart")


def test_json_log_lines_carry_image_and_job(tmp_path: Path, acquisition: Path, daemons) -> None:
    state = tmp_path / "state"
    d = daemons(state, "--watch", str(acquisition), "--settle-seconds", "0.5", "--log-format", "json")
    img = image(acquisition, "a.zarr")
    bad = badinput.deep_json(acquisition, "0.5")
    wait_for(lambda: str(img) in done_images(state) and image_status(state).get(str(bad.path)) == "failed", 60,
             what="image done and bad one recorded")
    assert d.stop() == 0
    lines = [json.loads(line) for line in d.log().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(rec) for rec in lines)
    (job,) = [j for (j,) in catalog_rows(state, "SELECT jobs.id FROM jobs JOIN images ON images.id = jobs.image_id "
                                                "WHERE images.path = ?", (str(img),))]
    about = [rec for rec in lines if str(img) in rec["message"]]
    assert len(about) >= 3  # queued, processing, done
    for rec in about:
        assert rec.get("image") == str(img) and rec.get("job") == job, rec
    rejected = [rec for rec in lines if str(bad.path) in rec["message"]]
    assert rejected and all(rec.get("image") == str(bad.path) for rec in rejected)


def _metrics(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def test_metrics_and_health_during_a_run_agree_with_status(tmp_path: Path, acquisition: Path, daemons) -> None:
    import subprocess
    import sys

    state = tmp_path / "state"
    d = daemons(state, "--watch", str(acquisition), "--settle-seconds", "0.5", "--metrics", "127.0.0.1:0")
    url = re.search(r"metrics on (http://[^/\s]+)/metrics", d.log()).group(1)
    with urllib.request.urlopen(url + "/healthz", timeout=10) as resp:
        assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
    images = [image(acquisition, f"m{i}.zarr", seed=i) for i in range(3)]
    bad = badinput.deep_json(acquisition, "0.4")
    wait_for(lambda: all(str(p) in done_images(state) for p in images)
             and image_status(state).get(str(bad.path)) == "failed", 60, what="images done")
    values = _metrics(url)
    status = json.loads(subprocess.run(
        [sys.executable, "-m", "cellseg1d", "status", "--state-dir", str(state), "--json"],
        capture_output=True, text=True, check=True).stdout)
    for state_name in ("held", "queued", "running", "failed", "quarantined", "done"):
        assert values[f"cellseg1d_jobs{{state={state_name}}}"] == status["jobs"].get(state_name, 0), state_name
    assert values["cellseg1d_images_processed_total"] == status["images_processed"] == 3
    assert values["cellseg1d_bad_inputs_total"] == status["bad_inputs"] == 1
    assert values["cellseg1d_queue_depth"] == status["queue_depth"] == 0
    assert values["cellseg1d_job_duration_seconds_count{outcome=done}"] == 3
    assert any(k.startswith("cellseg1d_build_info") for k in values)
    assert d.stop() == 0


def test_the_daemon_serves_the_dashboard(tmp_path: Path, acquisition: Path, daemons) -> None:
    """``[dashboard] address`` (``run --dashboard``): the daemon serves the read-only pages while it works."""
    state = tmp_path / "state"
    d = daemons(state, "--watch", str(acquisition), "--settle-seconds", "0.5", "--dashboard", "127.0.0.1:0")
    url = re.search(r"dashboard on (http://[^/\s]+)", d.log()).group(1)
    done = image(acquisition, "d0.zarr", seed=4)
    wait_for(lambda: str(done) in done_images(state), 60, what="image done")
    with urllib.request.urlopen(url + "/images?status=done", timeout=10) as resp:
        assert resp.status == 200 and "d0.zarr" in resp.read().decode()
    assert d.stop() == 0
    assert "dashboard on" in d.log() and "Traceback" not in d.log()
