"""Tests of the classical (threshold + watershed) segmenter on synthetic cells."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from cellseg1d.model.metrics import average_precision, iou_matrix
from cellseg1d.model.classical import ClassicalParams, segment_classical


def synthetic_cells(
    shape: tuple[int, int] = (256, 256),
    n_cells: int = 25,
    n_touching_pairs: int = 4,
    noise: float = 0.05,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw disks of radius 6..10 on a dark background.

    Isolated disks are at least 3 px apart; each touching pair shares a
    boundary (their overlap is split between the two by distance to the
    disk edges). Every cell gets its own brightness; the image is blurred
    like a microscope would and Gaussian noise is added.

    Returns
    -------
    image : ndarray of float64, shape ``shape``
    gt : ndarray of int32, shape ``shape``
        Labels 1..n_cells (touching pairs first).
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    gt = np.zeros(shape, dtype=np.int32)
    placed: list[tuple[float, float, int]] = []

    def is_free(cy: float, cx: float, r: int) -> bool:
        return all(np.hypot(cy - y, cx - x) >= r + q + 3 for y, x, q in placed)

    def inside(cy: float, cx: float, r: int) -> bool:
        return r + 1 <= cy <= h - r - 2 and r + 1 <= cx <= w - r - 2

    label = 0
    pairs = 0
    for _ in range(20000):
        if pairs == n_touching_pairs:
            break
        r1, r2 = (int(v) for v in rng.integers(7, 11, size=2))
        cy1, cx1 = rng.uniform(r1 + 1, h - r1 - 2), rng.uniform(r1 + 1, w - r1 - 2)
        angle = rng.uniform(0, 2 * np.pi)
        dist = r1 + r2 - 1  # disks overlap by one pixel: they touch
        cy2, cx2 = cy1 + dist * np.sin(angle), cx1 + dist * np.cos(angle)
        if not (inside(cy2, cx2, r2) and is_free(cy1, cx1, r1) and is_free(cy2, cx2, r2)):
            continue
        d1 = np.hypot(yy - cy1, xx - cx1) - r1
        d2 = np.hypot(yy - cy2, xx - cx2) - r2
        first = (d1 <= 0) & (d1 <= d2)
        second = (d2 <= 0) & ~first
        gt[first] = label + 1
        gt[second] = label + 2
        label += 2
        pairs += 1
        placed += [(cy1, cx1, r1), (cy2, cx2, r2)]
    for _ in range(20000):
        if label == n_cells:
            break
        r = int(rng.integers(6, 11))
        cy, cx = rng.uniform(r + 1, h - r - 2), rng.uniform(r + 1, w - r - 2)
        if is_free(cy, cx, r):
            label += 1
            gt[np.hypot(yy - cy, xx - cx) <= r] = label
            placed.append((cy, cx, r))
    assert pairs == n_touching_pairs and label == n_cells, "could not place all cells"

    brightness = np.concatenate(([0.1], rng.uniform(0.5, 1.0, size=label)))
    image = ndi.gaussian_filter(brightness[gt], 1.0)
    image += rng.normal(0.0, noise, size=shape)
    return image, gt


def _assert_valid_labels(labels: np.ndarray, shape: tuple[int, ...]) -> None:
    assert labels.dtype == np.uint32
    assert labels.shape == shape
    values = np.unique(labels)
    n = int(labels.max())
    expected = np.arange(0, n + 1) if (labels == 0).any() else np.arange(1, n + 1)
    np.testing.assert_array_equal(values, expected)


def _ap50(labels: np.ndarray, gt: np.ndarray) -> float:
    return average_precision(labels, gt, thresholds=(0.5,))[0].ap


def test_synthetic_generator_makes_touching_pairs():
    _, gt = synthetic_cells(seed=0)
    assert gt.max() == 25
    for a in range(1, 9, 2):
        grown = ndi.binary_dilation(gt == a)
        assert (gt[grown] == a + 1).any(), f"cells {a} and {a + 1} do not touch"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", ["otsu", "li"])
def test_ap_on_synthetic_cells(seed, threshold):
    image, gt = synthetic_cells(seed=seed)
    labels = segment_classical(image, ClassicalParams(threshold=threshold))
    _assert_valid_labels(labels, gt.shape)
    ap = _ap50(labels, gt)
    # Measured: AP@0.5 = 1.0 for all seeds and both thresholds.
    assert ap >= 0.8, f"AP@0.5 = {ap:.3f}"


def test_ap_with_strong_noise_and_many_touching_cells():
    image, gt = synthetic_cells(n_cells=30, n_touching_pairs=8, noise=0.15, seed=3)
    labels = segment_classical(image)
    ap = _ap50(labels, gt)
    # Measured: AP@0.5 = 1.0.
    assert ap >= 0.8, f"AP@0.5 = {ap:.3f}"


def test_two_touching_disks_are_separated():
    yy, xx = np.mgrid[0:60, 0:80]
    gt = np.zeros((60, 80), dtype=np.int32)
    gt[np.hypot(yy - 30, xx - 30) <= 10] = 1
    gt[(np.hypot(yy - 30, xx - 49) <= 10) & (gt == 0)] = 2
    assert (ndi.binary_dilation(gt == 1) & (gt == 2)).any()
    image = ndi.gaussian_filter(np.where(gt > 0, 1.0, 0.1), 1.0)
    labels = segment_classical(image)
    assert labels.max() == 2
    iou = iou_matrix(labels.astype(np.int64), gt)
    assert iou.max(axis=1).min() > 0.8


def test_uint16_and_float_inputs_give_the_same_labels():
    image, _ = synthetic_cells(seed=1)
    as_uint16 = np.clip(np.round(image * 40000), 0, 65535).astype(np.uint16)
    reference = segment_classical(as_uint16)
    assert reference.max() > 20
    for other in (
        as_uint16.astype(np.float32) / np.float32(65535),
        as_uint16.astype(np.float64) * 1e-3,
        as_uint16.astype(np.int32) - 1000,
    ):
        np.testing.assert_array_equal(segment_classical(other), reference)


def test_multichannel_input():
    image, gt = synthetic_cells(seed=2)
    rng = np.random.default_rng(7)
    second = 500 * image + rng.normal(0, 10, size=image.shape)  # same cells, other scale
    stack = np.stack([image, second]).astype(np.float32)
    labels = segment_classical(stack)
    _assert_valid_labels(labels, gt.shape)
    assert _ap50(labels, gt) >= 0.8

    # A single channel gives the same result as the 2-D plane.
    np.testing.assert_array_equal(segment_classical(image[np.newaxis]), segment_classical(image))
    # An empty (constant) channel does not prevent segmentation.
    with_empty = np.stack([np.zeros_like(image), image])
    assert _ap50(segment_classical(with_empty), gt) >= 0.8


@pytest.mark.parametrize(
    "plane",
    [
        np.zeros((64, 64), dtype=np.uint16),
        np.full((64, 64), 7.5, dtype=np.float32),
        np.zeros((3, 64, 64), dtype=np.uint8),
        np.full((40, 30), np.nan),
        np.zeros((3, 3), dtype=np.float64),
        np.zeros((0, 5), dtype=np.uint8),
    ],
    ids=["zeros-uint16", "constant-float32", "zeros-3ch", "all-nan", "tiny-zeros", "empty"],
)
def test_constant_planes_give_zeros(plane):
    labels = segment_classical(plane)
    assert labels.dtype == np.uint32
    assert labels.shape == plane.shape[-2:]
    assert not labels.any()


def test_nan_is_treated_as_zero():
    image, gt = synthetic_cells(seed=0)
    rng = np.random.default_rng(3)
    holes = rng.random(image.shape) < 0.01
    with_nan = image.copy()
    with_nan[holes] = np.nan
    labels = segment_classical(with_nan)
    np.testing.assert_array_equal(labels, segment_classical(np.where(holes, 0.0, image)))
    _assert_valid_labels(labels, gt.shape)
    assert _ap50(labels, gt) >= 0.8


def test_tiny_images():
    one = np.zeros((3, 3), dtype=np.uint8)
    one[1, 1] = 200
    labels = segment_classical(one)  # smaller than min_size: nothing
    assert labels.shape == (3, 3) and labels.dtype == np.uint32 and not labels.any()
    labels = segment_classical(one, ClassicalParams(sigma=0, min_size=1))
    np.testing.assert_array_equal(labels, one > 0)
    _assert_valid_labels(segment_classical(np.arange(9.0).reshape(3, 3)), (3, 3))
    _assert_valid_labels(segment_classical(np.ones((1, 1), np.int16)), (1, 1))


def test_background_only_noise_gives_valid_labels():
    rng = np.random.default_rng(5)
    noise = rng.normal(100.0, 5.0, size=(128, 128))
    _assert_valid_labels(segment_classical(noise), noise.shape)


def test_single_small_cell_in_large_plane_is_found():
    # Cell pixels are fewer than 0.2 % of the plane, so the 99.8th percentile
    # is background; the cell must survive normalisation.
    yy, xx = np.mgrid[0:512, 0:512]
    plane = np.where(np.hypot(yy - 200, xx - 300) <= 8, 1000, 0).astype(np.uint16)
    labels = segment_classical(plane)
    assert labels.max() == 1
    assert iou_matrix(labels.astype(np.int64), (plane > 0).astype(np.int64))[0, 0] > 0.8


def test_min_size_and_exclude_border():
    plane = np.zeros((60, 60), dtype=np.float32)
    plane[20:30, 20:30] = 1.0  # 100 px, inside
    plane[0:8, 40:48] = 1.0  # 64 px, touches the top border
    plane[45:48, 10:13] = 1.0  # 9 px, too small
    labels = segment_classical(plane, ClassicalParams(sigma=0))
    assert labels.max() == 2
    assert labels[25, 25] != 0 and labels[4, 44] != 0 and labels[46, 11] == 0
    labels = segment_classical(plane, ClassicalParams(sigma=0, exclude_border=True))
    assert labels.max() == 1 and labels[25, 25] == 1 and labels[4, 44] == 0
    labels = segment_classical(plane, ClassicalParams(sigma=0, min_size=5))
    assert labels.max() == 3


@pytest.mark.parametrize(
    "plane",
    [np.zeros(10), np.zeros((2, 3, 10, 10)), np.zeros((2, 2, 2, 2, 2))],
    ids=["1d", "4d", "5d"],
)
def test_invalid_ndim_raises(plane):
    with pytest.raises(ValueError, match="2-D"):
        segment_classical(plane)


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128, np.bool_, np.object_])
def test_invalid_dtype_raises(dtype):
    with pytest.raises(ValueError, match="dtype"):
        segment_classical(np.zeros((10, 10), dtype=dtype))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sigma": -1.0}, "sigma"),
        ({"sigma": float("nan")}, "sigma"),
        ({"min_distance": 0}, "min_distance"),
        ({"min_distance": 2.5}, "min_distance"),
        ({"min_size": -1}, "min_size"),
        ({"threshold": "triangle"}, "threshold"),
        ({"exclude_border": "yes"}, "exclude_border"),
    ],
)
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ClassicalParams(**kwargs)


def test_params_are_frozen_and_default():
    params = ClassicalParams()
    assert (params.sigma, params.min_distance, params.min_size, params.threshold) == (
        1.5,
        5,
        20,
        "otsu",
    )
    assert params.exclude_border is False
    with pytest.raises(AttributeError):
        params.sigma = 2.0  # type: ignore[misc]
