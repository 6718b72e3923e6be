"""The catalog on a real PostgreSQL server: migrations, the job queue under concurrency, two daemons on one
catalog, a 30 s database outage during a run, and the database password (never logged)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, make_url, select, text

from cellseg1d.catalog import Catalog, Job, JobState, Result
from cellseg1d.catalog.db import alembic_config
from cellseg1d.catalog.models import Base
from cellseg1d.errors import CatalogError
from cellseg1d.catalog.jobs import ImageFacts, JobQueue
from cellseg1d.model.metrics import average_precision
from tests.helpers import REPO, wait_for
from tests.pg import PASSWORD_ROLE, PgServer, start_server

RESULT = dict(labels_path="/x/labels/cellseg1d", object_count=3, planes=1, segmenter="classical",
              cellseg1d_version="t", pipeline_version="1", exports={})
HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()


def facts(n: int) -> ImageFacts:
    return ImageFacts(path=f"/acq/img{n}.zarr", root="/acq", container=f"/acq/img{n}.zarr", fingerprint=f"fp{n}")


def rows(url: str, sql: str, **params: object) -> list[tuple]:
    """Rows of one query on a PostgreSQL catalog (a fresh connection each time)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params)]
    finally:
        engine.dispose()


def image_jobs(url: str) -> dict[str, list[tuple]]:
    """Image path -> [(job state, attempts, has result)] for every job."""
    out: dict[str, list[tuple]] = {}
    for path, state, attempts, result in rows(
            url, "SELECT images.path, jobs.state, jobs.attempts, results.id IS NOT NULL FROM jobs "
                 "JOIN images ON images.id = jobs.image_id LEFT JOIN results ON results.job_id = jobs.id "
                 "ORDER BY jobs.id"):
        out.setdefault(path, []).append((state, attempts, result))
    return out


def done_paths(url: str) -> set[str]:
    try:
        return {p for p, jobs in image_jobs(url).items() if [j[0] for j in jobs] == [JobState.DONE]}
    except Exception:  # schema not there yet, or the server is down
        return set()


def assert_labels_valid(image: Path, mask: np.ndarray) -> None:
    labels = np.asarray(zarr.open_array(str(image / "labels" / "cellseg1d" / "0"), mode="r"))[0]
    assert labels.shape == mask.shape
    assert average_precision(labels, mask, thresholds=(0.5,))[0].ap >= 0.8


# -- schema -----------------------------------------------------------------------------------


def test_fresh_database_migrates_to_head_matching_the_models(pg_url: str) -> None:
    catalog = Catalog(pg_url)
    assert catalog.backend == "postgresql" and not catalog.has_schema()
    catalog.migrate()
    assert catalog.schema_revision() == HEAD
    with catalog.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    catalog.migrate()  # at head: nothing to do
    q = JobQueue(catalog, "w")
    job_id = q.enqueue(facts(1), "k")
    with catalog.session() as s:
        job = s.get(Job, job_id)
        assert job.created_at.utcoffset().total_seconds() == 0  # tz-aware UTC on PostgreSQL too
        assert abs((job.created_at - job.image.first_seen).total_seconds()) < 5
    catalog.close()


def test_database_made_by_revision_0001_upgrades_keeping_rows(pg_url: str) -> None:
    engine = create_engine(pg_url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0001")
    with engine.begin() as conn:
        # As cellseg1d at 0001 wrote them: ids from the tables' sequences.
        image_id = conn.execute(text(
            "INSERT INTO images (path, root, container, fingerprint, status, first_seen, updated_at) VALUES "
            "('/acq/old.zarr', '/acq', '/acq/old.zarr', 'fp', 'done', '2026-01-01 10:00', '2026-01-01 10:01') "
            "RETURNING id")).scalar_one()
        job_id = conn.execute(text(
            "INSERT INTO jobs (image_id, run_key, state, attempts, created_at, finished_at, seconds) VALUES "
            "(:image, 'fp:p1', 'done', 1, '2026-01-01 10:00', '2026-01-01 10:01', 2.5) RETURNING id"),
            {"image": image_id}).scalar_one()
        conn.execute(text(
            "INSERT INTO results (job_id, image_id, labels_path, object_count, planes, segmenter, "
            "cellseg1d_version, pipeline_version, exports, created_at) VALUES "
            "(:job, :image, '/acq/old.zarr/labels/cellseg1d', 7, 1, 'classical', '0.0.1', '1', '{}', "
            "'2026-01-01 10:01')"), {"job": job_id, "image": image_id})
    engine.dispose()
    catalog = Catalog(pg_url)
    assert catalog.schema_revision() == "0001"
    catalog.migrate()
    assert catalog.schema_revision() == HEAD
    with catalog.session() as s:
        result = s.scalar(select(Result))
        assert (result.object_count, result.job.state, result.job.image.path) == (7, "done", "/acq/old.zarr")
        assert result.created_at.isoformat() == "2026-01-01T10:01:00+00:00"
        assert result.provenance is None and result.job.experiment is None  # new columns, empty
    # The upgraded catalog works: the ids continue after the old rows.
    q = JobQueue(catalog, "w")
    new_job = q.enqueue(facts(2), "k")
    assert new_job is not None and new_job > job_id
    assert q.complete(q.claim(), RESULT, 0.1)
    with catalog.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    catalog.close()


def test_daemons_starting_together_migrate_once(pg_url: str) -> None:
    """Without the advisory lock, concurrent CREATE TABLEs make all but one daemon fail."""
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def start() -> None:
        catalog = Catalog(pg_url)
        try:
            barrier.wait()
            catalog.migrate()
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)
        finally:
            catalog.close()

    threads = [threading.Thread(target=start, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "migrations blocked each other"
    assert errors == []
    assert rows(pg_url, "SELECT version_num FROM alembic_version") == [(HEAD,)]


# -- the job queue ------------------------------------------------------------------------------

RACER = textwrap.dedent("""
    import json, sys, threading, time
    from cellseg1d.catalog import Catalog
    from cellseg1d.catalog.jobs import ImageFacts, JobQueue

    url, name, start_at, n_images = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    catalog = Catalog(url)
    out = {"enqueued": [], "claimed": []}
    lock = threading.Lock()

    def race(thread):
        q = JobQueue(catalog, f"{name}-{thread}")
        time.sleep(max(0.0, start_at - time.time()))
        for n in range(n_images):  # every thread of both processes queues the same images
            f = ImageFacts(path=f"/acq/img{n}.zarr", root="/acq", container=f"/acq/img{n}.zarr", fingerprint="fp")
            job = q.enqueue(f, "fp:p1", once_per="fp:p1")
            with lock:
                out["enqueued"].append([n, job])
        while (job := q.claim()) is not None:
            with lock:
                out["claimed"].append(job.job_id)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    print(json.dumps(out))
""")


def test_two_processes_racing_enqueue_each_image_once_and_claim_each_job_once(pg_url: str) -> None:
    Catalog(pg_url).migrate()
    n_images = 15
    start_at = time.time() + 4  # both processes imported and connected by then
    procs = [subprocess.Popen([sys.executable, "-c", RACER, pg_url, name, str(start_at), str(n_images)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for name in ("a", "b")]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        outs.append(json.loads(stdout))
    winners: dict[int, list[int]] = {}
    for out in outs:
        for n, job in out["enqueued"]:
            if job is not None:
                winners.setdefault(n, []).append(job)
    assert sorted(winners) == list(range(n_images)) and all(len(w) == 1 for w in winners.values()), winners
    claimed = [j for out in outs for j in out["claimed"]]
    assert sorted(claimed) == sorted(w[0] for w in winners.values())  # each job claimed exactly once
    assert rows(pg_url, "SELECT count(*), count(DISTINCT image_id) FROM jobs") == [(n_images, n_images)]
    assert rows(pg_url, "SELECT DISTINCT state FROM jobs") == [(JobState.RUNNING,)]


def test_lost_lease_and_lost_commit_answer(pg_url: str) -> None:
    catalog = Catalog(pg_url)
    catalog.migrate()
    a, b = JobQueue(catalog, "a"), JobQueue(catalog, "b")
    a.enqueue(facts(1), "k")
    job = a.claim()
    assert b.claim() is None
    assert a.complete(job, RESULT, 1.0)
    assert a.complete(job, RESULT, 1.0)  # the same commit again (its answer was lost): done, not doubled
    with catalog.session() as s:
        assert len(s.scalars(select(Result)).all()) == 1
    a.enqueue(facts(2), "k")
    job2 = a.claim()
    assert a.reclaim_expired(keep=[job2.job_id]) == 0
    with catalog.session() as s:
        s.execute(text("UPDATE jobs SET lease_expires_at = now() - interval '1 hour' WHERE id = :id"),
                  {"id": job2.job_id})
    assert a.reclaim_expired(keep=[job2.job_id]) == 0  # our own job in progress is never requeued
    assert b.reclaim_expired() == 1
    assert not a.heartbeat(job2.job_id) and not a.complete(job2, RESULT, 1.0)
    catalog.close()


def test_transient_errors_are_told_from_bugs(pg_url: str) -> None:
    catalog = Catalog(pg_url)
    catalog.migrate()

    def bad_query() -> None:
        with catalog.session() as s:
            s.execute(text("SELECT no_such_column FROM jobs"))

    with pytest.raises(Exception) as bug:
        catalog.retry(bad_query)  # a bug is raised at once, not retried for ever
    assert not catalog.is_transient(bug.value) and not catalog.unreachable
    down = Catalog(make_url(pg_url).set(port=1).render_as_string(hide_password=False))  # nothing listens there
    stop = threading.Event()
    threading.Timer(1.5, stop.set).start()
    started = time.monotonic()
    with pytest.raises(Exception) as outage:
        down.wait_until_reachable(until=stop)
    assert down.is_transient(outage.value) and down.unreachable and time.monotonic() - started >= 1.4


# -- daemons ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_daemons_on_one_catalog_and_folder_process_each_image_once(
        tmp_path: Path, acquisition: Path, daemons, make_image, pg_url: str) -> None:
    env = {"CELLSEG1D_CATALOG__URL": pg_url}
    first = daemons(tmp_path / "state-a", "--watch", str(acquisition), "--settle-seconds", "0.5", env=env)
    second = daemons(tmp_path / "state-b", "--watch", str(acquisition), "--settle-seconds", "0.5", env=env)
    images = {}
    for n in range(16):
        path, mask = make_image(acquisition / f"img{n:02d}.zarr", size=64, n_cells=4, seed=n)
        images[str(path)] = mask
    wait_for(lambda: done_paths(pg_url) == set(images), 120, interval=0.5, what="all images done")
    time.sleep(2)  # anything processed twice would show up now
    jobs = image_jobs(pg_url)
    assert {p: [(s, r) for s, _, r in js] for p, js in jobs.items()} == {p: [("done", True)] for p in images}
    assert rows(pg_url, "SELECT count(*) FROM results") == [(16,)]
    for path, mask in images.items():
        assert_labels_valid(Path(path), mask)
    processed = [len(re.findall(r" processing .*img\d\d\.zarr", d.log())) for d in (first, second)]
    assert sum(processed) == 16, processed
    assert min(processed) >= 1, f"one daemon did all the work: {processed}"
    assert first.stop() == 0 and second.stop() == 0


@pytest.mark.slow
def test_thirty_second_outage_waits_reconnects_and_loses_nothing(
        tmp_path: Path, acquisition: Path, daemons, make_image) -> None:
    server = start_server()  # its own server: this test stops it
    try:
        url = server.create_database()
        env = {"CELLSEG1D_CATALOG__URL": url, "CELLSEG1D_JOBS__LEASE_SECONDS": "6",
               "CELLSEG1D_WATCH__RESCAN_SECONDS": "2"}
        daemon = daemons(tmp_path / "state", "--watch", str(acquisition), "--settle-seconds", "0.5",
                         "--workers", "2", env=env)
        images = {}
        for n in range(8):
            path, mask = make_image(acquisition / f"before{n}.zarr", size=192, n_cells=12, seed=n)
            images[str(path)] = mask
        wait_for(lambda: len(done_paths(url)) >= 2, 60, interval=0.1, what="first images done")
        server.stop("fast")  # while the others are queued or being processed
        down_at = time.monotonic()
        for n in range(6):  # new images arrive during the outage
            path, mask = make_image(acquisition / f"during{n}.zarr", size=192, n_cells=12, seed=100 + n)
            images[str(path)] = mask
        time.sleep(max(0.0, 30 - (time.monotonic() - down_at)))
        assert daemon.alive(), daemon.log()
        server.start()
        wait_for(lambda: done_paths(url) == set(images), 120, interval=0.5, what="every image done after the outage")
        time.sleep(8)  # a lease time and a rescan: a second run would start now
        log = daemon.log()
        assert daemon.alive(), log
        jobs = image_jobs(url)
        assert {p: [(s, r) for s, _, r in js] for p, js in jobs.items()} == {p: [("done", True)] for p in images}
        for path, mask in images.items():
            assert len(re.findall(rf" processing {re.escape(path)} ", log)) == 1, f"{path} ran twice:\n{log}"
            assert_labels_valid(Path(path), mask)
        assert len(re.findall(r"catalog .* unreachable", log)) == 1, log
        assert len(re.findall(r"catalog reachable again", log)) == 1, log
        assert "Traceback" not in log and " ERROR " not in log, log
        assert daemon.stop() == 0
    finally:
        server.destroy()


# -- password -----------------------------------------------------------------------------------


def test_password_file_must_be_private_and_is_not_given_twice(tmp_path: Path, pg_server: PgServer) -> None:
    url = pg_server.password_url("postgres")
    secret = tmp_path / "pw"
    secret.write_text(pg_server.password + "\n")
    secret.chmod(0o644)
    with pytest.raises(CatalogError, match="readable or writable by every user") as err:
        Catalog(url, password_file=secret)
    assert pg_server.password not in str(err.value)
    secret.chmod(0o640)
    os.environ["CELLSEG1D_CATALOG_PASSWORD"] = "other"
    try:
        with pytest.raises(CatalogError, match="given twice"):
            Catalog(url, password_file=secret)
    finally:
        del os.environ["CELLSEG1D_CATALOG_PASSWORD"]
    Catalog(url, password_file=secret).ping()  # the file's first line, newline stripped
    with pytest.raises(Exception) as wrong:
        Catalog(url, password="not-the-password").ping()
    assert "password authentication failed" in str(wrong.value)


@pytest.mark.slow
def test_password_from_env_or_file_works_and_is_never_shown(
        tmp_path: Path, acquisition: Path, daemons, make_image, pg_server: PgServer) -> None:
    db = pg_server.create_database().rsplit("/", 1)[1]
    url = pg_server.password_url(db)
    secret = pg_server.password
    image, _ = make_image(acquisition / "one.zarr", size=64, n_cells=4)
    daemon = daemons(tmp_path / "state", "--watch", str(acquisition), "--settle-seconds", "0.3",
                     "--log-level", "DEBUG",
                     env={"CELLSEG1D_CATALOG__URL": url, "CELLSEG1D_CATALOG_PASSWORD": secret})
    wait_for(lambda: done_paths(pg_server.admin_url(db)) == {str(image)}, 60, what="image done")
    # The password file, through a config file, for the CLI.
    pw_file = tmp_path / "catalog.pw"
    pw_file.write_text(secret + "\n")
    pw_file.chmod(0o600)
    config = tmp_path / "cellseg1d.toml"
    config.write_text(f'state_dir = "{tmp_path / "cli-state"}"\n[catalog]\nurl = "{url}"\n'
                      f'password_file = "{pw_file}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLSEG1D_")}
    outputs = []
    for args in (["status"], ["status", "--json"], ["images", "--json"]):
        out = subprocess.run([sys.executable, "-m", "cellseg1d", *args, "--config", str(config)],
                             capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
        assert out.returncode == 0, out.stderr
        outputs.append(out.stdout + out.stderr)
        if args == ["status", "--json"]:
            assert json.loads(out.stdout)["images"] == {"done": 1}
    # A wrong password: a clear error, still without any password in it.
    pw_file.write_text("wrong-" + secret[::-1])
    bad = subprocess.run([sys.executable, "-m", "cellseg1d", "status", "--config", str(config)],
                         capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert bad.returncode == 2 and "password authentication failed" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr
    assert daemon.stop() == 0
    for text_ in [daemon.log(), *outputs, bad.stdout + bad.stderr]:
        assert secret not in text_ and secret[::-1] not in text_


def test_password_in_the_url_is_hidden_in_outage_logs_and_errors(pg_server: PgServer, caplog) -> None:
    secret = "in-url-" + pg_server.password
    url = f"postgresql+psycopg://{PASSWORD_ROLE}:{secret}@127.0.0.1:1/db"  # nothing listens on port 1
    catalog = Catalog(url)
    stop = threading.Event()
    threading.Timer(0.8, stop.set).start()
    with caplog.at_level("WARNING"), pytest.raises(Exception):
        catalog.wait_until_reachable(until=stop)
    assert "unreachable" in caplog.text and "***" in caplog.text and secret not in caplog.text
    with pytest.raises(CatalogError) as err:
        catalog.migrate()
    assert secret not in str(err.value) and "***" in str(err.value)
