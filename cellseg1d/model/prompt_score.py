"""Scoring an adapter with point prompts: the mean IoU of one prompt per true cell."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class PointPromptScore:
    """How well a model segments known cells from one point each."""

    #: Mean IoU over the cells (0 for a cell whose prediction is empty).
    miou: float
    #: IoU of every cell, in the order of its label value.
    ious: list[float]
    #: Label image of the predicted masks (painted largest first, so smaller ones win).
    labels: np.ndarray


@torch.no_grad()
def point_prompt_score(
    model: nn.Module,
    image: np.ndarray,
    mask: np.ndarray,
    *,
    channels: tuple[int, ...] | None = None,
    device: str | torch.device = "cpu",
    prompts_per_batch: int = 64,
) -> PointPromptScore:
    """Prompt ``model`` with one point per true cell and compare the masks with the cells.

    Each cell's point is its distance-transform maximum (the pixel farthest
    from its edge). The image is resized to the model's input size (S x S;
    non-square images are stretched), every prompt predicts one mask (single
    mask output), and the low-resolution logits are resized to the image and
    thresholded at 0. A check of training, independent of the automatic
    (grid) segmentation.
    """
    from scipy import ndimage

    from cellseg1d.model.data import augment, to_uint8_rgb
    from cellseg1d.model.lora import unwrap

    sam = unwrap(model)
    was_training = model.training
    model.eval()
    device = torch.device(device)
    size = sam.image_encoder.img_size
    labels = np.asarray(mask)
    h, w = labels.shape
    rgb, _ = augment(to_uint8_rgb(image, channels), labels, size, np.random.default_rng(0), None)
    ids = [int(v) for v in np.unique(labels) if v != 0]
    boxes = ndimage.find_objects(labels.astype(np.int64)) if ids else []
    points = []
    for cell in ids:
        ys, xs = boxes[cell - 1]
        distance = ndimage.distance_transform_edt(np.pad(labels[ys, xs] == cell, 1))
        row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
        points.append(((xs.start + col - 1 + 0.5) * size / w - 0.5, (ys.start + row - 1 + 0.5) * size / h - 0.5))
    image_t = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float()[None].to(device)
    coords = torch.tensor(points, dtype=torch.float32, device=device).reshape(-1, 2)
    embeddings = sam.image_encoder(sam.preprocess(image_t))
    dense_pe = sam.prompt_encoder.get_dense_pe()
    logits_all = []
    for start in range(0, len(ids), prompts_per_batch):
        chunk = coords[start : start + prompts_per_batch]
        sparse, dense = sam.prompt_encoder(
            points=(chunk[:, None, :], torch.ones(len(chunk), 1, dtype=torch.int64, device=device)),
            boxes=None, masks=None,
        )
        logits, _ = sam.mask_decoder(image_embeddings=embeddings, image_pe=dense_pe, sparse_prompt_embeddings=sparse,
                                     dense_prompt_embeddings=dense, multimask_output=False)
        logits_all.append(torch.nn.functional.interpolate(logits.float(), (h, w), mode="bilinear",
                                                          align_corners=False)[:, 0].cpu())
    predicted = (torch.cat(logits_all) > 0).numpy() if logits_all else np.zeros((0, h, w), bool)
    ious = []
    for cell, pred in zip(ids, predicted, strict=True):
        truth = labels == cell
        union = np.count_nonzero(truth | pred)
        ious.append(float(np.count_nonzero(truth & pred) / union) if union else 0.0)
    painted = np.zeros((h, w), dtype=np.int32)
    for k in np.argsort([-p.sum() for p in predicted], kind="stable"):
        painted[predicted[k]] = k + 1
    model.train(was_training)
    return PointPromptScore(miou=float(np.mean(ious)) if ious else 0.0, ious=ious, labels=painted)
