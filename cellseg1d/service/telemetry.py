"""Prometheus metrics (``/metrics``) and a health endpoint (``/healthz``) for the daemon.

Enabled by ``[metrics] address`` or ``cellseg1d run --metrics HOST:PORT`` (off by
default); docs/monitoring.md lists every metric.

Two kinds of numbers are exported:

- **catalog metrics** (``cellseg1d_jobs``, ``cellseg1d_queue_depth``,
  ``cellseg1d_images_processed_total``, ``cellseg1d_bad_inputs_total``) are
  read from the catalog at scrape time through
  :func:`cellseg1d.catalog.report.catalog_counts`, the function ``cellseg1d status``
  uses, so both always agree; on a shared PostgreSQL catalog every daemon
  reports the numbers of all of them;
- **process metrics** (job durations, adapter switches, GPU memory) count
  what this process did and start from zero at every start.

A scrape never waits long for the catalog: its query runs in a helper thread
and the scrape answers after :data:`CATALOG_TIMEOUT_S` at most, with
``cellseg1d_catalog_up 0`` and without the catalog metrics. At most one such
query (and one health check) is in flight per :class:`Telemetry`, however many
scrapes arrive while the catalog hangs.
"""

from __future__ import annotations

import json
import logging
import platform
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from socketserver import TCPServer
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cellseg1d import PIPELINE_VERSION, __version__
from cellseg1d.catalog import Catalog
from cellseg1d.catalog.db import scrub
from cellseg1d.catalog.report import catalog_counts

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Seconds a scrape or a health check waits for the catalog before reporting it down.
CATALOG_TIMEOUT_S = 2.0
#: Outcomes of :meth:`Telemetry.job_finished` (label ``outcome`` of ``cellseg1d_job_duration_seconds``).
OUTCOMES = ("done", "failed", "quarantined", "released")
#: Histogram buckets for one job: from a tiny classical image (50 ms) to a large SAM image (30 min).
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0)
#: Extra seconds given to the health callback, which may itself wait :data:`CATALOG_TIMEOUT_S` for a ping.
HEALTH_MARGIN_S = 1.0
#: Health-callback key giving the seconds since the scheduler loop last ran.
TICK_KEY = "scheduler_last_tick_seconds"

HealthCallback = Callable[[], "tuple[bool, dict[str, Any]]"]


# -- calls that may hang: one in flight, callers wait a bounded time ----------------------------------


class _Flight(Generic[T]):
    """One run of a call in a helper thread: ``done`` is set when it returned or raised."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: T | None = None
        self.error: BaseException | None = None


class _SingleFlight(Generic[T]):
    """Runs ``fn`` in a daemon thread, at most one run at a time; callers wait for it with a timeout.

    A caller arriving while a run is in flight waits for that run instead of
    starting another, so a hanging catalog holds one thread, not one per scrape.
    """

    def __init__(self, fn: Callable[[], T], name: str) -> None:
        self._fn = fn
        self._name = name
        self._lock = threading.Lock()
        self._flight: _Flight[T] | None = None

    def start(self) -> _Flight[T]:
        with self._lock:
            if self._flight is None or self._flight.done.is_set():
                flight: _Flight[T] = _Flight()
                threading.Thread(target=self._run, args=(flight,), name=self._name, daemon=True).start()
                self._flight = flight
            return self._flight

    def _run(self, flight: _Flight[T]) -> None:
        try:
            flight.value = self._fn()
        except BaseException as err:  # noqa: BLE001 - handed to the waiting caller
            flight.error = err
        finally:
            flight.done.set()


def _one_line(err: BaseException) -> str:
    text = str(getattr(err, "orig", None) or err).strip()
    return scrub(text.splitlines()[0] if text else type(err).__name__)


_PINGS: weakref.WeakKeyDictionary[Catalog, _SingleFlight[None]] = weakref.WeakKeyDictionary()
_PINGS_LOCK = threading.Lock()


def catalog_health(catalog: Catalog, timeout: float = CATALOG_TIMEOUT_S) -> tuple[bool, str]:
    """Whether the catalog answers a ping within ``timeout`` s, and a one-line reason (never a password).

    Never retries and never waits longer than ``timeout``; concurrent callers
    share one ping. The daemon combines it with its scheduler check for ``/healthz``.
    """
    with _PINGS_LOCK:
        pinger = _PINGS.get(catalog)
        if pinger is None:
            ref = weakref.ref(catalog)  # the value must not keep its key alive

            def ping() -> None:
                target = ref()
                if target is not None:
                    target.ping()

            pinger = _PINGS[catalog] = _SingleFlight(ping, "cellseg1d-catalog-ping")
    flight = pinger.start()
    if not flight.done.wait(timeout):
        return False, f"catalog did not answer within {timeout:g} s"
    if flight.error is not None:
        return False, f"catalog unreachable: {_one_line(flight.error)}"
    return True, "catalog answers"


# -- metrics -----------------------------------------------------------------------------------------


def _gpu_memory() -> list[Metric]:
    """``cellseg1d_gpu_memory_bytes`` when this process already uses CUDA; never imports torch."""
    torch = sys.modules.get("torch")
    if torch is None:
        return []
    try:
        cuda = torch.cuda
        if not cuda.is_initialized() or not cuda.is_available():
            return []
        family = GaugeMetricFamily("cellseg1d_gpu_memory_bytes",
                                   "GPU memory of this process: allocated by tensors, reserved by the "
                                   "caching allocator, and the device's total", labels=["device", "kind"])
        for index in range(cuda.device_count()):
            device = f"cuda:{index}"
            family.add_metric([device, "allocated"], float(cuda.memory_allocated(index)))
            family.add_metric([device, "reserved"], float(cuda.memory_reserved(index)))
            family.add_metric([device, "total"], float(cuda.get_device_properties(index).total_memory))
        return [family]
    except Exception:  # noqa: BLE001 - torch half-imported by another thread, a driver error: no GPU metrics
        return []


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "none"


class _CatalogCollector(Collector):
    """The metrics read at scrape time: catalog counts, catalog_up, health, scheduler tick, GPU memory."""

    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry

    def describe(self) -> Iterable[Metric]:
        # Names only (for the registry's duplicate check): registering must not query the catalog.
        return [
            GaugeMetricFamily("cellseg1d_jobs", "", labels=["state"]),
            GaugeMetricFamily("cellseg1d_queue_depth", ""),
            CounterMetricFamily("cellseg1d_images_processed", ""),
            CounterMetricFamily("cellseg1d_bad_inputs", ""),
            GaugeMetricFamily("cellseg1d_catalog_up", ""),
            GaugeMetricFamily("cellseg1d_healthy", ""),
            GaugeMetricFamily("cellseg1d_scheduler_last_tick_seconds", ""),
            GaugeMetricFamily("cellseg1d_executor_up", "", labels=["kind"]),
            GaugeMetricFamily("cellseg1d_executor_workers", ""),
            GaugeMetricFamily("cellseg1d_gpu_memory_bytes", "", labels=["device", "kind"]),
        ]

    def collect(self) -> Iterator[Metric]:
        t = self._telemetry
        deadline = time.monotonic() + t.catalog_timeout
        counts_flight = t._counts.start()
        health_flight = t._health.start() if t._health is not None else None  # both wait in parallel
        counts = t._wait_counts(counts_flight, deadline)
        if counts is not None:
            jobs = GaugeMetricFamily("cellseg1d_jobs", "Jobs in the catalog by state (all daemons sharing it)",
                                     labels=["state"])
            for state, n in counts["jobs"].items():
                jobs.add_metric([state], n)
            yield jobs
            yield GaugeMetricFamily("cellseg1d_queue_depth",
                                    "Jobs waiting to be claimed: queued plus failed (waiting for their retry)",
                                    value=counts["queue_depth"])
            yield CounterMetricFamily("cellseg1d_images_processed", "Done jobs in the catalog (every run counts)",
                                      value=counts["images_processed"])
            yield CounterMetricFamily("cellseg1d_bad_inputs", "Inputs rejected at readiness (bad input)",
                                      value=counts["bad_inputs"])
        yield GaugeMetricFamily("cellseg1d_catalog_up", "1 when the catalog answered this scrape, else 0",
                                value=1 if counts is not None else 0)
        healthy = counts is not None
        if health_flight is not None:
            answer = t._wait_health(health_flight, deadline + HEALTH_MARGIN_S)
            healthy = answer[0]
            tick = answer[1].get(TICK_KEY)
            if isinstance(tick, (int, float)):
                yield GaugeMetricFamily("cellseg1d_scheduler_last_tick_seconds",
                                        "Seconds since the scheduler loop last ran", value=float(tick))
            executor = answer[1].get("executor")
            if isinstance(executor, dict):
                up = GaugeMetricFamily("cellseg1d_executor_up", "1 when the executor can run tasks (the Dask "
                                       "scheduler is connected, or kind local), else 0", labels=["kind"])
                up.add_metric([str(executor.get("kind"))], 1 if executor.get("available") else 0)
                yield up
                if "workers" in executor:
                    yield GaugeMetricFamily("cellseg1d_executor_workers", "Workers of the Dask scheduler",
                                            value=float(executor["workers"]))
        yield GaugeMetricFamily("cellseg1d_healthy", "1 when /healthz would answer 200, else 0",
                                value=1 if healthy else 0)
        yield from _gpu_memory()


class Telemetry:
    """The daemon's metrics on a private registry, and its health answer.

    ``health``: the daemon's check, returning ``(ok, info)``; ``info`` is shown
    by ``/healthz``, its ``reason`` says why when not ok and its
    ``scheduler_last_tick_seconds`` becomes a metric. Without it, the daemon
    is healthy when the catalog answers. ``registry``: where the metrics go
    (default: a new one; never the global registry).
    """

    def __init__(self, catalog: Catalog, *, health: HealthCallback | None = None,
                 registry: CollectorRegistry | None = None, catalog_timeout: float = CATALOG_TIMEOUT_S) -> None:
        self.catalog = catalog
        self.catalog_timeout = catalog_timeout
        self.registry = registry if registry is not None else CollectorRegistry()
        self._counts: _SingleFlight[dict[str, Any]] = _SingleFlight(lambda: catalog_counts(catalog),
                                                                    "cellseg1d-metrics-catalog")
        self._health: _SingleFlight[tuple[bool, dict[str, Any]]] | None = (
            _SingleFlight(health, "cellseg1d-health") if health is not None else None)
        self._catalog_error: str | None = None  # logged when it changes, not at every scrape
        self._unknown_outcomes: set[str] = set()

        self.job_duration = Histogram(
            "cellseg1d_job_duration_seconds", "Seconds per job attempt of this process, by outcome",
            ["outcome"], buckets=DURATION_BUCKETS, registry=self.registry)
        for outcome in OUTCOMES:
            self.job_duration.labels(outcome)  # every series exists from the start
        self.adapter_switches = Counter(
            "cellseg1d_adapter_switches", "Times this process's segmenter switched LoRA adapter",
            registry=self.registry)
        self.executor_errors = Counter(
            "cellseg1d_executor_errors", "Job attempts of this process that the cluster failed (executor errors: "
            "retried with backoff, not counted as the image's attempts)", registry=self.registry)
        Info("cellseg1d_build", "Versions of this cellseg1d process", registry=self.registry).info({
            "version": __version__, "pipeline_version": PIPELINE_VERSION,
            "python": platform.python_version(), "torch": _package_version("torch"),
        })
        self.registry.register(_CatalogCollector(self))

    # -- in-process events (called by the daemon) --

    def job_finished(self, seconds: float, outcome: str) -> None:
        """Observe one job attempt of ``seconds`` ending in ``outcome`` (one of :data:`OUTCOMES`).

        An unknown outcome is logged once and not recorded: metrics never stop a worker.
        """
        if outcome not in OUTCOMES:
            if outcome not in self._unknown_outcomes:
                self._unknown_outcomes.add(outcome)
                log.warning("job_finished: unknown outcome %r not recorded (expected one of %s)",
                            outcome, ", ".join(OUTCOMES))
            return
        self.job_duration.labels(outcome).observe(max(0.0, float(seconds)))

    def executor_error(self) -> None:
        """Count one job attempt the cluster failed (an executor error, not the image's)."""
        self.executor_errors.inc()

    def adapter_switched(self, count: int = 1) -> None:
        """Count ``count`` switches of the LoRA adapter in this process's segmenter."""
        if count > 0:
            self.adapter_switches.inc(count)

    # -- answers (called by the HTTP handler) --

    def render(self) -> bytes:
        """The ``/metrics`` exposition text (Prometheus text format)."""
        return generate_latest(self.registry)

    def health_status(self) -> tuple[bool, dict[str, Any]]:
        """What ``/healthz`` answers: ``(ok, body)``, ``body["status"]`` ``ok`` or ``unhealthy`` with a reason."""
        if self._health is None:
            ok, why = catalog_health(self.catalog, self.catalog_timeout)
            info: dict[str, Any] = {"catalog": why}
            if not ok:
                info["reason"] = why
        else:
            ok, info = self._wait_health(self._health.start(),
                                         time.monotonic() + self.catalog_timeout + HEALTH_MARGIN_S)
        rest = {k: v for k, v in info.items() if k not in ("status", "reason")}
        if ok:
            return True, {"status": "ok", **rest}
        return False, {"status": "unhealthy", "reason": str(info.get("reason") or "unhealthy"), **rest}

    # -- waiting for the helper threads --

    def _wait_counts(self, flight: _Flight[dict[str, Any]], deadline: float) -> dict[str, Any] | None:
        if not flight.done.wait(max(0.0, deadline - time.monotonic())):
            error = f"catalog did not answer within {self.catalog_timeout:g} s"
        elif flight.error is not None:
            error = _one_line(flight.error)
        else:
            if self._catalog_error is not None:
                log.info("metrics: the catalog answers again")
                self._catalog_error = None
            return flight.value
        if error != self._catalog_error:
            log.warning("metrics: cannot read the catalog (%s); catalog metrics are left out, "
                        "cellseg1d_catalog_up is 0", error)
            self._catalog_error = error
        return None

    def _wait_health(self, flight: _Flight[tuple[bool, dict[str, Any]]],
                     deadline: float) -> tuple[bool, dict[str, Any]]:
        if not flight.done.wait(max(0.0, deadline - time.monotonic())):
            return False, {"reason": "health check did not answer in time"}
        if flight.error is not None:
            return False, {"reason": f"health check failed: {_one_line(flight.error)}"}
        try:
            ok, info = flight.value  # type: ignore[misc]
            return bool(ok), dict(info or {})
        except (TypeError, ValueError):
            return False, {"reason": f"health check returned {flight.value!r}, not (ok, info)"}


# -- HTTP --------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "cellseg1d"
    timeout = 30  # a client that connects and sends nothing does not keep its thread for ever

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = urlsplit(self.path).path
        try:
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, self.server.telemetry.render())
            elif path == "/healthz":
                ok, body = self.server.telemetry.health_status()
                self._send(200 if ok else 503, "application/json",
                           json.dumps(body, default=str).encode() + b"\n")
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found; try /metrics or /healthz\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away
        except Exception:  # noqa: BLE001 - one bad scrape must not take the endpoint down
            log.exception("metrics endpoint: error answering %s", path)
            try:
                self._send(500, "text/plain; charset=utf-8", b"internal error; see the cellseg1d log\n")
            except OSError:
                pass

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        """No access log: Prometheus scrapes every few seconds and stderr is the daemon's journal."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], telemetry: Telemetry, family: socket.AddressFamily) -> None:
        self.address_family = family
        self.telemetry = telemetry
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host's name up (getfqdn), which can stall on DNS.
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


def _family(host: str, port: int) -> socket.AddressFamily:
    """The address family of ``host`` (``::1`` -> IPv6, ``127.0.0.1`` -> IPv4, a name -> its first address)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return infos[0][0]


class MetricsServer:
    """``GET /metrics`` and ``GET /healthz`` on ``host:port``, served by daemon threads.

    A port of 0 takes any free port (:meth:`start` returns the bound one).
    Nothing is logged per request.
    """

    def __init__(self, telemetry: Telemetry, host: str, port: int) -> None:
        self.telemetry = telemetry
        self.host = host
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> tuple[str, int]:
        """Bind and serve in a daemon thread; returns the bound ``(host, port)``. Raises OSError if it cannot bind."""
        if self._server is None:
            server = _Server((self.host, self.port), self.telemetry, _family(self.host, self.port))
            self._server = server
            self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                            name="cellseg1d-metrics", daemon=True)
            self._thread.start()
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        """Stop serving and close the socket (requests being answered finish on their own threads)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)`` once started, else the configured one."""
        if self._server is not None:
            host, port = self._server.server_address[:2]
            return str(host), int(port)
        return self.host, self.port

    @property
    def url(self) -> str:
        """``http://host:port`` (IPv6 hosts in brackets)."""
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
