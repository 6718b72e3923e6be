"""The readiness tracker: which images are quiet, which containers are finished (retired)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cellseg1d.errors import ImageError
from cellseg1d.ngff.discover import (
    MAX_IMAGE_DEPTH,
    container_of,
    find_containers,
    is_output_path,
    link_on_the_way,
    list_images,
)
from cellseg1d.service.logs import RepeatLimiter
from cellseg1d.service.watch.signatures import (
    TreeSignature,
    container_signature,
    encodable,
    image_relpath,
    newest_change,
    tree_signature,
)

log = logging.getLogger("cellseg1d.service.watch")


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
        if container is None or is_output_path(path, container) or not encodable(container):
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
            if not encodable(container):
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
            newest_change(container) <= time.time() - self.settle if state.next_discovery == 0.0 else True
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
