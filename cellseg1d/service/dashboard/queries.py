"""The dashboard's read-only queries on the catalog: every list is paged and every count uses an index.

Images are listed newest first by id (the primary key), so a page costs the
same on a catalog of a hundred thousand jobs as on a small one; filters use
the indexed ``status`` and ``experiment`` columns (``root`` and the path
text are scanned, which bench/bench_dashboard.py measures).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session

from cellseg1d.catalog import (
    Adapter,
    Assignment,
    Catalog,
    Experiment,
    ExportOutcome,
    Image,
    Job,
    JobEvent,
    JobState,
    Result,
    utcnow,
)
from cellseg1d.catalog.report import REJECTED_PREFIX, status_report

#: Rows per page of the image and failure lists.
PAGE_SIZE = 50
#: Image statuses the filter offers (``cellseg1d images --status``).
IMAGE_STATUSES = ("queued", "held", "processing", "done", "failed")
#: Results per adapter version drawn as dots in the objects-per-image plot.
PLOT_POINTS = 200


@dataclass(frozen=True)
class ImageFilter:
    """What the images page shows: every field optional."""

    status: str | None = None
    experiment: str | None = None
    root: str | None = None
    path: str | None = None

    def where(self) -> list[Any]:
        """SQL conditions on :class:`Image`."""
        conditions: list[Any] = []
        if self.status:
            conditions.append(Image.status == self.status)
        if self.experiment:
            conditions.append(Image.experiment == self.experiment)
        if self.root:
            conditions.append(Image.root == self.root)
        if self.path:
            conditions.append(Image.path.contains(self.path, autoescape=True))
        return conditions


def _label(name: str | None, version: int | None) -> str | None:
    return f"{name}@v{version}" if name is not None else None


def _bins(s: Session, now: datetime, span: timedelta, n: int) -> list[dict[str, Any]]:
    """Done jobs per bin over ``span`` before ``now``: ``n`` bins, oldest first, in one scan."""
    width = span / n
    starts = [now - span + width * i for i in range(n)]
    columns = [func.count(case((and_(Job.finished_at >= t, Job.finished_at < t + width), 1))) for t in starts]
    counts = s.execute(select(*columns).where(Job.state == JobState.DONE, Job.finished_at >= now - span)).one()
    return [{"start": t, "end": t + width, "count": int(c or 0)} for t, c in zip(starts, counts, strict=True)]


def overview(catalog: Catalog, now: datetime | None = None) -> dict[str, Any]:
    """The overview page: ``cellseg1d status --json``'s report plus images per root and throughput bins."""
    now = now or utcnow()
    report = status_report(catalog, now=now)
    with catalog.session() as s:
        roots = [{"root": r, "images": int(n)} for r, n in
                 s.execute(select(Image.root, func.count()).group_by(Image.root).order_by(Image.root)).all()]
        hour = _bins(s, now, timedelta(hours=1), 12)
        day = _bins(s, now, timedelta(days=1), 24)
        day_total = sum(b["count"] for b in day)
    return {"report": report, "roots": roots, "hour_bins": hour, "day_bins": day, "done_last_day": day_total,
            "now": now}


def filter_choices(catalog: Catalog) -> dict[str, list[str]]:
    """Experiments and roots to offer in the image filter."""
    with catalog.session() as s:
        experiments = list(s.scalars(select(Experiment.name).order_by(Experiment.name)))
        roots = list(s.scalars(select(Image.root).distinct().order_by(Image.root)))
    return {"experiments": experiments, "roots": roots, "statuses": list(IMAGE_STATUSES)}


def _latest_jobs(s: Session, image_ids: list[int]) -> dict[int, Any]:
    """Image id -> (job, result, adapter label) of its newest job."""
    if not image_ids:
        return {}
    newest = (select(func.max(Job.id)).where(Job.image_id.in_(image_ids)).group_by(Job.image_id)).scalar_subquery()
    rows = s.execute(
        select(Job, Result.id, Result.object_count, Result.segmenter, Adapter.name, Adapter.version)
        .outerjoin(Result, Result.job_id == Job.id).outerjoin(Adapter, Adapter.id == Job.adapter_id)
        .where(Job.id.in_(newest))
    ).all()
    return {job.image_id: {"job": job.id, "state": job.state, "attempts": job.attempts, "seconds": job.seconds,
                           "result": rid, "objects": objects, "segmenter": segmenter,
                           "adapter": _label(name, version)}
            for job, rid, objects, segmenter, name, version in rows}


def images_page(catalog: Catalog, flt: ImageFilter, page: int = 1, per_page: int = PAGE_SIZE) -> dict[str, Any]:
    """One page of images (newest first) with their latest job, and the total matching the filter."""
    page = max(1, page)
    with catalog.session() as s:
        where = flt.where()
        total = int(s.scalar(select(func.count()).select_from(Image).where(*where)) or 0)
        images = s.execute(
            select(Image.id, Image.path, Image.root, Image.status, Image.experiment, Image.shape, Image.error,
                   Image.updated_at)
            .where(*where).order_by(Image.id.desc()).limit(per_page).offset((page - 1) * per_page)
        ).all()
        latest = _latest_jobs(s, [r.id for r in images])
    rows = [{**r._asdict(), "latest": latest.get(r.id)} for r in images]
    pages = max(1, -(-total // per_page))
    return {"rows": rows, "total": total, "page": page, "pages": pages, "per_page": per_page}


def image_detail(catalog: Catalog, image_id: int) -> dict[str, Any] | None:
    """Everything about one image: its row, every run with result, exports and events (None: no such image)."""
    with catalog.session() as s:
        image = s.get(Image, image_id)
        if image is None:
            return None
        runs = []
        for job, result, name, version in s.execute(
                select(Job, Result, Adapter.name, Adapter.version).outerjoin(Result, Result.job_id == Job.id)
                .outerjoin(Adapter, Adapter.id == Job.adapter_id).where(Job.image_id == image_id)
                .order_by(Job.id.desc())).all():
            exports = s.scalars(select(ExportOutcome).where(ExportOutcome.job_id == job.id)
                                .order_by(ExportOutcome.id)).all()
            events = s.scalars(select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id)).all()
            extra = (result.exports or {}) if result is not None else {}
            runs.append({
                "job": job.id, "state": job.state, "attempts": job.attempts, "run_key": job.run_key,
                "rejected": job.run_key.startswith(REJECTED_PREFIX), "experiment": job.experiment,
                "adapter": _label(name, version), "error": job.error, "plugin": job.error_plugin,
                "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at,
                "next_attempt_at": job.next_attempt_at, "seconds": job.seconds,
                "result": None if result is None else {
                    "id": result.id, "labels_path": result.labels_path, "objects": result.object_count,
                    "planes": result.planes, "segmenter": result.segmenter, "version": result.cellseg1d_version,
                    "pipeline_version": result.pipeline_version, "created_at": result.created_at,
                    "provenance": result.provenance or {}, "timings": extra.get("timings") or {},
                    "records": extra.get("records") or [],
                },
                "exports": [{"plugin": e.plugin, "status": e.status, "attempt": e.attempt, "seconds": e.seconds,
                             "error": e.error, "record": e.record, "at": e.at} for e in exports],
                "events": [{"kind": e.kind, "at": e.at, "detail": e.detail, "actor": e.actor} for e in events],
            })
        return {"id": image.id, "path": image.path, "root": image.root, "container": image.container,
                "status": image.status, "experiment": image.experiment, "shape": image.shape, "axes": image.axes,
                "dtype": image.dtype, "ngff": image.ngff_version, "error": image.error,
                "first_seen": image.first_seen, "updated_at": image.updated_at, "runs": runs,
                "shown": next((r for r in runs if r["result"] is not None), None)}


def result_paths(catalog: Catalog, image_id: int) -> tuple[str, int, str, list[Any]] | None:
    """``(image path, result id, labels path, channels segmented)`` of the image's newest result, or None."""
    with catalog.session() as s:
        row = s.execute(
            select(Image.path, Result.id, Result.labels_path, Result.provenance)
            .join(Result, Result.image_id == Image.id)
            .where(Image.id == image_id).order_by(Result.id.desc()).limit(1)
        ).first()
    if row is None:
        return None
    channels = (row[3] or {}).get("channels") if isinstance(row[3], dict) else None
    return row[0], int(row[1]), row[2], list(channels) if isinstance(channels, list) else []


def experiments_view(catalog: Catalog) -> dict[str, Any]:
    """Experiments with their assignment history, adapter versions, and objects per image per version."""
    with catalog.session() as s:
        adapters = [{"id": a.id, "label": a.label, "sha256": a.sha256, "base": a.base_model_type,
                     "created_at": a.created_at, "removed_at": a.removed_at,
                     "steps": (a.meta or {}).get("metrics", {}).get("steps") if isinstance(a.meta, dict) else None}
                    for a in s.scalars(select(Adapter).order_by(Adapter.name, Adapter.version))]
        history: dict[str, list[dict[str, Any]]] = {}
        for name, adapter, assigned, unassigned in s.execute(
                select(Experiment.name, Adapter, Assignment.assigned_at, Assignment.unassigned_at)
                .join(Assignment, Assignment.experiment_id == Experiment.id)
                .join(Adapter, Adapter.id == Assignment.adapter_id)
                .order_by(Experiment.name, Assignment.assigned_at.desc())).all():
            history.setdefault(name, []).append({"adapter": adapter.label, "assigned_at": assigned,
                                                 "unassigned_at": unassigned, "current": unassigned is None})
        counts = dict(s.execute(select(Image.experiment, func.count()).group_by(Image.experiment)).all())
        experiments = [{"name": name, "images": int(counts.get(name, 0)), "history": history.get(name, []),
                        "current": next((h["adapter"] for h in history.get(name, []) if h["current"]), None)}
                       for name in s.scalars(select(Experiment.name).order_by(Experiment.name))]
        groups = []
        for experiment, adapter_id, segmenter, n, mean, lo, hi in s.execute(
                select(Job.experiment, Job.adapter_id, case((Job.adapter_id.is_(None), Result.segmenter)),
                       func.count(), func.avg(Result.object_count), func.min(Result.object_count),
                       func.max(Result.object_count))
                .join(Result, Result.job_id == Job.id)
                .group_by(Job.experiment, Job.adapter_id, case((Job.adapter_id.is_(None), Result.segmenter)))
                .order_by(Job.experiment, Job.adapter_id)).all():
            points = list(s.scalars(
                select(Result.object_count).join(Job, Job.id == Result.job_id)
                .where(Job.experiment == experiment if experiment is not None else Job.experiment.is_(None),
                       Job.adapter_id == adapter_id if adapter_id is not None else Job.adapter_id.is_(None),
                       *([Result.segmenter == segmenter] if adapter_id is None else []))
                .order_by(Result.id.desc()).limit(PLOT_POINTS)))
            label = next((a["label"] for a in adapters if a["id"] == adapter_id), None) or segmenter or "?"
            groups.append({"experiment": experiment or "(none)", "version": label, "results": int(n),
                           "mean": round(float(mean), 1) if mean is not None else None, "min": lo, "max": hi,
                           "points": points})
    return {"adapters": adapters, "experiments": experiments, "groups": groups}


def failures_page(catalog: Catalog, page: int = 1, per_page: int = PAGE_SIZE) -> dict[str, Any]:
    """Quarantined (rejected included) and failed jobs, newest first, with the command that acts on each."""
    page = max(1, page)
    at = func.coalesce(Job.finished_at, Job.started_at, Job.created_at)
    where = Job.state.in_((JobState.QUARANTINED, JobState.FAILED))
    with catalog.session() as s:
        counts = dict(s.execute(select(Job.state, func.count()).where(where).group_by(Job.state)).all())
        rows = s.execute(
            select(Job.id, Job.state, Job.attempts, Job.error, Job.error_plugin, Job.run_key, Job.next_attempt_at,
                   at.label("at"), Image.id.label("image_id"), Image.path)
            .join(Image, Image.id == Job.image_id).where(where)
            .order_by(at.desc(), Job.id.desc()).limit(per_page).offset((page - 1) * per_page)).all()
    out = []
    for r in rows:
        if r.state == JobState.QUARANTINED:
            command = f'cellseg1d quarantine --release {r.id} --reason "..."'
        else:
            command = f"cellseg1d retry --now {r.id}"
        out.append({**r._asdict(), "rejected": r.run_key.startswith(REJECTED_PREFIX), "command": command})
    total = int(sum(counts.values()))
    return {"rows": out, "total": total, "quarantined": int(counts.get(JobState.QUARANTINED, 0)),
            "failed": int(counts.get(JobState.FAILED, 0)), "page": page, "pages": max(1, -(-total // per_page))}
