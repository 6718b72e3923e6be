"""Evaluation of instance segmentations against a ground truth.

The score is the one used in the cellpose and stardist papers: predicted and
ground-truth objects are matched one to one, a matched pair whose
intersection over union (IoU) reaches a threshold is a true positive (TP),
unmatched predictions are false positives (FP) and unmatched ground-truth
objects are false negatives (FN), and

    AP = TP / (TP + FP + FN).

Label images are integer arrays in which 0 is background and every other
value is one object; the values need not be consecutive.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = ["APResult", "average_precision", "iou_matrix", "mean_ap"]


@dataclass(frozen=True)
class APResult:
    """Matching result at one IoU threshold.

    Attributes
    ----------
    threshold : float
        IoU a matched pair needs to count as a true positive.
    tp : int
        Number of true positives (matched pairs with IoU >= threshold).
    fp : int
        Number of predicted objects without a true-positive match.
    fn : int
        Number of ground-truth objects without a true-positive match.
    ap : float
        ``tp / (tp + fp + fn)``; 1.0 when both images are empty.
    """

    threshold: float
    tp: int
    fp: int
    fn: int
    ap: float


def _check_labels(labels: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be an integer label image, got dtype {arr.dtype}")
    if arr.size and np.issubdtype(arr.dtype, np.signedinteger) and arr.min() < 0:
        raise ValueError(f"{name} contains negative labels; labels must be >= 0")
    return arr


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred_arr = _check_labels(pred, "pred")
    gt_arr = _check_labels(gt, "gt")
    if pred_arr.shape != gt_arr.shape:
        raise ValueError(
            f"pred and gt must have the same shape, got pred {pred_arr.shape} "
            f"and gt {gt_arr.shape}"
        )
    return pred_arr, gt_arr


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map the label values of ``labels`` to 0..N.

    Returns
    -------
    ids : ndarray, shape (N,)
        The non-zero label values, sorted (dtype of ``labels``, or int64).
    index : ndarray of intp, shape (labels.size,)
        For every pixel, 0 for background or ``k`` (1-based) for ``ids[k - 1]``.
    """
    flat = labels.ravel()
    if flat.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.intp)
    max_label = int(flat.max())
    if max_label <= 4 * flat.size + 1024:
        # Small label values: a lookup table avoids sorting all pixels.
        flat = flat.astype(np.intp, copy=False)
        present = np.bincount(flat, minlength=1) > 0
        present[0] = False
        ids = np.flatnonzero(present).astype(np.int64)
        lut = np.zeros(present.size, dtype=np.intp)
        lut[ids] = np.arange(1, ids.size + 1, dtype=np.intp)
        return ids, lut[flat]
    values, inverse = np.unique(flat, return_inverse=True)
    inverse = inverse.astype(np.intp, copy=False)
    if values[0] == 0:
        return values[1:], inverse
    return values, inverse + 1


def iou_matrix(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Intersection over union between every ground-truth and predicted object.

    Parameters
    ----------
    pred : ndarray of int
        Predicted label image (0 = background).
    gt : ndarray of int
        Ground-truth label image of the same shape (0 = background).

    Returns
    -------
    iou : ndarray of float64, shape (n_gt, n_pred)
        ``iou[i, j]`` is the IoU of the ``i``-th ground-truth object and the
        ``j``-th predicted object, objects taken in increasing order of their
        label values. Background is not an object.

    Raises
    ------
    ValueError
        If the shapes differ or an image is not an integer label image.

    Notes
    -----
    Overlaps are counted in one pass over the pixels in which both images
    are foreground (a sparse joint histogram of label pairs), so the cost
    grows with the number of pixels, not with the number of objects.
    """
    pred_arr, gt_arr = _check_pair(pred, gt)
    gt_ids, gt_index = _compact(gt_arr)
    pred_ids, pred_index = _compact(pred_arr)
    n_gt, n_pred = gt_ids.size, pred_ids.size
    iou = np.zeros((n_gt, n_pred), dtype=np.float64)
    if n_gt == 0 or n_pred == 0:
        return iou

    gt_area = np.bincount(gt_index, minlength=n_gt + 1)[1:]
    pred_area = np.bincount(pred_index, minlength=n_pred + 1)[1:]
    both = (gt_index > 0) & (pred_index > 0)
    keys = (gt_index[both].astype(np.int64) - 1) * n_pred + (pred_index[both] - 1)
    if keys.size == 0:
        return iou
    if n_gt * n_pred <= max(keys.size, 1 << 16):
        counts = np.bincount(keys, minlength=n_gt * n_pred)
        pair_keys = np.flatnonzero(counts)
        intersection = counts[pair_keys]
    else:
        pair_keys, intersection = np.unique(keys, return_counts=True)
    rows, cols = np.divmod(pair_keys, n_pred)
    union = gt_area[rows] + pred_area[cols] - intersection
    iou[rows, cols] = intersection / union
    return iou


def _count_matches(iou: np.ndarray, threshold: float) -> int:
    """Number of one-to-one matched pairs with IoU >= ``threshold``.

    The matching maximises the number of pairs with IoU >= ``threshold``
    and, among such matchings, their total IoU (Hungarian algorithm). Pairs
    below the threshold are never matched. The bipartite graph of eligible
    pairs is split into connected components, which are solved separately,
    so large images with thousands of objects stay fast.
    """
    rows, cols = np.nonzero(iou >= threshold)
    if rows.size == 0:
        return 0
    n_gt, n_pred = iou.shape
    graph = coo_matrix(
        (np.ones(rows.size, dtype=np.int8), (rows, n_gt + cols)),
        shape=(n_gt + n_pred, n_gt + n_pred),
    )
    _, node_component = connected_components(graph, directed=False)
    edge_component = node_component[rows]
    edges_per_component = np.bincount(edge_component)
    # A component with a single eligible pair is matched trivially.
    matched = int(np.count_nonzero(edges_per_component == 1))
    for component in np.flatnonzero(edges_per_component > 1):
        in_component = edge_component == component
        sub_rows = np.unique(rows[in_component])
        sub_cols = np.unique(cols[in_component])
        sub = iou[np.ix_(sub_rows, sub_cols)]
        eligible = sub >= threshold
        # Each eligible pair is worth 1 plus a tie-breaking share of its IoU
        # that is too small for any number of pairs to outweigh one more TP.
        n_max = min(sub_rows.size, sub_cols.size)
        weight = np.where(eligible, 1.0 + sub / (n_max + 1), 0.0)
        r, c = linear_sum_assignment(weight, maximize=True)
        matched += int(np.count_nonzero(eligible[r, c]))
    return matched


def _check_thresholds(thresholds: float | Sequence[float]) -> tuple[float, ...]:
    if isinstance(thresholds, numbers.Real):
        thresholds = (thresholds,)
    values = tuple(float(t) for t in thresholds)
    if not values:
        raise ValueError("thresholds must contain at least one IoU threshold")
    for t in values:
        if not (math.isfinite(t) and 0.0 < t <= 1.0):
            raise ValueError(f"IoU thresholds must be in (0, 1], got {t!r}")
    return values


def average_precision(
    pred: np.ndarray,
    gt: np.ndarray,
    thresholds: float | Sequence[float] = (0.5, 0.75, 0.9),
) -> list[APResult]:
    """Average precision of a predicted label image at several IoU thresholds.

    Parameters
    ----------
    pred : ndarray of int
        Predicted label image (0 = background).
    gt : ndarray of int
        Ground-truth label image of the same shape (0 = background).
    thresholds : float or sequence of float, optional
        IoU thresholds in (0, 1]; a matched pair is a true positive when
        its IoU is >= the threshold.

    Returns
    -------
    list of APResult
        One result per threshold, in the given order.

    Raises
    ------
    ValueError
        If the shapes differ, an image is not an integer label image, or a
        threshold is outside (0, 1].

    Notes
    -----
    Objects are matched one to one, separately for every threshold, with
    the Hungarian algorithm on the IoU matrix: the matching has the largest
    possible number of pairs with IoU >= threshold and, among those, the
    largest total IoU. Pairs below the threshold are never true positives.
    If both images are empty, AP is 1.0; if only one is, AP is 0.0.
    """
    values = _check_thresholds(thresholds)
    iou = iou_matrix(pred, gt)
    n_gt, n_pred = iou.shape
    results = []
    for t in values:
        if n_gt == 0 and n_pred == 0:
            results.append(APResult(threshold=t, tp=0, fp=0, fn=0, ap=1.0))
            continue
        tp = _count_matches(iou, t)
        fp = n_pred - tp
        fn = n_gt - tp
        results.append(APResult(threshold=t, tp=tp, fp=fp, fn=fn, ap=tp / (tp + fp + fn)))
    return results


def mean_ap(pairs: Iterable[tuple[np.ndarray, np.ndarray]], threshold: float = 0.5) -> float:
    """Mean of the per-image average precision over several images.

    Parameters
    ----------
    pairs : iterable of (pred, gt)
        Predicted and ground-truth label images, one pair per image.
    threshold : float, optional
        IoU threshold in (0, 1].

    Returns
    -------
    float
        The unweighted mean of :func:`average_precision` over the images.

    Raises
    ------
    ValueError
        If ``pairs`` is empty, or for any reason :func:`average_precision`
        raises.
    """
    scores = [average_precision(pred, gt, (threshold,))[0].ap for pred, gt in pairs]
    if not scores:
        raise ValueError("mean_ap needs at least one (pred, gt) pair")
    return float(np.mean(scores))
