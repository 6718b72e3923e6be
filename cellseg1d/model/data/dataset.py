"""The training dataset: tiles, augmented items, prompts and low-resolution targets in batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cellseg1d.model.data.augment import AugmentSettings, augment_item
from cellseg1d.model.data.convert import LOW_RES_FACTOR, UNAUGMENTED_MODES, TrainingDataError
from cellseg1d.model.data.prompts import PromptSettings, at_edge, sample_prompts
from cellseg1d.model.data.resize import nearest_exact_index, resize_linear_exact, resize_nearest_exact


def low_res_size(image_size: int) -> int:
    """Side of SAM's low-resolution mask logits for an input of ``image_size``."""
    return image_size // LOW_RES_FACTOR


def _low_res_targets(mask: np.ndarray, cells: np.ndarray, low: int) -> np.ndarray:
    """Every prompt's target (its cell's mask; empty for 0) resized to ``low`` x ``low``, nearest-exact.

    The reference resizes each target with ``cv2.INTER_NEAREST_EXACT`` to the
    logits' size, whatever the item's size.
    """
    rows = nearest_exact_index(mask.shape[0], low)
    cols = nearest_exact_index(mask.shape[1], low)
    small = mask[rows[:, None], cols[None, :]]
    targets = np.zeros((len(cells), low, low), dtype=np.float32)
    for i, cell in enumerate(cells):
        if cell != 0:
            targets[i] = small == cell
    return targets


@dataclass
class CellTileDataset(torch.utils.data.Dataset):
    """Training items with point prompts, deterministic per (seed, epoch, index).

    Every item is a dict, or None when the augmentation moved all of the
    tile's points out of the image (the reference drops such an item from its
    batch):

    - ``image``: float32 (3, S, S), RGB 0..255 (SAM normalises it itself);
      without augmentation the tile as it is, (3, t, t) (SAM pads it to S x S,
      as in the reference), unless ``unaugmented="resize"``;
    - ``points``: float32 (N, 2), (x, y) pixel indices of the image;
    - ``point_labels``: int64 (N,), the label the prompt encoder gets for every
      point: 1 (a foreground click) for all of them, as in the reference:
      background prompts differ only by their targets;
    - ``targets``: float32 (N, S/4, S/4), the prompted cell's mask resized to
      SAM's low-res logits (nearest-exact), empty for negatives;
    - ``cell_prob``: float32 (N,), 1 for cell prompts, 0 for background and
      for a cell whose low-res target is empty.

    N may be 0 (no usable point): the training loop skips such a batch.
    """

    tiles: list[tuple[np.ndarray, np.ndarray]]
    image_size: int = 512
    seed: int = 0
    augment: AugmentSettings | None = field(default_factory=AugmentSettings)
    prompts: PromptSettings = field(default_factory=PromptSettings)
    epoch: int = 0
    #: Without augmentation: "pad" (the reference) or "resize" (the tile and
    #: its points are resized to the model input, so targets line up with it).
    unaugmented: str = "pad"

    def __post_init__(self) -> None:
        if self.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16, got {self.image_size}")
        if not self.tiles:
            raise ValueError("no tiles to train on")
        if self.unaugmented not in UNAUGMENTED_MODES:
            raise ValueError(f"unaugmented must be one of {', '.join(UNAUGMENTED_MODES)}, got {self.unaugmented!r}")
        if self.augment is None and self.unaugmented == "pad":
            side = max(max(mask.shape) for _, mask in self.tiles)
            if side > self.image_size:
                raise TrainingDataError(
                    f"without augmentation the {side} px tiles go to the model as they are, but its input is "
                    f"{self.image_size} px; use tiles of at most {self.image_size} px or unaugmented='resize'"
                )

    def __len__(self) -> int:
        return len(self.tiles)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentations of ``epoch`` (every epoch sees new random ones)."""
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        """The generator of item ``index`` in the current epoch."""
        return np.random.default_rng([self.seed, 0, self.epoch, index])

    def order(self, epoch: int) -> np.ndarray:
        """The (shuffled) order in which the items of ``epoch`` are visited."""
        return np.random.default_rng([self.seed, 1, epoch]).permutation(len(self))

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        image, mask = self.tiles[index]
        rng = self.rng(index)
        prompts = sample_prompts(mask, rng, self.prompts)
        size = self.image_size
        if self.augment is not None:
            moved = augment_item(image, mask, prompts.points, size, rng, self.augment)
            if moved.kept.size == 0:
                return None
            image, mask = moved.image, moved.mask
            points, labels = moved.points, prompts.labels[moved.kept]
            cells = np.where(labels == 1, _labels_at(mask, points), 0)
            keep = (labels == 0) | self._usable(mask, cells)
            points, labels, cells = points[keep], labels[keep], cells[keep]
        elif self.unaugmented == "resize" and mask.shape != (size, size):
            points = np.stack([np.floor((prompts.points[:, 0] + 0.5) * size / mask.shape[1]),
                               np.floor((prompts.points[:, 1] + 0.5) * size / mask.shape[0])],
                              axis=1).astype(np.float32).reshape(-1, 2)
            image, mask = resize_linear_exact(image, (size, size)), resize_nearest_exact(mask, (size, size))
            labels, cells = prompts.labels, prompts.cell_ids
        else:
            points, labels, cells = prompts.points, prompts.labels, prompts.cell_ids
        targets = _low_res_targets(mask, cells, low_res_size(size))
        cell_prob = ((labels == 1) & (targets.reshape(len(labels), -1).max(axis=1, initial=0) > 0))
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float(),
            "points": torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32).reshape(-1, 2)),
            "point_labels": torch.ones(len(labels), dtype=torch.int64),
            "targets": torch.from_numpy(targets),
            "cell_prob": torch.from_numpy(cell_prob.astype(np.float32)),
        }

    def _usable(self, mask: np.ndarray, cells: np.ndarray) -> np.ndarray:
        """The reference's check of moved positive points: on a cell, area > min, not in the edge band."""
        ok = np.zeros(len(cells), dtype=bool)
        for i, cell in enumerate(cells):
            if cell == 0:
                continue
            inside = mask == cell
            if np.count_nonzero(inside) <= self.prompts.min_cell_area:
                continue
            rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
            box = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
            ok[i] = not at_edge(box, self.prompts.border, mask.shape)
        return ok


def _labels_at(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Label under every (x, y) point."""
    if len(points) == 0:
        return np.zeros(0, dtype=np.int64)
    xy = points.astype(np.int64)
    return mask[xy[:, 1], xy[:, 0]].astype(np.int64)


def collate_items(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch items: images stacked (B, 3, S, S); prompts stay per-item lists."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "points": [it["points"] for it in items],
        "point_labels": [it["point_labels"] for it in items],
        "targets": [it["targets"] for it in items],
        "cell_prob": [it["cell_prob"] for it in items],
    }
