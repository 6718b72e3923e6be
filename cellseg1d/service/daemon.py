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

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy import func, select

from cellseg1d import __version__
from cellseg1d.catalog import Job, JobState
from cellseg1d.catalog.db import open_catalog, redact
from cellseg1d.catalog.jobs import JobQueue
from cellseg1d.config import Config, WatchRoot
from cellseg1d.errors import CellsegError, ConfigError
from cellseg1d.pipeline.executor import make_executor
from cellseg1d.pipeline.executor.retry import ExecutorStreaks
from cellseg1d.pipeline.runner import Pipeline
from cellseg1d.plugins import build_plugin_manager, configure_plugins, plugin_at_fault, plugin_names
from cellseg1d.service.logs import RepeatLimiter
from cellseg1d.service.scheduler import Scheduling
from cellseg1d.service.sdnotify import Notifier
from cellseg1d.service.statedir import StateDirLock, prepare_state_dir
from cellseg1d.service.watch import ImageTracker, Watcher, retire_seconds_for
from cellseg1d.service.worker import Working

log = logging.getLogger("cellseg1d.service.daemon")
TICK_SECONDS = 0.2
#: How often the STATUS= line sent to systemd is refreshed.
STATUS_SECONDS = 5.0


class Daemon(Scheduling, Working):
    """The cellseg1d service for one config: process handling, service duties and reload.

    Scheduling (:mod:`~cellseg1d.service.scheduler`) and the worker threads
    (:mod:`~cellseg1d.service.worker`) are its mixins.
    """

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
        self.dashboard: Any = None  # cellseg1d.service.dashboard.DashboardHandle with [dashboard] address
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

    def _start_dashboard(self) -> None:
        """The read-only web dashboard with ``[dashboard] address`` (a ConfigError when it cannot listen)."""
        if self.config.dashboard.host_port is None:
            return
        from cellseg1d.service.dashboard import start_dashboard

        self.dashboard = start_dashboard(self.config, self.catalog, health=self.health)

    def run(self) -> int:
        """Run until stopped; returns the process exit code."""
        cfg = self.config
        log.info(
            "cellseg1d %s starting: catalog %s, plugins %s, segmenters %s%s",
            __version__, redact(self.catalog.url), plugin_names(self.pm),
            [i.plugin_name for i in reversed(self.pm.hook.segment.get_hookimpls())],
            f"; SAM profile {cfg.sam.profile} on every watched folder" if self.sam_enabled else "",
        )
        self.queue.reclaim_node(self.node_id)
        self.queue.reclaim_expired()
        from cellseg1d.service.reconcile import reconcile_daemon

        reconcile_daemon(self)  # unfinished jobs: leftovers of crashed attempts, unrecorded label images
        self._reroute_held()
        workers: list[threading.Thread] = []
        try:
            self._start_metrics()
            self._start_dashboard()
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
        if self.dashboard is not None:
            self.dashboard.stop()
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
    RESTART_ONLY = ("state_dir", "catalog", "sam", "adapters", "plugins", "metrics", "dashboard", "log_format",
                    "jobs.workers", "executor.kind", "executor.scheduler", "executor.path_map",
                    "executor.connect_timeout_seconds")

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
