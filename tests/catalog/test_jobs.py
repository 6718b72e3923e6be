"""The job state machine on a real SQLite catalog."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import select, update

from cellseg1d.catalog import Catalog, Image, Job, JobState, utcnow
from cellseg1d.catalog.models import Base
from cellseg1d.catalog.jobs import ImageFacts, JobQueue

RESULT = dict(labels_path="/x/labels/cellseg1d", object_count=3, planes=1, segmenter="classical",
              cellseg1d_version="t", pipeline_version="1", exports={})


def facts(n: int) -> ImageFacts:
    return ImageFacts(path=f"/acq/img{n}.zarr", root="/acq", container=f"/acq/img{n}.zarr", fingerprint=f"fp{n}")


def test_migrations_match_models_and_file_is_private(catalog: Catalog, tmp_path: Path) -> None:
    with catalog.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    assert catalog.schema_revision() == "0005"
    assert (tmp_path / "state" / "catalog.sqlite").stat().st_mode & 0o077 == 0


def test_enqueue_is_idempotent_per_run_key(catalog: Catalog) -> None:
    q = JobQueue(catalog, "w1")
    first = q.enqueue(facts(1), "k1")
    assert first is not None
    assert q.enqueue(facts(1), "k1") is None
    assert q.enqueue(facts(1), "k2") is not None  # a new version of the image is a new run
    with catalog.session() as s:
        assert s.scalar(select(Image.status).where(Image.path == "/acq/img1.zarr")) == "queued"
        assert len(s.scalars(select(Job)).all()) == 2


def test_each_job_is_claimed_once_by_concurrent_workers(catalog: Catalog) -> None:
    for n in range(30):
        JobQueue(catalog, "setup").enqueue(facts(n), "k")
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        q = JobQueue(catalog, name)
        while (job := q.claim()) is not None:
            with lock:
                claimed.append(job.job_id)
            q.complete(job, RESULT, 0.01)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 30
    with catalog.session() as s:
        assert {j.state for j in s.scalars(select(Job))} == {JobState.DONE}


def test_transient_failure_retries_with_backoff_then_is_quarantined(catalog: Catalog) -> None:
    q = JobQueue(catalog, "w", max_attempts=2, retry_backoff_seconds=60)
    q.enqueue(facts(1), "k")
    job = q.claim()
    assert q.fail(job, "disk hiccup", permanent=False) == JobState.FAILED
    with catalog.session() as s:
        waiting = s.scalar(select(Job))
        assert waiting.state == JobState.FAILED and waiting.error == "disk hiccup" and waiting.attempts == 1
        assert timedelta(seconds=55) < waiting.next_attempt_at - utcnow() <= timedelta(seconds=60)
    assert q.claim() is None  # backoff not over yet
    with catalog.session() as s:
        s.execute(update(Job).values(next_attempt_at=utcnow() - timedelta(seconds=1)))
    job = q.claim()
    assert job is not None and job.attempt == 2
    assert q.fail(job, "disk hiccup again", permanent=False) == JobState.QUARANTINED
    with catalog.session() as s:
        image = s.scalar(select(Image))
        assert image.status == "failed" and image.error == "disk hiccup again"  # image status: needs a person
        (event,) = s.scalar(select(Job)).events
        assert event.kind == "quarantined" and "2 of 2 attempts" in event.detail


def test_permanent_failure_is_not_retried(catalog: Catalog) -> None:
    q = JobQueue(catalog, "w", max_attempts=5)
    q.enqueue(facts(1), "k")
    assert q.fail(q.claim(), "bad dtype", permanent=True, plugin="x") == JobState.QUARANTINED
    assert q.claim() is None


def test_release_gives_job_back_without_counting_attempt(catalog: Catalog) -> None:
    q = JobQueue(catalog, "w")
    q.enqueue(facts(1), "k")
    q.release(q.claim())
    job = q.claim()
    assert job is not None and job.attempt == 1


def test_lost_lease_cannot_complete(catalog: Catalog) -> None:
    a, b = JobQueue(catalog, "a", lease_seconds=10), JobQueue(catalog, "b")
    a.enqueue(facts(1), "k")
    job = a.claim()
    with catalog.session() as s:
        s.execute(update(Job).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert b.reclaim_expired() == 1
    assert not a.heartbeat(job.job_id)
    taken = b.claim()
    assert taken is not None and taken.job_id == job.job_id
    assert not a.complete(job, RESULT, 1.0)
    assert b.complete(taken, RESULT, 1.0)


def test_node_restart_requeues_then_gives_up_on_poison_image(catalog: Catalog) -> None:
    node = "host:/state"
    q = JobQueue(catalog, f"{node}#1", max_attempts=2)
    q.enqueue(facts(1), "k")
    q.claim()  # the daemon dies here
    assert JobQueue(catalog, f"{node}#2", max_attempts=2).reclaim_node(node) == 1
    JobQueue(catalog, f"{node}#2", max_attempts=2).claim()  # and dies again
    q3 = JobQueue(catalog, f"{node}#3", max_attempts=2)
    assert q3.reclaim_node(node) == 1
    assert q3.claim() is None
    with catalog.session() as s:
        job = s.scalar(select(Job))
        assert job.state == JobState.QUARANTINED and "interrupted 2 time(s)" in job.error


def test_rejected_image_recorded_once(catalog: Catalog) -> None:
    q = JobQueue(catalog, "w")
    assert q.record_rejected(facts(1), "rejected:abc", "invalid JSON in /acq/img1.zarr/zarr.json")
    assert not q.record_rejected(facts(1), "rejected:abc", "invalid JSON in /acq/img1.zarr/zarr.json")
    with catalog.session() as s:
        job = s.scalar(select(Job))
        assert job.state == JobState.QUARANTINED and "zarr.json" in job.error
