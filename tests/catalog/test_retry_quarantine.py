"""Failed (waiting for a retry) and quarantined jobs: migration 0003, ``cellseg1d retry`` and ``quarantine``.

The commands run as real subprocesses on a real SQLite catalog; the last two
tests release jobs to a real daemon subprocess, which picks them up while
running.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from cellseg1d.catalog import Catalog, Image, Job, JobEvent, JobState, utcnow
from cellseg1d.catalog.db import alembic_config
from cellseg1d.catalog.jobs import JobQueue
from tests.helpers import REPO, catalog_rows, done_images, jobs_for, wait_for
from tests.catalog.test_jobs import facts

RESULT = dict(labels_path="/x/labels/cellseg1d", object_count=3, planes=1, segmenter="classical",
              cellseg1d_version="t", pipeline_version="1", exports={})


def cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cellseg1d", *args, "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def failed_job(catalog: Catalog, n: int, *, permanent: bool, plugin: str | None = None) -> int:
    """A job of image ``n`` that failed once (waiting for a retry in an hour) or was quarantined."""
    q = JobQueue(catalog, "daemon#1", max_attempts=3, retry_backoff_seconds=3600)
    q.enqueue(facts(n), "k")
    job = q.claim()
    assert job is not None
    q.fail(job, f"error of image {n}", permanent=permanent, plugin=plugin)
    return job.job_id


def events(catalog: Catalog, job_id: int) -> list[tuple[str, str | None, str | None]]:
    with catalog.session() as s:
        return [(e.kind, e.detail, e.actor) for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job_id))]


def test_upgrade_from_0002_moves_states_and_keeps_results(tmp_path: Path) -> None:
    """Terminal 'failed' rows become 'quarantined', retry waiters 'failed'; no row is lost (no table rebuild)."""
    from alembic import command

    catalog = Catalog(f"sqlite:///{tmp_path / 'old.sqlite'}")
    with catalog.engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0002")
    with catalog.engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO images (id, path, root, container, status, first_seen, updated_at) VALUES "
                             "(1, '/a.zarr', '/', '/a.zarr', 'done', '2026-01-01', '2026-01-01')")
        rows = [  # id, state, error, next_attempt_at
            (1, "done", None, None), (2, "failed", "bad input", None),
            (3, "queued", "disk hiccup", "2026-01-02"), (4, "queued", None, None), (5, "running", None, None),
        ]
        for job_id, state_, error, next_at in rows:
            conn.exec_driver_sql(
                "INSERT INTO jobs (id, image_id, run_key, state, attempts, error, next_attempt_at, created_at) "
                "VALUES (?, 1, ?, ?, 1, ?, ?, '2026-01-01')", (job_id, f"k{job_id}", state_, error, next_at))
        conn.exec_driver_sql(
            "INSERT INTO results (id, job_id, image_id, labels_path, object_count, planes, segmenter, "
            "cellseg1d_version, pipeline_version, exports, created_at) "
            "VALUES (1, 1, 1, '/a.zarr/labels/cellseg1d', 7, 1, 'classical', '0', '1', '{}', '2026-01-01')")
    catalog.migrate()
    assert catalog.schema_revision() == "0005"
    with catalog.engine.begin() as conn:
        states = dict(conn.exec_driver_sql("SELECT id, state FROM jobs").all())
        assert states == {1: "done", 2: "quarantined", 3: "failed", 4: "queued", 5: "running"}
        assert conn.exec_driver_sql("SELECT job_id, object_count FROM results").all() == [(1, 7)]
        assert conn.exec_driver_sql("SELECT count(*) FROM job_events").scalar() == 0
    # and back: the old meaning again
    with catalog.engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0002")
    with catalog.engine.begin() as conn:
        states = dict(conn.exec_driver_sql("SELECT id, state FROM jobs").all())
        assert states == {1: "done", 2: "failed", 3: "queued", 4: "queued", 5: "running"}


def test_failed_job_waits_for_backoff_then_runs(catalog: Catalog) -> None:
    q = JobQueue(catalog, "w", max_attempts=3, retry_backoff_seconds=10)
    q.enqueue(facts(1), "k")
    first = q.claim()
    assert q.fail(first, "flaky", permanent=False) == JobState.FAILED
    assert q.claim() is None
    with catalog.session() as s:
        job = s.get(Job, first.job_id)
        delay = job.next_attempt_at - utcnow()
        assert timedelta(seconds=8) < delay <= timedelta(seconds=10)
        s.execute(update(Job).values(next_attempt_at=utcnow() - timedelta(seconds=1)))
    second = q.claim()
    assert second is not None and second.attempt == 2
    assert q.fail(second, "flaky", permanent=False) == JobState.FAILED
    with catalog.session() as s:  # backoff doubles: 20 s after the second attempt
        delay = s.get(Job, first.job_id).next_attempt_at - utcnow()
        assert timedelta(seconds=18) < delay <= timedelta(seconds=20)


def test_retry_lists_and_makes_jobs_due_now(catalog: Catalog, state: Path) -> None:
    waiting = failed_job(catalog, 1, permanent=False)
    other = failed_job(catalog, 2, permanent=False)
    quarantined = failed_job(catalog, 3, permanent=True)

    listed = json.loads(cli(state, "retry", "--json").stdout)
    assert [row["job_id"] for row in listed] == [waiting, other]
    assert listed[0]["error"] == "error of image 1" and listed[0]["attempts"] == 1
    assert listed[0]["next_attempt_at"] is not None and listed[0]["image"] == "/acq/img1.zarr"
    table = cli(state, "retry")
    assert table.returncode == 0 and "img1.zarr" in table.stdout and "retry --now" in table.stdout
    status = json.loads(cli(state, "status", "--json").stdout)
    assert (status["waiting_for_retry"], status["quarantined"]) == (2, 1)
    assert status["images"] == {"queued": 2, "failed": 1}  # image status: failed = its job is quarantined
    assert [r["job"] for r in status["recent_failures"]] == [quarantined]
    assert {r["job"]: r["state"] for r in status["queue"]} == {waiting: "failed", other: "failed"}
    images = {i["path"]: i["job_state"] for i in json.loads(cli(state, "images", "--json").stdout)}
    assert images == {"/acq/img1.zarr": "failed", "/acq/img2.zarr": "failed", "/acq/img3.zarr": "quarantined"}
    assert "jobs quarantined" in cli(state, "status").stdout

    assert JobQueue(catalog, "w").claim() is None  # an hour to go
    out = cli(state, "retry", "--now", str(waiting), "999", str(quarantined))
    assert out.returncode == 1
    assert "no job 999 in the catalog" in out.stdout
    assert f"job {quarantined} is quarantined, not failed" in out.stdout
    claimed = JobQueue(catalog, "w").claim()
    assert claimed is not None and claimed.job_id == waiting and claimed.attempt == 2
    assert [e[0] for e in events(catalog, waiting)] == ["retry-now"]
    assert events(catalog, waiting)[0][2].startswith("cellseg1d retry")

    assert cli(state, "retry", "--now").returncode == 2  # neither ids nor --all
    assert json.loads(cli(state, "retry", "--now", "--all", "--json").stdout) == {"changed": [other], "refused": {}}
    claimed = JobQueue(catalog, "w").claim()  # due now: the next claim takes it
    assert claimed is not None and claimed.job_id == other
    assert "no job is waiting" in cli(state, "retry").stdout


def test_quarantine_lists_and_releases(catalog: Catalog, state: Path) -> None:
    permanent = failed_job(catalog, 1, permanent=True, plugin="picky")
    q = JobQueue(catalog, "daemon#1", max_attempts=1)
    q.enqueue(facts(2), "k")
    used_up = q.claim()
    assert q.fail(used_up, "timeout", permanent=False) == JobState.QUARANTINED
    q.enqueue(facts(3), "k")
    done = q.claim()
    q.complete(done, RESULT, 1.0)

    listed = json.loads(cli(state, "quarantine", "--json").stdout)
    assert [(r["job_id"], r["plugin"], r["attempts"], r["error"]) for r in listed] == [
        (permanent, "picky", 1, "error of image 1"), (used_up.job_id, None, 1, "timeout")]
    assert "picky" in cli(state, "quarantine").stdout
    assert [e[0] for e in events(catalog, used_up.job_id)] == ["quarantined"]
    assert "1 of 1 attempts failed" in events(catalog, used_up.job_id)[0][1]

    out = cli(state, "quarantine", "--release", str(permanent), "12345", str(done.job_id),
              "--reason", "plugin fixed in 2.1")
    assert out.returncode == 1
    assert "no job 12345" in out.stdout and f"job {done.job_id} is done, not quarantined" in out.stdout
    with catalog.session() as s:
        job = s.get(Job, permanent)
        assert (job.state, job.attempts, job.error) == (JobState.QUEUED, 0, None)
        assert s.scalar(select(Image.status).where(Image.id == job.image_id)) == "queued"
    kinds = events(catalog, permanent)
    assert [k for k, _, _ in kinds] == ["quarantined", "released"]
    assert "plugin fixed in 2.1" in kinds[1][1] and "error of image 1" in kinds[1][1]
    claimed = JobQueue(catalog, "w").claim()
    assert claimed is not None and claimed.job_id == permanent and claimed.attempt == 1

    assert cli(state, "quarantine", "--release").returncode == 2
    assert cli(state, "quarantine", "--reason", "x").returncode == 2  # --reason without --release
    assert json.loads(cli(state, "quarantine", "--release", "--all", "--json").stdout)["changed"] == [used_up.job_id]
    assert "no job is quarantined" in cli(state, "quarantine").stdout


def test_release_refuses_a_superseded_run(catalog: Catalog, state: Path) -> None:
    old = failed_job(catalog, 1, permanent=True)
    assert JobQueue(catalog, "w").enqueue(facts(1), "k-new-version") is not None
    out = cli(state, "quarantine", "--release", str(old))
    assert out.returncode == 1 and "superseded by job" in out.stdout
    with catalog.session() as s:
        assert s.get(Job, old).state == JobState.QUARANTINED


def test_commands_need_a_catalog(tmp_path: Path) -> None:
    for command in ("retry", "quarantine"):
        out = cli(tmp_path / "nothing", command)
        assert out.returncode == 2 and "no catalog" in out.stderr


@pytest.mark.slow
def test_running_daemon_picks_up_released_and_retried_jobs(tmp_path: Path, acquisition: Path, daemons,
                                                           make_image) -> None:
    """A foreign label image quarantines a job; an export folder blocked by a file makes it wait for a retry.

    After fixing each cause, ``quarantine --release`` and ``retry --now`` make the
    running daemon process them without a restart.
    """
    state = tmp_path / "state"
    config = tmp_path / "cellseg1d.toml"
    config.write_text(f"""
state_dir = "{state}"
[[watch.roots]]
path = "{acquisition}"
[readiness]
settle_seconds = 0.3
[jobs]
retry_backoff_seconds = 3600
max_attempts = 5
[plugins]
enable = ["measurements"]
""")
    foreign, _ = make_image(acquisition / "foreign.zarr", size=64, n_cells=4)
    (foreign / "labels" / "cellseg1d").mkdir(parents=True)  # someone else's label image, in the way
    blocked, _ = make_image(acquisition / "blocked.zarr", size=64, n_cells=4, seed=1)
    (acquisition / "blocked.zarr.cellseg1d").write_text("not a folder")  # the export folder cannot be made
    daemon = daemons(state, "--config", str(config))

    def job_state(path: Path) -> str | None:
        jobs = jobs_for(state, str(path))
        return jobs[-1][0] if jobs else None

    wait_for(lambda: job_state(foreign) == "quarantined" and job_state(blocked) == "failed", 60,
             what="one quarantined job, one waiting for a retry")
    (q_job,), = catalog_rows(state, "SELECT id FROM jobs WHERE state = 'quarantined'")
    (r_job,), = catalog_rows(state, "SELECT id FROM jobs WHERE state = 'failed'")
    assert "not written by cellseg1d" in jobs_for(state, str(foreign))[-1][2]
    assert jobs_for(state, str(blocked))[-1][3] == "measurements"  # the plugin at fault

    shutil.rmtree(foreign / "labels")
    (acquisition / "blocked.zarr.cellseg1d").unlink()
    assert cli(state, "quarantine", "--release", str(q_job), "--reason", "foreign labels moved away",
               "--config", str(config)).returncode == 0
    assert cli(state, "retry", "--now", str(r_job), "--config", str(config)).returncode == 0
    wait_for(lambda: {str(foreign), str(blocked)} <= done_images(state), 30, what="both done after release/retry")
    assert [j[:2] for j in jobs_for(state, str(foreign))] == [("done", 1)]
    assert [j[:2] for j in jobs_for(state, str(blocked))] == [("done", 2)]
    assert (acquisition / "blocked.zarr.cellseg1d" / "measurements.csv").is_file()
    kinds = catalog_rows(state, "SELECT kind, detail FROM job_events WHERE job_id = ? ORDER BY id", (q_job,))
    assert [k for k, _ in kinds] == ["quarantined", "released"] and "foreign labels moved away" in kinds[1][1]
    assert daemon.alive()
