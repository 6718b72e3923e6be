"""``cellseg1d demo``: a simulated microscope, the real daemon, and a scored summary.

The demo starts ``cellseg1d run`` as a subprocess on a fresh acquisition
folder, then writes synthetic OME-Zarr images into that folder the way an
acquiring microscope does (metadata first, then the pixels tile by tile with
short pauses, then the lower resolutions), so the daemon's readiness
detection (an image counts as written once it has been quiet for
``settle_seconds``) is really exercised. It shows progress while the daemon
works, then a table of what was found, scored against the known cells.

Nothing here reaches into the daemon: it is watched through its log file and
read-only queries on its SQLite catalog, as an operator would.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["run_demo"]

#: Tiles the simulated microscope writes at a time (y, x pixels).
TILE = 128
#: Plain images are between these sizes (pixels per side).
SIZES = (256, 320, 384)
#: Size of the fields of the HCS plate.
FIELD_SIZE = 256
CHANNELS = ["nuclei", "membrane"]
#: Roughly one cell per this many pixels (cells are 6-11 px in radius).
PIXELS_PER_CELL = 2200
SEED = 20240611
POLL_SECONDS = 0.25
LOG_TAIL_LINES = 40


class _Stopped(Exception):
    """Raised inside the writer when the demo is interrupted."""


@dataclass
class DemoImage:
    """One image (a plain image or one field of a plate) the microscope writes."""

    rel: str  # path relative to the acquisition folder
    path: Path
    mask: np.ndarray
    ngff: str
    written_at: float | None = None  # time.time() once fully written


@dataclass
class Acquisition:
    """One container the microscope writes: a plain image or a plate of fields."""

    rel: str
    kind: str  # "image" or "plate"
    ngff: str
    pause: float
    images: list[DemoImage]
    data: list[np.ndarray]
    keys: list[tuple[str, str, str]] = field(default_factory=list)  # plate fields

    @property
    def n_chunks(self) -> list[int]:
        """Level-0 chunks of every image (channel x tiles)."""
        return [d.shape[0] * math.ceil(d.shape[-2] / TILE) * math.ceil(d.shape[-1] / TILE) for d in self.data]


# --------------------------------------------------------------------------
# What the microscope writes
# --------------------------------------------------------------------------


def _n_cells(h: int, w: int) -> int:
    return max(8, (h * w) // PIXELS_PER_CELL)


def plan_acquisitions(n_images: int, acq: Path, settle_seconds: float, seed: int = SEED) -> list[Acquisition]:
    """Decide what the microscope writes: ``n_images`` images in all, a plate's fields included.

    From 3 images on, one container is an HCS plate (2 wells, 1 field each; 2 fields
    each from 8 images on); the rest are plain images, one of them NGFF 0.4, the
    others 0.5.
    """
    from cellseg1d.synthetic import make_czyx

    rng = np.random.default_rng(seed)
    if n_images >= 8:
        plate_fields = 4
    elif n_images >= 3:
        plate_fields = 2
    elif n_images == 2:
        plate_fields = 1
    else:
        plate_fields = 0
    n_plain = n_images - plate_fields
    # The one NGFF 0.4 image: the second plain image, or the only one beside a plate.
    v04_index = 1 if n_plain >= 2 else (0 if plate_fields else -1)
    max_pause = 0.5 * settle_seconds  # always well inside the settle time

    def pause() -> float:
        return float(min(rng.uniform(0.2, 0.4), max_pause))

    acquisitions: list[Acquisition] = []
    for i in range(n_plain):
        h, w = (int(rng.choice(SIZES)) for _ in range(2))
        data, mask = make_czyx((h, w), _n_cells(h, w), n_channels=2, seed=int(rng.integers(1 << 31)))
        rel = f"sample_{i + 1:02d}.ome.zarr"
        version = "0.4" if i == v04_index else "0.5"
        img = DemoImage(rel, acq / rel, mask, version)
        acquisitions.append(Acquisition(rel, "image", version, pause(), [img], [data[0]]))
    if plate_fields:
        rel = "plate_01.ome.zarr"
        wells = [("A", "1"), ("A", "2")] if plate_fields > 1 else [("A", "1")]
        per_well = 2 if plate_fields == 4 else 1
        keys = [(r, c, str(f)) for r, c in wells for f in range(per_well)]
        images, data = [], []
        for r, c, f in keys:
            d, mask = make_czyx((FIELD_SIZE, FIELD_SIZE), _n_cells(FIELD_SIZE, FIELD_SIZE),
                                n_channels=2, seed=int(rng.integers(1 << 31)))
            frel = f"{rel}/{r}/{c}/{f}"
            images.append(DemoImage(frel, acq / frel, mask, "0.5"))
            data.append(d[0])
        plate = Acquisition(rel, "plate", "0.5", pause(), images, data, keys)
        # The plate comes second, between plain images, as a mixed session would.
        acquisitions.insert(min(1, len(acquisitions)), plate)
    return acquisitions


class Microscope(threading.Thread):
    """Writes the planned acquisitions one after another, tile by tile."""

    def __init__(self, acquisitions: list[Acquisition], acq: Path) -> None:
        super().__init__(name="microscope", daemon=True)
        self.acquisitions = acquisitions
        self.acq = acq
        self.stop_event = threading.Event()
        self.current = ""
        self.error: BaseException | None = None
        self.finished = False

    @property
    def written(self) -> int:
        return sum(1 for a in self.acquisitions for i in a.images if i.written_at is not None)

    def run(self) -> None:
        try:
            for acquisition in self.acquisitions:
                if self.stop_event.is_set():
                    return
                self._write(acquisition)
            self.finished = True
        except _Stopped:
            return
        except BaseException as err:  # reported by the main thread
            self.error = err

    def _write(self, a: Acquisition) -> None:
        from cellseg1d.synthetic import write_ome_zarr, write_plate

        self.current = a.rel
        # Field k is complete (pyramid included) when field k+1's first tile arrives.
        starts = np.cumsum([0, *a.n_chunks])
        count = 0

        def on_chunk() -> None:
            nonlocal count
            if self.stop_event.is_set():
                raise _Stopped
            count += 1
            for k, start in enumerate(starts[1:-1]):
                if count == start + 1 and a.images[k].written_at is None:
                    a.images[k].written_at = time.time()

        common: dict[str, Any] = dict(
            axes="czyx", ngff_version=a.ngff, chunks=(1, 1, TILE, TILE), channel_names=CHANNELS,
            n_levels=2, pause=a.pause, on_chunk=on_chunk,
        )
        if a.kind == "plate":
            write_plate(self.acq / a.rel, dict(zip(a.keys, a.data, strict=True)), **common)
        else:
            write_ome_zarr(self.acq / a.rel, a.data[0], **common)
        now = time.time()
        for img in a.images:
            if img.written_at is None:
                img.written_at = now


# --------------------------------------------------------------------------
# Watching the daemon (log file and read-only catalog)
# --------------------------------------------------------------------------


def catalog_query(state_dir: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows of a read-only query on the daemon's SQLite catalog; [] before it exists."""
    db = state_dir / "catalog.sqlite"
    if not db.exists():
        return []
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error:
        return []
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.Error:
        return []  # schema not created yet, or the database is busy: next poll
    finally:
        conn.close()


_LATEST = """
SELECT images.path, images.status, images.error, jobs.seconds, jobs.created_at, jobs.started_at,
       results.object_count, results.segmenter, results.labels_path
FROM images
LEFT JOIN jobs ON jobs.id = (SELECT MAX(j.id) FROM jobs j WHERE j.image_id = images.id)
LEFT JOIN results ON results.job_id = jobs.id
"""


def latest_rows(state_dir: Path) -> dict[str, dict[str, Any]]:
    """Image path -> status, error and its latest job's result."""
    cols = ("path", "status", "error", "seconds", "created_at", "started_at", "objects", "segmenter", "labels")
    return {row[0]: dict(zip(cols, row, strict=True)) for row in catalog_query(state_dir, _LATEST)}


def utc_timestamp(value: Any) -> float | None:
    """POSIX time of a catalog datetime (stored as naive UTC text in SQLite)."""
    if value is None:
        return None
    stamp = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


def read_labels(labels_path: Path) -> np.ndarray:
    """Level 0 of an NGFF label image as a 2-D array (leading length-1 axes dropped)."""
    import zarr

    group = zarr.open_group(str(labels_path), mode="r")
    attrs = dict(group.attrs)
    ome = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else attrs
    level0 = ome["multiscales"][0]["datasets"][0]["path"]
    data = np.asarray(group[level0][...])
    while data.ndim > 2 and data.shape[0] == 1:
        data = data[0]
    return data


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no daemon log)"
    return "\n".join(text.splitlines()[-lines:])


class DaemonProcess:
    """``cellseg1d run`` in a subprocess, its output in a log file."""

    def __init__(self, acq: Path, state: Path, log_path: Path, settle_seconds: float) -> None:
        self.log_path = log_path
        self.args = [
            sys.executable, "-m", "cellseg1d", "run", "--watch", str(acq), "--state-dir", str(state),
            "--settle-seconds", str(settle_seconds), "--log-level", "INFO",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            # Its own session: a Ctrl-C in the terminal reaches only the demo, which
            # then stops the daemon with SIGTERM (finishing the image in progress).
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_watching(self, timeout: float) -> bool:
        """Wait until the daemon logs that it is watching; False if it exited or timed out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "watching" in self.log():
                return True
            if not self.alive():
                return False
            time.sleep(0.1)
        return False

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait; a second SIGTERM, then SIGKILL if it will not stop. Returns the exit code."""
        if self.proc is None:
            return None
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            if self.proc.poll() is not None:
                break
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        return self.proc.poll()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM and SIGHUP to the demo like Ctrl-C, so the daemon and folder are cleaned up."""

    def handler(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous: dict[int, Any] = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not in the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# --------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------


def _make_console() -> Any:
    from rich.console import Console

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=160)  # captured output: keep table rows on one line
    return console


def _prepare_workdir(workdir: Path | None) -> tuple[Path, bool]:
    """The demo folder and whether the demo created it as a temporary folder."""
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix="cellseg1d-demo-")).resolve(), True
    workdir = workdir.expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("acquisition", "state"):
        sub = workdir / name
        if sub.exists() and any(sub.iterdir()):
            raise FileExistsError(
                f"{sub} already exists and is not empty (an earlier demo?); "
                "pass an empty or new --workdir"
            )
    return workdir, False


def _progress_loop(console: Any, microscope: Microscope, daemon: DaemonProcess, images: list[DemoImage],
                   state: Path, timeout: float) -> tuple[dict[str, dict[str, Any]], str | None]:
    """Show progress until every image is done or failed; returns (catalog rows, problem)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    n = len(images)
    paths = {str(img.path) for img in images}
    progress = Progress(
        TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}"), console=console,
    )
    written_task = progress.add_task("microscope writing", total=n, detail="")
    done_task = progress.add_task("daemon segmenting", total=n, detail="")
    deadline = time.monotonic() + timeout
    rows: dict[str, dict[str, Any]] = {}
    problem: str | None = None
    with progress:
        while True:
            rows = {p: r for p, r in latest_rows(state).items() if p in paths}
            statuses = [r["status"] for r in rows.values()]
            done, failed = statuses.count("done"), statuses.count("failed")
            queued, running = statuses.count("queued"), statuses.count("processing")
            writing = "" if microscope.finished else f"now: {microscope.current}"
            progress.update(written_task, completed=microscope.written, detail=writing)
            progress.update(done_task, completed=done + failed,
                            detail=f"done {done}  failed {failed}  queued {queued}  processing {running}")
            if microscope.error is not None:
                problem = f"the simulated microscope failed: {type(microscope.error).__name__}: {microscope.error}"
                break
            if microscope.finished and done + failed == n:
                break
            if not daemon.alive():
                problem = f"the daemon exited unexpectedly (exit code {daemon.proc.poll() if daemon.proc else '?'})"
                break
            if time.monotonic() > deadline:
                problem = f"timed out after {timeout:.0f} s waiting for the daemon"
                break
            time.sleep(POLL_SECONDS)
    return rows, problem


def _summary(console: Any, images: list[DemoImage], rows: dict[str, dict[str, Any]], acq: Path,
             settle_seconds: float) -> list[str]:
    """Print the result table; returns the segmenters that ran."""
    from rich.table import Table

    from cellseg1d.metrics import average_precision

    table = Table(title="cellseg1d demo results", title_justify="left")
    for col, justify in (("image", "left"), ("NGFF", "center"), ("status", "left"), ("cells found", "right"),
                         ("true cells", "right"), ("AP@0.5", "right"), ("queued after", "right"),
                         ("seconds", "right"), ("labels", "left")):
        table.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    segmenters: set[str] = set()
    aps: list[float] = []
    for img in images:
        row = rows.get(str(img.path), {})
        status = row.get("status") or "not seen"
        true_cells = int(np.count_nonzero(np.unique(img.mask)))
        found = ap = wait = secs = labels_text = ""
        if row.get("segmenter"):
            segmenters.update(s for s in str(row["segmenter"]).split(",") if s)
        if status == "done" and row.get("labels"):
            labels = Path(row["labels"])
            found = str(row["objects"])
            try:
                pred = read_labels(labels)
                if pred.shape == img.mask.shape:
                    score = average_precision(pred.astype(np.uint32), img.mask, (0.5,))[0].ap
                    aps.append(score)
                    ap = f"{score:.3f}"
                else:
                    ap = f"shape {pred.shape}?"
            except Exception as err:  # show it, do not fail the summary
                ap = f"unreadable: {type(err).__name__}"
            try:
                labels_text = str(labels.relative_to(acq))
            except ValueError:
                labels_text = str(labels)
        elif row.get("error"):
            labels_text = f"[red]{row['error']}[/red]"
        created = utc_timestamp(row.get("created_at"))
        if created is not None and img.written_at is not None:
            wait = f"{created - img.written_at:.1f} s"
        if row.get("seconds") is not None:
            secs = f"{row['seconds']:.2f}"
        style = {"done": "green", "failed": "red"}.get(status, "yellow")
        table.add_row(img.rel, img.ngff, f"[{style}]{status}[/{style}]", found, str(true_cells), ap, wait,
                      secs, labels_text)
    console.print(table)
    console.print(
        f"[dim]'queued after': time from the image's last write to the daemon queueing it "
        f"(settle time {settle_seconds:g} s). Labels paths are relative to {acq}.[/dim]"
    )
    if aps:
        console.print(f"Mean AP@0.5 over {len(aps)} image(s): [bold]{float(np.mean(aps)):.3f}[/bold]")
    names = sorted(segmenters)
    if not names:
        console.print("Segmenter: [yellow]none recorded[/yellow] (no image was segmented)")
    else:
        notes = {"classical": "the built-in classical segmenter (threshold + distance-transform watershed); "
                 "the fallback when no SAM model plugin answers"}
        for name in names:
            console.print(f"Segmenter: [bold]{name}[/bold]" + (f" - {notes[name]}" if name in notes else ""))
    return names


def run_demo(n_images: int = 5, keep: bool = False, settle_seconds: float = 2.0,
             workdir: Path | None = None) -> int:
    """Run the demo; returns the exit code (0 only if every image was segmented)."""
    console = _make_console()
    if n_images < 1:
        console.print("[red]cellseg1d demo: --images must be at least 1[/red]")
        return 2
    if settle_seconds < 0:
        console.print("[red]cellseg1d demo: --settle-seconds must be >= 0[/red]")
        return 2
    try:
        base, temporary = _prepare_workdir(workdir)
    except (OSError, FileExistsError) as err:
        console.print(f"[red]cellseg1d demo: {err}[/red]")
        return 2
    keep_folder = keep or not temporary
    acq, state, log_path = base / "acquisition", base / "state", base / "daemon.log"
    acq.mkdir(parents=True, exist_ok=True)
    daemon = DaemonProcess(acq, state, log_path, settle_seconds)
    microscope: Microscope | None = None
    started = time.monotonic()
    code = 1
    try:
        with _sigterm_as_interrupt():
            console.rule("[bold]cellseg1d demo")
            console.print(f"Demo folder: {base}")
            console.print(f"Starting the daemon: cellseg1d run --watch {acq} --state-dir {state} "
                          f"--settle-seconds {settle_seconds:g}  (log: {log_path})")
            daemon.start()
            if not daemon.wait_watching(60):
                console.print("[red]The daemon did not start watching.[/red] Its log:")
                console.print(log_tail(log_path), markup=False, highlight=False)
                return 1
            acquisitions = plan_acquisitions(n_images, acq, settle_seconds)
            images = [img for a in acquisitions for img in a.images]
            plates = [a for a in acquisitions if a.kind == "plate"]
            console.print(
                f"Simulated microscope: {n_images} image(s) - "
                f"{sum(1 for a in acquisitions if a.kind == 'image')} plain image(s)"
                + (f" and a plate with {len(plates[0].images)} field(s)" if plates else "")
                + f", 2 channels ({', '.join(CHANNELS)}), written in {TILE}-px tiles with pauses of "
                f"{min(a.pause for a in acquisitions):.2f}-{max(a.pause for a in acquisitions):.2f} s "
                f"(shorter than the {settle_seconds:g} s settle time)."
            )
            microscope = Microscope(acquisitions, acq)
            microscope.start()
            rows, problem = _progress_loop(console, microscope, daemon, images, state,
                                           timeout=120.0 + 10.0 * n_images)
            microscope.stop_event.set()
            microscope.join(timeout=30)
            exit_code = daemon.stop()
            if exit_code not in (0, None):
                console.print(f"[yellow]The daemon exited with code {exit_code}.[/yellow]")
            rows = {p: r for p, r in latest_rows(state).items() if p in {str(i.path) for i in images}} or rows
            _summary(console, images, rows, acq, settle_seconds)
            done = sum(1 for img in images if rows.get(str(img.path), {}).get("status") == "done")
            elapsed = time.monotonic() - started
            if problem is None and done == len(images):
                code = 0
                console.print(f"[green]All {done} image(s) segmented[/green] in {elapsed:.1f} s.")
            else:
                console.print(f"[red]{done} of {len(images)} image(s) segmented"
                              + (f"; {problem}" if problem else "") + "[/red]")
                console.print(f"Last {LOG_TAIL_LINES} lines of the daemon log ({log_path}):")
                console.print(log_tail(log_path), markup=False, highlight=False)
            first = next((img for img in images if rows.get(str(img.path), {}).get("status") == "done"), None)
            if first is not None:
                console.print("\nTo look at a result in napari:")
                console.print("  pip install napari napari-ome-zarr", markup=False, highlight=False)
                console.print(f"  napari --plugin napari-ome-zarr {first.path}", markup=False, highlight=False)
            return code
    except KeyboardInterrupt:
        console.print("\n[yellow]Interrupted: stopping the microscope and the daemon...[/yellow]")
        code = 130
        return code
    finally:
        if microscope is not None:
            microscope.stop_event.set()
            microscope.join(timeout=30)
        daemon.stop()
        if keep_folder:
            console.print(f"The demo folder is kept: {base}  (images in {acq}, catalog in {state})")
        else:
            shutil.rmtree(base, ignore_errors=True)
            console.print(f"The demo folder {base} was deleted; rerun with --keep or --workdir DIR to keep it "
                          "and open the results in napari.")

