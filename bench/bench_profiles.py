"""Time and agreement of each named profile (``sam.profile``) and candidate approximation. Prints numbers only.

Run::

    .venv/bin/python bench/bench_profiles.py [--threads N] [--images 4] [--variants paper,fast,quick,...]
        [--vit-b] [--device cpu|cuda]

Agreement: the tests' tiny SAM pretrained on synthetic cells (cellseg1d/testing/data,
input 256) segments ``--images`` synthetic images (256 x 256, 60-80 cells)
at each variant; printed are AP@0.9 of its labels against the ``paper``
profile's labels (1.0: the same objects with IoU >= 0.9), AP@0.5 against the
synthetic truth, objects and seconds per image. ``--vit-b``: also seconds per
512 x 512 image of vit_b with random weights at each variant (random weights
pass no mask at the paper thresholds: the time is encoder + decoder, the
whole cost of a random model).

Variants: the profiles of ``cellseg1d.model.profiles`` and candidates that
are not profiles: ``enc-bf16`` (bf16 encoder only), ``all-bf16`` (encoder and
decoder), ``enc-int8`` / ``all-int8`` (int8 dynamic quantization of the
Linear layers, ``torch.ao.quantization.quantize_dynamic``), ``grid16``
(16 x 16 points, crop layer 1), ``crops0`` (32 x 32, no crop layer).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cellseg1d.model.inference import InferenceSettings, segment_image  # noqa: E402
from cellseg1d.model.metrics import average_precision  # noqa: E402
from cellseg1d.model.profiles import PROFILES  # noqa: E402

CANDIDATES = {
    "enc-bf16": ({"encoder_precision": "bf16"}, None),
    "all-bf16": ({"encoder_precision": "bf16", "decoder_precision": "bf16"}, None),
    "enc-int8": ({}, "encoder"),
    "all-int8": ({}, "all"),
    "grid16": ({"points_per_side": 16}, None),
    "crops0": ({"crop_n_layers": 0}, None),
}


def _quantized(sam, which: str):
    """A copy of ``sam`` with the Linear layers of the encoder (or every Linear) quantized to int8, dynamically."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = copy.deepcopy(sam)
        target = model.image_encoder if which == "encoder" else model
        quantized = torch.ao.quantization.quantize_dynamic(target, {torch.nn.Linear}, dtype=torch.qint8)
        if which == "encoder":
            model.image_encoder = quantized
            return model
        return quantized


def variant(name: str, image_size: int) -> tuple[InferenceSettings, str | None]:
    """The settings of a profile or candidate at ``image_size``, and which layers to quantize (or None)."""
    base = InferenceSettings(image_size=image_size)
    if name in PROFILES:
        return replace(base, **PROFILES[name].settings), None
    values, quantize = CANDIDATES[name]
    return replace(base, **values), quantize


def _cells(side: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from cellseg1d.testing.synthetic import make_cells

    image, truth = make_cells((side, side), n, radius=(8, 14), seed=seed)
    gray = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2), truth


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--variants", default="paper,fast,quick,enc-bf16,all-bf16,enc-int8,all-int8,grid16,crops0")
    parser.add_argument("--vit-b", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from safetensors.torch import load_file

    from cellseg1d.model.sam import build_sam

    names = [v for v in args.variants.split(",") if v]
    tiny = build_sam("tiny", 256)
    state = load_file(str(REPO / "cellseg1d" / "testing" / "data" / "tiny_sam_cells.safetensors"))
    tiny.load_state_dict({k: v.float() for k, v in state.items()})
    tiny = tiny.to(args.device).eval()
    images = [_cells(256, 60 + 10 * (i % 3), seed=7000 + i) for i in range(args.images)]
    print(f"profiles on {args.device} ({torch.get_num_threads()} threads): tiny pretrained base, {args.images} "
          f"synthetic 256 x 256 images")
    paper_labels = None
    print(f"  {'variant':<10} {'AP@0.9 vs paper':>16} {'AP@0.5 vs truth':>16} {'objects':>8} {'s/image':>8}")
    for name in ["paper"] + [n for n in names if n != "paper"]:
        settings, quantize = variant(name, 256)
        model = _quantized(tiny, quantize) if quantize else tiny
        labels, seconds = [], []
        for rgb, _ in images:
            start = time.perf_counter()
            labels.append(segment_image(model, rgb, settings))
            seconds.append(time.perf_counter() - start)
        if paper_labels is None:
            paper_labels = labels
        agree = np.mean([average_precision(a, b, 0.9)[0].ap for a, b in zip(labels, paper_labels)])
        truth_ap = np.mean([average_precision(a, t, 0.5)[0].ap for a, (_, t) in zip(labels, images)])
        objects = np.mean([a.max() for a in labels])
        print(f"  {name:<10} {agree:16.3f} {truth_ap:16.3f} {objects:8.1f} {np.mean(seconds):8.2f}", flush=True)

    if args.vit_b:
        torch.manual_seed(0)
        sam = build_sam("vit_b", 512).to(args.device).eval()
        rgb, _ = _cells(512, 80, seed=0)
        print("\nvit_b at input 512, random weights, one 512 x 512 image (encoder + decoder)")
        for name in names:
            settings, quantize = variant(name, 512)
            model = _quantized(sam, quantize) if quantize else sam
            start = time.perf_counter()
            segment_image(model, rgb, settings)
            print(f"  {name:<10} {time.perf_counter() - start:8.1f} s", flush=True)


if __name__ == "__main__":
    main()
