"""Checkpoint download: verified, idempotent, clean on failure. Only a loopback HTTP server is contacted."""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cellseg1d.model.checkpoint import OFFICIAL, CheckpointError
from cellseg1d.model.fetch import fetch_checkpoint

PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # ~1 MB, several read chunks
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
FILENAME = OFFICIAL["vit_b"].filename


class _Server:
    """A loopback HTTP server that serves PAYLOAD at /model.pth and counts requests."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                owner.requests.append(self.path)
                if self.path != "/model.pth":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(PAYLOAD)))
                self.end_headers()
                self.wfile.write(PAYLOAD)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str = "/model.pth") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests must go straight to the loopback server, never through a configured proxy."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def test_fetch_verifies_and_is_idempotent(tmp_path: Path, server: _Server) -> None:
    path = fetch_checkpoint("vit_b", tmp_path / "models", url=server.url(), progress=False,
                            expected_sha256=PAYLOAD_SHA)
    assert path == tmp_path / "models" / FILENAME
    assert path.read_bytes() == PAYLOAD
    assert server.requests == ["/model.pth"]
    assert sorted(p.name for p in path.parent.iterdir()) == [FILENAME]  # no .partial left
    again = fetch_checkpoint("vit_b", tmp_path / "models", url=server.url(), progress=False,
                             expected_sha256=PAYLOAD_SHA)
    assert again == path and server.requests == ["/model.pth"]  # no second request


def test_fetch_with_progress_bar(tmp_path: Path, server: _Server, capsys: pytest.CaptureFixture[str]) -> None:
    path = fetch_checkpoint("vit_b", tmp_path, url=server.url(), progress=True, expected_sha256=PAYLOAD_SHA)
    assert path.read_bytes() == PAYLOAD
    assert FILENAME in capsys.readouterr().err


def test_wrong_hash_leaves_no_file(tmp_path: Path, server: _Server) -> None:
    wrong = "0" * 64
    with pytest.raises(CheckpointError) as caught:
        fetch_checkpoint("vit_b", tmp_path, url=server.url(), progress=False, expected_sha256=wrong)
    assert wrong in str(caught.value) and PAYLOAD_SHA in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_official_hash_is_the_default(tmp_path: Path, server: _Server) -> None:
    with pytest.raises(CheckpointError, match=OFFICIAL["vit_b"].sha256):
        fetch_checkpoint("vit_b", tmp_path, url=server.url(), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_http_error(tmp_path: Path, server: _Server) -> None:
    with pytest.raises(CheckpointError, match="HTTP 404"):
        fetch_checkpoint("vit_b", tmp_path, url=server.url("/missing.pth"), progress=False,
                         expected_sha256=PAYLOAD_SHA)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_server_explains_manual_copy(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(CheckpointError) as caught:
        fetch_checkpoint("vit_h", tmp_path, url=f"http://127.0.0.1:{port}/x.pth", progress=False)
    message = str(caught.value)
    assert "offline" in message
    assert str(tmp_path / OFFICIAL["vit_h"].filename) in message and OFFICIAL["vit_h"].sha256 in message
    assert list(tmp_path.iterdir()) == []


def test_existing_file_with_wrong_hash_is_kept(tmp_path: Path, server: _Server) -> None:
    target = tmp_path / FILENAME
    target.write_bytes(b"something else")
    with pytest.raises(CheckpointError, match="exists but is not the expected"):
        fetch_checkpoint("vit_b", tmp_path, url=server.url(), progress=False, expected_sha256=PAYLOAD_SHA)
    assert target.read_bytes() == b"something else" and server.requests == []


def test_unknown_model_type(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no official checkpoint for SAM model type 'tiny'"):
        fetch_checkpoint("tiny", tmp_path, url="http://127.0.0.1:1/x", progress=False)
