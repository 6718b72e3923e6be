"""Filesystem operations the outputs rely on: swapping two folders atomically."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True) if sys.platform == "linux" else None


def exchange(a: Path, b: Path) -> bool:
    """Swap the entries ``a`` and ``b`` (same filesystem) in one atomic step; False if unsupported.

    Uses Linux ``renameat2(RENAME_EXCHANGE)``: a reader of either path sees the
    old or the new entry, never none. Returns False (nothing done) where the
    kernel, C library or filesystem cannot (other systems, some network
    filesystems); other errors raise ``OSError``.
    """
    renameat2 = getattr(_libc, "renameat2", None) if _libc is not None else None
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))
