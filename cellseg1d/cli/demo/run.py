"""``cellseg1d demo``: a simulated microscope, the real daemon, and a scored summary.

The demo starts ``cellseg1d run`` as a subprocess on a fresh acquisition
folder, then writes synthetic OME-Zarr images into that folder the way an
acquiring microscope does (metadata first, then the pixels tile by tile with
short pauses, then the lower resolutions), so the daemon's readiness
detection (an image counts as written once it has been quiet for
``settle_seconds``) is really exercised. It shows progress while the daemon
works, then a table of what was found, scored against the known cells.

Nothing here reaches into the daemon: it is watched through its log file and
read-only queries on its SQLite catalog, as an operator would. The read-only
web dashboard of that catalog is served while the demo runs (its address is
printed; ``--keep`` keeps it running afterwards).

``--sam`` runs the CellSeg1 method itself, without downloads: a tiny
SAM-architecture base pretrained on synthetic cells (shipped with cellseg1d)
becomes the daemon's ``[sam] checkpoint``, a LoRA adapter is trained on ONE
synthetic image and its annotated cells, registered and assigned to the
demo's experiment, and the daemon segments the microscope's images with it.
The summary scores SAM + adapter and the classical fallback on the same images.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cellseg1d.cli.demo.microscope import (
    CHANNELS,
    LOG_TAIL_LINES,
    POLL_SECONDS,
    TILE,
    DemoImage,
    Microscope,
    plan_acquisitions,
)
from cellseg1d.cli.demo.sam import SamSetup, classical_labels, prepare_sam, start_demo_dashboard
from cellseg1d.cli.demo.watching import (
    DaemonProcess,
    latest_rows,
    log_tail,
    read_labels,
    sigterm_as_interrupt,
    utc_timestamp,
)


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
             settle_seconds: float, planes: dict[Path, np.ndarray] | None = None) -> list[str]:
    """Print the result table; returns the segmenters that ran.

    ``planes`` (``--sam``): each image's nuclei plane, segmented here by the classical fallback too, so that
    both methods are scored on the same images.
    """
    from rich.table import Table

    from cellseg1d.model.metrics import average_precision

    table = Table(title="cellseg1d demo results", title_justify="left")
    ap_column = "AP@0.5 SAM + adapter" if planes else "AP@0.5"
    columns = [("image", "left"), ("NGFF", "center"), ("status", "left"), ("cells found", "right"),
               ("true cells", "right"), (ap_column, "right")]
    if planes:
        columns.append(("AP@0.5 classical", "right"))
    columns += [("queued after", "right"), ("seconds", "right"), ("labels", "left")]
    for col, justify in columns:
        table.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    segmenters: set[str] = set()
    aps: list[float] = []
    classical_aps: list[float] = []
    for img in images:
        classical = ""
        if planes and img.path in planes:
            score = average_precision(classical_labels(planes[img.path]).astype(np.uint32), img.mask, (0.5,))[0].ap
            classical_aps.append(score)
            classical = f"{score:.3f}"
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
        cells = [img.rel, img.ngff, f"[{style}]{status}[/{style}]", found, str(true_cells), ap]
        table.add_row(*cells, *([classical] if planes else []), wait, secs, labels_text)
    console.print(table)
    console.print(
        f"[dim]'queued after': time from the image's last write to the daemon queueing it "
        f"(settle time {settle_seconds:g} s). Labels paths are relative to {acq}.[/dim]"
    )
    if aps:
        what = "SAM + adapter (the daemon's labels) " if planes else ""
        console.print(f"Mean AP@0.5 {what}over {len(aps)} image(s): [bold]{float(np.mean(aps)):.3f}[/bold]")
    if classical_aps:
        console.print(f"Mean AP@0.5 classical fallback on the same images: "
                      f"[bold]{float(np.mean(classical_aps)):.3f}[/bold]")
    names = sorted(segmenters)
    if not names:
        console.print("Segmenter: [yellow]none recorded[/yellow] (no image was segmented)")
    else:
        notes = {"classical": "the built-in classical segmenter (threshold + distance-transform watershed); "
                 "the fallback when no SAM model plugin answers"}
        for name in names:
            console.print(f"Segmenter: [bold]{name}[/bold]" + (f" - {notes[name]}" if name in notes else ""))
    return names


def _sam_note(console: Any, setup: SamSetup) -> None:
    console.print(
        f"[bold]About these numbers:[/bold] the stand-in base is tiny (a SAM-architecture model of a few million "
        f"parameters pretrained on synthetic cells, shipped with cellseg1d so that the demo needs no download) and "
        f"its adapter had {setup.steps} training steps on one image; the classical fallback is made for exactly "
        "such synthetic bright cells. The AP shows that the CellSeg1 flow works end to end, not how good SAM is. "
        "For real images put an official SAM checkpoint in the daemon's config (\\[sam] checkpoint = "
        "\"/srv/models/sam_vit_h_4b8939.pth\"; 'cellseg1d models fetch vit_h' downloads it) and train an "
        "adapter on one of your annotated images ('cellseg1d train ... --experiment NAME --assign').")


def _serve_until_interrupted(console: Any, handle: Any) -> None:
    console.print(f"Dashboard: [bold]{handle.address}/[/bold] (kept running; Ctrl-C stops it)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("\n[yellow]Stopping the dashboard.[/yellow]")


def run_demo(n_images: int = 5, keep: bool = False, settle_seconds: float = 2.0,
             workdir: Path | None = None, sam: bool = False, dashboard: bool = True) -> int:
    """Run the demo; returns the exit code (0 only if every image was segmented).

    ``sam``: the CellSeg1 flow (tiny base, one-image adapter) instead of the classical fallback.
    ``dashboard``: serve the read-only dashboard of the demo's catalog while it runs; with ``keep`` it
    keeps running at the end until Ctrl-C.
    """
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
    setup: SamSetup | None = None
    board: Any = None
    board_catalog: Any = None
    started = time.monotonic()
    code = 1
    try:
        with sigterm_as_interrupt():
            console.rule("[bold]cellseg1d demo" + (" - SAM + LoRA adapter (CellSeg1)" if sam else ""))
            console.print(f"Demo folder: {base}")
            if sam:
                setup = prepare_sam(console, base, acq, state)
                daemon = DaemonProcess(acq, state, log_path, settle_seconds, config=setup.config_path)
                console.print(f"Starting the daemon: cellseg1d run --config {setup.config_path} "
                              f"--settle-seconds {settle_seconds:g}  (log: {log_path})")
            else:
                console.print(f"Starting the daemon: cellseg1d run --watch {acq} --state-dir {state} "
                              f"--settle-seconds {settle_seconds:g}  (log: {log_path})")
            daemon.start()
            if not daemon.wait_watching(60):
                console.print("[red]The daemon did not start watching.[/red] Its log:")
                console.print(log_tail(log_path), markup=False, highlight=False)
                return 1
            if dashboard:
                board, board_catalog = start_demo_dashboard(console, acq, state)
                if board is not None:
                    console.print(f"Dashboard (read-only, live): [bold]{board.address}/[/bold]")
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
                                           timeout=120.0 + (40.0 if sam else 10.0) * n_images)
            microscope.stop_event.set()
            microscope.join(timeout=30)
            exit_code = daemon.stop()
            if exit_code not in (0, None):
                console.print(f"[yellow]The daemon exited with code {exit_code}.[/yellow]")
            rows = {p: r for p, r in latest_rows(state).items() if p in {str(i.path) for i in images}} or rows
            planes = {img.path: d[0, 0] for a in acquisitions for img, d in zip(a.images, a.data, strict=True)}
            _summary(console, images, rows, acq, settle_seconds, planes if sam else None)
            if setup is not None:
                _sam_note(console, setup)
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
            if board is not None:
                if keep:
                    _serve_until_interrupted(console, board)
                else:
                    console.print(f"Dashboard: {board.address}/ (stops with the demo; rerun with --keep to keep it "
                                  "running, or run 'cellseg1d dashboard --state-dir STATE --watch ACQUISITION' on a "
                                  "kept demo folder)")
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
        if board is not None:
            board.stop()
            board_catalog.close()
        if keep_folder:
            console.print(f"The demo folder is kept: {base}  (images in {acq}, catalog in {state})")
        else:
            shutil.rmtree(base, ignore_errors=True)
            console.print(f"The demo folder {base} was deleted; rerun with --keep or --workdir DIR to keep it "
                          "and open the results in napari.")
