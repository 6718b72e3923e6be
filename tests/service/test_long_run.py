"""A daemon that runs for months: memory must not grow with the number of images processed.

A real daemon (in this process, so that ``tracemalloc`` sees every
allocation of its threads: scheduler, workers, watcher, sweep) processes
batches of small images written into one folder, the way a microscope fills
a folder over months. Traced memory is measured after a warm-up, after N and
after 2N more images; the growth per image must stay under
:data:`MAX_BYTES_PER_IMAGE`. Before finished containers were forgotten, the
daemon kept about 13 KiB per image (inotify watches on every folder ever
written, the tracker's per-image entries).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from cellseg1d.config import build_config
from cellseg1d.testing.synthetic import make_czyx, write_ome_zarr, write_plate
from cellseg1d.service.watch import ImageTracker, Retired, container_signature
from tests.helpers import catalog_rows, done_images, jobs_for, wait_for

#: Traced bytes a processed image may leave behind (a path alone is about 100 bytes).
MAX_BYTES_PER_IMAGE = 1024
BATCH = 25


class InProcessDaemon:
    """The real :class:`~cellseg1d.service.daemon.Daemon` on a folder, run on a thread of this process."""

    def __init__(self, tmp_path: Path, settle: float = 0.2, retire: float | None = 0.5) -> None:
        from cellseg1d.service.daemon import Daemon

        self.acquisition = (tmp_path / "acquisition").resolve()
        self.acquisition.mkdir(exist_ok=True)
        self.state = tmp_path / "state"
        config = build_config({"state_dir": str(self.state), "watch": {"roots": [{"path": str(self.acquisition)}]},
                               "readiness": {"settle_seconds": settle}})
        self.daemon = Daemon(config)
        if retire is not None:
            self.daemon.tracker.retire_seconds = retire  # finished containers are forgotten quickly here
        self.thread = threading.Thread(target=self.daemon.run, name="daemon", daemon=True)
        self.written = 0
        data, _ = make_czyx((32, 32), 2, seed=1)
        self.pixels = data[0]

    def __enter__(self) -> InProcessDaemon:
        self.thread.start()
        wait_for(lambda: self.daemon.watcher is not None, 30, what="daemon start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.daemon.stop_event.set()
        self.daemon.work_event.set()
        self.thread.join(60)

    def done(self) -> int:
        rows = catalog_rows(self.state, "SELECT count(*) FROM images WHERE status = 'done'")
        return int(rows[0][0]) if rows else 0

    def process(self, count: int, forget: bool = True) -> None:
        """Write ``count`` images in batches and wait until all are done (and, with ``forget``, forgotten)."""
        target = self.written + count
        while self.written < target:
            for _ in range(min(BATCH, target - self.written)):
                write_ome_zarr(self.acquisition / f"img{self.written:06d}.zarr", self.pixels, axes="czyx",
                               n_levels=1, chunks=(1, 1, 32, 32))
                self.written += 1
            wait_for(lambda: self.done() >= self.written, 60 + 2 * count, interval=0.05,
                     what=f"{self.written} images done")
        tracker = self.daemon.tracker
        active = getattr(tracker, "active_containers", list)
        if forget:
            wait_for(lambda: not active(), 30, interval=0.05, what="finished containers forgotten")

    def traced(self) -> int:
        gc.collect()
        return tracemalloc.get_traced_memory()[0]


@pytest.fixture
def quiet_logs() -> Iterator[None]:
    """No INFO records: the test's log capture would itself keep one record per image."""
    logger = logging.getLogger("cellseg1d")
    before = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(before)


def growth_per_image(tmp_path: Path, warm_up: int, n: int) -> tuple[float, float]:
    """Traced bytes per image over the first and the second ``n`` images after a warm-up."""
    with InProcessDaemon(tmp_path) as run:
        run.process(warm_up)  # imports, caches, connection pool, compiled statements
        tracemalloc.start(1)
        try:
            start = run.traced()
            run.process(n)
            middle = run.traced()
            run.process(n)
            end = run.traced()
        finally:
            tracemalloc.stop()
        assert run.done() == warm_up + 2 * n
    return (middle - start) / n, (end - middle) / n


def test_memory_does_not_grow_with_images_processed(tmp_path: Path, quiet_logs: None) -> None:
    started = time.monotonic()
    first, second = growth_per_image(tmp_path, warm_up=40, n=150)
    print(f"traced memory per image: {first:.0f} B (first 150), {second:.0f} B (next 150); "
          f"{time.monotonic() - started:.0f} s")
    assert second < MAX_BYTES_PER_IMAGE, f"{second:.0f} bytes per image processed stay in memory"


@pytest.mark.slow
def test_memory_does_not_grow_over_many_images(tmp_path: Path, quiet_logs: None) -> None:
    first, second = growth_per_image(tmp_path, warm_up=100, n=600)
    print(f"traced memory per image: {first:.0f} B (first 600), {second:.0f} B (next 600)")
    assert second < MAX_BYTES_PER_IMAGE / 4, f"{second:.0f} bytes per image processed stay in memory"


# --------------------------------------------------------------------------
# finished containers: retired, recorded, skipped while unchanged
# --------------------------------------------------------------------------


def test_container_signature_follows_metadata_and_layout_not_labels_or_pixels(tmp_path: Path) -> None:
    data, _ = make_czyx((32, 32), 2, seed=1)
    image = write_ome_zarr(tmp_path / "img.zarr", data[0], axes="czyx", n_levels=1, chunks=(1, 1, 32, 32))
    before = container_signature(image, [""])
    (image / "labels" / "cellseg1d").mkdir(parents=True)  # what publishing labels does
    (image / "labels" / "zarr.json").write_text("{}")
    chunk = next(p for p in (image / "0").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes())  # pixels rewritten: not a new run either
    assert container_signature(image, [""]) == before
    meta = image / "zarr.json"
    meta.write_text(meta.read_text().replace('"nuclei"', '"nucleus"'))
    assert container_signature(image, [""]) != before

    plate = write_plate(tmp_path / "plate.zarr", {("A", "1", "0"): data[0], ("A", "1", "1"): data[0]}, axes="czyx")
    fields = ["A/1/0", "A/1/1"]
    before = container_signature(plate, fields)
    (plate / "A" / "1" / "0" / "labels").mkdir()
    assert container_signature(plate, fields) == before
    (plate / "A" / "1" / "2").mkdir()  # a new field in the well
    assert container_signature(plate, fields) != before


def test_tracker_retires_a_finished_container_and_keeps_a_changed_one(tmp_path: Path) -> None:
    root = tmp_path / "acq"
    data, _ = make_czyx((32, 32), 2, seed=1)
    image = write_ome_zarr(root / "img.zarr", data[0], axes="czyx", n_levels=1, chunks=(1, 1, 32, 32))
    old = time.time() - 60
    for path in [image, *image.rglob("*")]:
        os.utime(path, (old, old))
    clock = [1000.0]
    tracker = ImageTracker([root], [".zarr"], settle_seconds=0.5, clock=lambda: clock[0], retire_seconds=10)
    assert tracker.rescan() == 1
    ready, _ = tracker.poll()
    assert [c.image for c in ready] == [image]
    tracker.settled(ready[0])
    clock[0] += 5
    tracker.poll()
    assert tracker.known(image) and tracker.take_retired() == []  # not quiet long enough

    extra = image / "0" / "c" / "extra.partial"  # changed without an event: found when it is about to be retired
    extra.write_bytes(b"x")
    os.utime(extra, (old, old))
    clock[0] += 6
    tracker.poll()
    assert tracker.known(image) and tracker.take_retired() == []
    ready, _ = tracker.poll(now=clock[0] + 1)
    assert [c.image for c in ready] == [image]  # looked at again (the daemon finds its run key: no new job)
    tracker.settled(ready[0])

    clock[0] += 20
    tracker.poll()
    assert tracker.take_retired() == [Retired(image, 0, ("",), container_signature(image, [""]))]
    assert not tracker.known(image) and tracker.pending() == 0
    tracker.rescan()  # without the daemon's catalog look-up a rescan finds it again
    assert tracker.known(image)


def test_restart_skips_unchanged_finished_containers(tmp_path: Path, quiet_logs: None, monkeypatch) -> None:
    """Finished containers are recorded at stop; at restart the unchanged ones are not opened, a changed
    one is a new run, a done image whose labels went missing is redone, a new image is processed."""
    import cellseg1d.service.scheduler as scheduler_module

    with InProcessDaemon(tmp_path, retire=None) as run:
        run.process(12, forget=False)
    images = sorted(run.acquisition.glob("img*.zarr"))
    assert len(catalog_rows(run.state, "SELECT id FROM containers")) == 12  # recorded when it stopped

    changed, lost = images[0], images[1]
    meta = json.loads((changed / "zarr.json").read_text())
    meta["attributes"]["instrument"] = "re-exported"  # new metadata: a new image version, a new run
    (changed / "zarr.json").write_text(json.dumps(meta))
    shutil.rmtree(lost / "labels" / "cellseg1d")
    data, _ = make_czyx((32, 32), 2, seed=9)
    new = write_ome_zarr(run.acquisition / "new.zarr", data[0], axes="czyx", n_levels=1)

    opened: list[Path] = []
    real_open = scheduler_module.open_image

    def counting_open(path: Path):  # what the scheduler opens to decide about an image
        opened.append(Path(path))
        return real_open(path)

    monkeypatch.setattr(scheduler_module, "open_image", counting_open)
    with InProcessDaemon(tmp_path, retire=None) as again:
        state = again.state
        wait_for(lambda: str(new) in done_images(state), 30, what="the new image")
        wait_for(lambda: [j[0] for j in jobs_for(state, str(changed))] == ["done", "done"], 30,
                 what="the changed image's new run")
        wait_for(lambda: catalog_rows(state, "SELECT count(*) FROM job_events WHERE kind = 'redo'") == [(1,)]
                 and str(lost) in done_images(state), 30, what="the image whose labels went missing redone")
    assert sorted(set(opened)) == sorted([changed, new]), opened
    assert (lost / "labels" / "cellseg1d").is_dir()
    assert [j[0] for j in jobs_for(state, str(lost))] == ["done"]  # the same job, run again
    for image in images[2:]:
        assert [j[0] for j in jobs_for(state, str(image))] == ["done"]
