"""Events from watchdog's native observer (inotify, FSEvents, ReadDirectoryChangesW): the portable source."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

from cellseg1d.ngff.discover import (
    is_output_path,
)
from cellseg1d.service.watch.base import EventSource
from cellseg1d.service.watch.tracker import ImageTracker

log = logging.getLogger("cellseg1d.service.watch")


class ObserverSource(EventSource):
    """watchdog's native observer (inotify, FSEvents, ReadDirectoryChangesW): the portable backend.

    One non-recursive watch per folder of containers and one recursive watch
    per active container; a retired container's watch is unscheduled. Each
    watch is a watchdog emitter thread, so on Linux the ``inotify`` backend
    (one descriptor and one thread for every watch) is the default.
    """

    #: Reads (our own readiness walk opens files) are not activity.
    _IGNORED = frozenset({"opened", "closed_no_write"})

    def __init__(self, tracker: ImageTracker) -> None:
        super().__init__(tracker)
        from watchdog.observers import Observer

        self._observer = Observer()
        #: folder of containers or active container -> its scheduled watch
        self._watches: dict[Path, object] = {}

    def start(self) -> None:
        self._observer.start()
        super().start()

    def alive(self) -> bool:
        return super().alive() and self._observer.is_alive()

    def _run(self) -> None:
        self._halt.wait()

    def _close(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=10)
        with self._lock:
            self._watches.clear()

    def _schedule(self, path: Path, recursive: bool) -> None:
        with self._lock:
            if path in self._watches:
                return
        handler = _ContainerEvents(self, path) if recursive else _FolderEvents(self)
        try:
            watch = self._observer.schedule(handler, str(path), recursive=recursive)
        except OSError as err:
            if err.errno not in (errno.ENOENT, errno.ENOTDIR):
                self.tracker.limiter.log(logging.ERROR, ("watchdog", err.errno), "cannot watch %s: %s; its images "
                                         "are still checked by walking their folders", path, err)
            return
        with self._lock:
            self._watches[path] = watch

    def _unschedule(self, path: Path) -> None:
        with self._lock:
            watch = self._watches.pop(path, None)
        if watch is not None:
            try:
                self._observer.unschedule(watch)
            except (KeyError, OSError):
                pass  # already gone with its folder

    def watch_folder(self, folder: Path) -> None:
        self._schedule(folder, recursive=False)

    def watch_container(self, container: Path) -> None:
        self._schedule(container, recursive=True)

    def unwatch_container(self, container: Path) -> None:
        self._unschedule(container)

    def _drop_under(self, folder: Path, container: Path | None = None) -> None:
        prefix = os.path.join(str(folder), "")
        with self._lock:
            paths = [p for p in self._watches if p == folder or str(p).startswith(prefix)]
        for path in paths:
            self._unschedule(path)

    def _guarded(self, what: str, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as err:  # noqa: BLE001 - one odd event never ends the watcher
            self.tracker.limiter.log(logging.ERROR, ("event", type(err)), "ignoring a file event for %s: %s: %s",
                                     what, type(err).__name__, err)


def _event_paths(event: object) -> list[Path]:
    paths = [getattr(event, "src_path", ""), getattr(event, "dest_path", "")]
    return [Path(os.fsdecode(p)) for p in paths if p]


class _Events:
    """A watchdog event handler (watchdog calls ``dispatch``); lost events make the tracker look again."""

    def __init__(self, watcher: ObserverSource) -> None:
        self.watcher = watcher

    def dispatch(self, event: object) -> None:
        kind = getattr(event, "event_type", "")
        if kind == "events_lost":
            self.watcher.tracker.overflowed()
        else:
            self.handle(kind, event)

    def handle(self, kind: str, event: object) -> None:
        raise NotImplementedError


class _FolderEvents(_Events):
    """watchdog handler of a folder of containers: folders appearing and leaving."""

    def handle(self, kind: str, event: object) -> None:
        if not getattr(event, "is_directory", False) or kind not in ("created", "deleted", "moved"):
            return
        paths = _event_paths(event)
        if not paths:
            return
        source, target = paths[0], paths[-1]
        w = self.watcher
        if kind in ("deleted", "moved") and not source.name.startswith("."):
            w._guarded(str(source), lambda: w._entry_gone(source))
        if kind in ("created", "moved") and not target.name.startswith("."):
            w._guarded(str(target), lambda: w._entry_appeared(target))


class _ContainerEvents(_Events):
    """watchdog handler of an active container: every write is activity (our own outputs excepted)."""

    def __init__(self, watcher: ObserverSource, container: Path) -> None:
        super().__init__(watcher)
        self.container = container

    def handle(self, kind: str, event: object) -> None:
        if kind in ObserverSource._IGNORED:
            return
        for path in _event_paths(event):
            if not is_output_path(path, self.container):
                self.watcher._guarded(str(path), lambda p=path: self.watcher.tracker.touch(p))
