"""The local executor: the daemon's own worker thread segments each plane or block, one after another."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pluggy

from cellseg1d.errors import JobAborted
from cellseg1d.pipeline.executor.tasks import SegmentTask, TaskResult, run_task


class LocalExecutor:
    """Runs tasks in the calling thread with the daemon's plugin manager (and so its loaded models)."""

    kind = "local"

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        #: What provenance records as the worker of every plane.
        self.worker = f"local:{socket.gethostname()}"

    def start(self) -> None:
        """Nothing to connect to."""

    def available(self) -> bool:
        """Always: the work runs here."""
        return True

    def describe(self) -> dict[str, Any]:
        """What provenance records about the executor."""
        return {"kind": self.kind}

    def status(self) -> dict[str, Any]:
        """For ``/healthz`` and ``cellseg1d doctor``."""
        return {"kind": self.kind, "available": True}

    def map(self, tasks: Sequence[SegmentTask], image: Any,
            should_abort: Callable[[], bool] = lambda: False) -> Iterator[TaskResult]:
        """Segment each task in turn, reading its block from the open ``image``; results in task order."""
        for task in tasks:
            if should_abort():
                raise JobAborted(f"stopped before {task.describe()}")
            yield run_task(task, self.pm, image, self.worker)

    def close(self) -> None:
        """Nothing to release."""
