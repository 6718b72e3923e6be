"""Executors: where the planes of a job are segmented (``[executor] kind``).

* ``local`` (:class:`~cellseg1d.executor.local.LocalExecutor`): in the
  daemon's worker thread, with the daemon's loaded models.
* ``dask`` (:class:`~cellseg1d.executor.dask.DaskExecutor`): on a Dask
  cluster; each worker keeps its own models (:mod:`cellseg1d.executor.worker`).

Both take the same :class:`~cellseg1d.executor.tasks.SegmentTask` list (one
task per plane, or per block of a plane larger than ``executor.block_size``)
and yield results in task order; the pipeline stitches blocks, numbers the
objects and stages, publishes and commits exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import pluggy

from cellseg1d.config import Config
from cellseg1d.executor.tasks import (
    ExecutorError,
    ExecutorUnavailable,
    Region,
    SegmentTask,
    TaskError,
    TaskResult,
)
from cellseg1d.stitch import tile_boxes

__all__ = [
    "Executor", "ExecutorError", "ExecutorUnavailable", "Region", "SegmentTask", "TaskError", "TaskResult",
    "make_executor", "plane_regions",
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
        """Run the tasks; yield their results in task order (raises the task's error)."""

    def close(self) -> None:
        """Release connections."""


def make_executor(config: Config, pm: pluggy.PluginManager) -> Executor:
    """The executor ``config.executor.kind`` names (not started)."""
    if config.executor.kind == "dask":
        from cellseg1d.executor.dask import DaskExecutor

        return DaskExecutor(config)
    from cellseg1d.executor.local import LocalExecutor

    return LocalExecutor(pm)


def plane_regions(shape: tuple[int, int], block_size: int, overlap: int) -> list[Region]:
    """The blocks of a plane: the whole plane when it fits in ``block_size``, else overlapping blocks."""
    height, width = shape
    if height <= block_size and width <= block_size:
        return [(0, 0, height, width)]
    return tile_boxes(shape, block_size, overlap)
