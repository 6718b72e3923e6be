"""Benchmark CellSeg1 inference against segment-anything's SamAutomaticMaskGenerator. Prints numbers, asserts nothing.

Run (CPU; the allocator settings matter there, see below)::

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456 \\
        nice .venv/bin/python bench/bench_sam.py [--device cpu|cuda] [--skip-reference]

What runs
---------
A SAM (``--model-type``, default vit_b) at input size 512, with random weights
(seeded; identical in every run) or ``--checkpoint PATH`` (an official SAM
checkpoint, resized to input 512), segments one synthetic 512 x 512 cell image
(``cellseg1d.testing.synthetic.make_cells``, as uint8 RGB) with

* ours: ``cellseg1d.model.inference.segment_image`` end to end (label image),
  with its stage breakdown: embed (image encoder), decode (prompt encoder,
  two-way transformer, IoU head; every prompt), mask_decode (mask logits of
  the prompts that pass the IoU-head filter), filter (upsampling, stability,
  area, crop edges), nms (mask-IoU NMS, three rounds), postprocess (holes,
  islands, painting);
* reference: ``segment_anything.SamAutomaticMaskGenerator`` with the same
  model, grid (``--points-per-side``, ``crop_n_layers`` 1), thresholds and
  input scale (its SamPredictor resizes every crop to the model's 512). It
  differs from CellSeg1 by design: 3 masks per prompt (multimask), box NMS
  instead of mask NMS, no area limit, no label image, and no hole/island
  clean-up here (that needs OpenCV).

in two threshold modes:

* ``paper``: CellSeg1's thresholds (IoU head >= 0.8, stability >= 0.6). With
  random weights almost nothing passes, which flatters every implementation
  that filters early (ours skips the mask head and all later stages);
* ``lowered``: every filter but the crop-edge one disabled (IoU head and
  stability thresholds -inf / 0, no area limit), so both implementations
  decode, upsample and de-duplicate every mask: a comparable workload.

and in float32 and, where the hardware has native bf16 (CUDA, or a CPU with
AVX512-BF16/AMX), bf16 autocast. Each run is a fresh subprocess, so peak
memory (``ru_maxrss``; ``torch.cuda.max_memory_allocated`` on a GPU) is per
run; the RSS after building the model is printed as a baseline.

Before that, mask NMS alone (``--skip-nms`` skips it): 150 synthetic cells, each
6 times with a 2-pixel jitter and random dilation (900 masks at 512 x 512, as
a decoder returns them), through ``cellseg1d.model.nms.mask_nms`` and through
a baseline that loops over the masks and compares each with its
box-overlapping partners by logical and/or; both must keep the same set.

Defaults keep a CPU run to about 5 minutes on 2 cores: on CPU the grid is
16 x 16 points per crop unless ``--points-per-side 32`` (the paper's grid,
about 4x the decoder time) is given; on CUDA it is 32 x 32.

CPU notes
---------
* glibc returns freed blocks above its mmap threshold to the OS at once, so
  every decoder batch pays page faults for its large temporaries again.
  ``MALLOC_MMAP_THRESHOLD_=33554432`` (32 MiB, the largest value glibc
  accepts) and ``MALLOC_TRIM_THRESHOLD_=268435456`` keep blocks up to 32 MiB
  in the heap. Measured here: 0-10 % on the decoder (its largest
  temporaries, B x (S/16)**2 x 256 float32 = 64 MiB at batch 64 and input
  512, stay above any threshold glibc allows); set them anyway.
* Intra-op threads (printed) default to the number of cores; on a machine
  shared with other jobs, ``--threads 1`` can be faster than an
  oversubscribed 2.
* Without native bf16 (e.g. AVX2 only), bf16 autocast is emulated and was
  measured about 8-10x slower than float32 for vit_b; it is skipped unless
  ``--dtypes fp32,bf16`` asks for it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

IMAGE_SIDE = 512
MODES = {
    "paper": dict(pred_iou_thresh=0.8, stability_score_thresh=0.6, max_area_fraction=0.1),
    "lowered": dict(pred_iou_thresh=float("-inf"), stability_score_thresh=0.0, max_area_fraction=float("inf")),
}
STAGES = ("embed", "decode", "mask_decode", "filter", "nms", "postprocess")
COUNTS = ("prompts", "iou", "filters", "crop_nms", "cross_nms", "cleanup_nms", "labels")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _native_bf16(device: str) -> bool:
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    capability = torch.backends.cpu.get_cpu_capability()
    return "BF16" in capability.upper() or "AMX" in capability.upper()


# ----------------------------------------------------------------- worker


def _build_model(spec: dict[str, Any]):
    from cellseg1d.model.sam import build_sam, get_spec, resize_state_dict

    torch.manual_seed(spec["seed"])
    sam = build_sam(spec["model_type"], image_size=IMAGE_SIDE)
    if spec["checkpoint"]:
        state = torch.load(spec["checkpoint"], map_location="cpu", weights_only=True)
        sam.load_state_dict(resize_state_dict(state, get_spec(spec["model_type"]), IMAGE_SIDE))
    return sam.to(spec["device"]).eval()


def _image(spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    from cellseg1d.testing.synthetic import make_cells

    image, truth = make_cells((IMAGE_SIDE, IMAGE_SIDE), spec["n_cells"], radius=(8, 16), seed=spec["seed"])
    gray = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2), truth


def _warm_up(sam, device: str, dtype: torch.dtype | None) -> None:
    """CUDA only: library initialisation and kernel selection out of the timed run."""
    if not device.startswith("cuda"):
        return
    ctx = torch.autocast("cuda", dtype=dtype) if dtype else torch.autocast("cuda", enabled=False)
    with torch.inference_mode(), ctx:
        sam.image_encoder(torch.zeros(1, 3, IMAGE_SIDE, IMAGE_SIDE, device=device))
    torch.cuda.synchronize()


def _run_ours(spec, sam, rgb, truth, dtype) -> dict[str, Any]:
    from cellseg1d.model.metrics import average_precision
    from cellseg1d.model.inference import InferenceReport, InferenceSettings, segment_image

    settings = InferenceSettings(points_per_side=spec["points_per_side"], image_size=IMAGE_SIDE,
                                 crop_n_layers=spec["crop_n_layers"], **MODES[spec["mode"]])
    report = InferenceReport()
    start = time.perf_counter()
    labels = segment_image(sam, rgb, settings, spec["device"], autocast=dtype,
                           upsample_all=spec["impl"] == "ours_upsample_all", report=report)
    seconds = time.perf_counter() - start
    ap = average_precision(labels, truth, 0.5)[0].ap
    return {"seconds": seconds, "stages": report.seconds, "counts": report.counts, "objects": int(labels.max()),
            "ap50": ap}


def _run_reference(spec, sam, rgb, dtype) -> dict[str, Any]:
    from segment_anything import SamAutomaticMaskGenerator

    mode = MODES[spec["mode"]]
    generator = SamAutomaticMaskGenerator(
        sam,
        points_per_side=spec["points_per_side"],
        points_per_batch=64,
        # segment-anything skips a filter whose threshold is <= 0
        pred_iou_thresh=max(mode["pred_iou_thresh"], 0.0),
        stability_score_thresh=mode["stability_score_thresh"],
        stability_score_offset=0.8,
        box_nms_thresh=0.05,
        crop_n_layers=spec["crop_n_layers"],
        crop_nms_thresh=0.05,
        crop_overlap_ratio=512 / 1500,
        min_mask_region_area=0,
    )
    ctx = torch.autocast(torch.device(spec["device"]).type, dtype=dtype) if dtype else None
    start = time.perf_counter()
    crashed = None
    try:
        with ctx or contextlib.nullcontext():
            records = generator.generate(rgb)
    except IndexError as error:
        # segment-anything fails in its cross-crop NMS when no mask survived any crop; all the
        # per-crop work is done by then, so the time is still the time of the run.
        records, crashed = [], str(error)
    if spec["device"].startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    small = sum(1 for r in records if r["area"] < 0.1 * rgb.shape[0] * rgb.shape[1])
    return {"seconds": seconds, "objects": len(records), "objects_under_10pct": small, "crashed": crashed}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One timed run in this process; returns a JSON-able result."""
    torch.set_num_threads(spec["threads"])
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[spec["dtype"]]
    sam = _build_model(spec)
    rgb, truth = _image(spec)
    _warm_up(sam, spec["device"], dtype)
    base_rss = _rss_mb()
    if spec["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if spec["impl"] == "reference":
        result = _run_reference(spec, sam, rgb, dtype)
    else:
        result = _run_ours(spec, sam, rgb, truth, dtype)
    result.update(base_rss_mb=base_rss, peak_rss_mb=_rss_mb(), threads=torch.get_num_threads())
    if spec["device"].startswith("cuda"):
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


# ----------------------------------------------------------------- mask NMS


def _duplicated_cells(seed: int, copies: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell masks (N, 512, 512) bool as a decoder produces them: each cell ``copies`` times, jittered."""
    from scipy import ndimage

    from cellseg1d.testing.synthetic import make_cells

    _, truth = make_cells((IMAGE_SIDE, IMAGE_SIDE), 150, radius=(8, 16), seed=seed)
    rng = np.random.default_rng(seed)
    masks = []
    for where, label in zip(ndimage.find_objects(truth), range(1, int(truth.max()) + 1)):
        cell = truth == label
        for _ in range(copies):
            jittered = np.roll(cell, tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
            if rng.random() < 0.5:
                jittered = ndimage.binary_dilation(jittered)
            masks.append(jittered)
    return np.stack(masks), rng.random(len(masks))


def _row_loop_iou(masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Baseline: one step per mask over its box-overlapping partners (logical and/or, no matmul)."""
    from cellseg1d.model.nms import boxes_overlap

    n = masks.shape[0]
    iou = torch.zeros((n, n), device=masks.device)
    overlap = boxes_overlap(boxes, boxes)
    for i in range(n):
        js = torch.nonzero(overlap[i]).flatten()
        js = js[js > i]
        if len(js):
            inter = (masks[i] & masks[js]).flatten(1).sum(1)
            union = (masks[i] | masks[js]).flatten(1).sum(1)
            iou[i, js] = inter / union
    iou = iou + iou.T
    iou.fill_diagonal_(1.0)
    return iou


def nms_microbenchmark(device: str, seed: int, copies: int = 6) -> None:
    """Time mask-IoU NMS on cell-like masks: ours (blocked matmul + fixed point) vs a row loop."""
    from cellseg1d.model.nms import greedy_nms, mask_boxes, mask_nms

    masks_np, scores_np = _duplicated_cells(seed, copies)
    masks = torch.from_numpy(masks_np).to(device)
    scores = torch.from_numpy(scores_np).float().to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        mask_nms(masks[:8], scores[:8], 0.05)  # warm-up
        sync()
        start = time.perf_counter()
        keep = mask_nms(masks, scores, 0.05)
        sync()
        ours = time.perf_counter() - start
        start = time.perf_counter()
        iou = _row_loop_iou(masks, mask_boxes(masks))
        keep_ref = greedy_nms(iou, scores, 0.05)
        sync()
        loop = time.perf_counter() - start
    same = sorted(keep.tolist()) == sorted(keep_ref.tolist())
    print(f"\nmask NMS alone ({masks.shape[0]} masks {IMAGE_SIDE}x{IMAGE_SIDE}: {masks.shape[0] // copies} cells x "
          f"{copies} jittered copies, threshold 0.05, {device}):")
    print(f"  ours (blocked matmul IoU + fixed-point greedy)  {ours:8.3f} s   kept {len(keep)}")
    print(f"  row loop over box-overlapping pairs             {loop:8.3f} s   kept {len(keep_ref)}   "
          f"same kept set: {same}")


# ----------------------------------------------------------------- driver


def _spawn(spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]}


def _print_result(name: str, r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"  {name:<24} FAILED: {r['error'][0]}")
        return
    memory = f"RSS peak {r['peak_rss_mb']:.0f} MB (model built: {r['base_rss_mb']:.0f})"
    if "cuda_peak_mb" in r:
        memory += f", CUDA peak {r['cuda_peak_mb']:.0f} MB"
    print(f"  {name:<24} {r['seconds']:8.2f} s   {memory}")
    if "stages" in r:
        stages = "  ".join(f"{k} {r['stages'].get(k, 0.0):.2f}" for k in STAGES)
        counts = "  ".join(f"{k} {r['counts'].get(k, 0)}" for k in COUNTS)
        print(f"  {'':<24} stages (s): {stages}")
        print(f"  {'':<24} masks: {counts}  -> {r['objects']} objects, AP50 vs truth {r['ap50']:.3f}")
    else:
        print(f"  {'':<24} masks: {r['objects']} records ({r['objects_under_10pct']} under 10% of the image)")
        if r.get("crashed"):
            print(f"  {'':<24} (no mask passed; segment-anything then fails in its final cross-crop NMS:")
            print(f"  {'':<24}  {r['crashed']!r}; the time covers all the per-crop work)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-type", default="vit_b")
    parser.add_argument("--checkpoint", default=None, help="official SAM checkpoint (.pth) of --model-type")
    parser.add_argument("--points-per-side", type=int, default=None, help="default: 32 on CUDA, 16 on CPU")
    parser.add_argument("--crop-n-layers", type=int, default=1, help="1 (paper): 5 crops; 0: whole image only")
    parser.add_argument("--modes", default="paper,lowered")
    parser.add_argument("--dtypes", default="auto", help="fp32,bf16,fp16 or auto (bf16 only where it is native); "
                        "the full GPU measurement is bench/gpu_check.sh")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--upsample-all", action="store_true",
                        help="also time our reference order (masks for every prompt, then filters)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--n-cells", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-nms", action="store_true", help="skip the mask NMS micro-benchmark")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    on_cuda = args.device.startswith("cuda")
    points = args.points_per_side or (32 if on_cuda else 16)
    if args.dtypes == "auto":
        dtypes = ["fp32", "bf16"] if _native_bf16(args.device) else ["fp32"]
    else:
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    print("CellSeg1 inference benchmark")
    device_name = torch.cuda.get_device_name(0) if on_cuda else f"CPU ({torch.backends.cpu.get_cpu_capability()})"
    print(f"  device {args.device}: {device_name}; torch {torch.__version__}; "
          f"torch.get_num_threads() = {args.threads} (os.cpu_count() = {os.cpu_count()})")
    print(f"  MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')} "
          f"MALLOC_TRIM_THRESHOLD_={os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')}")
    weights = args.checkpoint or f"random (seed {args.seed})"
    print(f"  model {args.model_type} at input {IMAGE_SIDE}, weights {weights}; image {IMAGE_SIDE}x{IMAGE_SIDE} "
          f"synthetic, {args.n_cells} cells requested")
    n_crops = sum(4**i for i in range(args.crop_n_layers + 1))
    print(f"  grid {points}x{points} points per crop, crop_n_layers {args.crop_n_layers} "
          f"({n_crops} crops: {n_crops * points * points} prompts), "
          f"batch 64" + ("" if points == 32 else "  [paper grid: --points-per-side 32]"))
    if "bf16" not in dtypes and args.dtypes == "auto":
        print("  bf16 autocast skipped: not native here (emulated bf16 measured ~8-10x slower); "
              "--dtypes fp32,bf16 runs it anyway")
    if not args.checkpoint:
        print("  note: random weights give IoU-head scores < 0.8, so in 'paper' mode no mask passes and the")
        print("        pipelines skip most work; 'lowered' disables the score/area filters for a comparable load")

    if not args.skip_nms:
        torch.set_num_threads(args.threads)
        nms_microbenchmark(args.device, args.seed)
        sys.stdout.flush()

    for mode in modes:
        print(f"\nmode {mode}: {MODES[mode]}")
        for dtype in dtypes:
            impls = ["ours"] + (["ours_upsample_all"] if args.upsample_all else [])
            impls += [] if args.skip_reference else ["reference"]
            for impl in impls:
                spec = dict(impl=impl, mode=mode, dtype=dtype, device=args.device, points_per_side=points,
                            model_type=args.model_type, checkpoint=args.checkpoint, seed=args.seed,
                            threads=args.threads, n_cells=args.n_cells, crop_n_layers=args.crop_n_layers)
                _print_result(f"{impl} {dtype}", _spawn(spec))
                sys.stdout.flush()


if __name__ == "__main__":
    main()
