"""How long `cellseg1d status` and one /metrics scrape take on a large SQLite catalog.

    .venv/bin/python bench/bench_status.py [--jobs 100000] [--repeat 5]

Fills a fresh catalog with ``--jobs`` images and jobs (80 % done, the rest
queued, waiting for a retry, quarantined, held or rejected), then prints the
median seconds of ``catalog_counts`` (what the metrics read), ``status_report``
and a whole ``/metrics`` render.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from cellseg1d.catalog import utcnow
from cellseg1d.catalog.db import open_catalog
from cellseg1d.config import build_config
from cellseg1d.catalog.report import catalog_counts, status_report
from cellseg1d.service.telemetry import Telemetry

STATES = ("done",) * 8 + ("queued", "failed")


def fill(db: Path, n: int) -> None:
    """``n`` images with one job each, written straight into SQLite (the ORM would take minutes)."""
    stamp = "%Y-%m-%d %H:%M:%S.%f"
    recent, old = utcnow().strftime(stamp), (utcnow() - timedelta(hours=5)).strftime(stamp)
    conn = sqlite3.connect(db)
    with conn:
        conn.executemany(
            "INSERT INTO images (id, path, root, container, status, first_seen, updated_at) "
            "VALUES (?, ?, '/data', ?, 'done', ?, ?)",
            ((i, f"/data/run/{i}.zarr", f"/data/run/{i}.zarr", recent, recent) for i in range(1, n + 1)))
        rows = []
        for i in range(1, n + 1):
            state = "quarantined" if i % 50 == 0 else "held" if i % 97 == 0 else STATES[i % len(STATES)]
            key = f"rejected:{i:x}" if i % 50 == 0 else f"{i:032x}:p1"
            done = state == "done"
            rows.append((i, i, key, state, recent, recent, (recent if i % 3 else old) if done else None,
                         0.8 if done else None, None if done else "an error"))
        conn.executemany(
            "INSERT INTO jobs (id, image_id, run_key, state, attempts, created_at, started_at, finished_at, "
            "seconds, error) VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?)", rows)
    conn.close()


def median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = build_config({"state_dir": tmp})
        catalog = open_catalog(config)
        catalog.migrate()
        started = time.perf_counter()
        fill(Path(tmp) / "catalog.sqlite", args.jobs)
        print(f"catalog with {args.jobs} jobs written in {time.perf_counter() - started:.1f} s")
        telemetry = Telemetry(catalog)
        for name, fn in (("catalog_counts", lambda: catalog_counts(catalog)),
                         ("status_report", lambda: status_report(catalog)),
                         ("/metrics render", telemetry.render)):
            print(f"{name:16s} median {median_seconds(fn, args.repeat) * 1e3:8.1f} ms over {args.repeat} runs")
        catalog.close()


if __name__ == "__main__":
    main()
