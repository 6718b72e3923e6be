"""What runs inside a ``dask worker`` process: the cellseg1d worker plugin and the task entry point.

The daemon registers :class:`CellsegWorkerPlugin` with the scheduler, which
installs it on every worker, now and when more join. The plugin keeps, per
worker process:

* a plugin manager per distinct config (several microscope PCs with
  different settings may share the workers), built and ``configure``-d on
  the first task that needs it;
* the base SAM models, loaded lazily by the built-in SAM segmenter on the
  first task (from the checkpoint path in the task's config, its SHA-256
  checked) and kept with their adapter cache (``sam.adapter_cache_size``
  adapters, switched in place), exactly as in the daemon;
* the images it opened recently (metadata parsed once per image, not once
  per plane).

:func:`segment_on_worker` is the function the daemon submits: it reads the
task's block from the shared storage and segments it. Every error comes
back as a :class:`~cellseg1d.pipeline.executor.tasks.TaskError` in the result; only
a dying worker process is left to Dask (which reruns the task elsewhere).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
from collections import OrderedDict
from typing import Any

import pluggy
from distributed import WorkerPlugin, get_worker

from cellseg1d.errors import ConfigError, PluginError
from cellseg1d.pipeline.executor.tasks import ExecutorError, SegmentTask, TaskError, TaskResult, compact, run_task

log = logging.getLogger("cellseg1d.worker")
PLUGIN_NAME = "cellseg1d"
#: How many opened images a worker keeps (their metadata, not their pixels).
IMAGE_CACHE_SIZE = 16


def config_key(config: Any) -> str:
    """A digest of a config: tasks with equal configs share one plugin manager."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]


class CellsegWorkerPlugin(WorkerPlugin):
    """Per-worker state of cellseg1d: plugin managers, loaded models (lazily), opened images."""

    name = PLUGIN_NAME
    #: A second daemon registering the plugin keeps the one installed (and its loaded models).
    idempotent = True

    def __init__(self) -> None:
        self._reset(f"{socket.gethostname()}:{os.getpid()}")

    def _reset(self, address: str) -> None:
        self.address = address
        self.tasks = 0
        self._lock = threading.Lock()
        self._managers: dict[str, pluggy.PluginManager] = {}
        self._images: OrderedDict[tuple[str, str], Any] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {}  # sent to the workers empty: the state is built there

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._reset(f"{socket.gethostname()}:{os.getpid()}")

    def setup(self, worker: Any) -> None:
        """Called by Dask when the plugin is installed on ``worker``."""
        self.address = worker.address
        log.info("cellseg1d %s worker plugin installed on %s", _version(), worker.address)

    def manager(self, config: Any) -> pluggy.PluginManager:
        """The plugin manager for ``config``: built and configured once per distinct config."""
        from cellseg1d.plugins import build_plugin_manager, configure_plugins

        key = config_key(config)
        with self._lock:
            pm = self._managers.get(key)
            if pm is not None:
                return pm
            pm = build_plugin_manager(config.plugins.enable, config.plugins.disable)
            try:
                configure_plugins(pm, config)
            except ConfigError as err:
                raise ConfigError(f"on worker {self.address}: {err}") from None
            self._managers[key] = pm
            return pm

    def image(self, task: SegmentTask) -> Any:
        """The task's image, opened (once per path and fingerprint while it stays in the cache)."""
        from cellseg1d.ngff.reader import open_image

        key = (str(task.image_path), task.fingerprint)
        with self._lock:
            image = self._images.get(key)
            if image is not None:
                self._images.move_to_end(key)
                return image
        if not task.image_path.exists():
            raise ExecutorError(
                f"worker {self.address} cannot see {task.image_path}: the workers must reach the shared "
                "storage at the path the daemon sends (set executor.path_map on the daemon when they "
                "mount it elsewhere)")
        image = open_image(task.image_path)
        if image.fingerprint != task.fingerprint:
            raise ExecutorError(
                f"worker {self.address} sees another image at {task.image_path} than the daemon (its metadata "
                "or array layout differs): it is being rewritten, or executor.path_map maps to another folder")
        with self._lock:
            self._images[key] = image
            while len(self._images) > IMAGE_CACHE_SIZE:
                self._images.popitem(last=False)
        return image

    def run(self, task: SegmentTask) -> TaskResult:
        """Read and segment one task; every error is returned in the result, never raised.

        A worker that cannot run the task at all (it does not see the image, or cellseg1d cannot be
        configured there) answers a ``cluster`` error: the job is retried without counting the attempt.
        What the task's own code raises is the image's or the plugin's, as with the local executor.
        """
        try:
            pm = self.manager(task.config)
            result = run_task(task, pm, self.image(task), self.address)
            result.labels = compact(result.labels)
            _check_sendable(result)
        except Exception as err:
            return TaskResult(None, worker=self.address, error=TaskError.of(err, self.address))
        with self._lock:
            self.tasks += 1
        return result


def _check_sendable(result: TaskResult) -> None:
    """Fail the task here, as the segmenter's error, when its ``details`` cannot travel to the daemon:
    otherwise Dask could not send the result, and the job would fail outside the task's code."""
    from distributed.protocol.pickle import dumps

    try:
        dumps(result.details)
    except Exception as err:
        raise PluginError(result.segmenter or "unknown", "segment",
                          f"returned details that cannot be sent to the daemon ({type(err).__name__}: {err}); "
                          "details must be plain data") from None


def _version() -> str:
    from cellseg1d import __version__

    return __version__


_FALLBACK: CellsegWorkerPlugin | None = None


def segment_on_worker(task: SegmentTask) -> TaskResult:
    """The task function the daemon submits: segment ``task`` with this worker's cellseg1d plugin."""
    global _FALLBACK
    worker = get_worker()
    plugin = worker.plugins.get(PLUGIN_NAME)
    if plugin is None:  # registered after this task was scheduled: same state, kept here
        if _FALLBACK is None:
            _FALLBACK = CellsegWorkerPlugin()
            _FALLBACK.setup(worker)
        plugin = _FALLBACK
    return plugin.run(task)


def probe(paths: list[str]) -> dict[str, Any]:
    """What ``cellseg1d doctor`` asks every worker: version, which of ``paths`` it sees, its GPUs."""
    import importlib.util

    info: dict[str, Any] = {"version": _version(), "host": socket.gethostname(),
                            "missing": [p for p in paths if not os.path.exists(p)]}
    if importlib.util.find_spec("torch") is not None:
        import torch

        info["cuda_devices"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return info
