"""The daemon's state dir: created private, and locked so that one daemon runs on it."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

from cellseg1d.errors import ConfigError

log = logging.getLogger(__name__)


class StateDirLock:
    """An exclusive lock on the state dir: one daemon per state dir (and so per SQLite catalog)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "daemon.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES):
                other = self.path.read_text().strip() or "?"
                raise ConfigError(
                    f"another cellseg1d daemon (pid {other}) is using the state dir {self.path.parent}; "
                    "stop it or give this one another state_dir"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def prepare_state_dir(state_dir: Path) -> None:
    """Create the state dir, private to the service user."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as err:
        raise ConfigError(f"setting state_dir: cannot create {state_dir}: {err.strerror}") from None
    if not os.access(state_dir, os.W_OK):
        raise ConfigError(f"setting state_dir: {state_dir} is not writable by this user")
    os.chmod(state_dir, 0o700)
