"""Accuracy and work of the approximate inference options, on a model that really segments cells.

Prints, per inference profile, AP at IoU 0.5 and 0.75 (mean over images),
prompts decoded, masks accepted and seconds; asserts nothing. Run::

    .venv/bin/python bench/bench_accuracy.py [--images 8] [--threads 1]

The model is the tiny SAM pretrained on synthetic cells that the tests use
(``cellseg1d/testing/data/tiny_sam_cells.safetensors``, built by
``scripts/make_tiny_base.py``; input 256). Images: held-out synthetic
128 x 128 fields of bright cells (radius 8-14 px, ``--cells`` requested),
the scale the model was trained at. No official SAM weights can be used here;
with a real checkpoint pass ``--checkpoint`` and ``--model-type`` (input 512)
and images of your own with ``--images-dir`` (pairs ``NAME.png`` /
``NAME_mask.png``, or TIFF).

Profiles (each a set of :class:`cellseg1d.model.inference.InferenceSettings`
overrides on the paper defaults):

* ``paper``: 32 x 32 grid, crop layer 1 (5 crops): the reference;
* ``paper+skip``: the same, points inside accepted masks skipped (coarse to fine);
* ``no-crops``: 32 x 32 grid on the whole image only (1 embedding instead of 5);
* ``no-crops+skip``;
* ``grid16`` / ``grid16+skip``: 16 x 16 grid, crop layer 1;
* ``fast``: 16 x 16 grid, no crops, skipping.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cellseg1d.model.metrics import average_precision  # noqa: E402
from cellseg1d.model.inference import InferenceReport, InferenceSettings, segment_image  # noqa: E402
from cellseg1d.testing.synthetic import make_cells  # noqa: E402

TINY_BASE = ROOT / "cellseg1d" / "testing" / "data" / "tiny_sam_cells.safetensors"

PROFILES: dict[str, dict] = {
    "paper": {},
    "paper+skip": {"skip_covered_points": True},
    "no-crops": {"crop_n_layers": 0},
    "no-crops+skip": {"crop_n_layers": 0, "skip_covered_points": True},
    "grid16": {"points_per_side": 16},
    "grid16+skip": {"points_per_side": 16, "skip_covered_points": True},
    "fast": {"points_per_side": 16, "crop_n_layers": 0, "skip_covered_points": True},
}


def tiny_model() -> torch.nn.Module:
    from safetensors.torch import load_file

    from cellseg1d.model.sam import build_sam

    model = build_sam("tiny", image_size=256)
    model.load_state_dict({k: v.float() for k, v in load_file(str(TINY_BASE)).items()})
    return model.eval()


def synthetic_images(n: int, n_cells: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    out = []
    for seed in range(5000, 5000 + n):
        image, truth = make_cells((128, 128), n_cells, radius=(8, 14), seed=seed)
        gray = (np.clip(image, 0, 1) * 255).astype(np.uint8)
        out.append((f"synthetic-{seed}", np.repeat(gray[:, :, None], 3, axis=2), truth))
    return out


def folder_images(folder: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    from cellseg1d.ngff.imageio import read_image, read_labels
    from cellseg1d.model.data import to_uint8_rgb

    out = []
    for mask_path in sorted(folder.glob("*_mask.*")):
        stem = mask_path.name.split("_mask.")[0]
        matches = [p for p in folder.glob(f"{stem}.*") if p != mask_path]
        if not matches:
            continue
        out.append((stem, to_uint8_rgb(read_image(matches[0])), read_labels(mask_path)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--cells", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profiles", default=",".join(PROFILES))
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--model-type", default="vit_b")
    parser.add_argument("--images-dir", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.checkpoint:
        from cellseg1d.model.checkpoint import load_sam

        sam, _ = load_sam(args.checkpoint, args.model_type, 512)
        sam.eval()
        image_size = 512
    else:
        sam, image_size = tiny_model(), 256
    images = folder_images(args.images_dir) if args.images_dir else synthetic_images(args.images, args.cells)
    print(f"model: {args.checkpoint or TINY_BASE.name} (input {image_size}); {len(images)} images; "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'profile':<15} {'AP50':>6} {'AP75':>6} {'decoded':>8} {'of':>6} {'accepted':>9} {'s/img':>7}")
    for name in args.profiles.split(","):
        settings = InferenceSettings(image_size=image_size, **PROFILES[name])
        ap50, ap75, decoded, prompts, accepted, seconds = [], [], 0, 0, 0, 0.0
        for _, rgb, truth in images:
            report = InferenceReport()
            start = time.perf_counter()
            labels = segment_image(sam, rgb, settings, report=report)
            seconds += time.perf_counter() - start
            ap = average_precision(labels, truth, (0.5, 0.75))
            ap50.append(ap[0].ap)
            ap75.append(ap[1].ap)
            decoded += report.counts.get("decoded", 0)
            prompts += report.counts.get("prompts", 0)
            accepted += report.counts.get("filters", 0)
        n = len(images)
        print(f"{name:<15} {np.mean(ap50):6.3f} {np.mean(ap75):6.3f} {decoded / n:8.0f} {prompts / n:6.0f} "
              f"{accepted / n:9.0f} {seconds / n:7.2f}", flush=True)


if __name__ == "__main__":
    main()
