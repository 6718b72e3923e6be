"""Workers killed at random moments while a daemon sends many images to a real Dask cluster.

``dask worker`` runs with a nanny by default: killing the worker process
makes the nanny start a new one (a new address; the scheduler installs the
cellseg1d worker plugin on it again), killing the nanny's process group takes
the worker away for good. Workers without a nanny are covered too. Whatever
is killed, and whenever: every image is done exactly once (one done job,
done in one attempt, one result row, its label image complete) and nothing
is quarantined. A worker loss is the cluster's business: Dask reruns the
task, and whatever the cluster raises around a task is an executor error,
retried without counting an attempt.

The daemon here checks on its tasks every 5 ms instead of every 250 ms (a
``sitecustomize`` in the test's site folder; :data:`POLL_ENV`): result
fetches then often straddle a poll deadline, as large label planes coming
over a network do at 250 ms. Before cellseg1d stopped waiting on
``Future.result(timeout=...)`` (see :mod:`cellseg1d.pipeline.executor.dask`), each
such timeout cancelled a gather that ``distributed.Client`` shares between
the daemon's job threads; the other threads' ``result()`` then failed with
``UnboundLocalError: cannot access local variable 'result'``, counted as
attempts of their images, and once a shared gather was cancelled before it
started the client failed every later result, so every later image ended
quarantined. That is what these tests caught.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from cellseg1d.testing.synthetic import make_czyx, write_ome_zarr
from tests.dask_cluster import DaskCluster, dask_cluster  # noqa: F401  (fixture)
from tests.helpers import REPO, catalog_rows, done_images, jobs_for, wait_for
from tests.test_plugin_contract import install_fake_dist

#: A segmenter that takes a random 50-300 ms per plane (so kills land mid-task) and answers with labels of
#: a simple threshold (cheap, and as large as the plane: the results are real arrays to fetch).
JITTERY_SEGMENTER = '''
import random
import time

import numpy as np
from scipy import ndimage as ndi

from cellseg1d.hookspecs import PLUGIN_API, hookimpl
from cellseg1d.types import Segmentation

CELLSEG1D_PLUGIN_API = PLUGIN_API


@hookimpl
def segment(plane, request):
    time.sleep(random.uniform(0.05, 0.3))
    image = np.asarray(plane, dtype=np.float32)
    image = image.reshape(-1, *image.shape[-2:]).sum(axis=0)
    labels, _ = ndi.label(image > image.mean())
    return Segmentation(labels=labels.astype(np.uint32), segmenter="jittery", details={"pid": 0})
'''

#: Environment variable read by the test's sitecustomize: the daemon's poll interval (seconds).
POLL_ENV = "FAULT_TEST_POLL_SECONDS"
SITECUSTOMIZE = f'''
import os

if os.environ.get("{POLL_ENV}"):
    import cellseg1d.pipeline.executor.dask as _dask

    _dask.POLL_SECONDS = float(os.environ["{POLL_ENV}"])
'''

#: Kinds of kill: the worker process only (its nanny starts a new one), the nanny's whole process group
#: (the worker is gone for good), a worker without a nanny.
WORKER_PROCESS, NANNY_GROUP, NO_NANNY = "worker-process", "nanny-group", "no-nanny"


def _site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    if not site.exists():
        site.mkdir()
        install_fake_dist(site, "jittery", JITTERY_SEGMENTER)
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return site


def _write_image(path: Path, seed: int, size: int, n_z: int) -> None:
    data, _ = make_czyx((size, size), 20, n_z=n_z, seed=seed)
    write_ome_zarr(path, data[0], axes="czyx", ngff_version="0.5", channel_names=["nuclei", "membrane"])


def _kill(cluster: DaskCluster, kind: str, rnd: random.Random) -> str:
    """Kill one worker of ``cluster`` (chosen at random) the ``kind`` way; returns what was killed."""
    for _ in range(50):
        addresses = sorted(cluster.worker_addresses())
        if addresses:
            victim = rnd.choice(addresses)
            try:
                if kind == WORKER_PROCESS:
                    return f"worker process {cluster.kill_worker_process(victim)} of {victim}"
                return f"{kind} {cluster.kill_worker(victim)} at {victim}"
            except Exception:  # noqa: BLE001  (it went away meanwhile, e.g. its nanny restarting it)
                pass
        time.sleep(0.1)
    raise AssertionError(f"no worker to kill:\n{cluster.logs()}")


def run_with_kills(tmp_path: Path, daemons, cluster: DaskCluster, kills: list[str], *, n_images: int,
                   seed: int, size: int = 512, n_z: int = 2, poll: float = 0.005) -> None:
    """A daemon on two roots segments ``n_images`` images (half there at its start, half arriving) while one
    worker is killed per entry of ``kills``, each at a random moment; then checks each image was done once."""
    rnd = random.Random(seed)
    site = _site(tmp_path)
    roots = [(tmp_path / "A").resolve(), (tmp_path / "B").resolve()]
    for root in roots:
        root.mkdir()
    images = [roots[i % 2] / f"{'AB'[i % 2]}{i}.ome.zarr" for i in range(n_images)]
    for i, image in enumerate(images[: n_images // 2]):
        _write_image(image, seed * 100 + i, size, n_z)
    state = tmp_path / "state"
    config = tmp_path / "cellseg1d.toml"
    lines = [f'state_dir = "{state}"']
    for root in roots:
        lines += ["[[watch.roots]]", f'path = "{root}"']
    lines += ["[watch]", "rescan_seconds = 2", "[readiness]", "settle_seconds = 0.5",
              "[jobs]", "workers = 4", "retry_backoff_seconds = 0", "max_attempts = 3",
              "[executor]", 'kind = "dask"', f'scheduler = "{cluster.address}"', "max_tasks_in_flight = 8",
              "[plugins]", 'enable = ["jittery"]', 'disable = ["classical"]']
    config.write_text("\n".join(lines) + "\n")
    daemon = daemons(state, "--config", str(config),
                     env={POLL_ENV: str(poll), "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])})

    def quarantined() -> list[tuple]:
        return catalog_rows(state, "SELECT images.path, jobs.attempts, jobs.error FROM jobs JOIN images "
                                   "ON images.id = jobs.image_id WHERE jobs.state = 'quarantined'")

    def context() -> str:
        return (f"seed {seed}, kills {done_kills}\njobs: {catalog_rows(state, 'SELECT * FROM jobs')}\n"
                f"{daemon.log()[-6000:]}\n{cluster.logs()}")

    def progress(n: int) -> bool:
        if quarantined():
            raise AssertionError(f"quarantined: {quarantined()}\n{context()}")
        return len(done_images(state)) >= n

    # The other half arrives while the workers die (a writer thread, one image every 0-0.4 s).
    delays = [rnd.uniform(0, 0.4) for _ in images]

    def write_arrivals() -> None:
        for i in range(n_images // 2, n_images):
            time.sleep(delays[i])
            _write_image(images[i], seed * 100 + i, size, n_z)

    writer = threading.Thread(target=write_arrivals, name="arrivals")
    writer.start()
    # Kill moments: after a random number of images are done, plus a random delay.
    moments = sorted(rnd.randint(0, n_images - 2) for _ in kills)
    done_kills: list[str] = []
    try:
        for kind, after in zip(kills, moments, strict=True):
            wait_for(lambda: progress(after), 120, 0.05, f"{after} images done before a kill")  # noqa: B023
            time.sleep(rnd.uniform(0, 0.6))
            done_kills.append(f"{_kill(cluster, kind, rnd)} with {len(done_images(state))} image(s) done")
        wait_for(lambda: progress(n_images), 180, 0.25, f"all {n_images} images done")
    except AssertionError as err:
        raise AssertionError(f"{err}\n{context()}") from None
    finally:
        writer.join()

    # Exactly once: one job per image, done in its first attempt, one result row, a complete label image.
    for image in images:
        assert jobs_for(state, str(image)) == [("done", 1, None, None)], (image, jobs_for(state, str(image)),
                                                                         context())
        labels = zarr.open_array(str(image / "labels" / "cellseg1d" / "0"), mode="r")
        assert labels.shape == (n_z, size, size), (image, labels.shape)
        assert int(np.asarray(labels).max()) > 0, image
    rows = catalog_rows(state, "SELECT images.path, count(results.id) FROM images LEFT JOIN results "
                               "ON results.image_id = images.id GROUP BY images.path")
    assert sorted(rows) == sorted((str(i), 1) for i in images), rows
    assert dict(catalog_rows(state, "SELECT state, count(*) FROM jobs GROUP BY state")) == {"done": n_images}
    log = daemon.log()
    assert "UnboundLocalError" not in log, context()
    if WORKER_PROCESS in kills:  # the nanny started a new worker, and the scheduler gave it the plugin again
        def plugin_restarted() -> bool:  # the restart may still be under way on a loaded machine
            first_process_kill = next(i for i, k in enumerate(done_kills) if k.startswith("worker process"))
            for text in cluster.worker_logs():
                if "Restarting worker" not in text:
                    continue
                if "Starting Worker plugin cellseg1d" in text.split("Restarting worker", 1)[-1]:
                    return True
                name = re.search(r"Worker name:\s+(\S+)", text)
                if name and any(k.startswith(f"{NANNY_GROUP} {name.group(1)} at")
                                for k in done_kills[first_process_kill + 1:]):
                    return True  # the restarted worker was then killed with its nanny, before it could get it
            return False

        try:
            wait_for(plugin_restarted, 60, 0.5, "the restarted worker to get the cellseg1d plugin")
        except AssertionError as err:
            raise AssertionError(f"{err}\n{context()}") from None
    assert daemon.alive(), context()
    assert daemon.stop() == 0, context()
    print(f"seed {seed}: killed {done_kills}")


def _seed() -> int:
    seed = int(os.environ.get("FAULT_TEST_SEED", random.randrange(1 << 30)))
    print(f"fault-injection seed {seed} (FAULT_TEST_SEED={seed} repeats it)")
    return seed


def test_workers_killed_with_and_without_their_nanny_every_image_done_once(tmp_path: Path, daemons,
                                                                           dask_cluster) -> None:  # noqa: F811
    """Two nanny workers; one worker process is killed (its nanny restarts it), then a whole nanny (its
    worker gone for good), each at a random moment while 8 images on two roots are segmented."""
    cluster = dask_cluster(2, nanny=True, pythonpath=(_site(tmp_path),))
    run_with_kills(tmp_path, daemons, cluster, [WORKER_PROCESS, NANNY_GROUP], n_images=8, seed=_seed())


@pytest.mark.slow
@pytest.mark.parametrize("kind", [WORKER_PROCESS, NANNY_GROUP, NO_NANNY])
@pytest.mark.parametrize("round_", range(3))
def test_many_random_kills_every_image_done_once(tmp_path: Path, daemons, dask_cluster,  # noqa: F811
                                                 kind: str, round_: int) -> None:
    """Three kills of one kind per round over 16 images; a killed nanny or worker without a nanny is
    replaced by a new one (as systemd restarts its unit), so the cluster keeps two workers."""
    cluster = dask_cluster(2, nanny=kind != NO_NANNY, pythonpath=(_site(tmp_path),))
    if kind != WORKER_PROCESS:
        real_kill = cluster.kill_worker

        def kill_and_replace(address: str) -> str:
            name = real_kill(address)
            cluster.add_worker()
            return name

        cluster.kill_worker = kill_and_replace  # type: ignore[method-assign]
    run_with_kills(tmp_path, daemons, cluster, [kind] * 3, n_images=16, seed=_seed() + round_)
