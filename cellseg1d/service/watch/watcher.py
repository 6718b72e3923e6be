"""The watcher the daemon starts: picks the event source named by ``watch.backend`` or polling."""

from __future__ import annotations

import logging
import sys

from cellseg1d.service.watch.base import EventSource
from cellseg1d.service.watch.inotify import InotifySource
from cellseg1d.service.watch.observer import ObserverSource
from cellseg1d.service.watch.poll import PollSource
from cellseg1d.service.watch.tracker import ImageTracker

log = logging.getLogger("cellseg1d.service.watch")


def resolve_backend(backend: str) -> str:
    """The event source ``watch.backend`` names: ``auto`` is ``inotify`` on Linux, ``watchdog`` elsewhere."""
    if backend == "auto":
        return "inotify" if sys.platform.startswith("linux") else "watchdog"
    if backend not in ("inotify", "watchdog"):
        raise ValueError(f"unknown watch.backend {backend!r}: use 'auto', 'inotify' or 'watchdog'")
    return backend


class Watcher:
    """Watches the roots for an :class:`ImageTracker`: inotify, watchdog, or stat polling for network shares.

    Only folders of containers and the tracker's active containers are
    watched: the number of watches and the memory they take follow what is
    being written, not what was ever acquired.
    """

    def __init__(self, tracker: ImageTracker, polling: bool = False, poll_interval: float = 5.0,
                 backend: str = "auto") -> None:
        self.tracker = tracker
        self.polling = polling
        self.backend = "poll" if polling else resolve_backend(backend)
        self._impl: EventSource = (PollSource(tracker, poll_interval) if polling
                             else InotifySource(tracker) if self.backend == "inotify"
                             else ObserverSource(tracker))

    def start(self) -> None:
        self._impl.start()

    def stop(self) -> None:
        """Stop watching; never fails a shutdown."""
        try:
            self._impl.stop()
        except Exception:  # noqa: BLE001
            log.debug("ignoring an error of the file watcher while stopping", exc_info=True)

    def alive(self) -> bool:
        """Whether the watcher's thread still runs."""
        return self._impl.alive()

    is_alive = alive

    @property
    def observer(self) -> Watcher:
        """The thread-like object that watches (``observer.is_alive()``, as with a watchdog observer)."""
        return self
