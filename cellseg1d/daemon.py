"""The long-running service: watcher -> readiness -> catalog jobs -> worker threads -> pipeline.

One scheduler loop (the main thread) turns quiet images into catalog jobs;
``jobs.workers`` worker threads claim jobs and run the pipeline. Every
container and image is looked at on its own: whatever one raises is recorded
once as that item's bad input, never an error of the pass.

Signals: SIGTERM or SIGINT stops claiming work and lets the current images
finish for ``shutdown_timeout_seconds``; then (or at a second signal) they
are aborted and their jobs released, nothing partial is published. SIGHUP
re-reads the config file (``systemctl reload``). Under systemd (``Type=notify``)
the daemon reports READY/STATUS/RELOADING/STOPPING and feeds the watchdog
from the scheduler loop, so a hung scheduler is restarted.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from cellseg1d import __version__
from cellseg1d.catalog import Adapter, Job, JobState
from cellseg1d.catalog.containers import (
    ContainerRecord,
    forget_containers,
    record_containers,
    recorded_among,
    recorded_page,
)
from cellseg1d.catalog.db import open_catalog, redact
from cellseg1d.config import Config, WatchRoot
from cellseg1d.errors import CellsegError, ConfigError, ImageError, JobAborted, PluginError
from cellseg1d.executor import ExecutorError, TaskFailed, make_executor
from cellseg1d.executor.retry import ExecutorStreaks, executor_retry_delay
from cellseg1d.jobs import ClaimedJob, ImageFacts, JobQueue, held_jobs, release_held, run_key, run_key_prefix
from cellseg1d.logs import RepeatLimiter, log_context
from cellseg1d.ngff.discover import container_of
from cellseg1d.ngff.reader import open_image
from cellseg1d.pipeline import Pipeline
from cellseg1d.plugins import build_plugin_manager, configure_plugins, plugin_at_fault, plugin_names
from cellseg1d.registry import adapter_ref, ensure_experiment, route_for
from cellseg1d.service.sdnotify import Notifier
from cellseg1d.types import AdapterRef, ReadinessQuery
from cellseg1d.watch import Candidate, ImageTracker, Watcher, container_signature, retire_seconds_for

log = logging.getLogger("cellseg1d.daemon")
TICK_SECONDS = 0.2
#: How often the STATUS= line sent to systemd is refreshed.
STATUS_SECONDS = 5.0


def _export_rows(err: BaseException) -> list[dict[str, Any]] | None:
    """The export outcomes a failed pipeline run attached to its exception (see cellseg1d.exports)."""
    outcomes = getattr(err, "export_outcomes", None)
    return [o.as_row() for o in outcomes] if outcomes else None


class StateDirLock:
    """An exclusive lock on the state dir: one daemon per state dir (and so per SQLite catalog)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "daemon.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES):
                other = self.path.read_text().strip() or "?"
                raise ConfigError(
                    f"another cellseg1d daemon (pid {other}) is using the state dir {self.path.parent}; "
                    "stop it or give this one another state_dir"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def prepare_state_dir(state_dir: Path) -> None:
    """Create the state dir, private to the service user."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as err:
        raise ConfigError(f"setting state_dir: cannot create {state_dir}: {err.strerror}") from None
    if not os.access(state_dir, os.W_OK):
        raise ConfigError(f"setting state_dir: {state_dir} is not writable by this user")
    os.chmod(state_dir, 0o700)


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


class Daemon:
    """The cellseg1d service for one config."""

    def __init__(self, config: Config, extra_plugins: tuple[Any, ...] = (),
                 config_loader: Callable[[], Config] | None = None) -> None:
        config.check_runnable()
        self.config = config
        #: Reads the config again for SIGHUP (None: reloading is refused with a message).
        self.config_loader = config_loader
        self.reload_event = threading.Event()
        self.limiter = RepeatLimiter(log)
        self.notifier = Notifier.from_env()
        #: When the scheduler loop last ran (monotonic), for the watchdog and /healthz.
        self.last_tick = time.monotonic()
        self._last_ping = 0.0
        self._stop_requested_at: float | None = None
        self.stop_event = threading.Event()  # stop claiming work
        self.abort_event = threading.Event()  # abandon work in progress
        self.work_event = threading.Event()
        prepare_state_dir(config.state_dir)
        self.lock = StateDirLock(config.state_dir)
        self.lock.acquire()
        try:
            self.catalog = open_catalog(config)
            self.catalog.migrate()
            self.pm = build_plugin_manager(config.plugins.enable, config.plugins.disable, extra_plugins)
            configure_plugins(self.pm, config)
            if not self.pm.hook.segment.get_hookimpls():
                raise ConfigError(
                    "no segmenter: every plugin implementing 'segment' is disabled. Remove "
                    "'classical' from plugins.disable or enable a model plugin in plugins.enable"
                )
            #: Where planes are segmented: here, or on the Dask cluster (connected now: a clear error if down).
            self.executor = make_executor(config, self.pm)
            self.executor.start()
        except BaseException:
            if hasattr(self, "catalog"):
                self.catalog.close()
            self.lock.release()
            raise
        self.node_id = f"{socket.gethostname()}:{config.state_dir.resolve()}"
        self.queue = JobQueue(
            self.catalog, f"{self.node_id}#{os.getpid()}", config.jobs.lease_seconds,
            config.jobs.max_attempts, config.jobs.retry_backoff_seconds,
        )
        self.pipeline = Pipeline(config, self.pm, self.executor)
        #: Whether the built-in SAM segmenter runs (adapters, experiments' routes apply).
        self.sam_enabled = config.sam.checkpoint is not None and self.pm.has_plugin("sam")
        self.roots = config.watch.roots
        #: Roots removed by a reload: their queued and running jobs still finish.
        self._retired_roots: list[WatchRoot] = []
        #: Wakes the background sweep (new and changed containers): at start, reload, lost events.
        self._sweep_wake = threading.Event()
        self._sweeper: threading.Thread | None = None
        self.tracker = self._new_tracker(config)
        self.watcher: Watcher | None = None
        self._waiting_logged: set[Path] = set()
        #: Jobs this process's workers hold (their leases may lapse during a catalog outage).
        self._active: set[int] = set()
        #: Executor errors in a row (per job: its retry delay; for the daemon: logged once per streak).
        self._executor_streaks = ExecutorStreaks()
        self.telemetry: Any = None  # cellseg1d.service.telemetry.Telemetry with [metrics] address
        self.metrics_server: Any = None
        self._adapter_changes_seen = 0

    def _new_tracker(self, config: Config) -> ImageTracker:
        tracker = ImageTracker(
            [r.path.resolve() for r in config.watch.roots], config.watch.container_suffixes,
            config.readiness.settle_seconds, limiter=self.limiter,
            retire_seconds=retire_seconds_for(config.readiness.settle_seconds),
        )
        tracker.skip = self._recorded_containers  # finished ones: checked by their signature (_sweep)
        tracker.rescan_wanted = self._sweep_wake
        return tracker

    # -- lifecycle ------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def handle(signum: int, _frame: FrameType | None) -> None:
            if self.stop_event.is_set():
                log.warning("second %s: aborting images in progress", signal.Signals(signum).name)
                self.abort_event.set()
            else:
                log.info("%s received: finishing current images (up to shutdown_timeout_seconds = %.0f s), "
                         "then stopping (send it again to abort them)", signal.Signals(signum).name,
                         self.config.shutdown_timeout_seconds)
                self._stop_requested_at = time.monotonic()
                self.stop_event.set()
            self.work_event.set()

        def reload(_signum: int, _frame: FrameType | None) -> None:
            self.reload_event.set()  # the scheduler loop reloads: never in a signal handler

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)
        signal.signal(signal.SIGHUP, reload)

    def _start_watcher(self, polling: bool) -> None:
        watch = self.config.watch
        try:
            self.watcher = Watcher(self.tracker, polling, watch.poll_interval_seconds, watch.backend)
            self.watcher.start()
        except OSError as err:
            if polling:
                raise
            log.error("cannot watch with file events (%s); falling back to polling every %.0f s. "
                      "Raise fs.inotify.max_user_watches / max_user_instances or set watch.polling = true.",
                      err, watch.poll_interval_seconds)
            self.watcher = Watcher(self.tracker, True, watch.poll_interval_seconds)
            self.watcher.start()

    def _start_metrics(self) -> None:
        address = self.config.metrics.host_port
        if address is None:
            return
        from cellseg1d.service.telemetry import MetricsServer, Telemetry

        self.telemetry = Telemetry(self.catalog, health=self.health)
        self.metrics_server = MetricsServer(self.telemetry, *address)
        try:
            self.metrics_server.start()
        except OSError as err:
            self.metrics_server = None
            raise ConfigError(f"setting metrics.address: cannot listen on {self.config.metrics.address}: "
                              f"{err.strerror or err}; choose another port or stop what uses it") from None
        log.info("metrics on %s/metrics, health on %s/healthz", self.metrics_server.url, self.metrics_server.url)

    def run(self) -> int:
        """Run until stopped; returns the process exit code."""
        cfg = self.config
        log.info(
            "cellseg1d %s starting: catalog %s, plugins %s, segmenters %s",
            __version__, redact(self.catalog.url), plugin_names(self.pm),
            [i.plugin_name for i in reversed(self.pm.hook.segment.get_hookimpls())],
        )
        self.queue.reclaim_node(self.node_id)
        self.queue.reclaim_expired()
        from cellseg1d.reconcile import reconcile_daemon

        reconcile_daemon(self)  # unfinished jobs: leftovers of crashed attempts, unrecorded label images
        self._reroute_held()
        workers: list[threading.Thread] = []
        try:
            self._start_metrics()
            self._start_watcher(cfg.watch.polling)
            log.info("watching %d folder(s) (%s); settle time %.1f s; looking for new and changed containers "
                     "in the background", len(self.roots),
                     "polling" if self.watcher.polling else f"{self.watcher.backend} events",
                     cfg.readiness.settle_seconds)
            workers = [
                threading.Thread(target=self._worker_loop, name=f"worker-{i}", daemon=True)
                for i in range(cfg.jobs.workers)
            ]
            for w in workers:
                w.start()
            self.notifier.ready(self._status_line())
            self._sweeper = threading.Thread(target=self._sweep_loop, name="sweep", daemon=True)
            self._sweeper.start()
            self._loop()
        finally:
            self._shutdown(workers)
        return 0

    def _loop(self) -> None:
        """The scheduler loop: runs until a stop signal."""
        next_rescan = time.monotonic() + self.config.watch.rescan_seconds
        next_status = time.monotonic() + STATUS_SECONDS
        while not self.stop_event.is_set():
            self._tick()
            if self.reload_event.is_set():
                self.reload_event.clear()
                self.reload()
            self._schedule_once()
            now = time.monotonic()
            if now >= next_rescan:  # (the rescan itself runs in the background: _sweep_loop)
                self._reclaim_expired()
                self._reroute_held()
                next_rescan = time.monotonic() + self.config.watch.rescan_seconds
            if now >= next_status:
                self.notifier.status(self._status_line())
                self._count_adapter_switches()
                next_status = now + STATUS_SECONDS
            self._check_watcher()
            self.stop_event.wait(TICK_SECONDS)

    def _shutdown(self, workers: list[threading.Thread]) -> None:
        """Stop watching, let the workers finish until the shutdown deadline, then abort what is left."""
        log.info("stopping: no new work is claimed")
        self.notifier.stopping(f"stopping: finishing {len(self._active)} image(s)")
        self._sweep_wake.set()
        if self.watcher is not None:
            self.watcher.stop()
        self.work_event.set()
        started = self._stop_requested_at or time.monotonic()
        deadline = started + self.config.shutdown_timeout_seconds
        for w in workers:
            while w.is_alive():
                if not self.abort_event.is_set() and time.monotonic() >= deadline:
                    log.warning("shutdown_timeout_seconds (%.0f s) passed: aborting %d image(s) in progress; "
                                "their jobs are released for the next start",
                                self.config.shutdown_timeout_seconds, len(self._active))
                    self.abort_event.set()
                self._tick()  # still alive while draining (systemd's stop timeout bounds it)
                w.join(timeout=0.5)
        if self._sweeper is not None:
            self._sweeper.join(timeout=10)
        try:  # containers finished with are recorded now: the next start skips them
            self.tracker.retire_finished()
            self._record_retired()
        except Exception:  # noqa: BLE001 - looked at again at the next start
            log.debug("cannot record the finished containers at shutdown", exc_info=True)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.executor.close()
        self.catalog.close()
        self.lock.release()
        self.notifier.close()
        log.info("stopped")

    # -- service: watchdog, status, health, reload ------------------------------

    def _tick(self) -> None:
        """The scheduler is alive: note it, and feed systemd's watchdog at half its interval."""
        now = time.monotonic()
        self.last_tick = now
        interval = self.notifier.watchdog_interval()
        if interval is not None and now - self._last_ping >= interval:
            self._last_ping = now
            self.notifier.watchdog()

    def _status_line(self) -> str:
        """``watching 2 roots, 3 queued, 1 running`` (for systemctl status)."""
        line = f"watching {len(self.roots)} root{'' if len(self.roots) == 1 else 's'}, "
        try:
            line += f"{self._queued()} queued, "
        except Exception as err:  # noqa: BLE001 - a status line never stops the scheduler
            if not self.catalog.is_transient(err):
                self.limiter.log(logging.WARNING, ("status", type(err)), "cannot count queued jobs: %s", err)
            line += "catalog unreachable, "
        return line + f"{len(self._active)} running"

    def _queued(self) -> int:
        """Jobs in state queued (through the state index: the cost follows the queue, not the catalog)."""
        with self.catalog.session() as s:
            return int(s.scalar(select(func.count()).select_from(Job).where(Job.state == JobState.QUEUED)) or 0)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """For ``/healthz``: the scheduler ticked recently and the catalog answers."""
        from cellseg1d.service.telemetry import catalog_health

        since = time.monotonic() - self.last_tick
        info: dict[str, Any] = {"scheduler_last_tick_seconds": round(since, 3), "running": len(self._active),
                                "executor": self.executor.status()}
        if since > self.config.metrics.stale_after_seconds:
            return False, {**info, "reason": f"scheduler loop has not run for {since:.0f} s"}
        ok, why = catalog_health(self.catalog)
        if not ok:
            return False, {**info, "reason": why}
        return True, info

    #: Settings read only at start; a reload that changes them says so and keeps the running values.
    RESTART_ONLY = ("state_dir", "catalog", "sam", "adapters", "plugins", "metrics", "log_format", "jobs.workers",
                    "executor.kind", "executor.scheduler", "executor.path_map", "executor.connect_timeout_seconds")

    def reload(self) -> bool:
        """Re-read the config (SIGHUP, ``systemctl reload``) without dropping or repeating work.

        Roots (added or removed), experiment rules, readiness, segmentation,
        job retry and plugin settings take effect at once; settings in
        :attr:`RESTART_ONLY` at the next start. A config with an error is
        refused with a logged message and the running one is kept.
        """
        self.notifier.reloading()
        old = self.config
        try:
            if self.config_loader is None:
                raise ConfigError("this daemon has no config file to re-read")
            new = self.config_loader()
            new.check_runnable()
            new, needs_restart = self._keep_restart_only(old, new)
            self._configure_plugins(new, old)
        except CellsegError as err:
            log.error("configuration reload refused; the running configuration is kept: %s", err)
            self.notifier.ready(self._status_line())
            return False
        self.config = new
        self.pipeline = Pipeline(new, self.pm, self.executor)
        self.queue.lease = timedelta(seconds=new.jobs.lease_seconds)
        self.queue.max_attempts = new.jobs.max_attempts
        self.queue.backoff = new.jobs.retry_backoff_seconds
        logging.getLogger().setLevel(getattr(logging, new.log_level))
        added, removed = self._apply_roots(old, new)
        log.info("configuration reloaded: %d watched folder(s)%s%s", len(self.roots),
                 f", added {[str(p) for p in added]}" if added else "",
                 f", removed {[str(p) for p in removed]} (their queued jobs still run)" if removed else "")
        for key in needs_restart:
            log.warning("setting %s changed; it takes effect when the daemon is restarted", key)
        self.work_event.set()
        self.notifier.ready(self._status_line())
        return True

    def _keep_restart_only(self, old: Config, new: Config) -> tuple[Config, list[str]]:
        changed: list[str] = []
        update: dict[str, Any] = {}
        for key in self.RESTART_ONLY:
            section, _, field = key.partition(".")
            before, after = getattr(old, section), getattr(new, section)
            if field:
                if getattr(before, field) != getattr(after, field):
                    changed.append(key)
                    update[section] = update.get(section, after).model_copy(update={field: getattr(before, field)})
            elif before != after:
                changed.append(key)
                update[section] = before
        return (new.model_copy(update=update) if update else new), changed

    def _configure_plugins(self, new: Config, old: Config) -> None:
        """Hand the new config to every plugin; if one refuses, hand the old one back and refuse."""
        try:
            self.pm.hook.configure(config=new)
        except Exception as err:
            plugin = plugin_at_fault(self.pm, "configure", err) or "unknown"
            try:
                self.pm.hook.configure(config=old)
            except Exception:  # noqa: BLE001 - it accepted this config before
                log.exception("plugin '%s' also refused the running configuration", plugin)
            raise ConfigError(f"plugin '{plugin}' refused the new configuration: {type(err).__name__}: {err}") \
                from None

    def _apply_roots(self, old: Config, new: Config) -> tuple[list[Path], list[Path]]:
        """Watch the new config's roots; returns the paths added and removed."""
        old_paths = [r.path for r in old.watch.roots]
        new_paths = [r.path for r in new.watch.roots]
        added = [p for p in new_paths if p not in old_paths]
        removed = [p for p in old_paths if p not in new_paths]
        self._retired_roots = [r for r in self._retired_roots + [r for r in old.watch.roots if r.path in removed]
                               if r.path not in new_paths]
        rewatch = old_paths != new_paths or old.watch.container_suffixes != new.watch.container_suffixes \
            or old.watch.polling != new.watch.polling or old.watch.backend != new.watch.backend \
            or old.watch.poll_interval_seconds != new.watch.poll_interval_seconds
        self.roots = new.watch.roots
        if not rewatch:
            self.tracker.settle = new.readiness.settle_seconds
            return added, removed
        if self.watcher is not None:
            self.watcher.stop()
        # A fresh tracker: images already queued are recognised by their catalog rows, bad ones by
        # their recorded error, so nothing is queued or reported twice; the sweep finds the containers.
        self.tracker = self._new_tracker(new)
        self._start_watcher(new.watch.polling)
        self._sweep_wake.set()
        return added, removed

    def _count_adapter_switches(self) -> None:
        if self.telemetry is None or not self.sam_enabled:
            return
        from cellseg1d.builtin.sam import HOLDER

        total = HOLDER.adapter_changes()
        if total > self._adapter_changes_seen:
            self.telemetry.adapter_switched(total - self._adapter_changes_seen)
        self._adapter_changes_seen = total

    def _reclaim_expired(self) -> None:
        """Requeue jobs of daemons that died, never this daemon's own jobs in progress.

        Not during a catalog outage nor for a lease time after one: leases run
        out while nobody can renew them, and the other daemons' heartbeats get
        that long to renew theirs.
        """
        if self.catalog.seconds_since_outage() < self.config.jobs.lease_seconds:
            return
        try:
            self.queue.reclaim_expired(keep=set(self._active))
        except Exception as err:
            if self.catalog.is_transient(err):
                self.catalog.note_unreachable(err)
            else:
                log.error("cannot requeue expired jobs: %s", err)

    def _check_watcher(self) -> None:
        if self.watcher is not None and not self.watcher.alive() and not self.stop_event.is_set():
            log.error("the file watcher stopped unexpectedly (inotify limit?); switching to polling")
            self._start_watcher(True)

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
        from cellseg1d.reconcile import reconcile_finished_daemon

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

