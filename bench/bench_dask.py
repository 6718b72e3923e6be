"""Benchmark the Dask executor against the local one, and estimate the GPU workers a facility needs. Prints numbers.

Run (about 3 minutes on 2 quiet CPU cores; ``--device cuda`` applies to (3) only)::

    nice .venv/bin/python bench/bench_dask.py [--images 8] [--size 256] [--planes 2] [--skip-sam]
        [--skip-estimate] [--skip-vit-h] [--device cuda]

What runs
---------
(1) Throughput. ``--images`` synthetic OME-Zarr images (``--size`` square,
    ``--planes`` z planes, 2 channels; ``cellseg1d.testing.synthetic.make_czyx``) go
    through :meth:`cellseg1d.pipeline.Pipeline.run` from a thread pool of 2 in
    this process (what a daemon with ``jobs.workers = 2`` does), timed from the
    first submission to the last published label image (the set is run again
    until ``--min-seconds`` are reached: the classical segmenter takes
    milliseconds per plane), with

    * the local executor: 1 job at a time and 1 torch thread; 2 jobs and 1
      torch thread; 2 jobs and 2 torch threads;
    * the Dask executor on a local cluster started here as subprocesses
      (``python -m distributed.cli.dask_scheduler`` and ``... dask_worker
      --nthreads 1 --no-nanny``), with 1 and then 2 workers. Workers get
      ``OMP_NUM_THREADS=1`` (and MKL/OpenBLAS likewise): one torch thread per
      worker, so 2 workers do not oversubscribe 2 cores.

    for the classical segmenter and for tiny SAM (the pretrained miniature SAM
    of the tests, ``cellseg1d/testing/data/tiny_sam_cells.safetensors``, saved here as a
    ``.pth`` checkpoint; input 256, ``--sam-points`` x ``--sam-points`` grid,
    ``crop_n_layers = 0``). Every configuration is warmed first (models loaded
    on every worker, images opened), on other images. The daemon side
    (opening, stitching, writing labels and pyramids) runs in this process, on
    the same 2 cores as the workers.

(2) Executor overhead per image. The same single image, ``--repeats`` times
    (``--sam-repeats`` for SAM), one job at a time, after one untimed warm
    run: median wall time of ``Pipeline.run`` with the local executor (1 torch
    thread) and with the Dask executor (1 worker, 1 thread); overhead = the
    difference, in ms and in % of the local time. The medians of the
    pipeline's own "segment" timing (measured where the segmenter runs) are
    printed beside them, and the median of wall - segment per run ("outside"):
    its difference between the executors is the executor's cost without the
    run-to-run noise of the segmentation (which, for SAM, is larger than the
    overhead).

(3) Paper estimate of the GPU workers for ``--microscopes`` (20) microscopes
    each writing one ``--image-side`` (2048) square image every
    ``--interval`` (10) s: 2 images/s arriving. Measured here, on CPU with
    ``--estimate-threads`` torch threads (default: every core), random
    (seeded) weights, float32, for vit_b and vit_h built at input 512
    (``cellseg1d.model.sam.build_sam``):

    * the image encoder, per crop (best of ``--encoder-passes`` passes);
    * the first decoder stage, per prompt (``inference.decode_scores``: prompt
      encoder, two-way transformer, IoU head; batches of 64, as the engine);
    * the mask stage, per prompt that passes the IoU-head filter
      (``inference.decode_masks`` + upsampling to the crop size + stability
      score + binarisation + boxes), at the crop sizes of a tile.

    The cost model of one image with the default settings: ``sam.tile = 1024``
    and ``tile_overlap = 256`` give ``len(cellseg1d.model.stitch.tile_boxes((2048,
    2048), 1024, 256))`` = 9 tiles; per tile ``crop_n_layers = 1`` gives 1 + 4
    crops (``model.prompts.crop_boxes``), each one encoder pass at input 512
    and ``points_per_side**2`` = 1024 prompts; a fraction of the prompts (the
    pass fraction) pays the mask stage. The pass fraction is measured with
    tiny SAM on a synthetic cell image (prompts that reach the mask stage /
    prompts decoded), or ``--mask-fraction``. Not modelled: mask NMS, hole
    and island clean-up and painting (on the CPU even with a GPU model),
    stitching, reading and writing.

    GPU seconds are not measured here (no GPU), so the CPU -> GPU factors are
    explicit assumptions, printed with the result:

    * ``--gpu-encoder-speedup``: default anchored to the SAM paper (Kirillov et
      al. 2023, sec. 3: the ViT-H image encoder takes ~0.15 s per 1024 x 1024
      image on an NVIDIA A100, ``--a100-vit-h-seconds``): the speedup is the
      measured CPU time of the vit_h encoder at input 1024 (one pass) divided
      by 0.15 s, and the same factor is applied to the input-512 crops of both
      models. That is optimistic for the GPU: a 512 input (1024 tokens) keeps a
      GPU less busy than 4096 tokens, so its GPU time is more than a quarter
      of the 1024 time. With ``--skip-vit-h`` (no 1024 pass) the default is
      ``FALLBACK_ENCODER_SPEEDUP``, the factor this measurement gave on the
      2-core development machine.
    * ``--gpu-decoder-speedup``: no published GPU figure exists for the
      decoder; default a quarter of the encoder speedup: its batch-64 products
      of 256-wide matrices and many small kernels use a GPU far less well than
      the encoder's large products. A sensitivity table prints the worker
      counts for decoder speedups of 1x, 1/4x and 1/16x the encoder's.

    Workers needed = ceil(arrival rate x GPU seconds per image / target
    utilisation), ``--utilisation`` 0.7 by default, for vit_b and vit_h, with
    ``crop_n_layers`` 1 (the default) and 0 (one crop per tile). The prompt
    encoder and mask decoder are the same for vit_b and vit_h (only the image
    encoder differs): they are measured with each, and the cost model uses
    the mean of the two (their spread is noise). Each model is measured in a
    fresh process (its own memory) with glibc's malloc thresholds raised as in
    ``bench/bench_sam.py``. On a shared machine the CPU figures vary by up to
    2x between runs (measured here: vit_b encoder 1.2-3.6 s per crop).

    ``--device cuda`` measures the same stages directly on the GPU (with
    synchronisation; more passes) and uses no speedup assumption; the vit_h
    encoder at input 1024 is then printed beside the paper's 0.15 s.

Temporary folders and the cluster's processes are removed at the end, also
on errors and Ctrl-C (``--keep`` keeps the folder).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch

CHANNELS = ["nuclei", "membrane"]
TINY_BASE = REPO / "cellseg1d" / "testing" / "data" / "tiny_sam_cells.safetensors"
#: Encoder speedup used with --skip-vit-h: CPU vit_h encoder at input 1024 (2 threads, 2-core
#: development machine: 45-52 s in three runs) / the SAM paper's 0.15 s on an A100.
FALLBACK_ENCODER_SPEEDUP = 300.0
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


# --------------------------------------------------------------------------
# a local Dask cluster as subprocesses
# --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cluster:
    """A scheduler and ``dask worker`` processes on this machine; :meth:`close` ends them (by pid)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.address = ""
        self.client: Any = None

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        log = self.logs / f"{name}.log"
        with open(log, "ab") as fh:
            proc = subprocess.Popen([sys.executable, "-m", *args], stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=REPO, env=env, start_new_session=True)
        self.procs.append((name, proc))

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {})}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        env.pop("CELLSEG1D_CONFIG", None)
        return env

    def start_scheduler(self, timeout: float = 60) -> None:
        from distributed import Client

        port = free_port()
        self.address = f"tcp://127.0.0.1:{port}"
        self._spawn("scheduler", ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--no-dashboard", "--no-show"], self._env())
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client = Client(self.address, timeout=5, set_as_default=False, name="bench-admin")
                return
            except Exception:  # noqa: BLE001 - not up yet: any connection error
                if time.monotonic() > deadline or self.procs[0][1].poll() is not None:
                    raise RuntimeError(f"the Dask scheduler did not start:\n{self.tail('scheduler')}") from None
                time.sleep(0.5)

    def add_worker(self, name: str, timeout: float = 120) -> float:
        """Start one worker (1 thread, no nanny, OMP_NUM_THREADS=1); returns the seconds until it joined."""
        started = time.monotonic()
        want = len(self.workers()) + 1
        self._spawn(name, ["distributed.cli.dask_worker", self.address, "--nthreads", "1", "--no-nanny",
                           "--no-dashboard", "--name", name, "--memory-limit", "0"], self._env(WORKER_ENV))
        proc = self.procs[-1][1]
        while len(self.workers()) < want:
            if proc.poll() is not None or time.monotonic() - started > timeout:
                raise RuntimeError(f"Dask worker {name} did not join:\n{self.tail(name)}")
            time.sleep(0.2)
        return time.monotonic() - started

    def workers(self) -> dict[str, Any]:
        return dict(self.client.scheduler_info(n_workers=-1).get("workers", {}))

    def tasks_done(self) -> dict[str, int]:
        """cellseg1d tasks run so far by each worker (from its worker plugin)."""
        return self.client.run(_plugin_tasks)

    def tail(self, name: str, chars: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close(timeout=5)
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        self.procs.clear()


def _torch_threads() -> int:
    """Runs on a worker (client.run): its torch intra-op threads."""
    import torch

    return torch.get_num_threads()


def _plugin_tasks(dask_worker: Any) -> int:
    """Runs on a worker (client.run): how many tasks its cellseg1d plugin ran."""
    plugin = dask_worker.plugins.get("cellseg1d")
    return int(getattr(plugin, "tasks", 0))


# --------------------------------------------------------------------------
# images, configs, pipelines
# --------------------------------------------------------------------------


def write_images(folder: Path, prefix: str, n: int, size: int, planes: int, seed: int) -> list[Path]:
    from cellseg1d.testing.synthetic import make_czyx, write_ome_zarr

    n_cells = max(10, size * size // 2200)
    paths = []
    for i in range(n):
        data, _ = make_czyx((size, size), n_cells, n_z=planes, seed=seed + i)
        path = write_ome_zarr(folder / f"{prefix}_{i:03d}.ome.zarr", data[0], axes="czyx",
                              channel_names=CHANNELS)
        paths.append(Path(path).resolve())
    return paths


def tiny_checkpoint(folder: Path) -> Path:
    """The tests' pretrained tiny SAM as a float32 ``.pth`` state dict (what ``load_sam`` reads)."""
    from safetensors.torch import load_file

    path = folder / "tiny_sam_cells.pth"
    torch.save({k: v.float() for k, v in load_file(str(TINY_BASE)).items()}, path)
    return path


def make_config(base: Path, acq: Path, segmenter: str, sam: dict[str, Any], scheduler: str | None,
                jobs: int) -> Any:
    from cellseg1d.config import build_config

    data: dict[str, Any] = {"state_dir": str(base / "state"), "watch": {"roots": [{"path": str(acq)}]},
                            "jobs": {"workers": jobs}}
    if segmenter == "sam":
        data["sam"] = sam
    if scheduler is not None:
        data["executor"] = {"kind": "dask", "scheduler": scheduler}
    return build_config(data)


class Runner:
    """A Pipeline (with its executor and plugin manager) for one segmenter and executor."""

    def __init__(self, config: Any) -> None:
        from cellseg1d.pipeline.executor import make_executor
        from cellseg1d.pipeline import Pipeline
        from cellseg1d.plugins import build_plugin_manager

        self.config = config
        pm = build_plugin_manager(config.plugins.enable, config.plugins.disable)
        pm.hook.configure(config=config)  # local SAM: loads the model here; dask: the workers load it
        self.executor = make_executor(config, pm)
        self.executor.start()
        self.pipeline = Pipeline(config, pm, self.executor)
        self.root = config.watch.roots[0]

    def run(self, path: Path) -> Any:
        return self.pipeline.run(path, self.root, path)

    def run_all(self, paths: list[Path], jobs: int) -> tuple[float, list[Any]]:
        """All images through a pool of ``jobs`` threads; (wall seconds, results)."""
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="job") as pool:
            results = list(pool.map(self.run, paths))
        return time.perf_counter() - started, results

    def close(self) -> None:
        self.executor.close()


def warm_dask(runner: Runner, cluster: Cluster, warm: list[Path], rounds: int = 6) -> None:
    """Run warm-up images (2 at a time) until every worker ran at least one task of this config."""
    before = cluster.tasks_done()
    for _ in range(rounds):
        runner.run_all(warm[:2], 2)
        after = cluster.tasks_done()
        if all(after.get(w, 0) > n for w, n in before.items()) and set(after) == set(before):
            return
    print(f"    (warning: not every worker ran a warm-up task: {before} -> {cluster.tasks_done()})")


def segmenter_of(results: list[Any]) -> str:
    return ",".join(sorted({r.segmenter for r in results}))


# --------------------------------------------------------------------------
# (1) throughput and (2) overhead
# --------------------------------------------------------------------------


def fmt_row(cols: list[str], widths: list[int]) -> str:
    return "  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cols, widths)))


def bench_executors(args: argparse.Namespace, base: Path) -> None:
    acq = base / "acq"
    acq.mkdir(parents=True)
    t0 = time.perf_counter()
    images = write_images(acq, "img", args.images, args.size, args.planes, 1000)
    warm = write_images(acq, "warm", 2, args.size, args.planes, 5000)
    one = write_images(acq, "single", 1, args.size, args.planes, 7000)[0]
    print(f"  {args.images} images {args.size}x{args.size}, {args.planes} planes, 2 channels (+3 for warm-up and "
          f"the overhead run) written in {time.perf_counter() - t0:.1f} s; {os.cpu_count()} CPUs")

    segmenters = ["classical"] + ([] if args.skip_sam else ["sam"])
    sam: dict[str, Any] = {}
    if "sam" in segmenters:
        if not TINY_BASE.is_file():
            print(f"  tiny SAM skipped: {TINY_BASE} missing")
            segmenters.remove("sam")
        else:
            sam = {"checkpoint": str(tiny_checkpoint(base)), "model_type": "tiny", "allow_custom_checkpoint": True,
                   "image_size": 256, "points_per_side": args.sam_points, "crop_n_layers": 0, "device": "cpu"}
            print(f"  tiny SAM: pretrained miniature model, input 256, {args.sam_points}x{args.sam_points} points, "
                  "crop_n_layers 0, CPU")
    print(f"  torch threads: this process as stated per row; Dask workers {WORKER_ENV} (1 thread each)")
    reps = {"classical": args.repeats, "sam": args.sam_repeats}
    rows: dict[str, list[tuple[str, int, int, float, int, str]]] = {s: [] for s in segmenters}
    overhead: dict[str, dict[str, tuple[float, float, float]]] = {s: {} for s in segmenters}

    def timed(runner: Runner, label: str, seg: str, jobs: int, threads: int) -> None:
        # Rounds over the image set (each ends when its last image is published) until --min-seconds.
        wall, done, results = 0.0, 0, []
        while done == 0 or wall < args.min_seconds:
            seconds, results = runner.run_all(images, jobs)
            wall, done = wall + seconds, done + len(images)
        rows[seg].append((label, jobs, threads, wall, done, segmenter_of(results)))
        print(f"    {seg:<9} {label:<14} jobs {jobs}  {done * args.planes / wall:6.2f} planes/s  "
              f"{done / wall:6.2f} images/s  ({done} images in {wall:.2f} s)", flush=True)

    def single(runner: Runner, label: str, seg: str) -> None:
        runner.run(one)  # warm: first run excluded
        walls, segs = [], []
        for _ in range(reps[seg]):
            started = time.perf_counter()
            result = runner.run(one)
            walls.append(time.perf_counter() - started)
            segs.append(result.timings.get("segment", 0.0))
        outside = statistics.median(w - s for w, s in zip(walls, segs, strict=True))
        overhead[seg][label] = (statistics.median(walls), statistics.median(segs), outside)
        print(f"    {seg:<9} {label:<14} single image x {reps[seg]}: median {statistics.median(walls) * 1e3:7.1f} ms "
              f"(segment {statistics.median(segs) * 1e3:.1f} ms)", flush=True)

    print("\n  local executor (this process):", flush=True)
    for seg in segmenters:
        for jobs, threads in ((1, 1), (2, 1), (2, 2)):
            torch.set_num_threads(threads)
            runner = Runner(make_config(base, acq, seg, sam, None, jobs))
            try:
                runner.run_all(warm[:2], jobs)
                timed(runner, f"local t{threads}", seg, jobs, threads)
                if (jobs, threads) == (1, 1) and not args.skip_overhead:
                    single(runner, "local t1", seg)
            finally:
                runner.close()
    torch.set_num_threads(1)  # the daemon side of the Dask runs: no intra-op pool competing with the workers

    cluster = Cluster(base)
    try:
        t = time.monotonic()
        cluster.start_scheduler()
        joined = cluster.add_worker("w1")
        print(f"\n  Dask executor: scheduler {cluster.address} up in {time.monotonic() - t - joined:.1f} s, "
              f"worker w1 joined in {joined:.1f} s", flush=True)
        for n_workers in (1, 2):
            if n_workers == 2:
                joined = cluster.add_worker("w2")
                print(f"  worker w2 joined in {joined:.1f} s", flush=True)
            for seg in segmenters:
                runner = Runner(make_config(base, acq, seg, sam, cluster.address, 2))
                try:
                    t = time.perf_counter()
                    warm_dask(runner, cluster, warm)
                    print(f"    {seg:<9} warm-up on {n_workers} worker(s) (model load, imports): "
                          f"{time.perf_counter() - t:.1f} s", flush=True)
                    if seg == segmenters[-1]:
                        threads = cluster.client.run(_torch_threads)
                        print(f"    torch.get_num_threads() on the workers: {sorted(threads.values())}")
                    timed(runner, f"dask {n_workers}w", seg, 2, 1)
                    if n_workers == 1 and not args.skip_overhead:
                        single(runner, "dask 1w", seg)
                finally:
                    runner.close()
    finally:
        cluster.close()

    print("\n(1) throughput: Pipeline.run from a pool of 'jobs' threads in this process, "
          f"{args.images} images x {args.planes} planes {args.size}x{args.size} (repeated to >= {args.min_seconds:g} s)")
    widths = [10, 14, 5, 14, 8, 9, 9, 12]
    print(fmt_row(["segmenter", "executor", "jobs", "torch thr/proc", "wall s", "images/s", "planes/s",
                   "rel. dask 1w"], widths))
    for seg, entries in rows.items():
        rate = {label: done / wall for label, _, _, wall, done, _ in entries}
        for label, jobs, threads, wall, done, _ in entries:
            rel = f"{rate[label] / rate['dask 1w']:.2f}x" if "dask 1w" in rate else "-"
            print(fmt_row([seg, label, str(jobs), str(threads), f"{wall:.2f}", f"{rate[label]:.2f}",
                           f"{rate[label] * args.planes:.2f}", rel], widths))
        if "dask 1w" in rate and "dask 2w" in rate:
            print(f"  {seg}: speed-up 2 vs 1 Dask worker {rate['dask 2w'] / rate['dask 1w']:.2f}x "
                  f"(segmenter(s): {entries[-1][5]})")
    print("  rel. dask 1w: throughput relative to the Dask executor with 1 worker. Local: the SAM plugin segments "
          "under one model lock per process, so 2 local jobs overlap only reading, writing and pyramids.")

    if not args.skip_overhead:
        print("\n(2) executor overhead per image: the same image, one job at a time, warm, medians")
        widths = [10, 12, 11, 12, 11, 11, 12, 13, 13]
        print(fmt_row(["segmenter", "local t1 ms", "dask 1w ms", "overhead ms", "overhead %", "seg loc ms",
                       "seg dask ms", "outside loc", "outside dask"], widths))
        for seg, values in overhead.items():
            if "local t1" not in values or "dask 1w" not in values:
                continue
            (lw, ls, lo), (dw, ds, do) = values["local t1"], values["dask 1w"]
            print(fmt_row([seg, f"{lw * 1e3:.1f}", f"{dw * 1e3:.1f}", f"{(dw - lw) * 1e3:+.1f}",
                           f"{100 * (dw - lw) / lw:+.0f} %", f"{ls * 1e3:.1f}", f"{ds * 1e3:.1f}",
                           f"{lo * 1e3:.1f}", f"{do * 1e3:.1f}"], widths))
        for seg, values in overhead.items():
            if "local t1" in values and "dask 1w" in values:
                (lw, _, lo), (_, _, do) = values["local t1"], values["dask 1w"]
                print(f"  {seg}: time outside segmentation, dask - local: {(do - lo) * 1e3:+.1f} ms per image "
                      f"({100 * (do - lo) / lw:+.1f} % of the local time)")
        print(f"  ({args.planes} plane tasks per image. 'seg': the pipeline's summed 'segment' timing, measured where "
              "the segmenter ran; 'outside': median of wall - seg per run, the executor's cost without the noise "
              "of the segmentation itself)")


# --------------------------------------------------------------------------
# (3) GPU workers: stage costs and the cost model
# --------------------------------------------------------------------------


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> Self:
        if self.cuda:
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def stage_costs(model_type: str, device: torch.device, dtype: str, passes: int, batches: int,
                crop_sizes: list[tuple[int, int]], image_size: int = 512, batch: int = 64,
                mask_batch: int = 16) -> dict[str, Any]:
    """Seconds per encoder pass, per decoded prompt and per mask-stage prompt (at each crop size)."""
    from cellseg1d.model import nms as nms_ops
    from cellseg1d.model.inference import decode_masks, decode_scores, stability_score
    from cellseg1d.model.prompts import resized_shape
    from cellseg1d.model.sam import build_sam

    torch.manual_seed(0)
    t = time.perf_counter()
    sam = build_sam(model_type, image_size).to(device).eval()
    built = time.perf_counter() - t
    clock = Timer(device)
    out: dict[str, Any] = {"model": model_type, "image_size": image_size, "build_s": built}
    x = torch.randn(1, 3, image_size, image_size, device=device)
    warm = 2 if device.type == "cuda" else 0
    encoder = []
    with torch.inference_mode(), _autocast(device, dtype):
        for i in range(warm + passes):
            with clock:
                embedding = sam.image_encoder(x)
            if i >= warm:
                encoder.append(clock.seconds)
        out["encoder_s"] = min(encoder)
        out["encoder_passes"] = encoder
        dense_pe = sam.prompt_encoder.get_dense_pe()
        gen = torch.Generator().manual_seed(1)
        per = []
        mask_token = image_tokens = None
        for i in range(1 + batches):
            coords = (torch.rand((batch, 1, 2), generator=gen) * image_size).to(device)
            with clock:
                _, mask_token, image_tokens = decode_scores(sam, embedding, dense_pe, coords)
            if i:
                per.append(clock.seconds / batch)
        out["decode_s"] = statistics.median(per)
        masks = {}
        for crop_hw in crop_sizes:
            new_hw = resized_shape(crop_hw[0], crop_hw[1], image_size)
            per = []
            for i in range(6):
                with clock:
                    low = decode_masks(sam, mask_token[:mask_batch], image_tokens[:mask_batch]).float()
                    logits = sam.postprocess_masks(low, new_hw, crop_hw)[:, 0]
                    stability_score(logits, sam.mask_threshold, 0.8)
                    binary = logits > sam.mask_threshold
                    nms_ops.mask_boxes(binary)
                if i:
                    per.append(clock.seconds / mask_batch)
            masks[crop_hw] = statistics.median(per)
        out["mask_s"] = masks
    del sam, embedding, mask_token, image_tokens
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def encoder_1024(device: torch.device, dtype: str, passes: int) -> float:
    """Seconds of one vit_h encoder pass at input 1024 (best of ``passes``; the paper's setting)."""
    from cellseg1d.model.sam import build_sam

    torch.manual_seed(0)
    sam = build_sam("vit_h", 1024).to(device).eval()
    x = torch.randn(1, 3, 1024, 1024, device=device)
    clock = Timer(device)
    times = []
    with torch.inference_mode(), _autocast(device, dtype):
        for i in range((2 if device.type == "cuda" else 0) + passes):
            with clock:
                sam.image_encoder(x)
            if device.type != "cuda" or i >= 2:
                times.append(clock.seconds)
    del sam
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return min(times)


def tiny_pass_fraction(points: int) -> float | None:
    """Prompts that reach the mask stage / prompts decoded: tiny SAM on a synthetic 256 x 256 cell image."""
    if not TINY_BASE.is_file():
        return None
    from safetensors.torch import load_file

    from cellseg1d.model.data import to_uint8_rgb
    from cellseg1d.model.inference import (
        InferenceReport,
        InferenceSettings,
        segment_image,
    )
    from cellseg1d.model.sam import build_sam
    from cellseg1d.testing.synthetic import make_czyx

    sam = build_sam("tiny", 256)
    sam.load_state_dict({k: v.float() for k, v in load_file(str(TINY_BASE)).items()})
    data, _ = make_czyx((256, 256), 29, n_z=1, seed=9000)
    report = InferenceReport()
    segment_image(sam, to_uint8_rgb(data[0, :1, 0]), InferenceSettings(points_per_side=points, crop_n_layers=0,
                                                                        image_size=256), "cpu", report=report)
    return report.counts.get("iou", 0) / max(1, report.counts.get("decoded", 1))


MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "268435456"}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement of (3) in this process (the ``--measure`` subprocess); JSON-able."""
    device = torch.device(spec["device"])
    if device.type == "cpu":
        torch.set_num_threads(spec["threads"])
    if spec["kind"] == "stages":
        out = stage_costs(spec["model"], device, spec["dtype"], spec["passes"], spec["batches"],
                          [tuple(hw) for hw in spec["crop_sizes"]])
        out["mask_s"] = {f"{h}x{w}": s for (h, w), s in out["mask_s"].items()}
        return out
    if spec["kind"] == "anchor":
        return {"seconds": encoder_1024(device, spec["dtype"], spec["passes"])}
    return {"fraction": tiny_pass_fraction(spec["points"])}


def spawn(spec: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`measure` in a fresh process (its own memory; glibc malloc thresholds raised, as bench_sam)."""
    import json

    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in MALLOC_ENV.items()}}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", json.dumps(spec)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout or "no output").strip().splitlines()[-1:]
    raise RuntimeError(f"measurement {spec['kind']} {spec.get('model', '')} failed: {tail}")


def bench_estimate(args: argparse.Namespace) -> None:
    from cellseg1d.model.inference import InferenceSettings
    from cellseg1d.model.prompts import crop_boxes
    from cellseg1d.model.stitch import tile_boxes

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    side, tile, overlap, pps = args.image_side, args.tile, args.tile_overlap, args.points_per_side
    tiles = tile_boxes((side, side), tile, overlap)
    ratio = InferenceSettings().crop_overlap_ratio
    crops = crop_boxes((min(tile, side),) * 2, 1, ratio)
    # The mask stage is timed at the largest crop of each layer (the crops of a layer differ by a pixel).
    layer_hw = {layer: max((c.height, c.width) for c in crops if c.layer == layer) for layer in (0, 1)}
    crops_by_layers = {layers: [f"{layer_hw[c.layer][0]}x{layer_hw[c.layer][1]}" for c in crops
                                if c.layer <= layers] for layers in (1, 0)}
    crop_sizes = sorted(set(layer_hw.values()), reverse=True)
    rate = args.microscopes / args.interval
    where = (torch.cuda.get_device_name(0) if on_cuda else
             f"CPU ({torch.backends.cpu.get_cpu_capability()}), torch threads {args.estimate_threads}")
    print(f"\n(3) GPU workers for {args.microscopes} microscopes x one {side}x{side} image every {args.interval:g} s "
          f"= {rate:g} images/s")
    print(f"  measuring on {args.device}: {where}; {args.dtype}; random weights (seed 0), input 512; each model "
          f"in a fresh process with {MALLOC_ENV}")
    passes = args.encoder_passes if args.encoder_passes else (10 if on_cuda else 2)
    batches = args.decoder_batches if args.decoder_batches else (20 if on_cuda else 8)
    common = {"device": args.device, "dtype": args.dtype, "threads": args.estimate_threads}

    models = ["vit_b"] + ([] if args.skip_vit_h else ["vit_h"])
    costs = {}
    for model in models:
        t = time.perf_counter()
        costs[model] = c = spawn({**common, "kind": "stages", "model": model, "passes": passes, "batches": batches,
                                  "crop_sizes": crop_sizes})
        masks = ", ".join(f"{hw} {s * 1e3:.2f}" for hw, s in c["mask_s"].items())
        print(f"  {model}: encoder {c['encoder_s']:.3f} s/crop (best of {len(c['encoder_passes'])}: "
              f"{', '.join(f'{s:.3f}' for s in c['encoder_passes'])}); decode {c['decode_s'] * 1e3:.2f} ms/prompt "
              f"(batch 64, median of {batches}); mask stage ms/prompt at crop {masks}  "
              f"[{time.perf_counter() - t:.0f} s]", flush=True)

    if len(costs) > 1:
        # Same prompt encoder and mask decoder for every SAM (only the image encoder differs): the cost
        # model uses their mean per prompt, and the spread is measurement noise.
        for key in ("decode_s", "mask_s"):
            values = [c[key] for c in costs.values()]
            pooled = (statistics.fmean(values) if key == "decode_s" else
                      {hw: statistics.fmean(v[hw] for v in values) for hw in values[0]})
            for c in costs.values():
                c[key] = pooled
        masks = ", ".join(f"{hw} {s * 1e3:.2f}" for hw, s in pooled.items())
        print(f"  decoder (identical in vit_b and vit_h), mean of the two: decode "
              f"{costs['vit_b']['decode_s'] * 1e3:.2f} ms/prompt; mask stage ms/prompt at crop {masks}")

    anchor = None
    if not args.skip_vit_h and (on_cuda or not args.skip_anchor):
        t = time.perf_counter()
        anchor = spawn({**common, "kind": "anchor", "passes": passes if on_cuda else 1})["seconds"]
        print(f"  vit_h encoder at input 1024: {anchor:.3f} s/pass ({'best of ' + str(passes) if on_cuda else '1 pass'}"
              f"; the SAM paper: ~{args.a100_vit_h_seconds:g} s on an A100)  [{time.perf_counter() - t:.0f} s]",
              flush=True)

    fraction, source = args.mask_fraction, "--mask-fraction"
    if fraction is None:
        fraction = spawn({**common, "device": "cpu", "kind": "fraction", "points": pps})["fraction"]
        source = f"measured: tiny SAM, synthetic cells, {pps}x{pps} grid"
        if fraction is None:
            fraction, source = 0.5, "assumed (tiny SAM checkpoint missing)"
    print(f"  pass fraction (prompts reaching the mask stage): {fraction:.2f} ({source})")

    if on_cuda:
        enc_speedup = dec_speedup = 1.0
        print("  GPU times measured directly: no CPU -> GPU factor")
    else:
        if args.gpu_encoder_speedup is not None:
            enc_speedup, why = args.gpu_encoder_speedup, "--gpu-encoder-speedup"
        elif anchor is not None:
            enc_speedup = anchor / args.a100_vit_h_seconds
            why = f"vit_h 1024 here {anchor:.1f} s / {args.a100_vit_h_seconds:g} s on an A100 (SAM paper)"
        else:
            enc_speedup, why = FALLBACK_ENCODER_SPEEDUP, "FALLBACK_ENCODER_SPEEDUP (no vit_h 1024 pass in this run)"
        if args.gpu_decoder_speedup is not None:
            dec_speedup, dwhy = args.gpu_decoder_speedup, "--gpu-decoder-speedup"
        else:
            dec_speedup, dwhy = enc_speedup / 4, "a quarter of the encoder's (no published figure; see docstring)"
        print(f"  ASSUMPTION encoder CPU->GPU speedup {enc_speedup:.0f}x: {why}")
        print(f"  ASSUMPTION decoder CPU->GPU speedup {dec_speedup:.0f}x: {dwhy}")
        print("  (A100-class GPU, float32 as measured; applied to the 512-input crops, optimistic for the encoder)")

    def per_image(c: dict[str, Any], layers: int) -> dict[str, float]:
        crops = crops_by_layers[layers]
        prompts = len(crops) * pps * pps * len(tiles)
        enc = len(crops) * len(tiles) * c["encoder_s"]
        dec = prompts * c["decode_s"]
        mask = sum(fraction * pps * pps * c["mask_s"][hw] for hw in crops) * len(tiles)
        return {"passes": len(crops) * len(tiles), "prompts": prompts, "enc": enc, "dec": dec, "mask": mask}

    print(f"  cost model: {len(tiles)} tiles ({tile} px, overlap {overlap}) per image; per tile 1 + 4 crops "
          f"(crop_n_layers 1) or 1 crop (0); {pps}x{pps} = {pps * pps} prompts per crop; "
          "mask NMS, clean-up, stitching and I/O not included")
    unit = "GPU s" if on_cuda else "CPU s"
    widths = [6, 6, 8, 8, 10, 10, 10, 10, 10, 8]
    print(fmt_row(["model", "crops", "encoder", "prompts", f"enc {unit}", f"dec {unit}", f"mask {unit}",
                   f"{unit}/img", "GPU s/img", "workers"], widths))
    table = []
    for model, c in costs.items():
        for layers in (1, 0):
            p = per_image(c, layers)
            gpu = p["enc"] / enc_speedup + (p["dec"] + p["mask"]) / dec_speedup
            workers = math.ceil(rate * gpu / args.utilisation)
            table.append((model, layers, p, gpu, workers))
            print(fmt_row([model, str(layers), f"{p['passes']}", f"{p['prompts']}", f"{p['enc']:.1f}",
                           f"{p['dec']:.1f}", f"{p['mask']:.1f}", f"{p['enc'] + p['dec'] + p['mask']:.1f}",
                           f"{gpu:.3f}", str(workers)], widths))
    print(f"  workers = ceil({rate:g} images/s x GPU s per image / utilisation {args.utilisation:g}); "
          "'crops' = crop_n_layers, 'encoder' = encoder passes per image")
    if not on_cuda:
        print("  sensitivity, workers needed by decoder speedup (encoder speedup fixed):")
        factors = [enc_speedup, enc_speedup / 4, enc_speedup / 16]
        print(fmt_row(["model", "crops"] + [f"dec {f:.0f}x" for f in factors], [6, 6] + [10] * len(factors)))
        for model, layers, p, _, _ in table:
            counts = [math.ceil(rate * (p["enc"] / enc_speedup + (p["dec"] + p["mask"]) / f) / args.utilisation)
                      for f in factors]
            print(fmt_row([model, str(layers)] + [str(n) for n in counts], [6, 6] + [10] * len(factors)))


# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8, help="images of the throughput run (1)")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels, (1) and (2)")
    ap.add_argument("--planes", type=int, default=2, help="z planes per image, (1) and (2)")
    ap.add_argument("--min-seconds", type=float, default=3.0,
                    help="(1): rounds over the image set until each configuration ran this long")
    ap.add_argument("--repeats", type=int, default=30, help="timed runs of the single image, classical (2)")
    ap.add_argument("--sam-repeats", type=int, default=8, help="timed runs of the single image, tiny SAM (2)")
    ap.add_argument("--sam-points", type=int, default=12, help="tiny SAM grid points per side, (1) and (2)")
    ap.add_argument("--skip-sam", action="store_true", help="classical segmenter only in (1) and (2)")
    ap.add_argument("--skip-executors", action="store_true", help="skip (1) and (2)")
    ap.add_argument("--skip-overhead", action="store_true", help="skip (2)")
    ap.add_argument("--skip-estimate", action="store_true", help="skip (3)")
    ap.add_argument("--skip-vit-h", action="store_true", help="(3) for vit_b only (vit_h on CPU is slow)")
    ap.add_argument("--skip-anchor", action="store_true",
                    help="(3) no vit_h pass at input 1024 (CPU: ~50 s); the encoder speedup falls back")
    ap.add_argument("--device", default="cpu", help="device of the stage measurements in (3): cpu or cuda")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="(3): bf16 = autocast")
    ap.add_argument("--estimate-threads", type=int, default=os.cpu_count() or 1, help="(3) CPU torch threads")
    ap.add_argument("--encoder-passes", type=int, default=0, help="(3) default 2 on CPU, 10 on CUDA")
    ap.add_argument("--decoder-batches", type=int, default=0, help="(3) batches of 64 prompts; 8 CPU, 20 CUDA")
    ap.add_argument("--microscopes", type=int, default=20)
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between images of one microscope")
    ap.add_argument("--image-side", type=int, default=2048)
    ap.add_argument("--tile", type=int, default=1024, help="sam.tile")
    ap.add_argument("--tile-overlap", type=int, default=256, help="sam.tile_overlap")
    ap.add_argument("--points-per-side", type=int, default=32, help="sam.points_per_side of the estimate")
    ap.add_argument("--utilisation", type=float, default=0.7, help="target utilisation of the GPU workers")
    ap.add_argument("--mask-fraction", type=float, default=None,
                    help="prompts passing the IoU-head filter; default: measured with tiny SAM")
    ap.add_argument("--gpu-encoder-speedup", type=float, default=None,
                    help="CPU/GPU time of the encoder; default: vit_h 1024 here / --a100-vit-h-seconds")
    ap.add_argument("--gpu-decoder-speedup", type=float, default=None,
                    help="CPU/GPU time of the decoder; default: a quarter of the encoder speedup")
    ap.add_argument("--a100-vit-h-seconds", type=float, default=0.15,
                    help="vit_h encoder time per 1024x1024 image on an A100 (SAM paper)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.measure:
        import json

        print("RESULT " + json.dumps(measure(json.loads(args.measure))), flush=True)
        return 0

    import logging

    logging.getLogger("distributed").setLevel(logging.ERROR)
    logging.getLogger("cellseg1d").setLevel(logging.WARNING)
    # SIGTERM and Ctrl-C: unwind through the finally blocks (cluster processes, temporary folder).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored

    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="cellseg1d-bench-dask-")).resolve()
    atexit.register(lambda: args.keep or shutil.rmtree(base, ignore_errors=True))
    print(f"cellseg1d Dask executor benchmark - {os.cpu_count()} CPU(s), torch {torch.__version__}, "
          f"python {sys.version.split()[0]}, folder {base}", flush=True)
    try:
        if not args.skip_executors:
            bench_executors(args, base)
        if not args.skip_estimate:
            bench_estimate(args)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping the cluster and removing the temporary folder", flush=True)
        return 130
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    print(f"\ntotal benchmark time {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
