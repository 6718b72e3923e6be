"""The CellSeg1 training loss (the reference's, term by term).

Every point prompt is one prediction of SAM's mask decoder (single-mask
output): low-resolution mask logits (S/4 x S/4, 128 x 128 for input 512) and
the IoU head's quality score. The loss of a batch is

* binary cross-entropy with logits between the mask logits and the target
  masks, averaged over the pixels of the prompts whose "cell probability"
  is 1 only (points inside a cell whose low-res target is not empty); 0 when
  there is none. Background prompts do not enter it (``mask_loss_on="all"``,
  cellseg1d's earlier rule, includes them with an empty target);
* plus the mean squared error between the IoU head output and the cell
  probability of every prompt: 1 for a point inside a cell, 0 for
  background. At inference the IoU score filters the grid masks, so
  background points learn to score low.

``total = iou_weight * mse + mask_weight * bce`` (the reference: 1 and 1,
``ce_loss_weight`` 1). Targets at a higher resolution than the logits are
resized nearest-exact (pixel centres), as the reference does.

Optionally (``dice_weight`` > 0, not part of the CellSeg1 recipe) a soft Dice
loss on the positive prompts is added: small cells cover a tiny fraction of
the mask, so with BCE alone a model trained from scratch first settles on
"always empty"; Dice rewards overlap directly and gets it out of there much
sooner. It is meant for pretraining small test models, not for adapters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cellseg1d.model.data import nearest_exact_index

__all__ = ["MASK_LOSS_MODES", "LossParts", "cellseg1_loss"]

#: Prompts the mask (BCE) term covers: "cells" (cell probability 1, the reference) or "all".
MASK_LOSS_MODES = ("cells", "all")


@dataclass
class LossParts:
    """The total loss (a tensor with gradient) and its detached parts as floats."""

    total: torch.Tensor
    mask: float
    iou: float
    n_prompts: int
    dice: float = 0.0


def cellseg1_loss(
    mask_logits: torch.Tensor,
    iou_pred: torch.Tensor,
    targets: torch.Tensor,
    cell_prob: torch.Tensor,
    *,
    mask_weight: float = 1.0,
    iou_weight: float = 1.0,
    dice_weight: float = 0.0,
    mask_loss_on: str = "cells",
) -> LossParts:
    """The loss of a batch of point prompts.

    Parameters
    ----------
    mask_logits : torch.Tensor
        (P, 1, h, w) or (P, h, w) low-resolution mask logits, one per prompt.
    iou_pred : torch.Tensor
        (P, 1) or (P,) IoU-head outputs.
    targets : torch.Tensor
        (P, h, w) target masks (0/1); all zeros for negative prompts.
        Targets of another size are resized to (h, w) nearest-exact.
    cell_prob : torch.Tensor
        (P,) 1 for prompts inside a cell, 0 for background prompts.
    mask_weight, iou_weight : float, optional
        Weights of the two terms (1 and 1 in CellSeg1).
    dice_weight : float, optional
        Weight of an extra soft Dice loss over the prompts whose target is not
        empty (0, i.e. off, in CellSeg1).
    mask_loss_on : {"cells", "all"}, optional
        Prompts in the BCE term: those with cell probability 1 (the
        reference), or all of them.

    Returns
    -------
    LossParts
        ``total`` is 0 (with gradient, so ``backward`` works) when P == 0.
    """
    if mask_loss_on not in MASK_LOSS_MODES:
        raise ValueError(f"mask_loss_on must be one of {', '.join(MASK_LOSS_MODES)}, got {mask_loss_on!r}")
    logits = mask_logits.reshape(mask_logits.shape[0], *mask_logits.shape[-2:])
    scores = iou_pred.reshape(-1)
    n = logits.shape[0]
    if targets.shape[0] != n or cell_prob.reshape(-1).shape[0] != n or scores.shape[0] != n:
        raise ValueError(
            f"one target and one cell probability per prompt needed: {n} mask logits, "
            f"{scores.shape[0]} IoU predictions, {targets.shape[0]} targets, {cell_prob.numel()} probabilities"
        )
    zero = mask_logits.sum() * 0.0 + iou_pred.sum() * 0.0
    if n == 0:
        return LossParts(total=zero, mask=0.0, iou=0.0, n_prompts=0)
    target = targets.to(logits.dtype)
    if target.shape[-2:] != logits.shape[-2:]:
        rows = torch.from_numpy(nearest_exact_index(target.shape[-2], logits.shape[-2])).to(target.device)
        cols = torch.from_numpy(nearest_exact_index(target.shape[-1], logits.shape[-1])).to(target.device)
        target = target[:, rows[:, None], cols[None, :]]
    prob = cell_prob.reshape(-1).to(scores.dtype)
    selected = prob == 1 if mask_loss_on == "cells" else torch.ones_like(prob, dtype=torch.bool)
    if bool(selected.any()):
        mask_loss = F.binary_cross_entropy_with_logits(logits[selected], target[selected])
    else:
        mask_loss = zero
    iou_loss = F.mse_loss(scores, prob)
    total = iou_weight * iou_loss + mask_weight * mask_loss
    dice_value = 0.0
    if dice_weight > 0:
        cells = target.flatten(1).sum(1) > 0
        if bool(cells.any()):
            sig = torch.sigmoid(logits[cells]).flatten(1)
            truth = target[cells].flatten(1)
            dice = 1 - (2 * (sig * truth).sum(1) + 1) / (sig.sum(1) + truth.sum(1) + 1)
            dice_loss = dice.mean()
            total = total + dice_weight * dice_loss
            dice_value = float(dice_loss.detach())
    return LossParts(total=total, mask=float(mask_loss.detach()), iou=float(iou_loss.detach()), n_prompts=n,
                     dice=dice_value)
