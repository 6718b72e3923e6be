"""The webhook plugin against a real HTTP server on 127.0.0.1 (nothing mocked).

The server is ``http.server.ThreadingHTTPServer`` in a thread; it records every
request (path, headers, exact body bytes) and answers from a per-test plan
(status, delay, or "wait until released").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cellseg1d_webhook as webhook
import pytest

from cellseg1d import __version__ as CELLSEG1D_VERSION
from cellseg1d.config import build_config
from cellseg1d.plugins import build_plugin_manager

LOGGER = "cellseg1d_webhook"


# ---------------------------------------------------------------------------
# A recording HTTP server
# ---------------------------------------------------------------------------


@dataclass
class Received:
    path: str
    #: The request's headers (an email.message.Message: names are case-insensitive, as in HTTP).
    headers: Any
    body: bytes
    #: When it arrived (time.monotonic()).
    at: float = 0.0

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


class Recorder:
    """What the server received, and how it answers (a plan, then ``default``)."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.plan: deque[Any] = deque()
        self.default: Any = 200
        self.cond = threading.Condition()

    def record(self, item: Received) -> Any:
        with self.cond:
            self.requests.append(item)
            self.cond.notify_all()
            return self.plan.popleft() if self.plan else self.default

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.requests) >= count, timeout)


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        answer = self.server.recorder.record(  # type: ignore[attr-defined]
            Received(self.path, self.headers, body, time.monotonic())
        )
        status = answer
        if isinstance(answer, tuple):  # (status, seconds to sleep first | Event to wait for)
            status, delay = answer
            if isinstance(delay, threading.Event):
                delay.wait(30)
            else:
                time.sleep(delay)
        try:
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
        except OSError:
            pass  # the client gave up (time-out test)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Server:
    def __init__(self, port: int = 0) -> None:
        self.recorder = Recorder()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.recorder = self.recorder  # type: ignore[attr-defined]
        self.httpd.handle_error = lambda request, address: None  # type: ignore[method-assign]
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def requests(self) -> list[Received]:
        return self.recorder.requests

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _clean_sender(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    webhook.shutdown()
    yield
    webhook.shutdown()


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    yield srv
    srv.stop()


def make_config(tmp_path: Path, **settings: Any) -> Any:
    return build_config({
        "state_dir": str(tmp_path / "state"),
        "watch": {"roots": [{"path": str(tmp_path)}]},
        "plugins": {"enable": ["webhook"]},
        "plugin_settings": {"webhook": settings},
    }, source="test")


def configure(tmp_path: Path, **settings: Any) -> webhook.Sender:
    webhook.configure(make_config(tmp_path, **settings))
    sender = webhook.current_sender()
    assert sender is not None
    return sender


RESULT = {
    "labels_path": "/data/plate.zarr/A/1/0/labels/cellseg1d",
    "object_count": 42,
    "planes": 1,
    "segmenter": "classical",
    "seconds": 1.23456,
    "provenance": {"experiment": "exp1"},
    "exports": {"records": [], "experiment": "exp1"},
}


def webhook_records(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= level]


# ---------------------------------------------------------------------------
# Bodies, headers, signature
# ---------------------------------------------------------------------------


def test_image_done_posts_one_json_summary(tmp_path, server):
    configure(tmp_path, url=server.url())
    webhook.image_done(image_path="/data/plate.zarr/A/1/0", result=RESULT)
    assert webhook.flush(10)
    assert len(server.requests) == 1
    req = server.requests[0]
    assert req.path == "/hook"
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["User-Agent"] == f"cellseg1d-webhook/{webhook.__version__}"
    assert req.headers["X-Cellseg1d-Event"] == "image_done"
    assert "X-Cellseg1d-Signature" not in req.headers  # no secret, no signature
    body = req.json
    sent_at = body.pop("sent_at")
    assert datetime.fromisoformat(sent_at).tzinfo is not None
    assert body == {
        "event": "image_done", "image_path": "/data/plate.zarr/A/1/0", "status": "done",
        "cell_count": 42, "labels_path": RESULT["labels_path"], "seconds": 1.235, "error": None,
        "segmenter": "classical", "experiment": "exp1", "cellseg1d_version": CELLSEG1D_VERSION,
    }


def test_image_failed_body_names_plugin_and_retry(tmp_path, server):
    configure(tmp_path, url=server.url())
    webhook.image_failed(image_path="/data/a.zarr", error="plugin 'x' failed in hook 'segment': boom",
                         plugin="x", will_retry=False)
    webhook.image_failed(image_path="/data/b.zarr", error="OSError: disk", plugin=None, will_retry=True)
    assert webhook.flush(10)
    first, second = (r.json for r in server.requests)
    for body in (first, second):
        body.pop("sent_at")
    assert first == {
        "event": "image_failed", "image_path": "/data/a.zarr", "status": "failed", "cell_count": None,
        "labels_path": None, "seconds": None, "error": "plugin 'x' failed in hook 'segment': boom",
        "plugin": "x", "will_retry": False, "segmenter": None, "experiment": None,
        "cellseg1d_version": CELLSEG1D_VERSION,
    }
    assert second["plugin"] is None and second["will_retry"] is True and second["image_path"] == "/data/b.zarr"


def test_signature_is_hmac_sha256_of_the_exact_body(tmp_path, server):
    secret = "correct horse battery staple"
    configure(tmp_path, url=server.url(), secret=secret)
    webhook.image_done(image_path="/data/x.zarr", result=RESULT)
    assert webhook.flush(10)
    req = server.requests[0]
    expected = "sha256=" + hmac.new(secret.encode(), req.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(req.headers["X-Cellseg1d-Signature"], expected)
    wrong = "sha256=" + hmac.new(b"another secret", req.body, hashlib.sha256).hexdigest()
    assert req.headers["X-Cellseg1d-Signature"] != wrong


def test_credentials_in_url_are_sent_as_basic_auth_and_never_logged(tmp_path, server, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    server.recorder.default = 403  # forces a logged give-up line
    url = f"http://alice:s%40cr3t@127.0.0.1:{server.port}/hook?token=qu3rysecret"
    configure(tmp_path, url=url)
    webhook.image_done(image_path="/data/x.zarr", result=RESULT)
    assert webhook.flush(10)
    req = server.requests[0]
    assert req.path == "/hook?token=qu3rysecret"
    assert req.headers["Authorization"] == "Basic " + base64.b64encode(b"alice:s@cr3t").decode()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"http://127.0.0.1:{server.port}/hook" in text
    for secret in ("alice", "s%40cr3t", "s@cr3t", "qu3rysecret"):
        assert secret not in text
    assert "s@cr3t" not in repr(webhook.current_sender().settings)


# ---------------------------------------------------------------------------
# Never blocking the worker; retries
# ---------------------------------------------------------------------------


def test_server_down_hook_returns_at_once_and_delivery_waits_for_it(tmp_path):
    port = free_port()  # nothing listens here yet
    sender = configure(tmp_path, url=f"http://127.0.0.1:{port}/hook", retries=100, backoff_seconds=0.05,
                       max_backoff_seconds=0.2, timeout_seconds=2)
    started = time.perf_counter()
    webhook.image_done(image_path="/data/x.zarr", result=RESULT)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.05, f"the hook took {elapsed * 1000:.1f} ms"
    time.sleep(0.5)  # several connection-refused attempts
    assert sender.pending() == 1 and sender.delivered == 0
    assert not webhook.flush(0.01)
    srv = Server(port)
    try:
        assert webhook.flush(10)
        assert len(srv.requests) == 1 and srv.requests[0].json["image_path"] == "/data/x.zarr"
        assert sender.delivered == 1 and sender.given_up == 0
    finally:
        srv.stop()


def test_slow_server_times_out_then_the_retry_is_delivered(tmp_path, server):
    server.recorder.plan.append((200, 1.5))  # first answer comes after the time-out
    sender = configure(tmp_path, url=server.url(), timeout_seconds=0.3, backoff_seconds=0.05)
    started = time.perf_counter()
    webhook.image_done(image_path="/data/x.zarr", result=RESULT)
    assert time.perf_counter() - started < 0.05
    assert webhook.flush(10)
    assert len(server.requests) == 2
    first, second = server.requests
    assert first.headers["X-Cellseg1d-Delivery"] == second.headers["X-Cellseg1d-Delivery"]
    assert sender.delivered == 1 and sender.given_up == 0


def test_client_error_is_not_retried_and_logged_once(tmp_path, server, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    server.recorder.default = 400
    sender = configure(tmp_path, url=server.url(), backoff_seconds=0.01)
    webhook.image_done(image_path="/data/x.zarr", result=RESULT)
    assert webhook.flush(10)
    assert len(server.requests) == 1
    assert sender.given_up == 1
    lines = webhook_records(caplog)
    assert len(lines) == 1
    assert "HTTP 400" in lines[0].getMessage() and "not retried" in lines[0].getMessage()


@pytest.mark.parametrize("status", [408, 429])
def test_timeout_and_rate_limit_answers_are_retried(tmp_path, server, status):
    server.recorder.plan.extend([status, status])
    sender = configure(tmp_path, url=server.url(), backoff_seconds=0.01)
    webhook.image_done(image_path="/data/x.zarr", result=RESULT)
    assert webhook.flush(10)
    assert len(server.requests) == 3 and sender.delivered == 1


def test_server_error_is_retried_n_times_then_given_up_with_one_line(tmp_path, server, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    server.recorder.default = 503
    sender = configure(tmp_path, url=server.url(), retries=3, backoff_seconds=0.01)
    webhook.image_done(image_path="/data/x.zarr", result=RESULT)
    assert webhook.flush(10)
    assert len(server.requests) == 4  # the first attempt and 3 retries
    assert sender.given_up == 1 and sender.delivered == 0
    lines = webhook_records(caplog)
    assert len(lines) == 1, [r.getMessage() for r in lines]
    message = lines[0].getMessage()
    assert "after 4 attempt(s)" in message and "HTTP 503" in message and "/data/x.zarr" in message


def test_backoff_doubles_between_attempts_up_to_the_cap(tmp_path, server):
    server.recorder.default = 500
    configure(tmp_path, url=server.url(), retries=3, backoff_seconds=0.2, max_backoff_seconds=0.5)
    webhook.image_done(image_path="/data/x.zarr", result=RESULT)
    assert webhook.flush(10)
    times = [r.at for r in server.requests]
    assert len(times) == 4
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # waits 0.2, 0.4, then capped at 0.5 (0.8 without the cap)
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4 and gaps[2] >= 0.5, gaps
    assert gaps[2] < 0.75, gaps


def test_full_queue_drops_the_oldest_and_logs_once_with_a_count(tmp_path, server, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    release = threading.Event()
    server.recorder.plan.append((200, release))  # the first message hangs until released
    sender = configure(tmp_path, url=server.url(), queue_size=3, timeout_seconds=20)
    webhook.image_done(image_path="/data/0.zarr", result=RESULT)
    assert server.recorder.wait_for(1)  # message 0 is in flight
    started = time.perf_counter()
    for i in range(1, 6):
        webhook.image_done(image_path=f"/data/{i}.zarr", result=RESULT)
    assert time.perf_counter() - started < 0.05
    assert sender.pending() == 4  # in flight + 3 queued
    release.set()
    assert webhook.flush(10)
    assert [r.json["image_path"] for r in server.requests] == [
        "/data/0.zarr", "/data/3.zarr", "/data/4.zarr", "/data/5.zarr",
    ]
    lines = [r.getMessage() for r in webhook_records(caplog)]
    assert len(lines) == 2, lines
    assert "queue full" in lines[0]
    assert "dropped 2 notification(s)" in lines[1]


# ---------------------------------------------------------------------------
# Through a real plugin manager and the real pipeline
# ---------------------------------------------------------------------------


def test_through_plugin_manager_and_events_filter(tmp_path, server):
    pm = build_plugin_manager(["webhook"], (), ())
    assert pm.has_plugin("webhook")
    pm.hook.configure(config=make_config(tmp_path, url=server.url(), events=["image_failed"]))
    started = time.perf_counter()
    pm.hook.image_done(image_path="/data/x.zarr", result=RESULT)
    pm.hook.image_failed(image_path="/data/x.zarr", error="boom", plugin=None, will_retry=False)
    assert time.perf_counter() - started < 0.05
    assert webhook.flush(10)
    assert [r.json["event"] for r in server.requests] == ["image_failed"]
    module = pm.get_plugin("webhook")
    assert module.CELLSEG1D_PLUGIN_API == 1


def test_one_post_per_image_of_a_real_pipeline_run(tmp_path, server, synthetic_image, run_pipeline):
    image = synthetic_image("2d")
    run = run_pipeline(image, enable=["webhook"], settings={"webhook": {"url": server.url(), "secret": "k"}})
    pm = build_plugin_manager(["webhook"], (), ())  # the daemon's notification call, as in Daemon._process
    pm.hook.image_done(image_path=str(image.path), result={**run.result.catalog_fields(), "seconds": 0.5})
    assert webhook.flush(10)
    assert len(server.requests) == 1
    req = server.requests[0]
    body = req.json
    assert body["cell_count"] == run.result.object_count == run.n_objects
    assert body["labels_path"] == str(run.labels_path)
    assert body["segmenter"] == run.result.segmenter
    assert body["experiment"] == "default"
    assert body["seconds"] == 0.5 and body["status"] == "done"
    assert req.headers["X-Cellseg1d-Signature"] == "sha256=" + hmac.new(b"k", req.body, hashlib.sha256).hexdigest()


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("settings", "expected"), [
    ({}, "plugin_settings.webhook.url: required"),
    ({"url": "ftp://example.org/x"}, "plugin_settings.webhook.url: must start with http:// or https://"),
    ({"url": "http:///nohost"}, "plugin_settings.webhook.url: no host name"),
    ({"url": "http://example.org:99999/"}, "plugin_settings.webhook.url: not a valid URL"),
    ({"url": 5}, "plugin_settings.webhook.url: expected"),
    ({"url": "https://h/", "timeout_seconds": 0}, "plugin_settings.webhook.timeout_seconds: must be greater"),
    ({"url": "https://h/", "timeout_seconds": "10"}, "plugin_settings.webhook.timeout_seconds: expected a number"),
    ({"url": "https://h/", "retries": -1}, "plugin_settings.webhook.retries: must be at least 0"),
    ({"url": "https://h/", "retries": 2.5}, "plugin_settings.webhook.retries: expected a whole number"),
    ({"url": "https://h/", "backoff_seconds": -1}, "plugin_settings.webhook.backoff_seconds: must be at least"),
    ({"url": "https://h/", "backoff_seconds": 5, "max_backoff_seconds": 1},
     "plugin_settings.webhook.max_backoff_seconds: must be at least backoff_seconds"),
    ({"url": "https://h/", "secret": ""}, "plugin_settings.webhook.secret: expected a non-empty string"),
    ({"url": "https://h/", "events": ["image_started"]}, "plugin_settings.webhook.events: unknown event"),
    ({"url": "https://h/", "events": []}, "plugin_settings.webhook.events: expected a non-empty list"),
    ({"url": "https://h/", "queue_size": 0}, "plugin_settings.webhook.queue_size: must be at least 1"),
    ({"url": "https://h/", "retry": 3}, "plugin_settings.webhook.retry: unknown setting"),
])
def test_bad_settings_are_refused_by_configure(tmp_path, settings, expected):
    pm = build_plugin_manager(["webhook"], (), ())
    with pytest.raises(ValueError, match="setting ") as info:
        pm.hook.configure(config=make_config(tmp_path, **settings))
    assert expected in str(info.value)
    assert webhook.current_sender() is None  # nothing was started


def test_refused_url_does_not_echo_its_password(tmp_path):
    with pytest.raises(ValueError) as info:
        webhook.configure(make_config(tmp_path, url="ftp://bob:hunter2@example.org/x"))
    assert "hunter2" not in str(info.value) and "bob" not in str(info.value)


def test_defaults(tmp_path):
    settings = webhook.settings_from_config(make_config(tmp_path, url="https://example.org/hook"))
    assert (settings.timeout_seconds, settings.retries, settings.backoff_seconds, settings.queue_size) == (
        10.0, 5, 1.0, 1000)
    assert settings.events == ("image_done", "image_failed") and settings.secret is None
