"""Built-in SAM + LoRA segmenter (CellSeg1): answers ``segment`` when ``[sam] checkpoint`` is set.

One base model is loaded per device and process (at daemon start, through
the ``configure`` hook, so a bad checkpoint stops the daemon with a clear
message) and shared by the worker threads. Adapters are switched in place on
that model: an :class:`~cellseg1d.model.adapters.AdapterCache` keeps the
``sam.adapter_cache_size`` most recently used ones loaded (peft
multi-adapter), so a job for another experiment costs an adapter switch, not
a model load. Each plane runs with the adapter of its job
(``request.adapter``), else the default adapter (``sam.adapter``), else the
bare base model. Inference runs under the model's lock, one plane at a time
per device. Planes larger than ``sam.tile`` pixels are segmented in
overlapping tiles and stitched.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cellseg1d.hookspecs import hookimpl
from cellseg1d.types import AdapterRef, SegmentRequest, Segmentation

log = logging.getLogger(__name__)


@dataclass
class BaseSam:
    """One loaded base SAM on one device, with its adapter cache; use it under ``lock``."""

    cache: Any  # cellseg1d.model.adapters.AdapterCache (holds the model)
    device: Any
    model_type: str
    checkpoint_sha256: str
    key: tuple
    lock: threading.RLock = field(default_factory=threading.RLock)
    #: Adapter activations and the seconds they took (for the log and benchmarks).
    switches: int = 0
    switch_seconds: float = 0.0
    #: Times the active adapter changed to another one (or to or from the bare base model).
    adapter_changes: int = 0
    #: What is active now: an adapter folder, "" for the bare base model, None before the first job.
    active_adapter: str | None = None

    @property
    def sam(self) -> Any:
        """The SAM module (with LoRA layers once an adapter was loaded)."""
        from cellseg1d.model.lora import unwrap

        return unwrap(self.cache.model)


@dataclass
class LoadedModel:
    """A SAM with one adapter active, ready for inference (``cellseg1d segment``)."""

    sam: Any
    device: Any
    model_type: str
    checkpoint_sha256: str
    adapter: str | None
    key: tuple


class ModelHolder:
    """Loads each configured base model once per device and switches adapters on it; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bases: dict[tuple, BaseSam] = {}
        #: How many base models were loaded in this process.
        self.loads = 0

    def reset(self) -> None:
        """Forget every loaded model (tests)."""
        with self._lock:
            self.bases.clear()
            self.loads = 0

    def base(self, settings: Any) -> BaseSam:
        """The base model of the ``[sam]`` settings, loaded on first use."""
        key = (settings.checkpoint, settings.model_type, settings.image_size, settings.device,
               settings.allow_custom_checkpoint)
        with self._lock:
            base = self.bases.get(key)
            if base is None:
                base = self.bases[key] = self._load(settings, key)
                self.loads += 1
            return base

    @staticmethod
    def _load(settings: Any, key: tuple) -> BaseSam:
        from cellseg1d.model.adapters import AdapterCache
        from cellseg1d.model.checkpoint import load_sam
        from cellseg1d.model.device import pick_device

        device = pick_device(settings.device)
        started = time.perf_counter()
        sam, info = load_sam(settings.checkpoint, settings.model_type, settings.image_size,
                             allow_custom=settings.allow_custom_checkpoint, setting="sam.model_type")
        sam.to(device).eval()
        cache = AdapterCache(sam, settings.adapter_cache_size, expect_base_sha256=info.sha256)
        log.info("loaded SAM base model %s (%s) on %s in %.1f s", info.model_type, info.sha256[:12], device,
                 time.perf_counter() - started)
        return BaseSam(cache, device, info.model_type, info.sha256, key)  # the type read from the checkpoint

    def adapter_changes(self) -> int:
        """Adapter switches (the active adapter changed) on every loaded base model, in total."""
        with self._lock:
            return sum(base.adapter_changes for base in self.bases.values())

    def get(self, settings: Any) -> LoadedModel:
        """The base model with the default adapter (``sam.adapter``) active; for single-threaded callers."""
        base = self.base(settings)
        with base.lock:
            name = activate(base, None, settings)
        return LoadedModel(base.sam, base.device, base.model_type, base.checkpoint_sha256,
                           name["name"] if name else None, base.key)


HOLDER = ModelHolder()


def _check_registered(adapter: AdapterRef) -> None:
    """The store copy must still be the registered version (its metadata names the registered weights)."""
    from cellseg1d.model.adapters import AdapterError, read_metadata

    meta = read_metadata(adapter.path)
    if meta.weights_sha256 != adapter.sha256:
        raise AdapterError(
            f"adapter {adapter.label} in {adapter.path} is not the registered version (weights sha256 "
            f"{meta.weights_sha256}, registered {adapter.sha256}); the store was modified. Remove it "
            f"(cellseg1d adapters remove {adapter.label}) and add the adapter again")


def activate(base: BaseSam, adapter: AdapterRef | None, settings: Any) -> dict[str, Any] | None:
    """Make the adapter for this job active on ``base`` (caller holds ``base.lock``).

    ``adapter`` (a registered version), else ``settings.adapter`` (a folder),
    else none: the bare base model (returns None; run it under
    :func:`base_only`). Returns the provenance of the adapter used.
    """
    from cellseg1d.model.adapters import read_metadata

    started = time.perf_counter()
    loads = base.cache.loads
    wanted = str(adapter.path) if adapter is not None else str(settings.adapter or "")
    if base.active_adapter is not None and wanted != base.active_adapter:
        base.adapter_changes += 1
    base.active_adapter = wanted
    if adapter is not None:
        _check_registered(adapter)
        base.cache.activate(adapter.path)
        used: dict[str, Any] | None = adapter.provenance()
    elif settings.adapter is not None:
        meta = read_metadata(settings.adapter)
        base.cache.activate(settings.adapter)
        used = {"name": meta.name, "version": None, "sha256": meta.weights_sha256, "path": str(settings.adapter)}
    else:
        return None
    if base.cache.loads != loads and str(base.device) != "cpu":
        base.cache.model.to(base.device)  # the new LoRA weights were read to the CPU
    base.switches += 1
    base.switch_seconds += time.perf_counter() - started
    return used


def base_only(base: BaseSam) -> Any:
    """A context in which the model runs without any adapter."""
    from peft import PeftModel

    model = base.cache.model
    return model.disable_adapter() if isinstance(model, PeftModel) else nullcontext()


def inference_settings(settings: Any) -> Any:
    """The engine's InferenceSettings from the ``[sam]`` config section: its values, then the profile's
    (``sam.profile``), then the settings written explicitly in the section."""
    from cellseg1d.model.inference import InferenceSettings
    from cellseg1d.model.profiles import DEFAULT_PROFILE, explicit_settings, profile_values

    names = {f.name for f in dataclasses.fields(InferenceSettings)}
    values = {k: v for k, v in settings.model_dump().items() if k in names}
    explicit = {k: v for k, v in explicit_settings(settings).items() if k in names}
    values.update(profile_values(getattr(settings, "profile", DEFAULT_PROFILE), explicit))
    return InferenceSettings(**values)


def segment_rgb(model: Any, rgb: np.ndarray, settings: Any) -> np.ndarray:
    """Segment an (H, W, 3) uint8 image with ``model.sam`` on ``model.device``, tiling it when large."""
    from cellseg1d.model.inference import segment_image
    from cellseg1d.model.tiling import segment_large

    inference = inference_settings(settings)
    if max(rgb.shape[:2]) > settings.tile:
        return segment_large(model.sam, rgb, inference, model.device, tile=settings.tile,
                             overlap=settings.tile_overlap)
    return segment_image(model.sam, rgb, inference, model.device)


def settings_record(settings: Any) -> dict[str, Any]:
    """The segmentation settings recorded in provenance."""
    record = dataclasses.asdict(inference_settings(settings))
    record.update(tile=settings.tile, tile_overlap=settings.tile_overlap, normalize=settings.normalize,
                  profile=getattr(settings, "profile", "paper"))
    return record


def _on_dask_worker() -> bool:
    """True inside a ``dask worker`` process (where the model is wanted)."""
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return False
    return True


@hookimpl
def configure(config: Any) -> None:
    """Load the base model (and the default adapter) at start, so that a bad file stops the daemon.

    With ``executor.kind = "dask"`` the daemon segments nothing itself: each
    Dask worker loads the model on its first task instead.
    """
    executor = getattr(config, "executor", None)
    if executor is not None and executor.kind != "local" and not _on_dask_worker():
        return
    if config.sam.checkpoint is not None:
        base = HOLDER.base(config.sam)
        if config.sam.adapter is not None:
            with base.lock:
                activate(base, None, config.sam)


def stretch_ranges(stats: Any, normalize: str) -> list[tuple[float, float]] | None:
    """The whole plane's range of each channel for the 8-bit conversion (None without statistics)."""
    if stats is None:
        return None
    if normalize == "minmax":
        return [(c.min, c.max) for c in stats.channels]
    from cellseg1d.model.data import HIGH_PERCENTILE, LOW_PERCENTILE

    return [(c.percentile(LOW_PERCENTILE), c.percentile(HIGH_PERCENTILE)) for c in stats.channels]


@hookimpl
def segment(plane: np.ndarray, request: SegmentRequest) -> Segmentation | None:
    """CellSeg1 automatic segmentation; None (let others answer) when SAM is off or the job wants the fallback."""
    settings = getattr(request.config, "sam", None)
    if settings is None or settings.checkpoint is None or request.fallback:
        return None
    from cellseg1d.model.data import to_uint8_rgb

    base = HOLDER.base(settings)
    rgb = to_uint8_rgb(plane, normalize=settings.normalize, ranges=stretch_ranges(request.stats, settings.normalize))
    with base.lock:  # one plane at a time on the shared model, with this job's adapter
        started = time.perf_counter()
        used = activate(base, request.adapter, settings)
        switch_s = time.perf_counter() - started
        with base_only(base) if used is None else nullcontext():
            labels = segment_rgb(base, rgb, settings)
    name = f"sam:{base.model_type}"
    if used is not None:
        name += f"+{used['name']}" + (f"@v{used['version']}" if used["version"] is not None else "")
    return Segmentation(labels=labels, segmenter=name, details={
        "model_type": base.model_type, "checkpoint_sha256": base.checkpoint_sha256, "adapter": used,
        "image_size": settings.image_size, "settings": settings_record(settings),
        "adapter_switch_ms": round(switch_s * 1e3, 3),
    })

