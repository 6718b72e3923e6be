"""The executor layer without a cluster: task errors as data, path mapping, the worker plugin in-process,
aborts, reload and metrics. (A real Dask cluster is in tests/pipeline/test_dask.py.)"""

from __future__ import annotations

import asyncio
import pickle
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from distributed import KilledWorker
from distributed.client import FutureCancelledError
from prometheus_client.parser import text_string_to_metric_families

from cellseg1d.catalog import Catalog
from cellseg1d.config import build_config
from cellseg1d.service.daemon import Daemon
from cellseg1d.errors import ConfigError, ImageError, JobAborted, PluginError
from cellseg1d.pipeline.executor import (
    ExecutorError,
    ExecutorUnavailable,
    SegmentTask,
    TaskFailed,
    make_executor,
    plane_regions,
)
from cellseg1d.pipeline.executor.dask import DaskExecutor, worker_config
from cellseg1d.pipeline.executor.local import LocalExecutor
from cellseg1d.pipeline.executor.tasks import TaskError
from cellseg1d.pipeline.executor.worker import CellsegWorkerPlugin, probe
from cellseg1d.hookspecs import hookimpl
from cellseg1d.ngff.reader import open_image
from cellseg1d.plugins import build_plugin_manager
from cellseg1d.service.telemetry import Telemetry
from cellseg1d.testing import write_synthetic_image
from cellseg1d.types import AdapterRef, Segmentation


def _config(tmp_path: Path, **executor) -> object:
    return build_config({"state_dir": str(tmp_path / "state"), "watch": {"roots": [{"path": str(tmp_path)}]},
                         "executor": executor})


def _tasks(image_path: Path, config, block_size: int | None = None) -> list[SegmentTask]:
    image = open_image(image_path)
    shape = (image.size("y"), image.size("x"))
    regions = plane_regions(shape, block_size or max(shape), 16)
    return [SegmentTask(image_path=image_path, fingerprint=image.fingerprint, t=t, z=z, channels=(0,),
                        channel_names=("nuclei",), region=r, plane_shape=shape, experiment="default",
                        adapter=None, fallback=False, pixel_size=None, config=config)
            for t, z in image.planes() for r in regions]


def test_task_errors_come_back_as_the_exception_the_local_executor_raises() -> None:
    plugin_err = TaskError.of(PluginError("geo", "segment", "boom", transient=True), "tcp://w:1").exception()
    assert isinstance(plugin_err, PluginError) and plugin_err.plugin == "geo" and plugin_err.transient
    assert str(plugin_err) == "plugin 'geo' failed in hook 'segment': boom"  # named once, as locally
    image_err = TaskError.of(ImageError("bad chunk in /a.zarr"), "tcp://w:1").exception()
    assert isinstance(image_err, ImageError) and str(image_err) == "bad chunk in /a.zarr"
    # The task's own code path raised: a counted attempt (TaskFailed), transient as locally.
    storage = TaskError.of(FileNotFoundError(2, "No such file", "/mnt/x"), "tcp://w:1")
    assert storage.transient and isinstance(storage.exception(), TaskFailed)
    assert not isinstance(storage.exception(), ExecutorError)
    assert "tcp://w:1" in str(storage.exception()) and "/mnt/x" in str(storage.exception())
    assert isinstance(TaskError.of(JobAborted("stop"), "w").exception(), JobAborted)
    other = TaskError.of(ZeroDivisionError("division by zero"), "tcp://w:1")
    assert other.transient and "ZeroDivisionError" in str(other.exception())
    assert isinstance(other.exception(), TaskFailed) and not isinstance(other.exception(), ExecutorError)
    assert pickle.loads(pickle.dumps(other)) == other  # plain data: always travels back
    # The worker is not fit to run the task (cannot see the image, cellseg1d not configurable there):
    # the cluster's fault, an executor error (the attempt is not counted).
    for err in (ExecutorError("worker tcp://w:1 cannot see /a.zarr"), ConfigError("on worker tcp://w:1: no file")):
        cluster = TaskError.of(err, "tcp://w:1")
        assert cluster.kind == "cluster" and isinstance(cluster.exception(), ExecutorError)
        assert str(cluster.exception()) == str(err)


def test_paths_are_sent_as_the_workers_see_them(tmp_path: Path) -> None:
    config = build_config({
        "state_dir": str(tmp_path / "state"), "watch": {"roots": [{"path": str(tmp_path)}]},
        "sam": {"checkpoint": "/mnt/models/sam_vit_b.pth", "adapter": "/srv/other/adapter"},
        "executor": {"kind": "dask", "scheduler": "tcp://gpu:8786", "path_map": [
            {"daemon": "/mnt", "worker": "/data"},
            {"daemon": str(tmp_path), "worker": "/cluster/scope1"},
        ]},
    })
    mapped = worker_config(config)
    assert mapped.sam.checkpoint == Path("/data/models/sam_vit_b.pth")
    assert mapped.sam.adapter == Path("/srv/other/adapter")  # outside every mapped prefix: unchanged
    assert config.sam.checkpoint == Path("/mnt/models/sam_vit_b.pth")  # the daemon's own config is untouched
    executor = DaskExecutor(config)  # not started: mapping needs no scheduler
    adapter = AdapterRef("hela", 2, "ab" * 32, tmp_path / "store" / "hela" / "v2", "vit_b", "cd" * 32)
    image = write_synthetic_image(tmp_path / "acq", "2d").path
    task = _tasks(image, config)[0]
    sent = executor._for_workers(SegmentTask(**{**task.__dict__, "adapter": adapter}))
    assert sent.image_path == Path("/cluster/scope1/acq") / image.name
    assert sent.adapter.path == Path("/cluster/scope1/store/hela/v2")
    assert sent.config.sam.checkpoint == Path("/data/models/sam_vit_b.pth")
    assert (sent.t, sent.z, sent.region, sent.experiment) == (task.t, task.z, task.region, task.experiment)


def test_worker_plugin_segments_tasks_in_process_and_reports_errors_as_data(tmp_path: Path) -> None:
    image = write_synthetic_image(tmp_path / "acq", "zstack", n_cells=10)
    config = _config(tmp_path)
    plugin = pickle.loads(pickle.dumps(CellsegWorkerPlugin()))  # how Dask ships it: state rebuilt there
    plugin.setup(SimpleNamespace(address="tcp://10.0.0.7:4000"))
    results = [plugin.run(t) for t in _tasks(image.path, config)]
    assert [r.error for r in results] == [None, None, None]
    assert all(r.worker == "tcp://10.0.0.7:4000" and r.labels.dtype == np.uint16 for r in results)
    assert all(len(np.unique(r.labels[r.labels > 0])) == image.n_cells for r in results)
    assert plugin.tasks == 3 and len(plugin._managers) == 1 and len(plugin._images) == 1  # opened once

    gone = SegmentTask(**{**_tasks(image.path, config)[0].__dict__, "image_path": tmp_path / "nowhere.zarr"})
    error = plugin.run(gone).error
    assert error is not None and error.transient and "executor.path_map" in error.message
    assert "tcp://10.0.0.7:4000" in error.message and "nowhere.zarr" in error.message
    assert error.kind == "cluster" and isinstance(error.exception(), ExecutorError)  # the worker's view: not counted
    other = SegmentTask(**{**_tasks(image.path, config)[0].__dict__, "fingerprint": "0" * 32})
    plugin._images.clear()
    error = plugin.run(other).error
    assert "sees another image" in error.message and error.kind == "cluster"


def test_local_executor_reads_blocks_and_stops_when_asked(tmp_path: Path) -> None:
    image = write_synthetic_image(tmp_path / "acq", "2d", size=128)
    config = _config(tmp_path)
    executor = make_executor(config, build_plugin_manager())
    assert isinstance(executor, LocalExecutor) and executor.available()
    tasks = _tasks(image.path, config, block_size=64)
    assert len(tasks) == 9 and all(t.is_block for t in tasks)
    results = list(executor.map(tasks, open_image(image.path)))
    assert [r.labels.shape for r in results] == [t.shape for t in tasks]
    assert all(r.worker.startswith("local:") for r in results)
    calls = iter([False, False, True])
    with pytest.raises(JobAborted, match="stopped before plane t=0 z=0 \\(block"):
        list(executor.map(tasks, open_image(image.path), lambda: next(calls)))


def test_probe_reports_missing_paths(tmp_path: Path) -> None:
    info = probe([str(tmp_path), str(tmp_path / "missing")])
    assert info["missing"] == [str(tmp_path / "missing")] and info["version"]


def test_reload_keeps_the_executor_connection_settings_until_restart(tmp_path: Path) -> None:
    old = _config(tmp_path, kind="dask", scheduler="tcp://a:8786", block_size=2048)
    new = _config(tmp_path, kind="local", scheduler="tcp://b:8786", block_size=1024)
    kept, changed = Daemon._keep_restart_only(SimpleNamespace(RESTART_ONLY=Daemon.RESTART_ONLY), old, new)
    assert changed == ["executor.kind", "executor.scheduler"]
    assert (kept.executor.kind, kept.executor.scheduler) == ("dask", "tcp://a:8786")  # both kept
    assert kept.executor.block_size == 1024  # takes effect at once


def test_executor_metrics_follow_the_health_answer(tmp_path: Path) -> None:
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.sqlite'}")
    catalog.migrate()
    try:
        answer = {"executor": {"kind": "dask", "available": False, "workers": 0}}
        telemetry = Telemetry(catalog, health=lambda: (True, answer))
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(telemetry.render().decode()) for s in f.samples}
        assert samples[("cellseg1d_executor_up", (("kind", "dask"),))] == 0
        assert samples[("cellseg1d_executor_workers", ())] == 0
        answer["executor"] = {"kind": "dask", "available": True, "workers": 3}
        text = telemetry.render().decode()
        assert 'cellseg1d_executor_up{kind="dask"} 1.0' in text and "cellseg1d_executor_workers 3.0" in text
    finally:
        catalog.close()


def test_adapters_are_registered_on_a_pc_without_the_workers_checkpoint(tmp_path: Path, caplog) -> None:
    from cellseg1d.routing.registry import RegistryError, configured_base

    sam = {"checkpoint": str(tmp_path / "on-the-workers" / "sam_vit_b.pth")}
    local = build_config({"state_dir": str(tmp_path / "s"), "sam": sam})
    with pytest.raises(RegistryError, match="sam.checkpoint: .* does not exist"):
        configured_base(local)
    dask = build_config({"state_dir": str(tmp_path / "s"), "sam": sam,
                         "executor": {"kind": "dask", "scheduler": "tcp://gpu:8786"}})
    assert configured_base(dask) is None
    assert "it is the workers' file" in caplog.text


# -- error classification: the cluster's errors are not the image's ------------------------------------------


class _LockDetailsSegmenter:
    """A segmenter whose details hold a lock: Dask could not send its result back."""

    @hookimpl(tryfirst=True)
    def segment(self, plane, request):  # noqa: ARG002
        return Segmentation(labels=np.zeros(plane.shape[-2:], np.uint16), segmenter="locky",
                            details={"lock": threading.Lock()})


def test_worker_fails_the_task_itself_when_its_result_could_not_travel(tmp_path: Path, monkeypatch) -> None:
    """Details that cannot be pickled are the segmenter's error (an attempt), not a Dask failure later."""
    image = write_synthetic_image(tmp_path / "acq", "2d")
    config = _config(tmp_path)
    plugin = CellsegWorkerPlugin()
    plugin.setup(SimpleNamespace(address="tcp://w:1"))
    pm = build_plugin_manager(extra=(_LockDetailsSegmenter(),))
    monkeypatch.setattr(plugin, "manager", lambda _config: pm)
    error = plugin.run(_tasks(image.path, config)[0]).error
    assert error is not None and error.kind == "plugin" and error.plugin == "locky", error
    assert "cannot be sent to the daemon" in error.message
    assert isinstance(error.exception(), PluginError)


class _FakeClient:
    """What DaskExecutor._wait uses of a distributed.Client: gather(..., asynchronous=True) on its loop."""

    def __init__(self, loop, coroutine) -> None:
        self.loop = SimpleNamespace(asyncio_loop=loop)
        self.status = "running"
        self.coroutine = coroutine
        self.closed = False

    def gather(self, future, asynchronous=None):
        assert asynchronous is True
        return self.coroutine(future)

    def close(self, timeout=None) -> None:
        self.closed = True
        self.status = "closed"


@pytest.fixture
def event_loop_thread():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def _dask_executor(tmp_path: Path, client: _FakeClient) -> DaskExecutor:
    executor = DaskExecutor(_config(tmp_path, kind="dask", scheduler="tcp://s:8786"))
    executor._client = client
    return executor


def test_waiting_for_a_result_never_cancels_its_fetch(tmp_path: Path, event_loop_thread, monkeypatch) -> None:
    """The poll timeout cancels nothing: distributed shares one in-flight gather between callers, and a
    cancelled one fails the others (``UnboundLocalError: ... 'result'``) or the client for good."""
    import cellseg1d.pipeline.executor.dask as dask_module

    monkeypatch.setattr(dask_module, "POLL_SECONDS", 0.01)
    cancelled: list[str] = []

    async def slow_gather(future):
        try:
            await asyncio.sleep(0.3)  # 30 polls
        except asyncio.CancelledError:
            cancelled.append(future)
            raise
        return f"result of {future}"

    client = _FakeClient(event_loop_thread, slow_gather)
    executor = _dask_executor(tmp_path, client)
    task = _tasks(write_synthetic_image(tmp_path / "acq", "2d").path, _config(tmp_path))[0]
    assert executor._wait(client, task, "k1", lambda: False) == "result of k1"
    calls = iter([False, False, True])
    with pytest.raises(JobAborted, match="stopped while plane t=0 z=0"):
        executor._wait(client, task, "k2", lambda: next(calls))
    time.sleep(0.5)
    assert cancelled == []  # neither the polls nor the abort cancelled a fetch
    # A client closed under a waiting job (its loop may never end the fetch): the job does not hang.
    threading.Timer(0.05, lambda: setattr(client, "status", "closed")).start()
    with pytest.raises(ExecutorUnavailable, match="the Dask client was closed"):
        executor._wait(client, task, "k3", lambda: False)


@pytest.mark.parametrize(("raised", "expected", "retired"), [
    # the cluster's: not counted
    (lambda: asyncio.CancelledError(), "ExecutorError:the cluster lost the result", True),
    (lambda: UnboundLocalError("cannot access local variable 'result'"), "ExecutorError:the cluster failed to run",
     False),
    (lambda: ModuleNotFoundError("No module named 'cellseg1d.pipeline.executor.worker'"),
     "ExecutorError:is the same cellseg1d version", False),
    (lambda: ConnectionRefusedError(111, "refused"), "ExecutorUnavailable:lost the Dask scheduler", False),
    (lambda: FutureCancelledError("k", "scheduler-connection-lost"), "ExecutorUnavailable:lost the Dask scheduler",
     False),
    (lambda: FutureCancelledError("k", "already forgotten"), "ExecutorError:the cluster cancelled", False),
    # the task's: an attempt
    (lambda: KilledWorker("k", SimpleNamespace(address="tcp://w:1"), 3),
     "TaskFailed:died while segmenting it",
     False),
])
def test_what_the_cluster_raises_is_an_executor_error_unless_the_task_killed_its_workers(
        tmp_path: Path, event_loop_thread, raised, expected, retired) -> None:
    async def failing(future):
        raise raised()

    client = _FakeClient(event_loop_thread, failing)
    executor = _dask_executor(tmp_path, client)
    task = _tasks(write_synthetic_image(tmp_path / "acq", "2d").path, _config(tmp_path))[0]
    with pytest.raises((ExecutorError, TaskFailed)) as info:
        executor._wait(client, task, "k", lambda: False)
    kind, text = expected.split(":", 1)
    assert type(info.value).__name__ == kind and text in str(info.value), info.value
    assert str(task.image_path) in str(info.value)
    assert isinstance(info.value, ExecutorError) == (kind != "TaskFailed")
    assert client.closed == retired and (executor._client is None) == retired  # a suspect client is replaced


def test_executor_retry_delay_grows_from_one_second_to_a_cap() -> None:
    from cellseg1d.pipeline.executor.retry import executor_retry_delay

    assert [executor_retry_delay(0, n) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]  # never hot, even with backoff 0
    assert [executor_retry_delay(30, n) for n in (1, 2, 3)] == [30, 60, 120]
    assert executor_retry_delay(30, 100) == 600 and executor_retry_delay(3600, 5) == 3600


def test_executor_streaks_are_logged_once_and_per_job_delays_grow() -> None:
    from cellseg1d.pipeline.executor.retry import ExecutorStreaks

    streaks = ExecutorStreaks(max_jobs=2)
    assert streaks.failed(1) == (1, True)  # opens the daemon's streak: logged
    assert streaks.failed(1) == (2, False) and streaks.failed(2) == (1, False)
    assert streaks.ran(3) == 3  # the cluster ran a job: the streak of 3 errors ends
    assert streaks.failed(1) == (3, True)  # job 1's own count goes on; a new daemon streak opens
    assert streaks.ran(1) == 1 and streaks.failed(1) == (1, True)
    streaks.failed(4), streaks.failed(5)
    assert list(streaks._jobs) == [4, 5]  # bounded


def test_daemon_retries_cluster_errors_without_counting_attempts(tmp_path: Path, caplog) -> None:
    """Executor errors give the job back (growing delay, attempt not counted, logged once per streak, counted
    in a metric), however often they come; the task's and the image's own errors are attempts."""
    import logging
    from datetime import timedelta

    from sqlalchemy import select, update

    from cellseg1d.catalog import Job, utcnow
    from cellseg1d.catalog.jobs import ImageFacts

    acq = (tmp_path / "acq").resolve()
    image = write_synthetic_image(acq, "2d").path
    config = build_config({"state_dir": str(tmp_path / "state"), "watch": {"roots": [{"path": str(acq)}]},
                           "jobs": {"max_attempts": 2, "retry_backoff_seconds": 0}})
    daemon = Daemon(config)
    try:
        daemon.telemetry = Telemetry(daemon.catalog)
        daemon.queue.enqueue(ImageFacts(str(image), str(acq), str(image), "fp"), "k")
        raised: list[Exception] = []

        def run(*args, **kwargs):
            raise raised.pop(0)

        daemon.pipeline.run = run

        def attempt(err: Exception) -> tuple[str, tuple]:
            with daemon.catalog.session() as s:  # due now, whatever its backoff
                s.execute(update(Job).values(next_attempt_at=None))
            job = daemon.queue.claim()
            assert job is not None
            raised.append(err)
            started = utcnow()
            outcome = daemon._process(job)
            with daemon.catalog.session() as s:
                row = s.execute(select(Job.state, Job.attempts, Job.error, Job.next_attempt_at)).one()
            delay = None if row.next_attempt_at is None else (row.next_attempt_at - started) / timedelta(seconds=1)
            return outcome, (row.state, row.attempts, row.error, delay)

        caplog.set_level(logging.DEBUG, logger="cellseg1d.service.daemon")
        for n in range(5):  # more than max_attempts: never quarantined for the cluster's faults
            outcome, (state, attempts, error, delay) = attempt(
                ExecutorError(f"the cluster lost the result of plane t=0 z=0 of {image} (CancelledError: )"))
            assert (outcome, state, attempts) == ("failed", "failed", 0), (n, state, attempts, error)
            assert error.endswith(f"retrying in {2 ** n:g} s, attempt not counted (an executor error, not the "
                                  "image's)"), error
            assert 2 ** n - 0.5 < delay < 2 ** n + 5, (n, delay)  # 1, 2, 4, 8, 16 s: never hot
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len([m for m in warnings if m.startswith("cluster error on")]) == 1, warnings  # once per streak
        assert not [r for r in caplog.records if r.getMessage().startswith("failed ")]  # no image failure
        metrics = daemon.telemetry.render().decode()
        assert "cellseg1d_executor_errors_total 5.0" in metrics

        # The task's own code failed on a worker: an attempt (1 of 2), and the streak is over.
        outcome, (state, attempts, error, _) = attempt(TaskFailed(f"storage error on worker tcp://w:1: {image}"))
        assert (outcome, state, attempts) == ("failed", "failed", 1) and "attempt not counted" not in error
        assert "the cluster runs jobs again (job 1) after 5 cluster error(s)" in caplog.text
        # One more cluster error: still not counted; then the image's own error uses the last attempt.
        assert attempt(ExecutorError("the cluster lost its scheduler"))[1][:2] == ("failed", 1)
        outcome, (state, attempts, error, _) = attempt(TaskFailed("on worker tcp://w:1: ZeroDivisionError: x"))
        assert (outcome, state, attempts) == ("quarantined", "quarantined", 2)
        assert len([r for r in caplog.records if r.levelno >= logging.WARNING
                    and r.getMessage().startswith("cluster error on")]) == 2  # a new streak: logged again
    finally:
        daemon.executor.close()
        daemon.catalog.close()
        daemon.lock.release()
