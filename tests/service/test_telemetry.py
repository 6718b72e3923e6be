"""``/metrics`` and ``/healthz``: a real SQLite catalog, a real HTTP server on 127.0.0.1, scraped with urllib.

The catalog metrics must equal what ``cellseg1d status`` reports for the same
catalog; an unreachable or hanging catalog must not make a scrape fail or hang.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from cellseg1d import PIPELINE_VERSION, __version__
from cellseg1d.catalog import Catalog
from cellseg1d.catalog.jobs import JobQueue
from cellseg1d.catalog.report import status_report
from cellseg1d.service.telemetry import MetricsServer, Telemetry, catalog_health
from tests.helpers import REPO, wait_for
from tests.catalog.test_jobs import facts
from tests.catalog.test_report import KNOWN_JOBS, RESULT, populate

REFUSED_URL = "postgresql+psycopg://u:s3cret-pw@127.0.0.1:1/db"  # nothing listens on port 1


@pytest.fixture
def serve() -> Iterator:
    """Factory: a started MetricsServer on an ephemeral port; all are stopped at teardown."""
    servers: list[MetricsServer] = []

    def _serve(telemetry: Telemetry, host: str = "127.0.0.1") -> MetricsServer:
        server = MetricsServer(telemetry, host, 0)
        bound_host, port = server.start()
        assert port > 0 and bound_host == host
        servers.append(server)
        return server

    yield _serve
    for server in servers:
        server.stop()


def get(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET; HTTP errors are answers too."""
    try:
        with urllib.request.urlopen(url, timeout=15) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, parsed by prometheus_client's own parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(server: MetricsServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    code, ctype, body = get(server.url + "/metrics")
    assert code == 200 and ctype == CONTENT_TYPE_LATEST
    return samples(body)


def jobs_gauge(values: dict) -> dict[str, float]:
    return {dict(labels)["state"]: v for (name, labels), v in values.items() if name == "cellseg1d_jobs"}


def test_catalog_metrics_equal_status_report(catalog: Catalog, serve) -> None:
    populate(catalog)
    server = serve(Telemetry(catalog))
    values = scrape(server)
    report = status_report(catalog)
    assert jobs_gauge(values) == KNOWN_JOBS == report["jobs"]
    assert values["cellseg1d_queue_depth", ()] == report["queue_depth"] == 2
    assert values["cellseg1d_images_processed_total", ()] == report["images_processed"] == 3
    assert values["cellseg1d_bad_inputs_total", ()] == report["bad_inputs"] == 2
    assert values["cellseg1d_catalog_up", ()] == 1 and values["cellseg1d_healthy", ()] == 1
    build = [dict(labels) for (name, labels), _ in values.items() if name == "cellseg1d_build_info"]
    assert build == [{"version": __version__, "pipeline_version": PIPELINE_VERSION,
                      "python": sys.version.split()[0], "torch": metadata.version("torch")}]
    assert not any(name == "cellseg1d_gpu_memory_bytes" for name, _ in values)  # no CUDA in this process

    # read at scrape time: another daemon finishing a job shows at the next scrape
    q = JobQueue(catalog, "daemon#2")
    q.enqueue(facts(20), "k")
    while (job := q.claim()) is not None:
        q.complete(job, RESULT, 1.0)
    values = scrape(server)
    assert values["cellseg1d_images_processed_total", ()] == status_report(catalog)["images_processed"] == 5
    assert jobs_gauge(values)["queued"] == 0 and values["cellseg1d_queue_depth", ()] == 1  # the failed one


def test_job_durations_and_adapter_switches(catalog: Catalog, serve) -> None:
    telemetry = Telemetry(catalog)
    server = serve(telemetry)
    before = scrape(server)
    assert before["cellseg1d_job_duration_seconds_count", (("outcome", "quarantined"),)] == 0  # present at 0
    assert before["cellseg1d_adapter_switches_total", ()] == 0
    for seconds, outcome in ((0.03, "done"), (12.0, "done"), (2000.0, "failed"), (1.0, "released")):
        telemetry.job_finished(seconds, outcome)
    telemetry.job_finished(5.0, "exploded")  # unknown: logged, not recorded
    telemetry.adapter_switched()
    telemetry.adapter_switched(2)
    telemetry.adapter_switched(0)
    values = scrape(server)

    def bucket(outcome: str, le: str) -> float:
        return values["cellseg1d_job_duration_seconds_bucket", (("le", le), ("outcome", outcome))]

    assert [bucket("done", le) for le in ("0.05", "10.0", "30.0", "+Inf")] == [1, 1, 2, 2]
    assert values["cellseg1d_job_duration_seconds_sum", (("outcome", "done"),)] == pytest.approx(12.03)
    assert (bucket("failed", "1800.0"), bucket("failed", "+Inf")) == (0, 1)
    assert values["cellseg1d_job_duration_seconds_count", (("outcome", "released"),)] == 1
    assert values["cellseg1d_job_duration_seconds_count", (("outcome", "quarantined"),)] == 0
    assert not any(dict(labels).get("outcome") == "exploded" for _, labels in values)
    assert values["cellseg1d_adapter_switches_total", ()] == 3
    assert samples(telemetry.render().decode())["cellseg1d_adapter_switches_total", ()] == 3


def test_healthz_follows_the_health_callback(catalog: Catalog, serve) -> None:
    answer: dict = {"value": (True, {"scheduler_last_tick_seconds": 0.4, "running": 1})}

    def health():
        if isinstance(answer["value"], Exception):
            raise answer["value"]
        return answer["value"]

    server = serve(Telemetry(catalog, health=health))
    code, ctype, body = get(server.url + "/healthz")
    assert (code, ctype) == (200, "application/json")
    assert json.loads(body) == {"status": "ok", "scheduler_last_tick_seconds": 0.4, "running": 1}
    values = scrape(server)
    assert values["cellseg1d_scheduler_last_tick_seconds", ()] == 0.4 and values["cellseg1d_healthy", ()] == 1

    answer["value"] = (False, {"scheduler_last_tick_seconds": 45.0, "reason": "scheduler loop has not run for 45 s"})
    code, _, body = get(server.url + "/healthz")
    assert code == 503
    assert json.loads(body) == {"status": "unhealthy", "reason": "scheduler loop has not run for 45 s",
                                "scheduler_last_tick_seconds": 45.0}
    values = scrape(server)
    assert values["cellseg1d_scheduler_last_tick_seconds", ()] == 45 and values["cellseg1d_healthy", ()] == 0
    assert values["cellseg1d_catalog_up", ()] == 1  # the catalog itself is fine

    answer["value"] = RuntimeError("health check crashed")
    code, _, body = get(server.url + "/healthz")
    assert code == 503 and "health check crashed" in json.loads(body)["reason"]
    assert ("cellseg1d_scheduler_last_tick_seconds", ()) not in scrape(server)


def test_healthz_without_callback_pings_the_catalog(catalog: Catalog, serve) -> None:
    server = serve(Telemetry(catalog))
    code, _, body = get(server.url + "/healthz")
    assert code == 200 and json.loads(body)["status"] == "ok"
    assert catalog_health(catalog) == (True, "catalog answers")


def test_unreachable_catalog_scrape_still_answers_quickly(serve, monkeypatch) -> None:
    monkeypatch.delenv("CELLSEG1D_CATALOG_PASSWORD", raising=False)
    catalog = Catalog(REFUSED_URL)
    try:
        ok, why = catalog_health(catalog)
        assert not ok and why.startswith("catalog unreachable: ") and "s3cret-pw" not in why
        plain = serve(Telemetry(catalog))
        started = time.monotonic()
        values = scrape(plain)
        assert time.monotonic() - started < 3.0
        assert values["cellseg1d_catalog_up", ()] == 0 and values["cellseg1d_healthy", ()] == 0
        assert not jobs_gauge(values) and ("cellseg1d_queue_depth", ()) not in values
        assert ("cellseg1d_images_processed_total", ()) not in values
        assert any(name == "cellseg1d_build_info" for name, _ in values)  # the rest is still there
        code, _, body = get(plain.url + "/healthz")
        assert code == 503 and json.loads(body)["reason"].startswith("catalog unreachable")
        assert "s3cret-pw" not in body

        def daemon_like_health():  # what the daemon does: scheduler tick, then the catalog
            ok, why = catalog_health(catalog)
            info = {"scheduler_last_tick_seconds": 0.2}
            return (True, info) if ok else (False, {**info, "reason": why})

        combined = serve(Telemetry(catalog, health=daemon_like_health))
        started = time.monotonic()
        code, _, body = get(combined.url + "/healthz")
        values = scrape(combined)
        assert time.monotonic() - started < 6.0
        assert code == 503 and json.loads(body)["scheduler_last_tick_seconds"] == 0.2
        assert values["cellseg1d_catalog_up", ()] == 0 and values["cellseg1d_scheduler_last_tick_seconds", ()] == 0.2
    finally:
        catalog.close()


def test_a_hanging_catalog_bounds_the_scrape_and_keeps_one_query_in_flight(catalog: Catalog, serve) -> None:
    server = serve(Telemetry(catalog, catalog_timeout=0.5))
    assert scrape(server)["cellseg1d_catalog_up", ()] == 1
    db = catalog.engine.url.database
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # our sessions start with BEGIN IMMEDIATE: they wait (busy_timeout 30 s)
    try:
        started = time.monotonic()
        values = [scrape(server) for _ in range(3)]
        assert time.monotonic() - started < 6.0
        assert all(v["cellseg1d_catalog_up", ()] == 0 for v in values)
        in_flight = [t for t in threading.enumerate() if t.name == "cellseg1d-metrics-catalog"]
        assert len(in_flight) == 1  # later scrapes waited on the same query instead of piling up threads
        code, _, body = get(server.url + "/healthz")
        assert code == 503 and "did not answer within 0.5 s" in json.loads(body)["reason"]
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    wait_for(lambda: scrape(server)["cellseg1d_catalog_up", ()] == 1, 10, what="catalog_up back to 1")


def test_unknown_paths_and_two_servers_side_by_side(catalog: Catalog, serve, capsys) -> None:
    first, second = Telemetry(catalog), Telemetry(catalog)
    a, b = serve(first), serve(second)
    assert a.url != b.url
    first.adapter_switched(5)
    assert scrape(a)["cellseg1d_adapter_switches_total", ()] == 5
    assert scrape(b)["cellseg1d_adapter_switches_total", ()] == 0  # each instance has its own registry
    assert jobs_gauge(scrape(b)) == jobs_gauge(scrape(a))
    for path in ("/", "/metricsx", "/healthz/x", "/favicon.ico"):
        assert get(a.url + path)[0] == 404, path
    assert get(a.url + "/metrics?name[]=cellseg1d_jobs")[0] == 200  # query strings are ignored
    assert capsys.readouterr().err == ""  # no access-log lines
    host, port = a.address
    a.stop()
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=2).close()
    assert get(b.url + "/healthz")[0] == 200


def test_ipv6_host(catalog: Catalog, serve) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    server = serve(Telemetry(catalog), host="::1")
    assert server.url.startswith("http://[::1]:")
    assert scrape(server)["cellseg1d_catalog_up", ()] == 1


def test_gpu_memory_only_when_torch_already_uses_cuda(catalog: Catalog, monkeypatch) -> None:
    telemetry = Telemetry(catalog)
    initialized = {"value": True}
    fake = types.ModuleType("torch")
    fake.cuda = types.SimpleNamespace(
        is_initialized=lambda: initialized["value"], is_available=lambda: True, device_count=lambda: 1,
        memory_allocated=lambda i: 1000, memory_reserved=lambda i: 4096,
        get_device_properties=lambda i: types.SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setitem(sys.modules, "torch", fake)
    gpu = {dict(labels)["kind"]: v for (name, labels), v in samples(telemetry.render().decode()).items()
           if name == "cellseg1d_gpu_memory_bytes" and dict(labels)["device"] == "cuda:0"}
    assert gpu == {"allocated": 1000, "reserved": 4096, "total": 80 * 2**30}
    initialized["value"] = False  # torch imported, CUDA not used (yet)
    assert b"cellseg1d_gpu_memory_bytes" not in telemetry.render()
    fake.cuda = None  # a half-imported torch: still a good scrape
    assert b"cellseg1d_catalog_up 1.0" in telemetry.render()


def test_a_scrape_never_imports_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from cellseg1d.catalog import Catalog\n"
        "from cellseg1d.service.telemetry import Telemetry\n"
        f"c = Catalog('sqlite:///{tmp_path / 'c.sqlite'}'); c.migrate()\n"
        "body = Telemetry(c).render()\n"
        "assert b'cellseg1d_catalog_up 1.0' in body and b'cellseg1d_gpu_memory_bytes' not in body\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
