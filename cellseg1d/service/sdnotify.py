"""The systemd notification protocol (``sd_notify``), as the cellseg1d daemon uses it.

Under ``Type=notify`` systemd passes the daemon the address of a datagram
socket in ``$NOTIFY_SOCKET``; the daemon tells it about its life cycle by
sending newline-separated ``KEY=VALUE`` assignments, one datagram per message:
``READY=1`` once the catalog is migrated and the watches are up, ``STATUS=...``
lines shown by ``systemctl status``, ``WATCHDOG=1`` keep-alive pings,
``RELOADING=1`` / ``READY=1`` around a configuration reload and
``STOPPING=1`` on shutdown.

The address is a filesystem path, or an abstract socket when it starts with
``@`` (the ``@`` stands for the leading NUL byte). When ``$NOTIFY_SOCKET`` is
not set (run by hand, in tests) every call is a cheap no-op that returns
False. Sending never raises: the daemon must not stop because systemd is
unreachable; the first failure is logged as a warning, later ones at debug
level.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping

log = logging.getLogger("cellseg1d.service.sdnotify")

#: How long one send may block when the receiver's queue is full (systemd busy or gone).
SEND_TIMEOUT_SECONDS = 2.0


def _parse_int(value: str | None) -> int | None:
    if value is None or not value.strip():
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


def _one_line(value: str | int) -> str:
    """A value as one assignment's text: booleans as 0/1; newlines (a new assignment) and NULs as spaces."""
    text = str(int(value)) if isinstance(value, bool) else str(value)
    return text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ").replace("\0", " ")


def _socket_address(value: str | None) -> str | None:
    """``$NOTIFY_SOCKET`` -> an AF_UNIX address for ``sendto``, or None if unset or unsupported."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace
    if value.startswith("/"):
        return value
    # Other forms (e.g. systemd's "vsock:CID:PORT" for virtual machines) are not used on
    # microscope PCs; treat them as "no systemd" rather than failing at every send.
    log.debug("NOTIFY_SOCKET=%r is not an AF_UNIX address; notifications are off", value)
    return None


class Notifier:
    """Sends state notifications to systemd over ``$NOTIFY_SOCKET``.

    One socket is opened lazily at the first send and reused; it is safe to
    call from several threads. Build one with :meth:`from_env`.
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None,
                 watchdog_pid: int | None = None) -> None:
        """``address``: an AF_UNIX path, or ``"\\0name"`` for an abstract socket; None disables.

        ``watchdog_usec`` and ``watchdog_pid`` are the values of ``$WATCHDOG_USEC``
        and ``$WATCHDOG_PID`` (see :meth:`watchdog_interval`).
        """
        self._address = address or None
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._sock: socket.socket | None = None
        # Re-entrant: a signal handler running on the main thread may notify while it sends.
        self._lock = threading.RLock()
        self._warned = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """A notifier for ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` in ``environ``.

        ``environ`` defaults to ``os.environ``. The variables are left in place.
        """
        env = os.environ if environ is None else environ
        return cls(
            _socket_address(env.get("NOTIFY_SOCKET")),
            watchdog_usec=_parse_int(env.get("WATCHDOG_USEC")),
            watchdog_pid=_parse_int(env.get("WATCHDOG_PID")),
        )

    @property
    def enabled(self) -> bool:
        """Whether ``NOTIFY_SOCKET`` was set to a usable address (messages are attempted)."""
        return self._address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram, e.g. ``notify(READY=1, STATUS="up")``.

        Newlines in values are replaced by spaces (they would start a new
        assignment). Never raises; returns whether the datagram was sent
        (False without fields, and when notifications are off).
        """
        if self._address is None or not fields:
            return False
        payload = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items())
        try:
            sock = self._socket()
            sock.sendto(payload.encode("utf-8", "replace"), socket.MSG_NOSIGNAL, self._address)
        except (OSError, ValueError) as err:
            self._failed(err, payload)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up (or a reload) is complete; with an optional ``STATUS=`` line."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """``STATUS=text``: the one-line status ``systemctl status`` shows (newlines become spaces)."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the keep-alive ping; send it every :meth:`watchdog_interval` seconds."""
        return self.notify(WATCHDOG=1)

    def reloading(self) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (CLOCK_MONOTONIC in µs); send ``ready()`` when done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=usec)

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown has begun; with an optional ``STATUS=`` line."""
        if status is None:
            return self.notify(STOPPING=1)
        return self.notify(STOPPING=1, STATUS=status)

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings: half of ``WATCHDOG_USEC``.

        None when the watchdog is off: ``WATCHDOG_USEC`` unset or 0, or
        ``WATCHDOG_PID`` set to another process than this one (the variables
        were inherited by a child).
        """
        if not self._watchdog_usec or self._watchdog_usec <= 0:
            return None
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def close(self) -> None:
        """Close the socket; a later send opens a new one."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = "off" if self._address is None else repr(self._address.replace("\0", "@", 1))
        return f"Notifier({where}, watchdog_interval={self.watchdog_interval()})"

    # -- internals ------------------------------------------------------------

    def _socket(self) -> socket.socket:
        with self._lock:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.settimeout(SEND_TIMEOUT_SECONDS)
                self._sock = sock
            return self._sock

    def _failed(self, err: Exception, payload: str) -> None:
        where = self._address.replace("\0", "@", 1) if self._address else "?"
        first = payload.split("\n", 1)[0]
        with self._lock:
            warned, self._warned = self._warned, True
        if not warned:
            log.warning("cannot notify systemd at %s (%s: %s); the service state shown by systemctl "
                        "may be stale. Further failures are logged at debug level",
                        where, type(err).__name__, err)
        else:
            log.debug("cannot notify systemd at %s (%s): %s", where, first, err)
