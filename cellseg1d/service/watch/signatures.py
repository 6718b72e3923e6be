"""Stat-level signatures: has an image folder or a finished container changed?"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cellseg1d.ngff.discover import (
    GROUP_METADATA,
    OUTPUT_DIR_NAMES,
)

log = logging.getLogger("cellseg1d.service.watch")


def encodable(path: Path) -> bool:
    """Whether ``path`` is valid text (a name of undecodable bytes cannot go into the catalog)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class TreeSignature:
    """A cheap summary of a folder tree: changes whenever a file is added, grown or touched."""

    files: int
    size: int
    newest_mtime: float


def tree_signature(folder: Path) -> TreeSignature:
    """Walk ``folder`` (not following links, skipping ``labels/`` and hidden staging names)."""
    files = size = 0
    newest = 0.0
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name not in OUTPUT_DIR_NAMES:
                        stack.append(Path(entry.path))
                    continue
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # vanished while walking: the next walk will differ anyway
            files += 1
            size += st.st_size
            newest = max(newest, st.st_mtime)
    return TreeSignature(files, size, newest)


def newest_change(container: Path) -> float:
    """The newest mtime of the container's files, or of the folder itself while it holds no file.

    A container just made has no file yet: it must not look quiet (and empty)
    to a rescan that finds it at that moment.
    """
    signature = tree_signature(container)
    if signature.files:
        return signature.newest_mtime
    try:
        return os.stat(container).st_mtime
    except OSError:
        return 0.0


def image_relpath(image: Path, container: Path) -> str:
    """``image`` relative to its container, ``""`` for the container itself (as recorded in the catalog)."""
    rel = image.relative_to(container).as_posix()
    return "" if rel == "." else rel


def _stamp(path: Path) -> bytes:
    try:
        st = os.lstat(path)
    except OSError:
        return b"-"
    return f"{stat.S_IFMT(st.st_mode)}:{st.st_size}:{st.st_mtime_ns}".encode()


def container_signature(container: Path, images: Sequence[str]) -> str:
    """A stat-level summary of a container's layout and metadata over its image groups ``images``.

    Covers every folder from the container down to each image: the group
    metadata files (``zarr.json``, ``.zattrs``, ``.zgroup``: size and mtime)
    of each, and the folder's own mtime for those above an image (a new well,
    field or series changes it). An image folder's own mtime is left out:
    publishing ``labels/`` changes it. A few ``stat`` calls per image; no
    file is opened. Changes to pixels alone are not seen (they do not make a
    new run either: see :attr:`cellseg1d.ngff.reader.OmeImage.fingerprint`).
    """
    folders = {""}
    for rel in images:
        parts = rel.split("/") if rel else []
        for depth in range(1, len(parts) + 1):
            folders.add("/".join(parts[:depth]))
    image_set = set(images)
    digest = hashlib.sha256()
    for rel in sorted(folders):
        folder = container / rel if rel else container
        digest.update(rel.encode("utf-8", "surrogateescape") + b"\0")
        if rel not in image_set:
            digest.update(b"d" + _stamp(folder))
        for name in GROUP_METADATA:
            digest.update(b"m" + _stamp(folder / name))
    return digest.hexdigest()[:32]
