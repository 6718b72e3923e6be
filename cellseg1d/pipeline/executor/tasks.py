"""One unit of segmentation work (a plane, or a block of a plane) and its result.

A :class:`SegmentTask` carries what a worker needs to segment: the image's
path and fingerprint, the plane (``t``, ``z``), the channels, the block
(``region``), the experiment, the adapter version and the config. It never
carries pixels or a model: a Dask worker reads the block itself from the
shared storage and segments with the model it keeps loaded.

:func:`run_task` is the same code for both executors: read the block, call
the ``segment`` hook, check the answer. On a Dask worker it is called with
``capture=True``: an error becomes a :class:`TaskError` in the result (plain
data that always travels back), which the daemon raises again as the
exception the local executor would have raised.

Errors fall in two classes, and the daemon counts only the first as an
attempt of the image's job:

* the task's own code path raised (reading the block, the ``segment`` hook,
  checking its answer): :class:`~cellseg1d.errors.ImageError`,
  :class:`~cellseg1d.errors.PluginError` or :class:`TaskFailed`, exactly as
  with the local executor; so is Dask's ``KilledWorker`` (the task took down
  every worker that ran it: a poison image);
* the cluster failed around the task (the scheduler went away, a worker died
  while its result was being fetched, the result never reached the daemon,
  the task could not be unpickled or run on a worker, a worker cannot see the
  image or could not configure cellseg1d): :class:`ExecutorError`. The job
  waits and is retried, and the attempt is not counted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pluggy

from cellseg1d.errors import CellsegError, ConfigError, ImageError, JobAborted, PluginError
from cellseg1d.plugins import call_hook
from cellseg1d.ngff.stats import plane_stats
from cellseg1d.types import AdapterRef, PlaneStats, Segmentation, SegmentRequest

#: (y0, x0, y1, x1) of a block in plane pixels, exclusive ends.
Region = tuple[int, int, int, int]


class ExecutorError(CellsegError):
    """The cluster failed around a task, not the task's own code (the scheduler went away, a result never
    arrived, a worker cannot see the image): the job waits and is retried; the attempt is not counted."""

    transient = True


class ExecutorUnavailable(ExecutorError):
    """The Dask scheduler cannot be reached; jobs wait until it is back."""


class TaskFailed(CellsegError):
    """The task's own code raised on a worker (a storage error reading the block, an unexpected error), or
    Dask gave up on a task that killed its workers: a failed attempt of the job, retried with backoff and
    counted, as the same error is with the local executor."""

    transient = True


@dataclass(frozen=True)
class SegmentTask:
    """Everything needed to segment one plane or block (never the pixels, never the model)."""

    image_path: Path
    fingerprint: str
    t: int
    z: int
    #: Indices of the channels to segment on the image's c axis.
    channels: tuple[int, ...]
    channel_names: tuple[str, ...]
    #: The block to read and segment; the whole plane when it fits in one block.
    region: Region
    #: (height, width) of the whole plane.
    plane_shape: tuple[int, int]
    experiment: str
    adapter: AdapterRef | None
    fallback: bool
    pixel_size: tuple[float, float] | None
    #: The daemon's :class:`cellseg1d.config.Config` (with paths as the worker sees them).
    config: Any
    #: Statistics of the whole plane, computed once by the daemon for a plane split into blocks;
    #: None for a plane segmented whole (the worker computes them from the plane it reads).
    stats: PlaneStats | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the labels this task must return."""
        y0, x0, y1, x1 = self.region
        return y1 - y0, x1 - x0

    @property
    def is_block(self) -> bool:
        """True when the task is one block of a plane split by ``executor.block_size``."""
        return self.region != (0, 0, *self.plane_shape)

    def describe(self) -> str:
        """``plane t=0 z=3 of /path`` (with the block when it is one)."""
        y0, x0, y1, x1 = self.region
        block = f" (block y={y0}:{y1} x={x0}:{x1})" if self.is_block else ""
        return f"plane t={self.t} z={self.z}{block} of {self.image_path}"


@dataclass(frozen=True)
class TaskError:
    """An error raised while running a task on a worker, as plain data."""

    #: ``cluster``: the worker itself is not fit to run the task (it cannot see the image or sees another
    #: one, cellseg1d could not be configured there): an executor error. Every other kind is the task's own.
    kind: Literal["image", "plugin", "storage", "aborted", "cluster", "other"]
    message: str
    plugin: str | None = None
    hook: str | None = None
    transient: bool = False

    @classmethod
    def of(cls, err: BaseException, where: str) -> TaskError:
        """Describe ``err`` raised on worker ``where``."""
        if isinstance(err, PluginError):
            return cls("plugin", str(err), err.plugin, err.hook, err.transient)
        if isinstance(err, ImageError):
            return cls("image", str(err))
        if isinstance(err, JobAborted):
            return cls("aborted", str(err))
        if isinstance(err, OSError):
            return cls("storage", f"on worker {where}: {type(err).__name__}: {err}", transient=True)
        if isinstance(err, (ExecutorError, ConfigError)):
            return cls("cluster", str(err), transient=True)
        return cls("other", f"on worker {where}: {type(err).__name__}: {err}", transient=True)

    def exception(self) -> Exception:
        """The exception the daemon raises for it (the one the local executor would raise)."""
        if self.kind == "plugin":
            err = PluginError(self.plugin or "unknown", self.hook or "segment", "", transient=self.transient)
            err.args = (self.message,)  # the worker's full message, plugin named once
            return err
        if self.kind == "image":
            return ImageError(self.message)
        if self.kind == "aborted":
            return JobAborted(self.message)
        if self.kind == "storage":
            return TaskFailed(f"storage error {self.message}")
        if self.kind == "cluster":
            return ExecutorError(self.message)
        return TaskFailed(self.message)


@dataclass
class TaskResult:
    """A task's labels (or its error), who segmented it and how long it took."""

    #: (h, w) labels of the task's region, 0 background (any unsigned dtype; None on error).
    labels: np.ndarray | None
    segmenter: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    #: The Dask worker's address, or ``local:<host>``.
    worker: str = ""
    #: Seconds spent reading the block and segmenting it.
    read_seconds: float = 0.0
    segment_seconds: float = 0.0
    error: TaskError | None = None


def check_labels(seg: Any, shape: tuple[int, int]) -> np.ndarray:
    """The labels of a segmenter's answer, checked against the expected (h, w) ``shape``."""
    if not isinstance(seg, Segmentation):
        raise PluginError("unknown", "segment", f"returned {type(seg).__name__}, expected Segmentation")
    labels = np.asarray(seg.labels)
    if labels.shape != shape or labels.dtype.kind not in "ui":
        raise PluginError(
            seg.segmenter, "segment",
            f"returned labels of shape {labels.shape} and dtype {labels.dtype}; "
            f"expected an integer array of shape {shape}",
        )
    if labels.size and labels.min() < 0:
        raise PluginError(seg.segmenter, "segment", "returned negative label values")
    return labels


def compact(labels: np.ndarray) -> np.ndarray:
    """The labels in the smallest unsigned dtype that holds them (half the bytes on the wire)."""
    top = int(labels.max()) if labels.size else 0
    dtype = np.uint16 if top < 2**16 else np.uint32 if top < 2**32 else np.uint64
    return labels.astype(dtype, copy=False)


def run_task(task: SegmentTask, pm: pluggy.PluginManager, image: Any, worker: str) -> TaskResult:
    """Read the task's block from the open ``image`` and segment it with the ``segment`` hook; raises on error."""
    started = time.perf_counter()
    plane = image.read_plane(task.t, task.z, task.channels, task.region if task.is_block else None)
    read = time.perf_counter() - started
    started = time.perf_counter()
    stats = task.stats if task.stats is not None else plane_stats(plane)
    request = SegmentRequest(
        image_path=task.image_path, experiment=task.experiment, t=task.t, z=task.z,
        channels=task.channel_names, pixel_size=task.pixel_size, config=task.config,
        adapter=task.adapter, fallback=task.fallback, stats=stats,
    )
    seg = call_hook(pm, "segment", plane=plane, request=request)
    if seg is None:
        raise PluginError(
            "none", "segment", "no segmenter answered; enable the built-in 'classical' plugin or a model plugin",
        )
    labels = check_labels(seg, task.shape)
    return TaskResult(labels=labels, segmenter=seg.segmenter, details=dict(seg.details), worker=worker,
                      read_seconds=read, segment_seconds=time.perf_counter() - started)
