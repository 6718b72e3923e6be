"""How long the dashboard's pages take on a large SQLite catalog, over real HTTP.

    .venv/bin/python bench/bench_dashboard.py [--jobs 100000] [--repeat 5]

Fills a fresh catalog with ``--jobs`` images, one job each (80 % done with a
result, the rest queued, waiting for a retry, quarantined, held or
rejected; four experiments, two roots), serves the dashboard on loopback
and prints the median milliseconds of each page (server time plus the
loopback round trip, as a browser on the same machine sees it).
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

from cellseg1d.catalog import utcnow
from cellseg1d.catalog.db import open_catalog
from cellseg1d.config import build_config
from cellseg1d.service.dashboard import start_dashboard

STATES = ("done",) * 8 + ("queued", "failed")
EXPERIMENTS = ("hela", "nuclei", "u2os", "default")


def fill(db: Path, n: int) -> None:
    """``n`` images with one job each (and a result per done job), written straight into SQLite."""
    stamp = "%Y-%m-%d %H:%M:%S.%f"
    now = utcnow()
    conn = sqlite3.connect(db)
    with conn:
        conn.executemany("INSERT INTO experiments (id, name, created_at) VALUES (?, ?, ?)",
                         ((i + 1, e, now.strftime(stamp)) for i, e in enumerate(EXPERIMENTS)))
        images, jobs, results = [], [], []
        for i in range(1, n + 1):
            when = (now - timedelta(seconds=(n - i) * 86400 * 2 / n)).strftime(stamp)  # spread over two days
            root = "/data/scope1" if i % 3 else "/data/scope2"
            state = "quarantined" if i % 50 == 0 else "held" if i % 97 == 0 else STATES[i % len(STATES)]
            status = {"done": "done", "quarantined": "failed", "held": "held"}.get(state, "queued")
            experiment = EXPERIMENTS[i % len(EXPERIMENTS)]
            path = f"{root}/plate{i // 96}.zarr/{'ABCDEFGH'[(i % 96) // 12]}/{i % 12 + 1}/0"
            images.append((i, path, root, f"{root}/plate{i // 96}.zarr", status, experiment, when, when))
            key = f"rejected:{i:x}" if i % 50 == 0 else f"{i:032x}:p1"
            done = state == "done"
            jobs.append((i, i, key, state, when, when, when if done else None, 0.8 if done else None,
                         None if done else "an error", experiment))
            if done:
                results.append((i, i, i, f"{path}/labels/cellseg1d", 20 + i % 40, when))
        conn.executemany(
            "INSERT INTO images (id, path, root, container, status, experiment, first_seen, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", images)
        conn.executemany(
            "INSERT INTO jobs (id, image_id, run_key, state, attempts, created_at, started_at, finished_at, "
            "seconds, error, experiment) VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?)", jobs)
        conn.executemany(
            "INSERT INTO results (id, job_id, image_id, labels_path, object_count, planes, segmenter, "
            "cellseg1d_version, pipeline_version, exports, created_at) "
            "VALUES (?, ?, ?, ?, ?, 1, 'classical', '0', '1', '{}', ?)", results)
    conn.close()


def median_ms(url: str, repeat: int) -> tuple[float, int]:
    times, size = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=120) as response:
            size = len(response.read())
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = build_config({"state_dir": tmp, "watch": {"roots": [{"path": tmp}]}})
        catalog = open_catalog(config)
        catalog.migrate()
        started = time.perf_counter()
        fill(Path(tmp) / "catalog.sqlite", args.jobs)
        print(f"catalog with {args.jobs} jobs written in {time.perf_counter() - started:.1f} s")
        handle = start_dashboard(config, catalog, address="127.0.0.1:0")
        pages = [
            ("overview", "/"),
            ("images, newest", "/images"),
            ("images, page 1000", "/images?page=1000"),
            ("images, status=failed", "/images?status=failed"),
            ("images, experiment=hela", "/images?experiment=hela"),
            ("images, root=/data/scope2", "/images?root=/data/scope2"),
            ("images, path contains", "/images?path=plate77.zarr"),
            ("images, all filters", "/images?status=done&experiment=nuclei&root=/data/scope1&path=plate1"),
            ("one image", f"/images/{args.jobs // 2}"),
            ("experiments", "/experiments"),
            ("failed", "/failed"),
            ("failed, last page", f"/failed?page={max(1, args.jobs // 50 // 50)}"),
        ]
        try:
            for name, path in pages:
                ms, size = median_ms(handle.address + path, args.repeat)
                print(f"{name:28s} median {ms:8.1f} ms over {args.repeat} requests ({size / 1024:.0f} KiB)")
        finally:
            handle.stop()
            catalog.close()


if __name__ == "__main__":
    main()
