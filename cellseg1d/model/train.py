"""Training a CellSeg1 LoRA adapter on one annotated image.

:func:`train_adapter` is the whole recipe: the image is tiled and augmented
(:mod:`cellseg1d.model.data`), LoRA adapters are added to SAM
(:mod:`cellseg1d.model.lora`), and SAM's image encoder, prompt encoder and
mask decoder are run with gradients, one point prompt per predicted mask,
against the loss of :mod:`cellseg1d.model.losses`. Optimiser: AdamW over the
trainable parameters only (weight decay 0.01), OneCycleLR, gradient
accumulation, a fixed seed. Every rule follows the CellSeg1 reference
implementation by default (docs/engine.md, "Training: faithfulness to the
reference"); where the reference looks like a mistake the corrected rule is
a named setting.

Epochs and steps (the reference's ``train_epoch``): an epoch visits every
item once in a shuffled order, in batches of ``batch_size``; gradients are
accumulated and an optimiser step is taken after every ``grad_accum``-th
batch of the epoch and after its last batch (accumulation restarts every
epoch). A batch holding an item without points is skipped (no step either
when it falls on a step position). Each batch's loss is divided by
``grad_accum``, the epoch's last batch's by the number of batches since the
last step. With the defaults and a 512 x 512 image: 16 tiles x 3 = 48
items, 12 batches, 2 steps per epoch, 600 steps in 300 epochs.

Schedule (``schedule``): "reference" builds the one-cycle schedule for
``epochs * (batches + grad_accum - 1) // grad_accum`` steps (712 for the
defaults), more than are taken (600): training ends at lr ~3.5e-4, before
the schedule's annealing; "annealed" builds it for the steps actually
planned, so the rate anneals to ~0 at the end. ``max_steps`` stops early
and compresses the schedule into the steps taken (keeping the reference's
ratio of scheduled to taken steps).

Interrupting (Ctrl-C) saves a resumable checkpoint to ``checkpoint_path``
(trainable weights, optimiser, scheduler, step, position in the epoch,
random state) and raises :class:`TrainingInterrupted`, a
``KeyboardInterrupt``; calling again with ``resume=True`` continues and
ends exactly where an uninterrupted run ends.

Recipes
-------
The full recipe (the published one) is the default of :class:`TrainSettings`:
the image resized to 512 x 512, 256 px tiles, SAM input 512, 300 epochs,
batch 4 x 8 accumulated, float32 (TF32 matrix products on CUDA, as the
reference). It is meant for a GPU (CellSeg1 reports 36-71 min for vit_h on
an RTX 4090); ``mixed_precision=True`` (bfloat16) is faster and not the
reference's numerics.

A shorter CPU recipe, for when no GPU is available::

    TrainSettings(image_size=256, tile=128, resize_to=(256, 256), epochs=60, batch_size=2, grad_accum=4)

It keeps the full recipe's proportions (tiles half the resized image,
upscaled 2x to the model input), so cells look as large to the model as in
the full recipe; segment with the same input size (a base built for 256 and
inference ``image_size=256``). Input 256 is about 4x cheaper per pass than
512, and 60 epochs 5x fewer: roughly 20x less compute. The prompt-rule sizes
(``min_cell_area``, ``border``) left at None follow the input size (100 px
and 20 px at 512, 25 px and 10 px at 256).

What is measured and what is not: the tests train the "tiny" test model on
synthetic cells; ``bench/bench_train_schedule.py`` compares the schedules and
dropout modes on it. The accuracy of the CPU recipe against the full recipe
with real backbones (vit_b/l/h) on real data is NOT measured: no GPU or
official checkpoint was available. Prefer the full recipe on a GPU when
accuracy matters.

On small shared CPUs set ``torch.set_num_threads(1)`` (or the number of free
cores): oversubscribed threads made training steps 4-30x slower in our
measurements on two shared cores.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from segment_anything.modeling import Sam
from torch import nn

from cellseg1d.model.data import (
    CellTileDataset,
    collate_items,
    make_tiles,
)
from cellseg1d.model.device import autocast, autocast_dtype, pick_device
from cellseg1d.model.losses import cellseg1_loss
from cellseg1d.model.train_settings import (
    SCHEDULES,
    StepInfo,
    TrainingError,
    TrainingInterrupted,
    TrainResult,
    TrainSettings,
)
from cellseg1d.model.train_state import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    dataset_fingerprint,
    defer_sigint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    trainable_state,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "TrainingError",
    "SCHEDULES",
    "StepInfo",
    "TrainResult",
    "TrainingPlan",
    "TrainSettings",
    "TrainingInterrupted",
    "fit",
    "forward_prompts",
    "make_scheduler",
    "train_adapter",
    "training_plan",
]


# --------------------------------------------------------------------------
# Forward pass
# --------------------------------------------------------------------------


def forward_prompts(
    sam: Sam,
    images: torch.Tensor,
    points: Sequence[torch.Tensor],
    point_labels: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run SAM with gradients: one single-mask prediction per point prompt.

    Parameters
    ----------
    sam : Sam
        The model (its LoRA layers, if any, in place).
    images : torch.Tensor
        (B, 3, H, W) RGB 0..255 on the model's device, H, W at most the
        encoder's input size S (SAM normalises and pads them to S x S, as the
        reference does with its un-augmented 256 px tiles).
    points, point_labels : sequences of B tensors
        (N_i, 2) float (x, y) input-pixel coordinates and (N_i,) labels (1
        foreground, 0 background) of image i; each point is its own prompt.

    Returns
    -------
    mask_logits : (sum N_i, 1, S/4, S/4)
    iou_pred : (sum N_i, 1)
        Predictions of all prompts, image after image.
    """
    embeddings = sam.image_encoder(sam.preprocess(images))
    dense_pe = sam.prompt_encoder.get_dense_pe()
    all_logits, all_iou = [], []
    for i, (coords, labels) in enumerate(zip(points, point_labels, strict=True)):
        if coords.shape[0] == 0:
            continue
        sparse, dense = sam.prompt_encoder(points=(coords[:, None, :], labels[:, None]), boxes=None, masks=None)
        logits, iou = sam.mask_decoder(
            image_embeddings=embeddings[i : i + 1],
            image_pe=dense_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        all_logits.append(logits)
        all_iou.append(iou)
    if not all_logits:
        low = sam.image_encoder.img_size // 4
        # Keep the graph connected so that backward() works on an all-empty batch.
        zero = embeddings.sum() * 0.0
        return zero + images.new_zeros((0, 1, low, low)), zero + images.new_zeros((0, 1))
    return torch.cat(all_logits), torch.cat(all_iou)


# --------------------------------------------------------------------------
# Training loop
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingPlan:
    """How many batches and optimiser steps a training takes, and what the schedule is built for."""

    #: Batches per epoch (the last one may be smaller).
    batches_per_epoch: int
    #: Optimiser steps per epoch when no batch is skipped: ceil(batches / grad_accum).
    steps_per_epoch: int
    #: Steps to take (epochs x steps_per_epoch, or max_steps if smaller).
    total_steps: int
    #: Steps the one-cycle schedule is built for (>= total_steps).
    scheduler_steps: int


def training_plan(n_items: int, settings: TrainSettings) -> TrainingPlan:
    """The plan of a training on ``n_items`` items (see the module docstring).

    48 items, the defaults: 12 batches and 2 steps per epoch, 600 steps, a
    schedule for 300 * 19 // 8 = 712 steps ("reference") or 600 ("annealed").
    """
    per_epoch = math.ceil(n_items / settings.batch_size)
    steps_per_epoch = math.ceil(per_epoch / settings.grad_accum)
    planned = settings.epochs * steps_per_epoch
    if settings.schedule == "reference":
        scheduled = settings.epochs * (per_epoch + settings.grad_accum - 1) // settings.grad_accum
    else:
        scheduled = planned
    total = planned if settings.max_steps is None else min(planned, settings.max_steps)
    if total < planned:
        scheduled = math.ceil(total * scheduled / planned)
    return TrainingPlan(per_epoch, steps_per_epoch, total, max(scheduled, total, 2))


def make_scheduler(optimizer: torch.optim.Optimizer, settings: TrainSettings,
                   plan: TrainingPlan) -> torch.optim.lr_scheduler.OneCycleLR:
    """The one-cycle schedule of ``plan`` (peak ``settings.lr``, warm-up ``pct_start``, PyTorch's defaults else)."""
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.lr, total_steps=plan.scheduler_steps, pct_start=settings.pct_start
    )


@contextlib.contextmanager
def _tf32(device: torch.device, enabled: bool) -> Iterator[None]:
    """Allow (or forbid) TF32 on CUDA for the block, restoring the previous flags after it."""
    if device.type != "cuda":
        yield
        return
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def _valid_batch(items: list[dict[str, Any] | None]) -> list[dict[str, Any]] | None:
    """The batch's items without the dropped ones; None when the reference skips the batch.

    The reference drops an item whose points all left the image from its
    batch, and skips a batch that is then empty or holds an item without
    points (``is_valid_batch``).
    """
    kept = [item for item in items if item is not None]
    if not kept or any(item["points"].shape[0] == 0 for item in kept):
        return None
    return kept


class _Progress:
    """A rich progress bar with the running loss (or nothing)."""

    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self._progress = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]training[/bold]"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        )
        self._task = self._progress.add_task("train", total=total, completed=start, loss="-")
        self._progress.start()

    def update(self, step: int, loss: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, loss=f"{loss:.4f}")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def fit(
    model: nn.Module,
    dataset: CellTileDataset,
    settings: TrainSettings,
    *,
    progress: bool = True,
    checkpoint_path: str | os.PathLike[str] | None = None,
    resume: bool = False,
    on_step: Callable[[StepInfo], None] | None = None,
) -> TrainResult:
    """Train the parameters of ``model`` that require gradients on ``dataset``.

    ``model`` is a SAM or a peft model wrapping one (the trainable set is
    whatever ``requires_grad`` says). The caller must have seeded torch
    (``torch.manual_seed(settings.seed)``) before creating any randomly
    initialised weights, so that a run is reproducible. See the module
    docstring for steps, interruption and resuming.
    """
    from cellseg1d.model.lora import unwrap

    started = time.perf_counter()
    device = pick_device(settings.device)
    amp_dtype = autocast_dtype(device) if settings.mixed_precision else None
    sam = unwrap(model)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters (nothing requires gradients)")
    if sam.image_encoder.img_size != dataset.image_size:
        raise TrainingError(
            f"the model is built for input size {sam.image_encoder.img_size} but the training items are "
            f"{dataset.image_size}; build the base with image_size={dataset.image_size} or change image_size"
        )
    plan = training_plan(len(dataset), settings)
    total_steps = plan.total_steps
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = make_scheduler(optimizer, settings, plan)
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    fingerprint = dataset_fingerprint(dataset) if path is not None else ""
    losses: list[float] = []
    mask_losses: list[float] = []
    iou_losses: list[float] = []
    step = 0
    position = (0, 0)  # (epoch, batch) the next batch comes from
    skipped = 0
    if resume:
        if path is None:
            raise TrainingError("resume=True needs the checkpoint_path of the interrupted training")
        payload = load_checkpoint(path, settings, total_steps, fingerprint)
        names = {name for name, p in model.named_parameters() if p.requires_grad}
        if set(payload["trainable"]) != names:
            raise TrainingError(
                f"cannot resume from {path}: its trainable weights do not match this model "
                "(a different base, rank or train_all); resume with the same base model and settings"
            )
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in names:
                    p.copy_(payload["trainable"][name].to(p.device, p.dtype))
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        set_rng_state(payload["rng"], device)
        step = int(payload["step"])
        position = (int(payload["position"][0]), int(payload["position"][1]))
        skipped = int(payload.get("skipped", 0))
        losses, mask_losses, iou_losses = (list(payload["losses"]), list(payload["mask_losses"]),
                                           list(payload["iou_losses"]))
    start_step = step
    boundary_rng = rng_state(device)
    boundary = (position, skipped)

    def checkpoint_payload() -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": step,
            "position": list(boundary[0]),
            "skipped": boundary[1],
            "total_steps": total_steps,
            "data": fingerprint,
            "settings": settings.to_dict(),
            "trainable": trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": boundary_rng,
            "losses": losses,
            "mask_losses": mask_losses,
            "iou_losses": iou_losses,
        }

    bar = _Progress(progress, total_steps, step)
    per_epoch, accum, size = plan.batches_per_epoch, settings.grad_accum, settings.batch_size
    model.train()
    optimizer.zero_grad(set_to_none=True)
    try:
        with _tf32(device, settings.tf32):
            epoch, first_batch = position
            while epoch < settings.epochs and step < total_steps:
                dataset.set_epoch(epoch)
                order = dataset.order(epoch)
                in_group = 0  # batches since the last step (the reference's actual_ga_step), reset every epoch
                group: list[tuple[float, float, float]] = []
                used = 0
                for batch in range(first_batch, per_epoch):
                    items = _valid_batch([dataset[int(i)] for i in order[batch * size : (batch + 1) * size]])
                    if items is None:
                        skipped += 1
                        continue
                    used += 1
                    collated = collate_items(items)
                    images = collated["image"].to(device)
                    points = [p.to(device) for p in collated["points"]]
                    labels = [lab.to(device) for lab in collated["point_labels"]]
                    with autocast(device, amp_dtype):
                        logits, iou = forward_prompts(sam, images, points, labels)
                    targets = torch.cat(collated["targets"]).to(device)
                    cell_prob = torch.cat(collated["cell_prob"]).to(device)
                    parts = cellseg1_loss(logits.float(), iou.float(), targets, cell_prob,
                                          dice_weight=settings.dice_weight, mask_loss_on=settings.mask_loss_on)
                    in_group += 1
                    last = batch + 1 == per_epoch
                    (parts.total / (in_group if last else accum)).backward()
                    group.append((float(parts.total.detach()), parts.mask, parts.iou))
                    if (batch + 1) % accum and not last:
                        continue
                    lr = optimizer.param_groups[0]["lr"]
                    step_loss, step_mask, step_iou = (float(np.mean(v)) for v in zip(*group, strict=True))
                    with defer_sigint():
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        scheduler.step()
                        step += 1
                        in_group, group = 0, []
                        losses.append(step_loss)
                        mask_losses.append(step_mask)
                        iou_losses.append(step_iou)
                        boundary_rng = rng_state(device)
                        boundary = ((epoch + 1, 0) if last else (epoch, batch + 1), skipped)
                    bar.update(step, step_loss)
                    if on_step is not None:
                        on_step(StepInfo(step=step, total_steps=total_steps, loss=step_loss, mask_loss=step_mask,
                                         iou_loss=step_iou, lr=lr, seconds=time.perf_counter() - started))
                    if step >= total_steps:
                        break
                if used == 0 and first_batch == 0:
                    raise TrainingError(
                        f"epoch {epoch}: every batch was skipped (an item without usable point prompts in each): "
                        "the cells are too small or lie in the edge band; lower min_cell_area or border, or "
                        "annotate more cells"
                    )
                epoch, first_batch = epoch + 1, 0
    except KeyboardInterrupt as exc:
        bar.close()
        model.eval()
        optimizer.zero_grad(set_to_none=True)
        if path is None:
            raise TrainingInterrupted(
                f"training interrupted after step {step} of {total_steps}; no checkpoint was saved "
                "(pass checkpoint_path to make an interrupted training resumable)", step, None
            ) from exc
        save_checkpoint(path, checkpoint_payload())
        raise TrainingInterrupted(
            f"training interrupted after step {step} of {total_steps}; its state is saved in {path}. "
            f"Resume with the same image, base model and settings and resume=True "
            f"(checkpoint_path={str(path)!r})", step, path
        ) from exc
    bar.close()
    optimizer.zero_grad(set_to_none=True)  # free the gradients' memory
    model.eval()
    return TrainResult(
        model=model,
        losses=losses,
        mask_losses=mask_losses,
        iou_losses=iou_losses,
        steps=step,
        total_steps=total_steps,
        start_step=start_step,
        seconds=time.perf_counter() - started,
        device=str(device),
        settings=settings,
        n_items=len(dataset),
        extra={"scheduler_steps": plan.scheduler_steps, "skipped_batches": skipped,
               "last_lr": float(optimizer.param_groups[0]["lr"])},
    )


def make_dataset(image: np.ndarray, mask: np.ndarray, settings: TrainSettings) -> CellTileDataset:
    """The training items of one image and its label mask under ``settings``."""
    tiles = make_tiles(image, mask, tile=settings.tile, overlap=settings.overlap, min_items=settings.min_items,
                       resize_to=settings.resize_to, min_cells=settings.min_cells, channels=settings.channels,
                       normalize=settings.normalize)
    return CellTileDataset(
        tiles,
        image_size=settings.image_size,
        seed=settings.seed,
        augment=settings.augment_settings(),
        prompts=settings.prompt_settings(),
        unaugmented=settings.unaugmented,
    )


def train_adapter(
    sam: Sam | PeftModel,
    image: np.ndarray,
    mask: np.ndarray,
    settings: TrainSettings | None = None,
    *,
    progress: bool = True,
    checkpoint_path: str | os.PathLike[str] | None = None,
    resume: bool = False,
    on_step: Callable[[StepInfo], None] | None = None,
) -> TrainResult:
    """Train a CellSeg1 LoRA adapter on one image and its instance label mask.

    Parameters
    ----------
    sam : Sam or PeftModel
        A base SAM built for ``settings.image_size`` (modified in place: its
        q/k/v projections are split and LoRA layers added, with
        ``settings.dropout_mode``), or a peft model whose trainable parameters
        are trained as they are.
    image : numpy.ndarray
        (H, W) or (C, H, W) image, any dtype (see ``to_uint8_rgb``).
    mask : numpy.ndarray
        Integer (H, W) labels: 0 background, one value per cell.
    settings : TrainSettings, optional
        The recipe (CellSeg1 defaults).
    progress : bool, optional
        Show a progress bar with the loss.
    checkpoint_path : path, optional
        Where Ctrl-C saves a resumable state (and what ``resume`` reads).
    resume : bool, optional
        Continue the interrupted training saved at ``checkpoint_path``.
    on_step : callable, optional
        Called with a :class:`StepInfo` after every optimiser step.

    Returns
    -------
    TrainResult
        ``model`` is the peft model (save its adapter with ``adapters.save_adapter``).

    Raises
    ------
    TrainingDataError
        The image/mask pair cannot be used (message says why).
    TrainingInterrupted
        On Ctrl-C, after saving the checkpoint.
    """
    from cellseg1d.model.lora import apply_lora

    settings = settings or TrainSettings()
    dataset = make_dataset(image, mask, settings)
    torch.manual_seed(settings.seed)
    model = sam if isinstance(sam, PeftModel) else apply_lora(
        sam, rank=settings.rank, dropout=settings.dropout, train_all=settings.train_all,
        dropout_mode=settings.dropout_mode,
    )
    return fit(model, dataset, settings, progress=progress, checkpoint_path=checkpoint_path, resume=resume,
               on_step=on_step)
