"""Benchmark restart and catch-up over a folder of many finished images. Prints numbers, asserts nothing.

Run as ``.venv/bin/python bench/bench_restart.py [--counts 3000 30000] [--settle 1.0] [--long 3000]``.

For each count N in ``--counts``:

1. **Build** a folder of N finished containers as a real run leaves them.
   The daemon itself processes one template image (16 x 16, 2 channels,
   NGFF 0.5) and is stopped; then the template's files (image, label image,
   export files if any) are copied N - 1 times byte for byte with the same
   modification times, and every catalog row that belongs to the template
   (image, job, result, events, outcomes, and whatever other table names its
   container) is copied with the paths replaced. The copies are exactly what
   the daemon would have left after processing N images, without segmenting
   N images.
2. **Restart**: one image is written while the daemon is down ("offline"),
   the daemon is started with ``$NOTIFY_SOCKET`` pointing at this script,
   and the time from its start-up log line ("cellseg1d ... starting") to
   ``READY=1`` is measured. Right after READY a second image is written
   ("online"). For both, the new-image latency is the time from the image's
   settle time (its newest file's mtime + settle) to its job's ``created_at``
   (queued).
3. **Throughput after N**: ``--after`` more images (96 x 96) are written
   while the daemon runs, and its images/s are measured.

Then ``--long`` images (96 x 96) go through one daemon on an empty folder,
and the throughput of the first and the last thousand is compared: does it
decay as the folder and the catalog grow?
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sqlalchemy import MetaData, func, select  # noqa: E402

from cellseg1d.catalog import Catalog  # noqa: E402
from cellseg1d.testing.synthetic import make_czyx, write_ome_zarr  # noqa: E402

from benchkit import catalog_rows, utc_ts  # noqa: E402

CHANNELS = ["nuclei", "membrane"]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def log_ts(line: str) -> float:
    """POSIX time of a text log line (``2026-12-04 21:56:29,694 INFO ...``, local time)."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def newest_mtime(folder: Path) -> float:
    return max(p.stat().st_mtime for p in folder.rglob("*") if p.is_file() and "labels" not in p.parts)


def write_image(path: Path, size: int, seed: int) -> Path:
    data, _ = make_czyx((size, size), max(1, size * size // 1500), seed=seed)
    return write_ome_zarr(path, data[0], axes="czyx", channel_names=CHANNELS)


class Notify(threading.Thread):
    """A stand-in for systemd's notification socket: records when READY=1 arrives."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.ready_at: float | None = None
        self.halt = False

    def run(self) -> None:
        while not self.halt:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if b"READY=1" in data.split(b"\n") and self.ready_at is None:
                self.ready_at = time.time()

    def close(self) -> None:
        self.halt = True
        self.join(2)
        self.sock.close()
        self.path.unlink(missing_ok=True)


class Daemon:
    def __init__(self, acq: Path, state: Path, log: Path, settle: float, notify: Path | None = None) -> None:
        self.args = [sys.executable, "-m", "cellseg1d", "run", "--watch", str(acq), "--state-dir", str(state),
                     "--settle-seconds", str(settle), "--log-level", "INFO"]
        self.log, self.notify = log, notify
        self.proc: subprocess.Popen[bytes] | None = None
        self.offset = 0

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("CELLSEG1D_CONFIG", None)
        if self.notify is not None:
            env["NOTIFY_SOCKET"] = str(self.notify)
        self.offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(self.args, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, cwd=REPO, start_new_session=True)

    def lines(self) -> list[str]:
        with open(self.log, "rb") as fh:
            fh.seek(self.offset)
            return fh.read().decode(errors="replace").splitlines()

    def wait_line(self, needle: str, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines():
                if needle in line:
                    return line
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"no {needle!r} in the daemon log:\n" + "\n".join(self.lines()[-30:]))

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def n_done(state: Path) -> int:
    got = catalog_rows(state, "SELECT count(*) FROM images WHERE status = 'done'")
    return int(got[0][0]) if got else 0


# --------------------------------------------------------------------------
# building N finished containers
# --------------------------------------------------------------------------


def snapshot_tree(folder: Path) -> list[tuple[str, bool, bytes, int, int]]:
    """(relative path, is folder, content, atime_ns, mtime_ns) of everything under ``folder``, parents first."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(folder))
            out.append((rel, p.is_dir(), b"" if p.is_dir() else p.read_bytes(), st.st_atime_ns, st.st_mtime_ns))
    st = folder.lstat()
    out.append((".", True, b"", st.st_atime_ns, st.st_mtime_ns))
    return out


def copy_tree(tree: list[tuple[str, bool, bytes, int, int]], dest: Path) -> None:
    """Recreate ``tree`` at ``dest`` with the same contents and modification times."""
    dest.mkdir()
    for rel, is_dir, content, _, _ in tree:
        if rel == ".":
            continue
        if is_dir:
            os.mkdir(dest / rel)
        else:
            with open(dest / rel, "wb") as fh:
                fh.write(content)
    for rel, is_dir, _, atime, mtime in tree:  # files first, then folders deepest first
        if not is_dir:
            os.utime(dest / rel, ns=(atime, mtime))
    for rel, is_dir, _, atime, mtime in sorted((t for t in tree if t[1]), key=lambda t: -t[0].count("/")
                                               if t[0] != "." else 1):
        os.utime(dest / rel if rel != "." else dest, ns=(atime, mtime))


def _replace(value: Any, old: str, new: str) -> Any:
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, (dict, list)):
        return json.loads(json.dumps(value).replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1]))
    return value


def copy_catalog_rows(catalog: Catalog, template: str, copies: list[str]) -> None:
    """Copy every catalog row belonging to container ``template`` once per path in ``copies``.

    A row belongs to the template when one of its text columns names the
    template's container (or a path inside it), or when it references such a
    row through a foreign key. Primary keys are assigned after the current
    largest; foreign keys follow.
    """
    meta = MetaData()
    meta.reflect(bind=catalog.engine)
    from cellseg1d.catalog.models import Base

    tables = [t for t in Base.metadata.sorted_tables if t.name in meta.tables]
    picked: dict[str, list[dict[str, Any]]] = {}
    ids: dict[str, set[int]] = {}
    with catalog.session() as s:
        for table in tables:
            chosen = []
            for row in s.execute(select(table)).mappings():
                row = dict(row)
                mine = any(isinstance(v, str) and (v == template or v.startswith(template + "/"))
                           for v in row.values())
                for fk in table.foreign_keys:
                    target = fk.column.table.name
                    if row.get(fk.parent.name) is not None and row[fk.parent.name] in ids.get(target, ()):
                        mine = True
                if mine:
                    chosen.append(row)
            picked[table.name] = chosen
            ids[table.name] = {r["id"] for r in chosen if "id" in r}
        bases = {t.name: int(s.scalar(select(func.max(t.c.id))) or 0) if "id" in t.c else 0 for t in tables}
    offsets = {name: {old: i for i, old in enumerate(sorted(ids[name]))} for name in ids}

    def new_id(table: str, old: int, copy: int) -> int:
        return bases[table] + 1 + copy * len(offsets[table]) + offsets[table][old]

    with catalog.session() as s:
        for table in tables:
            if not picked[table.name]:
                continue
            fks = {fk.parent.name: fk.column.table.name for fk in table.foreign_keys}
            batch = []
            for c, path in enumerate(copies):
                for row in picked[table.name]:
                    new = {k: _replace(v, template, path) for k, v in row.items()}
                    if "id" in new and new["id"] in offsets[table.name]:
                        new["id"] = new_id(table.name, row["id"], c)
                    for col, target in fks.items():
                        if row.get(col) is not None and row[col] in offsets.get(target, {}):
                            new[col] = new_id(target, row[col], c)
                    batch.append(new)
                if len(batch) >= 5000:
                    s.execute(table.insert(), batch)
                    batch = []
            if batch:
                s.execute(table.insert(), batch)


def build(base: Path, n: int, settle: float) -> tuple[Path, Path, Path]:
    """N finished containers in ``base/acq`` with the catalog in ``base/state``; returns (acq, state, log)."""
    acq, state, log = base / "acq", base / "state", base / "daemon.log"
    acq.mkdir(parents=True)
    t0 = time.perf_counter()
    template = write_image(acq / "img000000.zarr", 16, seed=1).resolve()
    old = time.time() - 3600  # acquired an hour ago
    for p in [template, *template.rglob("*")]:
        os.utime(p, (old, old))
    daemon = Daemon(acq, state, log, settle)
    daemon.start()
    try:
        wait_until(lambda: n_done(state) == 1, 120, "the template image")
        # let the daemon finish with the container (whatever it records after the job) before stopping it
        time.sleep(max(3.0, 2 * settle) + 2.0)
    finally:
        daemon.stop()
    tree = snapshot_tree(template)
    exports = template.parent / (template.name + ".cellseg1d")
    export_tree = snapshot_tree(exports) if exports.exists() else None
    copies = [acq / f"img{i:06d}.zarr" for i in range(1, n)]
    for path in copies:
        copy_tree(tree, path)
        if export_tree is not None:
            copy_tree(export_tree, path.parent / (path.name + ".cellseg1d"))
    t1 = time.perf_counter()
    catalog = Catalog(f"sqlite:///{state / 'catalog.sqlite'}")
    try:
        copy_catalog_rows(catalog, str(template), [str(p) for p in copies])
    finally:
        catalog.close()
    print(f"  built {n} finished containers in {time.perf_counter() - t0:.1f} s "
          f"(files {t1 - t0:.1f} s, catalog {time.perf_counter() - t1:.1f} s); "
          f"catalog: {catalog_rows(state, 'SELECT count(*) FROM images')[0][0]} images, "
          f"{catalog_rows(state, 'SELECT count(*) FROM results')[0][0]} results"
          + (f", {catalog_rows(state, 'SELECT count(*) FROM containers')[0][0]} finished containers"
             if catalog_rows(state, "SELECT count(*) FROM containers") else ""), flush=True)
    return acq, state, log


# --------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------


def queued_at(state: Path, path: Path) -> float | None:
    got = catalog_rows(state, "SELECT jobs.created_at FROM jobs JOIN images ON images.id = jobs.image_id "
               "WHERE images.path = ? ORDER BY jobs.id LIMIT 1", (str(path),))
    return utc_ts(got[0][0]) if got else None


def feed(acq: Path, state: Path, prefix: str, count: int, size: int, ahead: int = 60) -> list[float]:
    """Write ``count`` images, keeping about ``ahead`` waiting; returns the finish times of the jobs, sorted."""
    start_done = n_done(state)
    written = 0
    while written < count:
        if written - (n_done(state) - start_done) < ahead:
            for _ in range(min(20, count - written)):
                write_image(acq / f"{prefix}{written:06d}.zarr", size, seed=written)
                written += 1
        else:
            time.sleep(0.05)
    wait_until(lambda: n_done(state) - start_done >= count, 600 + count, f"{count} images", interval=0.2)
    like = str(acq / prefix) + "%"
    return sorted(utc_ts(r[0]) for r in catalog_rows(
        state, "SELECT jobs.finished_at FROM jobs JOIN images ON images.id = jobs.image_id "
        "WHERE images.path LIKE ? AND jobs.state = 'done'", (like,)))


def rate(finished: list[float], first: int, last: int) -> float:
    """Images per second between the ``first``-th and ``last``-th finished job (0-based, inclusive)."""
    return (last - first) / max(1e-9, finished[last] - finished[first])


def restart(base: Path, n: int, settle: float, after: int) -> dict[str, Any]:
    print(f"\n== {n} finished containers", flush=True)
    acq, state, log = build(base, n, settle)
    offline = write_image(acq / "new-offline.zarr", 16, seed=7).resolve()
    offline_settled = newest_mtime(offline) + settle
    notify = Notify(base / "notify.sock")
    notify.start()
    daemon = Daemon(acq, state, log, settle, notify.path)
    result: dict[str, Any] = {"n": n}
    try:
        spawned = time.time()
        daemon.start()
        started = log_ts(daemon.wait_line("starting: catalog"))
        wait_until(lambda: notify.ready_at, 600, "READY=1", interval=0.01)
        assert notify.ready_at is not None
        online = write_image(acq / "new-online.zarr", 16, seed=8).resolve()
        online_settled = newest_mtime(online) + settle
        t_off = wait_until(lambda: queued_at(state, offline), 600, "the offline image queued")
        t_on = wait_until(lambda: queued_at(state, online), 600, "the online image queued")
        result.update(
            ready=notify.ready_at - started, ready_from_spawn=notify.ready_at - spawned,
            offline=t_off - offline_settled, online=t_on - online_settled,
        )
        print(f"  READY {result['ready']:.2f} s after the start-up log line "
              f"({result['ready_from_spawn']:.2f} s after the process was spawned)")
        print(f"  new image written while down: queued {result['offline']:+.2f} s after its settle time "
              f"(settle {settle:g} s)")
        print(f"  new image written after READY: queued {result['online']:+.2f} s after its settle time")
        if after:
            finished = feed(acq, state, "after-", after, 96)
            result["after_rate"] = rate(finished, 0, len(finished) - 1)
            print(f"  {after} more images (96 x 96) on top of {n}: {result['after_rate']:.1f} images/s")
        for line in daemon.lines():
            if "reconciliation" in line or "looked at" in line:
                print("  log:", line[24:240])
    finally:
        daemon.stop()
        notify.close()
    return result


def long_run(base: Path, total: int, settle: float) -> dict[str, Any]:
    print(f"\n== long run: {total} images (96 x 96) through one daemon on an empty folder", flush=True)
    acq, state, log = base / "acq", base / "state", base / "daemon.log"
    acq.mkdir(parents=True)
    daemon = Daemon(acq, state, log, settle)
    daemon.start()
    try:
        daemon.wait_line("watching")
        finished = feed(acq, state, "img", total, 96)
    finally:
        daemon.stop()
    k = min(1000, len(finished) // 3)
    first, last = rate(finished, 0, k - 1), rate(finished, len(finished) - k, len(finished) - 1)
    print(f"  first {k}: {first:.1f} images/s; last {k}: {last:.1f} images/s ({100 * (last / first - 1):+.0f} %)")
    return {"first": first, "last": last, "k": k}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="*", default=[3000, 30000])
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--after", type=int, default=1000, help="images processed after each restart")
    parser.add_argument("--long", type=int, default=3000, help="images of the long run (0: skip)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the built folders")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-restart-", dir=args.workdir))
    try:
        results = [restart(work / f"n{n}", n, args.settle, args.after) for n in args.counts]
        long = long_run(work / "long", args.long, args.settle) if args.long else None
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\nsummary (settle %.1f s)" % args.settle)
    print(f"{'finished':>9} {'READY s':>8} {'offline +s':>10} {'online +s':>10} {'after img/s':>11}")
    for r in results:
        print(f"{r['n']:>9} {r['ready']:>8.2f} {r['offline']:>10.2f} {r['online']:>10.2f} "
              f"{r.get('after_rate', float('nan')):>11.1f}")
    if long:
        print(f"long run: first {long['k']} {long['first']:.1f} images/s, last {long['k']} {long['last']:.1f} images/s")


if __name__ == "__main__":
    main()
