"""Read-only views of the catalog for ``cellseg1d status``, ``cellseg1d images`` and the metrics endpoint.

Image status is the user's view of the image's latest job: ``queued`` (also
while a failed attempt waits for its retry), ``processing``, ``done``,
``held`` and ``failed`` (the job is quarantined: it needs a person, see
``cellseg1d quarantine``). Job states are the state machine's own
(``queued``, ``running``, ``done``, ``failed`` = waiting for a retry,
``quarantined``, ``held``).

:func:`catalog_counts` holds the counts that ``cellseg1d status`` and the
Prometheus collector (:mod:`cellseg1d.service.telemetry`) both report, so
that the two always agree for the same catalog. Every query here is a
``GROUP BY``/``COUNT`` over indexed columns or has a ``LIMIT``: status stays
fast on a catalog of a hundred thousand jobs.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from cellseg1d.catalog import Adapter, Assignment, Catalog, Experiment, Image, Job, JobState, Result, utcnow

#: Every job state, in the order of the state machine (status and metrics list them all, 0 included).
JOB_STATES = (JobState.HELD, JobState.QUEUED, JobState.RUNNING, JobState.FAILED, JobState.QUARANTINED,
              JobState.DONE)
#: Run keys of inputs rejected at readiness (bad input, recorded by ``JobQueue.record_rejected``) start so.
REJECTED_PREFIX = "rejected:"
#: The throughput window of ``status_report``'s ``last_hour``.
THROUGHPUT_WINDOW = timedelta(hours=1)


def _adapter_label(name: str | None, version: int | None) -> str | None:
    return f"{name}@v{version}" if name is not None else None


def catalog_counts(source: Catalog | Session) -> dict[str, Any]:
    """The job counts shared by ``cellseg1d status`` and ``/metrics``, in one transaction.

    - ``jobs``: state -> number of jobs, every state of :data:`JOB_STATES` present (0 included);
    - ``queue_depth``: jobs waiting to be claimed: ``queued`` plus ``failed`` (a failed attempt waiting
      for its retry, due or not), i.e. :attr:`JobState.PENDING`; running, held and quarantined jobs
      are not in the queue;
    - ``images_processed``: done jobs; every run counts (an image run again with a new adapter
      version counts twice), a done job queued again because its labels went missing stops
      counting until it is done again;
    - ``bad_inputs``: inputs rejected at readiness (jobs whose run key starts with ``rejected:``),
      whatever their state now.

    ``source`` is a catalog (a new session is opened) or a session of the caller's (no commit).
    """
    if isinstance(source, Catalog):
        with source.session() as s:
            return catalog_counts(s)
    jobs = dict.fromkeys(JOB_STATES, 0)
    for state, count in source.execute(select(Job.state, func.count()).group_by(Job.state)).all():
        jobs[state] = int(count)
    bad = source.scalar(select(func.count()).select_from(Job).where(Job.run_key.startswith(REJECTED_PREFIX)))
    return {
        "jobs": jobs,
        "queue_depth": sum(jobs[state] for state in JobState.PENDING),
        "images_processed": jobs[JobState.DONE],
        "bad_inputs": int(bad or 0),
    }


def _mean(value: Any) -> float | None:
    return None if value is None else round(float(value), 3)


def _throughput(s: Session, since: datetime) -> tuple[dict[str, Any], float | None, dict[int | None, int]]:
    """``last_hour`` (without ``by_adapter``' labels), the overall mean seconds, adapter id -> done since."""
    in_window = Job.finished_at >= since
    hour_n, hour_mean, overall_mean = s.execute(
        select(func.count(case((in_window, 1))), func.avg(case((in_window, Job.seconds))), func.avg(Job.seconds))
        .where(Job.state == JobState.DONE)
    ).one()
    by_adapter = dict(s.execute(
        select(Job.adapter_id, func.count()).where(Job.state == JobState.DONE, in_window).group_by(Job.adapter_id)
    ).all())
    hour = {"images": int(hour_n or 0), "images_per_hour": int(hour_n or 0), "mean_seconds": _mean(hour_mean)}
    return hour, _mean(overall_mean), {k: int(v) for k, v in by_adapter.items()}


def _adapters(s: Session, done_by_adapter: dict[int | None, int]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Current assignments (with jobs done in the window) and jobs done in the window per adapter version."""
    assignments = [
        {"experiment": experiment, "adapter": adapter.label, "sha256": adapter.sha256,
         "assigned_at": assigned_at, "done_last_hour": done_by_adapter.get(adapter.id, 0)}
        for experiment, adapter, assigned_at in s.execute(
            select(Experiment.name, Adapter, Assignment.assigned_at)
            .join(Assignment, Assignment.experiment_id == Experiment.id)
            .join(Adapter, Adapter.id == Assignment.adapter_id)
            .where(Assignment.unassigned_at.is_(None)).order_by(Experiment.name)
        ).all()
    ]
    ids = [i for i in done_by_adapter if i is not None]
    rows = {a.id: a for a in s.scalars(select(Adapter).where(Adapter.id.in_(ids)))} if ids else {}
    by_adapter = sorted(
        ({"adapter": rows[i].label if i in rows else None, "sha256": rows[i].sha256 if i in rows else None,
          "images": n} for i, n in done_by_adapter.items()),
        key=lambda row: (-row["images"], row["adapter"] or ""),
    )
    return assignments, by_adapter


def _last_errors(s: Session, limit: int) -> list[dict[str, Any]]:
    """Failed (waiting for a retry), quarantined and rejected jobs, newest first.

    ``at`` is when the job was given up (quarantined, rejected) or when its failed attempt started
    (failed: the catalog keeps no failure time for attempts that are retried).
    """
    at = func.coalesce(Job.finished_at, Job.started_at, Job.created_at)
    rows = s.execute(
        select(Job.id, Image.path, Job.state, Job.error_plugin, Job.error, Job.attempts, Job.run_key,
               Job.next_attempt_at, at.label("at"))
        .join(Image, Image.id == Job.image_id)
        .where(Job.state.in_((JobState.FAILED, JobState.QUARANTINED)))
        .order_by(at.desc(), Job.id.desc()).limit(limit)
    ).all()
    return [
        {"job": r.id, "image": r.path, "state": r.state, "plugin": r.error_plugin, "error": r.error,
         "at": r.at, "attempts": r.attempts, "rejected": r.run_key.startswith(REJECTED_PREFIX),
         "next_attempt_at": r.next_attempt_at if r.state == JobState.FAILED else None}
        for r in rows
    ]


def status_report(catalog: Catalog, recent: int = 10, *, now: datetime | None = None) -> dict[str, Any]:
    """What ``cellseg1d status`` shows (``--json`` prints this dict).

    Counts of images by status and jobs by state (every state, 0 included), the
    queue (with retry waiters), held jobs, recent quarantines, and:

    - ``queue_depth``, ``images_processed``, ``bad_inputs``: see :func:`catalog_counts`
      (``/metrics`` reports the same numbers);
    - ``last_hour``: jobs done in the hour before ``now`` (``images``, ``images_per_hour``, their
      ``mean_seconds``, and ``by_adapter``: how many each adapter version did, ``adapter`` None for
      runs without a registered adapter); ``mean_seconds_per_image``: the mean over all done jobs;
    - ``adapters_in_use``: the current assignments (experiment, ``name@vN``, sha256, since when)
      with the jobs each adapter version finished in the last hour;
    - ``last_errors``: the ``recent`` newest errors of failed, quarantined and rejected jobs.
    """
    now = now or utcnow()
    with catalog.session() as s:
        counts = catalog_counts(s)
        jobs = counts["jobs"]
        images = dict(s.execute(select(Image.status, func.count()).group_by(Image.status)).all())
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
        last_hour, overall_mean, done_by_adapter = _throughput(s, now - THROUGHPUT_WINDOW)
        assignments, by_adapter = _adapters(s, done_by_adapter)
        last_errors = _last_errors(s, recent)
    return {"images": images, "jobs": jobs, "objects_found": int(objects or 0),
            "queue": queue, "held": held, "recent_failures": failures,
            "waiting_for_retry": jobs[JobState.FAILED],
            "quarantined": jobs[JobState.QUARANTINED],
            "queue_depth": counts["queue_depth"], "images_processed": counts["images_processed"],
            "bad_inputs": counts["bad_inputs"],
            "last_hour": {**last_hour, "by_adapter": by_adapter},
            "mean_seconds_per_image": overall_mean,
            "adapters_in_use": assignments, "last_errors": last_errors}


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


def _when(value: Any) -> str:
    return str(value)[:19] if value is not None else ""


def _text(value: Any) -> str:
    """A catalog value as table text: paths, errors and plugin names may hold ``[...]`` (not markup)."""
    return escape("" if value is None else str(value))


def _error(row: dict[str, Any]) -> str:
    return _text((f"[{row['plugin']}] " if row["plugin"] else "") + (row["error"] or ""))


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
    if "queue_depth" in report:
        counts.add_row("queue depth (queued + waiting for a retry)", str(report["queue_depth"]))
        counts.add_row("images processed (done jobs)", str(report["images_processed"]))
        counts.add_row("bad inputs (rejected)", str(report["bad_inputs"]))
    console.print(counts)
    if report.get("roots"):
        roots = Table(title="watched folders (from the config)")
        for col in ("folder", "segmenter", "profile"):
            roots.add_column(col, overflow="fold")
        for row in report["roots"]:
            profile = row.get("profile") or ""
            if profile:
                profile += " (equal to the reference)" if row.get("exact") else " (approximate)"
            roots.add_row(_text(row["path"]), row["segmenter"], profile)
        console.print(roots)
    if "last_hour" in report:
        hour = report["last_hour"]
        mean_hour, mean_all = hour["mean_seconds"], report.get("mean_seconds_per_image")
        console.print(
            f"throughput: {hour['images']} image(s) in the last hour"
            + (f", {mean_hour:.2f} s each" if mean_hour is not None else "")
            + (f"; {mean_all:.2f} s per image overall" if mean_all is not None else "")
        )
    if report.get("adapters_in_use") or (report.get("last_hour") or {}).get("by_adapter"):
        adapters = Table(title="adapters in use")
        for col in ("experiment", "adapter", "sha256", "done in the last hour"):
            adapters.add_column(col, justify="right" if col.startswith("done") else "left")
        assigned = set()
        for row in report.get("adapters_in_use", []):
            assigned.add(row["adapter"])
            adapters.add_row(_text(row["experiment"]), _text(row["adapter"]), row["sha256"][:12],
                             str(row["done_last_hour"]))
        for row in report["last_hour"]["by_adapter"]:  # versions no experiment is assigned to any more
            if row["adapter"] not in assigned:
                adapters.add_row("(not assigned)" if row["adapter"] else "(no adapter)", _text(row["adapter"]),
                                 (row["sha256"] or "")[:12], str(row["images"]))
        console.print(adapters)
    if report["queue"]:
        queue = Table(title="queue")
        for col in ("job", "state", "attempts", "next attempt", "experiment", "adapter", "image"):
            queue.add_column(col, overflow="fold" if col == "image" else "ellipsis")
        for row in report["queue"]:
            queue.add_row(str(row["job"]), row["state"], str(row["attempts"]),
                          _when(row["next_attempt_at"]) if row["state"] == JobState.FAILED else "",
                          _text(row["experiment"]), _text(row["adapter"]), _text(row["image"]))
        console.print(queue)
    if report.get("waiting_for_retry"):
        console.print("failed attempts wait for their retry: 'cellseg1d retry' lists them, "
                      "'cellseg1d retry --now --all' runs them now")
    if report.get("held"):
        held = Table(title="held: waiting for an adapter")
        for col in ("experiment", "jobs", "to release them"):
            held.add_column(col)
        for row in report["held"]:
            held.add_row(_text(row["experiment"]), str(row["jobs"]), _text(row["hint"]))
        console.print(held)
    if report.get("last_errors"):
        errors = Table(title="last errors (to run a quarantined job again: cellseg1d quarantine --release JOB_ID)")
        for col in ("job", "state", "at (UTC)", "image", "error"):
            errors.add_column(col, overflow="fold")
        for row in report["last_errors"]:
            state = "rejected" if row["rejected"] else row["state"]
            errors.add_row(str(row["job"]), state, _when(row["at"]), _text(row["image"]), _error(row))
        console.print(errors)
    elif report["recent_failures"]:
        fails = Table(title="recently quarantined (cellseg1d quarantine --release JOB_ID to run again)")
        fails.add_column("image", overflow="fold")
        fails.add_column("error", overflow="fold")
        for row in report["recent_failures"]:
            fails.add_row(_text(row["image"]), _error(row))
        console.print(fails)


def print_images(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"{len(rows)} image(s)")
    for col in ("image", "status", "experiment", "objects", "segmenter", "seconds", "labels / error"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(
            _text(row["path"]), row["status"], _text(row["experiment"]),
            "" if row["objects"] is None else str(row["objects"]),
            _text(row["segmenter"]), "" if row["seconds"] is None else f"{row['seconds']:.2f}",
            _text(row["labels"] or row["error"]),
        )
    console.print(table)
