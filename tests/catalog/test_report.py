"""``cellseg1d status``: counts shared with the metrics, throughput, adapters in use, last errors.

A real SQLite catalog with known contents, filled through the job queue
(enqueue, claim, complete, fail, record_rejected); the CLI runs in-process.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from sqlalchemy import update

from cellseg1d import cli
from cellseg1d.catalog import Adapter, Assignment, Catalog, Experiment, Job, utcnow
from cellseg1d.catalog.jobs import JobQueue
from cellseg1d.catalog.report import JOB_STATES, catalog_counts, status_report
from tests.catalog.test_jobs import facts

RESULT = dict(labels_path="/x/labels/cellseg1d", object_count=3, planes=1, segmenter="classical",
              cellseg1d_version="t", pipeline_version="1", exports={})
#: What :func:`populate` puts in the catalog.
KNOWN_JOBS = {"held": 1, "queued": 1, "running": 1, "failed": 1, "quarantined": 3, "done": 3}


def _adapter(s, name: str, version: int, sha: str) -> Adapter:
    row = Adapter(name=name, version=version, sha256=sha, base_model_type="vit_b", base_sha256="b" * 64,
                  store_path=f"/store/{name}/v{version}", meta={}, created_at=utcnow())
    s.add(row)
    s.flush()
    return row


def populate(catalog: Catalog) -> dict[str, int]:
    """3 done (2 in the last hour), 1 queued, 1 failed waiting, 1 quarantined, 2 rejected, 1 held, 1 running.

    Experiment ``hela`` is assigned ``hela@v2``; image 1 ran with hela@v2 (2 s), image 2 with hela@v1
    (4 s), image 3 without adapter (6 s, finished two hours ago). Returns image number -> job id.
    """
    with catalog.session() as s:
        v1 = _adapter(s, "hela", 1, "1" * 64)
        v2 = _adapter(s, "hela", 2, "2" * 64)
        hela = Experiment(name="hela", created_at=utcnow())
        s.add(hela)
        s.flush()
        s.add(Assignment(experiment_id=hela.id, adapter_id=v2.id, pinned=True, assigned_at=utcnow()))
        adapter_ids = {1: v2.id, 2: v1.id, 3: None}
    q = JobQueue(catalog, "daemon#1", max_attempts=3, retry_backoff_seconds=3600)
    jobs: dict[int, int] = {}
    for n, seconds in ((1, 2.0), (2, 4.0), (3, 6.0)):
        jobs[n] = q.enqueue(replace(facts(n), experiment="hela"), "k", adapter_id=adapter_ids[n])
        claimed = q.claim()
        assert claimed is not None and claimed.job_id == jobs[n]
        assert q.complete(claimed, RESULT, seconds)
    for n, permanent in ((5, False), (6, True)):
        jobs[n] = q.enqueue(facts(n), "k")
        claimed = q.claim()
        assert claimed is not None and claimed.job_id == jobs[n]
        q.fail(claimed, f"error of image {n} [x]", permanent=permanent, plugin="sam" if permanent else None)
    for n in (7, 8):
        assert q.record_rejected(facts(n), f"rejected:{n}", f"invalid JSON in /acq/img{n}.zarr/zarr.json")
    jobs[10] = q.enqueue(facts(10), "k")
    assert q.claim().job_id == jobs[10]  # left running
    jobs[9] = q.enqueue(facts(9), "k:held", held=True)
    jobs[4] = q.enqueue(facts(4), "k")  # left queued
    with catalog.session() as s:
        s.execute(update(Job).where(Job.id == jobs[3]).values(finished_at=utcnow() - timedelta(hours=2)))
        rejected = s.query(Job).filter(Job.run_key.startswith("rejected:")).all()
        jobs.update({7: rejected[0].id, 8: rejected[1].id})
    return jobs


def test_catalog_counts_lists_every_state_and_the_shared_numbers(catalog: Catalog) -> None:
    empty = catalog_counts(catalog)
    assert empty == {"jobs": dict.fromkeys(JOB_STATES, 0), "queue_depth": 0, "images_processed": 0, "bad_inputs": 0}
    populate(catalog)
    counts = catalog_counts(catalog)
    assert counts["jobs"] == KNOWN_JOBS and list(counts["jobs"]) == list(JOB_STATES)
    assert (counts["queue_depth"], counts["images_processed"], counts["bad_inputs"]) == (2, 3, 2)
    with catalog.session() as s:  # the same function on the caller's session
        assert catalog_counts(s) == counts


def test_status_report_new_fields(catalog: Catalog) -> None:
    jobs = populate(catalog)
    report = status_report(catalog)
    # every existing key is still there, with the same meaning
    # image 5's failed attempt waits for its retry: the image is queued
    assert report["images"] == {"done": 3, "queued": 2, "processing": 1, "failed": 3, "held": 1}
    assert (report["waiting_for_retry"], report["quarantined"], report["objects_found"]) == (1, 3, 9)
    assert [r["job"] for r in report["recent_failures"]] == [jobs[8], jobs[7], jobs[6]]
    assert {r["job"] for r in report["queue"]} == {jobs[4], jobs[5], jobs[9], jobs[10]}

    assert report["jobs"] == KNOWN_JOBS
    assert (report["queue_depth"], report["images_processed"], report["bad_inputs"]) == (2, 3, 2)
    # throughput: only the two jobs finished within the hour
    assert report["last_hour"] == {
        "images": 2, "images_per_hour": 2, "mean_seconds": 3.0,
        "by_adapter": [{"adapter": "hela@v1", "sha256": "1" * 64, "images": 1},
                       {"adapter": "hela@v2", "sha256": "2" * 64, "images": 1}],
    }
    assert report["mean_seconds_per_image"] == 4.0
    (assigned,) = report["adapters_in_use"]
    assert {k: assigned[k] for k in ("experiment", "adapter", "sha256", "done_last_hour")} == {
        "experiment": "hela", "adapter": "hela@v2", "sha256": "2" * 64, "done_last_hour": 1}
    # last errors: rejected, quarantined and waiting-for-retry jobs, newest first
    errors = report["last_errors"]
    assert [(e["job"], e["state"], e["rejected"]) for e in errors] == [
        (jobs[8], "quarantined", True), (jobs[7], "quarantined", True),
        (jobs[6], "quarantined", False), (jobs[5], "failed", False)]
    assert errors[2]["plugin"] == "sam" and errors[2]["error"] == "error of image 6 [x]"
    assert errors[3]["image"] == "/acq/img5.zarr" and errors[3]["next_attempt_at"] is not None
    assert all(e["at"] is not None for e in errors)
    assert [e["job"] for e in status_report(catalog, recent=2)["last_errors"]] == [jobs[8], jobs[7]]


def test_status_report_on_an_empty_catalog(catalog: Catalog) -> None:
    report = status_report(catalog)
    assert report["jobs"] == dict.fromkeys(JOB_STATES, 0)
    assert report["last_hour"] == {"images": 0, "images_per_hour": 0, "mean_seconds": None, "by_adapter": []}
    assert report["mean_seconds_per_image"] is None
    assert report["adapters_in_use"] == [] and report["last_errors"] == []


def test_status_cli_json_and_text_show_the_new_parts(catalog: Catalog, state: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps long cells at the default 80
    populate(catalog)
    assert cli.main(["status", "--state-dir", str(state), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    expected = json.loads(json.dumps(status_report(catalog), default=str))
    for key in ("jobs", "queue_depth", "images_processed", "bad_inputs", "mean_seconds_per_image"):
        assert shown[key] == expected[key], key
    assert shown["last_hour"]["images"] == 2 and shown["adapters_in_use"][0]["adapter"] == "hela@v2"
    assert [e["job"] for e in shown["last_errors"]] == [e["job"] for e in expected["last_errors"]]

    assert cli.main(["status", "--state-dir", str(state)]) == 0
    text = capsys.readouterr().out
    for part in ("queue depth", "images processed", "bad inputs", "throughput: 2 image(s) in the last hour",
                 "adapters in use", "hela@v2", "(not assigned)", "last errors", "rejected",
                 "[sam] error of image 6 [x]", "jobs quarantined"):
        assert part in text, part


def test_status_counts_on_100k_jobs(catalog: Catalog, state: Path) -> None:
    now = utcnow().strftime("%Y-%m-%d %H:%M:%S.%f")  # as the catalog stores UTC times in SQLite
    old = (utcnow() - timedelta(hours=3)).strftime("%Y-%m-%d %H:%M:%S.%f")
    n = 100_000
    states = ("done",) * 16 + ("queued", "failed", "quarantined", "held")
    conn = sqlite3.connect(state / "catalog.sqlite")
    with conn:
        conn.executemany("INSERT INTO images (id, path, root, container, status, first_seen, updated_at) "
                         "VALUES (?, ?, '/acq', ?, 'done', ?, ?)",
                         ((i, f"/acq/{i}.zarr", f"/acq/{i}.zarr", now, now) for i in range(1, n + 1)))
        conn.executemany(
            "INSERT INTO jobs (id, image_id, run_key, state, attempts, created_at, started_at, finished_at, "
            "seconds, error) VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?)",
            ((i, i, f"rejected:{i}" if i % 40 == 18 else f"fp{i}:p1", states[i % 20], now, now,
              (now if i % 2 else old) if states[i % 20] in ("done", "quarantined") else None,
              1.5 if states[i % 20] == "done" else None, None if states[i % 20] == "done" else "boom")
             for i in range(1, n + 1)))
    conn.close()
    counts = catalog_counts(catalog)
    report = status_report(catalog)
    assert counts["jobs"]["done"] == 80_000 and counts["queue_depth"] == 10_000
    assert counts["bad_inputs"] == 2_500
    assert report["last_hour"]["images"] == 40_000 and report["mean_seconds_per_image"] == 1.5
    assert len(report["last_errors"]) == 10 and len(report["queue"]) == 50
    # (speed on such a catalog: bench/bench_status.py)


def test_status_shows_what_each_watched_folder_runs(catalog: Catalog, state: Path, tmp_path: Path, capsys,
                                                    monkeypatch) -> None:
    """``status`` names the segmenter and the ``sam.profile`` of every watched folder of the config."""
    monkeypatch.setenv("COLUMNS", "200")
    checkpoint = tmp_path / "sam.pth"
    checkpoint.write_bytes(b"not read by status")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    config = tmp_path / "cellseg1d.toml"
    config.write_text(f'state_dir = "{state}"\n[sam]\ncheckpoint = "{checkpoint}"\nprofile = "fast"\n'
                      f'[[watch.roots]]\npath = "{tmp_path / "a"}"\n[[watch.roots]]\npath = "{tmp_path / "b"}"\n')
    assert cli.main(["status", "--config", str(config), "--json"]) == 0
    roots = json.loads(capsys.readouterr().out)["roots"]
    assert [(r["path"], r["segmenter"], r["profile"], r["exact"]) for r in roots] == [
        (str(tmp_path / "a"), "sam", "fast", False), (str(tmp_path / "b"), "sam", "fast", False)]
    assert cli.main(["status", "--config", str(config)]) == 0
    assert "fast (approximate)" in capsys.readouterr().out
    config.write_text(f'state_dir = "{state}"\n[[watch.roots]]\npath = "{tmp_path / "a"}"\n')  # no SAM
    assert cli.main(["status", "--config", str(config), "--json"]) == 0
    assert [(r["segmenter"], r["profile"]) for r in json.loads(capsys.readouterr().out)["roots"]] == [
        ("classical", None)]
