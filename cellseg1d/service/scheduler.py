"""The scheduler's side of the daemon: quiet images become catalog jobs; finished containers are recorded.

:class:`Scheduling` is mixed into :class:`~cellseg1d.service.daemon.Daemon`
and runs on its main thread (one pass per tick) and its background sweep
thread. It uses the daemon's ``config``, ``catalog``, ``queue``, ``tracker``,
``pm``, ``limiter`` and ``roots``. Every container and image is looked at on
its own (:meth:`Scheduling._isolated`): whatever one raises is recorded once
as that item's bad input, never an error of the pass.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from cellseg1d.catalog.containers import (
    ContainerRecord,
    forget_containers,
    record_containers,
    recorded_among,
    recorded_page,
)
from cellseg1d.catalog.jobs import ImageFacts, held_jobs, release_held, run_key, run_key_prefix
from cellseg1d.errors import CellsegError, ImageError, PluginError
from cellseg1d.ngff.reader import open_image
from cellseg1d.plugins import plugin_at_fault
from cellseg1d.routing.registry import ensure_experiment, route_for
from cellseg1d.service.watch import Candidate, container_signature
from cellseg1d.types import ReadinessQuery

log = logging.getLogger("cellseg1d.service.daemon")


class Scheduling:
    """Turning quiet images into jobs, and the background sweep of finished containers (a Daemon mixin)."""

    # -- scheduling -----------------------------------------------------------

    def _schedule_once(self) -> None:
        """One scheduling pass: report problems, hand quiet images on. Each item is isolated."""
        try:
            ready, problems = self.tracker.poll()
        except Exception as err:  # the tracker isolates containers itself: this is a last resort
            self.limiter.log(logging.ERROR, ("poll", type(err), str(err)), "unexpected error while looking for "
                             "images: %s: %s; continuing", type(err).__name__, err, exc_info=True)
            return
        for problem in problems:
            self._isolated(problem.path, self._reject, problem.path, problem.container, problem.root_index,
                           problem.error, None)
        for cand in ready:
            if self._isolated(cand.image, self._consider_isolated, cand) is False:
                # not even recorded: look again when it changes (or at restart: its container is not recorded)
                self.tracker.settled(cand, recorded=False)
            if cand.next_check == float("inf"):
                self._waiting_logged.discard(cand.image)
        self._record_retired()

    # -- finished containers: recorded, skipped while unchanged (the background sweep) -------------------

    def _record_retired(self) -> None:
        """Record the containers the tracker finished with, so that a restart skips them while unchanged."""
        retired = self.tracker.take_retired()
        if not retired:
            return
        roots = self.tracker.roots
        records = [ContainerRecord(str(r.container), str(roots[r.root_index]), r.signature, r.images)
                   for r in retired]
        try:
            self.catalog.retry(record_containers, self.catalog, records, until=self.stop_event, on_wait=self._tick)
        except Exception as err:  # looked at again at the next start: slower, never wrong
            if not self.catalog.is_transient(err):
                self.limiter.log(logging.WARNING, ("record containers", type(err)), "cannot record %d finished "
                                 "container(s): %s; they are looked at again at the next start", len(records), err)

    def _recorded_containers(self, containers: list[Path]) -> set[Path]:
        """Those of ``containers`` recorded as finished (for the tracker's rescan: left to :meth:`_sweep`)."""
        recorded = self.catalog.retry(recorded_among, self.catalog, [str(c) for c in containers],
                                      until=self.stop_event)
        return {c for c in containers if str(c) in recorded}

    def _sweep_loop(self) -> None:
        """Background: new and changed containers at start, after a reload and every ``rescan_seconds``;
        after the first sweep, the start-up reconciliation of finished images."""
        from cellseg1d.service.reconcile import reconcile_finished_daemon

        first = True
        while not self.stop_event.is_set():
            try:
                self._sweep(first)
            except Exception as err:  # noqa: BLE001 - tried again at the next rescan
                if not self.catalog.is_transient(err):
                    self.limiter.log(logging.ERROR, ("sweep", type(err)), "cannot look for new and changed "
                                     "containers: %s: %s; trying again at the next rescan", type(err).__name__, err)
            if first and not self.stop_event.is_set():
                reconcile_finished_daemon(self, self.stop_event)
            first = False
            self._sweep_wake.wait(self.config.watch.rescan_seconds)
            self._sweep_wake.clear()

    def _sweep(self, first: bool) -> None:
        """One pass: containers unknown to the catalog first (handed to the tracker as they are listed),
        then every recorded finished container, by its stat-level signature (a few stats each, no open)."""
        started = time.monotonic()
        tracker = self.tracker
        found = tracker.rescan()
        listed = time.monotonic() - started
        roots = {str(r): i for i, r in enumerate(tracker.roots) if r.is_dir()}
        unchanged = changed = gone = 0
        after = 0
        while roots and not self.stop_event.is_set() and tracker is self.tracker:
            page = self.catalog.retry(recorded_page, self.catalog, list(roots), after, until=self.stop_event)
            if not page:
                break
            after = page[-1].id
            missing = []
            for rec in page:
                container = Path(rec.path)
                if tracker.known(container):
                    continue
                if not os.path.lexists(container):
                    missing.append(rec.path)
                elif container_signature(container, rec.images) == rec.signature:
                    unchanged += 1
                elif tracker.add_container(container, roots[rec.root]):
                    changed += 1
            if missing:
                gone += len(missing)
                self.catalog.retry(forget_containers, self.catalog, missing, until=self.stop_event)
        log.log(logging.INFO if first else logging.DEBUG,
                "looked at %d container(s) in %.2f s (listed in %.2f s): %d finished and unchanged (not opened), "
                "%d changed, %d gone; the others are new", found, time.monotonic() - started, listed, unchanged,
                changed, gone)

    def _isolated(self, path: Path, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a catalog retry; an error about ``path`` is logged (bounded), never raised.

        Returns False when ``fn`` failed. A catalog outage is waited out here
        (the watchdog is still fed meanwhile); the watcher keeps collecting events.
        """
        try:
            return self.catalog.retry(fn, *args, until=self.stop_event, on_wait=self._tick)
        except Exception as err:
            if self.catalog.is_transient(err):
                return None  # stopping during a catalog outage
            self.limiter.log(logging.ERROR, ("item", path, type(err), str(err)),
                             "cannot record %s: %s: %s; the other images go on", path, type(err).__name__, err,
                             exc_info=not isinstance(err, CellsegError), extra={"image": str(path)})
            return False

    def _consider_isolated(self, cand: Candidate) -> None:
        """:meth:`_consider`, turning anything unexpected about this image into its bad-input record."""
        try:
            self._consider(cand)
        except SQLAlchemyError:
            raise  # the catalog's own trouble: retried or logged by the caller
        except Exception as err:
            log.debug("checking %s failed", cand.image, exc_info=True)
            self._reject(cand.image, cand.container, cand.root_index,
                         f"{cand.image}: unexpected error while checking this image: {type(err).__name__}: {err}",
                         None)
            self.tracker.settled(cand)

    def _facts(self, path: Path, container: Path, root_index: int, image: Any = None,
               experiment: str | None = None) -> ImageFacts:
        facts = ImageFacts(str(path), str(self.roots[root_index].path), str(container))
        if image is not None:
            facts = ImageFacts(
                facts.path, facts.root, facts.container, image.fingerprint, image.ngff_version,
                "".join(image.axes), "x".join(map(str, image.shape)), str(image.dtype), experiment,
            )
        return facts

    def _reject(self, path: Path, container: Path, root_index: int, error: str, plugin: str | None,
                image: Any = None) -> None:
        """Record ``path`` as a bad input with ``error`` (once: the same error again is not recorded)."""
        key = "rejected:" + hashlib.sha256(error.encode()).hexdigest()[:16]
        if self.queue.record_rejected(self._facts(path, container, root_index, image), key, error, plugin):
            log.error("cannot process %s: %s", path, error, extra={"image": str(path)})
            self._notify("image_failed", image_path=str(path), error=error, plugin=plugin, will_retry=False)

    def _consider(self, cand: Candidate) -> None:
        """Decide about an image that has been quiet for the settle time."""
        settings = self.config.readiness
        try:
            image = open_image(cand.image)
        except ImageError as err:
            cand.failures += 1
            if cand.failures < 2:
                # A writer may be replacing a metadata file right now: look once more.
                self.tracker.postpone(cand, max(1.0, settings.settle_seconds))
                return
            self._reject(cand.image, cand.container, cand.root_index, str(err), None)
            self.tracker.settled(cand)
            return
        if not settings.allow_missing_chunks:
            missing, total = image.missing_chunks()
            if missing:
                quiet_for = time.time() - (cand.signature.newest_mtime if cand.signature else 0.0)
                if quiet_for < settings.incomplete_after_seconds:
                    self._log_waiting(cand, f"{missing} of {total} chunks not written yet")
                    self.tracker.postpone(cand, min(30.0, settings.incomplete_after_seconds - quiet_for))
                    return
                self._reject(
                    cand.image, cand.container, cand.root_index,
                    f"{image.path / image.levels[0].path}: {missing} of {total} chunks are missing and "
                    f"nothing changed for {settings.incomplete_after_seconds:.0f} s "
                    "(readiness.incomplete_after_seconds; truncated copy or aborted acquisition?). "
                    "If your writer skips empty chunks, set readiness.allow_missing_chunks = true",
                    None, image,
                )
                self.tracker.settled(cand)
                return
        query = ReadinessQuery(image, cand.container, settings.settle_seconds, settings)
        try:
            ready = self.pm.hook.image_ready(query=query)
        except Exception as err:
            plugin = plugin_at_fault(self.pm, "image_ready", err) or "unknown"
            self._reject(cand.image, cand.container, cand.root_index,
                         f"plugin '{plugin}' failed in hook 'image_ready': {type(err).__name__}: {err}",
                         plugin, image)
            self.tracker.settled(cand)
            return
        if ready is False:
            self._log_waiting(cand, "not marked complete yet")
            self.tracker.postpone(cand, min(30.0, max(2.0, settings.settle_seconds)))
            return
        self._waiting_logged.discard(cand.image)
        if self.queue.has_version(str(cand.image), run_key_prefix(image.fingerprint)):
            self.tracker.settled(cand)  # this version was queued before (restart, rescan): nothing to do
            return
        root = self.roots[cand.root_index]
        try:
            experiment = self.pipeline.experiment_for(image, root)
        except PluginError as err:
            self._reject(cand.image, cand.container, cand.root_index, str(err), err.plugin, image)
            self.tracker.settled(cand)
            return
        ensure_experiment(self.catalog, experiment)
        route = route_for(self.catalog, experiment, root, self.sam_enabled)
        job_id = self.queue.enqueue(
            self._facts(cand.image, cand.container, cand.root_index, image, experiment),
            run_key(image.fingerprint, route.tag), adapter_id=route.adapter_id, held=route.held,
            once_per=run_key_prefix(image.fingerprint),
        )
        self.tracker.settled(cand)
        if job_id is None:
            return
        if route.held:
            log.warning("holding %s (job %d): experiment %r has no adapter; assign one with "
                        "'cellseg1d adapters assign %s NAME' and the job runs", cand.image, job_id,
                        experiment, experiment, extra={"image": str(cand.image), "job": job_id})
        else:
            log.info("queued %s (job %d, experiment %s%s)", cand.image, job_id, experiment,
                     f", {route.tag}" if route.tag else "", extra={"image": str(cand.image), "job": job_id})
            self.work_event.set()

    def _reroute_held(self) -> None:
        """Queue held jobs whose experiment got an adapter (or whose root no longer holds)."""
        if not self.sam_enabled:
            return
        try:
            with self.catalog.session() as s:
                waiting = held_jobs(s)
            released = 0
            for job in waiting:
                route = route_for(self.catalog, job.experiment or "default", self._root_for(job.root),
                                  self.sam_enabled)
                if not route.held:
                    with self.catalog.session() as s:
                        released += release_held(s, job, route.tag, route.adapter_id)
            if released:
                log.info("released %d held job(s)", released)
                self.work_event.set()
        except Exception as err:  # never let this stop the scheduler
            if self.catalog.is_transient(err):
                self.catalog.note_unreachable(err)  # logged once; checked again at the next rescan
            else:
                log.error("cannot check held jobs: %s", err)

    def _log_waiting(self, cand: Candidate, why: str) -> None:
        if cand.image not in self._waiting_logged:
            log.info("%s is quiet but %s; waiting", cand.image, why, extra={"image": str(cand.image)})
            self._waiting_logged.add(cand.image)
