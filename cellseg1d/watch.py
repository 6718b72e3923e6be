"""Notice OME-Zarr images in watched folders and tell when each has stopped changing.

Three sources feed the :class:`ImageTracker`:

* a :class:`Watcher` (inotify, or stat polling for network shares) on the
  folders of containers and on every *active* container; its every event
  marks the image it falls in as active *now*;
* rescans (:meth:`ImageTracker.rescan`, or the daemon's background sweep),
  which find containers the events missed, e.g. those written while the
  daemon was down;
* :meth:`ImageTracker.add_container` for a finished container whose
  stat-level signature changed.

Zarr writes each chunk to ``<name>.<uuid>.partial`` and renames it. Every
event kind counts as activity, partial files included, and events inside
``labels/`` (our own outputs) are ignored.

An image is *quiet* when no event touched it for ``settle_seconds`` and a
walk of its folder finds nothing newer (file count, bytes and newest mtime
are compared, so events lost by the observer or a share without events
cannot make a half-written image look finished).

**Only active containers are remembered.** When every image of a container
has been handed on (queued or rejected) and the container stayed quiet for
``retire_seconds`` (the daemon's tracker: :func:`retire_seconds_for`), the
tracker checks once more that nothing changed, then
*retires* it: its state and its watches are dropped and a :class:`Retired`
record (the images and a stat-level :func:`container_signature`) is handed
to the daemon, which stores it in the catalog. Memory, inotify watches and
the cost of a scheduling pass therefore follow the containers being
written, not everything ever acquired. A retired container that changes is
found again by the sweep (its signature differs) and looked at like a new one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import logging
import os
import select
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cellseg1d.errors import ImageError
from cellseg1d.logs import RepeatLimiter
from cellseg1d.ngff.discover import (
    GROUP_METADATA,
    MAX_IMAGE_DEPTH,
    OUTPUT_DIR_NAMES,
    container_of,
    find_containers,
    is_container_name,
    is_output_path,
    link_on_the_way,
    list_images,
)

log = logging.getLogger(__name__)

#: Seconds a container whose images were all handed on stays watched and in memory (at least twice the
#: settle time): late writes within it are seen by events; later ones by the next sweep.
RETIRE_SECONDS = 60.0
#: Containers looked up in the catalog at once during a rescan.
RESCAN_BATCH = 500
#: Retired records kept for the daemon to store; beyond that the oldest are dropped (looked at again at restart).
MAX_RETIRED_PENDING = 10_000


def retire_seconds_for(settle_seconds: float) -> float:
    """How long the daemon keeps a finished container active: :data:`RETIRE_SECONDS`, at least twice the settle."""
    return max(RETIRE_SECONDS, 2 * settle_seconds)


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


def _newest_change(container: Path) -> float:
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
    #: Handed on without the catalog recording it: its container is forgotten, not recorded (looked at again).
    unrecorded: bool = False


@dataclass(frozen=True)
class Problem:
    """Something in a container that cannot be processed: recorded once as a bad input."""

    path: Path
    container: Path
    root_index: int
    error: str


@dataclass(frozen=True)
class Retired:
    """A container the tracker finished with: its images (relative paths) and its :func:`container_signature`."""

    container: Path
    root_index: int
    images: tuple[str, ...]
    signature: str


@dataclass
class ContainerState:
    root_index: int
    last_event: float
    next_discovery: float = 0.0
    images: set[Path] = field(default_factory=set)
    #: (path, error) pairs already handed on as problems: each is reported again only if it changes.
    reported: set[tuple[Path, str]] = field(default_factory=set)
    #: Last event time of each folder from the container down to image depth.
    activity: dict[Path, float] = field(default_factory=dict)
    #: :func:`container_signature` when the images were last listed with the container quiet (None: not yet).
    listed: str | None = None
    listed_images: tuple[str, ...] = ()
    #: When an image or a problem of it was last handed on.
    last_settled: float = float("-inf")


class ImageTracker:
    """Bookkeeping of the active containers, their images and when each last changed (thread-safe).

    ``on_activate(container)`` / ``on_deactivate(container)`` are called when
    a container becomes known / is forgotten (the :class:`Watcher` watches
    exactly the known ones); ``on_folder(folder)`` for every folder of
    containers a rescan lists. ``skip(containers)`` (set by the daemon) names
    those of a rescan's unknown containers that are left to it (finished,
    recorded in the catalog, checked by their signature).
    """

    def __init__(
        self,
        roots: Sequence[Path],
        suffixes: Sequence[str],
        settle_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        limiter: RepeatLimiter | None = None,
        retire_seconds: float | None = None,
    ) -> None:
        self.roots = [Path(r) for r in roots]
        self.suffixes = list(suffixes)
        self.settle = settle_seconds
        self.clock = clock
        self.limiter = limiter or RepeatLimiter(log)
        #: Seconds after which a finished container is retired; None: never (nobody records retired ones).
        self.retire_seconds = retire_seconds
        self._lock = threading.Lock()
        self._containers: dict[Path, ContainerState] = {}
        self._candidates: dict[Path, Candidate] = {}
        self._retired: list[Retired] = []
        self._next_retire_check = float("-inf")
        self.events_seen = 0
        self.on_activate: Callable[[Path], None] | None = None
        self.on_deactivate: Callable[[Path], None] | None = None
        self.on_folder: Callable[[Path], None] | None = None
        self.skip: Callable[[list[Path]], Collection[Path]] | None = None
        #: Set when events were lost (inotify queue overflow): a rescan is due now.
        self.rescan_wanted = threading.Event()

    @property
    def retire_after(self) -> float:
        return self.retire_seconds if self.retire_seconds is not None else float("inf")

    # -- input --------------------------------------------------------------

    def _root_index(self, path: Path) -> int | None:
        for i, root in enumerate(self.roots):
            if path == root or root in path.parents:
                return i
        return None

    def known(self, container: Path) -> bool:
        """Whether ``container`` is active (in memory)."""
        with self._lock:
            return container in self._containers

    def active_containers(self) -> list[Path]:
        with self._lock:
            return list(self._containers)

    def touch(self, path: Path, when: float | None = None) -> None:
        """Record activity at ``path`` (called from watcher threads)."""
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
        created = False
        with self._lock:
            self.events_seen += 1
            state = self._containers.get(container)
            if state is None:
                state = self._containers[container] = ContainerState(index, now)
                created = True
            state.last_event = max(state.last_event, now)
            if state.next_discovery == float("inf"):
                state.next_discovery = now  # rediscover: new fields or series may have appeared
            rel = path.relative_to(container).parts[: MAX_IMAGE_DEPTH + 1]
            folder = container
            state.activity[folder] = now
            for part in rel:
                folder = folder / part
                state.activity[folder] = now
            for image in state.images:
                if image == path or image in path.parents:
                    cand = self._candidates.get(image)
                    if cand is not None:
                        cand.last_change = now
                        cand.next_check = 0.0  # changed: look again once it is quiet
        if created:
            self._notify(self.on_activate, container)

    def add_container(self, container: Path, root_index: int) -> bool:
        """Look at ``container`` (found by a rescan or a sweep); False if it is active already."""
        with self._lock:
            if container in self._containers:
                return False
            # Activity unknown: the folder walk at check time decides.
            self._containers[container] = ContainerState(root_index, float("-inf"))
        self._notify(self.on_activate, container)
        return True

    def overflowed(self) -> None:
        """Events were lost: every active container and image is looked at again, and a rescan is due."""
        now = self.clock()
        with self._lock:
            for state in self._containers.values():
                state.last_event = max(state.last_event, now)
                if state.next_discovery == float("inf"):
                    state.next_discovery = now
            for cand in self._candidates.values():
                cand.next_check = 0.0
        self.rescan_wanted.set()

    def _notify(self, hook: Callable[[Path], None] | None, container: Path) -> None:
        if hook is None:
            return
        try:
            hook(container)
        except Exception as err:  # noqa: BLE001 - a watcher's trouble never stops the tracker
            self.limiter.log(logging.ERROR, ("watch hook", type(err)), "cannot update the watch of %s: %s: %s",
                             container, type(err).__name__, err)

    def rescan(self) -> int:
        """Walk every root for containers; known ones are re-listed, unknown ones looked at. Returns how many.

        Unknown containers that :attr:`skip` names are left alone. A root that
        cannot be walked (unmounted share, odd entry) is logged and skipped;
        the other roots are scanned as usual.
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
        batch: list[Path] = []
        for container in find_containers(root, self.suffixes, self.on_folder):
            if not _encodable(container):
                self.limiter.log(logging.ERROR, ("name", container), "ignoring %r: its name is not valid "
                                 "UTF-8, which the catalog cannot record; rename it", os.fsencode(container))
                continue
            found += 1
            batch.append(container)
            if len(batch) >= RESCAN_BATCH:
                self._rescan_batch(index, batch)
                batch = []
        if batch:
            self._rescan_batch(index, batch)
        return found

    def _rescan_batch(self, index: int, batch: list[Path]) -> None:
        unknown = []
        with self._lock:
            for container in batch:
                state = self._containers.get(container)
                if state is None:
                    unknown.append(container)
                elif state.next_discovery == float("inf"):
                    state.next_discovery = self.clock()  # re-list: catches missed new images
        if unknown and self.skip is not None:
            left = set(self.skip(unknown))
            unknown = [c for c in unknown if c not in left]
        for container in unknown:
            self.add_container(container, index)

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
            state.last_settled = self.clock()  # handed on, like an image: retired only after a quiet time
            problems.append(problem)

    def _discover_container(self, container: Path, state: ContainerState, now: float,
                            problems: list[Problem]) -> None:
        quiet = now - state.last_event >= self.settle and (
            _newest_change(container) <= time.time() - self.settle if state.next_discovery == 0.0 else True
        )
        if not os.path.lexists(container) or link_on_the_way(container, self.roots[state.root_index]):
            # Gone, or (re)placed by a symbolic link: links are never followed.
            with self._lock:
                self._forget_container(container)
            self._notify(self.on_deactivate, container)
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
        listed = tuple(sorted(image_relpath(i, container) for i in images)) if quiet else ()
        signature = container_signature(container, listed) if quiet else None
        with self._lock:
            state.next_discovery = (
                float("inf") if quiet and (images or sub_problems) else now + max(1.0, self.settle / 2)
            )
            state.listed, state.listed_images = signature, listed
            for image in images:
                if image not in self._candidates:
                    last = state.activity.get(image, float("-inf"))
                    self._candidates[image] = Candidate(image, container, index, last)
                state.images.add(image)

    def _forget_container(self, container: Path) -> None:
        state = self._containers.pop(container, None)
        for image in state.images if state else ():
            self._candidates.pop(image, None)

    def poll(self, now: float | None = None) -> tuple[list[Candidate], list[Problem]]:
        """Images quiet for the settle time, and problems to report (each once).

        Every container and every image is looked at on its own: whatever one
        raises becomes a problem of that one, never an error of the whole pass.
        Containers finished with are retired (see :meth:`take_retired`).
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
        self._retire(now)
        return ready, problems

    def _is_ready(self, cand: Candidate, now: float) -> bool:
        if cand.next_check > now:
            return False
        with self._lock:
            state = self._containers.get(cand.container)
            active = state.activity.get(cand.image, float("-inf")) if state is not None else float("-inf")
        if now - max(cand.last_change, active) < self.settle:
            return False
        if not cand.image.exists():
            with self._lock:
                self._candidates.pop(cand.image, None)
                if state is not None:
                    state.images.discard(cand.image)
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

    def settled(self, cand: Candidate, recorded: bool = True) -> None:
        """``cand`` was enqueued or rejected at its current signature: check again only if it changes.

        ``recorded=False``: the catalog could not record it; its container is
        then forgotten without a record, so that a rescan or restart looks again.
        """
        cand.settled = cand.signature
        cand.unrecorded = not recorded
        cand.failures = 0
        cand.next_check = float("inf")
        with self._lock:
            state = self._containers.get(cand.container)
            if state is not None:
                state.last_settled = self.clock()
                for folder in [f for f in state.activity if cand.image in f.parents]:
                    del state.activity[folder]

    def pending(self) -> int:
        """Images seen but not yet handed on."""
        with self._lock:
            return sum(1 for c in self._candidates.values() if c.settled is None)

    # -- retiring -------------------------------------------------------------

    def retire_finished(self) -> None:
        """Retire every container whose images were all handed on, quiet or not (the daemon is stopping)."""
        self._retire(self.clock(), quiet_for=0.0)

    def _retire(self, now: float, quiet_for: float | None = None) -> None:
        """Retire the containers finished with and quiet for :attr:`retire_after` (at most once a second)."""
        if quiet_for is None:
            if self.retire_seconds is None or now < self._next_retire_check:
                return
            self._next_retire_check = now + 1.0
        after = self.retire_after if quiet_for is None else quiet_for
        with self._lock:
            due = [
                (container, state, [self._candidates[i] for i in state.images if i in self._candidates])
                for container, state in self._containers.items()
                if (state.listed is not None or (quiet_for is not None and state.images))
                and now - max(state.last_event, state.last_settled) >= after
            ]
            due = [(c, s, cands) for c, s, cands in due if all(x.next_check == float("inf") for x in cands)]
        for container, state, cands in due:
            try:
                record = self._retirement(container, state, cands, now)
            except Exception as err:  # noqa: BLE001 - keep it active; looked at again later
                log.debug("cannot retire %s: %s", container, err)
                continue
            if record is None:
                continue
            with self._lock:
                if self._containers.get(container) is not state:
                    continue  # forgotten or replaced meanwhile
                self._forget_container(container)
                if not any(c.unrecorded for c in cands):
                    self._retired.append(record)
                    del self._retired[:-MAX_RETIRED_PENDING]
            self._notify(self.on_deactivate, container)

    def _retirement(self, container: Path, state: ContainerState, cands: list[Candidate],
                    now: float) -> Retired | None:
        """The record of a finished container, or None when something changed since (it is looked at again)."""
        for cand in cands:
            reference = cand.settled or cand.signature
            if reference is not None and cand.image.exists() and tree_signature(cand.image) != reference:
                cand.last_change, cand.next_check = now, 0.0  # changed without an event: check it again
                return None
        listed, expected = state.listed_images, state.listed
        if expected is None:  # stopping before the last listing was a quiet one: list them now
            images = list_images(container)
            if set(images) != state.images:
                return None
            listed = tuple(sorted(image_relpath(i, container) for i in images))
            expected = container_signature(container, listed)
        signature = container_signature(container, listed)
        if signature != expected:
            with self._lock:
                state.next_discovery, state.listed = now, None  # list its images again
            return None
        return Retired(container, state.root_index, listed, signature)

    def take_retired(self) -> list[Retired]:
        """The containers retired since the last call (for the catalog)."""
        with self._lock:
            out, self._retired = self._retired, []
        return out


# -- watching ------------------------------------------------------------------------------------------------


class _Base:
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


class _InotifyWatcher(_Base):
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


class _PollWatcher(_Base):
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


class _WatchdogWatcher(_Base):
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


class _FolderEvents:
    """watchdog handler of a folder of containers: folders appearing and leaving."""

    def __init__(self, watcher: _WatchdogWatcher) -> None:
        self.watcher = watcher

    def dispatch(self, event: object) -> None:
        kind = getattr(event, "event_type", "")
        if kind == "events_lost":
            self.watcher.tracker.overflowed()
            return
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


class _ContainerEvents:
    """watchdog handler of an active container: every write is activity (our own outputs excepted)."""

    def __init__(self, watcher: _WatchdogWatcher, container: Path) -> None:
        self.watcher = watcher
        self.container = container

    def dispatch(self, event: object) -> None:
        kind = getattr(event, "event_type", "")
        if kind == "events_lost":
            self.watcher.tracker.overflowed()
            return
        if kind in _WatchdogWatcher._IGNORED:
            return
        for path in _event_paths(event):
            if not is_output_path(path, self.container):
                self.watcher._guarded(str(path), lambda p=path: self.watcher.tracker.touch(p))


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
        self._impl: _Base = (_PollWatcher(tracker, poll_interval) if polling
                             else _InotifyWatcher(tracker) if self.backend == "inotify"
                             else _WatchdogWatcher(tracker))

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

