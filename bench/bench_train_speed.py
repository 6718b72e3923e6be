"""Speed of one-image CellSeg1 training: optimiser steps per second at the paper's settings. Prints numbers only.

Run::

    .venv/bin/python bench/bench_train_speed.py [--model-type vit_b] [--device cpu|cuda] [--steps 1]
        [--mixed-precision] [--batch-size 4] [--grad-accum 8] [--image 512] [--json OUT.json]

A SAM of ``--model-type`` with random weights (no official checkpoint is needed
for timing) at input 512 gets a CellSeg1 LoRA adapter trained by
``cellseg1d.model.train.train_adapter`` on one synthetic 512 x 512 image with
80 cells, paper settings (``TrainSettings()``: batch 4, 8 batches accumulated
per optimiser step, up to 30 prompts per item, augmentation on), for
``--steps`` optimiser steps. Printed: seconds per step (the first step
separately: it includes the one-time set-up), steps per second, items per
second, minutes per epoch (the paper's epoch: 48 items of one 512 x 512
image, 12 batches, 2 optimiser steps), hours for the paper's 300 epochs, and
peak memory (``ru_maxrss``, or ``torch.cuda.max_memory_allocated`` on a GPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def run(model_type: str, device: str, steps: int, mixed_precision: bool, batch_size: int, grad_accum: int,
        image_side: int = 512, seed: int = 0) -> dict:
    """Train ``steps`` optimiser steps; returns the measured figures."""
    from cellseg1d.model.sam import build_sam
    from cellseg1d.model.train import train_adapter, training_plan
    from cellseg1d.model.train_settings import TrainSettings
    from cellseg1d.testing.synthetic import make_cells

    torch.manual_seed(seed)
    sam = build_sam(model_type, image_size=512)
    image, truth = make_cells((image_side, image_side), 80, radius=(8, 16), seed=seed)
    settings = TrainSettings(device=device, max_steps=steps, mixed_precision=mixed_precision, batch_size=batch_size,
                             grad_accum=grad_accum)
    stamps: list[float] = []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def on_step(info) -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    start = time.perf_counter()
    result = train_adapter(sam, (np.clip(image, 0, 1) * 65535).astype(np.uint16), truth, settings, progress=False,
                           on_step=on_step)
    first = stamps[0] - start
    later = np.diff(stamps) if len(stamps) > 1 else np.array([first])
    per_step = float(np.mean(later))
    plan = training_plan(result.n_items, settings)
    out = {
        "model_type": model_type, "device": device, "threads": torch.get_num_threads(),
        "mixed_precision": mixed_precision, "batch_size": batch_size, "grad_accum": grad_accum,
        "steps": len(stamps), "items": result.n_items, "first_step_s": first, "seconds_per_step": per_step,
        "steps_per_second": 1.0 / per_step, "items_per_second": batch_size * grad_accum / per_step,
        "steps_per_epoch": plan.steps_per_epoch,
        "minutes_per_epoch": per_step * plan.batches_per_epoch / grad_accum / 60.0,
        "hours_300_epochs": per_step * plan.batches_per_epoch / grad_accum * 300 / 3600.0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    if device.startswith("cuda"):
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-type", default="vit_b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--mixed-precision", action="store_true")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    r = run(args.model_type, args.device, args.steps, args.mixed_precision, args.batch_size, args.grad_accum)
    print(f"training speed, {r['model_type']} at input 512, random weights, {r['device']} "
          f"({r['threads']} threads), {'bf16 autocast' if r['mixed_precision'] else 'float32'}, "
          f"batch {r['batch_size']} x {r['grad_accum']} accumulated, {r['items']} items per epoch")
    print(f"  first step {r['first_step_s']:.1f} s (set-up included); {r['seconds_per_step']:.1f} s per step = "
          f"{r['steps_per_second']:.4f} steps/s, {r['items_per_second']:.2f} items/s")
    print(f"  {r['minutes_per_epoch']:.1f} min per epoch ({r['steps_per_epoch']} steps); paper's 300 epochs: "
          f"{r['hours_300_epochs']:.1f} h")
    memory = f"  peak RSS {r['peak_rss_mb']:.0f} MB"
    if "cuda_peak_mb" in r:
        memory += f", CUDA peak {r['cuda_peak_mb']:.0f} MB ({r['gpu']})"
    print(memory)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
