"""``cellseg1d train IMAGE --mask MASK --out ADAPTER``: one-image LoRA training (CellSeg1).

With ``--experiment X`` the adapter is registered in the daemon's adapter
registry as the next version (named ``--name``, default X) and, with
``--assign``, assigned to experiment X in the same step; ``--out`` is then
optional. The base checkpoint must be the daemon's (``sam.checkpoint``).

The mask is found by name, never by order: ``--mask`` may be the label file
itself, or a folder holding ``<image stem>.*`` (or ``<stem>_mask``,
``_masks``, ``_labels``, ``_label``); ``--labels-name`` takes it from the
image's own OME-Zarr ``labels`` group instead.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from cellseg1d import __version__
from cellseg1d.errors import ConfigError, ImageError
from cellseg1d.ngff.imageio import read_image, read_labels

MASK_SUFFIXES = ("", "_mask", "_masks", "_labels", "_label")
LABEL_FILE_TYPES = (".tif", ".tiff", ".png", ".npy", ".zarr")


def image_stem(path: Path) -> str:
    name = path.name
    for ending in (".ome.zarr", ".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ending):
            return name[: -len(ending)]
    return path.stem


def find_mask(image: Path, mask: Path | None, labels_name: str | None) -> tuple[Path, str | None]:
    """The mask file for ``image`` (matched by name when ``mask`` is a folder)."""
    if labels_name:
        return image, labels_name
    if mask is None:
        raise ConfigError("give the training mask: --mask FILE_OR_FOLDER or --labels-name NAME")
    if mask.is_dir() and mask.suffix.lower() != ".zarr":
        stem = image_stem(image)
        for suffix in MASK_SUFFIXES:
            for candidate in sorted(mask.iterdir()):
                if image_stem(candidate) == stem + suffix and candidate.suffix.lower() in LABEL_FILE_TYPES:
                    return candidate, None
        raise ImageError(
            f"no mask for {image.name} in {mask}: expected a file named {stem}.tif (or .png/.npy, "
            f"optionally with _mask/_labels before the extension)"
        )
    return mask, None


def fingerprint_array(data: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()[:32]


def train_command(args: argparse.Namespace, config: Any = None) -> int:
    """Run ``cellseg1d train``; ``config`` (the daemon's) is needed with ``--experiment``."""
    from cellseg1d.model.adapters import AdapterMetadata, save_adapter
    from cellseg1d.model.checkpoint import load_sam
    from cellseg1d.model.train import TrainSettings, train_adapter

    console = Console()
    experiment = getattr(args, "experiment", None)
    if args.out is None and not experiment:
        raise ConfigError("give --out FOLDER for the adapter, or --experiment NAME to register it")
    if getattr(args, "assign", False) and not experiment:
        raise ConfigError("--assign needs --experiment NAME")
    image_path = Path(args.image)
    mask_path, labels_name = find_mask(image_path, args.mask, args.labels_name)
    channels = [int(c) if str(c).isdigit() else c for c in args.channel]
    image = read_image(image_path, channels)
    mask = read_labels(mask_path, labels_name)
    if mask.shape != image.shape[1:]:
        raise ImageError(
            f"the mask {mask_path} has shape {mask.shape} but the image {image_path} is {image.shape[1:]}; "
            "they must be the same size"
        )
    registry = None
    if experiment:
        from cellseg1d.cli.adapters import open_registry
        from cellseg1d.routing.registry import check_name

        check_name(args.name or experiment)
        registry = open_registry(config)
    out = Path(args.out) if args.out is not None else (
        config.adapter_store / f".train-{uuid.uuid4().hex[:8]}" / (args.name or experiment))
    if (out / "adapter.safetensors").exists():
        raise ConfigError(f"{out} already holds an adapter; choose another --out folder")
    sam, info = load_sam(args.checkpoint, args.model_type, args.image_size,
                         allow_custom=args.allow_custom_checkpoint, setting="--model-type")
    model_type = info.model_type  # read from the checkpoint; --model-type is only a check
    if registry is not None and registry.base is not None and (
            registry.base.model_type, registry.base.sha256) != (model_type, info.sha256):
        raise ConfigError(
            f"--checkpoint {args.checkpoint} ({model_type}, sha256 {info.sha256}) is not the daemon's base "
            f"model ({registry.base.source}: {registry.base.model_type}, sha256 {registry.base.sha256}); the "
            "daemon would refuse the adapter. Train on the daemon's checkpoint.")
    settings = TrainSettings(
        epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        seed=args.seed, image_size=args.image_size, train_all=args.train_all, max_steps=args.max_steps,
        device=args.device, schedule=getattr(args, "schedule", "reference"),
        dropout_mode=getattr(args, "dropout_mode", "output"),
        mixed_precision=bool(getattr(args, "mixed_precision", False)),
    )
    console.print(f"training on {image_path} ({int(mask.max())} labelled cells, mask {mask_path}) "
                  f"with SAM {model_type}")
    resume_file = out.with_name(f".{out.name}.resume.pt")
    started = time.perf_counter()
    result = train_adapter(sam, image, mask, settings, checkpoint_path=resume_file, resume=args.resume)
    seconds = time.perf_counter() - started
    name = args.name or experiment or out.name
    metadata = AdapterMetadata(
        name=name, base_model_type=model_type, base_checkpoint_sha256=info.sha256,
        rank=settings.rank, dropout=settings.dropout, image_size=settings.image_size,
        training_image_fingerprint=fingerprint_array(image),
        settings={**asdict(settings), "image": str(image_path), "mask": str(mask_path)},
        metrics={"final_loss": float(result.losses[-1]) if result.losses else None,
                 "steps": result.steps, "seconds": round(seconds, 1)},
        cellseg1d_version=__version__,
    )
    save_adapter(result.model, out, metadata)
    resume_file.unlink(missing_ok=True)
    console.print(f"[green]saved adapter[/green] {name} -> {out} ({result.steps} steps, {seconds:.0f} s)")
    if registry is not None:
        try:
            row = registry.add(out, name)  # on an error the trained adapter stays in `out` (printed above)
            if args.out is None:
                shutil.rmtree(out.parent, ignore_errors=True)
            console.print(f"registered {row.label} -> {row.store_path}")
            if args.assign:
                _, released = registry.assign(experiment, row.name, row.version)
                console.print(f"assigned {row.label} to experiment {experiment}; {released} held job(s) released")
        finally:
            registry.catalog.close()
    return 0
