"""Benchmark the catalog backends: daemon throughput with SQLite vs PostgreSQL, and the catalog's cost per image.

Prints numbers, asserts nothing. Run as
``.venv/bin/python bench/bench_catalog.py [--images 100] [--size 64] [--workers 1]``.
PostgreSQL runs as a private server on loopback (``tests/pg.py``; needs the
server binaries), with fsync on, as a real one would.

(a) Throughput. N tiny synthetic images are written, then ``cellseg1d run``
    (classical segmenter) is started on them with each catalog. Images/s is
    counted from the first job queued to the last job done (catalog
    timestamps), so the daemon's start-up (imports, watcher) is left out; the
    wall time from process start is printed too.

(b) Catalog cost per image. The catalog calls the daemon makes for one image
    (scheduler: ``has_version``, ``ensure_experiment``, ``enqueue``; worker:
    ``claim``, one ``heartbeat``, ``complete``) are made in this process for N
    images, without any image work, and timed; statements per image are
    counted on the engine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sqlalchemy import create_engine, event, text  # noqa: E402

from cellseg1d.catalog import Catalog  # noqa: E402
from cellseg1d.catalog.jobs import ImageFacts, JobQueue, run_key, run_key_prefix  # noqa: E402
from cellseg1d.routing.registry import ensure_experiment  # noqa: E402
from cellseg1d.testing.synthetic import make_czyx, write_ome_zarr  # noqa: E402
from tests.pg import find_pg_bindir, start_server  # noqa: E402

RESULT = dict(labels_path="/x/labels/cellseg1d", object_count=3, planes=1, segmenter="classical",
              cellseg1d_version="bench", pipeline_version="1", exports={})


def _rows(url: str, sql: str) -> list[tuple]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]
    except Exception:  # schema not there yet
        return []
    finally:
        engine.dispose()


def throughput(url: str, n_images: int, size: int, workers: int, workdir: Path) -> dict[str, float]:
    """Run the daemon on ``n_images`` images with catalog ``url``; images/s and timings."""
    acq, state = workdir / "acq", workdir / "state"
    acq.mkdir(parents=True)
    for i in range(n_images):
        data, _ = make_czyx((size, size), 4, seed=i)
        write_ome_zarr(acq / f"img{i:04d}.zarr", data[0], axes="czyx", channel_names=["nuclei", "membrane"])
    env = {**os.environ, "CELLSEG1D_CATALOG__URL": url, "PYTHONUNBUFFERED": "1"}
    log = open(workdir / "daemon.log", "wb")
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cellseg1d", "run", "--watch", str(acq), "--state-dir", str(state),
         "--settle-seconds", "0.2", "--workers", str(workers), "--log-level", "WARNING"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    count_sql = "SELECT count(*) FROM jobs WHERE state = 'done'"
    try:
        while (_rows(url, count_sql) or [(0,)])[0][0] < n_images:
            if proc.poll() is not None:
                raise RuntimeError((workdir / "daemon.log").read_text())
            time.sleep(0.2)
        wall = time.perf_counter() - started
        (first, last, job_s), = _rows(url, "SELECT min(created_at), max(finished_at), avg(seconds) FROM jobs")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()

    def ts(v: Any) -> float:
        from datetime import UTC, datetime

        stamp = v if isinstance(v, datetime) else datetime.fromisoformat(str(v))
        return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()

    span = ts(last) - ts(first)
    return {"images_per_s": n_images / span, "span_s": span, "wall_s": wall, "job_s": float(job_s)}


def catalog_cost(url: str, n_images: int) -> dict[str, float]:
    """Seconds of catalog calls per image (the daemon's calls for one image) and statements per image."""
    catalog = Catalog(url)
    catalog.migrate()
    statements = [0]
    event.listen(catalog.engine, "before_cursor_execute", lambda *a: statements.__setitem__(0, statements[0] + 1))
    queue = JobQueue(catalog, "bench#1")
    sched = work = 0.0
    for i in range(n_images):
        facts = ImageFacts(f"/bench/img{i}.zarr", "/bench", f"/bench/img{i}.zarr", f"fp{i}", "0.5", "czyx",
                           "2x1x64x64", "uint16", "default")
        t0 = time.perf_counter()
        queue.has_version(facts.path, run_key_prefix(facts.fingerprint))
        ensure_experiment(catalog, "default")
        queue.enqueue(facts, run_key(facts.fingerprint), once_per=run_key_prefix(facts.fingerprint))
        t1 = time.perf_counter()
        job = queue.claim()
        queue.heartbeat(job.job_id)
        queue.complete(job, RESULT, 0.01)
        t2 = time.perf_counter()
        sched, work = sched + t1 - t0, work + t2 - t1
    catalog.close()
    return {"scheduler_ms": 1000 * sched / n_images, "worker_ms": 1000 * work / n_images,
            "total_ms": 1000 * (sched + work) / n_images, "statements": statements[0] / n_images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    if find_pg_bindir() is None:
        sys.exit("PostgreSQL server binaries not found (install Debian's 'postgresql' package)")
    top = Path(tempfile.mkdtemp(prefix="cellseg1d-bench-catalog-"))
    server = start_server(fsync=True)
    try:
        backends = {
            "sqlite": lambda name: f"sqlite:///{top / name / 'catalog.sqlite'}",
            "postgresql": lambda name: server.create_database(f"bench_{name}"),
        }
        print(f"{args.images} images {args.size}x{args.size}, classical segmenter, {args.workers} worker(s); "
              f"PostgreSQL {server.sql('SHOW server_version')[0][0]} on loopback, fsync on; SQLite WAL, "
              "synchronous=NORMAL\n")
        print(f"{'catalog':<11} {'images/s':>9} {'span s':>7} {'wall s':>7} {'job s':>7} | {'sched ms':>8} "
              f"{'worker ms':>9} {'catalog ms/img':>14} {'stmts/img':>9}")
        for name, url_for in backends.items():
            run = throughput(url_for(f"run_{name}"), args.images, args.size, args.workers, top / f"run_{name}")
            cost = catalog_cost(url_for(f"cost_{name}"), args.images)
            print(f"{name:<11} {run['images_per_s']:>9.1f} {run['span_s']:>7.2f} {run['wall_s']:>7.2f} "
                  f"{run['job_s']:>7.3f} | {cost['scheduler_ms']:>8.2f} {cost['worker_ms']:>9.2f} "
                  f"{cost['total_ms']:>14.2f} {cost['statements']:>9.1f}")
        print("\nimages/s: first job queued to last job done (catalog timestamps); wall s: from process start. "
              "job s: mean seconds a job ran (read, segment, write labels). catalog ms/img: the daemon's "
              "catalog calls for one image, timed alone (sched: registering it; worker: claim, heartbeat, "
              "complete).")
    finally:
        server.destroy()
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
