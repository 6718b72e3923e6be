"""Stat polling, for network shares that send no events."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cellseg1d.ngff.discover import (
    is_container_name,
)
from cellseg1d.service.watch.base import EventSource
from cellseg1d.service.watch.tracker import ImageTracker

log = logging.getLogger("cellseg1d.service.watch")


class PollSource(EventSource):
    """Stat polling for shares without events: the folders of containers, every ``interval`` s.

    A folder whose mtime changed is listed; a container in it whose own
    mtime is not older than the folder's previous mtime (the share's clock on
    both sides) is new or changed and is handed to the tracker. Inside
    active containers the readiness walk itself notices every change.
    Containers moved in with old mtimes are found by the next sweep.
    """

    def __init__(self, tracker: ImageTracker, interval: float) -> None:
        super().__init__(tracker)
        self.interval = interval
        self._folders: dict[Path, int] = {}

    def watch_folder(self, folder: Path) -> None:
        with self._lock:
            if folder in self._folders:
                return
            try:
                self._folders[folder] = os.stat(folder).st_mtime_ns
            except OSError:
                pass

    def watch_container(self, container: Path) -> None:
        pass  # the readiness walk sees what changes inside

    def unwatch_container(self, container: Path) -> None:
        pass

    def _wake(self) -> None:
        pass

    def _run(self) -> None:
        while not self._halt.wait(self.interval):
            with self._lock:
                folders = list(self._folders.items())
            for folder, before in folders:
                try:
                    self._poll_folder(folder, before)
                except Exception as err:  # noqa: BLE001 - one folder never stops the others
                    self.tracker.limiter.log(logging.ERROR, ("poll", folder, type(err)), "cannot poll %s: %s: %s",
                                             folder, type(err).__name__, err)

    def _poll_folder(self, folder: Path, before: int) -> None:
        try:
            now = os.stat(folder).st_mtime_ns
        except OSError:
            with self._lock:
                self._folders.pop(folder, None)  # gone; a rescan brings it back
            return
        if now == before:
            return
        with self._lock:
            self._folders[folder] = now
        new_folders: list[Path] = []
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                        continue
                    path = Path(entry.path)
                    if is_container_name(entry.name, self.tracker.suffixes):
                        if not self.tracker.known(path) and entry.stat(follow_symlinks=False).st_mtime_ns >= before:
                            self.tracker.touch(path)
                    else:
                        with self._lock:
                            if path not in self._folders:
                                new_folders.append(path)
                except OSError:
                    continue
        for path in new_folders:
            self._scan_new_folder(path)
