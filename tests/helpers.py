"""Test helpers: the daemon as a real subprocess, and catalog look-ups through sqlite3."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellseg1d.testing import TINY_SAM_BASE

REPO = Path(__file__).resolve().parents[1]
#: The tests' tiny SAM-architecture base pretrained on synthetic cells (shipped with the plugin kit).
TINY_BASE = TINY_SAM_BASE


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def catalog_rows(state_dir: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows of a read-only query on the daemon's SQLite catalog ([] before it exists)."""
    db = state_dir / "catalog.sqlite"
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        return []  # schema not created yet
    finally:
        conn.close()


def image_status(state_dir: Path) -> dict[str, str]:
    """Image path -> status."""
    return dict(catalog_rows(state_dir, "SELECT path, status FROM images"))


def done_images(state_dir: Path) -> set[str]:
    return {p for p, s in image_status(state_dir).items() if s == "done"}


def jobs_for(state_dir: Path, path: str) -> list[tuple]:
    """(state, attempts, error, error_plugin) of every job of one image."""
    return catalog_rows(
        state_dir,
        "SELECT jobs.state, jobs.attempts, jobs.error, jobs.error_plugin FROM jobs "
        "JOIN images ON images.id = jobs.image_id WHERE images.path = ? ORDER BY jobs.id",
        (path,),
    )


class DaemonProcess:
    """``cellseg1d run`` in a subprocess with its log captured to a file."""

    def __init__(self, state_dir: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        self.state_dir = state_dir
        self.args = args
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = state_dir.parent / f"{state_dir.name}-daemon.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> DaemonProcess:
        self.state_dir.parent.mkdir(parents=True, exist_ok=True)
        # The log is shared by restarts: wait for this process's own "watching" line.
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cellseg1d", "run", "--state-dir", str(self.state_dir), *self.args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
        )
        log.close()
        wait_for(lambda: b"watching" in self.log_path.read_bytes()[offset:] or self.proc.poll() is not None, 60,
                 what="daemon start")
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
