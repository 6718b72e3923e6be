"""Serving the dashboard with uvicorn: in a background thread (the daemon) or in the foreground (the command)."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

import uvicorn

from cellseg1d.catalog import Catalog
from cellseg1d.config import Config
from cellseg1d.errors import ConfigError
from cellseg1d.service.dashboard.app import build_app, make_state
from cellseg1d.service.dashboard.security import resolve_token

log = logging.getLogger(__name__)


def _bind(host: str, port: int, setting: str) -> socket.socket:
    """A listening socket on ``host:port`` (IPv4 or IPv6), or a ConfigError naming the setting."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.set_inheritable(True)
        return sock
    except OSError as err:
        raise ConfigError(f"setting {setting}: cannot listen on {host}:{port}: {err.strerror or err}; "
                          "choose another port or stop what uses it") from None


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"


class DashboardHandle:
    """A dashboard served by uvicorn in a daemon thread: :attr:`address` (its URL) and :meth:`stop`."""

    def __init__(self, server: uvicorn.Server, sock: socket.socket, token: str | None) -> None:
        self._server = server
        self._sock = sock
        self.address = _url(sock)
        self.token = token
        self._thread = threading.Thread(target=self._serve, name="cellseg1d-dashboard", daemon=True)

    def _serve(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self._sock]))
        except Exception:  # noqa: BLE001 - the daemon goes on without its dashboard
            log.exception("dashboard stopped by an error")

    def start(self, timeout: float = 10.0) -> DashboardHandle:
        """Start serving and wait until uvicorn is up."""
        self._thread.start()
        for _ in range(int(timeout * 50)):
            if self._server.started or not self._thread.is_alive():
                break
            threading.Event().wait(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and close the socket."""
        self._server.should_exit = True
        self._thread.join(timeout=timeout)
        try:
            self._sock.close()
        except OSError:
            pass

    @property
    def url_with_token(self) -> str:
        """The address a browser opens (with ``?token=`` when the dashboard needs one)."""
        return self.address + (f"/?token={self.token}" if self.token else "/")


def _server(config: Config, catalog: Catalog, host: str,
            health: Callable[[], tuple[bool, dict[str, Any]]] | None) -> tuple[uvicorn.Server, str | None]:
    token = resolve_token(config, host)
    app = build_app(make_state(config, catalog, token, health))
    # log_config None: uvicorn leaves the daemon's logging alone; no access log in the journal.
    uv = uvicorn.Config(app, log_config=None, access_log=False, log_level="warning", lifespan="off",
                        server_header=False, timeout_keep_alive=5)
    return uvicorn.Server(uv), token


def start_dashboard(config: Config, catalog: Catalog, *, address: str | None = None,
                    health: Callable[[], tuple[bool, dict[str, Any]]] | None = None) -> DashboardHandle:
    """Serve the dashboard of ``config``'s catalog in a background thread; returns the running handle.

    ``address``: ``HOST:PORT`` overriding ``dashboard.address`` (port 0 picks a free one). ``health``: the
    daemon's health check (``Daemon.health``), as ``/healthz`` uses; without it the catalog is pinged.
    Raises :class:`ConfigError` when it cannot bind or a needed token is missing.
    """
    from cellseg1d.config import parse_address

    host, port = parse_address(address) if address is not None else (config.dashboard.host_port or ("127.0.0.1", 0))
    server, token = _server(config, catalog, host, health)
    sock = _bind(host, port, "dashboard.address")
    handle = DashboardHandle(server, sock, token).start()
    log.info("dashboard on %s", handle.address)
    return handle


def serve_dashboard(config: Config, catalog: Catalog, address: str,
                    on_ready: Callable[[str, str | None], None] | None = None) -> None:
    """Serve in the foreground until interrupted (``cellseg1d dashboard``); ``on_ready(url, token)`` once bound."""
    from cellseg1d.config import parse_address

    host, port = parse_address(address)
    server, token = _server(config, catalog, host, None)
    sock = _bind(host, port, "--address")
    if on_ready is not None:
        on_ready(_url(sock), token)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        sock.close()
