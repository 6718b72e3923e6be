"""Start-up reconciliation of the catalog with what is on disk.

Run when the daemon starts, after it has requeued the jobs its
predecessor left running (``JobQueue.reclaim_node``/``reclaim_expired``), so
that the only jobs still ``running`` are other daemons' jobs under a live
lease (several daemons on one shared PostgreSQL catalog). It comes in two
parts, so that a restart costs what is unfinished, not everything ever
processed:

* **before the daemon is ready** (:meth:`Reconciler.run_unfinished`): the
  images whose latest job is not finished (queued, failed, running) or was
  given up on after attempts (quarantined with attempts): the only ones a
  crash can have left leftovers or uncommitted labels for;
* **in the background** (:meth:`Reconciler.run_finished`), page by page
  while new images are already being processed: every other image (done,
  rejected, held). Leftovers are removed there only when older than
  :data:`SHARED_CATALOG_GRACE_SECONDS` and with no job of the image under a
  live lease, and a done job is queued again only while it is still its
  image's latest job and still done.

For every image in the catalog under a configured watch root:

1. **Leftovers of crashed attempts** are removed: label staging folders
   (``labels/.<name>.partial-<id>``, ``labels/.<name>.replaced-<id>``) and
   export temporary files (``<container>.cellseg1d/.../.<file>.partial-<id>``).
   Images with a job running under a live lease are skipped, and on a shared
   catalog entries younger than a grace period too (another daemon may have
   claimed the image a moment ago).
2. **A done job whose label image is missing or incomplete** is queued again;
   the reason and the stale result (which is removed) are recorded as a
   ``redo`` job event.
3. **Our label image on disk while the image's job is not done** (a crash
   between publishing and committing) is recorded as a ``labels-without-done``
   event; the job is queued, so it is redone and the publish replaces the label
   image atomically.

Checks are metadata-level (group and array metadata, label list, shapes):
chunks are not counted, because zarr does not write chunks that hold only the
fill value.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import exists, or_, select
from sqlalchemy.orm import aliased

from cellseg1d.catalog import Adapter, Catalog, Image, Job, JobEventKind, JobState, Result, utcnow
from cellseg1d.config import Config, WatchRoot
from cellseg1d.errors import ImageError
from cellseg1d.catalog.jobs import add_event, requeue_done
from cellseg1d.ngff.labels import PROVENANCE_KEY
from cellseg1d.ngff.reader import load_json, ome_attributes, read_group_attributes
from cellseg1d.pipeline.runner import exports_dir, labels_name_for, output_base

log = logging.getLogger(__name__)
#: Staging and replaced label images, and export temporaries: ``.<name>.partial-<12 hex>``.
LEFTOVER = re.compile(r"^\..+\.(partial|replaced)-[0-9a-f]{12}$")
#: How old a leftover must be before it is removed when other daemons may share the catalog.
SHARED_CATALOG_GRACE_SECONDS = 120.0
#: Images per page of the background part.
PAGE = 200


@dataclass
class ReconcileReport:
    """What reconciliation found and did."""

    removed: list[str] = field(default_factory=list)
    #: Done jobs queued again because their label image was missing or incomplete.
    redone: list[int] = field(default_factory=list)
    #: Jobs not done whose (our) label image is on disk; they run again and replace it.
    labels_without_done: list[int] = field(default_factory=list)
    #: Images left alone because a job of theirs runs under a live lease.
    skipped_live: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Row:
    image_id: int
    path: str
    root: str
    container: str
    fingerprint: str | None
    axes: str | None
    shape: str | None
    job_id: int
    state: str
    attempts: int
    adapter_id: int | None
    labels_path: str | None


def label_image_problem(path: Path, axes: str | None = None, shape: str | None = None) -> str | None:
    """Why the label image at ``path`` is not a complete cellseg1d label image (None: it is).

    Checks the group metadata (multiscales, image-label, provenance), that every
    level's array metadata is there, that the labels group lists it, and (when
    the source image's ``axes`` and ``shape`` are given, as the catalog records
    them) that level 0 has the image's shape without ``c``.
    """
    if not path.is_dir():
        return f"{path} is missing"
    try:
        _, attrs = read_group_attributes(path)
        ome = ome_attributes(attrs)
        datasets = ome["multiscales"][0]["datasets"]
        if "image-label" not in ome or PROVENANCE_KEY not in attrs:
            return f"{path} has no image-label or cellseg1d metadata"
        shapes = []
        for ds in datasets:
            level = path / ds["path"]
            meta = level / "zarr.json" if (level / "zarr.json").is_file() else level / ".zarray"
            if not meta.is_file():
                return f"resolution level {ds['path']!r} of {path} is missing"
            shapes.append(tuple(load_json(meta)["shape"]))
        _, parent = read_group_attributes(path.parent)
        if path.name not in (ome_attributes(parent).get("labels") or []):
            return f"{path.parent} does not list {path.name!r}"
    except (ImageError, KeyError, IndexError, TypeError, ValueError) as err:
        return f"{path} has unreadable or incomplete metadata: {err}"
    if axes and shape and shapes:
        expected = tuple(int(n) for a, n in zip(axes, shape.split("x"), strict=False) if a != "c")
        if shapes[0] != expected:
            return f"{path} has shape {shapes[0]}, the image {expected}"
    return None


def _leftovers(folder: Path) -> list[Path]:
    try:
        return [folder / name for name in os.listdir(folder) if LEFTOVER.match(name)]
    except OSError:
        return []  # no such folder, or unreadable: nothing of ours to remove


def _age(path: Path) -> float:
    try:
        return time.time() - path.lstat().st_mtime
    except OSError:
        return float("inf")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class Reconciler:
    """Compares the catalog with the disk for one daemon config."""

    def __init__(self, catalog: Catalog, config: Config, actor: str, grace_seconds: float | None = None) -> None:
        self.catalog = catalog
        self.config = config
        self.actor = actor
        # One daemon per SQLite catalog (the state-dir lock): nothing else can be staging now.
        self.grace = grace_seconds if grace_seconds is not None else (
            0.0 if catalog.backend == "sqlite" else SHARED_CATALOG_GRACE_SECONDS)
        self.roots = {str(r.path): r for r in config.watch.roots}
        #: Ask for live leases again right before removing a leftover (set in the background).
        self.recheck_live = False

    def _query(self) -> Any:
        """Every image under a configured root with its latest job (and that job's result, if any)."""
        newer = aliased(Job)
        latest = ~exists().where(newer.image_id == Job.image_id, newer.id > Job.id)
        return (
            select(Image.id, Image.path, Image.root, Image.container, Image.fingerprint, Image.axes, Image.shape,
                   Job.id, Job.state, Job.attempts, Job.adapter_id, Result.labels_path)
            .join(Job, Job.image_id == Image.id)
            .outerjoin(Result, Result.job_id == Job.id)
            .where(Image.root.in_(list(self.roots)), latest)
        )

    def _unfinished_rows(self) -> list[_Row]:
        """Images whose latest job is unfinished, or quarantined after attempts (found through the job states)."""
        query = self._query().where(
            Job.state.in_((*JobState.ACTIVE, JobState.QUARANTINED)),
            or_(Job.state != JobState.QUARANTINED, Job.attempts > 0),
        ).order_by(Image.id)
        with self.catalog.session() as s:
            return [_Row(*row) for row in s.execute(query).all()]

    def _finished_page(self, after: int) -> list[_Row]:
        """The next page of images (by id) after image id ``after``, whatever their latest job."""
        # (ordered by the jobs' image_id index: a page reads its own rows, not every row after it)
        query = self._query().where(Job.image_id > after).order_by(Job.image_id).limit(PAGE)
        with self.catalog.session() as s:
            return [_Row(*row) for row in s.execute(query).all()]

    @staticmethod
    def _is_unfinished(row: _Row) -> bool:
        return row.state in JobState.ACTIVE or (row.state == JobState.QUARANTINED and row.attempts > 0)

    def _live_images(self) -> set[int]:
        with self.catalog.session() as s:
            return set(s.scalars(select(Job.image_id).where(
                Job.state == JobState.RUNNING, Job.lease_expires_at > utcnow())))

    def _labels_name(self, adapter_id: int | None) -> str:
        adapter = None
        if adapter_id is not None and self.config.segmentation.versioned_labels:
            from cellseg1d.routing.registry import adapter_ref

            with self.catalog.session() as s:
                row = s.get(Adapter, adapter_id)
                adapter = adapter_ref(row) if row is not None else None
        return labels_name_for(self.config, adapter)

    def run(self) -> ReconcileReport:
        """Reconcile every image at once (both parts); one image's trouble never stops the others."""
        report = self.run_unfinished()
        self.run_finished(report)
        return report

    def run_unfinished(self, report: ReconcileReport | None = None) -> ReconcileReport:
        """The part a restart waits for: images whose latest job is unfinished (a crash's leftovers)."""
        report = report if report is not None else ReconcileReport()
        live = self._live_images()
        for row in self._unfinished_rows():
            self._reconcile(row, report, live)
        return report

    def run_finished(self, report: ReconcileReport | None = None, *, background: bool = False,
                     stop: threading.Event | None = None, pause: float = 0.0) -> ReconcileReport:
        """Every other image, page by page (``pause`` s between pages; returns early when ``stop`` is set).

        ``background``: the daemon already processes images meanwhile, so
        leftovers younger than :data:`SHARED_CATALOG_GRACE_SECONDS` are kept
        and the live leases are asked again right before removing anything.
        """
        report = report if report is not None else ReconcileReport()
        if background:
            self.grace = max(self.grace, SHARED_CATALOG_GRACE_SECONDS)
            self.recheck_live = True
        after = 0
        while stop is None or not stop.is_set():
            page = self._finished_page(after)
            if not page:
                break
            after = page[-1].image_id
            live = self._live_images()
            for row in page:
                if not self._is_unfinished(row):
                    self._reconcile(row, report, live)
            if pause and stop is not None:
                stop.wait(pause)
        return report

    def _reconcile(self, row: _Row, report: ReconcileReport, live: set[int]) -> None:
        root = self.roots[row.root]
        image = Path(row.path)
        if row.image_id in live:
            report.skipped_live.append(row.path)
            return
        try:
            self._clean(row, root, image, report)
            if not image.is_dir():
                return  # deleted, moved or unmounted: nothing to redo, nothing to compare
            if row.state == JobState.DONE and row.labels_path:
                self._check_done(row, report)
            elif row.state in JobState.PENDING:
                self._check_not_done(row, root, image, report)
        except OSError as err:
            log.warning("reconciliation skipped %s: %s", image, err)

    def _clean(self, row: _Row, root: WatchRoot, image: Path, report: ReconcileReport) -> None:
        folders = [output_base(image, root) / "labels"]
        if image.is_relative_to(row.container):
            folders.append(exports_dir(image, Path(row.container), root))
        for folder in folders:
            for entry in _leftovers(folder):
                if _age(entry) < self.grace or row.image_id in self._live_images_if_shared():
                    continue
                _remove(entry)
                report.removed.append(str(entry))

    def _live_images_if_shared(self) -> set[int]:
        """On a shared catalog or in the background, ask again right before removing: a worker may have
        claimed the image since."""
        return self._live_images() if self.grace > 0 or self.recheck_live else set()

    def _check_done(self, row: _Row, report: ReconcileReport) -> None:
        assert row.labels_path is not None
        labels = Path(row.labels_path)
        if not labels.parent.parent.is_dir():
            return  # the output folder itself is gone (an unmounted mirror?): not a lost label image
        problem = label_image_problem(labels, row.axes, row.shape)
        if problem is None:
            return
        with self.catalog.session() as s:
            newer = s.scalar(select(Job.id).where(Job.image_id == row.image_id, Job.id > row.job_id).limit(1))
            if newer is not None:
                return  # a newer run of the image (being published now?): it is not this job's business
            if requeue_done(s, row.job_id, f"start-up check: {problem}; queued again", self.actor):
                report.redone.append(row.job_id)
                log.warning("job %d (%s) was done but %s: queued again", row.job_id, row.path, problem)

    def _check_not_done(self, row: _Row, root: WatchRoot, image: Path, report: ReconcileReport) -> None:
        final = output_base(image, root) / "labels" / self._labels_name(row.adapter_id)
        try:
            _, attrs = read_group_attributes(final)
        except ImageError:
            return
        provenance: Any = attrs.get(PROVENANCE_KEY)
        if not isinstance(provenance, dict) or provenance.get("source_fingerprint") != row.fingerprint:
            return  # not ours, or from an earlier version of the image: the new run replaces it as usual
        with self.catalog.session() as s:
            add_event(s, row.job_id, JobEventKind.LABELS_WITHOUT_DONE,
                      f"start-up check: {final} is on disk while the job is {row.state}; the run replaces it",
                      self.actor)
        report.labels_without_done.append(row.job_id)
        log.warning("job %d (%s) is %s but its label image %s is on disk (a crash before the commit?); "
                    "it runs again and replaces it", row.job_id, row.path, row.state, final)


def _summary(report: ReconcileReport, what: str) -> None:
    if report.removed or report.redone or report.labels_without_done:
        log.info("%s: removed %d leftover(s) of crashed attempts, queued %d done job(s) again, %d job(s) will "
                 "replace label images already on disk", what, len(report.removed), len(report.redone),
                 len(report.labels_without_done))


def reconcile(catalog: Catalog, config: Config, actor: str, grace_seconds: float | None = None) -> ReconcileReport:
    """Reconcile the catalog and the disk once (see the module docstring); never raises for one bad image."""
    report = Reconciler(catalog, config, actor, grace_seconds).run()
    _summary(report, "start-up reconciliation")
    return report


def reconcile_daemon(daemon: Any) -> ReconcileReport | None:
    """The part of the reconciliation a start waits for (unfinished jobs); a failure is logged, never raised.

    The rest runs later in the background: :func:`reconcile_finished_daemon`.
    """
    try:
        report = Reconciler(daemon.catalog, daemon.config, daemon.queue.owner).run_unfinished()
        _summary(report, "start-up reconciliation")
        return report
    except Exception:
        log.exception("start-up reconciliation failed; continuing without it")
        return None


def reconcile_finished_daemon(daemon: Any, stop: threading.Event, pause: float = 0.02) -> None:
    """The rest, in the background while the daemon works: done images' labels, old leftovers."""
    started = time.monotonic()
    try:
        report = Reconciler(daemon.catalog, daemon.config, daemon.queue.owner).run_finished(
            background=True, stop=stop, pause=pause)
    except Exception:
        log.exception("start-up reconciliation of finished images failed; continuing without it")
        return
    _summary(report, "start-up reconciliation of finished images")
    if report.redone:
        daemon.work_event.set()
    log.debug("finished images reconciled in %.1f s", time.monotonic() - started)
