"""The daemon with ``[executor] kind = "dask"``: real scheduler, workers and daemon subprocesses.

Everything is real: ``dask scheduler`` and ``dask worker`` processes on
loopback (:mod:`tests.dask_cluster`), ``cellseg1d run`` as a subprocess,
OME-Zarr images on disk and the SQLite catalog. The tests check outcomes
(what the catalog and the label images say), never timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from cellseg1d.model.metrics import average_precision
from tests.dask_cluster import dask_cluster, free_port  # noqa: F401  (fixture)
from tests.helpers import (
    REPO,
    catalog_rows,
    done_images,
    image_status,
    jobs_for,
    wait_for,
)
from tests.routing.test_adapters_daemon import models  # noqa: F401  (fixture)
from tests.test_plugin_contract import install_fake_dist

pytestmark = pytest.mark.slow

#: A segmenter plugin: the first call (on any worker) sleeps long enough to be killed mid-task.
SLOW_SEGMENTER = '''
import os
import time
from pathlib import Path

from cellseg1d.builtin import classical
from cellseg1d.hookspecs import PLUGIN_API, hookimpl
from cellseg1d.types import Segmentation

CELLSEG1D_PLUGIN_API = PLUGIN_API


@hookimpl
def segment(plane, request):
    from distributed import get_worker

    folder = Path(os.environ["SLOWSEG_MARKERS"])
    first = not any(folder.iterdir())
    (folder / f"{os.getpid()}.marker").write_text(get_worker().address)
    if first:
        time.sleep(300)  # killed long before: the test SIGKILLs this worker as soon as the marker is there
    seg = classical.segment(plane=plane, request=request)
    return Segmentation(labels=seg.labels, segmenter="slowseg", details=seg.details)
'''


def write_config(tmp_path: Path, state: Path, roots: list[Path], executor: dict[str, Any],
                 extra: str = "") -> Path:
    lines = [f'state_dir = "{state}"']
    for root in roots:
        lines += ["[[watch.roots]]", f'path = "{root}"']
    lines += ["[watch]", "rescan_seconds = 2", "[readiness]", "settle_seconds = 0.5",
              "[jobs]", "retry_backoff_seconds = 0", "[executor]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in executor.items()]
    path = tmp_path / "cellseg1d.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def results_by_image(state: Path) -> dict[str, list[dict[str, Any]]]:
    """Image path -> its result rows (object_count, segmenter, provenance)."""
    rows = catalog_rows(state, "SELECT images.path, results.object_count, results.segmenter, results.provenance "
                               "FROM results JOIN images ON images.id = results.image_id ORDER BY results.id")
    out: dict[str, list[dict[str, Any]]] = {}
    for path, count, segmenter, provenance in rows:
        out.setdefault(path, []).append({"object_count": count, "segmenter": segmenter,
                                         "provenance": json.loads(provenance) if provenance else None})
    return out


def done_once(state: Path, path: Path) -> None:
    """The image has exactly one job, done in one attempt, and one result row."""
    assert jobs_for(state, str(path)) == [("done", 1, None, None)], jobs_for(state, str(path))
    assert len(results_by_image(state).get(str(path), [])) == 1


def labels_level0(image: Path) -> np.ndarray:
    return np.asarray(zarr.open_array(str(image / "labels" / "cellseg1d" / "0"), mode="r"))


def test_daemon_segments_two_roots_on_a_two_worker_cluster(tmp_path: Path, make_image, daemons,
                                                           dask_cluster) -> None:  # noqa: F811
    cluster = dask_cluster(2)
    workers = set(cluster.worker_addresses())
    roots = [(tmp_path / "scope1").resolve(), (tmp_path / "scope2").resolve()]
    for root in roots:
        root.mkdir()
    state = tmp_path / "state"
    # 128 px planes in 64 px blocks (3 x 3 per plane): 54 tasks, so both workers get some.
    config = write_config(tmp_path, state, roots, {"kind": "dask", "scheduler": cluster.address,
                                                   "block_size": 64, "block_overlap": 28})
    truth = {}
    for i in range(3):  # already there when the daemon starts
        _, truth[roots[0] / f"a{i}.zarr"] = make_image(roots[0] / f"a{i}.zarr", seed=i)
    daemon = daemons(state, "--config", str(config))
    for i in range(3):  # arriving while it runs
        _, truth[roots[1] / f"b{i}.zarr"] = make_image(roots[1] / f"b{i}.zarr", seed=10 + i)

    images = {str(p) for p in truth}
    wait_for(lambda: done_images(state) >= images, 90, 0.25, "all six images done")
    results = results_by_image(state)
    seen_workers: set[str] = set()
    for image, mask in truth.items():
        done_once(state, image)
        (result,) = results[str(image)]
        labels = labels_level0(image)
        assert result["object_count"] == len(np.unique(labels)) - 1 > 0, image
        ap = average_precision(labels[0], mask, thresholds=(0.5,))[0].ap
        assert ap >= 0.8, (image, ap)  # stitched blocks of well-separated cells: ~1.0
        executor = result["provenance"]["executor"]
        assert executor["kind"] == "dask" and executor["scheduler"] == cluster.address, executor
        assert executor["blocks_per_plane"] == 9, executor
        assert [(p["t"], p["z"]) for p in executor["planes"]] == [(0, 0)]
        plane_workers = set(executor["planes"][0]["workers"])
        assert plane_workers and plane_workers <= workers, (plane_workers, workers)
        seen_workers |= plane_workers
    assert seen_workers == workers, (seen_workers, workers)
    assert dict(catalog_rows(state, "SELECT state, count(*) FROM jobs GROUP BY state")) == {"done": 6}
    assert catalog_rows(state, "SELECT count(*) FROM results") == [(6,)]
    assert daemon.stop() == 0, daemon.log()[-3000:]


def test_two_microscope_pcs_with_different_settings_share_the_workers(tmp_path: Path, make_image, daemons,
                                                                      dask_cluster) -> None:  # noqa: F811
    """Two daemons (two state dirs, two roots, two configs) on one cluster: each image once, in its own
    catalog, segmented with its own daemon's settings (the workers keep one plugin manager per config)."""
    cluster = dask_cluster(2)
    pcs = []
    for name, min_size in (("pc1", 20), ("pc2", 10_000)):  # pc2's minimum cell size removes every cell
        root = (tmp_path / name / "acquisition").resolve()
        root.mkdir(parents=True)
        state = tmp_path / name / "state"
        config = write_config(tmp_path / name, state, [root], {"kind": "dask", "scheduler": cluster.address},
                              f"[classical]\nmin_size = {min_size}\n")
        pcs.append((root, state, daemons(state, "--config", str(config))))
    for root, _, _ in pcs:
        for i in range(2):
            make_image(root / f"img{i}.zarr", seed=20 + i)
    for root, state, daemon in pcs:
        images = {str(root / f"img{i}.zarr") for i in range(2)}
        wait_for(lambda: done_images(state) >= images, 90, 0.25, f"{root}'s images done")  # noqa: B023
        assert set(image_status(state)) == images  # each catalog holds its own PC's images only
        for image in images:
            done_once(state, Path(image))
    counts = {name: sorted(r[0]["object_count"] for r in results_by_image(state).values())
              for name, (_, state, _) in zip(("pc1", "pc2"), pcs, strict=True)}
    assert min(counts["pc1"]) > 0 and counts["pc2"] == [0, 0], counts
    for _, _, daemon in pcs:
        assert daemon.stop() == 0, daemon.log()[-3000:]


def test_worker_killed_mid_task_the_other_worker_finishes_it(tmp_path: Path, make_image, daemons,
                                                             dask_cluster) -> None:  # noqa: F811
    site = tmp_path / "site"
    site.mkdir()
    install_fake_dist(site, "slowseg", SLOW_SEGMENTER)
    markers = tmp_path / "markers"
    markers.mkdir()
    env = {"SLOWSEG_MARKERS": str(markers)}
    cluster = dask_cluster(2, env=env, pythonpath=(site,))
    acquisition = (tmp_path / "acquisition").resolve()
    acquisition.mkdir()
    state = tmp_path / "state"
    config = write_config(tmp_path, state, [acquisition], {"kind": "dask", "scheduler": cluster.address},
                          '[plugins]\nenable = ["slowseg"]\ndisable = ["classical"]\n')
    daemon = daemons(state, "--config", str(config),
                     env={**env, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])})
    image, mask = make_image(acquisition / "one.zarr", seed=3)

    first = wait_for(lambda: sorted(markers.iterdir()), 60, 0.1, "the task to start on a worker")[0]
    victim = first.read_text()
    assert victim in cluster.worker_addresses(), (victim, cluster.logs())
    (survivor,) = set(cluster.worker_addresses()) - {victim}
    cluster.kill_worker(victim)  # SIGKILL while it sleeps inside segment

    try:
        wait_for(lambda: str(image) in done_images(state), 60, 0.25, "the image done after the kill")
    except AssertionError as err:
        raise AssertionError(f"{err}\n{daemon.log()[-3000:]}\n{cluster.logs()}") from None
    done_once(state, image)  # Dask reran the task: the job neither failed nor ran twice
    (result,) = results_by_image(state)[str(image)]
    assert result["segmenter"] == "slowseg"
    assert result["provenance"]["executor"]["planes"][0]["workers"] == [survivor]
    assert sorted(p.read_text() for p in markers.iterdir()) == sorted([victim, survivor])
    assert average_precision(labels_level0(image)[0], mask, thresholds=(0.5,))[0].ap >= 0.8
    assert daemon.alive()
    assert daemon.stop() == 0, daemon.log()[-3000:]


def test_scheduler_down_at_start_is_a_clear_config_error(tmp_path: Path, acquisition: Path) -> None:
    port = free_port()  # nothing listens there
    state = tmp_path / "state"
    config = write_config(tmp_path, state, [acquisition], {
        "kind": "dask", "scheduler": f"tcp://127.0.0.1:{port}", "connect_timeout_seconds": 1})
    proc = subprocess.run([sys.executable, "-m", "cellseg1d", "run", "--config", str(config)],
                          check=False, capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert (f"cellseg1d: error: setting executor.scheduler: no Dask scheduler answers at "
            f"tcp://127.0.0.1:{port}") in proc.stderr, proc.stderr
    assert "watching" not in proc.stdout + proc.stderr
    assert not catalog_rows(state, "SELECT id FROM jobs")


def test_lost_scheduler_jobs_wait_and_resume_when_it_is_back(tmp_path: Path, make_image, daemons,
                                                             dask_cluster) -> None:  # noqa: F811
    cluster = dask_cluster(1)
    acquisition = (tmp_path / "acquisition").resolve()
    acquisition.mkdir()
    state = tmp_path / "state"
    config = write_config(tmp_path, state, [acquisition], {
        "kind": "dask", "scheduler": cluster.address, "connect_timeout_seconds": 2})
    daemon = daemons(state, "--config", str(config))
    first, _ = make_image(acquisition / "first.zarr", seed=1)
    wait_for(lambda: str(first) in done_images(state), 60, 0.25, "the first image done")

    cluster.kill_scheduler()
    for name in list(cluster.workers):  # the old worker goes too: a fresh cluster comes back
        cluster.workers[name].kill()
        cluster.workers[name].wait(timeout=30)
    down = f"Dask scheduler {cluster.address} is unreachable"
    wait_for(lambda: down in daemon.log(), 60, 0.25, "the daemon to notice the scheduler is gone")
    during, _ = make_image(acquisition / "during.zarr", seed=2)  # queued; nobody claims it while down
    wait_for(lambda: catalog_rows(state, "SELECT count(*) FROM jobs WHERE state = 'queued'") == [(1,)], 30,
             0.25, "the image written during the outage queued")
    assert daemon.alive(), daemon.log()[-3000:]

    cluster.start_scheduler(cluster.port)  # the same address
    cluster.add_worker()
    cluster.wait_workers(1)
    try:
        wait_for(lambda: str(during) in done_images(state), 60, 0.25, "the queued image done once it is back")
        after, _ = make_image(acquisition / "after.zarr", seed=3)
        wait_for(lambda: str(after) in done_images(state), 60, 0.25, "a new image done")
    except AssertionError as err:
        raise AssertionError(f"{err}\n{daemon.log()[-4000:]}\n{cluster.logs()}") from None

    log = daemon.log()
    assert log.count(down) == 1, log[-4000:]  # logged once, not every reconnection attempt
    assert f"Dask scheduler {cluster.address} is reachable again" in log
    for image in (first, during, after):
        done_once(state, image)
    assert catalog_rows(state, "SELECT count(*) FROM results") == [(3,)]
    (new_worker,) = cluster.worker_addresses()
    prov = results_by_image(state)[str(after)][0]["provenance"]["executor"]
    assert prov["planes"][0]["workers"] == [new_worker]
    assert daemon.stop() == 0, log[-3000:]


#: A segmenter that kills the worker process running it: an image that takes down every worker.
KILLER_SEGMENTER = '''
import os
import signal

from cellseg1d.hookspecs import PLUGIN_API, hookimpl

CELLSEG1D_PLUGIN_API = PLUGIN_API


@hookimpl
def segment(plane, request):
    os.kill(os.getpid(), signal.SIGKILL)
'''


def test_image_that_kills_every_worker_ends_quarantined(tmp_path: Path, make_image, daemons,
                                                       dask_cluster) -> None:  # noqa: F811
    site = tmp_path / "site"
    site.mkdir()
    install_fake_dist(site, "killerseg", KILLER_SEGMENTER)
    # No reruns by Dask: the first dead worker is KilledWorker, one failed attempt of the job.
    cluster = dask_cluster(2, env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}, pythonpath=(site,))
    acquisition = (tmp_path / "acquisition").resolve()
    acquisition.mkdir()
    state = tmp_path / "state"
    config = write_config(tmp_path, state, [acquisition], {"kind": "dask", "scheduler": cluster.address},
                          '[plugins]\nenable = ["killerseg"]\ndisable = ["classical"]\n')
    config.write_text(config.read_text().replace("[jobs]\n", "[jobs]\nmax_attempts = 2\n"))
    daemon = daemons(state, "--config", str(config), env={"PYTHONPATH": os.pathsep.join([str(site), str(REPO)])})
    image, _ = make_image(acquisition / "poison.zarr")

    def quarantined() -> bool:
        return [j[0] for j in jobs_for(state, str(image))] == ["quarantined"]

    try:
        wait_for(quarantined, 60, 0.25, "the poison image quarantined")
    except AssertionError as err:
        raise AssertionError(f"{err}\n{jobs_for(state, str(image))}\n{daemon.log()[-3000:]}") from None
    ((_, attempts, error, plugin),) = jobs_for(state, str(image))
    assert attempts == 2 and plugin is None, jobs_for(state, str(image))
    assert "died while segmenting it" in error and str(image) in error, error
    assert cluster.wait_workers(0) == {}  # each attempt took one worker down
    assert not (image / "labels" / "cellseg1d").exists()
    assert catalog_rows(state, "SELECT count(*) FROM results") == [(0,)]
    assert daemon.alive(), daemon.log()[-3000:]
    assert daemon.stop() == 0


def test_path_map_workers_read_the_image_at_their_own_path(tmp_path: Path, make_image,
                                                            dask_cluster) -> None:  # noqa: F811
    """The daemon sees ``daemon-view/``; the workers are told ``worker-view/`` (here: a copy with fewer cells)."""
    import shutil

    from cellseg1d.config import build_config
    from cellseg1d.pipeline.executor import ExecutorError
    from cellseg1d.pipeline.executor.dask import DaskExecutor
    from cellseg1d.pipeline import Pipeline
    from cellseg1d.plugins import build_plugin_manager

    daemon_view = (tmp_path / "daemon-view").resolve()
    worker_view = (tmp_path / "worker-view").resolve()
    daemon_view.mkdir()
    image, _ = make_image(daemon_view / "img.zarr", n_cells=16, seed=4)
    shutil.copytree(daemon_view, worker_view)
    pixels = zarr.open_array(str(worker_view / "img.zarr" / "0"), mode="r+")
    pixels[..., 64:] = int(np.asarray(pixels).min())  # the workers' copy: no cells on the right half

    def run(path_map: list[dict[str, str]], labels_name: str) -> Any:
        config = build_config({
            "state_dir": str(tmp_path / "state"), "watch": {"roots": [{"path": str(daemon_view)}]},
            "segmentation": {"labels_name": labels_name},
            "executor": {"kind": "dask", "scheduler": cluster.address, "path_map": path_map},
        })
        pm = build_plugin_manager()
        pm.hook.configure(config=config)
        executor = DaskExecutor(config)
        executor.start()
        try:
            return Pipeline(config, pm, executor).run(image, config.watch.roots[0], image)
        finally:
            executor.close()

    cluster = dask_cluster(1)
    same = run([], "same")
    mapped = run([{"daemon": str(daemon_view), "worker": str(worker_view)}], "mapped")
    labels = np.asarray(zarr.open_array(str(image / "labels" / "mapped" / "0"), mode="r"))
    assert Path(mapped.labels_path) == image / "labels" / "mapped"  # published where the daemon sees it
    assert mapped.object_count == len(np.unique(labels)) - 1
    assert labels[..., 68:].max() == 0  # segmented from the workers' copy (smoothing blurs the edge a little)
    assert 0 < mapped.object_count < same.object_count, (mapped.object_count, same.object_count)
    with pytest.raises(ExecutorError, match="cannot see"):
        run([{"daemon": str(daemon_view), "worker": str(tmp_path / "nowhere")}], "nowhere")
    assert not (image / "labels" / "nowhere").exists()


def test_doctor_checks_the_scheduler_its_workers_and_their_view_of_the_paths(tmp_path: Path,
                                                                             dask_cluster) -> None:  # noqa: F811
    from cellseg1d.config import build_config
    from cellseg1d.service.doctor import FAIL, OK, Context, check_executor

    cluster = dask_cluster(1)
    root = tmp_path / "acq"
    root.mkdir()

    def row(**executor: Any) -> Any:
        config = build_config({"state_dir": str(tmp_path / "state"), "watch": {"roots": [{"path": str(root)}]},
                               "executor": {"kind": "dask", "connect_timeout_seconds": 2, **executor}})
        [check] = check_executor(Context(config))
        return check

    good = row(scheduler=cluster.address)
    assert good.status == OK and "1 worker(s)" in good.message, good
    mapped = row(scheduler=cluster.address, path_map=[{"daemon": str(root), "worker": "/nowhere/acq"}])
    assert mapped.status == FAIL and "does not see /nowhere/acq" in mapped.message and "path_map" in mapped.fix
    down = row(scheduler=f"tcp://127.0.0.1:{free_port()}")
    assert down.status == FAIL and "no Dask scheduler answers" in down.message


def test_sam_loads_once_per_worker_and_switches_adapters_there(tmp_path: Path, dask_cluster,  # noqa: F811
                                                               models) -> None:  # noqa: F811
    """Tasks carry the adapter version, never the model: the worker loads the tiny SAM once (checksum
    checked), switches adapters on it, and its labels equal SAM run here with the same adapter."""
    from cellseg1d.builtin import sam as sam_plugin
    from cellseg1d.catalog import Catalog
    from cellseg1d.config import build_config
    from cellseg1d.pipeline.executor.dask import DaskExecutor
    from cellseg1d.pipeline import Pipeline
    from cellseg1d.plugins import build_plugin_manager
    from cellseg1d.routing.registry import BaseModel, Registry, adapter_ref, sha256_of
    from tests.routing.test_adapters_daemon import (
        SAM,
        expected_labels,
        read_labels,
        same_labels,
        write_cells,
    )

    cluster = dask_cluster(1)
    acquisition = (tmp_path / "acquisition").resolve()
    acquisition.mkdir()
    config = build_config({
        "state_dir": str(tmp_path / "state"), "watch": {"roots": [{"path": str(acquisition)}]},
        "sam": {"checkpoint": str(models["checkpoint"]), **SAM},
        "executor": {"kind": "dask", "scheduler": cluster.address},
    })
    catalog = Catalog(config.catalog_url)
    catalog.migrate()
    registry = Registry(catalog, config.adapter_store, BaseModel("tiny", sha256_of(models["checkpoint"])))
    refs = {name: adapter_ref(registry.add(models[name])) for name in ("alpha", "beta")}
    sam_plugin.HOLDER.reset()
    pm = build_plugin_manager()
    pm.hook.configure(config=config)
    assert sam_plugin.HOLDER.loads == 0  # the daemon loads no model with the dask executor
    executor = DaskExecutor(config)
    executor.start()
    try:
        pipeline = Pipeline(config, pm, executor)
        root = config.watch.roots[0]
        for i, name in enumerate(("alpha", "beta", "alpha")):
            image, plane, _ = write_cells(acquisition / f"{i}-{name}.zarr", seed=40 + i)
            result = pipeline.run(image, root, image, experiment=f"exp-{name}", adapter=refs[name])
            labels, _ = read_labels(image)
            assert same_labels(labels[0], expected_labels(models, name, plane)), (name, result.object_count)
            assert result.provenance["adapter"] == refs[name].provenance()
            assert result.provenance["base_model"]["sha256"] == sha256_of(models["checkpoint"])
            assert result.provenance["executor"]["planes"][0]["workers"] == list(cluster.worker_addresses())
        from distributed import Client

        with Client(cluster.address, set_as_default=False) as client:
            on_worker = client.run(lambda: (sam_plugin.HOLDER.loads, sam_plugin.HOLDER.adapter_changes()))
        assert list(on_worker.values()) == [(1, 2)], on_worker  # one load; alpha -> beta -> alpha
        assert sam_plugin.HOLDER.loads == 0
    finally:
        executor.close()
        catalog.close()
