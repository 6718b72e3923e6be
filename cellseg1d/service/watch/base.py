"""What every event source shares: folders of containers and new folders appearing in them."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from cellseg1d.ngff.discover import (
    find_containers,
    is_container_name,
    link_on_the_way,
)
from cellseg1d.service.watch.tracker import ImageTracker

log = logging.getLogger("cellseg1d.service.watch")


class EventSource:
    """What both watchers share: folders of containers and new folders appearing in them."""

    def __init__(self, tracker: ImageTracker) -> None:
        self.tracker = tracker
        self._lock = threading.RLock()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        tracker = self.tracker
        tracker.on_activate, tracker.on_deactivate, tracker.on_folder = (
            self.watch_container, self.unwatch_container, self.watch_folder)
        for root in tracker.roots:
            if root.is_dir():
                self.watch_folder(root)
        for container in tracker.active_containers():
            self.watch_container(container)
        self._thread = threading.Thread(target=self._run, name=f"cellseg1d-{type(self).__name__}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        tracker = self.tracker
        if tracker.on_activate == self.watch_container:
            tracker.on_activate = tracker.on_deactivate = tracker.on_folder = None
        self._halt.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._close()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _scan_new_folder(self, folder: Path) -> None:
        """A folder appeared among the folders of containers: watch it, and look at what is already in it."""
        index = self.tracker._root_index(folder)
        if index is None or link_on_the_way(folder, self.tracker.roots[index]) is not None:
            return
        for container in find_containers(folder, self.tracker.suffixes, self.watch_folder):
            self.tracker.touch(container)

    def _entry_appeared(self, path: Path) -> None:
        """A folder appeared in a folder of containers: a container, or a folder that may hold some."""
        if is_container_name(path.name, self.tracker.suffixes):
            known = self.tracker.known(path)
            self.tracker.touch(path)  # a new container is activated (watched) by the tracker; one that was
            if known:  # deleted and made again while still known is watched here
                self.watch_container(path)
        else:
            self._scan_new_folder(path)

    def _entry_gone(self, path: Path) -> None:
        """A folder left a folder of containers (deleted or moved away)."""
        if self.tracker.known(path):
            self.tracker.touch(path)  # the tracker notices it is gone and forgets it
        if is_container_name(path.name, self.tracker.suffixes):
            self.unwatch_container(path)
        else:
            self._drop_under(path)

    def _drop_under(self, folder: Path, container: Path | None = None) -> None:
        """Stop watching ``folder`` and everything below it."""

    def _run(self) -> None:
        raise NotImplementedError

    def _wake(self) -> None:
        pass

    def _close(self) -> None:
        pass

    def watch_folder(self, folder: Path) -> None:
        raise NotImplementedError

    def watch_container(self, container: Path) -> None:
        raise NotImplementedError

    def unwatch_container(self, container: Path) -> None:
        raise NotImplementedError
