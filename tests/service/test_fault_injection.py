"""Fault injection: the daemon is SIGKILLed at random moments while a microscope writes images.

A writer thread adds 50 small OME-Zarr images (64-128 px, some of them
z-stacks so that kills land mid-job; 0.4 and 0.5; written chunk by chunk as
an acquiring microscope does) while the harness kills the daemon subprocess
with SIGKILL at random moments (seeded) at least 20 times, restarting it
each time; about half of the kills wait for a job to be running. Then one
daemon runs until the queue is empty. Every image must have exactly one done
job and one result, a complete label image that ome-zarr's Reader opens and
that matches the synthetic ground truth, its measurements table, and no
leftovers of the killed attempts.
"""

from __future__ import annotations

import csv
import random
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Reader

from cellseg1d.model.metrics import average_precision
from cellseg1d.testing.synthetic import make_czyx, write_ome_zarr
from tests.helpers import catalog_rows, wait_for

pytestmark = pytest.mark.slow
SEED = 20261127
N_IMAGES = 50
MIN_KILLS = 20
LEFTOVER = re.compile(r"^\..+\.(partial|replaced)-[0-9a-f]{12}$")


class Writer(threading.Thread):
    """The simulated microscope: writes N_IMAGES images into ``folder``, remembering their ground truth."""

    def __init__(self, folder: Path, rng: random.Random) -> None:
        super().__init__(name="microscope", daemon=True)
        self.folder, self.rng = folder, rng
        self.truth: dict[str, tuple[np.ndarray, int]] = {}  # path -> (mask, planes)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for i in range(N_IMAGES):
                size = self.rng.choice((64, 96, 128))
                n_z = self.rng.choice((1, 1, 1, 6, 12, 24))  # stacks: long enough jobs to be killed mid-way
                data, mask = make_czyx((size, size), max(3, size // 10), n_z=n_z, seed=i)
                path = self.folder / f"img{i:02d}.zarr"
                write_ome_zarr(path, data[0], axes="czyx", ngff_version=self.rng.choice(("0.4", "0.5")),
                               chunks=(1, 1, 64, 64), n_levels=2, pause=0.002,
                               channel_names=["nuclei", "membrane"])
                self.truth[str(path)] = (mask, n_z)
                time.sleep(self.rng.uniform(0.0, 0.9))
        except BaseException as err:  # surfaced by the test
            self.error = err


def count(state: Path, sql: str) -> int:
    rows = catalog_rows(state, sql)
    return int(rows[0][0]) if rows else 0


def check_labels(image: str, mask: np.ndarray, planes: int) -> float:
    """Open the label image with ome-zarr's Reader and check it; return AP@0.5 of its sharpest plane."""
    labels_path = Path(image) / "labels" / "cellseg1d"
    nodes = [n for n in Reader(parse_url(str(labels_path)))() if any(isinstance(s, Label) for s in n.specs)]
    assert len(nodes) == 1, image
    levels = [tuple(d.shape) for d in nodes[0].data]
    size = mask.shape[0]
    assert levels == [(planes, size, size), (planes, size // 2, size // 2)], (image, levels)
    level0 = np.asarray(zarr.open_array(str(labels_path / "0"), mode="r"))
    assert level0.dtype == np.uint32
    assert all(level0[z].max() > 0 for z in range(planes)), f"{image}: an empty label plane"
    return average_precision(level0[planes // 2], mask, thresholds=(0.5,))[0].ap


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(tmp_path: Path, acquisition: Path,
                                                                daemons) -> None:
    rng = random.Random(SEED)
    acq = acquisition.resolve()
    state = tmp_path / "state"
    config = tmp_path / "cellseg1d.toml"
    # Kills are not the images' fault: max_attempts is set above what the kills can use up,
    # so that the poison-job rule (quarantine after max_attempts interruptions) cannot trigger.
    config.write_text(f"""
state_dir = "{state}"
[[watch.roots]]
path = "{acq}"
[readiness]
settle_seconds = 0.3
[jobs]
max_attempts = {MIN_KILLS + 10}
retry_backoff_seconds = 0
lease_seconds = 10
[plugins]
enable = ["measurements"]
""")
    started = time.monotonic()
    writer = Writer(acq, random.Random(SEED + 1))
    writer.start()
    kills = mid_job = 0
    while kills < MIN_KILLS or writer.is_alive():
        daemon = daemons(state, "--config", str(config))  # (returns at once after the first start: shared log)
        # a job this very process is running (the killed one's stay 'running' until the next one starts)
        running = f"SELECT count(*) FROM jobs WHERE state = 'running' AND lease_owner LIKE '%#{daemon.proc.pid}'"
        if rng.random() < 0.5:  # wait for a job to be running, then kill within its first moments
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline and not count(state, running):
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.15))
        else:  # any moment: start-up, migrations, reconciliation, scheduling, idle or mid-job
            time.sleep(rng.uniform(0.05, 2.5))
        mid_job += bool(count(state, running))
        assert daemon.alive(), daemon.log()[-3000:]
        daemon.kill()
        kills += 1
    assert writer.error is None, writer.error
    killing = time.monotonic() - started

    daemon = daemons(state, "--config", str(config))
    images = sorted(writer.truth)

    def finished() -> bool:
        done = count(state, "SELECT count(DISTINCT image_id) FROM jobs WHERE state = 'done'")
        pending = count(state, "SELECT count(*) FROM jobs WHERE state IN ('queued', 'running', 'failed')")
        return done == N_IMAGES and pending == 0

    wait_for(finished, 120, interval=0.25, what="every image processed after the last kill")
    assert daemon.stop() == 0

    done_jobs = dict(catalog_rows(state, "SELECT images.path, count(*) FROM jobs JOIN images "
                                         "ON images.id = jobs.image_id WHERE jobs.state = 'done' GROUP BY 1"))
    results = dict(catalog_rows(state, "SELECT images.path, count(*) FROM results JOIN images "
                                       "ON images.id = results.image_id GROUP BY 1"))
    lost = [p for p in images if done_jobs.get(p, 0) == 0]
    duplicated = [p for p in images if done_jobs.get(p, 0) > 1 or results.get(p, 0) > 1]
    print(f"\nkills={kills} (mid-job {mid_job}) images={len(images)} lost={len(lost)} "
          f"duplicated={len(duplicated)} killing={killing:.0f}s total={time.monotonic() - started:.0f}s")
    assert kills >= MIN_KILLS and mid_job >= 5, (kills, mid_job)
    assert len(images) == N_IMAGES and not lost and not duplicated, (lost, duplicated)
    assert {p: results.get(p) for p in images} == {p: 1 for p in images}
    states = dict(catalog_rows(state, "SELECT state, count(*) FROM jobs GROUP BY state"))
    assert states == {"done": N_IMAGES}, states  # nothing quarantined, failed, queued or running
    assert sorted(p for (p,) in catalog_rows(state, "SELECT path FROM images")) == images

    counts = dict(catalog_rows(state, "SELECT images.path, results.object_count FROM results JOIN images "
                                      "ON images.id = results.image_id"))
    aps = []
    for path in images:
        mask, planes = writer.truth[path]
        aps.append(check_labels(path, mask, planes))
        level0 = np.asarray(zarr.open_array(str(Path(path) / "labels" / "cellseg1d" / "0"), mode="r"))
        assert counts[path] == len(np.unique(level0)) - 1, path  # the result row describes these labels
        table = acq / f"{Path(path).name}.cellseg1d" / "measurements.csv"
        with table.open() as handle:
            assert len(list(csv.DictReader(handle))) == counts[path], path
    # The classical segmenter finds these well-separated cells (AP ~1.0 on in-focus planes);
    # a torn or mixed-up label image would not.
    assert min(aps) >= 0.7, sorted(aps)[:5]
    leftovers = [p for p in acq.rglob(".*") if LEFTOVER.match(p.name)]
    assert leftovers == [], leftovers
