"""The SAM path on a CUDA GPU: speed per backbone and precision, agreement, training, daemon. Prints numbers only.

Run (``bench/gpu_check.sh OUT_DIR`` runs it with the CUDA tests)::

    .venv/bin/python bench/bench_gpu.py --out OUT_DIR [--models vit_b,vit_l,vit_h] [--dtypes fp32,bf16,fp16]
        [--batches 64,256,1024] [--checkpoint-dir DIR] [--skip-daemon]

Writes ``OUT_DIR/bench_gpu.json`` (every figure) and prints a summary.

1. Speed: SAM of each backbone with random weights (seeded) at input 512
   segments one synthetic 512 x 512 cell image at the paper profile
   (32 x 32 points, crop layer 1: 5 crops, 5120 prompts) in each precision
   (autocast dtype for encoder and decoder) and prompt batch
   (``points_per_batch``; results do not depend on it). One warm-up run, then
   ``--repeats`` timed runs: wall time per image (median, CUDA synchronised,
   no per-stage synchronisation) and, in a separate run with an
   ``InferenceReport``, the split: encoder (embed), decoder (transformer + IoU
   head), masks (mask logits + upsampling + filters), NMS, post-processing.
   Random weights pass no mask at the paper's thresholds, so a "lowered"
   run (every filter off: 5120 masks decoded, upsampled and de-duplicated)
   shows the mask and NMS stages for vit_b. Peak memory:
   ``torch.cuda.max_memory_allocated``.
2. Agreement of each lower precision with fp32: AP@0.9 of its labels against
   fp32's labels, on the tests' tiny SAM pretrained on synthetic cells
   (cellseg1d/testing/data, input 256, paper profile, 4 images) and, with
   ``--checkpoint-dir`` holding official checkpoints (``sam_vit_b_01ec64.pth``
   ...), on each backbone with real weights.
3. Training: ``bench/bench_train_speed.py``'s measurement on CUDA (vit_b,
   paper settings, float32 and bf16 autocast): optimiser steps per second,
   peak memory.
4. Daemon: the pipeline a daemon worker runs (``Pipeline.run``, built-in SAM
   plugin, ``sam.device = "cuda"``) on synthetic 512 x 512 OME-Zarr images:
   images per second at profiles paper and fast; adapter switch time on the
   GPU model (``AdapterCache.activate``: cached, and loaded from disk).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OFFICIAL = {"vit_b": "sam_vit_b_01ec64.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_h": "sam_vit_h_4b8939.pth"}
LOWERED = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, max_area_fraction=1.0)


#: "cuda"; "cpu" only to try this script out on a machine without a GPU (``--dry-run-on-cpu``).
DEVICE = "cuda"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _peak_reset() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_mb() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if DEVICE == "cuda" else float("nan")


def _empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _image(side: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from cellseg1d.testing.synthetic import make_cells

    image, truth = make_cells((side, side), 80 if side >= 512 else 50, radius=(8, 16), seed=seed)
    gray = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2), truth


def _model(model_type: str, checkpoint: Path | None = None):
    from cellseg1d.model.sam import build_sam, get_spec, resize_state_dict

    torch.manual_seed(0)
    sam = build_sam(model_type, 512)
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        sam.load_state_dict(resize_state_dict(state, get_spec(model_type), 512))
    return sam.to(DEVICE).eval()


def _time_image(sam, rgb, settings, dtype, repeats: int) -> dict[str, Any]:
    from cellseg1d.model.inference import InferenceReport, segment_image

    segment_image(sam, rgb, settings, autocast=dtype)  # warm-up: kernels, cuBLAS/cuDNN selection
    _sync()
    _peak_reset()
    walls = []
    labels = None
    for _ in range(repeats):
        start = time.perf_counter()
        labels = segment_image(sam, rgb, settings, autocast=dtype)
        _sync()
        walls.append(time.perf_counter() - start)
    report = InferenceReport()
    segment_image(sam, rgb, settings, autocast=dtype, report=report)
    s = report.seconds
    split = {"encoder": s.get("embed", 0.0), "decoder": s.get("decode", 0.0),
             "masks": s.get("mask_decode", 0.0) + s.get("filter", 0.0), "nms": s.get("nms", 0.0),
             "postprocess": s.get("postprocess", 0.0)}
    return {"ms_per_image": statistics.median(walls) * 1e3, "ms_runs": [w * 1e3 for w in walls],
            "split_ms": {k: v * 1e3 for k, v in split.items()}, "counts": report.counts,
            "objects": int(labels.max()), "cuda_peak_mb": _peak_mb()}, labels


def _ap90(a: np.ndarray, b: np.ndarray) -> float | None:
    from cellseg1d.model.metrics import average_precision

    if a.max() == 0 and b.max() == 0:
        return None
    return float(average_precision(a, b, 0.9)[0].ap)


def speed(args, results: dict[str, Any]) -> None:
    from cellseg1d.model.inference import InferenceSettings

    rgb, _ = _image()
    dtypes = [d for d in args.dtypes.split(",") if d]
    batches = [int(b) for b in args.batches.split(",") if b]
    for model_type in [m for m in args.models.split(",") if m]:
        sam = _model(model_type)
        for dtype_name in dtypes:
            for batch in batches if model_type == "vit_b" else batches[-1:]:
                key = f"{model_type}/{dtype_name}/batch{batch}"
                try:
                    r, _ = _time_image(sam, rgb, InferenceSettings(points_per_batch=batch), DTYPES[dtype_name],
                                       args.repeats)
                except Exception as exc:  # noqa: BLE001 - record and go on
                    r = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                results["speed"][key] = r
                _print_speed(key, r)
        if model_type == "vit_b" and not args.skip_lowered:
            for dtype_name in dtypes:
                key = f"vit_b/{dtype_name}/batch{batches[-1]}/lowered"
                try:
                    r, _ = _time_image(sam, rgb, InferenceSettings(points_per_batch=batches[-1], **LOWERED),
                                       DTYPES[dtype_name], 1)
                except Exception as exc:  # noqa: BLE001
                    r = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                results["speed"][key] = r
                _print_speed(key, r)
        del sam
        _empty_cache()


def _print_speed(key: str, r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"  {key:<34} FAILED {r['error']}", flush=True)
        return
    split = "  ".join(f"{k} {v:.1f}" for k, v in r["split_ms"].items())
    print(f"  {key:<34} {r['ms_per_image']:8.1f} ms/image   split (ms): {split}   objects {r['objects']}   "
          f"peak {r['cuda_peak_mb']:.0f} MB", flush=True)


def agreement(args, results: dict[str, Any]) -> None:
    """AP@0.9 of each lower precision's labels against fp32's."""
    from safetensors.torch import load_file

    from cellseg1d.model.inference import InferenceSettings, segment_image
    from cellseg1d.model.sam import build_sam

    tiny_base = REPO / "cellseg1d" / "testing" / "data" / "tiny_sam_cells.safetensors"
    models: list[tuple[str, Any, int]] = []
    if tiny_base.is_file():
        sam = build_sam("tiny", 256)
        sam.load_state_dict({k: v.float() for k, v in load_file(str(tiny_base)).items()})
        models.append(("tiny pretrained base", sam.to(DEVICE).eval(), 256))
    if args.checkpoint_dir:
        for model_type, name in OFFICIAL.items():
            path = Path(args.checkpoint_dir) / name
            if path.is_file():
                models.append((f"{model_type} official", _model(model_type, path), 512))
    for name, sam, size in models:
        settings = InferenceSettings(image_size=size)
        images = [_image(side, seed)[0] for side, seed in ((256, 1), (256, 2), (200, 3), (160, 4))] if size == 256 \
            else [_image(512, seed)[0] for seed in (1, 2)]
        with torch.inference_mode():
            full = [segment_image(sam, rgb, settings) for rgb in images]
            for dtype_name in [d for d in args.dtypes.split(",") if d and d != "fp32"]:
                aps = [_ap90(segment_image(sam, rgb, settings, autocast=DTYPES[dtype_name]), ref)
                       for rgb, ref in zip(images, full)]
                key = f"{name}/{dtype_name}"
                valid = [a for a in aps if a is not None]
                results["agreement_ap90_vs_fp32"][key] = {"per_image": aps, "mean": float(np.mean(valid))
                                                          if valid else None,
                                                          "objects_fp32": [int(f.max()) for f in full]}
                print(f"  {key:<34} AP@0.9 vs fp32: {results['agreement_ap90_vs_fp32'][key]['mean']}  "
                      f"(per image {aps})", flush=True)
        del sam
        _empty_cache()


def training(args, results: dict[str, Any]) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    from bench_train_speed import run

    for mixed in (False, True):
        key = f"{args.train_model}/{'bf16' if mixed else 'fp32'}"
        try:
            r = run(args.train_model, DEVICE, args.train_steps, mixed, 4, 8)
        except Exception as exc:  # noqa: BLE001
            r = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        results["training"][key] = r
        if "error" in r:
            print(f"  {key:<12} FAILED {r['error']}", flush=True)
        else:
            print(f"  {key:<12} {r['steps_per_second']:.3f} steps/s ({r['seconds_per_step']:.2f} s/step, "
                  f"{r['minutes_per_epoch']:.2f} min/epoch, 300 epochs {r['hours_300_epochs']:.2f} h), "
                  f"peak {r.get('cuda_peak_mb', float('nan')):.0f} MB", flush=True)
        _empty_cache()


def daemon(args, results: dict[str, Any]) -> None:
    """Images per second through the pipeline with SAM on the GPU, and adapter switch times."""
    from cellseg1d.builtin import sam as sam_plugin
    from cellseg1d.config import build_config
    from cellseg1d.model.adapters import AdapterCache, AdapterMetadata, save_adapter
    from cellseg1d.model.lora import apply_lora
    from cellseg1d.model.sam import build_sam
    from cellseg1d.pipeline import Pipeline
    from cellseg1d.plugins import build_plugin_manager
    from cellseg1d.testing.synthetic import make_czyx, write_ome_zarr

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        torch.manual_seed(0)
        checkpoint = tmp / f"{args.daemon_model}_random.pth"
        torch.save(build_sam(args.daemon_model, 1024).state_dict(), checkpoint)
        acquisition = tmp / "acq"
        acquisition.mkdir()
        images = []
        for index in range(args.daemon_images):
            data, _ = make_czyx((512, 512), 60, seed=index)
            path = acquisition / f"img{index}.zarr"
            write_ome_zarr(path, data[0, :1, 0], axes="yx" if data[0, :1, 0].ndim == 2 else "cyx")
            images.append(path)
        for profile in ("paper", "fast"):
            config = build_config({
                "state_dir": str(tmp / f"state-{profile}"),
                "watch": {"roots": [{"path": str(acquisition)}]},
                "sam": {"checkpoint": str(checkpoint), "allow_custom_checkpoint": True, "device": DEVICE,
                        "profile": profile, **({"points_per_side": 8, "crop_n_layers": 0} if args.quick else {})},
            })
            sam_plugin.HOLDER.reset()
            pm = build_plugin_manager()
            pm.hook.configure(config=config)
            pipeline = Pipeline(config, pm)
            pipeline.run(images[0], config.watch.roots[0], images[0])  # warm-up
            _sync()
            start = time.perf_counter()
            for path in images[1:]:
                pipeline.run(path, config.watch.roots[0], path)
            _sync()
            seconds = time.perf_counter() - start
            r = {"images": len(images) - 1, "seconds": seconds, "images_per_second": (len(images) - 1) / seconds}
            results["daemon"][f"pipeline/{profile}"] = r
            print(f"  pipeline, {args.daemon_model} random, profile {profile:<6} {r['images_per_second']:.2f} images/s "
                  f"({r['images']} images of 512 x 512, {seconds:.2f} s)", flush=True)
        sam_plugin.HOLDER.reset()

        torch.manual_seed(0)
        state = build_sam(args.daemon_model, 512).state_dict()
        dirs = []
        for seed in (1, 2):
            model = build_sam(args.daemon_model, 512)
            model.load_state_dict(state)
            model = apply_lora(model)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_" in name:
                        p.normal_(0, 0.02, generator=torch.Generator().manual_seed(seed))
            dirs.append(save_adapter(model, tmp / f"a{seed}", AdapterMetadata(f"a{seed}", args.daemon_model, "b" * 64)))
        for capacity in (1, 2):
            base = build_sam(args.daemon_model, 512)
            base.load_state_dict(state)
            cache = AdapterCache(base.to(DEVICE), capacity=capacity)
            times = []
            for index in range(8):
                start = time.perf_counter()
                loads = cache.loads
                cache.activate(dirs[index % 2])
                if cache.loads != loads:
                    cache.model.to(DEVICE)  # as the plugin does after a load
                _sync()
                times.append(time.perf_counter() - start)
            key = "adapter_switch/" + ("from_disk" if capacity == 1 else "cached")
            results["daemon"][key] = {"median_ms": statistics.median(times[2:]) * 1e3, "ms": [t * 1e3 for t in times]}
            print(f"  adapter switch on the GPU, {key.split('/')[1]:<9} median "
                  f"{results['daemon'][key]['median_ms']:.1f} ms", flush=True)
            del cache, base
            _empty_cache()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default="vit_b,vit_l,vit_h")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16")
    parser.add_argument("--batches", default="64,256,1024",
                        help="points_per_batch values (all for vit_b, the last for the others)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--daemon-images", type=int, default=6)
    parser.add_argument("--sections", default="speed,agreement,training,daemon")
    parser.add_argument("--skip-lowered", action="store_true", help="no 'lowered' (every mask decoded) vit_b run")
    parser.add_argument("--train-model", default="vit_b")
    parser.add_argument("--daemon-model", default="vit_b")
    parser.add_argument("--quick", action="store_true", help="daemon section: 8 x 8 points, no crops")
    parser.add_argument("--dry-run-on-cpu", action="store_true", help="try the script out without a GPU")
    args = parser.parse_args(argv)
    global DEVICE
    if args.dry_run_on_cpu:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        sys.exit("bench_gpu.py: no CUDA device available")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "none (dry run on the CPU)",
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "speed": {}, "agreement_ap90_vs_fp32": {}, "training": {}, "daemon": {}, "errors": {},
    }
    print(f"GPU benchmark on {results['gpu']} (torch {results['torch']}, CUDA {results['cuda']})", flush=True)
    sections = {"speed": speed, "agreement": agreement, "training": training, "daemon": daemon}
    for name in [s for s in args.sections.split(",") if s]:
        print(f"\n{name}", flush=True)
        started = time.perf_counter()
        try:
            sections[name](args, results)
        except Exception:  # noqa: BLE001 - keep every other section's numbers
            results["errors"][name] = traceback.format_exc()[-3000:]
            print(results["errors"][name], flush=True)
        results.setdefault("section_seconds", {})[name] = time.perf_counter() - started
        (out / "bench_gpu.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\nwritten: {out / 'bench_gpu.json'}")


if __name__ == "__main__":
    main()
