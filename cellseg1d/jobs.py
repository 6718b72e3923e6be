"""The job state machine on the catalog: enqueue, claim with a lease, heartbeat, finish, retry.

::

    queued --claim--> running --complete--> done
       ^                 |  \\--fail(permanent or attempts used up)--> failed
       |                 \\--fail(transient)--> queued (next_attempt_at = now + backoff)
       \\--release / lease expired (crash)--/

Claiming is an optimistic conditional UPDATE (``WHERE state = 'queued'``), so
two workers, threads or daemons sharing a catalog never run the same job; the
one whose UPDATE matched a row owns the job until its lease expires.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError

from cellseg1d.catalog import Catalog, Image, ImageStatus, Job, JobState, Result, utcnow

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker holds the lease on."""

    job_id: int
    image_id: int
    image_path: str
    root: str
    run_key: str
    attempt: int


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
        session.flush()
        return image

    def enqueue(self, facts: ImageFacts, run_key: str) -> int | None:
        """Queue a run of an image unless a job with this run key exists; return the new job id."""
        try:
            with self.catalog.session() as s:
                if self._has_run(s, facts.path, run_key):
                    return None
                image = self._upsert_image(s, facts, ImageStatus.QUEUED, None)
                job = Job(image_id=image.id, run_key=run_key, state=JobState.QUEUED, attempts=0, created_at=utcnow())
                s.add(job)
                s.flush()
                return job.id
        except IntegrityError:
            return None  # another daemon queued the same run at the same moment

    def record_rejected(self, facts: ImageFacts, run_key: str, error: str, plugin: str | None = None) -> bool:
        """Record an image that cannot be processed (bad input) as a failed job, once per run key."""
        try:
            with self.catalog.session() as s:
                if self._has_run(s, facts.path, run_key):
                    return False
                image = self._upsert_image(s, facts, ImageStatus.FAILED, error)
                now = utcnow()
                s.add(
                    Job(
                        image_id=image.id, run_key=run_key, state=JobState.FAILED, attempts=0,
                        error=error, error_plugin=plugin, created_at=now, finished_at=now,
                    )
                )
                return True
        except IntegrityError:
            return False

    @staticmethod
    def _has_run(session: Any, path: str, run_key: str) -> bool:
        return session.scalar(
            select(Job.id).join(Image).where(Image.path == path, Job.run_key == run_key).limit(1)
        ) is not None

    # -- working ------------------------------------------------------------

    def claim(self) -> ClaimedJob | None:
        """Take the oldest runnable queued job, or return None when there is none."""
        for _ in range(5):
            now = utcnow()
            with self.catalog.session() as s:
                row = s.execute(
                    select(Job.id, Job.image_id, Job.run_key, Job.attempts, Image.path, Image.root)
                    .join(Image)
                    .where(
                        Job.state == JobState.QUEUED,
                        or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now),
                    )
                    .order_by(Job.id)
                    .limit(1)
                ).first()
                if row is None:
                    return None
                won = s.execute(
                    update(Job)
                    .where(Job.id == row.id, Job.state == JobState.QUEUED)
                    .values(
                        state=JobState.RUNNING, lease_owner=self.owner, lease_expires_at=now + self.lease,
                        attempts=Job.attempts + 1, started_at=now, error=None, error_plugin=None,
                    )
                ).rowcount
                if won:
                    s.execute(
                        update(Image).where(Image.id == row.image_id)
                        .values(status=ImageStatus.PROCESSING, updated_at=now)
                    )
                    return ClaimedJob(row.id, row.image_id, row.path, row.root, row.run_key, row.attempts + 1)
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

    def complete(self, job: ClaimedJob, result: dict[str, Any], seconds: float) -> bool:
        """Mark the job done and store its result; False if the lease was lost meanwhile."""
        now = utcnow()
        with self.catalog.session() as s:
            done = s.execute(
                update(Job).where(self._owned(job.job_id)).values(
                    state=JobState.DONE, finished_at=now, seconds=seconds, lease_owner=None, lease_expires_at=None,
                )
            ).rowcount
            if not done:
                return False
            s.add(Result(job_id=job.job_id, image_id=job.image_id, created_at=now, **result))
            s.execute(update(Image).where(Image.id == job.image_id).values(
                status=ImageStatus.DONE, error=None, updated_at=now))
            return True

    def fail(self, job: ClaimedJob, error: str, *, permanent: bool, plugin: str | None = None) -> str:
        """Record a failed attempt; retry later unless permanent or out of attempts. Returns the new state."""
        now = utcnow()
        retry = not permanent and job.attempt < self.max_attempts
        state = JobState.QUEUED if retry else JobState.FAILED
        values: dict[str, Any] = dict(
            state=state, error=error, error_plugin=plugin, lease_owner=None, lease_expires_at=None,
        )
        if retry:
            values["next_attempt_at"] = now + timedelta(seconds=self.backoff * 2 ** (job.attempt - 1))
        else:
            values["finished_at"] = now
        with self.catalog.session() as s:
            s.execute(update(Job).where(self._owned(job.job_id)).values(**values))
            s.execute(update(Image).where(Image.id == job.image_id).values(
                status=ImageStatus.QUEUED if retry else ImageStatus.FAILED, error=error, updated_at=now))
        return state

    def release(self, job: ClaimedJob) -> None:
        """Give an unfinished job back (shutdown): queued again, the attempt not counted."""
        with self.catalog.session() as s:
            s.execute(update(Job).where(self._owned(job.job_id)).values(
                state=JobState.QUEUED, lease_owner=None, lease_expires_at=None, attempts=Job.attempts - 1))
            s.execute(update(Image).where(Image.id == job.image_id).values(
                status=ImageStatus.QUEUED, updated_at=utcnow()))

    def _requeue_interrupted(self, s: Any, where: Any) -> int:
        """Requeue interrupted running jobs; fail those interrupted ``max_attempts`` times.

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
                state=JobState.FAILED if give_up else JobState.QUEUED, lease_owner=None,
                lease_expires_at=None, error=error, finished_at=now if give_up else None))
            s.execute(update(Image).where(Image.id == image_id).values(
                status=ImageStatus.FAILED if give_up else ImageStatus.QUEUED, error=error, updated_at=now))
        return len(rows)

    def reclaim_expired(self) -> int:
        """Requeue running jobs whose lease expired (their daemon died); return how many."""
        with self.catalog.session() as s:
            n = self._requeue_interrupted(s, Job.lease_expires_at < utcnow())
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
