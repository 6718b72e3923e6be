"""Readiness detection with a real watchdog observer on real folders."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from cellseg1d.testing.synthetic import make_czyx, write_ome_zarr, write_plate
from cellseg1d.service.watch import ImageTracker, Watcher, tree_signature

SETTLE = 1.0


def ready_paths(tracker: ImageTracker) -> set[Path]:
    ready, _ = tracker.poll()
    for cand in ready:
        tracker.settled(cand)
    return {c.image for c in ready}


def age_tree(folder: Path, seconds: float = 3600) -> None:
    old = time.time() - seconds
    for dirpath, _, files in os.walk(folder):
        for name in files:
            os.utime(Path(dirpath) / name, (old, old))


#: Every event source: the Linux default, watchdog's portable observer, and stat polling.
BACKENDS = [pytest.param({"backend": "inotify"}, id="inotify"), pytest.param({"backend": "watchdog"}, id="watchdog"),
            pytest.param({"polling": True, "poll_interval": 0.2}, id="poll")]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> dict:
    return request.param


@pytest.fixture
def watched(acquisition: Path, backend: dict):
    tracker = ImageTracker([acquisition], [".zarr"], SETTLE)
    watcher = Watcher(tracker, **backend)
    watcher.start()
    yield tracker
    watcher.stop()


def slow_write(path: Path, pause: float, **kw) -> threading.Thread:
    data, _ = make_czyx((256, 256), 10, seed=3)
    done = {}

    def run() -> None:
        write_ome_zarr(path, data[0], axes="czyx", chunks=(1, 1, 64, 64), pause=pause, **kw)
        done["at"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.done = done  # type: ignore[attr-defined]
    thread.start()
    return thread


def test_slow_writer_is_not_ready_until_quiet(watched: ImageTracker, acquisition: Path) -> None:
    image = acquisition / "slow.zarr"
    writer = slow_write(image, pause=SETTLE / 4)  # 32 chunks, pauses shorter than the settle time
    seen_at = None
    deadline = time.monotonic() + 60
    while seen_at is None:
        if image in ready_paths(watched):
            seen_at = time.monotonic()
        time.sleep(0.05)
        assert time.monotonic() < deadline, "image never became ready"
    writer.join()
    finished = writer.done["at"]  # type: ignore[attr-defined]
    assert seen_at >= finished + SETTLE * 0.9, "image reported ready before it was completely written"
    assert seen_at <= finished + SETTLE + 1.0


def test_events_in_labels_and_partial_files(watched: ImageTracker, acquisition: Path, backend: dict) -> None:
    if backend.get("polling"):
        pytest.skip("polling looks inside a container only while it is being written; a rewrite of an image "
                    "already handed on is found by the sweep once the container retires (test_long_run)")
    image = acquisition / "img.zarr"
    slow_write(image, pause=0).join()
    deadline = time.monotonic() + 10
    while image not in ready_paths(watched):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Our own outputs under labels/ must not make the image look changed.
    (image / "labels").mkdir()
    (image / "labels" / "x").write_text("1")
    time.sleep(0.5)
    assert image not in ready_paths(watched) and watched.pending() == 0
    # A zarr partial chunk file is writing activity: the image is re-examined after quiet time.
    (image / "0" / "c" / "0.abc.partial").write_bytes(b"x")
    start = time.monotonic()
    while image not in ready_paths(watched):
        assert time.monotonic() - start < 10
        time.sleep(0.05)
    assert time.monotonic() - start >= SETTLE * 0.9


def test_rescan_finds_images_written_while_not_watching(acquisition: Path) -> None:
    data, _ = make_czyx((64, 64), 3)
    old = write_ome_zarr(acquisition / "sub" / "old.zarr", data[0], axes="czyx")
    fresh = write_ome_zarr(acquisition / "fresh.zarr", data[0], axes="czyx")
    age_tree(old)
    tracker = ImageTracker([acquisition], [".zarr"], SETTLE)
    assert tracker.rescan() == 2
    assert ready_paths(tracker) == {old}  # old files: ready at once; fresh ones wait
    time.sleep(SETTLE + 0.2)
    assert ready_paths(tracker) == {fresh}


def test_plate_fields_become_ready_one_by_one(watched: ImageTracker, acquisition: Path) -> None:
    data, _ = make_czyx((64, 64), 3)
    plate = acquisition / "plate.zarr"
    write_plate(plate, {("A", "1", "0"): data[0], ("A", "2", "0"): data[0]}, axes="czyx")
    first, second = plate / "A" / "1" / "0", plate / "A" / "2" / "0"
    # keep the second field busy while the first one settles
    stop = time.monotonic() + SETTLE * 3
    ready: set[Path] = set()
    while time.monotonic() < stop:
        (second / "0" / "zarr.json").touch()
        os.utime(second / "0" / "zarr.json")
        (second / "0" / f"x{time.monotonic_ns()}.partial").write_bytes(b"")
        ready |= ready_paths(watched)
        time.sleep(0.1)
    assert first in ready and second not in ready
    time.sleep(SETTLE + 0.3)
    assert second in ready_paths(watched)


def test_tree_signature_changes_with_content(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"1")
    before = tree_signature(tmp_path)
    (tmp_path / "b").write_bytes(b"22")
    assert tree_signature(tmp_path) != before
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "c").write_bytes(b"333")
    after = tree_signature(tmp_path)
    assert after.files == 2 and after.size == 3  # labels/ is ours, not input


def test_symlinked_folder_outside_root_is_not_followed(tmp_path: Path, acquisition: Path) -> None:
    outside = tmp_path / "outside"
    data, _ = make_czyx((64, 64), 3)
    write_ome_zarr(outside / "secret.zarr", data[0], axes="czyx")
    os.symlink(outside, acquisition / "link")
    os.symlink(outside / "secret.zarr", acquisition / "direct.zarr")
    tracker = ImageTracker([acquisition], [".zarr"], 0)
    assert tracker.rescan() == 0


def test_watcher_survives_label_folders_being_replaced(acquisition: Path, backend: dict) -> None:
    """Publishing renames label folders in and out under a recursive watch; the watcher keeps working."""
    import shutil

    labels = acquisition / "a.zarr" / "labels"
    (labels / "cellseg1d" / "0").mkdir(parents=True)
    tracker = ImageTracker([acquisition], [".zarr"], SETTLE)
    watcher = Watcher(tracker, **backend)
    watcher.start()
    time.sleep(0.3)
    for i in range(3):  # what StagedLabels.publish does when it replaces an earlier label image
        staging = labels / f".cellseg1d.partial-{i}"
        (staging / "0").mkdir(parents=True)
        os.rename(labels / "cellseg1d", labels / f".cellseg1d.replaced-{i}")
        os.rename(staging, labels / "cellseg1d")
        shutil.rmtree(labels / f".cellseg1d.replaced-{i}")
        time.sleep(0.2)
    # the watcher still sees new images (a dead inotify reader would not)
    data, _ = make_czyx((64, 64), 3, seed=1)
    image = write_ome_zarr(acquisition / "b.zarr", data[0], axes="czyx", n_levels=1)
    deadline = time.monotonic() + 15
    seen: set[Path] = set()
    while image not in seen and time.monotonic() < deadline:
        seen |= ready_paths(tracker)
        time.sleep(0.2)
    watcher.stop()
    assert image in seen
