"""Executors: where the planes of a job are segmented (``[executor] kind``).

* ``local`` (:class:`~cellseg1d.pipeline.executor.local.LocalExecutor`): in the
  daemon's worker thread, with the daemon's loaded models.
* ``dask`` (:class:`~cellseg1d.pipeline.executor.dask.DaskExecutor`): on a Dask
  cluster; each worker keeps its own models (:mod:`cellseg1d.pipeline.executor.worker`).

Both take the same :class:`~cellseg1d.pipeline.executor.tasks.SegmentTask` list (one
task per plane, or per block of a plane larger than ``executor.block_size``)
and yield results in task order; the pipeline stitches blocks, numbers the
objects and stages, publishes and commits exactly as before.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import pluggy

from cellseg1d.config import Config
from cellseg1d.pipeline.executor.tasks import (
    ExecutorError,
    ExecutorUnavailable,
    Region,
    SegmentTask,
    TaskError,
    TaskFailed,
    TaskResult,
)

__all__ = [
    "Executor", "ExecutorError", "ExecutorUnavailable", "Region", "SegmentTask", "TaskError", "TaskFailed",
    "TaskResult", "block_starts", "make_executor", "plane_regions",
]


class Executor(Protocol):
    """What the pipeline and the daemon need from an executor."""

    kind: str

    def start(self) -> None:
        """Connect (raises ConfigError with a clear message when it cannot)."""

    def available(self) -> bool:
        """Whether tasks can be run now (False: the daemon's workers wait)."""

    def describe(self) -> dict[str, Any]:
        """What provenance records about the executor."""

    def status(self) -> dict[str, Any]:
        """kind, available (and scheduler, workers) for ``/healthz``."""

    def map(self, tasks: Sequence[SegmentTask], image: Any,
            should_abort: Callable[[], bool] = ...) -> Iterator[TaskResult]:
        """Run the tasks; yield their results in task order. Raises the task's own error (ImageError,
        PluginError, TaskFailed: an attempt of the job) or an ExecutorError (the cluster's: not counted)."""

    def close(self) -> None:
        """Release connections."""


def make_executor(config: Config, pm: pluggy.PluginManager) -> Executor:
    """The executor ``config.executor.kind`` names (not started)."""
    if config.executor.kind == "dask":
        from cellseg1d.pipeline.executor.dask import DaskExecutor

        return DaskExecutor(config)
    from cellseg1d.pipeline.executor.local import LocalExecutor

    return LocalExecutor(pm)


def block_starts(length: int, block_size: int, overlap: int) -> tuple[list[int], int]:
    """Starts and size of the fewest equal blocks of at most ``block_size`` that cover ``length`` with
    neighbours overlapping by at least ``overlap`` (equal blocks: no more pixels segmented than needed)."""
    if length <= block_size:
        return [0], length
    n = math.ceil((length - overlap) / (block_size - overlap))
    size = math.ceil((length + (n - 1) * overlap) / n)  # <= block_size, since n * (block - overlap) >= length - overlap
    return [round(i * (length - size) / (n - 1)) for i in range(n)], size


def plane_regions(shape: tuple[int, int], block_size: int, overlap: int) -> list[Region]:
    """The blocks of a plane, row by row: the whole plane when it fits in ``block_size``, else overlapping
    blocks of equal size (at most ``block_size``) overlapping by at least ``overlap``."""
    (ys, h), (xs, w) = block_starts(shape[0], block_size, overlap), block_starts(shape[1], block_size, overlap)
    return [(y0, x0, y0 + h, x0 + w) for y0 in ys for x0 in xs]
