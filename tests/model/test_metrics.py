"""Tests of cellseg1d.model.metrics on hand-made label images with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from cellseg1d.model.metrics import APResult, _count_matches, average_precision, iou_matrix, mean_ap


def _square(shape: tuple[int, int], y: int, x: int, size: int, label: int, out=None):
    img = np.zeros(shape, dtype=np.int32) if out is None else out
    img[y : y + size, x : x + size] = label
    return img


def _three_squares() -> np.ndarray:
    gt = np.zeros((40, 60), dtype=np.int32)
    _square(gt.shape, 2, 2, 10, 1, gt)
    _square(gt.shape, 20, 20, 10, 2, gt)
    _square(gt.shape, 5, 40, 8, 3, gt)
    return gt


def _counts(r: APResult) -> tuple[int, int, int, float]:
    return (r.tp, r.fp, r.fn, r.ap)


def test_identical_images_score_one_at_all_thresholds():
    gt = _three_squares()
    results = average_precision(gt.copy(), gt, thresholds=(0.5, 0.75, 0.9, 1.0))
    assert [r.threshold for r in results] == [0.5, 0.75, 0.9, 1.0]
    for r in results:
        assert _counts(r) == (3, 0, 0, 1.0)


def test_shifted_square_iou_one_third_both_sides_of_threshold():
    gt = _square((20, 30), 2, 2, 10, 1)
    pred = _square((20, 30), 2, 7, 10, 1)  # overlaps by 5 of 10 columns
    iou = iou_matrix(pred, gt)
    assert iou.shape == (1, 1)
    assert iou[0, 0] == pytest.approx(50 / 150)
    low, high, half = average_precision(pred, gt, thresholds=(0.3, 0.34, 0.5))
    assert _counts(low) == (1, 0, 0, 1.0)
    assert _counts(high) == (0, 1, 1, 0.0)
    assert _counts(half) == (0, 1, 1, 0.0)


def test_missing_object_is_false_negative():
    gt = _three_squares()
    pred = gt.copy()
    pred[pred == 2] = 0
    (r,) = average_precision(pred, gt, thresholds=(0.5,))
    assert _counts(r) == (2, 0, 1, pytest.approx(2 / 3))


def test_extra_object_is_false_positive():
    gt = _three_squares()
    pred = gt.copy()
    _square(pred.shape, 30, 2, 6, 9, pred)
    (r,) = average_precision(pred, gt, thresholds=(0.5,))
    assert _counts(r) == (3, 1, 0, pytest.approx(3 / 4))


def test_merged_pair_gives_at_most_one_true_positive():
    gt = np.zeros((20, 30), dtype=np.int32)
    gt[0:10, 0:10] = 1
    gt[0:10, 10:20] = 2
    pred = np.zeros_like(gt)
    pred[0:10, 0:20] = 1  # covers both ground-truth squares
    np.testing.assert_allclose(iou_matrix(pred, gt), [[0.5], [0.5]])
    at_half, at_075 = average_precision(pred, gt, thresholds=(0.5, 0.75))
    # IoU is exactly 0.5 with both: one of them is matched, never both.
    assert _counts(at_half) == (1, 0, 1, 0.5)
    assert _counts(at_075) == (0, 1, 2, 0.0)


def test_split_object_gives_at_most_one_true_positive():
    gt = np.zeros((20, 30), dtype=np.int32)
    gt[0:10, 0:20] = 4
    pred = np.zeros_like(gt)
    pred[0:10, 0:14] = 1  # IoU 0.7
    pred[0:10, 14:20] = 2  # IoU 0.3
    (r,) = average_precision(pred, gt, thresholds=(0.25,))
    assert _counts(r) == (1, 1, 0, 0.5)


def test_non_consecutive_labels_and_sorted_order():
    gt = np.zeros((10, 20), dtype=np.int64)
    gt[0:4, 0:4] = 50  # 16 px
    gt[5:10, 10:15] = 7  # 25 px
    pred = np.zeros((10, 20), dtype=np.uint16)
    pred[0:4, 0:2] = 1000  # 8 px inside gt 50
    pred[5:10, 10:15] = 3  # identical to gt 7
    pred[0:2, 18:20] = 12  # 4 px on background
    iou = iou_matrix(pred, gt)
    # rows: gt labels 7, 50; cols: pred labels 3, 12, 1000
    expected = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 8 / 16]])
    np.testing.assert_array_equal(iou, expected)
    assert iou.dtype == np.float64
    (r,) = average_precision(pred, gt, thresholds=(0.5,))
    assert _counts(r) == (2, 1, 0, pytest.approx(2 / 3))


def test_iou_matrix_exact_values_small_example():
    gt = np.array(
        [
            [1, 1, 0, 0],
            [1, 1, 0, 2],
            [0, 0, 2, 2],
        ]
    )
    pred = np.array(
        [
            [5, 0, 0, 0],
            [5, 5, 6, 6],
            [0, 0, 6, 6],
        ]
    )
    # gt1 = 4 px, gt2 = 3 px, pred5 = 3 px, pred6 = 4 px
    # gt1 & pred5 = 3 -> 3/4 ; gt1 & pred6 = 0
    # gt2 & pred5 = 0 ; gt2 & pred6 = 3 -> 3/4
    np.testing.assert_array_equal(iou_matrix(pred, gt), [[0.75, 0.0], [0.0, 0.75]])
    pred2 = pred.copy()
    pred2[0, 1] = 6  # pred6 now touches gt1 by one pixel: union 4 + 5 - 1
    np.testing.assert_array_equal(iou_matrix(pred2, gt), [[0.75, 1 / 8], [0.0, 3 / 5]])


def test_empty_images():
    empty = np.zeros((8, 8), dtype=np.int32)
    full = _square((8, 8), 1, 1, 4, 3)
    for r in average_precision(empty, empty.copy()):
        assert _counts(r) == (0, 0, 0, 1.0)
    (missing,) = average_precision(empty, full, thresholds=(0.5,))
    assert _counts(missing) == (0, 0, 1, 0.0)
    (spurious,) = average_precision(full, empty, thresholds=(0.5,))
    assert _counts(spurious) == (0, 1, 0, 0.0)
    assert iou_matrix(empty, full).shape == (1, 0)
    assert iou_matrix(full, empty).shape == (0, 1)


def test_shape_mismatch_raises_naming_both_shapes():
    with pytest.raises(ValueError, match=r"\(10, 12\).*\(10, 11\)"):
        average_precision(np.zeros((10, 12), np.int32), np.zeros((10, 11), np.int32))
    with pytest.raises(ValueError, match="shape"):
        iou_matrix(np.zeros((4, 4), np.int32), np.zeros((4, 5), np.int32))


@pytest.mark.parametrize(
    "bad",
    [np.zeros((4, 4), dtype=np.float32), np.zeros((4, 4), dtype=bool), -np.ones((4, 4), np.int8)],
)
def test_invalid_label_images_raise(bad):
    with pytest.raises(ValueError):
        iou_matrix(bad, np.zeros((4, 4), np.int32))


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5, float("nan")])
def test_invalid_threshold_raises(threshold):
    gt = _three_squares()
    with pytest.raises(ValueError, match="threshold"):
        average_precision(gt, gt, thresholds=(threshold,))


def test_matching_prefers_more_true_positives_over_higher_total_iou():
    # Maximising total IoU alone would pair (0, 0) (0.9) and leave one TP;
    # at threshold 0.3 two pairs (0, 1) and (1, 0) reach the threshold.
    iou = np.array([[0.9, 0.3], [0.3, 0.0]])
    assert _count_matches(iou, 0.3) == 2
    assert _count_matches(iou, 0.5) == 1
    assert _count_matches(iou, 0.95) == 0


def test_matching_many_objects_is_one_to_one():
    # 900 squares; the prediction is shifted by one pixel, so every gt object
    # overlaps its own pred object (IoU 2/3) and no other.
    gt = np.zeros((300, 300), dtype=np.int32)
    pred = np.zeros_like(gt)
    label = 0
    for y in range(0, 300, 10):
        for x in range(0, 300, 10):
            label += 1
            gt[y + 2 : y + 7, x + 2 : x + 7] = label
            pred[y + 2 : y + 7, x + 3 : x + 8] = 10 * label  # non-consecutive
    iou = iou_matrix(pred, gt)
    assert iou.shape == (900, 900)
    np.testing.assert_allclose(np.diag(iou), 20 / 30)
    assert np.count_nonzero(iou) == 900
    at_half, at_07 = average_precision(pred, gt, thresholds=(0.5, 0.7))
    assert _counts(at_half) == (900, 0, 0, 1.0)
    assert _counts(at_07) == (0, 900, 900, 0.0)


def test_mean_ap():
    gt = _three_squares()
    missing = gt.copy()
    missing[missing == 2] = 0
    pairs = [(gt, gt), (missing, gt)]
    assert mean_ap(pairs) == pytest.approx((1.0 + 2 / 3) / 2)
    assert mean_ap(iter(pairs), threshold=0.5) == pytest.approx((1.0 + 2 / 3) / 2)
    with pytest.raises(ValueError):
        mean_ap([])


def test_huge_label_values_match_small_ones():
    gt = _three_squares()
    pred = gt.copy()
    pred[pred == 2] = 0
    _square(pred.shape, 30, 2, 6, 9, pred)
    lut = np.array([0, 2**40, 17, 2**62], dtype=np.uint64)
    big_gt = lut[gt]
    big_pred = np.where(pred == 9, np.uint64(2**63 + 5), lut[np.minimum(pred, 3)])
    # gt rows are sorted by value: 17 (was 2), 2**40 (was 1), 2**62 (was 3);
    # pred columns keep their order (1, 3, 9 -> 2**40, 2**62, 2**63 + 5).
    expected = iou_matrix(pred, gt)[[1, 0, 2]]
    np.testing.assert_array_equal(iou_matrix(big_pred, big_gt), expected)
    assert average_precision(big_pred, big_gt) == average_precision(pred, gt)
