"""Watching the demo's daemon: its process, its log and its catalog (read only)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cellseg1d.cli.demo.microscope import LOG_TAIL_LINES


def catalog_query(state_dir: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows of a read-only query on the daemon's SQLite catalog; [] before it exists."""
    db = state_dir / "catalog.sqlite"
    if not db.exists():
        return []
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error:
        return []
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.Error:
        return []  # schema not created yet, or the database is busy: next poll
    finally:
        conn.close()


_LATEST = """
SELECT images.path, images.status, images.error, jobs.seconds, jobs.created_at, jobs.started_at,
       results.object_count, results.segmenter, results.labels_path
FROM images
LEFT JOIN jobs ON jobs.id = (SELECT MAX(j.id) FROM jobs j WHERE j.image_id = images.id)
LEFT JOIN results ON results.job_id = jobs.id
"""


def latest_rows(state_dir: Path) -> dict[str, dict[str, Any]]:
    """Image path -> status, error and its latest job's result."""
    cols = ("path", "status", "error", "seconds", "created_at", "started_at", "objects", "segmenter", "labels")
    return {row[0]: dict(zip(cols, row, strict=True)) for row in catalog_query(state_dir, _LATEST)}


def utc_timestamp(value: Any) -> float | None:
    """POSIX time of a catalog datetime (stored as naive UTC text in SQLite)."""
    if value is None:
        return None
    stamp = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


def read_labels(labels_path: Path) -> np.ndarray:
    """Level 0 of an NGFF label image as a 2-D array (leading length-1 axes dropped)."""
    import zarr

    group = zarr.open_group(str(labels_path), mode="r")
    attrs = dict(group.attrs)
    ome = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else attrs
    level0 = ome["multiscales"][0]["datasets"][0]["path"]
    data = np.asarray(group[level0][...])
    while data.ndim > 2 and data.shape[0] == 1:
        data = data[0]
    return data


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no daemon log)"
    return "\n".join(text.splitlines()[-lines:])


class DaemonProcess:
    """``cellseg1d run`` in a subprocess, its output in a log file."""

    def __init__(self, acq: Path, state: Path, log_path: Path, settle_seconds: float,
                 config: Path | None = None) -> None:
        self.log_path = log_path
        where = ["--config", str(config)] if config is not None else ["--watch", str(acq), "--state-dir", str(state)]
        self.args = [
            sys.executable, "-m", "cellseg1d", "run", *where,
            "--settle-seconds", str(settle_seconds), "--log-level", "INFO",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            # Its own session: a Ctrl-C in the terminal reaches only the demo, which
            # then stops the daemon with SIGTERM (finishing the image in progress).
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_watching(self, timeout: float) -> bool:
        """Wait until the daemon logs that it is watching; False if it exited or timed out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "watching" in self.log():
                return True
            if not self.alive():
                return False
            time.sleep(0.1)
        return False

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait; a second SIGTERM, then SIGKILL if it will not stop. Returns the exit code."""
        if self.proc is None:
            return None
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            if self.proc.poll() is not None:
                break
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        return self.proc.poll()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM and SIGHUP to the demo like Ctrl-C, so the daemon and folder are cleaned up."""

    def handler(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous: dict[int, Any] = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not in the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
