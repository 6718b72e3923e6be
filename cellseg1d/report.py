"""Read-only views of the catalog for ``cellseg1d status`` and ``cellseg1d images``.

Image status is the user's view of the image's latest job: ``queued`` (also
while a failed attempt waits for its retry), ``processing``, ``done``,
``held`` and ``failed`` (the job is quarantined: it needs a person, see
``cellseg1d quarantine``). Job states are the state machine's own
(``queued``, ``running``, ``done``, ``failed`` = waiting for a retry,
``quarantined``, ``held``).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

from cellseg1d.catalog import Adapter, Catalog, Image, Job, JobState, Result


def _adapter_label(name: str | None, version: int | None) -> str | None:
    return f"{name}@v{version}" if name is not None else None


def status_report(catalog: Catalog, recent: int = 10) -> dict[str, Any]:
    """Counts of images and jobs by state, the queue (with retry waiters), held jobs, recent quarantines."""
    with catalog.session() as s:
        images = dict(s.execute(select(Image.status, func.count()).group_by(Image.status)).all())
        jobs = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        queue = [
            {"job": j.id, "image": path, "state": j.state, "attempts": j.attempts,
             "lease_owner": j.lease_owner, "next_attempt_at": j.next_attempt_at,
             "experiment": j.experiment, "adapter": _adapter_label(name, version)}
            for j, path, name, version in s.execute(
                select(Job, Image.path, Adapter.name, Adapter.version).join(Image)
                .outerjoin(Adapter, Adapter.id == Job.adapter_id)
                .where(Job.state.in_((*JobState.ACTIVE, JobState.HELD))).order_by(Job.id).limit(50)
            ).all()
        ]
        held = [
            {"experiment": experiment, "jobs": int(count),
             "hint": f"cellseg1d adapters assign {experiment or 'default'} ADAPTER"}
            for experiment, count in s.execute(
                select(Job.experiment, func.count()).where(Job.state == JobState.HELD)
                .group_by(Job.experiment).order_by(Job.experiment)
            ).all()
        ]
        failures = [
            {"job": j.id, "image": path, "error": j.error, "plugin": j.error_plugin, "attempts": j.attempts,
             "finished_at": j.finished_at}
            for j, path in s.execute(
                select(Job, Image.path).join(Image).where(Job.state == JobState.QUARANTINED)
                .order_by(Job.finished_at.desc(), Job.id.desc()).limit(recent)
            ).all()
        ]
        objects = s.scalar(select(func.coalesce(func.sum(Result.object_count), 0)))
    return {"images": images, "jobs": jobs, "objects_found": int(objects or 0),
            "queue": queue, "held": held, "recent_failures": failures,
            "waiting_for_retry": int(jobs.get(JobState.FAILED, 0)),
            "quarantined": int(jobs.get(JobState.QUARANTINED, 0))}


def list_images(catalog: Catalog, status: str | None = None, contains: str | None = None,
                limit: int = 200) -> list[dict[str, Any]]:
    """Images with their latest job's result, newest first."""
    with catalog.session() as s:
        query = select(Image).order_by(Image.updated_at.desc()).limit(limit)
        if status:
            query = query.where(Image.status == status)
        if contains:
            query = query.where(Image.path.contains(contains, autoescape=True))
        rows = []
        for image in s.scalars(query):
            latest = image.jobs[-1] if image.jobs else None
            result = latest.result if latest is not None else None
            provenance = (result.provenance or {}) if result else {}
            adapter = provenance.get("adapter") or {}
            rows.append({
                "path": image.path, "status": image.status, "experiment": image.experiment,
                "job_state": latest.state if latest is not None else None,
                "attempts": latest.attempts if latest is not None else None,
                "adapter": _adapter_label(adapter.get("name"), adapter.get("version")) if adapter else None,
                "runs": len(image.jobs), "shape": image.shape, "axes": image.axes,
                "ngff": image.ngff_version, "objects": result.object_count if result else None,
                "segmenter": result.segmenter if result else None,
                "seconds": round(latest.seconds, 3) if latest and latest.seconds else None,
                "labels": result.labels_path if result else None, "error": image.error,
                "updated_at": image.updated_at,
            })
    return rows


def print_status(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    counts = Table(title="cellseg1d catalog")
    counts.add_column("images")
    counts.add_column("count", justify="right")
    for key in ("queued", "held", "processing", "done", "failed"):
        counts.add_row(key, str(report["images"].get(key, 0)))
    counts.add_row("objects found", str(report["objects_found"]))
    counts.add_row("jobs waiting for a retry", str(report.get("waiting_for_retry", 0)))
    counts.add_row("jobs quarantined", str(report.get("quarantined", 0)))
    console.print(counts)
    if report["queue"]:
        queue = Table(title="queue")
        for col in ("job", "state", "attempts", "next attempt", "experiment", "adapter", "image"):
            queue.add_column(col)
        for row in report["queue"]:
            queue.add_row(str(row["job"]), row["state"], str(row["attempts"]),
                          str(row["next_attempt_at"])[:19] if row["state"] == JobState.FAILED else "",
                          row["experiment"] or "", row["adapter"] or "", row["image"])
        console.print(queue)
    if report.get("waiting_for_retry"):
        console.print("failed attempts wait for their retry: 'cellseg1d retry' lists them, "
                      "'cellseg1d retry --now --all' runs them now")
    if report.get("held"):
        held = Table(title="held: waiting for an adapter")
        for col in ("experiment", "jobs", "to release them"):
            held.add_column(col)
        for row in report["held"]:
            held.add_row(row["experiment"] or "", str(row["jobs"]), row["hint"])
        console.print(held)
    if report["recent_failures"]:
        fails = Table(title="recently quarantined (cellseg1d quarantine --release JOB_ID to run again)")
        fails.add_column("image", overflow="fold")
        fails.add_column("error", overflow="fold")
        for row in report["recent_failures"]:
            fails.add_row(row["image"], (f"[{row['plugin']}] " if row["plugin"] else "") + (row["error"] or ""))
        console.print(fails)


def print_images(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"{len(rows)} image(s)")
    for col in ("image", "status", "experiment", "objects", "segmenter", "seconds", "labels / error"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(
            row["path"], row["status"], row["experiment"] or "",
            "" if row["objects"] is None else str(row["objects"]),
            row["segmenter"] or "", "" if row["seconds"] is None else f"{row['seconds']:.2f}",
            row["labels"] or row["error"] or "",
        )
    console.print(table)
