"""Compare cellseg1d's inference with the CellSeg1 reference implementation, label image by label image.

Both run on the CPU with the SAME model object (the tiny SAM pretrained on
synthetic cells that the tests use, with a non-trivial random LoRA adapter,
or your checkpoint and adapter folder) and the same uint8 images and the
paper's settings. The reference's code is imported from a checkout you
provide; nothing of it is part of cellseg1d.

    git clone https://github.com/Nuisal/cellseg1 /tmp/cellseg1-ref
    pip install --target /tmp/refpkgs opencv-python-headless nibabel   # the reference's own imports
    PYTHONPATH=/tmp/refpkgs .venv/bin/python bench/compare_reference.py --reference /tmp/cellseg1-ref

Prints, per image: objects found by each, whether the label images are
identical, the differing pixels and AP@0.9 of cellseg1d's labels against the
reference's. The reference's mask NMS sorts scores with ``torch.argsort``
without ``stable=True``: on a CPU that orders equal scores arbitrarily (on
CUDA, torch's sort of more than 32 values is stable). ``--stable-ties`` (the
default) makes its sort stable, as cellseg1d's is; ``--no-stable-ties``
shows the effect of the arbitrary order (same objects, other label numbers).
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_BASE = ROOT / "cellseg1d" / "testing" / "data" / "tiny_sam_cells.safetensors"


def _import_reference(reference: Path, stable_ties: bool) -> types.SimpleNamespace:
    """The reference's mask generator and label helpers, imported from its checkout."""
    sys.path.insert(0, str(reference))
    import mask_nms  # the reference's module

    mask_nms.DEVICE = torch.device("cpu")
    if stable_ties:
        stable = types.SimpleNamespace(**{name: getattr(torch, name) for name in dir(torch) if not name.startswith("__")})
        stable.argsort = lambda x, descending=False: torch.argsort(x, descending=descending, stable=True)
        mask_nms.torch = stable
    from data.utils import keep_largest_connected_component, remap_mask_color
    from segment_anything import SamAutomaticMaskGeneratorOptMaskNMS

    return types.SimpleNamespace(generator=SamAutomaticMaskGeneratorOptMaskNMS,
                                 largest=keep_largest_connected_component, remap=remap_mask_color)


def _reference_labels(ref: types.SimpleNamespace, records: list[dict], shape: tuple[int, int]) -> np.ndarray:
    """The reference's label image from its mask records (its predict step: largest first, area cleared)."""
    if not records:
        return np.zeros(shape, dtype=np.uint32)
    labels = np.zeros(shape, dtype=np.int64)
    for rank, record in enumerate(sorted(records, key=lambda r: -r["area"]), start=1):
        labels[record["segmentation"]] = 0
        labels += rank * ref.largest(record["segmentation"])
    return ref.remap(labels).astype(np.uint32)


def _model(args: argparse.Namespace) -> tuple[torch.nn.Module, int]:
    from cellseg1d.model.lora import apply_lora, unwrap
    from cellseg1d.model.sam import build_sam

    if args.checkpoint is not None:
        from cellseg1d.model.adapters import load_adapter
        from cellseg1d.model.checkpoint import load_sam

        sam, info = load_sam(args.checkpoint, image_size=512, allow_custom=True)
        model = load_adapter(sam, args.adapter) if args.adapter else sam
        return unwrap(model).eval(), info.image_size
    from safetensors.torch import load_file

    sam = build_sam("tiny", image_size=256)
    sam.load_state_dict({k: v.float() for k, v in load_file(str(TINY_BASE)).items()})
    torch.manual_seed(0)
    model = apply_lora(sam, rank=4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)  # a non-trivial adapter
    return unwrap(model).eval(), 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="a checkout of the CellSeg1 reference")
    parser.add_argument("--checkpoint", type=Path, help="a SAM checkpoint (default: the tests' tiny base)")
    parser.add_argument("--adapter", type=Path, help="a cellseg1d adapter folder for --checkpoint")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--stable-ties", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ref = _import_reference(args.reference, args.stable_ties)
    from cellseg1d.model.metrics import average_precision
    from cellseg1d.model.inference import InferenceSettings, segment_image
    from cellseg1d.testing.synthetic import make_cells

    model, size = _model(args)
    for seed, shape, layers in [(1, (384, 384), 1), (2, (300, 420), 1), (3, (256, 256), 0), (4, (512, 512), 1)]:
        image, _ = make_cells(shape, 60, radius=(6, 14), seed=seed)
        rgb = np.repeat((np.clip(image, 0, 1) * 255).astype(np.uint8)[:, :, None], 3, axis=2)
        generator = ref.generator(
            model=model, points_per_side=args.points_per_side, points_per_batch=64, crop_n_layers=layers,
            crop_n_points_downscale_factor=1, box_nms_thresh=0.05, crop_nms_thresh=0.05, pred_iou_thresh=0.8,
            min_mask_region_area=20, max_mask_region_area_ratio=0.1, stability_score_thresh=0.6,
            stability_score_offset=0.8)
        started = time.perf_counter()
        with torch.no_grad():
            theirs = _reference_labels(ref, generator.generate(rgb), shape)
        middle = time.perf_counter()
        ours = segment_image(model, rgb, InferenceSettings(image_size=size, points_per_side=args.points_per_side,
                                                           crop_n_layers=layers))
        done = time.perf_counter()
        ap = average_precision(ours, theirs, 0.9)[0].ap if theirs.max() else float("nan")
        print(f"{shape[0]}x{shape[1]} crop layers {layers}: reference {int(theirs.max())} objects, cellseg1d "
              f"{int(ours.max())}; identical {np.array_equal(theirs, ours)}, {int((theirs != ours).sum())} pixels "
              f"differ, AP@0.9 {ap:.4f}; reference {middle - started:.1f} s, cellseg1d {done - middle:.1f} s")


if __name__ == "__main__":
    main()
