"""Logging for a daemon that runs for months: text or JSON lines, image context, bounded repeats.

* :func:`configure_logging` sets up stderr (journald keeps it under systemd)
  with human-readable lines or one JSON object per line (``log_format``).
* :func:`log_context` tags every record logged inside it, in any module, with
  the image path and job id it is about (``image``, ``job`` fields in JSON;
  a ``[job N]`` prefix in text when the message does not name the image).
* :class:`RepeatLimiter` logs an error the first time it happens and then
  only a count once per window, so a stuck error cannot fill the disk.
"""

from __future__ import annotations

import contextvars
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("cellseg1d_log_context", default={})

#: Record attributes that are logging's own, never copied into a JSON line as extra fields.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Attach ``fields`` (e.g. ``image=path, job=42``) to every record logged in this block."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Copies the :func:`log_context` fields onto each record (explicit ``extra=`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``, plus ``(job N)`` when the record is about a job."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        job, image = getattr(record, "job", None), getattr(record, "image", None)
        message = record.getMessage()
        notes = []
        if image is not None and str(image) not in message:
            notes.append(f"image {image}")
        if job is not None and f"job {job}" not in message:
            notes.append(f"job {job}")
        if notes:
            first, sep, rest = line.partition("\n")  # keep a traceback below the tagged line
            line = f"{first} ({', '.join(notes)}){sep}{rest}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message``, context and extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value if isinstance(value, (int, float, bool, type(None))) else str(value)
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


#: Libraries whose INFO lines are noise in the daemon's log.
NOISY_LOGGERS = ("watchdog", "alembic", "numcodecs", "zarr", "asyncio")


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Log records at ``level`` and above to stderr as ``fmt`` ("text" or "json") lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level))
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, getattr(logging, level)))


@dataclass
class _Seen:
    first: float
    emitted: float
    repeats: int = 0


class RepeatLimiter:
    """Log a message once per key; repeats are counted and summarised at most once per ``window`` s.

    ``limiter.log(logging.ERROR, key, "cannot read %s: %s", path, err)`` writes
    the line the first time ``key`` is seen. Later calls with the same key only
    count, until ``window`` seconds after the last line written: then one line
    says how often it happened meanwhile. So an error that repeats every pass
    for ten minutes writes two lines with the default window, not thousands.
    At most ``max_keys`` keys are remembered (the oldest are forgotten).
    """

    def __init__(self, logger: logging.Logger, window: float = 600.0, max_keys: int = 1000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.window, self.max_keys, self.clock = logger, window, max_keys, clock
        self._seen: OrderedDict[Hashable, _Seen] = OrderedDict()
        self._lock = threading.Lock()

    def log(self, level: int, key: Hashable, msg: str, *args: Any, **kwargs: Any) -> bool:
        """Log ``msg % args`` unless ``key`` was logged less than ``window`` s ago; True if written."""
        now = self.clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is None:
                self._seen[key] = _Seen(now, now)
                while len(self._seen) > self.max_keys:
                    self._seen.popitem(last=False)
                repeats = 0
            else:
                self._seen.move_to_end(key)
                if now - seen.emitted < self.window:
                    seen.repeats += 1
                    return False
                repeats, seen.repeats, seen.emitted = seen.repeats + 1, 0, now
        if repeats:
            msg = f"{msg} (again; {repeats} time(s) in the last {self.window:.0f} s)"
            kwargs.pop("exc_info", None)  # the first line carried the traceback
        self.logger.log(level, msg, *args, **kwargs)
        return True

    def forget(self, key: Hashable) -> None:
        """Drop ``key`` (the condition cleared): the next occurrence is logged at once."""
        with self._lock:
            self._seen.pop(key, None)
