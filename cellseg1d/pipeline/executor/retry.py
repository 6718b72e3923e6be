"""Retrying jobs the cluster failed (executor errors): their delay, and what the operator is told.

An :class:`~cellseg1d.pipeline.executor.tasks.ExecutorError` is the cluster's fault,
not the image's: the daemon gives the job back without counting the attempt
(:meth:`cellseg1d.catalog.jobs.JobQueue.defer`), so no image is quarantined because a
worker or the scheduler went away. To keep a job that the cluster fails again
and again from spinning, each consecutive executor error of a job doubles its
wait (:func:`executor_retry_delay`); the first executor error after the
cluster last worked is logged, the rest of the streak only counted
(:class:`ExecutorStreaks`), until a job gets through the cluster again.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

#: The shortest wait before a job the cluster failed is claimed again (also with retry_backoff_seconds = 0).
EXECUTOR_RETRY_MIN_SECONDS = 1.0
#: The longest wait (unless jobs.retry_backoff_seconds is longer).
EXECUTOR_RETRY_MAX_SECONDS = 600.0


def executor_retry_delay(backoff: float, streak: int) -> float:
    """Seconds before a job is claimed again after its ``streak``-th executor error in a row:
    ``jobs.retry_backoff_seconds × 2^(streak-1)``, at least 1 s, at most 10 min (or the backoff itself)."""
    base = max(float(backoff), EXECUTOR_RETRY_MIN_SECONDS)
    return min(base * 2.0 ** max(0, min(streak, 64) - 1), max(EXECUTOR_RETRY_MAX_SECONDS, float(backoff)))


class ExecutorStreaks:
    """Executor errors in a row: per job (its wait grows) and for the whole daemon (logged once per streak).

    ``failed(job)`` counts one executor error and returns the job's streak and whether it opens the
    daemon's streak (log it); ``ran(job)`` records that the cluster ran a job (whatever the image's
    outcome) and returns the length of the daemon streak it ends (0: none); ``forget(job)`` drops a
    job's count (released at shutdown, lease lost).
    """

    def __init__(self, max_jobs: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_jobs = max_jobs
        self.clock = clock
        self._lock = threading.Lock()
        self._jobs: OrderedDict[int, int] = OrderedDict()
        #: Executor errors since the cluster last ran a job, and when the first of them happened.
        self.errors = 0
        self.since: float | None = None

    def failed(self, job_id: int) -> tuple[int, bool]:
        with self._lock:
            streak = self._jobs.pop(job_id, 0) + 1
            self._jobs[job_id] = streak
            while len(self._jobs) > self.max_jobs:
                self._jobs.popitem(last=False)
            first = self.errors == 0
            self.errors += 1
            if first:
                self.since = self.clock()
            return streak, first

    def ran(self, job_id: int) -> int:
        with self._lock:
            self._jobs.pop(job_id, None)
            ended, self.errors, self.since = self.errors, 0, None
            return ended

    def forget(self, job_id: int) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)
