"""Tiling and stitching (cellseg1d.model.stitch, cellseg1d.model.tiling) on synthetic label images, plus one tiny-SAM run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from cellseg1d.model.metrics import average_precision
from cellseg1d.model.postprocess import relabel_sequential
from cellseg1d.model.tiling import segment_large
from cellseg1d.model.stitch import stitch, tile_boxes, tile_starts
from cellseg1d.testing.synthetic import make_cells

SHAPE = (300, 260)
TILE = 128
OVERLAP = 48  # cells below reach at most 12 px from their centre: < OVERLAP / 2


def _disc(labels: np.ndarray, cy: float, cx: float, r: float, value: int) -> None:
    yy, xx = np.ogrid[: labels.shape[0], : labels.shape[1]]
    labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = value


def _truth() -> np.ndarray:
    """Cells from make_cells plus discs placed on the seams and corners of the tile grid."""
    _, truth = make_cells(SHAPE, 60, radius=(5, 9), seed=3, min_gap=3)
    truth = truth.astype(np.uint32)
    boxes = tile_boxes(SHAPE, TILE, OVERLAP)
    seams_y = sorted({y1 for _, _, y1, _ in boxes if y1 < SHAPE[0]} | {y0 for y0, _, _, _ in boxes if y0 > 0})
    seams_x = sorted({x1 for _, _, _, x1 in boxes if x1 < SHAPE[1]} | {x0 for _, x0, _, _ in boxes if x0 > 0})
    spots = [(y, x) for y in seams_y[:3] for x in seams_x[:3]]  # grid corners
    spots += [(seams_y[0], 30), (150, seams_x[0]), (SHAPE[0] - 8, seams_x[1]), (seams_y[1], SHAPE[1] - 8)]
    next_label = int(truth.max()) + 1
    for y, x in spots:
        truth[max(0, y - 14) : y + 15, max(0, x - 14) : x + 15] = 0  # clear room
        _disc(truth, y, x, 8.5, next_label)
        next_label += 1
    return relabel_sequential(truth)


def _cut_tiles(labels: np.ndarray, rng: np.random.Generator, wobble: bool = False) -> list:
    """What a segmenter would return per tile: the truth cut to the tile, ids shuffled.

    With ``wobble``, every other tile sees each cell dilated or eroded by one pixel.
    """
    tiles = []
    for index, (y0, x0, y1, x1) in enumerate(tile_boxes(labels.shape, TILE, OVERLAP)):
        crop = relabel_sequential(labels[y0:y1, x0:x1])
        if wobble and index % 2:
            out = np.zeros_like(crop)
            for value in range(1, int(crop.max()) + 1):
                cell = crop == value
                cell = ndimage.binary_dilation(cell) if value % 2 else ndimage.binary_erosion(cell)
                out[cell & (out == 0)] = value
            crop = out
        perm = np.concatenate([[0], rng.permutation(int(crop.max())) + 1]).astype(np.uint32)
        tiles.append((y0, x0, perm[crop]))
    return tiles


def _assert_same_partition(result: np.ndarray, truth: np.ndarray) -> None:
    assert result.dtype == np.uint32 and result.shape == truth.shape
    assert np.array_equal(result > 0, truth > 0)
    pairs = np.unique(np.stack([result[truth > 0], truth[truth > 0]]), axis=1)
    assert pairs.shape[1] == truth.max() == result.max()  # a bijection between objects


def test_tile_starts_cover_and_overlap():
    assert tile_starts(100, 128, 32) == [0]
    assert tile_starts(300, 128, 48) == [0, 80, 160, 172]
    for length in (129, 200, 257, 1000):
        starts = tile_starts(length, 128, 48)
        assert starts[0] == 0 and starts[-1] + 128 == length
        assert all(b - a <= 128 - 48 for a, b in zip(starts, starts[1:]))
    with pytest.raises(ValueError):
        tile_starts(100, 64, 64)


def test_stitch_exact_tiles_give_the_truth():
    truth = _truth()
    tiles = _cut_tiles(truth, np.random.default_rng(0))
    result = stitch(tiles, SHAPE, OVERLAP)
    _assert_same_partition(result, truth)
    assert average_precision(result, truth, 0.5)[0].ap == 1.0
    assert np.array_equal(np.unique(result), np.arange(result.max() + 1))  # labels 1..N, no duplicates


def test_stitch_views_that_differ_between_tiles_appear_once_and_whole():
    truth = _truth()
    tiles = _cut_tiles(truth, np.random.default_rng(1), wobble=True)
    result = stitch(tiles, SHAPE, OVERLAP)
    [ap] = average_precision(result, truth, 0.5)
    assert (ap.tp, ap.fp, ap.fn) == (truth.max(), 0, 0)
    assert ap.ap == 1.0
    # every object is one connected piece
    for value, where in enumerate(ndimage.find_objects(result), start=1):
        assert ndimage.label(result[where] == value)[1] == 1


def test_stitch_seam_cells_are_not_cut():
    truth = np.zeros((200, 200), dtype=np.uint32)
    # one cell exactly on the vertical seam band, one on the 4-tile corner, one at the image edge
    _disc(truth, 40, 100, 9, 1)
    _disc(truth, 100, 100, 9, 2)
    _disc(truth, 195, 100, 9, 3)
    tiles = _cut_tiles(truth, np.random.default_rng(2))
    assert len(tiles) == 4
    result = stitch(tiles, truth.shape, OVERLAP)
    _assert_same_partition(result, truth)
    for value in (1, 2, 3):
        assert (result == result[truth == value][0]).sum() == (truth == value).sum()


def test_stitch_empty_and_single_tile():
    assert stitch([], (10, 12), 4).shape == (10, 12)
    labels = np.zeros((10, 12), dtype=np.uint32)
    labels[0:3, 0:3] = 7  # touches image edges only: kept
    result = stitch([(0, 0, labels)], (10, 12), 4)
    assert result.max() == 1 and (result == 1).sum() == 9
    with pytest.raises(ValueError):
        stitch([(5, 0, labels)], (10, 12), 4)



def test_segment_large_runs_tiles_and_matches_stitch(one_torch_thread):
    from cellseg1d.model.inference import InferenceSettings, segment_image
    from cellseg1d.model.sam import build_sam

    torch.manual_seed(2)
    sam = build_sam("tiny", image_size=128)
    image, _ = make_cells((150, 170), 15, seed=4)
    rgb = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    settings = InferenceSettings(image_size=128, points_per_side=4, crop_n_layers=0, pred_iou_thresh=-1.0,
                                 stability_score_thresh=0.0, stability_score_offset=0.02, max_area_fraction=0.3)
    labels = segment_large(sam, rgb, settings, tile=128, overlap=32)
    assert labels.shape == rgb.shape and labels.dtype == np.uint32
    tiles = [(y0, x0, segment_image(sam, rgb[y0:y1, x0:x1], settings))
             for y0, x0, y1, x1 in tile_boxes(rgb.shape, 128, 32)]
    assert len(tiles) == 4
    assert np.array_equal(labels, stitch(tiles, rgb.shape, 32))
    small = segment_large(sam, rgb[:100, :120], settings, tile=128, overlap=32)
    assert np.array_equal(small, segment_image(sam, rgb[:100, :120], settings))


def test_stitch_takes_sparse_huge_label_values() -> None:
    """A plugin may label with hashes: renumbering must not build a table as large as the largest value."""
    truth = _truth()
    tiles = [(y0, x0, np.where(crop > 0, crop.astype(np.uint64) * (2**40 + 7), 0))
             for y0, x0, crop in _cut_tiles(truth, np.random.default_rng(5))]
    out = stitch(tiles, truth.shape, OVERLAP)
    assert out.dtype == np.uint32 and int(out.max()) == int(truth.max())
    assert average_precision(out, truth, thresholds=(0.9,))[0].ap == 1.0
