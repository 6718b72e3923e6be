"""cellseg1d plugin: POST a JSON summary of every finished or failed image to a URL.

Implements ``configure``, ``image_done`` and ``image_failed``. The two
notification hooks only put a message on an in-memory queue and return at
once; one background thread (``cellseg1d-webhook``, a daemon thread started
with the first message) sends the messages in order with ``urllib.request``
and retries with exponential backoff. A receiver that is down or slow delays
only that thread, never the daemon's workers.

Enable it in the daemon config::

    [plugins]
    enable = ["webhook"]

    [plugin_settings.webhook]
    url = "https://lims.example.org/hooks/cellseg1d"   # required, http or https
    secret = "a long random string"                    # optional: signs each body
    events = ["image_done", "image_failed"]            # default: both

Every request carries ``Content-Type: application/json``,
``User-Agent: cellseg1d-webhook/<version>``, ``X-Cellseg1d-Event`` (the
event), ``X-Cellseg1d-Delivery`` (an id that stays the same across the retries
of one message, for de-duplication) and, with a ``secret``,
``X-Cellseg1d-Signature: sha256=<hex HMAC-SHA256 of the exact body bytes>``.

Outcomes: a 2xx answer is a delivery. HTTP 408, 429 and 5xx answers, time-outs
and connection errors are retried (``retries`` times, waiting
``backoff_seconds``, doubling up to ``max_backoff_seconds``; a ``Retry-After``
answer is honoured within that cap); any other answer (4xx, and redirects,
which are not followed) gives up at once. A message given up is logged in one
line, after its last attempt. The URL is logged as ``scheme://host:port/path``
only: credentials and query strings never reach the log.

:func:`flush` waits until the queue is empty (tests, shutdown); at interpreter
exit the plugin waits up to ``exit_flush_seconds`` to deliver what is queued.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import hmac
import http.client
import json
import logging
import math
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cellseg1d import __version__ as CELLSEG1D_VERSION
from cellseg1d.hookspecs import hookimpl

#: The cellseg1d plugin API version this plugin was written for.
CELLSEG1D_PLUGIN_API = 1

__version__ = "0.1.0"

#: The plugin's name: its entry point and its ``[plugin_settings.<NAME>]`` table.
NAME = "webhook"
#: The events that can be sent, by hook name.
EVENTS = ("image_done", "image_failed")

USER_AGENT = f"cellseg1d-webhook/{__version__}"
SIGNATURE_HEADER = "X-Cellseg1d-Signature"
DELIVERY_HEADER = "X-Cellseg1d-Delivery"
EVENT_HEADER = "X-Cellseg1d-Event"

#: HTTP statuses worth retrying besides 5xx.
RETRY_STATUSES = frozenset({408, 429})
#: At most this much of a response body is read (and thrown away).
_MAX_RESPONSE_BYTES = 64 * 1024

log = logging.getLogger("cellseg1d_webhook")


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Settings:
    """The ``[plugin_settings.webhook]`` table of the daemon config."""

    #: Where to POST (http or https; ``user:password@`` is sent as HTTP Basic auth).
    url: str
    #: Seconds to wait for the receiver to connect and answer, per attempt.
    timeout_seconds: float = 10.0
    #: Further attempts after the first one fails with a retryable error.
    retries: int = 5
    #: Wait before the first retry; doubled for each further one.
    backoff_seconds: float = 1.0
    #: Longest wait between two attempts.
    max_backoff_seconds: float = 60.0
    #: Signs each body with HMAC-SHA256 (header X-Cellseg1d-Signature) when set.
    secret: str | None = None
    #: Which events are sent.
    events: tuple[str, ...] = EVENTS
    #: Messages waiting to be sent; when full, the oldest is dropped.
    queue_size: int = 1000
    #: At interpreter exit, wait this long at most to deliver what is queued.
    exit_flush_seconds: float = 5.0

    def __repr__(self) -> str:  # never show the secret or URL credentials
        return (
            f"Settings(url={redact_url(self.url)!r}, timeout_seconds={self.timeout_seconds}, "
            f"retries={self.retries}, backoff_seconds={self.backoff_seconds}, "
            f"max_backoff_seconds={self.max_backoff_seconds}, secret={'***' if self.secret else None}, "
            f"events={self.events}, queue_size={self.queue_size}, exit_flush_seconds={self.exit_flush_seconds})"
        )


_KNOWN = (
    "url", "timeout_seconds", "retries", "backoff_seconds", "max_backoff_seconds",
    "secret", "events", "queue_size", "exit_flush_seconds",
)


def redact_url(url: str) -> str:
    """``scheme://host:port/path`` of ``url``: no credentials, query or fragment."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<invalid URL>"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    return f"{parts.scheme}://{netloc}{parts.path}"


def _number(table: Mapping[str, Any], key: str, default: float, *, positive: bool) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"setting plugin_settings.{NAME}.{key}: expected a number of seconds, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(
            f"setting plugin_settings.{NAME}.{key}: must be {'greater than' if positive else 'at least'} 0, "
            f"got {value!r}"
        )
    return float(value)


def _integer(table: Mapping[str, Any], key: str, default: int, minimum: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"setting plugin_settings.{NAME}.{key}: expected a whole number, got {value!r}")  # noqa: TRY004 - settings errors are ValueErrors
    if value < minimum:
        raise ValueError(f"setting plugin_settings.{NAME}.{key}: must be at least {minimum}, got {value}")
    return value


def _check_url(url: Any) -> str:
    prefix = f"setting plugin_settings.{NAME}.url"
    if url is None:
        raise ValueError(f"{prefix}: required; the http:// or https:// address to POST notifications to")
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"{prefix}: expected an http:// or https:// address, got {type(url).__name__}")
    url = url.strip()
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise ValueError(f"{prefix}: not a valid URL ({redact_url(url)}): {err}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(
            f"{prefix}: must start with http:// or https://, got scheme {parts.scheme or '(none)'!r} "
            f"in {redact_url(url)}"
        )
    if not parts.hostname:
        raise ValueError(f"{prefix}: no host name in {redact_url(url)}")
    if port == 0:
        raise ValueError(f"{prefix}: port 0 in {redact_url(url)}")
    if any(ch.isspace() for ch in url):
        raise ValueError(f"{prefix}: contains white space: {redact_url(url)}")
    return url


def settings_from_config(config: Any) -> Settings:
    """Read and check ``config.plugin_settings["webhook"]``.

    Raises ValueError naming the setting (``plugin_settings.webhook.<key>``)
    when a value is wrong, missing or unknown. Messages never echo the
    secret or the URL's credentials.
    """
    table = (getattr(config, "plugin_settings", None) or {}).get(NAME) or {}
    if not isinstance(table, Mapping):
        raise ValueError(f"setting plugin_settings.{NAME}: expected a table of settings, got {table!r}")  # noqa: TRY004 - settings errors are ValueErrors
    unknown = sorted(set(table) - set(_KNOWN))
    if unknown:
        raise ValueError(
            f"setting plugin_settings.{NAME}.{unknown[0]}: unknown setting (known: {', '.join(_KNOWN)})"
        )
    url = _check_url(table.get("url"))
    timeout = _number(table, "timeout_seconds", 10.0, positive=True)
    retries = _integer(table, "retries", 5, 0)
    backoff = _number(table, "backoff_seconds", 1.0, positive=False)
    max_backoff = _number(table, "max_backoff_seconds", max(60.0, backoff), positive=False)
    if max_backoff < backoff:
        raise ValueError(
            f"setting plugin_settings.{NAME}.max_backoff_seconds: must be at least backoff_seconds "
            f"({backoff:g}), got {max_backoff:g}"
        )
    secret = table.get("secret")
    if secret is not None and (not isinstance(secret, str) or not secret):
        raise ValueError(
            f"setting plugin_settings.{NAME}.secret: expected a non-empty string (or leave it out for "
            "unsigned requests)"
        )
    events = table.get("events", list(EVENTS))
    if not isinstance(events, list | tuple) or not events or not all(isinstance(e, str) for e in events):
        raise ValueError(
            f"setting plugin_settings.{NAME}.events: expected a non-empty list of {list(EVENTS)}, got {events!r}"
        )
    wrong = [e for e in events if e not in EVENTS]
    if wrong:
        raise ValueError(
            f"setting plugin_settings.{NAME}.events: unknown event {wrong[0]!r} (events: {', '.join(EVENTS)})"
        )
    queue_size = _integer(table, "queue_size", 1000, 1)
    exit_flush = _number(table, "exit_flush_seconds", 5.0, positive=False)
    return Settings(url, timeout, retries, backoff, max_backoff, secret,
                    tuple(dict.fromkeys(events)), queue_size, exit_flush)


# ---------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One notification waiting to be sent (``sent_at`` is added at each attempt)."""

    event: str
    fields: dict[str, Any]
    delivery_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def image_path(self) -> str:
        return str(self.fields.get("image_path"))

    def body(self) -> bytes:
        """The exact bytes POSTed (and signed) for one attempt."""
        doc = {**self.fields, "sent_at": datetime.now(UTC).isoformat(timespec="milliseconds")}
        return json.dumps(doc, separators=(",", ":"), sort_keys=True, default=str).encode("utf-8")


def _seconds(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return round(float(value), 3)
    return None


def _experiment(result: Mapping[str, Any]) -> str | None:
    for section in ("exports", "provenance"):
        part = result.get(section)
        if isinstance(part, Mapping) and part.get("experiment") is not None:
            return str(part["experiment"])
    return None


def done_message(image_path: str, result: Mapping[str, Any]) -> Message:
    """The message for ``image_done`` (``result`` as the daemon passes it)."""
    labels = result.get("labels_path")
    count = result.get("object_count")
    return Message("image_done", {
        "event": "image_done",
        "image_path": str(image_path),
        "status": "done",
        "cell_count": count if isinstance(count, int) and not isinstance(count, bool) else None,
        "labels_path": str(labels) if labels is not None else None,
        "seconds": _seconds(result.get("seconds")),
        "error": None,
        "segmenter": str(result["segmenter"]) if result.get("segmenter") is not None else None,
        "experiment": _experiment(result),
        "cellseg1d_version": CELLSEG1D_VERSION,
    })


def failed_message(image_path: str, error: str, plugin: str | None, will_retry: bool) -> Message:
    """The message for ``image_failed``."""
    return Message("image_failed", {
        "event": "image_failed",
        "image_path": str(image_path),
        "status": "failed",
        "cell_count": None,
        "labels_path": None,
        "seconds": None,
        "error": str(error),
        "plugin": plugin,
        "will_retry": bool(will_retry),
        "segmenter": None,
        "experiment": None,
        "cellseg1d_version": CELLSEG1D_VERSION,
    })


# ---------------------------------------------------------------------------
# Sending
# ---------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed: a POST and its signature belong to the configured URL."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        return None


@dataclass(frozen=True)
class _Target:
    url: str  # without credentials
    display: str
    authorization: str | None


def _target(url: str) -> _Target:
    parts = urllib.parse.urlsplit(url)
    authorization = None
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        authorization = f"Basic {token}"
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host if parts.port is None else f"{host}:{parts.port}"
        url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    elif not parts.path:
        url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/", parts.query, ""))
    return _Target(url, redact_url(url), authorization)


_OK, _RETRY, _GIVE_UP = "ok", "retry", "give up"


class Sender:
    """The queue and the one thread that empties it."""

    def __init__(self, settings: Settings) -> None:
        self._cond = threading.Condition()
        self._queue: deque[Message] = deque()
        self._settings = settings
        self._target = _target(settings.url)
        self._opener = urllib.request.build_opener(_NoRedirect())
        self._thread: threading.Thread | None = None
        self._busy = False
        self._closed = False
        self._halt = threading.Event()
        self._dropped = 0
        #: Counters, for tests and diagnostics.
        self.delivered = 0
        self.given_up = 0

    @property
    def settings(self) -> Settings:
        return self._settings

    def update(self, settings: Settings) -> None:
        """New settings (config reload); queued messages go to the new URL."""
        with self._cond:
            self._settings = settings
            self._target = _target(settings.url)
            while len(self._queue) > settings.queue_size:
                self._drop_oldest()

    def _drop_oldest(self) -> None:  # with the lock held
        self._queue.popleft()
        self._dropped += 1
        if self._dropped == 1:
            log.warning("webhook queue full (%d messages, plugin_settings.%s.queue_size) while %s is not "
                        "taking them: dropping the oldest; the number dropped is logged when it catches up",
                        self._settings.queue_size, NAME, self._target.display)

    def submit(self, message: Message) -> bool:
        """Queue ``message`` (never blocks on the network). False once the sender is closed."""
        with self._cond:
            if self._closed:
                return False
            if len(self._queue) >= self._settings.queue_size:
                self._drop_oldest()
            self._queue.append(message)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="cellseg1d-webhook", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return True

    def pending(self) -> int:
        """Messages queued or being sent."""
        with self._cond:
            return len(self._queue) + (1 if self._busy else 0)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued message was delivered or given up; False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self, timeout: float | None = 0.0) -> bool:
        """Stop: wait up to ``timeout`` for the queue to empty, then drop what is left and end the thread."""
        emptied = self.flush(timeout)
        with self._cond:
            self._closed = True
            left = len(self._queue) + (1 if self._busy else 0)
            dropped, self._dropped = self._dropped, 0
            self._queue.clear()
            self._halt.set()
            self._cond.notify_all()
            thread = self._thread
        if left or dropped:
            log.warning("webhook stopped with %d notification(s) for %s not delivered%s", left,
                        self._target.display, f" ({dropped} more dropped while the queue was full)" if dropped else "")
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=max(1.0, self._settings.timeout_seconds + 1.0))
        return emptied

    # -- the sender thread ---------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                message = self._queue.popleft()
                self._busy = True
                settings, target = self._settings, self._target
            try:
                self._deliver(message, settings, target)
            except Exception:
                log.exception("webhook: unexpected error while sending %s for %s", message.event,
                              message.image_path)
            finally:
                with self._cond:
                    self._busy = False
                    if not self._queue and self._dropped:
                        log.warning("webhook dropped %d notification(s) while its queue was full "
                                    "(plugin_settings.%s.queue_size = %d)", self._dropped, NAME,
                                    settings.queue_size)
                        self._dropped = 0
                    self._cond.notify_all()

    def _deliver(self, message: Message, settings: Settings, target: _Target) -> None:
        attempts = settings.retries + 1
        delay = settings.backoff_seconds
        reason = ""
        for attempt in range(1, attempts + 1):
            outcome, reason, retry_after = self._attempt(message, settings, target)
            if outcome == _OK:
                self.delivered += 1
                return
            if outcome == _GIVE_UP:
                self.given_up += 1
                log.warning("webhook: %s refused %s for %s: %s; not retried", target.display, message.event,
                            message.image_path, reason, extra={"image": message.image_path})
                return
            if attempt == attempts:
                break
            wait = delay if retry_after is None else max(delay, retry_after)
            if self._halt.wait(min(wait, settings.max_backoff_seconds)):
                return  # closing: close() reports what was left
            delay = min(delay * 2, settings.max_backoff_seconds)
        self.given_up += 1
        log.warning("webhook: could not deliver %s for %s to %s after %d attempt(s): %s; given up",
                    message.event, message.image_path, target.display, attempts, reason,
                    extra={"image": message.image_path})

    def _attempt(self, message: Message, settings: Settings, target: _Target) -> tuple[str, str, float | None]:
        body = message.body()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            EVENT_HEADER: message.event,
            DELIVERY_HEADER: message.delivery_id,
        }
        if settings.secret:
            digest = hmac.new(settings.secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
            headers[SIGNATURE_HEADER] = f"sha256={digest}"
        if target.authorization:
            headers["Authorization"] = target.authorization
        request = urllib.request.Request(target.url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=settings.timeout_seconds) as response:
                response.read(_MAX_RESPONSE_BYTES)
                status = response.status
        except urllib.error.HTTPError as err:
            code, why = err.code, f"HTTP {err.code} {err.reason}"
            retry_after = _retry_after(err.headers.get("Retry-After") if err.headers else None)
            if 300 <= code < 400:
                location = err.headers.get("Location") if err.headers else None
                why += f" (redirect to {redact_url(location) if location else '?'}; redirects are not followed, " \
                       f"set plugin_settings.{NAME}.url to the final address)"
            err.close()
            if code in RETRY_STATUSES or code >= 500:
                return _RETRY, why, retry_after
            return _GIVE_UP, why, None
        except urllib.error.URLError as err:
            return _RETRY, _describe(err.reason), None
        except (OSError, http.client.HTTPException) as err:
            return _RETRY, _describe(err), None
        if 200 <= status < 300:
            return _OK, "", None
        return _GIVE_UP, f"HTTP {status}", None


def _describe(err: Any) -> str:
    if isinstance(err, TimeoutError):
        return "timed out"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, BaseException):
        text = getattr(err, "strerror", None) or str(err)
        return f"{type(err).__name__}: {text}" if text else type(err).__name__
    return str(err)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: use our own backoff
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


# ---------------------------------------------------------------------------
# The plugin's state and hooks
# ---------------------------------------------------------------------------

_lock = threading.Lock()
_sender: Sender | None = None
_atexit_registered = False


def current_sender() -> Sender | None:
    """The sender set up by ``configure`` (None before)."""
    return _sender


def flush(timeout: float | None = 10.0) -> bool:
    """Wait until every queued notification was delivered or given up.

    Returns False when ``timeout`` seconds passed first (messages are still
    queued), True otherwise (also when nothing was ever configured).
    """
    sender = _sender
    return True if sender is None else sender.flush(timeout)


def shutdown(timeout: float | None = 0.0) -> bool:
    """Flush for up to ``timeout`` seconds, then stop the sender and forget it (the next ``configure`` starts anew)."""
    global _sender
    with _lock:
        sender, _sender = _sender, None
    return True if sender is None else sender.close(timeout)


def _flush_at_exit() -> None:
    sender = _sender
    if sender is not None and sender.pending():
        seconds = sender.settings.exit_flush_seconds
        if not sender.flush(seconds):
            log.warning("webhook: %d notification(s) for %s still undelivered at exit after waiting %.0f s "
                        "(plugin_settings.%s.exit_flush_seconds)", sender.pending(),
                        redact_url(sender.settings.url), seconds, NAME)


@hookimpl
def configure(config: Any) -> None:
    """Check ``[plugin_settings.webhook]`` and set up (or update) the sender."""
    global _sender, _atexit_registered
    settings = settings_from_config(config)
    with _lock:
        if _sender is None:
            _sender = Sender(settings)
        else:
            _sender.update(settings)
        if not _atexit_registered:
            atexit.register(_flush_at_exit)
            _atexit_registered = True
    log.info("webhook: notifying %s of %s", redact_url(settings.url), " and ".join(settings.events))


def _submit(event: str, build: Any, *args: Any) -> None:
    sender = _sender
    if sender is None or event not in sender.settings.events:
        return
    try:
        sender.submit(build(*args))
    except Exception:
        log.exception("webhook: cannot queue %s for %s", event, args[0] if args else "?")


@hookimpl
def image_done(image_path: str, result: dict[str, Any]) -> None:
    """Queue an ``image_done`` notification; returns at once."""
    _submit("image_done", done_message, image_path, result)


@hookimpl
def image_failed(image_path: str, error: str, plugin: str | None, will_retry: bool) -> None:
    """Queue an ``image_failed`` notification; returns at once."""
    _submit("image_failed", failed_message, image_path, error, plugin, will_retry)
