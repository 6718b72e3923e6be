"""Benchmark the cellseg1d daemon: throughput and readiness latency. Prints numbers, asserts nothing.

Run as ``.venv/bin/python bench/bench_daemon.py [--images N] [--size PX] [--settle S]``.

(a) Throughput. N synthetic images (``--size`` square, 2 channels, NGFF 0.5) are
    written *before* the daemon starts; the daemon (settle ``--throughput-settle``)
    is then timed from process start until the catalog says every image is done.
    The same planes (channel 0, what the daemon segments by default) go through
    the classical segmenter directly in a loop, and the two are compared:
    images/s, daemon overhead in % of the segmentation-only time, job seconds
    from the catalog vs segmentation-only time, and the wall-clock difference.

(b) Latency. With a daemon running (settle ``--settle``), M images are written one
    at a time with the slow writer (tile by tile, pausing between tiles). The
    time from each image's last write to its job's ``started_at`` (and
    ``created_at``: when it was queued) is printed next to the target settle + 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from cellseg1d.ngff import open_image  # noqa: E402
from cellseg1d.model.classical import ClassicalParams, segment_classical  # noqa: E402
from cellseg1d.testing.synthetic import make_czyx, write_ome_zarr  # noqa: E402

from benchkit import catalog_rows, utc_ts  # noqa: E402

CHANNELS = ["nuclei", "membrane"]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


JOBS_SQL = """
SELECT images.path, images.status, jobs.state, jobs.seconds, jobs.created_at, jobs.started_at,
       jobs.finished_at, results.exports
FROM images JOIN jobs ON jobs.image_id = images.id
LEFT JOIN results ON results.job_id = jobs.id
ORDER BY jobs.id
"""


def job_rows(state: Path) -> dict[str, dict[str, Any]]:
    cols = ("path", "status", "state", "seconds", "created_at", "started_at", "finished_at", "exports")
    return {r[0]: dict(zip(cols, r, strict=True)) for r in catalog_rows(state, JOBS_SQL)}


class Daemon:
    def __init__(self, acq: Path, state: Path, log: Path, settle: float) -> None:
        self.args = [sys.executable, "-m", "cellseg1d", "run", "--watch", str(acq), "--state-dir", str(state),
                     "--settle-seconds", str(settle), "--log-level", "INFO"]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start the process; returns the time.monotonic() of the start."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("CELLSEG1D_CONFIG", None)
        t0 = time.monotonic()
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(self.args, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, cwd=REPO, start_new_session=True)
        return t0

    def wait_watching(self, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "watching" in self.log.read_text(errors="replace"):
                return time.monotonic()
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"daemon did not start:\n{self.log.read_text(errors='replace')[-3000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def wait_done(state: Path, paths: set[str], timeout: float, interval: float = 0.05) -> tuple[float, dict]:
    """Poll until every path is done or failed; returns (time.monotonic() when seen, rows)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = {p: r for p, r in job_rows(state).items() if p in paths}
        if len(rows) == len(paths) and all(r["status"] in ("done", "failed") for r in rows.values()):
            return time.monotonic(), rows
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {sum(r['status'] == 'done' for r in rows.values())} of {len(paths)} "
                               f"images done after {timeout:.0f} s")
        time.sleep(interval)


def fmt_pct(x: float) -> str:
    return f"{x:+.0f} %"


# --------------------------------------------------------------------------
# (a) throughput
# --------------------------------------------------------------------------


def bench_throughput(base: Path, n: int, size: int, settle: float) -> dict[str, Any]:
    acq, state, log = base / "acq", base / "state", base / "daemon.log"
    acq.mkdir(parents=True)
    print(f"(a) throughput: writing {n} images {size}x{size}, 2 channels, before the daemon starts ...",
          flush=True)
    paths = []
    t = time.perf_counter()
    n_cells = max(10, size * size // 2200)
    for i in range(n):
        data, _ = make_czyx((size, size), n_cells, seed=1000 + i)
        p = write_ome_zarr(acq / f"img_{i:03d}.ome.zarr", data[0], axes="czyx", ngff_version="0.5",
                           channel_names=CHANNELS)
        paths.append(p.resolve())
    print(f"    written in {time.perf_counter() - t:.1f} s", flush=True)

    # Direct loop: the same planes (channel 0, the daemon's default) through the segmenter.
    params = ClassicalParams()
    segment_classical(np.random.default_rng(0).random((64, 64)), params)  # warm-up (imports, caches)
    read_s = seg_s = 0.0
    counts = []
    for p in paths:
        t0 = time.perf_counter()
        image = open_image(p)
        plane = image.read_plane(0, 0, [0])
        t1 = time.perf_counter()
        labels = segment_classical(plane, params)
        t2 = time.perf_counter()
        read_s += t1 - t0
        seg_s += t2 - t1
        counts.append(int(labels.max()))
    direct_s = read_s + seg_s

    daemon = Daemon(acq, state, log, settle)
    t_start = daemon.start()
    try:
        t_watch = daemon.wait_watching()
        t_done, rows = wait_done(state, {str(p) for p in paths}, timeout=300)
    finally:
        daemon.stop()
    wall = t_done - t_start
    done = [r for r in rows.values() if r["status"] == "done"]
    job_sum = sum(r["seconds"] or 0.0 for r in done)
    stages: dict[str, float] = {}
    for r in done:
        try:
            timings = json.loads(r["exports"] or "{}").get("timings", {})
        except (TypeError, ValueError):
            timings = {}
        for k, v in timings.items():
            stages[k] = stages.get(k, 0.0) + float(v)
    starts = [utc_ts(r["started_at"]) for r in done]
    ends = [utc_ts(r["finished_at"]) for r in done]
    creates = [utc_ts(r["created_at"]) for r in done]
    span = (max(ends) - min(starts)) if done else float("nan")
    first_queue_after_watch = None
    if creates:
        # wall-clock time.time() of the "watching" moment, for comparison with catalog stamps
        first_queue_after_watch = min(creates) - (time.time() - (time.monotonic() - t_watch))

    res = {
        "n": n, "done": len(done), "wall": wall, "startup": t_watch - t_start, "direct": direct_s,
        "read": read_s, "seg": seg_s, "job_sum": job_sum, "span": span, "stages": stages,
        "first_queue_after_watch": first_queue_after_watch,
        "objects_direct": sum(counts),
    }
    print(f"    daemon: {len(done)}/{n} done in {wall:.2f} s from process start "
          f"(startup to 'watching' {res['startup']:.2f} s; first job queued "
          f"{(first_queue_after_watch or 0):.2f} s after that; first job start to last job end {span:.2f} s)")
    print(f"    direct loop: read {read_s:.2f} s + segment {seg_s:.2f} s = {direct_s:.2f} s")
    print(f"    images/s: daemon {n / wall:.2f} (wall from start), {n / span:.2f} (processing span); "
          f"direct {n / direct_s:.2f} (read+segment), {n / seg_s:.2f} (segment only)")
    print(f"    daemon overhead vs segmentation-only time: wall {fmt_pct(100 * (wall - seg_s) / seg_s)}, "
          f"processing span {fmt_pct(100 * (span - seg_s) / seg_s)}")
    print(f"    catalog: sum of job seconds {job_sum:.2f} s vs segmentation-only {seg_s:.2f} s "
          f"-> overhead {fmt_pct(100 * (job_sum - seg_s) / seg_s)} ({(job_sum - seg_s) / n * 1000:.0f} ms/image)")
    print(f"    wall-clock difference daemon - direct loop: {wall - direct_s:+.2f} s "
          f"({(wall - direct_s) / n * 1000:+.0f} ms/image)")
    if stages:
        print("    daemon stage totals (from results.exports.timings): "
              + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()))
    return res


# --------------------------------------------------------------------------
# (b) latency
# --------------------------------------------------------------------------


def bench_latency(base: Path, m: int, size: int, settle: float, tile: int, pause: float) -> dict[str, Any]:
    acq, state, log = base / "acq", base / "state", base / "daemon.log"
    acq.mkdir(parents=True)
    pause = min(pause, settle / 2) if settle > 0 else 0.0
    daemon = Daemon(acq, state, log, settle)
    daemon.start()
    per: list[tuple[str, float, float | None, float | None]] = []
    try:
        daemon.wait_watching()
        n_tiles = 2 * (-(-size // tile)) ** 2
        print(f"(b) latency: daemon running (settle {settle:g} s); writing {m} images {size}x{size} one at a "
              f"time, {n_tiles} tiles of {tile} px each, {pause:.2f} s between tiles ...", flush=True)
        last_write: dict[str, float] = {}
        n_cells = max(10, size * size // 2200)
        for i in range(m):
            data, _ = make_czyx((size, size), n_cells, seed=2000 + i)
            path = acq / f"slow_{i:03d}.ome.zarr"
            write_ome_zarr(path, data[0], axes="czyx", ngff_version="0.5", chunks=(1, 1, tile, tile),
                           channel_names=CHANNELS, pause=pause)
            last_write[str(path.resolve())] = time.time()
        _, rows = wait_done(state, set(last_write), timeout=60 + 10 * m)
    finally:
        daemon.stop()
    for path, written in last_write.items():
        r = rows[path]
        created, started = utc_ts(r["created_at"]), utc_ts(r["started_at"])
        per.append((Path(path).name, written,
                    None if created is None else created - written,
                    None if started is None else started - written))
    target = settle + 1.0
    print(f"    {'image':<22} {'last write -> queued':>21} {'last write -> job start':>24}")
    for name, _, q, s in per:
        mark = "" if s is not None and s <= target else "  (over target)"
        print(f"    {name:<22} {q:>19.2f} s {s:>22.2f} s{mark}")
    starts = [s for *_, s in per if s is not None]
    queued = [q for _, _, q, _ in per if q is not None]
    res = {"m": m, "settle": settle, "target": target,
           "mean": statistics.fmean(starts) if starts else float("nan"),
           "max": max(starts) if starts else float("nan"),
           "min": min(starts) if starts else float("nan"),
           "mean_queued": statistics.fmean(queued) if queued else float("nan")}
    print(f"    last write -> job start: mean {res['mean']:.2f} s, min {res['min']:.2f} s, max {res['max']:.2f} s "
          f"(target settle + 1 s = {target:.2f} s)")
    return res


# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20, help="images for the throughput run (a)")
    ap.add_argument("--size", type=int, default=512, help="image size in pixels (square)")
    ap.add_argument("--settle", type=float, default=2.0, help="settle seconds of the latency run (b)")
    ap.add_argument("--throughput-settle", type=float, default=0.5, help="settle seconds of the throughput run (a)")
    ap.add_argument("--latency-images", type=int, default=5, help="images for the latency run (b)")
    ap.add_argument("--tile", type=int, default=128, help="tile size of the slow writer in (b)")
    ap.add_argument("--pause", type=float, default=0.1, help="pause between tiles in (b) (capped at settle/2)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="cellseg1d-bench-")).resolve()
    started = time.monotonic()
    print(f"cellseg1d daemon benchmark - {os.cpu_count()} CPU(s), python {sys.version.split()[0]}, folder {base}")
    try:
        a = bench_throughput(base / "throughput", args.images, args.size, args.throughput_settle)
        b = bench_latency(base / "latency", args.latency_images, args.size, args.settle, args.tile, args.pause)
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    seg = a["seg"]
    print()
    print("summary")
    print(f"  throughput ({a['n']} x {args.size}px, settle {args.throughput_settle:g} s): "
          f"daemon {a['n'] / a['wall']:.2f} img/s wall ({a['n'] / a['span']:.2f} while processing), "
          f"direct segmenter {a['n'] / a['seg']:.2f} img/s ({a['n'] / a['direct']:.2f} with reads)")
    print(f"  overhead vs segmentation-only {seg:.2f} s: wall {fmt_pct(100 * (a['wall'] - seg) / seg)} "
          f"(incl. {a['startup']:.2f} s startup), catalog job seconds {a['job_sum']:.2f} s "
          f"{fmt_pct(100 * (a['job_sum'] - seg) / seg)}, wall difference {a['wall'] - a['direct']:+.2f} s")
    print(f"  latency ({b['m']} images, settle {b['settle']:g} s): last write -> job start mean {b['mean']:.2f} s, "
          f"max {b['max']:.2f} s; target <= {b['target']:.2f} s -> "
          f"{'within target' if b['max'] <= b['target'] else 'OVER target'}")
    print(f"  total benchmark time {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
