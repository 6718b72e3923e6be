"""Mask IoU and greedy non-maximum suppression (NMS) on the device, vectorised.

CellSeg1 removes duplicate masks by their mask IoU (not box IoU) with a very
low threshold (0.05): cells rarely overlap, so any real overlap means two
prompts found the same cell. Naively this is a Python loop over mask pairs;
here it is

* :func:`mask_iou`: intersections as a matrix product of flattened binary
  masks (float32 on the device; 0/1 products summed in float32 are exact up
  to 2**24 pixels), computed block by block. Masks are sorted by box top,
  and a block of pairs is skipped when no two boxes in it overlap; the other
  blocks are restricted to the rows and columns where both groups of masks
  can be non-zero. Exact, and memory is bounded by the block size.
* :func:`greedy_nms`: the classic greedy rule ("take the best remaining mask,
  drop everything overlapping it by more than the threshold") evaluated as a
  fixed point of whole-tensor boolean operations instead of one Python step
  per mask.
* the box gate (``gate_boxes``): the CellSeg1 reference computes the mask IoU
  only for pairs whose bounding boxes, with inclusive ends, overlap with a
  positive width and height, i.e. share at least two rows and two columns;
  other pairs count as IoU 0 even when their masks touch. :func:`mask_nms`
  applies the same test when given the boxes.

Shapes: masks (N, H, W) bool, boxes (N, 4) int64 ``(x0, y0, x1, y1)`` with
exclusive ends (all zero for an empty mask), scores (N,).
"""

from __future__ import annotations

import numpy as np
import torch

#: Masks per block of the IoU matrix product, by device type: small blocks cover small
#: regions (less arithmetic; best on CPU), large blocks mean fewer kernel launches (GPU).
DEFAULT_CHUNK = {"cpu": 32, "cuda": 256}
#: Fixed-point rounds of :func:`greedy_nms` before it finishes sequentially.
MAX_FIXED_POINT_ROUNDS = 64


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Bounding boxes (N, 4) int64 ``(x0, y0, x1, y1)``, exclusive ends, of masks (N, H, W).

    An empty mask gets ``(0, 0, 0, 0)``.
    """
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.int64, device=masks.device)
    as_bytes = masks.view(torch.uint8)  # amax over bytes is much faster than any() over bools on CPU
    rows = as_bytes.amax(dim=2)  # (N, H) 1 where the row holds a pixel
    cols = as_bytes.amax(dim=1)  # (N, W)
    y0 = rows.argmax(dim=1)
    y1 = h - rows.flip(1).argmax(dim=1)
    x0 = cols.argmax(dim=1)
    x1 = w - cols.flip(1).argmax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).to(torch.int64)  # (N, 4)
    empty = rows.sum(dim=1) == 0
    return boxes.masked_fill(empty[:, None], 0)


def mask_areas(masks: torch.Tensor) -> torch.Tensor:
    """Pixel counts (N,) float32 of masks (N, H, W) bool (exact up to 2**24)."""
    as_bytes = masks.view(torch.uint8)
    row_dtype = torch.int16 if masks.shape[2] < 2**15 else torch.int32
    return as_bytes.sum(dim=2, dtype=row_dtype).sum(dim=1, dtype=torch.int64).to(torch.float32)


def boxes_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) bool: whether box ``a[i]`` and box ``b[j]`` share at least one pixel."""
    x0 = torch.maximum(a[:, None, 0], b[None, :, 0])
    y0 = torch.maximum(a[:, None, 1], b[None, :, 1])
    x1 = torch.minimum(a[:, None, 2], b[None, :, 2])
    y1 = torch.minimum(a[:, None, 3], b[None, :, 3])
    return (x1 > x0) & (y1 > y0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) float32 IoU of boxes ``a`` (N, 4) and ``b`` (M, 4) (exclusive ends)."""
    a = a.to(torch.float32)
    b = b.to(torch.float32)
    iw = (torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0])).clamp(min=0)
    ih = (torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1])).clamp(min=0)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def boxes_share_two(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) bool: boxes ``a[i]`` and ``b[j]`` (exclusive ends) share at least two rows and two columns.

    The reference's overlap test: with inclusive ends ``(x1 - 1, y1 - 1)``,
    ``min(x1) - max(x0) > 0`` and the same for y.
    """
    width = torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0])
    height = torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1])
    return (width >= 2) & (height >= 2)


def default_chunk(device: torch.device | str) -> int:
    """The block size used when none is given, for masks on ``device``."""
    return DEFAULT_CHUNK.get(torch.device(device).type, 128)


def _union_box(boxes: torch.Tensor) -> tuple[int, int, int, int] | None:
    """The box enclosing the non-empty boxes of (k, 4), or None if all are empty."""
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if not bool(nonempty.any()):
        return None
    b = boxes[nonempty]
    return (int(b[:, 0].min()), int(b[:, 1].min()), int(b[:, 2].max()), int(b[:, 3].max()))


def _intersections(
    a: torch.Tensor,
    order_a: torch.Tensor,
    boxes_a: torch.Tensor,
    b: torch.Tensor,
    order_b: torch.Tensor,
    boxes_b: torch.Tensor,
    chunk: int,
    symmetric: bool,
) -> torch.Tensor:
    """(N, M) float32 pixel counts of ``a[i] & b[j]``, in the orders ``order_a`` x ``order_b``.

    ``boxes_a``/``boxes_b`` are already in those orders. Blocks are gathered
    from ``a`` and ``b`` only over the region where they can meet, so no
    sorted copy of the masks is made.
    """
    n, m = order_a.shape[0], order_b.shape[0]
    inter = torch.zeros((n, m), dtype=torch.float32, device=a.device)
    blocks_a = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    blocks_b = [(s, min(s + chunk, m)) for s in range(0, m, chunk)]
    union_a = [_union_box(boxes_a[s:e]) for s, e in blocks_a]
    union_b = [_union_box(boxes_b[s:e]) for s, e in blocks_b]
    for i, (sa, ea) in enumerate(blocks_a):
        ua = union_a[i]
        if ua is None:
            continue
        for j, (sb, eb) in enumerate(blocks_b):
            if symmetric and j < i:
                continue  # mirrored below
            ub = union_b[j]
            if ub is None:
                continue
            x0, y0 = max(ua[0], ub[0]), max(ua[1], ub[1])
            x1, y1 = min(ua[2], ub[2]), min(ua[3], ub[3])
            if x1 <= x0 or y1 <= y0:
                continue  # no mask of block i can meet a mask of block j
            if not bool(boxes_overlap(boxes_a[sa:ea], boxes_b[sb:eb]).any()):
                continue
            fa = a[order_a[sa:ea], y0:y1, x0:x1].reshape(ea - sa, -1).to(torch.float32)  # (ka, P)
            fb = b[order_b[sb:eb], y0:y1, x0:x1].reshape(eb - sb, -1).to(torch.float32)  # (kb, P)
            block = fa @ fb.T  # (ka, kb)
            inter[sa:ea, sb:eb] = block
            if symmetric and j > i:
                inter[sb:eb, sa:ea] = block.T
    return inter


def mask_iou(
    masks_a: torch.Tensor,
    masks_b: torch.Tensor | None = None,
    *,
    boxes_a: torch.Tensor | None = None,
    boxes_b: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Pairwise IoU (N, M) float32 of binary masks ``masks_a`` (N, H, W) and ``masks_b`` (M, H, W).

    With ``masks_b`` omitted, the IoU of ``masks_a`` with itself (N, N).
    Boxes are computed when not given; ``chunk`` (masks per block) defaults
    to :func:`default_chunk`. The IoU of two empty masks is 0.
    """
    if masks_a.dtype != torch.bool:
        masks_a = masks_a.bool()
    symmetric = masks_b is None
    if symmetric:
        masks_b, boxes_b = masks_a, boxes_a
    elif masks_b.dtype != torch.bool:
        masks_b = masks_b.bool()
    if masks_a.shape[1:] != masks_b.shape[1:]:
        raise ValueError(f"mask sizes differ: {tuple(masks_a.shape[1:])} vs {tuple(masks_b.shape[1:])}")
    n, m = masks_a.shape[0], masks_b.shape[0]
    if n == 0 or m == 0:
        return torch.zeros((n, m), dtype=torch.float32, device=masks_a.device)
    chunk = chunk or default_chunk(masks_a.device)
    if boxes_a is None:
        boxes_a = mask_boxes(masks_a)
    if symmetric:
        boxes_b = boxes_a
    elif boxes_b is None:
        boxes_b = mask_boxes(masks_b)

    # Sort by box top so that blocks are horizontal bands: most band pairs cannot meet.
    order_a = torch.argsort(boxes_a[:, 1], stable=True)
    order_b = order_a if symmetric else torch.argsort(boxes_b[:, 1], stable=True)
    inter_sorted = _intersections(masks_a, order_a, boxes_a[order_a], masks_b, order_b, boxes_b[order_b], chunk,
                                  symmetric)
    inter = torch.empty_like(inter_sorted)
    inter[order_a[:, None], order_b[None, :]] = inter_sorted
    if symmetric:
        area_a = area_b = inter.diagonal().clone()  # a mask's intersection with itself: diagonal blocks always run
    else:
        area_a, area_b = mask_areas(masks_a), mask_areas(masks_b)  # (N,), (M,)

    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1.0), torch.zeros_like(inter))


def _greedy_sequential(over: np.ndarray) -> np.ndarray:
    """Greedy suppression on a (N, N) bool "i suppresses j" matrix (rows in rank order)."""
    n = over.shape[0]
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        if keep[i]:
            keep[i + 1 :] &= ~over[i, i + 1 :]
    return keep


def greedy_nms(
    iou: torch.Tensor, scores: torch.Tensor, threshold: float, max_rounds: int = MAX_FIXED_POINT_ROUNDS
) -> torch.Tensor:
    """Indices kept by greedy NMS over a precomputed IoU matrix, best score first.

    Masks are ranked by descending score (ties: lower index first). A mask is
    kept unless a kept mask of higher rank overlaps it with IoU > threshold.

    The kept set is the unique fixed point of ``keep[j] = not any(keep[i] and
    over[i, j] for i ranked above j)``: iterating this from "keep all" fixes
    one more level of the suppression chain per round, so it ends after as
    many rounds as the longest chain (a few in practice), each a single
    boolean tensor operation. After ``max_rounds`` it finishes with the
    sequential rule on the CPU.

    Returns int64 (K,) indices into the input, in descending score order.
    """
    n = iou.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=iou.device)
    order = torch.argsort(scores.to(torch.float32), descending=True, stable=True)
    ranked = iou[order][:, order]  # (N, N) in rank order
    over = torch.triu(ranked > threshold, diagonal=1)  # over[i, j]: i ranked above j and overlapping
    if not bool(over.any()):
        return order
    keep = torch.ones(n, dtype=torch.bool, device=iou.device)
    for _ in range(max_rounds):
        suppressed = (over & keep[:, None]).any(dim=0)  # (N,)
        new_keep = ~suppressed
        if torch.equal(new_keep, keep):
            return order[keep]
        keep = new_keep
    keep_np = _greedy_sequential(over.cpu().numpy())
    return order[torch.from_numpy(keep_np).to(iou.device)]


def mask_nms(
    masks: torch.Tensor,
    scores: torch.Tensor,
    threshold: float,
    *,
    boxes: torch.Tensor | None = None,
    gate_boxes: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Greedy NMS of masks (N, H, W) by mask IoU; kept indices (K,) int64, best score first (ties: lower index).

    ``boxes`` are the masks' own boxes (computed when omitted). With
    ``gate_boxes`` (N, 4), only pairs whose gate boxes share at least two rows
    and two columns (:func:`boxes_share_two`) can suppress each other.
    """
    if masks.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=masks.device)
    iou = mask_iou(masks, boxes_a=boxes, chunk=chunk)
    if gate_boxes is not None:
        iou = torch.where(boxes_share_two(gate_boxes, gate_boxes), iou, torch.zeros_like(iou))
    return greedy_nms(iou, scores, threshold)
