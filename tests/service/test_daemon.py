"""The daemon as a real subprocess on real folders: readiness, markers, restart, shutdown."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import zarr

from cellseg1d.model.metrics import average_precision
from cellseg1d.testing.synthetic import make_czyx, write_ome_zarr
from tests.helpers import REPO, catalog_rows, done_images, image_status, jobs_for, wait_for

pytestmark = pytest.mark.slow
SETTLE = 1.5


def started_at(state: Path, path: Path) -> float:
    (value,) = catalog_rows(
        state, "SELECT jobs.started_at FROM jobs JOIN images ON images.id = jobs.image_id "
        "WHERE images.path = ? AND jobs.state = 'done'", (str(path),))[0]
    return datetime.fromisoformat(value).replace(tzinfo=UTC).timestamp()


def labels_level0(image: Path) -> np.ndarray:
    return np.asarray(zarr.open_array(str(image / "labels" / "cellseg1d" / "0"), mode="r"))


def test_slow_writer_processed_once_after_settle(tmp_path: Path, acquisition: Path, daemons) -> None:
    state = tmp_path / "state"
    daemon = daemons(state, "--watch", str(acquisition), "--settle-seconds", str(SETTLE))
    data, mask = make_czyx((256, 256), 20, seed=5)
    image = acquisition / "slow image.zarr"  # spaces in names are fine
    last_write = [0.0]

    def chunk_written() -> None:
        last_write[0] = time.time()

    # 16 chunks with pauses shorter than the settle time: must not be processed early
    write_ome_zarr(image, data[0], axes="czyx", chunks=(1, 1, 64, 64), pause=SETTLE / 3,
                   channel_names=["nuclei", "membrane"], on_chunk=chunk_written)
    last_write[0] = max(last_write[0], max(p.stat().st_mtime for p in image.rglob("*") if p.is_file()))
    wait_for(lambda: str(image) in done_images(state), 60, what="image processed")
    assert started_at(state, image) >= last_write[0] + SETTLE - 0.25
    labels = labels_level0(image)[0]
    ap = average_precision(labels, mask, thresholds=(0.5,))[0].ap
    # The classical segmenter on these well-separated synthetic cells scores ~1.0;
    # 0.8 leaves room for noise while still failing on any broken plane or axis handling.
    assert ap >= 0.8, f"AP@0.5 {ap}"
    time.sleep(SETTLE + 1)
    assert [j[0] for j in jobs_for(state, str(image))] == ["done"]
    assert daemon.stop() == 0
    assert "stopped" in daemon.log()


def test_time_lapse_with_long_pauses_waits_for_missing_chunks(tmp_path: Path, acquisition: Path, daemons) -> None:
    """Pauses longer than the settle time (a time-lapse) must not produce a half result."""
    state = tmp_path / "state"
    daemons(state, "--watch", str(acquisition), "--settle-seconds", "0.5")
    data, mask = make_czyx((128, 128), 10, n_t=3, seed=2)
    image = acquisition / "timelapse.zarr"
    write_ome_zarr(image, data[:, 0], axes="tzyx", chunks=(1, 1, 128, 128), pause=2.0, n_levels=1)
    wait_for(lambda: str(image) in done_images(state), 60, what="time-lapse processed")
    assert started_at(state, image) >= image.joinpath("zarr.json").stat().st_mtime - 0.01
    labels = labels_level0(image)
    assert all(labels[t].max() > 0 for t in range(3)), "a time point was segmented before it was written"
    assert len(jobs_for(state, str(image))) == 1


def test_completion_marker_required(tmp_path: Path, acquisition: Path, daemons) -> None:
    state = tmp_path / "state"
    config = tmp_path / "cellseg1d.toml"
    config.write_text(f"""
state_dir = "{state}"
[[watch.roots]]
path = "{acquisition}"
[readiness]
settle_seconds = 0.5
require_marker = true
""")
    daemons(state, "--config", str(config))
    data, _ = make_czyx((64, 64), 4)
    unmarked = write_ome_zarr(acquisition / "unmarked.zarr", data[0], axes="czyx")
    marked = write_ome_zarr(acquisition / "marked.zarr", data[0], axes="czyx", attrs={"acquisition_complete": True})
    sentinel = write_ome_zarr(acquisition / "sentinel.zarr", data[0], axes="czyx")
    (sentinel / "acquisition_complete").write_text("")
    wait_for(lambda: {str(marked), str(sentinel)} <= done_images(state), 30, what="marked images")
    time.sleep(2)
    assert str(unmarked) not in image_status(state)
    # the microscope finishes: it adds the marker attribute
    meta = json.loads((unmarked / "zarr.json").read_text())
    meta["attributes"]["acquisition_complete"] = True
    (unmarked / "zarr.json").write_text(json.dumps(meta))
    wait_for(lambda: str(unmarked) in done_images(state), 30, what="image after its marker")


def test_restart_catches_up_without_reprocessing(tmp_path: Path, acquisition: Path, daemons, make_image) -> None:
    state = tmp_path / "state"
    first, _ = make_image(acquisition / "first.zarr")
    daemon = daemons(state, "--watch", str(acquisition), "--settle-seconds", "0.5")
    wait_for(lambda: str(first) in done_images(state), 30, what="first image")
    assert daemon.stop() == 0
    # written while the daemon is down, in both NGFF versions and a sub-folder
    later = [make_image(acquisition / "day2" / "a.zarr")[0],
             make_image(acquisition / "day2" / "b.zarr", ngff_version="0.4")[0]]
    daemons(state, "--watch", str(acquisition), "--settle-seconds", "0.5")
    wait_for(lambda: {str(p) for p in later} <= done_images(state), 30, what="catch-up after restart")
    time.sleep(1.5)
    for path in [first, *later]:
        assert [j[0] for j in jobs_for(state, str(path))] == ["done"], path


def test_sigkill_mid_job_is_redone_after_restart(tmp_path: Path, acquisition: Path, daemons) -> None:
    state = tmp_path / "state"
    data, _ = make_czyx((256, 256), 20, n_z=80, seed=1)  # 80 planes: long enough to be killed mid-way
    image = write_ome_zarr(acquisition / "stack.zarr", data[0], axes="czyx", n_levels=1)
    daemon = daemons(state, "--watch", str(acquisition), "--settle-seconds", "0.2")
    wait_for(lambda: image_status(state).get(str(image)) == "processing", 30, what="job running")

    def staging_started() -> bool:
        labels = image / "labels"
        return labels.is_dir() and any(p.name.startswith(".cellseg1d.partial-") for p in labels.iterdir())

    # the job reads and segments before it stages labels: kill only once staging has begun
    wait_for(staging_started, 30, what="labels staging")
    daemon.kill()
    assert image_status(state).get(str(image)) == "processing", "job finished before the kill"
    assert not (image / "labels" / "cellseg1d").exists()
    daemons(state, "--watch", str(acquisition), "--settle-seconds", "0.2")
    wait_for(lambda: str(image) in done_images(state), 60, what="redo after kill")
    assert [j[0] for j in jobs_for(state, str(image))] == ["done"]
    assert not any(p.name.startswith(".") for p in (image / "labels").iterdir()), "staging left behind"


def test_second_daemon_on_same_state_dir_is_refused(tmp_path: Path, acquisition: Path, daemons) -> None:
    state = tmp_path / "state"
    daemons(state, "--watch", str(acquisition))
    out = subprocess.run(
        [sys.executable, "-m", "cellseg1d", "run", "--watch", str(acquisition), "--state-dir", str(state)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert out.returncode == 2 and "another cellseg1d daemon" in out.stderr


def test_bad_config_exits_with_named_setting(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(f'state_dir = "{tmp_path}"\n[[watch.roots]]\npath = "{tmp_path}"\n[jobs]\nworkers = 0\n')
    out = subprocess.run([sys.executable, "-m", "cellseg1d", "run", "--config", str(config)],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 2
    assert "jobs.workers" in out.stderr and str(config) in out.stderr


def test_status_and_images_commands(tmp_path: Path, acquisition: Path, daemons, make_image) -> None:
    state = tmp_path / "state"
    image, _ = make_image(acquisition / "one.zarr")
    (acquisition / "broken.zarr").mkdir()
    (acquisition / "broken.zarr" / "zarr.json").write_text("{not json")
    daemons(state, "--watch", str(acquisition), "--settle-seconds", "0.3")
    wait_for(lambda: len(image_status(state)) == 2, 30, what="both recorded")
    run = lambda *a: subprocess.run([sys.executable, "-m", "cellseg1d", *a, "--state-dir", str(state)],  # noqa: E731
                                    capture_output=True, text=True, timeout=60, cwd=REPO)
    status = json.loads(run("status", "--json").stdout)
    assert status["images"] == {"done": 1, "failed": 1}
    assert "invalid JSON" in status["recent_failures"][0]["error"]
    images = json.loads(run("images", "--json", "--status", "done").stdout)
    assert [i["path"] for i in images] == [str(image)] and images[0]["objects"] > 0
    assert run("status").returncode == 0
    missing = subprocess.run([sys.executable, "-m", "cellseg1d", "status", "--state-dir", str(tmp_path / "none")],
                             capture_output=True, text=True, timeout=60, cwd=REPO)
    assert missing.returncode == 2 and "no catalog" in missing.stderr


def test_sigterm_finishes_current_image_second_signal_releases(tmp_path: Path, acquisition: Path, daemons) -> None:
    data, _ = make_czyx((256, 256), 20, n_z=30, seed=4)
    first = write_ome_zarr(acquisition / "a.zarr", data[0], axes="czyx", n_levels=1)
    state = tmp_path / "state"
    daemon = daemons(state, "--watch", str(acquisition), "--settle-seconds", "0.2")
    wait_for(lambda: image_status(state).get(str(first)) == "processing", 30, what="first job running")
    assert daemon.stop() == 0  # one SIGTERM: the image in progress is finished
    assert image_status(state)[str(first)] == "done"
    assert (first / "labels" / "cellseg1d").is_dir()

    second = write_ome_zarr(acquisition / "b.zarr", data[0], axes="czyx", n_levels=1)
    daemon = daemons(state, "--watch", str(acquisition), "--settle-seconds", "0.2")
    wait_for(lambda: image_status(state).get(str(second)) == "processing", 30, what="second job running")
    daemon.proc.send_signal(__import__("signal").SIGTERM)
    time.sleep(0.2)
    assert daemon.stop() == 0  # a second signal aborts: the job is given back, nothing published
    assert image_status(state)[str(second)] == "queued"
    assert not (second / "labels" / "cellseg1d").exists()
    assert [j[:2] for j in jobs_for(state, str(second))] == [("queued", 0)]


def test_watchdog_backend_finds_nested_images(tmp_path: Path, acquisition: Path, daemons, make_image) -> None:
    """The portable event source (watchdog's observer) runs the daemon as inotify does."""
    state = tmp_path / "state"
    daemon = daemons(state, "--watch", str(acquisition), "--settle-seconds", "0.5", "--watch-backend", "watchdog")
    assert "(watchdog events)" in daemon.log()
    image, _ = make_image(acquisition / "day1" / "plateA" / "img.zarr")
    wait_for(lambda: str(image) in done_images(state), 40, what="image found through watchdog")
    assert labels_level0(image).max() > 0


def test_polling_mode_finds_images(tmp_path: Path, acquisition: Path, daemons, make_image) -> None:
    state = tmp_path / "state"
    daemon = daemons(state, "--watch", str(acquisition), "--settle-seconds", "0.5", "--polling")
    assert "polling" in daemon.log()
    image, _ = make_image(acquisition / "share" / "img.zarr")
    wait_for(lambda: str(image) in done_images(state), 40, what="image found by polling")
