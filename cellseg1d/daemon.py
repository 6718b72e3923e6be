"""The long-running service: watcher -> readiness -> catalog jobs -> worker threads -> pipeline.

One scheduler loop (the main thread) turns quiet images into catalog jobs;
``jobs.workers`` worker threads claim jobs and run the pipeline. SIGTERM or
SIGINT stops claiming work and lets the current images finish; a second
signal aborts them (their jobs are released, nothing partial is published).
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
from pathlib import Path
from types import FrameType
from typing import Any

from cellseg1d import __version__
from cellseg1d.catalog import Adapter
from cellseg1d.catalog.db import open_catalog, redact
from cellseg1d.config import Config, WatchRoot
from cellseg1d.errors import CellsegError, ConfigError, ImageError, JobAborted, PluginError
from cellseg1d.jobs import ClaimedJob, ImageFacts, JobQueue, held_jobs, release_held, run_key, run_key_prefix
from cellseg1d.ngff.discover import container_of
from cellseg1d.ngff.reader import open_image
from cellseg1d.pipeline import Pipeline
from cellseg1d.plugins import build_plugin_manager, plugin_at_fault, plugin_names
from cellseg1d.registry import adapter_ref, ensure_experiment, route_for
from cellseg1d.types import AdapterRef, ReadinessQuery
from cellseg1d.watch import Candidate, ImageTracker, Watcher

log = logging.getLogger("cellseg1d.daemon")
TICK_SECONDS = 0.2


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

    def __init__(self, config: Config, extra_plugins: tuple[Any, ...] = ()) -> None:
        config.check_runnable()
        self.config = config
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
            try:
                self.pm.hook.configure(config=config)
            except CellsegError as err:
                raise ConfigError(str(err)) from None
            except Exception as err:
                plugin = plugin_at_fault(self.pm, "configure", err) or "unknown"
                raise ConfigError(f"plugin '{plugin}' refused to start: {type(err).__name__}: {err}") from None
            if not self.pm.hook.segment.get_hookimpls():
                raise ConfigError(
                    "no segmenter: every plugin implementing 'segment' is disabled. Remove "
                    "'classical' from plugins.disable or enable a model plugin in plugins.enable"
                )
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
        self.pipeline = Pipeline(config, self.pm)
        #: Whether the built-in SAM segmenter runs (adapters, experiments' routes apply).
        self.sam_enabled = config.sam.checkpoint is not None and self.pm.has_plugin("sam")
        self.roots = config.watch.roots
        self.tracker = ImageTracker(
            [r.path.resolve() for r in self.roots], config.watch.container_suffixes,
            config.readiness.settle_seconds,
        )
        self.watcher: Watcher | None = None
        self._waiting_logged: set[Path] = set()
        #: Jobs this process's workers hold (their leases may lapse during a catalog outage).
        self._active: set[int] = set()

    # -- lifecycle ------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def handle(signum: int, _frame: FrameType | None) -> None:
            if self.stop_event.is_set():
                log.warning("second %s: aborting images in progress", signal.Signals(signum).name)
                self.abort_event.set()
            else:
                log.info("%s received: finishing current images, then stopping "
                         "(send it again to abort them)", signal.Signals(signum).name)
                self.stop_event.set()
            self.work_event.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def _start_watcher(self, polling: bool) -> None:
        self.watcher = Watcher(self.tracker, polling, self.config.watch.poll_interval_seconds)
        self.watcher.start()

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

        reconcile_daemon(self)  # leftovers of crashed attempts, lost or unrecorded label images
        self._reroute_held()
        try:
            self._start_watcher(cfg.watch.polling)
        except OSError as err:
            log.error("cannot watch with inotify (%s); falling back to polling every %.0f s. "
                      "Raise fs.inotify.max_user_watches or set watch.polling = true.",
                      err, cfg.watch.poll_interval_seconds)
            self._start_watcher(True)
        found = self.tracker.rescan()
        log.info("watching %d folder(s) (%s); %d container(s) already there; settle time %.1f s",
                 len(self.roots), "polling" if cfg.watch.polling else "events", found,
                 cfg.readiness.settle_seconds)
        workers = [
            threading.Thread(target=self._worker_loop, name=f"worker-{i}", daemon=True)
            for i in range(cfg.jobs.workers)
        ]
        for w in workers:
            w.start()
        next_rescan = time.monotonic() + cfg.watch.rescan_seconds
        try:
            while not self.stop_event.is_set():
                self._schedule_once()
                if time.monotonic() >= next_rescan:
                    self.tracker.rescan()
                    self._reclaim_expired()
                    self._reroute_held()
                    next_rescan = time.monotonic() + cfg.watch.rescan_seconds
                self._check_watcher()
                self.stop_event.wait(TICK_SECONDS)
        finally:
            log.info("stopping: no new work is claimed")
            if self.watcher is not None:
                self.watcher.stop()
            self.work_event.set()
            for w in workers:
                while w.is_alive():
                    w.join(timeout=0.5)
            self.catalog.close()
            self.lock.release()
            log.info("stopped")
        return 0

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
        if self.watcher is not None and not self.watcher.observer.is_alive() and not self.stop_event.is_set():
            log.error("the file watcher stopped unexpectedly (inotify limit?); switching to polling")
            self._start_watcher(True)

    # -- scheduling -----------------------------------------------------------

    def _schedule_once(self) -> None:
        try:
            ready, problems = self.tracker.poll()
            # Catalog unreachable: wait for it here (the watcher keeps collecting events meanwhile).
            for container, root_index, error in problems:
                self.catalog.retry(self._reject, container, container, root_index, error, None,
                                   until=self.stop_event)
            for cand in ready:
                self.catalog.retry(self._consider, cand, until=self.stop_event)
        except CellsegError as err:
            log.error("%s", err)
        except Exception as err:  # never let one bad folder stop the scheduler
            if not self.catalog.is_transient(err):  # (transient: stopping during a catalog outage)
                log.exception("unexpected error while checking images; continuing")

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
        key = "rejected:" + hashlib.sha256(error.encode()).hexdigest()[:16]
        if self.queue.record_rejected(self._facts(path, container, root_index, image), key, error, plugin):
            log.error("cannot process %s: %s", path, error)
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
                        experiment, experiment)
        else:
            log.info("queued %s (job %d, experiment %s%s)", cand.image, job_id, experiment,
                     f", {route.tag}" if route.tag else "")
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
            log.info("%s is quiet but %s; waiting", cand.image, why)
            self._waiting_logged.add(cand.image)

    # -- working --------------------------------------------------------------

    def _root_for(self, root: str) -> WatchRoot | None:
        return next((r for r in self.roots if str(r.path) == root), None)

    def _worker_loop(self) -> None:
        last_adapter: int | None = None
        while not self.stop_event.is_set():
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
            try:
                self._process(job)
            except Exception:
                log.exception("unexpected error while recording job %d; continuing", job.job_id)
            finally:
                self._active.discard(job.job_id)

    def _process(self, job: ClaimedJob) -> None:
        path = Path(job.image_path)
        root = self._root_for(job.root)
        if root is None:
            self.catalog.retry(self.queue.fail, job, f"{path}: its watched folder {job.root} is no longer "
                               "configured", permanent=True, until=self.abort_event)
            return
        container = container_of(path, root.path, self.config.watch.container_suffixes) or path
        adapter: AdapterRef | None = None
        if job.adapter_id is not None:
            adapter = self.catalog.retry(self._adapter, job.adapter_id, until=self.abort_event)
            if adapter is None:
                self._failed(job, f"{path}: the adapter this job was queued with (id {job.adapter_id}) was removed "
                             "from the registry; assign another one and run 'cellseg1d reprocess'",
                             permanent=True, plugin=None)
                return
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
            return
        except ImageError as err:
            self._failed(job, str(err), permanent=True, plugin=None)
            return
        except PluginError as err:
            self._failed(job, str(err), permanent=not err.transient, plugin=err.plugin)
            return
        except Exception as err:
            log.debug("job %d traceback:\n%s", job.job_id, traceback.format_exc())
            self._failed(job, f"{type(err).__name__}: {err}", permanent=False, plugin=None)
            return
        finally:
            heartbeat.stop()
        seconds = time.perf_counter() - started
        # The outputs are published: during a catalog outage keep retrying the commit (until a
        # second signal); the conditional UPDATE on the lease owner keeps it from counting twice.
        if not self.catalog.retry(self.queue.complete, job, result.catalog_fields(), seconds,
                                  until=self.abort_event):
            log.warning("job %d finished but its lease had passed to another worker", job.job_id)
            return
        log.info("done %s: %d objects by %s in %.2f s -> %s", path, result.object_count,
                 result.segmenter, seconds, result.labels_path)
        self._notify("image_done", image_path=str(path), result={
            **result.catalog_fields(), "seconds": seconds,
        })

    def _adapter(self, adapter_id: int) -> AdapterRef | None:
        """The registered adapter version ``adapter_id`` (None if it was removed)."""
        with self.catalog.session() as s:
            row = s.get(Adapter, adapter_id)
            return adapter_ref(row) if row is not None and row.removed_at is None else None

    def _failed(self, job: ClaimedJob, error: str, *, permanent: bool, plugin: str | None) -> None:
        state = self.catalog.retry(self.queue.fail, job, error, permanent=permanent, plugin=plugin,
                                   until=self.abort_event)
        retry = state == "failed"  # a failed attempt waiting for its retry (quarantined: no retry)
        log.error("failed %s%s: %s", job.image_path, " (will retry)" if retry else "", error)
        self._notify("image_failed", image_path=job.image_path, error=error, plugin=plugin, will_retry=retry)

    def _notify(self, hook: str, **kwargs: Any) -> None:
        try:
            getattr(self.pm.hook, hook)(**kwargs)
        except Exception as err:
            plugin = plugin_at_fault(self.pm, hook, err) or "unknown"
            log.error("plugin '%s' failed in notification hook '%s': %s", plugin, hook, err)


def configure_logging(level: str) -> None:
    """Plain, timestamped log lines on stderr (journald keeps them under systemd)."""
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("watchdog", "alembic", "numcodecs", "zarr", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, getattr(logging, level)))
