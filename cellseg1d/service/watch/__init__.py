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

from cellseg1d.service.watch.signatures import TreeSignature, container_signature, image_relpath, tree_signature
from cellseg1d.service.watch.tracker import (
    MAX_RETIRED_PENDING,
    RESCAN_BATCH,
    RETIRE_SECONDS,
    Candidate,
    ContainerState,
    ImageTracker,
    Problem,
    Retired,
    retire_seconds_for,
)
from cellseg1d.service.watch.watcher import Watcher, resolve_backend

__all__ = [
    "MAX_RETIRED_PENDING", "RESCAN_BATCH", "RETIRE_SECONDS", "Candidate", "ContainerState", "ImageTracker", "Problem",
    "Retired", "TreeSignature", "Watcher", "container_signature", "image_relpath", "resolve_backend", "retire_seconds_for",
    "tree_signature",
]
