"""The worker threads' side of the daemon: claim a job, run the pipeline, record the outcome.

:class:`Working` is mixed into :class:`~cellseg1d.service.daemon.Daemon`;
each of the ``jobs.workers`` threads runs :meth:`Working._worker_loop`. A
:class:`Heartbeat` renews the lease of the job in progress.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from cellseg1d.catalog import Adapter
from cellseg1d.catalog.jobs import ClaimedJob, JobQueue
from cellseg1d.config import WatchRoot
from cellseg1d.errors import ImageError, JobAborted, PluginError
from cellseg1d.ngff.discover import container_of
from cellseg1d.pipeline.executor import ExecutorError, TaskFailed
from cellseg1d.pipeline.executor.retry import executor_retry_delay
from cellseg1d.plugins import plugin_at_fault
from cellseg1d.routing.registry import adapter_ref
from cellseg1d.service.logs import log_context
from cellseg1d.types import AdapterRef

log = logging.getLogger("cellseg1d.service.daemon")


def _export_rows(err: BaseException) -> list[dict[str, Any]] | None:
    """The export outcomes a failed pipeline run attached to its exception (see cellseg1d.pipeline.exports)."""
    outcomes = getattr(err, "export_outcomes", None)
    return [o.as_row() for o in outcomes] if outcomes else None


class Heartbeat(threading.Thread):
    """Renews a job's lease while it runs; notices when the lease was lost."""

    def __init__(self, queue: JobQueue, job: ClaimedJob, interval: float) -> None:
        super().__init__(name=f"heartbeat-{job.job_id}", daemon=True)
        self.queue, self.job, self.interval = queue, job, interval
        self.lost = False
        self._halt = threading.Event()

    def run(self) -> None:
        catalog, wait = self.queue.catalog, self.interval
        while not self._halt.wait(wait):
            try:
                owned = self.queue.heartbeat(self.job.job_id)
            except Exception as err:
                if catalog.is_transient(err):
                    # Catalog unreachable (logged once for all threads): beat again within a second,
                    # so the lease is renewed as soon as it is back, before others think us dead.
                    catalog.note_unreachable(err)
                    wait = min(self.interval, 1.0)
                else:
                    log.warning("lease heartbeat for job %d failed: %s", self.job.job_id, err)
                continue
            catalog.note_reachable()
            wait = self.interval
            if not owned:
                self.lost = True
                return

    def stop(self) -> None:
        self._halt.set()


class Working:
    """Claiming and processing jobs on the worker threads (a Daemon mixin)."""

    # -- working --------------------------------------------------------------

    def _root_for(self, root: str) -> WatchRoot | None:
        return next((r for r in (*self.roots, *self._retired_roots) if str(r.path) == root), None)

    def _worker_loop(self) -> None:
        last_adapter: int | None = None
        while not self.stop_event.is_set():
            if not self.executor.available():  # the Dask scheduler is away: claim nothing, wait for it
                self.stop_event.wait(1.0)
                continue
            self.work_event.clear()  # before claiming, so a wake-up during the claim is not lost
            try:
                job = self.catalog.retry(self.queue.claim, prefer_adapter=last_adapter, until=self.stop_event)
            except Exception as err:
                if not self.catalog.is_transient(err):  # (transient: stopping during a catalog outage)
                    log.error("cannot claim work from the catalog: %s; retrying in 5 s", err)
                self.stop_event.wait(5)
                continue
            if job is None:
                self.work_event.wait(1.0)
                continue
            last_adapter = job.adapter_id if job.adapter_id is not None else last_adapter
            self._active.add(job.job_id)
            started = time.perf_counter()
            try:
                with log_context(image=job.image_path, job=job.job_id):
                    outcome = self._process(job)
            except Exception:
                outcome = "failed"
                log.exception("unexpected error while recording job %d; continuing", job.job_id)
            finally:
                self._active.discard(job.job_id)
            if self.telemetry is not None:
                self.telemetry.job_finished(time.perf_counter() - started, outcome)

    def _process(self, job: ClaimedJob) -> str:
        """Run one claimed job and record its outcome: "done", "failed", "quarantined" or "released"."""
        path = Path(job.image_path)
        root = self._root_for(job.root)
        if root is None:
            self.catalog.retry(self.queue.fail, job, f"{path}: its watched folder {job.root} is no longer "
                               "configured", permanent=True, until=self.abort_event)
            return "quarantined"
        container = container_of(path, root.path, self.config.watch.container_suffixes) or path
        adapter: AdapterRef | None = None
        if job.adapter_id is not None:
            adapter = self.catalog.retry(self._adapter, job.adapter_id, until=self.abort_event)
            if adapter is None:
                return self._failed(job, f"{path}: the adapter this job was queued with (id {job.adapter_id}) was "
                                    "removed from the registry; assign another one and run 'cellseg1d reprocess'",
                                    permanent=True, plugin=None, ran=False)
        heartbeat = Heartbeat(self.queue, job, max(1.0, self.config.jobs.lease_seconds / 3))
        heartbeat.start()
        started = time.perf_counter()
        log.info("processing %s (job %d, attempt %d%s)", path, job.job_id, job.attempt,
                 f", adapter {adapter.label}" if adapter else "")
        try:
            result = self.pipeline.run(
                path, root, container, should_abort=lambda: self.abort_event.is_set() or heartbeat.lost,
                experiment=job.experiment, adapter=adapter, fallback=job.run_key.endswith(":classical"),
            )
        except JobAborted as err:
            self.catalog.retry(self.queue.release, job, until=self.abort_event)
            log.warning("released job %d unfinished: %s", job.job_id, err)
            return "released"
        except ImageError as err:
            return self._failed(job, str(err), permanent=True, plugin=None, exports=_export_rows(err))
        except PluginError as err:
            return self._failed(job, str(err), permanent=not err.transient, plugin=err.plugin,
                                exports=_export_rows(err))
        except TaskFailed as err:  # the task's own code failed on a worker: an attempt, as locally
            return self._failed(job, str(err), permanent=False, plugin=None)
        except ExecutorError as err:  # the cluster failed around the task: retried, the attempt not counted
            return self._executor_failed(job, err)
        except Exception as err:
            log.debug("job %d traceback:\n%s", job.job_id, traceback.format_exc())
            return self._failed(job, f"{type(err).__name__}: {err}", permanent=False, plugin=None)
        finally:
            heartbeat.stop()
        seconds = time.perf_counter() - started
        # The outputs are published: during a catalog outage keep retrying the commit (until a
        # second signal); the conditional UPDATE on the lease owner keeps it from counting twice.
        if not self.catalog.retry(self.queue.complete, job, result.catalog_fields(), seconds,
                                  result.export_outcomes, until=self.abort_event):
            log.warning("job %d finished but its lease had passed to another worker", job.job_id)
            return "released"
        self._cluster_ran(job)
        log.info("done %s: %d objects by %s in %.2f s -> %s", path, result.object_count,
                 result.segmenter, seconds, result.labels_path)
        self._notify("image_done", image_path=str(path), result={
            **result.catalog_fields(), "seconds": seconds,
        })
        return "done"

    def _adapter(self, adapter_id: int) -> AdapterRef | None:
        """The registered adapter version ``adapter_id`` (None if it was removed)."""
        with self.catalog.session() as s:
            row = s.get(Adapter, adapter_id)
            return adapter_ref(row) if row is not None and row.removed_at is None else None

    def _failed(self, job: ClaimedJob, error: str, *, permanent: bool, plugin: str | None,
                exports: list[dict[str, Any]] | None = None, ran: bool = True) -> str:
        """Record a failed attempt; returns the job's new state ("failed": a retry waits, or "quarantined").

        ``ran``: the job went through the executor (the image or a plugin failed, not the cluster).
        """
        state = self.catalog.retry(self.queue.fail, job, error, permanent=permanent, plugin=plugin,
                                   exports=exports, until=self.abort_event)
        if ran:
            self._cluster_ran(job)
        retry = state == "failed"  # a failed attempt waiting for its retry (quarantined: no retry)
        log.error("failed %s (job %d)%s: %s", job.image_path, job.job_id, " (will retry)" if retry else "", error)
        self._notify("image_failed", image_path=job.image_path, error=error, plugin=plugin, will_retry=retry)
        return "failed" if retry else "quarantined"

    def _executor_failed(self, job: ClaimedJob, err: ExecutorError) -> str:
        """Give the job back after an executor error: retried after a growing delay, its attempt not counted.

        The first executor error since the cluster last ran a job is logged; the rest of the streak is
        logged at debug level and counted (``cellseg1d_executor_errors_total``), and its end is logged.
        No ``image_failed`` notification: the image did not fail.
        """
        streak, first = self._executor_streaks.failed(job.job_id)
        delay = executor_retry_delay(self.config.jobs.retry_backoff_seconds, streak)
        error = f"{err}; retrying in {delay:g} s, attempt not counted (an executor error, not the image's)"
        if self.telemetry is not None:
            self.telemetry.executor_error()
        if not self.catalog.retry(self.queue.defer, job, error, delay, until=self.abort_event):
            self._executor_streaks.forget(job.job_id)
            log.warning("job %d failed on the cluster but its lease had passed to another worker", job.job_id)
            return "released"
        if first:
            log.warning("cluster error on %s (job %d): %s. Jobs the cluster fails wait and are retried without "
                        "counting an attempt; further cluster errors are logged at debug level and counted in "
                        "cellseg1d_executor_errors_total until a job gets through the cluster again",
                        job.image_path, job.job_id, error)
        else:
            log.debug("cluster error on %s (job %d, %d in a row for it): %s", job.image_path, job.job_id,
                      streak, error)
        return "failed"

    def _cluster_ran(self, job: ClaimedJob) -> None:
        """The executor ran ``job`` (whatever the image's outcome): a streak of executor errors has ended."""
        ended = self._executor_streaks.ran(job.job_id)
        if ended:
            log.warning("the cluster runs jobs again (job %d) after %d cluster error(s)", job.job_id, ended)

    def _notify(self, hook: str, **kwargs: Any) -> None:
        try:
            getattr(self.pm.hook, hook)(**kwargs)
        except Exception as err:
            plugin = plugin_at_fault(self.pm, hook, err) or "unknown"
            log.error("plugin '%s' failed in notification hook '%s': %s", plugin, hook, err)
