"""Built-in SAM + LoRA segmenter (CellSeg1): answers ``segment`` when ``[sam] checkpoint`` is set.

The base model is loaded once per process (at daemon start, through the
``configure`` hook, so a bad checkpoint stops the daemon with a clear message)
and shared by the worker threads; inference runs under a lock, one plane at a
time per device. Planes larger than ``sam.tile`` pixels are segmented in
overlapping tiles and stitched.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from cellseg1d.hookspecs import hookimpl
from cellseg1d.types import SegmentRequest, Segmentation

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A SAM (with its adapter, if any) ready for inference."""

    sam: Any
    device: Any
    model_type: str
    checkpoint_sha256: str
    adapter: str | None
    key: tuple


class ModelHolder:
    """Loads the configured model once and hands it out; thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.model: LoadedModel | None = None
        self.loads = 0

    def get(self, settings: Any) -> LoadedModel:
        key = (settings.checkpoint, settings.model_type, settings.adapter, settings.image_size, settings.device)
        with self.lock:
            if self.model is None or self.model.key != key:
                self.model = self._load(settings, key)
                self.loads += 1
            return self.model

    @staticmethod
    def _load(settings: Any, key: tuple) -> LoadedModel:
        from cellseg1d.model.checkpoint import load_sam
        from cellseg1d.model.device import pick_device

        device = pick_device(settings.device)
        sam, info = load_sam(
            settings.checkpoint, settings.model_type, settings.image_size,
            allow_custom=settings.allow_custom_checkpoint,
        )
        adapter_name = None
        if settings.adapter is not None:
            from cellseg1d.model.adapters import load_adapter, read_metadata
            from cellseg1d.model.lora import unwrap

            meta = read_metadata(settings.adapter)
            model = load_adapter(sam, settings.adapter, meta.name, expect_base_sha256=info.sha256)
            sam = unwrap(model)
            adapter_name = meta.name
        sam.to(device).eval()
        log.info("loaded SAM %s (%s) on %s%s", settings.model_type, info.sha256[:12], device,
                 f" with adapter {adapter_name}" if adapter_name else "")
        return LoadedModel(sam, device, settings.model_type, info.sha256, adapter_name, key)


HOLDER = ModelHolder()


def inference_settings(settings: Any) -> Any:
    """The engine's InferenceSettings from the ``[sam]`` config section."""
    from cellseg1d.model.inference import InferenceSettings

    names = {f.name for f in dataclasses.fields(InferenceSettings)}
    values = {k: v for k, v in settings.model_dump().items() if k in names}
    return InferenceSettings(**values)


def segment_rgb(model: LoadedModel, rgb: np.ndarray, settings: Any) -> np.ndarray:
    """Segment an (H, W, 3) uint8 image, tiling it when larger than ``settings.tile``."""
    from cellseg1d.model.inference import segment_image
    from cellseg1d.model.tiling import segment_large

    inference = inference_settings(settings)
    if max(rgb.shape[:2]) > settings.tile:
        return segment_large(model.sam, rgb, inference, model.device, tile=settings.tile,
                             overlap=settings.tile_overlap)
    return segment_image(model.sam, rgb, inference, model.device)


@hookimpl
def configure(config: Any) -> None:
    """Load the model at start so that a bad checkpoint or adapter stops the daemon."""
    if config.sam.checkpoint is not None:
        HOLDER.get(config.sam)


@hookimpl
def segment(plane: np.ndarray, request: SegmentRequest) -> Segmentation | None:
    """CellSeg1 automatic segmentation; None (let others answer) when SAM is not configured."""
    settings = getattr(request.config, "sam", None)
    if settings is None or settings.checkpoint is None:
        return None
    from cellseg1d.model.data import to_uint8_rgb

    model = HOLDER.get(settings)
    rgb = to_uint8_rgb(plane)
    with HOLDER.lock:  # one plane at a time on the shared model
        labels = segment_rgb(model, rgb, settings)
    name = f"sam:{model.model_type}" + (f"+{model.adapter}" if model.adapter else "")
    return Segmentation(labels=labels, segmenter=name, details={
        "model_type": model.model_type, "checkpoint_sha256": model.checkpoint_sha256,
        "adapter": model.adapter, "image_size": settings.image_size,
    })
