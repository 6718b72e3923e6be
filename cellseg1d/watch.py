"""Notice OME-Zarr images in watched folders and tell when each has stopped changing.

Two sources feed the :class:`ImageTracker`:

* a watchdog observer per root (inotify, or stat polling for network shares),
  whose every event marks the image it falls in as active *now*;
* a periodic full rescan (and one at start), which finds containers the
  events missed, e.g. those written while the daemon was down.

Zarr writes each chunk to ``<name>.<uuid>.partial`` and renames it; chunks
written before a new folder's watch exists surface only as synthetic
"created" events. Every event kind counts as activity, partial files
included, and events inside ``labels/`` (our own outputs) are ignored.

An image is *quiet* when no event touched it for ``settle_seconds`` and a
walk of its folder finds nothing newer (file count, bytes and newest mtime
are compared, so events lost by the observer or a share without events
cannot make a half-written image look finished).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from cellseg1d.errors import ImageError
from cellseg1d.logs import RepeatLimiter
from cellseg1d.ngff.discover import (
    MAX_IMAGE_DEPTH,
    OUTPUT_DIR_NAMES,
    container_of,
    find_containers,
    is_output_path,
    link_on_the_way,
    list_images,
)

log = logging.getLogger(__name__)
# watchdog warns when a watched folder is renamed onto a re-used inotify watch
# (our label staging rename does that); the watch is replaced, nothing is lost.
warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning)


def _encodable(path: Path) -> bool:
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


@dataclass
class Candidate:
    """An image that may become ready."""

    image: Path
    container: Path
    root_index: int
    last_change: float
    signature: TreeSignature | None = None
    next_check: float = 0.0
    #: Readiness attempts that failed with an unchanged tree (bad metadata, ...).
    failures: int = 0
    #: Signature at which this image was last handed on (enqueued or rejected).
    settled: TreeSignature | None = None


@dataclass(frozen=True)
class Problem:
    """Something in a container that cannot be processed: recorded once as a bad input."""

    path: Path
    container: Path
    root_index: int
    error: str


@dataclass
class ContainerState:
    root_index: int
    last_event: float
    next_discovery: float = 0.0
    images: set[Path] = field(default_factory=set)
    #: (path, error) pairs already handed on as problems: each is reported again only if it changes.
    reported: set[tuple[Path, str]] = field(default_factory=set)


class ImageTracker:
    """Bookkeeping of containers, their images and when each last changed (thread-safe)."""

    def __init__(
        self,
        roots: Sequence[Path],
        suffixes: Sequence[str],
        settle_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        limiter: RepeatLimiter | None = None,
    ) -> None:
        self.roots = [Path(r) for r in roots]
        self.suffixes = list(suffixes)
        self.settle = settle_seconds
        self.clock = clock
        self.limiter = limiter or RepeatLimiter(log)
        self._lock = threading.Lock()
        self._containers: dict[Path, ContainerState] = {}
        self._candidates: dict[Path, Candidate] = {}
        #: Last event time of each folder from a container down to image depth.
        self._activity: dict[Path, float] = {}
        self.events_seen = 0

    # -- input --------------------------------------------------------------

    def _root_index(self, path: Path) -> int | None:
        for i, root in enumerate(self.roots):
            if path == root or root in path.parents:
                return i
        return None

    def touch(self, path: Path, when: float | None = None) -> None:
        """Record activity at ``path`` (called from observer threads)."""
        index = self._root_index(path)
        if index is None:
            return
        container = container_of(path, self.roots[index], self.suffixes)
        if container is None or is_output_path(path, container) or not _encodable(container):
            return  # (a container name that is not valid UTF-8 is reported by the rescan)
        now = self.clock() if when is None else when
        with self._lock:
            known = container in self._containers
        if not known and link_on_the_way(container, self.roots[index]) is not None:
            return  # reached through a symbolic link: possibly outside the root, never followed
        with self._lock:
            self.events_seen += 1
            state = self._containers.get(container)
            if state is None:
                state = self._containers[container] = ContainerState(index, now)
            state.last_event = max(state.last_event, now)
            if state.next_discovery == float("inf"):
                state.next_discovery = now  # rediscover: new fields or series may have appeared
            rel = path.relative_to(container).parts[: MAX_IMAGE_DEPTH + 1]
            folder = container
            self._activity[folder] = now
            for part in rel:
                folder = folder / part
                self._activity[folder] = now
            for image in state.images:
                if image == path or image in path.parents:
                    cand = self._candidates.get(image)
                    if cand is not None:
                        cand.last_change = now
                        cand.next_check = 0.0  # changed: look again once it is quiet

    def rescan(self) -> int:
        """Walk every root for containers; known ones are re-examined too. Returns how many.

        A root that cannot be walked (unmounted share, odd entry) is logged and
        skipped; the other roots are scanned as usual.
        """
        found = 0
        for index, root in enumerate(self.roots):
            try:
                found += self._rescan_root(index, root)
            except Exception as err:  # noqa: BLE001 - one root never stops the others
                self.limiter.log(logging.ERROR, ("rescan", root, type(err)), "cannot scan watched folder %s: "
                                 "%s: %s; the other folders are scanned as usual", root, type(err).__name__, err)
        return found

    def _rescan_root(self, index: int, root: Path) -> int:
        if not root.is_dir():
            self.limiter.log(logging.WARNING, ("root missing", root), "watched folder %s is not there (an "
                             "unmounted share?); it is scanned again at every rescan", root)
            return 0
        self.limiter.forget(("root missing", root))
        found = 0
        for container in find_containers(root, self.suffixes):
            if not _encodable(container):
                self.limiter.log(logging.ERROR, ("name", container), "ignoring %r: its name is not valid "
                                 "UTF-8, which the catalog cannot record; rename it", os.fsencode(container))
                continue
            found += 1
            with self._lock:
                state = self._containers.get(container)
                if state is None:
                    # Activity unknown: the folder walk at check time decides.
                    self._containers[container] = ContainerState(index, float("-inf"))
                elif state.next_discovery == float("inf"):
                    state.next_discovery = self.clock()  # re-list: catches missed new images
        return found

    # -- output -------------------------------------------------------------

    def _discover(self, now: float) -> list[Problem]:
        problems: list[Problem] = []
        with self._lock:
            due = [(c, s) for c, s in self._containers.items() if s.next_discovery <= now]
        for container, state in due:
            try:
                self._discover_container(container, state, now, problems)
            except Exception as err:  # noqa: BLE001 - whatever one container raises fails only it
                error = f"{container}: cannot list the images in this container: {type(err).__name__}: {err}"
                with self._lock:
                    state.next_discovery = now + max(30.0, self.settle)
                self._report(problems, state, Problem(container, container, state.root_index, error))
        return problems

    def _report(self, problems: list[Problem], state: ContainerState, problem: Problem) -> None:
        key = (problem.path, problem.error)
        if key not in state.reported:
            state.reported.add(key)
            problems.append(problem)

    def _discover_container(self, container: Path, state: ContainerState, now: float,
                            problems: list[Problem]) -> None:
        quiet = now - state.last_event >= self.settle and (
            tree_signature(container).newest_mtime <= time.time() - self.settle
            if state.next_discovery == 0.0 else True
        )
        if not os.path.lexists(container) or link_on_the_way(container, self.roots[state.root_index]):
            # Gone, or (re)placed by a symbolic link: links are never followed.
            with self._lock:
                self._forget_container(container)
            return
        index = state.root_index
        sub_problems: list[tuple[Path, str]] = []
        try:
            images = list_images(container, sub_problems)
        except ImageError as err:
            images = []
            if quiet:
                self._report(problems, state, Problem(container, container, index, str(err)))
        else:
            if not images and not sub_problems and quiet:
                self._report(problems, state, Problem(
                    container, container, index,
                    f"{container}: no OME-NGFF image found in this zarr container "
                    "(no group with 'multiscales' metadata)",
                ))
        if quiet:  # a sub-group still broken after the settle time is reported; its siblings go on
            for path, error in sub_problems:
                self._report(problems, state, Problem(path, container, index, error))
        with self._lock:
            state.next_discovery = (
                float("inf") if quiet and (images or sub_problems) else now + max(1.0, self.settle / 2)
            )
            for image in images:
                if image not in self._candidates:
                    last = self._activity.get(image, float("-inf"))
                    self._candidates[image] = Candidate(image, container, index, last)
                state.images.add(image)

    def _forget_container(self, container: Path) -> None:
        state = self._containers.pop(container, None)
        for image in state.images if state else ():
            self._candidates.pop(image, None)
        for folder in [f for f in self._activity if f == container or container in f.parents]:
            del self._activity[folder]

    def poll(self, now: float | None = None) -> tuple[list[Candidate], list[Problem]]:
        """Images quiet for the settle time, and problems to report (each once).

        Every container and every image is looked at on its own: whatever one
        raises becomes a problem of that one, never an error of the whole pass.
        """
        now = self.clock() if now is None else now
        problems = self._discover(now)
        ready = []
        with self._lock:
            candidates = list(self._candidates.values())
        for cand in candidates:
            try:
                if self._is_ready(cand, now):
                    ready.append(cand)
            except Exception as err:  # noqa: BLE001
                cand.next_check = float("inf")  # until it changes
                with self._lock:
                    state = self._containers.get(cand.container)
                if state is not None:
                    self._report(problems, state, Problem(
                        cand.image, cand.container, cand.root_index,
                        f"{cand.image}: cannot check whether this image is complete: {type(err).__name__}: {err}",
                    ))
        return ready, problems

    def _is_ready(self, cand: Candidate, now: float) -> bool:
        if cand.next_check > now:
            return False
        if now - max(cand.last_change, self._activity.get(cand.image, float("-inf"))) < self.settle:
            return False
        if not cand.image.exists():
            with self._lock:
                self._candidates.pop(cand.image, None)
            return False
        sig = tree_signature(cand.image)
        if sig == cand.settled:
            cand.next_check = float("inf")  # unchanged since it was handed on
            return False
        stable = sig == cand.signature or sig.newest_mtime <= time.time() - self.settle
        if not stable:
            cand.signature, cand.last_change = sig, now
            return False
        cand.signature = sig
        return True

    def postpone(self, cand: Candidate, seconds: float) -> None:
        """Look at ``cand`` again after ``seconds`` (e.g. waiting for a completion marker)."""
        cand.next_check = self.clock() + seconds

    def settled(self, cand: Candidate) -> None:
        """``cand`` was enqueued or rejected at its current signature: check again only if it changes."""
        cand.settled = cand.signature
        cand.failures = 0
        cand.next_check = float("inf")
        with self._lock:
            for folder in [f for f in self._activity if cand.image in f.parents]:
                del self._activity[folder]

    def pending(self) -> int:
        """Images seen but not yet handed on."""
        with self._lock:
            return sum(1 for c in self._candidates.values() if c.settled is None)


class _Handler(FileSystemEventHandler):
    def __init__(self, tracker: ImageTracker) -> None:
        self.tracker = tracker

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return  # reads are not writes
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            if not raw:
                continue
            try:
                self.tracker.touch(Path(os.fsdecode(raw)))
            except Exception as err:  # noqa: BLE001 - an exception here would end the observer thread
                self.tracker.limiter.log(logging.ERROR, ("event", type(err)), "ignoring a file event for %r: "
                                         "%s: %s", raw, type(err).__name__, err)


class Watcher:
    """watchdog observers on every root, feeding an :class:`ImageTracker`."""

    def __init__(self, tracker: ImageTracker, polling: bool = False, poll_interval: float = 5.0) -> None:
        self.tracker = tracker
        if polling:
            self.observer = PollingObserver(timeout=poll_interval)
        else:
            self.observer = Observer()
        handler = _Handler(tracker)
        for root in tracker.roots:
            self.observer.schedule(handler, str(root), recursive=True)

    def start(self) -> None:
        self.observer.start()

    def stop(self) -> None:
        """Stop the observer; its own bookkeeping errors never fail a shutdown."""
        try:
            self.observer.stop()
        except Exception:  # noqa: BLE001
            # watchdog's inotify backend can lose track of a watched folder that was swapped or
            # renamed (label publishing) and raise KeyError while removing its watches.
            log.debug("ignoring an error of the file watcher while stopping", exc_info=True)
        self.observer.join(timeout=10)
