"""Training checkpoints and interrupt-safe sections: a training run stopped by Ctrl-C or a crash resumes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cellseg1d.model.data import (
    CellTileDataset,
)
from cellseg1d.model.train_settings import TrainingError, TrainSettings


CHECKPOINT_FORMAT = "cellseg1d-training-checkpoint"
CHECKPOINT_VERSION = 2
_TRAJECTORY_FIELDS = (
    "epochs", "batch_size", "grad_accum", "lr", "weight_decay", "pct_start", "seed", "rank", "dropout",
    "tile", "overlap", "min_items", "resize_to", "image_size", "train_all", "augment", "max_cells",
    "min_cell_area", "border", "top_fraction", "max_negatives", "negative_ratio", "channels", "dice_weight",
    "schedule", "dropout_mode", "mask_loss_on", "augment_fill", "unaugmented", "normalize", "mixed_precision",
    "tf32",
)


@contextlib.contextmanager
def defer_sigint() -> Iterator[None]:
    """Delay Ctrl-C until the end of the block (an optimiser step must not be cut in half)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except ValueError:  # signals unavailable here (embedded interpreter)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def dataset_fingerprint(dataset: CellTileDataset) -> str:
    """A hash of the training tiles (image and labels), to refuse resuming on other data."""
    digest = hashlib.sha256()
    for image, mask in dataset.tiles:
        for array in (image, mask):
            digest.update(str((array.shape, array.dtype.str)).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def load_checkpoint(path: Path, settings: TrainSettings, total_steps: int, fingerprint: str) -> dict[str, Any]:
    if not path.is_file():
        raise TrainingError(
            f"cannot resume: no training checkpoint at {path}; start a new training (resume=False) "
            "or pass the checkpoint_path an interrupted training wrote"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report any unreadable file the same way
        raise TrainingError(f"cannot resume: {path} is not a readable training checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"cannot resume: {path} is not a cellseg1d training checkpoint")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise TrainingError(
            f"cannot resume from {path}: it was written by another version of the training loop "
            f"(checkpoint version {payload.get('version')}, this one reads {CHECKPOINT_VERSION}); start afresh "
            "with resume=False"
        )
    saved = payload.get("settings", {})
    current = settings.to_dict()
    different = [
        f"{name}={saved.get(name)!r} (now {current[name]!r})"
        for name in _TRAJECTORY_FIELDS
        if _normalise(saved.get(name)) != _normalise(current[name])
    ]
    if different:
        raise TrainingError(
            f"cannot resume from {path}: it was written with other settings: {', '.join(different)}; "
            "resume with the same settings, or start afresh with resume=False"
        )
    if payload.get("data") != fingerprint:
        raise TrainingError(
            f"cannot resume from {path}: it was written for another training image or mask; "
            "resume with the same image and mask, or start afresh with resume=False"
        )
    if payload["total_steps"] != total_steps:
        raise TrainingError(
            f"cannot resume from {path}: it plans {payload['total_steps']} steps, these settings "
            f"{total_steps} (max_steps or the image differ); use the same image and settings"
        )
    return payload


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
