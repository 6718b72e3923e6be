"""``cellseg1d segment IMAGE``: CellSeg1 inference on one image, outside the daemon.

An OME-Zarr image is run through the daemon's own pipeline (every plane,
labels written into its ``labels/`` group, atomically); a TIFF/PNG/npy image
gives one label image written to ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console

from cellseg1d.config import SamSettings, build_config
from cellseg1d.errors import ConfigError
from cellseg1d.ngff.imageio import is_ome_zarr, read_image, write_labels


def sam_settings(args: argparse.Namespace) -> SamSettings:
    """The ``[sam]`` settings the command-line options describe."""
    return SamSettings(
        checkpoint=args.checkpoint, model_type=args.model_type, adapter=getattr(args, "adapter", None),
        allow_custom_checkpoint=args.allow_custom_checkpoint, device=args.device, image_size=args.image_size,
        points_per_side=getattr(args, "points_per_side", 32), crop_n_layers=getattr(args, "crop_layers", 1),
    )


def segment_command(args: argparse.Namespace) -> int:
    from cellseg1d.builtin import sam as sam_plugin

    console = Console()
    settings = sam_settings(args)
    if settings.model_type is not None and settings.checkpoint is not None and settings.checkpoint.is_file():
        from cellseg1d.model.checkpoint import checkpoint_model_type

        # the backbone is read from the checkpoint; --model-type only checks it (shapes only: cheap)
        checkpoint_model_type(settings.checkpoint, expected=settings.model_type, setting="--model-type")
    image = Path(args.image).resolve()
    started = time.perf_counter()
    if is_ome_zarr(image) and args.out is None:
        from cellseg1d.ngff.discover import list_images
        from cellseg1d.pipeline.runner import Pipeline
        from cellseg1d.plugins import build_plugin_manager

        config = build_config({
            "watch": {"roots": [{"path": str(image.parent)}]},
            "sam": settings.model_dump(mode="json"),
            "segmentation": {"channels": args.channel, "labels_name": args.labels_name},
        })
        pm = build_plugin_manager(disable=["classical"])
        pm.hook.configure(config=config)
        pipeline = Pipeline(config, pm)
        for path in list_images(image):
            result = pipeline.run(path, config.watch.roots[0], image)
            console.print(f"{path}: {result.object_count} objects ({result.segmenter}) -> {result.labels_path}")
    else:
        if args.out is None:
            raise ConfigError(f"{image} is not an OME-Zarr image: give --out FILE (.tif, .png or .npy)")
        from cellseg1d.model.data import to_uint8_rgb

        model = sam_plugin.HOLDER.get(settings)
        plane = read_image(image, [int(c) if str(c).isdigit() else c for c in args.channel])
        labels = sam_plugin.segment_rgb(model, to_uint8_rgb(plane, normalize=settings.normalize), settings)
        write_labels(args.out, labels)
        console.print(f"{image}: {int(labels.max())} objects -> {args.out}")
    console.print(f"took {time.perf_counter() - started:.1f} s")
    return 0
