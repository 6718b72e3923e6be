"""The Dask executor: planes and blocks are segmented on a Dask cluster, the daemon keeps the rest.

The daemon still watches, decides readiness, claims jobs, stages, publishes
and commits; only :func:`cellseg1d.pipeline.executor.worker.segment_on_worker` runs on
the cluster, so crash safety and exactly-once are those of the local
executor: a job's outputs are published and committed by the daemon that
holds its lease, whichever workers segmented it.

Faults:

* a worker dies mid-task (with or without its nanny): the scheduler reruns
  the task on another worker (Dask's own recovery); a result that lived on a
  worker that died is computed again. A task whose workers died
  ``distributed.scheduler.allowed-failures`` + 1 times comes back as
  ``KilledWorker``: a failed attempt of the job (:class:`TaskFailed`), so an
  image that kills every worker ends quarantined after ``jobs.max_attempts``;
* the scheduler goes away: the job in progress fails with an
  :class:`ExecutorUnavailable` (retried, its attempt not counted),
  :meth:`DaskExecutor.available` turns False and the daemon's workers wait
  (claiming nothing) while it reconnects every few seconds; once back, the
  worker plugin is registered again and work resumes;
* anything else the cluster raises around a task (a result that never
  arrived, a task that cannot be unpickled on a worker) is an
  :class:`ExecutorError`: retried, its attempt not counted;
* the scheduler is down at start: :meth:`DaskExecutor.start` raises a
  :class:`~cellseg1d.errors.ConfigError` naming the setting.

Fetching results: a job thread never waits on ``Future.result(timeout=...)``.
Such a timeout cancels the client's gather of that result on its event loop,
and ``distributed.Client`` shares one in-flight gather between concurrent
callers (``Client._gather_future``): a timed-out poll in one job thread then
cancels another thread's fetch, whose ``result()`` fails with
``UnboundLocalError: cannot access local variable 'result'`` (from
``distributed.utils.sync``, which catches ``Exception`` but not the
``asyncio.CancelledError`` it gets); and a gather cancelled before it started
stays the shared one for good, so every later ``result()`` of that client
fails the same way (every job quarantined until the daemon restarts). Here
each result is fetched by ``Client.gather(..., asynchronous=True)`` run on the
client's loop (:meth:`DaskExecutor._fetch`); the job thread waits on it with
a timeout that cancels nothing, so it can still notice a stop between polls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from cellseg1d.config import Config, ExecutorSettings
from cellseg1d.errors import ConfigError, JobAborted
from cellseg1d.pipeline.executor.tasks import ExecutorError, ExecutorUnavailable, SegmentTask, TaskFailed, TaskResult

log = logging.getLogger("cellseg1d.pipeline.executor")
#: Seconds between reconnection attempts while the scheduler is unreachable.
RECONNECT_SECONDS = 5.0
#: How often a waiting job checks whether it should stop.
POLL_SECONDS = 0.25


def worker_config(config: Config) -> Config:
    """``config`` with its model paths as the workers see them (``executor.path_map``)."""
    settings = config.executor
    if not settings.path_map:
        return config
    sam = config.sam.model_copy(update={
        "checkpoint": None if config.sam.checkpoint is None else settings.to_worker(config.sam.checkpoint),
        "adapter": None if config.sam.adapter is None else settings.to_worker(config.sam.adapter),
    })
    return config.model_copy(update={"sam": sam})


class DaskExecutor:
    """Sends each job's plane and block tasks to the scheduler at ``executor.scheduler``."""

    kind = "dask"

    def __init__(self, config: Config) -> None:
        self.settings: ExecutorSettings = config.executor
        self.address = str(self.settings.scheduler)
        self._client: Any = None
        self._lock = threading.Lock()
        self._next_attempt = 0.0
        self._down_logged = False
        self._mapped: tuple[Config, Config] | None = None
        # A lost scheduler is reported here, once; the client's own tracebacks (one per lost
        # connection, another when its reconnection gives up) would only repeat it.
        logging.getLogger("distributed.client").setLevel(logging.CRITICAL)

    # -- connection -------------------------------------------------------------

    def _connect(self) -> Any:
        from distributed import Client

        from cellseg1d.pipeline.executor.worker import CellsegWorkerPlugin

        client = Client(self.address, timeout=self.settings.connect_timeout_seconds, set_as_default=False,
                        name="cellseg1d")
        try:
            client.register_plugin(CellsegWorkerPlugin())
        except BaseException as err:
            client.close()
            raise ExecutorError(f"cannot install the cellseg1d worker plugin through {self.address}: "
                                f"{type(err).__name__}: {err}") from err
        return client

    def start(self) -> None:
        """Connect to the scheduler and install the worker plugin; a clear ConfigError when it is down."""
        try:
            self._client = self._connect()
        except ExecutorError as err:
            raise ConfigError(f"setting executor.kind = 'dask': {err}") from None
        except Exception as err:
            raise ConfigError(
                f"setting executor.scheduler: no Dask scheduler answers at {self.address} within "
                f"{self.settings.connect_timeout_seconds:g} s ({type(err).__name__}: {err}). Start it "
                "('dask scheduler' on the GPU server, see docs/dask.md), check the address and the firewall, "
                "or set executor.kind = 'local'") from None
        info = self.workers()
        log.info("executor: Dask scheduler %s with %d worker(s)%s", self.address, len(info),
                 "" if info else "; jobs wait until a worker joins ('dask worker " + self.address + "')")

    def _connected(self) -> Any:
        client = self._client
        if client is not None and client.status == "running":
            return client
        return None

    def available(self) -> bool:
        """Whether the scheduler is reachable; reconnects (every few seconds) when it is not."""
        if self._connected() is not None:
            return True
        with self._lock:
            if self._connected() is not None:
                return True
            now = time.monotonic()
            if now < self._next_attempt:
                return False
            self._next_attempt = now + RECONNECT_SECONDS
            old, self._client = self._client, None
            if old is not None:
                try:
                    old.close(timeout=2)
                except Exception:
                    pass
            try:
                self._client = self._connect()
            except Exception as err:
                if not self._down_logged:
                    log.error("executor: Dask scheduler %s is unreachable (%s: %s); jobs wait, trying again "
                              "every %.0f s", self.address, type(err).__name__, err, RECONNECT_SECONDS)
                    self._down_logged = True
                return False
            if self._down_logged:
                log.warning("executor: Dask scheduler %s is reachable again; work resumes", self.address)
                self._down_logged = False
        return True

    def workers(self) -> dict[str, dict[str, Any]]:
        """The scheduler's workers by address (empty when it is unreachable)."""
        client = self._connected()
        if client is None:
            return {}
        try:
            return dict(client.scheduler_info(n_workers=-1).get("workers", {}))
        except Exception:
            return {}

    def describe(self) -> dict[str, Any]:
        """What provenance records about the executor."""
        return {"kind": self.kind, "scheduler": self.address}

    def status(self) -> dict[str, Any]:
        """For ``/healthz``: the scheduler, whether it is connected and how many workers it has."""
        connected = self._connected() is not None
        return {"kind": self.kind, "scheduler": self.address, "available": connected,
                "workers": len(self.workers()) if connected else 0}

    def close(self) -> None:
        """Disconnect from the scheduler (the workers and their models stay)."""
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close(timeout=5)
            except Exception as err:
                log.debug("closing the Dask client: %s", err)

    # -- work -------------------------------------------------------------------

    def _for_workers(self, task: SegmentTask) -> SegmentTask:
        settings = self.settings
        mapped = self._mapped  # (the daemon's config, as sent): one entry, replaced at a reload
        if mapped is None or mapped[0] is not task.config:
            mapped = self._mapped = (task.config, worker_config(task.config))
        config = mapped[1]
        adapter = task.adapter
        if adapter is not None and settings.path_map:
            adapter = dataclasses.replace(adapter, path=settings.to_worker(adapter.path))
        return dataclasses.replace(task, image_path=settings.to_worker(task.image_path), adapter=adapter,
                                   config=config)

    def map(self, tasks: Sequence[SegmentTask], image: Any = None,
            should_abort: Callable[[], bool] = lambda: False) -> Iterator[TaskResult]:
        """Submit the tasks (at most ``executor.max_tasks_in_flight`` at once); yield results in task order."""
        from cellseg1d.pipeline.executor.worker import segment_on_worker

        client = self._connected()
        if client is None:
            raise ExecutorUnavailable(f"the Dask scheduler {self.address} is unreachable; the job waits for it")
        pending = deque(enumerate(self._for_workers(t) for t in tasks))
        window = tasks[0].config.executor.max_tasks_in_flight if tasks else 1  # reloadable
        batch = uuid.uuid4().hex[:12]
        in_flight: deque[tuple[SegmentTask, Any]] = deque()
        try:
            while pending or in_flight:
                while pending and len(in_flight) < window:
                    index, task = pending.popleft()
                    try:
                        future = client.submit(segment_on_worker, task, key=f"cellseg1d-{batch}-{index}", pure=False)
                    except Exception as err:
                        raise self._lost(client, err, task) from None
                    in_flight.append((task, future))
                task, future = in_flight[0]
                result = self._wait(client, task, future, should_abort)
                in_flight.popleft()
                if result.error is not None:
                    raise result.error.exception()
                yield result
        finally:
            for _, future in in_flight:
                try:
                    future.cancel()
                except Exception as err:  # the client is gone already: nothing left to cancel
                    log.debug("cancelling %s: %s", future.key, err)

    def _fetch(self, client: Any, future: Any) -> concurrent.futures.Future:
        """Fetch ``future``'s result on the client's event loop; the returned future is never cancelled.

        ``Client.gather(..., asynchronous=True)`` is the client's own coroutine (it waits for the task, then
        gathers its result, and computes it again when the worker holding it died). It runs on the
        client's loop until it ends; the job thread only waits on it (see the module's docstring).
        """
        coro = client.gather(future, asynchronous=True)
        try:
            return asyncio.run_coroutine_threadsafe(coro, client.loop.asyncio_loop)
        except RuntimeError:  # the client's loop is closed: the client went away
            coro.close()
            raise

    def _wait(self, client: Any, task: SegmentTask, future: Any, should_abort: Callable[[], bool]) -> TaskResult:
        from distributed import KilledWorker

        try:
            fetch = self._fetch(client, future)
        except Exception as err:
            raise self._lost(client, err, task) from None
        while True:
            if should_abort():
                # (the fetch is left to end on its own: map cancels the task, which ends it)
                raise JobAborted(f"stopped while {task.describe()} was on the cluster")
            if concurrent.futures.wait([fetch], timeout=POLL_SECONDS).done:  # (this wait cancels nothing)
                break
            if client.status in ("closing", "closed"):  # (closed under us: its loop may never end the fetch)
                raise self._lost(client, ConnectionError("the Dask client was closed"), task)
        try:
            return fetch.result()
        except KilledWorker as err:
            raise TaskFailed(
                f"the Dask workers running {task.describe()} died while segmenting it ({err}): the task "
                "takes down every worker that runs it (a poison image?); check the workers' logs (out of "
                "memory?); the job is retried") from None
        except (Exception, asyncio.CancelledError) as err:  # (asyncio's CancelledError is no Exception)
            raise self._lost(client, err, task) from None

    def _lost(self, client: Any, err: BaseException, task: SegmentTask) -> ExecutorError:
        """The executor error for a task the cluster did not answer (the attempt is not counted)."""
        from distributed.client import FutureCancelledError

        what = f"{type(err).__name__}: {err}"
        if (isinstance(err, OSError) or client.status != "running"
                or getattr(err, "reason", None) == "scheduler-connection-lost"):
            return ExecutorUnavailable(
                f"the cluster lost the Dask scheduler {self.address} while {task.describe()} was on it ({what})")
        if isinstance(err, FutureCancelledError):  # the scheduler dropped the task (e.g. it was restarted)
            return ExecutorError(f"the cluster cancelled {task.describe()} ({what})")
        if isinstance(err, (concurrent.futures.CancelledError, asyncio.CancelledError)):
            # The client's fetch of the result was cancelled under it: never by this executor, so its
            # state is suspect. A fresh client is cheap; the other jobs on this one are retried too.
            self._retire(client)
            return ExecutorError(f"the cluster lost the result of {task.describe()} before it reached the "
                                 f"daemon ({what}); reconnecting to {self.address}")
        return ExecutorError(f"the cluster failed to run {task.describe()} ({what}; is the same cellseg1d "
                             "version installed on the workers?)")

    def _retire(self, client: Any) -> None:
        """Stop using ``client``: the next :meth:`available` connects a new one."""
        with self._lock:
            if self._client is not client:
                return
            self._client = None
            self._next_attempt = 0.0
        log.warning("executor: a result fetch was cancelled under the Dask client; connecting a new one to %s",
                    self.address)
        try:
            client.close(timeout=2)
        except Exception as err:
            log.debug("closing the Dask client: %s", err)
