"""The job state machine on the catalog: enqueue, claim with a lease, heartbeat, finish, retry.

::

    held --adapter assigned--> queued --claim--> running --complete--> done
                                 ^                 |  \\--fail(permanent or attempts used up)--> failed
                                 |                 |\\--fail(transient)--> queued (next_attempt_at = now + backoff)
                                 |                 \\--defer(executor error)--> queued (attempt not counted)
                                 \\--release / lease expired (crash)--/

Claiming is an optimistic conditional UPDATE (``WHERE state = 'queued'``), so
two workers, threads or daemons sharing a catalog never run the same job; the
one whose UPDATE matched a row owns the job until its lease expires. A job is
``held`` while its experiment has no adapter and its root says to wait; it
keeps its place (nothing is dropped) and is queued when an adapter is assigned.

Run keys are ``<image fingerprint>:p<pipeline version>[:<route>]``, the route
being the adapter version (``hela@v3``), ``default``, ``classical`` or
``held``. The scheduler queues an image version at most once whatever the
route (restarts never double-process); ``cellseg1d reprocess`` asks for an
exact run key, so a new adapter version makes a new run.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, case, or_, select, update
from sqlalchemy.exc import IntegrityError

from cellseg1d import PIPELINE_VERSION
from cellseg1d.catalog import (
    Catalog,
    Experiment,
    ExportOutcome,
    Image,
    ImageStatus,
    Job,
    JobEvent,
    JobEventKind,
    JobState,
    Result,
    utcnow,
)

log = logging.getLogger(__name__)
HELD_TAG = "held"


def run_key_prefix(fingerprint: str) -> str:
    """The part of a run key naming the image version and pipeline version."""
    return f"{fingerprint}:p{PIPELINE_VERSION}"


def run_key(fingerprint: str, route: str | None = None) -> str:
    """Identity of one run: the same image version through the same pipeline and adapter version runs once."""
    return run_key_prefix(fingerprint) + (f":{route}" if route else "")


@dataclass(frozen=True)
class ImageFacts:
    """What the catalog records about an image when it is registered."""

    path: str
    root: str
    container: str
    fingerprint: str | None = None
    ngff_version: str | None = None
    axes: str | None = None
    shape: str | None = None
    dtype: str | None = None
    experiment: str | None = None


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker holds the lease on."""

    job_id: int
    image_id: int
    image_path: str
    root: str
    run_key: str
    attempt: int
    experiment: str | None = None
    adapter_id: int | None = None


class JobQueue:
    """Jobs in the catalog, seen by one owner (a daemon worker identity)."""

    def __init__(
        self,
        catalog: Catalog,
        owner: str,
        lease_seconds: float = 300.0,
        max_attempts: int = 3,
        retry_backoff_seconds: float = 30.0,
    ) -> None:
        self.catalog = catalog
        self.owner = owner
        self.lease = timedelta(seconds=lease_seconds)
        self.max_attempts = max_attempts
        self.backoff = retry_backoff_seconds

    # -- registering work -------------------------------------------------

    def _upsert_image(self, session: Any, facts: ImageFacts, status: str, error: str | None) -> Image:
        now = utcnow()
        image = session.scalar(select(Image).where(Image.path == facts.path))
        if image is None:
            image = Image(path=facts.path, first_seen=now, status=status)
            session.add(image)
        for key, value in facts.__dict__.items():
            if value is not None:
                setattr(image, key, value)
        image.status, image.error, image.updated_at = status, error, now
        if facts.experiment is not None and session.scalar(
                select(Experiment.id).where(Experiment.name == facts.experiment)) is None:
            session.add(Experiment(name=facts.experiment, created_at=now))
        session.flush()
        return image

    def enqueue(self, facts: ImageFacts, run_key: str, *, adapter_id: int | None = None, held: bool = False,
                once_per: str | None = None) -> int | None:
        """Queue a run of an image unless a job with this run key exists; return the new job id.

        ``once_per``: a run key prefix (:func:`run_key_prefix`); no job is queued
        when the image has any run under it, whatever its route. ``held``: the
        job waits in state ``held`` until an adapter is assigned.
        """
        try:
            with self.catalog.session() as s:
                if self._has_run(s, facts.path, run_key) or (
                        once_per is not None and self._has_version(s, facts.path, once_per)):
                    return None
                status = ImageStatus.HELD if held else ImageStatus.QUEUED
                image = self._upsert_image(s, facts, status, None)
                job = Job(image_id=image.id, run_key=run_key, state=JobState.HELD if held else JobState.QUEUED,
                          attempts=0, created_at=utcnow(), experiment=facts.experiment, adapter_id=adapter_id)
                s.add(job)
                s.flush()
                return job.id
        except IntegrityError:
            return None  # another daemon queued the same run at the same moment

    def record_rejected(self, facts: ImageFacts, run_key: str, error: str, plugin: str | None = None) -> bool:
        """Record an image that cannot be processed (bad input) as a quarantined job, once per run key."""
        try:
            with self.catalog.session() as s:
                if self._has_run(s, facts.path, run_key):
                    return False
                image = self._upsert_image(s, facts, ImageStatus.FAILED, error)
                now = utcnow()
                job = Job(
                    image_id=image.id, run_key=run_key, state=JobState.QUARANTINED, attempts=0,
                    error=error, error_plugin=plugin, created_at=now, finished_at=now,
                )
                s.add(job)
                s.flush()
                add_event(s, job.id, JobEventKind.QUARANTINED, f"rejected at readiness: {error}", self.owner)
                return True
        except IntegrityError:
            return False

    def has_version(self, path: str, prefix: str) -> bool:
        """Whether the image at ``path`` has any run under run key prefix ``prefix``."""
        with self.catalog.session() as s:
            return self._has_version(s, path, prefix)

    @staticmethod
    def _has_run(session: Any, path: str, run_key: str) -> bool:
        return session.scalar(
            select(Job.id).join(Image).where(Image.path == path, Job.run_key == run_key).limit(1)
        ) is not None

    @staticmethod
    def _has_version(session: Any, path: str, prefix: str) -> bool:
        """Whether the image has a run of this version under any route (prefix has no LIKE wildcards)."""
        return session.scalar(
            select(Job.id).join(Image)
            .where(Image.path == path, or_(Job.run_key == prefix, Job.run_key.like(prefix + ":%")))
            .limit(1)
        ) is not None

    # -- working ------------------------------------------------------------

    def claim(self, prefer_adapter: int | None = None) -> ClaimedJob | None:
        """Take the oldest runnable job (queued, or failed and due for its retry); None when there is none.

        Jobs with adapter ``prefer_adapter`` (the one the worker ran last) come
        first, so that runs are grouped by adapter and the model switches less.
        """
        for _ in range(5):
            now = utcnow()
            order = [Job.id]
            if prefer_adapter is not None:
                order.insert(0, case((Job.adapter_id == prefer_adapter, 0), else_=1))
            with self.catalog.session() as s:
                row = s.execute(
                    select(Job.id, Job.image_id, Job.run_key, Job.attempts, Job.experiment, Job.adapter_id,
                           Image.path, Image.root)
                    .join(Image)
                    .where(
                        Job.state.in_(JobState.PENDING),
                        or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now),
                    )
                    .order_by(*order)
                    .limit(1)
                    # PostgreSQL: daemons skip a job another one is claiming instead of queueing behind it
                    # (SQLite has no row locks: BEGIN IMMEDIATE serializes claims already).
                    .with_for_update(skip_locked=True, of=Job)
                ).first()
                if row is None:
                    return None
                won = s.execute(
                    update(Job)
                    .where(Job.id == row.id, Job.state.in_(JobState.PENDING),
                           or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now))
                    .values(
                        state=JobState.RUNNING, lease_owner=self.owner, lease_expires_at=now + self.lease,
                        attempts=Job.attempts + 1, started_at=now, error=None, error_plugin=None,
                        next_attempt_at=None,
                    )
                ).rowcount
                if won:
                    s.execute(
                        update(Image).where(Image.id == row.image_id)
                        .values(status=ImageStatus.PROCESSING, updated_at=now)
                    )
                    return ClaimedJob(row.id, row.image_id, row.path, row.root, row.run_key, row.attempts + 1,
                                      row.experiment, row.adapter_id)
        return None

    def _owned(self, job_id: int) -> Any:
        return and_(Job.id == job_id, Job.state == JobState.RUNNING, Job.lease_owner == self.owner)

    def heartbeat(self, job_id: int) -> bool:
        """Extend the lease; False when the job is no longer ours (lease lost)."""
        with self.catalog.session() as s:
            return bool(
                s.execute(
                    update(Job).where(self._owned(job_id)).values(lease_expires_at=utcnow() + self.lease)
                ).rowcount
            )

    def complete(self, job: ClaimedJob, result: dict[str, Any], seconds: float,
                 exports: list[dict[str, Any]] | None = None) -> bool:
        """Mark the job done and store its result (and its exports' outcomes); False if the lease was lost."""
        now = utcnow()
        with self.catalog.session() as s:
            done = s.execute(
                update(Job).where(self._owned(job.job_id)).values(
                    state=JobState.DONE, finished_at=now, seconds=seconds, lease_owner=None, lease_expires_at=None,
                )
            ).rowcount
            if not done:
                # Not ours any more, or this is a retry of a commit whose answer was lost with the
                # connection (catalog outage): then the job is done and has its result.
                return s.scalar(select(Result.id).where(Result.job_id == job.job_id)) is not None
            s.add(Result(job_id=job.job_id, image_id=job.image_id, created_at=now, **result))
            s.execute(update(Image).where(Image.id == job.image_id).values(
                status=ImageStatus.DONE, error=None, updated_at=now))
            self._add_exports(s, job, exports, now)
            return True

    @staticmethod
    def _add_exports(s: Any, job: ClaimedJob, exports: list[dict[str, Any]] | None, now: Any) -> None:
        for row in exports or ():
            s.add(ExportOutcome(job_id=job.job_id, attempt=job.attempt, at=now, **row))

    def fail(self, job: ClaimedJob, error: str, *, permanent: bool, plugin: str | None = None,
             exports: list[dict[str, Any]] | None = None) -> str:
        """Record a failed attempt (and its exports' outcomes) and return the new state.

        ``failed`` (retried at ``next_attempt_at``, after ``backoff * 2**(attempt-1)``
        seconds) unless the error is permanent or ``max_attempts`` are used up:
        then ``quarantined``.
        """
        now = utcnow()
        retry = not permanent and job.attempt < self.max_attempts
        state = JobState.FAILED if retry else JobState.QUARANTINED
        values: dict[str, Any] = dict(
            state=state, error=error, error_plugin=plugin, lease_owner=None, lease_expires_at=None,
        )
        if retry:
            values["next_attempt_at"] = now + timedelta(seconds=self.backoff * 2 ** (job.attempt - 1))
        else:
            values["finished_at"] = now
        with self.catalog.session() as s:
            if not s.execute(update(Job).where(self._owned(job.job_id)).values(**values)).rowcount:
                return JobState.RUNNING  # the lease passed to another worker: its outcome counts
            s.execute(update(Image).where(Image.id == job.image_id).values(
                status=ImageStatus.QUEUED if retry else ImageStatus.FAILED, error=error, updated_at=now))
            self._add_exports(s, job, exports, now)
            if not retry:
                why = "permanent error" if permanent else f"{job.attempt} of {self.max_attempts} attempts failed"
                add_event(s, job.job_id, JobEventKind.QUARANTINED, f"{why}: {error}", self.owner)
        return state

    def defer(self, job: ClaimedJob, error: str, delay: float) -> bool:
        """Give a job back after an executor error (the cluster, not the image, failed): ``failed`` with
        ``error``, due again in ``delay`` seconds, its attempt not counted (it never counts towards
        ``max_attempts``). False when the lease had passed to another worker (its outcome counts).
        """
        now = utcnow()
        with self.catalog.session() as s:
            if not s.execute(update(Job).where(self._owned(job.job_id)).values(
                    state=JobState.FAILED, error=error, error_plugin=None, lease_owner=None, lease_expires_at=None,
                    attempts=Job.attempts - 1, next_attempt_at=now + timedelta(seconds=delay))).rowcount:
                return False
            s.execute(update(Image).where(Image.id == job.image_id).values(
                status=ImageStatus.QUEUED, error=error, updated_at=now))
        return True

    def release(self, job: ClaimedJob) -> None:
        """Give an unfinished job back (shutdown): queued again, the attempt not counted."""
        with self.catalog.session() as s:
            s.execute(update(Job).where(self._owned(job.job_id)).values(
                state=JobState.QUEUED, lease_owner=None, lease_expires_at=None, attempts=Job.attempts - 1))
            s.execute(update(Image).where(Image.id == job.image_id).values(
                status=ImageStatus.QUEUED, updated_at=utcnow()))

    def _requeue_interrupted(self, s: Any, where: Any) -> int:
        """Requeue interrupted running jobs; quarantine those interrupted ``max_attempts`` times.

        A job that kills its daemon every time (a poison image) must not loop forever.
        """
        now = utcnow()
        rows = s.execute(select(Job.id, Job.image_id, Job.attempts).where(Job.state == JobState.RUNNING, where)).all()
        for job_id, image_id, attempts in rows:
            give_up = attempts >= self.max_attempts
            error = (
                f"interrupted {attempts} time(s) while processing (the daemon crashed or was "
                "killed); giving up. Check the daemon log for the cause."
                if give_up else None
            )
            s.execute(update(Job).where(Job.id == job_id, Job.state == JobState.RUNNING).values(
                state=JobState.QUARANTINED if give_up else JobState.QUEUED, lease_owner=None,
                lease_expires_at=None, error=error, finished_at=now if give_up else None))
            s.execute(update(Image).where(Image.id == image_id).values(
                status=ImageStatus.FAILED if give_up else ImageStatus.QUEUED, error=error, updated_at=now))
            if give_up:
                add_event(s, job_id, JobEventKind.QUARANTINED, error, self.owner)
        return len(rows)

    def reclaim_expired(self, keep: Collection[int] = ()) -> int:
        """Requeue running jobs whose lease expired (their daemon died); return how many.

        ``keep``: jobs this process is still working on; their leases may have
        run out during a catalog outage, and they must not run twice.
        """
        expired = Job.lease_expires_at < utcnow()
        with self.catalog.session() as s:
            n = self._requeue_interrupted(s, and_(expired, Job.id.not_in(keep)) if keep else expired)
        if n:
            log.warning("requeued %d job(s) whose lease expired (a daemon stopped mid-job)", n)
        return n

    def reclaim_node(self, node_id: str) -> int:
        """Requeue jobs left running by an earlier daemon of this node (same host and state dir).

        Only one daemon runs per state dir (it holds a lock file), so such jobs
        were interrupted by a crash or kill and need not wait for their lease.
        """
        with self.catalog.session() as s:
            n = self._requeue_interrupted(s, Job.lease_owner.like(f"{node_id}#%"))
        if n:
            log.warning("requeued %d job(s) interrupted when this daemon last stopped", n)
        return n


@dataclass(frozen=True)
class HeldJob:
    """A job waiting for an adapter."""

    job_id: int
    image_id: int
    image_path: str
    root: str
    experiment: str | None
    run_key: str


def held_jobs(session: Any, experiment: str | None = None) -> list[HeldJob]:
    """Held jobs (of one experiment, or all), oldest first."""
    query = (select(Job.id, Job.image_id, Image.path, Image.root, Job.experiment, Job.run_key)
             .join(Image).where(Job.state == JobState.HELD).order_by(Job.id))
    if experiment is not None:
        query = query.where(Job.experiment == experiment)
    return [HeldJob(*row) for row in session.execute(query).all()]


def release_held(session: Any, job: HeldJob, route: str | None, adapter_id: int | None) -> bool:
    """Queue a held job with the route it now has (its run key says so); False if it was not held any more.

    When an identical run already exists (same image version and route) the
    held job is quarantined as a duplicate instead, naming that run.
    """
    prefix = job.run_key.removesuffix(":" + HELD_TAG)
    new_key = prefix + (f":{route}" if route else "")
    now = utcnow()
    existing = session.scalar(select(Job.id).where(Job.image_id == job.image_id, Job.run_key == new_key))
    if existing is not None:
        values: dict[str, Any] = dict(state=JobState.QUARANTINED, finished_at=now,
                                      error=f"held run superseded by job {existing} (same image version and adapter)")
    else:
        values = dict(state=JobState.QUEUED, run_key=new_key, adapter_id=adapter_id)
    changed = session.execute(
        update(Job).where(Job.id == job.job_id, Job.state == JobState.HELD).values(**values)
    ).rowcount
    if changed and existing is None:
        session.execute(update(Image).where(Image.id == job.image_id, Image.status == ImageStatus.HELD)
                        .values(status=ImageStatus.QUEUED, updated_at=now))
    return bool(changed) and existing is None


# -- events, retries and quarantine (``cellseg1d retry`` / ``cellseg1d quarantine``) --------------


def add_event(session: Any, job_id: int, kind: str, detail: str | None, actor: str | None) -> None:
    """Record a job event (:class:`~cellseg1d.catalog.models.JobEventKind`) in the caller's transaction."""
    session.add(JobEvent(job_id=job_id, at=utcnow(), kind=kind, detail=detail, actor=actor))


@dataclass(frozen=True)
class JobView:
    """One failed or quarantined job, as the ``retry`` and ``quarantine`` commands show it."""

    job_id: int
    image: str
    state: str
    attempts: int
    error: str | None
    plugin: str | None
    next_attempt_at: str | None
    finished_at: str | None
    experiment: str | None
    run_key: str


def _views(session: Any, state: str) -> list[JobView]:
    rows = session.execute(
        select(Job, Image.path).join(Image).where(Job.state == state)
        .order_by(Job.next_attempt_at if state == JobState.FAILED else Job.id, Job.id)
    ).all()
    return [
        JobView(j.id, path, j.state, j.attempts, j.error, j.error_plugin,
                j.next_attempt_at.isoformat() if j.next_attempt_at else None,
                j.finished_at.isoformat() if j.finished_at else None, j.experiment, j.run_key)
        for j, path in rows
    ]


def waiting_for_retry(session: Any) -> list[JobView]:
    """Jobs in state ``failed`` (a failed attempt, retried later), soonest retry first."""
    return _views(session, JobState.FAILED)


def quarantined_jobs(session: Any) -> list[JobView]:
    """Jobs in state ``quarantined``, oldest first."""
    return _views(session, JobState.QUARANTINED)


@dataclass
class Outcome:
    """What a ``retry --now`` or ``quarantine --release`` did, per job id."""

    changed: list[int]
    #: Job id -> why it was left alone (unknown id, wrong state, superseded).
    refused: dict[int, str]


def _explain(session: Any, job_id: int, wanted: str) -> str:
    job = session.get(Job, job_id)
    if job is None:
        return f"no job {job_id} in the catalog"
    return f"job {job_id} is {job.state}, not {wanted}"


def retry_now(session: Any, job_ids: list[int] | None, actor: str) -> Outcome:
    """Make failed jobs (``job_ids``, or all when None) due now; a running daemon claims them on its next poll."""
    ids = job_ids if job_ids is not None else [v.job_id for v in waiting_for_retry(session)]
    outcome = Outcome([], {})
    now = utcnow()
    for job_id in ids:
        changed = session.execute(
            update(Job).where(Job.id == job_id, Job.state == JobState.FAILED).values(next_attempt_at=now)
        ).rowcount
        if changed:
            add_event(session, job_id, JobEventKind.RETRY_NOW, None, actor)
            outcome.changed.append(job_id)
        else:
            outcome.refused[job_id] = _explain(session, job_id, JobState.FAILED)
    return outcome


def release_quarantined(session: Any, job_ids: list[int] | None, reason: str | None, actor: str) -> Outcome:
    """Queue quarantined jobs again (``job_ids``, or all when None) with their attempts reset.

    The release is recorded as a job event with the last error and ``reason``.
    A job whose image has a newer job is refused (it would redo an old image
    version); a superseded held run goes back to ``held``.
    """
    ids = job_ids if job_ids is not None else [v.job_id for v in quarantined_jobs(session)]
    outcome = Outcome([], {})
    now = utcnow()
    for job_id in ids:
        job = session.get(Job, job_id)
        if job is None or job.state != JobState.QUARANTINED:
            outcome.refused[job_id] = _explain(session, job_id, JobState.QUARANTINED)
            continue
        newer = session.scalar(select(Job.id).where(Job.image_id == job.image_id, Job.id > job.id)
                               .order_by(Job.id.desc()).limit(1))
        if newer is not None:
            outcome.refused[job_id] = (f"job {job_id} is superseded by job {newer} of the same image "
                                       "(a newer image version or adapter run); nothing to release")
            continue
        state = JobState.HELD if job.run_key.endswith(":" + HELD_TAG) else JobState.QUEUED
        detail = f"after {job.attempts} attempt(s); last error: {job.error}"  # before the update resets them
        changed = session.execute(
            update(Job).where(Job.id == job_id, Job.state == JobState.QUARANTINED).values(
                state=state, attempts=0, next_attempt_at=None, error=None, error_plugin=None, finished_at=None)
        ).rowcount
        if not changed:  # released by someone else meanwhile
            outcome.refused[job_id] = _explain(session, job_id, JobState.QUARANTINED)
            continue
        session.execute(update(Image).where(Image.id == job.image_id).values(
            status=ImageStatus.HELD if state == JobState.HELD else ImageStatus.QUEUED, error=None, updated_at=now))
        add_event(session, job_id, JobEventKind.RELEASED, f"{reason} ({detail})" if reason else detail, actor)
        outcome.changed.append(job_id)
    return outcome


def requeue_done(session: Any, job_id: int, reason: str, actor: str) -> bool:
    """Queue a done job again (its outputs are gone); its stale result row is removed, the event keeps it.

    Keeping the job (rather than adding one) keeps "one job per run key" and
    "one result per done job"; the event records the old result and the reason.
    """
    job = session.get(Job, job_id)
    if job is None or job.state != JobState.DONE:
        return False
    old = job.result
    summary = (f"; old result {old.id}: {old.object_count} objects, {old.labels_path}, "
               f"{old.created_at.isoformat()}") if old is not None else ""
    if old is not None:
        session.delete(old)
    session.execute(update(Job).where(Job.id == job_id).values(
        state=JobState.QUEUED, attempts=0, finished_at=None, seconds=None, next_attempt_at=None, error=None))
    session.execute(update(Image).where(Image.id == job.image_id).values(
        status=ImageStatus.QUEUED, updated_at=utcnow()))
    add_event(session, job_id, JobEventKind.REDO, reason + summary, actor)
    return True
