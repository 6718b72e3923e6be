"""Events from inotify(7) through libc: one descriptor and one reader thread for every watch (Linux)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import select
import struct
from pathlib import Path

from cellseg1d.ngff.discover import (
    OUTPUT_DIR_NAMES,
    is_output_path,
)
from cellseg1d.service.watch.base import EventSource
from cellseg1d.service.watch.tracker import ImageTracker

log = logging.getLogger("cellseg1d.service.watch")


# inotify(7), through libc: one descriptor and one reader thread for every watch.
IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_UNMOUNT, IN_Q_OVERFLOW, IN_IGNORED = 0x400, 0x800, 0x2000, 0x4000, 0x8000
IN_ONLYDIR, IN_DONT_FOLLOW, IN_ISDIR = 0x01000000, 0x02000000, 0x40000000
_SELF = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT
#: Folders of containers: entries appearing and disappearing.
FOLDER_MASK = IN_CREATE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | _SELF | IN_ONLYDIR | IN_DONT_FOLLOW
#: Folders inside an active container: every write.
CONTAINER_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_CREATE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE
                  | _SELF | IN_ONLYDIR | IN_DONT_FOLLOW)
_EVENT = struct.Struct("iIII")
_libc: ctypes.CDLL | None = None


def _inotify_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        _libc = libc
    return _libc


class InotifySource(EventSource):
    """inotify on the folders of containers (entries only) and on every folder of each active container."""

    def __init__(self, tracker: ImageTracker) -> None:
        super().__init__(tracker)
        try:
            self._libc = _inotify_libc()
            fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        except (OSError, AttributeError) as err:
            raise OSError(errno.ENOSYS, f"inotify is not available: {err}") from None
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"cannot start inotify: {os.strerror(code)}")
        self._fd = fd
        self._wake_r, self._wake_w = os.pipe()
        #: watch descriptor -> (folder, its container or None for a folder of containers)
        self._wds: dict[int, tuple[Path, Path | None]] = {}
        self._paths: dict[Path, int] = {}
        self._by_container: dict[Path, set[int]] = {}

    # -- watches --------------------------------------------------------------

    def _add(self, folder: Path, container: Path | None) -> bool:
        wd = self._libc.inotify_add_watch(self._fd, os.fsencode(folder), FOLDER_MASK if container is None
                                          else CONTAINER_MASK)
        if wd < 0:
            code = ctypes.get_errno()
            if code in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return False  # gone or not a folder (any more)
            if code == errno.ENOSPC:
                self.tracker.limiter.log(logging.ERROR, ("inotify", "limit"), "cannot watch %s: the inotify "
                                         "watch limit is reached (fs.inotify.max_user_watches); its images are "
                                         "still checked by walking their folders", folder)
            else:
                self.tracker.limiter.log(logging.ERROR, ("inotify", code), "cannot watch %s: %s", folder,
                                         os.strerror(code))
            return False
        with self._lock:
            old = self._wds.get(wd)
            if old is not None and old[0] != folder:  # the same folder under a new name (renamed)
                self._paths.pop(old[0], None)
                if old[1] is not None:
                    self._by_container.get(old[1], set()).discard(wd)
            self._wds[wd] = (folder, container)
            self._paths[folder] = wd
            if container is not None:
                self._by_container.setdefault(container, set()).add(wd)
        return True

    def _drop(self, wd: int, remove: bool) -> None:
        with self._lock:
            info = self._wds.pop(wd, None)
            if info is None:
                return
            folder, container = info
            if self._paths.get(folder) == wd:
                del self._paths[folder]
            if container is not None:
                wds = self._by_container.get(container)
                if wds is not None:
                    wds.discard(wd)
        if remove:
            self._libc.inotify_rm_watch(self._fd, wd)

    def _drop_under(self, folder: Path, container: Path | None = None) -> None:
        """Stop watching ``folder`` and everything below it (inside ``container``, when given: cheaper)."""
        prefix = os.path.join(str(folder), "")
        with self._lock:
            if container is not None:
                wds = [wd for wd in self._by_container.get(container, ())
                       if (info := self._wds.get(wd)) is not None
                       and (info[0] == folder or str(info[0]).startswith(prefix))]
            else:
                wds = [wd for path, wd in self._paths.items() if path == folder or str(path).startswith(prefix)]
                for gone in [c for c in self._by_container if c == folder or str(c).startswith(prefix)]:
                    del self._by_container[gone]
        for wd in wds:
            self._drop(wd, remove=True)

    def watch_folder(self, folder: Path) -> None:
        with self._lock:
            if folder in self._paths:
                return
        self._add(folder, None)

    def watch_container(self, container: Path) -> None:
        with self._lock:
            self._by_container.setdefault(container, set())
        self._watch_tree(container, container)  # (a folder watched already keeps its watch)

    def _watch_tree(self, folder: Path, container: Path) -> None:
        """Watch ``folder`` and every folder below it (first the folder, then its listing: nothing is missed)."""
        stack = [folder]
        while stack:
            current = stack.pop()
            if not self._add(current, container):
                continue
            try:
                with os.scandir(current) as entries:
                    for entry in entries:
                        try:
                            if entry.is_dir(follow_symlinks=False) and entry.name not in OUTPUT_DIR_NAMES:
                                stack.append(Path(entry.path))
                        except OSError:
                            continue
            except OSError:
                continue

    def unwatch_container(self, container: Path) -> None:
        with self._lock:
            wds = self._by_container.pop(container, set())
        for wd in list(wds):
            self._drop(wd, remove=True)

    # -- events ---------------------------------------------------------------

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass

    def _close(self) -> None:
        for fd in (self._fd, self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        with self._lock:
            self._wds.clear()
            self._paths.clear()
            self._by_container.clear()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._halt.is_set():
            if not poller.poll(1000):
                continue
            if self._halt.is_set():
                return
            try:
                data = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                continue
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size: offset + _EVENT.size + length].rstrip(b"\0")
                offset += _EVENT.size + length
                try:
                    self._event(wd, mask, name)
                except Exception as err:  # noqa: BLE001 - one odd event never ends the watcher
                    self.tracker.limiter.log(logging.ERROR, ("event", type(err)), "ignoring a file event for "
                                             "%r: %s: %s", name, type(err).__name__, err)

    def _event(self, wd: int, mask: int, raw: bytes) -> None:
        if mask & IN_Q_OVERFLOW:
            log.warning("file events were lost (inotify queue overflow); looking at every folder again")
            self.tracker.overflowed()
            return
        with self._lock:
            info = self._wds.get(wd)
        if info is None:
            return  # a watch just removed (retired container, folder moved away)
        if mask & IN_IGNORED:
            self._drop(wd, remove=False)
            return
        folder, container = info
        name = os.fsdecode(raw)
        path = folder / name if name else folder
        is_dir = bool(mask & IN_ISDIR)
        if container is None:
            self._folder_event(path, name, mask, is_dir)
            return
        if is_output_path(path, container):
            return  # our own outputs (labels/): neither watched nor activity
        if not name and mask & _SELF:
            self._drop(wd, remove=True)
        elif is_dir and mask & IN_MOVED_FROM:
            self._drop_under(path, container)
        elif is_dir and mask & (IN_CREATE | IN_MOVED_TO):
            self._watch_tree(path, container)
        self.tracker.touch(path)

    def _folder_event(self, path: Path, name: str, mask: int, is_dir: bool) -> None:
        if not name:
            if mask & _SELF:  # the folder itself went away; a rescan watches it again if it comes back
                self._drop_under(path)
            return
        if not is_dir or name.startswith("."):
            return
        if mask & (IN_CREATE | IN_MOVED_TO):
            self._entry_appeared(path)
        elif mask & (IN_DELETE | IN_MOVED_FROM):
            self._entry_gone(path)
