"""Mask IoU and greedy NMS (cellseg1d.model.nms) against brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellseg1d.model.nms import (
    box_iou,
    boxes_overlap,
    greedy_nms,
    mask_boxes,
    mask_iou,
    mask_nms,
)


def _random_masks(rng: np.random.Generator, n: int, shape: tuple[int, int]) -> np.ndarray:
    """(n, H, W) bool: random rectangles with random holes, some empty, some duplicated."""
    h, w = shape
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        if i % 7 == 3:
            continue  # empty mask
        y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
        y1, x1 = rng.integers(y0 + 1, min(h, y0 + 12) + 1), rng.integers(x0 + 1, min(w, x0 + 12) + 1)
        masks[i, y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < 0.8
    masks[n - 1] = masks[0]  # an exact duplicate
    return masks


def _iou_brute(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            inter = np.logical_and(a[i], b[j]).sum()
            union = np.logical_or(a[i], b[j]).sum()
            out[i, j] = inter / union if union else 0.0
    return out


def _nms_brute(iou: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep: list[int] = []
    for i in order:
        if all(iou[i, k] <= threshold for k in keep):
            keep.append(i)
    return keep


@pytest.mark.parametrize("chunk", [1, 4, 128])
def test_mask_iou_matches_brute_force(chunk):
    rng = np.random.default_rng(0)
    masks = _random_masks(rng, 23, (40, 50))
    got = mask_iou(torch.from_numpy(masks), chunk=chunk).numpy()
    np.testing.assert_allclose(got, _iou_brute(masks, masks), atol=1e-6)
    assert got[0, -1] == pytest.approx(1.0)
    assert np.all(got[3] == 0)  # empty mask


def test_mask_iou_two_sets_and_given_boxes():
    rng = np.random.default_rng(1)
    a = _random_masks(rng, 9, (30, 33))
    b = _random_masks(rng, 14, (30, 33))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    got = mask_iou(ta, tb, boxes_a=mask_boxes(ta), boxes_b=mask_boxes(tb), chunk=3).numpy()
    assert got.shape == (9, 14)
    np.testing.assert_allclose(got, _iou_brute(a, b), atol=1e-6)


def test_mask_iou_empty_inputs_and_shape_mismatch():
    empty = torch.zeros((0, 8, 8), dtype=torch.bool)
    some = torch.ones((3, 8, 8), dtype=torch.bool)
    assert mask_iou(empty).shape == (0, 0)
    assert mask_iou(empty, some).shape == (0, 3)
    with pytest.raises(ValueError):
        mask_iou(some, torch.ones((2, 8, 9), dtype=torch.bool))


def test_mask_boxes_exclusive_ends_and_empty():
    masks = torch.zeros((3, 10, 12), dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 9, 11] = True
    assert mask_boxes(masks).tolist() == [[3, 2, 9, 5], [11, 9, 12, 10], [0, 0, 0, 0]]
    assert mask_boxes(torch.zeros((0, 4, 4), dtype=torch.bool)).shape == (0, 4)


def test_box_iou_and_overlap():
    a = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30]])
    b = torch.tensor([[5, 0, 15, 10], [10, 0, 20, 10], [0, 0, 0, 0]])
    np.testing.assert_allclose(box_iou(a, b).numpy(), [[50 / 150, 0, 0], [0, 0, 0]], atol=1e-6)
    assert boxes_overlap(a, b).tolist() == [[True, False, False], [False, False, False]]


def test_nms_keeps_higher_score_and_drops_overlaps():
    masks = torch.zeros((4, 20, 20), dtype=torch.bool)
    masks[0, 0:10, 0:10] = True  # low score
    masks[1, 0:10, 1:11] = True  # high score, IoU 0.82 with 0
    masks[2, 12:18, 12:18] = True  # alone
    masks[3, 9:12, 9:12] = True  # touches 0 and 1 slightly: IoU 1/108, 2/107 -> kept at 0.05
    scores = torch.tensor([0.5, 0.9, 0.1, 0.3])
    keep = mask_nms(masks, scores, 0.05).tolist()
    assert keep == [1, 3, 2]  # descending score; 0 dropped
    keep_strict = mask_nms(masks, scores, 0.005).tolist()
    assert keep_strict == [1, 2]  # now 3 overlaps 1 above the threshold


def test_nms_threshold_is_strict_greater():
    iou = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    assert greedy_nms(iou, torch.tensor([1.0, 0.0]), 0.5).tolist() == [0, 1]
    assert greedy_nms(iou, torch.tensor([1.0, 0.0]), 0.49).tolist() == [0]


def test_nms_empty_input():
    assert mask_nms(torch.zeros((0, 5, 5), dtype=torch.bool), torch.zeros(0), 0.05).shape == (0,)
    assert greedy_nms(torch.zeros((0, 0)), torch.zeros(0), 0.5).shape == (0,)


@pytest.mark.parametrize("max_rounds", [1, 64])
def test_greedy_nms_matches_sequential_rule(max_rounds):
    rng = np.random.default_rng(3)
    for trial in range(20):
        n = int(rng.integers(1, 40))
        iou = rng.random((n, n)) ** 4  # mostly small, some large
        iou = (iou + iou.T) / 2
        np.fill_diagonal(iou, 1.0)
        scores = rng.random(n).round(1)  # with ties
        keep = greedy_nms(torch.from_numpy(iou), torch.from_numpy(scores), 0.3, max_rounds=max_rounds).tolist()
        assert keep == _nms_brute(iou, scores, 0.3), trial


def test_greedy_nms_long_suppression_chain():
    # i overlaps i + 1 only: the greedy answer alternates keep/drop along the chain.
    n = 101
    iou = np.eye(n)
    for i in range(n - 1):
        iou[i, i + 1] = iou[i + 1, i] = 0.9
    scores = np.linspace(1, 0, n)
    keep = greedy_nms(torch.from_numpy(iou), torch.from_numpy(scores), 0.5, max_rounds=8).tolist()
    assert keep == list(range(0, n, 2))


def test_mask_nms_matches_brute_force_on_random_masks():
    rng = np.random.default_rng(5)
    masks = _random_masks(rng, 30, (32, 32))
    scores = rng.random(30)
    keep = mask_nms(torch.from_numpy(masks), torch.from_numpy(scores), 0.05, chunk=7).tolist()
    assert keep == _nms_brute(_iou_brute(masks, masks), scores, 0.05)
