"""Settings and results of one-image training (the CellSeg1 recipe and its named alternatives)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from cellseg1d.errors import CellsegError
from cellseg1d.model.data import (
    FILL_MODES,
    NORMALIZE_MODES,
    UNAUGMENTED_MODES,
    AugmentSettings,
    PromptSettings,
)
from cellseg1d.model.losses import MASK_LOSS_MODES


#: One-cycle schedules: "reference" (built for more steps than are taken) or "annealed".
SCHEDULES = ("reference", "annealed")
#: Settings that change the training trajectory: a checkpoint resumes only with equal values.


@dataclass
class TrainSettings:
    """Settings of one adapter training (the CellSeg1 reference's recipe by default)."""

    epochs: int = 300
    batch_size: int = 4
    #: Batches whose gradients are summed per optimiser step (effective batch = batch_size x grad_accum).
    grad_accum: int = 8
    #: Peak learning rate of the one-cycle schedule.
    lr: float = 3e-3
    weight_decay: float = 0.01
    #: Fraction of the scheduled steps spent warming up to ``lr``.
    pct_start: float = 0.3
    #: "reference": one-cycle over ``epochs * (batches + grad_accum - 1) // grad_accum`` steps
    #: (more than are taken, so the rate never anneals); "annealed": over the steps taken.
    schedule: str = "reference"
    seed: int = 0
    #: LoRA rank and dropout.
    rank: int = 4
    dropout: float = 0.1
    #: "output": dropout on the adapted projections' whole output (the reference); "input": peft's.
    dropout_mode: str = "output"
    #: Tile side and overlap (pixels of the training image, after ``resize_to``; cellpose's tile positions).
    tile: int = 256
    overlap: float = 0.5
    #: The reference's ``duplicate_data``: n < min_items tiles are repeated min_items // n + 1 times.
    min_items: int = 32
    #: Resize the training image first: (height, width) exactly (the reference's 512 x 512, aspect not
    #: kept), an int: the longest side (aspect kept), None: not at all.
    resize_to: int | tuple[int, int] | None = (512, 512)
    #: SAM input size (multiple of 16); the base model must be built for it.
    image_size: int = 512
    #: Train every weight of the base as well (small/custom bases only).
    train_all: bool = False
    #: Stop after this many optimiser steps (the schedule is compressed into them).
    max_steps: int | None = None
    #: "auto" (CUDA, else MPS, else CPU), "cuda", "cuda:N", "mps" or "cpu".
    device: str = "auto"
    #: bfloat16 autocast where supported (CUDA); off: float32, the reference's numerics.
    mixed_precision: bool = False
    #: TF32 matrix products and convolutions on CUDA during training (the reference allows them).
    tf32: bool = True
    #: Random augmentations (off: no augmentation at all).
    augment: bool = True
    #: Pixels an augmentation maps from outside the tile: "zero" (black, the reference) or "median".
    augment_fill: str = "zero"
    #: Without augmentation: "pad" (the tile as it is, SAM pads it: the reference) or "resize".
    unaugmented: str = "pad"
    #: Channels of a multi-channel image to train on (see ``to_uint8_rgb``).
    channels: tuple[int, ...] | None = None
    #: Image to 8 bits: "minmax" (the reference) or "percentile" (see ``to_uint8_rgb``).
    normalize: str = "minmax"
    #: Masks with fewer cells are refused.
    min_cells: int = 3
    #: Prompts in the mask (BCE) loss: "cells" (cell probability 1, the reference) or "all".
    mask_loss_on: str = "cells"
    #: Weight of an extra Dice loss (0 in CellSeg1; for pretraining small models from scratch).
    dice_weight: float = 0.0
    # Point-prompt rules (see data.PromptSettings), in pixels of the tile (and of the model input after
    # augmentation).
    #: At most this many positive and this many negative points per item (the reference's max_point_num).
    max_cells: int = 30
    #: Cells of this area or less get no prompt; None: 100 at input 512, scaled by (image_size / 512)**2.
    min_cell_area: int | None = None
    #: The edge band (the reference's edge_distance); None: 20 at input 512, scaled by image_size / 512.
    border: int | None = None
    top_fraction: float = 0.2
    negative_ratio: float = 0.5
    max_negatives: int = 30

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "tile", "min_items", "rank", "max_cells"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.image_size % 16 or self.image_size < 16:
            raise ValueError(f"image_size must be a positive multiple of 16, got {self.image_size}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1 (or None), got {self.max_steps}")
        if not 0 < self.pct_start < 1:
            raise ValueError(f"pct_start must be in (0, 1), got {self.pct_start}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for name, allowed in (("schedule", SCHEDULES), ("dropout_mode", ("output", "input")),
                              ("mask_loss_on", MASK_LOSS_MODES), ("augment_fill", FILL_MODES),
                              ("unaugmented", UNAUGMENTED_MODES), ("normalize", NORMALIZE_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.channels is not None:
            self.channels = tuple(int(c) for c in self.channels)
        if isinstance(self.resize_to, (list, tuple)):
            if len(self.resize_to) != 2 or min(int(v) for v in self.resize_to) < 1:
                raise ValueError(f"resize_to must be (height, width), an int or None, got {self.resize_to!r}")
            self.resize_to = (int(self.resize_to[0]), int(self.resize_to[1]))
        elif self.resize_to is not None and int(self.resize_to) < 1:
            raise ValueError(f"resize_to must be positive, got {self.resize_to!r}")

    def prompt_settings(self) -> PromptSettings:
        """The point-prompt rules in pixels (defaults scaled from input 512)."""
        factor = self.image_size / 512
        min_area = self.min_cell_area if self.min_cell_area is not None else int(round(100 * factor**2))
        border = self.border if self.border is not None else int(round(20 * factor))
        return PromptSettings(
            max_cells=self.max_cells,
            min_cell_area=min_area,
            border=border,
            top_fraction=self.top_fraction,
            negative_ratio=self.negative_ratio,
            max_negatives=self.max_negatives,
        )

    def augment_settings(self) -> AugmentSettings | None:
        """The augmentations (None when ``augment`` is off)."""
        return AugmentSettings(fill=self.augment_fill) if self.augment else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class StepInfo:
    """Passed to ``on_step`` after every optimiser step."""

    #: Optimiser steps done so far (1 after the first).
    step: int
    total_steps: int
    loss: float
    mask_loss: float
    iou_loss: float
    #: Learning rate used by this step.
    lr: float
    #: Seconds since this call started.
    seconds: float


@dataclass
class TrainResult:
    """What :func:`train_adapter` / :func:`fit` return."""

    #: The trained model (a peft ``PeftModel`` for :func:`train_adapter`), in eval mode.
    model: nn.Module
    #: Mean loss of every optimiser step (of this run and, after a resume, of the run before).
    losses: list[float]
    mask_losses: list[float]
    iou_losses: list[float]
    #: Optimiser steps done in total.
    steps: int
    total_steps: int
    #: Step this call started from (0, or the checkpoint's step when resuming).
    start_step: int
    #: Wall-clock seconds of this call.
    seconds: float
    device: str
    settings: TrainSettings
    n_items: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class TrainingError(CellsegError):
    """Training cannot start or resume; the message says what to do."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training was interrupted (Ctrl-C); ``checkpoint_path`` holds a resumable state, if given."""

    def __init__(self, message: str, step: int, checkpoint_path: Path | None) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint_path = checkpoint_path

    def __str__(self) -> str:
        return str(self.args[0])
