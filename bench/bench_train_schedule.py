"""Benchmark the reference's training schedule and LoRA dropout against the corrected ones. Prints numbers.

Run::

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_train_schedule.py [--epochs 16] [--seeds 0] [--dice 1]

What runs
---------
The tiny SAM pretrained on synthetic bright cells (``cellseg1d/testing/data/tiny_sam_cells.safetensors``,
input 256) gets a LoRA adapter trained on ONE image of another style
(dark cells on a bright background: the base's point-prompt mIoU there is
~0.05), with the reference's recipe scaled to a CPU budget and four
variants of two settings:

* ``schedule``: "reference" (the one-cycle schedule built for
  ``epochs * (batches + 7) // 8`` steps, more than the
  ``epochs * ceil(batches / 8)`` taken, so the rate never anneals) or
  "annealed" (built for the steps taken);
* ``dropout_mode``: "output" (the reference: dropout 0.1 on the adapted
  projections' whole output, k included) or "input" (peft's: on the LoRA
  branch's input only).

Training data: a 128 x 384 image cut into 6 tiles of 128 px (cellpose's
positions), repeated twice: 12 items per epoch, batch 1, 8 accumulated,
so an epoch has 12 batches and 2 steps and the reference schedule is built
for ``epochs * 19 // 8`` steps: the same 19/16 ratio as the paper's
48 items x batch 4 (600 steps taken of 712 scheduled). Tiles are upscaled
2x to the model input by the augmentation, as the paper's 256 px tiles are
to 512. Everything else is the reference's default (AdamW 3e-3, weight
decay 0.01, warm-up 30 %, prompts, augmentation, loss), one torch thread,
except one addition: a soft Dice term (``--dice``, weight 1 by default, as
the tests' LoRA check uses). With the reference's loss alone, 32 steps
(16 epochs, ~1 min a variant) move this weak base nowhere (mIoU 0.01-0.06
for all four variants, measured), so nothing could be compared; ``--dice 0``
runs the pure recipe (give it many more epochs).

Scores, on 4 held-out images of the new style (128 x 128, shown at 256):

* point-prompt mIoU: one point per true cell (its distance maximum), one
  mask each (:func:`cellseg1d.model.train.point_prompt_score`);
* AP@0.5 of the automatic (grid) segmentation: 16 x 16 points, no crops.

This is a tiny model on synthetic cells with a short budget, one training
seed per variant unless ``--seeds``: differences of a few hundredths are
noise. It says nothing about vit_b/l/h on real images.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellseg1d.model.metrics import average_precision  # noqa: E402
from cellseg1d.model.data import to_uint8_rgb  # noqa: E402
from cellseg1d.model.inference import InferenceSettings, segment_image  # noqa: E402
from cellseg1d.model.lora import unwrap  # noqa: E402
from cellseg1d.model.sam import build_sam  # noqa: E402
from cellseg1d.model.prompt_score import point_prompt_score  # noqa: E402
from cellseg1d.model.train import TrainSettings, train_adapter, training_plan  # noqa: E402
from cellseg1d.testing.synthetic import make_cells  # noqa: E402

TINY_BASE = Path(__file__).resolve().parents[1] / "cellseg1d" / "testing" / "data" / "tiny_sam_cells.safetensors"
VARIANTS = [("reference", "output"), ("annealed", "output"), ("reference", "input"), ("annealed", "input")]


def load_base() -> torch.nn.Module:
    from safetensors.torch import load_file

    sam = build_sam("tiny", image_size=256)
    sam.load_state_dict({k: v.float() for k, v in load_file(str(TINY_BASE)).items()})
    return sam.eval()


def inverted(shape: tuple[int, int], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Dark cells on a bright background (the base saw only bright cells on dark)."""
    image, mask = make_cells(shape, n, radius=(8, 14), seed=seed)
    return (1.0 - image).astype(np.float32), mask


def scores(model: torch.nn.Module, images: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    inference = InferenceSettings(image_size=256, crop_n_layers=0, points_per_side=16)
    miou = float(np.mean([point_prompt_score(model, image, mask).miou for image, mask in images]))
    ap = float(np.mean([
        average_precision(segment_image(unwrap(model), to_uint8_rgb(image), inference, "cpu"), mask, 0.5)[0].ap
        for image, mask in images
    ]))
    return miou, ap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds per variant")
    parser.add_argument("--dice", type=float, default=1.0,
                        help="weight of the extra Dice term (0: the reference's loss alone)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train_image, train_mask = inverted((128, 384), 30, seed=3300)
    held_out = [inverted((128, 128), 40, seed=s) for s in (3200, 3201, 3202, 3203)]
    base_miou, base_ap = scores(load_base(), held_out)
    print(f"base (no adapter): point-prompt mIoU {base_miou:.3f}, grid AP@0.5 {base_ap:.3f}")
    print(f"{'schedule':<10} {'dropout':<7} {'seed':>4} {'steps':>5} {'sched.':>6} {'last lr':>9} "
          f"{'loss':>6} {'mIoU':>6} {'AP@0.5':>6} {'s':>5}")
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for schedule, dropout_mode in VARIANTS:
        for seed in args.seeds:
            settings = TrainSettings(
                image_size=256, tile=128, resize_to=(128, 384), min_items=7, epochs=args.epochs, batch_size=1,
                grad_accum=8, schedule=schedule, dropout_mode=dropout_mode, seed=seed, device="cpu",
                dice_weight=args.dice,
            )
            started = time.perf_counter()
            result = train_adapter(load_base(), train_image, train_mask, settings, progress=False)
            seconds = time.perf_counter() - started
            miou, ap = scores(result.model, held_out)
            results.setdefault((schedule, dropout_mode), []).append((miou, ap))
            plan = training_plan(result.n_items, settings)
            print(f"{schedule:<10} {dropout_mode:<7} {seed:>4} {result.steps:>5} {plan.scheduler_steps:>6} "
                  f"{result.extra['last_lr']:>9.2e} {np.mean(result.losses[-4:]):>6.3f} {miou:>6.3f} {ap:>6.3f} "
                  f"{seconds:>5.0f}", flush=True)
    if len(args.seeds) > 1:
        print("means over seeds:")
        for (schedule, dropout_mode), values in results.items():
            miou, ap = np.mean(values, axis=0)
            print(f"{schedule:<10} {dropout_mode:<7} mIoU {miou:.3f} AP@0.5 {ap:.3f}")


if __name__ == "__main__":
    main()
