"""One-image training follows the CellSeg1 reference implementation, rule by rule.

Every test pins one rule of the reference's training (docs/engine.md, "Training:
faithfulness to the reference") on a small input with a known answer: image
to 8 bits, resizing and tiles, point prompts, augmentation order and fill,
loss, LoRA dropout, steps and learning-rate schedule.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from cellseg1d.model.data import (
    AugmentSettings,
    CellTileDataset,
    PromptSettings,
    augment_item,
    chamfer_distance,
    make_tiles,
    nearest_exact_index,
    renumber_labels,
    resize_linear_exact,
    resize_nearest_exact,
    sample_prompts,
    tile_starts,
    to_uint8_rgb,
)
from cellseg1d.model.losses import cellseg1_loss
from cellseg1d.model.train import TrainSettings, _valid_batch, make_scheduler, training_plan
from cellseg1d.testing.synthetic import make_cells

# --------------------------------------------------------------------------
# Image to 8 bits: min-max stretch, truncated; the reference's channel rules
# --------------------------------------------------------------------------


def test_minmax_truncates_a_uint16_image() -> None:
    image = np.array([[1000, 1001, 1500], [2000, 3000, 5000]], dtype=np.uint16)
    rgb = to_uint8_rgb(image)
    # (v - 1000) / 4000 * 255, truncated: 0, 0.06 -> 0, 31.9 -> 31, 63.75 -> 63, 127.5 -> 127, 255
    expected = np.array([[0, 0, 31], [63, 127, 255]], dtype=np.uint8)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    for c in range(3):
        assert np.array_equal(rgb[..., c], expected)
    # the same as skimage's rescale_intensity, which the reference calls
    from skimage import exposure

    rng = np.random.default_rng(0)
    for dtype in (np.uint8, np.uint16, np.int32, np.float32, np.float64):
        values = (rng.random((16, 16)) * 3000).astype(dtype)
        reference = exposure.rescale_intensity(values, out_range=(0, 255)).astype(np.uint8)
        assert np.array_equal(to_uint8_rgb(values)[..., 0], reference), dtype
    # the percentile stretch is kept as a named option (rounded, robust to a hot pixel)
    hot = np.linspace(1000, 5000, 100 * 80).reshape(100, 80).astype(np.uint16)
    hot[0, 0] = 65535
    assert to_uint8_rgb(hot)[50, 40, 0] < 50
    assert to_uint8_rgb(hot, normalize="percentile")[50, 40, 0] > 100


def test_rgb_channel_rules() -> None:
    r = np.array([[0, 10]], dtype=np.uint8)
    g = np.array([[5, 20]], dtype=np.uint8)
    b = np.array([[10, 40]], dtype=np.uint8)
    zero = np.zeros_like(r)
    # three non-empty channels: one joint stretch 0..40 -> 0..255
    joint = to_uint8_rgb(np.stack([r, g, b], axis=-1).repeat(5, axis=0))[0]
    assert joint.tolist() == [[0, 31, 63], [63, 127, 255]]
    # two different non-empty channels: each on its own, the empty one stays 0
    two = to_uint8_rgb(np.stack([r, zero, b], axis=-1).repeat(5, axis=0))[0]
    assert two.tolist() == [[0, 0, 0], [255, 0, 255]]
    # two identical channels: gray
    same = to_uint8_rgb(np.stack([zero, g, g], axis=-1).repeat(5, axis=0))[0]
    assert same.tolist() == [[0, 0, 0], [255, 255, 255]]
    # one non-empty channel: gray
    one = to_uint8_rgb(np.stack([zero, zero, b], axis=-1).repeat(5, axis=0))[0]
    assert one.tolist() == [[0, 0, 0], [255, 255, 255]]
    # channel-first input maps to R, G(, B): a 2-channel pick is the 2-channel RGB rule
    first = to_uint8_rgb(np.stack([r, b]).astype(np.uint16))
    assert first[0].tolist() == [[0, 0, 0], [255, 255, 0]]
    picked = to_uint8_rgb(np.stack([b, zero, r]), channels=(2, 0))
    assert picked[0].tolist() == [[0, 0, 0], [255, 255, 0]]
    gray_pick = to_uint8_rgb(np.stack([b, g]).astype(np.float32), channels=(0, 0))
    assert gray_pick[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_constant_and_non_finite_images_are_safe() -> None:
    assert np.all(to_uint8_rgb(np.full((8, 8), 7.0)) == 7)  # clipped to 0..255 and truncated
    assert np.all(to_uint8_rgb(np.full((8, 8), 300, np.uint16)) == 255)
    assert np.all(to_uint8_rgb(np.zeros((3, 8, 8))) == 0)  # a blank plane: black, no error
    assert np.all(to_uint8_rgb(np.full((8, 8), np.nan)) == 0)
    image = np.linspace(0, 1, 64).reshape(8, 8)
    image[0, 0], image[0, 1], image[0, 2] = np.nan, np.inf, -np.inf
    rgb = to_uint8_rgb(image)
    assert rgb[0, 0, 0] == 0 and rgb[0, 1, 0] == 255 and rgb[0, 2, 0] == 0 and rgb[7, 7, 0] == 255
    with pytest.raises(ValueError, match="normalize"):
        to_uint8_rgb(image, normalize="robust")


# --------------------------------------------------------------------------
# Resizing and tiles
# --------------------------------------------------------------------------


def test_resizing_follows_opencv_exact_semantics() -> None:
    row = np.array([[0, 255]], dtype=np.uint8)
    # bilinear, pixel centres aligned, 8-bit weights, rounded: 0, 64/256 * 255 -> 64, 191, edge
    assert resize_linear_exact(row, (1, 4)).tolist() == [[0, 64, 191, 255]]
    assert resize_linear_exact(np.array([[10, 20], [30, 40]], np.uint8), (1, 1)).tolist() == [[25]]
    four = np.arange(16, dtype=np.uint8).reshape(4, 4) * 10
    assert resize_linear_exact(four, (2, 2)).tolist() == [[25, 45], [105, 125]]  # 2x: mean of 2x2, half up
    # nearest with pixel centres: 4 -> 2 picks 1 and 3; 3 -> 2 picks 0 and 2
    assert nearest_exact_index(4, 2).tolist() == [1, 3]
    assert nearest_exact_index(3, 2).tolist() == [0, 2]
    assert nearest_exact_index(2, 4).tolist() == [0, 0, 1, 1]
    labels = np.array([[1, 2, 3, 4]])
    assert resize_nearest_exact(labels, (1, 2)).tolist() == [[2, 4]]


def test_tiles_of_a_512_image_and_items_per_epoch() -> None:
    assert tile_starts(512, 256) == [0, 85, 170, 256]
    assert tile_starts(256, 256) == [0] and tile_starts(300, 256) == [0, 22, 44]
    image, mask = make_cells((300, 400), 40, seed=1)
    tiles = make_tiles(image, mask, tile=256, min_items=32, resize_to=(512, 512))
    # 512 x 512 (aspect not kept): 4 x 4 tiles, repeated 32 // 16 + 1 = 3 times
    assert len(tiles) == 48
    assert all(t.shape == (256, 256, 3) and m.shape == (256, 256) for t, m in tiles)
    big = resize_linear_exact(to_uint8_rgb(image), (512, 512))
    labels = resize_nearest_exact(mask, (512, 512))
    assert np.array_equal(tiles[1][0], big[0:256, 85:341])
    assert np.array_equal(tiles[1][1], renumber_labels(labels[0:256, 85:341]))
    assert np.array_equal(tiles[15][0], big[256:, 256:])
    assert np.array_equal(tiles[16][0], tiles[0][0])
    # 9 tiles (192 px: starts 0, 32, 64) and 32: 32 // 9 + 1 = 4 repeats; no repeat once there are enough
    assert tile_starts(192, 128) == [0, 32, 64]
    assert len(make_tiles(image, mask, tile=128, min_items=32, resize_to=(192, 192))) == 36
    assert len(make_tiles(image, mask, tile=256, min_items=16, resize_to=(512, 512))) == 16


def test_small_images_are_resized_to_the_tile_on_their_short_edge() -> None:
    image, mask = make_cells((100, 300), 20, seed=2)
    tiles = make_tiles(image, mask, tile=256, min_items=1)
    # (100, 300) -> (256, 768); one row of ceil(2 * 768 / 256) = 6 tiles
    assert len(tiles) == 6 and {t.shape for t, _ in tiles} == {(256, 256, 3)}
    assert {m.shape for _, m in tiles} == {(256, 256)}


def test_tile_labels_are_renumbered() -> None:
    image = np.random.default_rng(0).random((64, 64))
    mask = np.zeros((64, 64), dtype=np.uint16)
    mask[5:15, 5:15], mask[30:40, 30:40], mask[50:60, 5:15] = 90, 7, 300
    (tile, labels), = make_tiles(image, mask, tile=64, min_items=1)
    assert set(np.unique(labels).tolist()) == {0, 1, 2, 3}
    assert labels[35, 35] == 1 and labels[10, 10] == 2 and labels[55, 10] == 3


# --------------------------------------------------------------------------
# Point prompts
# --------------------------------------------------------------------------


def test_chamfer_distance_is_opencvs_5x5_mask() -> None:
    assert chamfer_distance(np.array([[0, 1, 1, 1]])).tolist() == [[0, 1, 2, 3]]
    steps = chamfer_distance(np.array([[0, 1, 1], [1, 1, 1]]))
    assert steps[1, 1] == np.float32(91750 / 65536)  # the 1.4 diagonal step, not sqrt(2)
    assert steps[1, 2] == np.float32(143976 / 65536)  # the 2.1969 knight step, not sqrt(5)
    # no zero pixel: the outside of the array is not zero, every pixel gets the same value
    flat = chamfer_distance(np.ones((3, 5)))
    assert np.all(flat == flat[0, 0]) and flat[0, 0] > 1000


def test_a_cell_in_the_edge_band_is_skipped_but_one_reaching_into_it_is_kept() -> None:
    mask = np.zeros((100, 100), dtype=np.uint8)
    mask[40:52, 40:52] = 1  # well inside
    mask[0:4, 20:60] = 2  # entirely within 5 px of the top edge: skipped
    mask[0:5, 70:95] = 3  # its box stops at row 5: kept
    mask[96:100, 20:60] = 4  # starts at row 96 > 100 - 5: skipped
    mask[60:75, 0:12] = 5  # touches the left edge but reaches beyond the band: kept
    mask[80:84, 80:84] = 6  # 16 px: too small
    rules = PromptSettings(min_cell_area=20, border=5, negative_ratio=0)
    prompts = sample_prompts(mask, np.random.default_rng(0), rules)
    assert sorted(prompts.cell_ids.tolist()) == [1, 3, 5]
    assert np.all(prompts.labels == 1)


def test_positive_cells_are_picked_from_all_cells_before_filtering() -> None:
    mask = np.zeros((120, 120), dtype=np.uint8)
    mask[30:45, 30:45], mask[70:85, 70:85] = 1, 2  # two usable cells
    for k in range(8):  # eight cells too small to get a point
        mask[10 + 12 * k : 15 + 12 * k, 100:105] = 3 + k
    rules = PromptSettings(max_cells=4, min_cell_area=100, border=5, negative_ratio=0)
    counts = Counter(int((sample_prompts(mask, np.random.default_rng(s), rules).labels == 1).sum())
                     for s in range(400))
    # 4 of the 10 cells are picked, then filtered: hypergeometric 0/1/2 usable with p = 1/3, 8/15, 2/15
    assert set(counts) <= {0, 1, 2}
    assert abs(counts[0] / 400 - 1 / 3) < 0.08 and abs(counts[1] / 400 - 8 / 15) < 0.08
    assert abs(counts[2] / 400 - 2 / 15) < 0.06


def test_allowed_region_of_a_hand_made_cell() -> None:
    mask = np.zeros((60, 60), dtype=np.uint8)
    mask[20:27, 30:37] = 1  # a 7 x 7 square without its four corners
    for y, x in ((20, 30), (20, 36), (26, 30), (26, 36)):
        mask[y, x] = 0
    mask[40:50, 10:20] = 2  # a 10 x 10 square filling its box
    rules = PromptSettings(min_cell_area=20, border=5, negative_ratio=0)
    seen: dict[int, set[tuple[int, int]]] = {1: set(), 2: set()}
    for seed in range(300):
        prompts = sample_prompts(mask, np.random.default_rng(seed), rules)
        for (x, y), cell in zip(prompts.points.astype(int).tolist(), prompts.cell_ids.tolist(), strict=True):
            seen[cell].add((y, x))
    # 45 px; chamfer distances in the box (the box border is not an edge): 4.2 at the centre, 3.597 next to
    # it, 3.197 two away on the axes; the 9 = int(0.2 * 45) largest form a plus sign
    plus = {(23, 31), (23, 32), (23, 33), (23, 34), (23, 35), (21, 33), (22, 33), (24, 33), (25, 33)}
    assert seen[1] == plus
    # a cell filling its bounding box has no zero in its box: every pixel is equally likely
    assert len(seen[2]) > 90 and all(40 <= y < 50 and 10 <= x < 20 for y, x in seen[2])


def test_negatives_keep_away_from_the_image_border() -> None:
    mask = np.zeros((200, 200), dtype=np.uint8)
    mask[90:100, 90:100], mask[100:110, 110:120], mask[80:90, 70:80] = 1, 2, 3
    rules = PromptSettings(min_cell_area=20, border=20)
    near_edge = 0
    for seed in range(30):
        prompts = sample_prompts(mask, np.random.default_rng(seed), rules)
        negatives = prompts.points[prompts.labels == 0].astype(int)
        assert len(negatives) == 2  # ceil(3 * 0.5)
        for x, y in negatives:
            assert mask[y, x] == 0
            near_edge += min(x, y, 199 - x, 199 - y) < 20
    assert near_edge == 0


def test_negative_count_and_drawing_with_replacement() -> None:
    image, mask = make_cells((256, 256), 50, radius=(6, 10), seed=4)
    n_cells = len(np.unique(mask)) - 1
    rules = PromptSettings(min_cell_area=20, border=20, negative_ratio=1.0, max_negatives=30)
    background = np.pad(mask == 0, 20)  # padded with foreground
    distance = chamfer_distance(background).ravel()
    k = int(np.count_nonzero(distance) * 0.2)
    area = int(np.count_nonzero(distance >= np.sort(distance)[-k]))
    expected = min(math.ceil(n_cells * 1.0), 30, int(area / 1000) + 1)
    assert expected > 3
    duplicates = 0
    for seed in range(40):
        prompts = sample_prompts(mask, np.random.default_rng(seed), rules)
        negatives = prompts.points[prompts.labels == 0]
        assert len(negatives) == expected
        duplicates += len({tuple(p) for p in negatives.tolist()}) < len(negatives)
    capped = sample_prompts(mask, np.random.default_rng(0), PromptSettings(border=20, negative_ratio=0.05))
    assert (capped.labels == 0).sum() == min(math.ceil(n_cells * 0.05), 30, int(area / 1000) + 1)
    # drawn with replacement: 12 points of ~500 candidates repeat one now and then
    duplicates = 0
    _, small = make_cells((64, 64), 12, radius=(5, 7), seed=4)
    many = PromptSettings(min_cell_area=20, border=4, negative_ratio=1.0, background_area_per_negative=1)
    for seed in range(40):
        negatives = sample_prompts(small, np.random.default_rng(seed), many)
        negatives = negatives.points[negatives.labels == 0]
        assert len(negatives) == len(np.unique(small)) - 1
        duplicates += len({tuple(p) for p in negatives.tolist()}) < len(negatives)
    assert duplicates > 0


# --------------------------------------------------------------------------
# Augmentation: prompts first, moved with the image, black fill, checked again
# --------------------------------------------------------------------------


def test_prompts_are_drawn_on_the_tile_then_moved_with_it() -> None:
    image, mask = make_cells((64, 64), 8, radius=(6, 9), seed=5)
    tiles = make_tiles(image, mask, tile=64, min_items=1)
    flips = AugmentSettings(p_brightness_contrast=0, p_flip=1, p_crop=0, p_shift_scale_rotate=0)
    rules = PromptSettings(min_cell_area=20, border=4)
    dataset = CellTileDataset(tiles, image_size=128, seed=3, augment=flips, prompts=rules)
    tile, labels = tiles[0]
    item = dataset[0]
    rng = dataset.rng(0)
    prompts = sample_prompts(labels, rng, rules)  # drawn on the 64 px tile, before augmenting
    kinds = set()
    for x, y in item["points"].numpy().astype(int).tolist():
        # a flip of the tile, then 2x: pixel (x, y) lands on (2x' + 1, 2y' + 1), x' = x or 63 - x
        assert x % 2 == 1 and y % 2 == 1
    moved = augment_item(tile, labels, prompts.points, 128, rng, flips)
    assert np.array_equal(item["points"].numpy(), moved.points)
    for (x0, y0), (x1, y1) in zip(prompts.points.astype(int).tolist(), moved.points.astype(int).tolist(),
                                  strict=True):
        kinds.add((x1 == 2 * (63 - x0) + 1, y1 == 2 * (63 - y0) + 1))
        assert (x1 in (2 * x0 + 1, 2 * (63 - x0) + 1)) and (y1 in (2 * y0 + 1, 2 * (63 - y0) + 1))
    assert len(kinds) == 1


def test_pixels_from_outside_the_tile_are_black() -> None:
    tile = np.full((32, 32, 3), 200, dtype=np.uint8)
    labels = np.zeros((32, 32), dtype=np.int32)
    shifts = AugmentSettings(p_brightness_contrast=0, p_flip=0, p_crop=0, p_shift_scale_rotate=1, shift=0.4)
    black = [int((augment_item(tile, labels, None, 32, np.random.default_rng(s), shifts).image == 0).all(-1).sum())
             for s in range(5)]
    assert min(black) > 0
    median = AugmentSettings(p_brightness_contrast=0, p_flip=0, p_crop=0, p_shift_scale_rotate=1, shift=0.4,
                             fill="median")
    assert (augment_item(tile, labels, None, 32, np.random.default_rng(0), median).image == 200).all()


def test_moved_points_are_checked_again() -> None:
    tile = np.zeros((64, 64, 3), dtype=np.uint8)
    labels = np.zeros((64, 64), dtype=np.int32)
    labels[10:22, 10:22] = 1  # 144 px: gets a point on the tile (> 100), 36 px after halving: dropped
    labels[30:60, 25:55] = 2  # 900 px -> 225 px: kept
    no_change = AugmentSettings(p_brightness_contrast=0, p_flip=0, p_crop=0, p_shift_scale_rotate=0)
    rules = PromptSettings(min_cell_area=100, border=4, negative_ratio=0)
    dataset = CellTileDataset([(tile, labels)], image_size=32, augment=no_change, prompts=rules)
    assert sorted(sample_prompts(labels, dataset.rng(0), rules).cell_ids.tolist()) == [1, 2]
    item = dataset[0]
    assert item["points"].shape == (1, 2) and item["cell_prob"].tolist() == [1.0]
    x, y = item["points"][0].int().tolist()
    assert 12 <= x < 28 and 15 <= y < 30


def test_batches_with_an_item_without_points_are_skipped() -> None:
    good = {"points": torch.zeros(2, 2)}
    empty = {"points": torch.zeros(0, 2)}
    assert _valid_batch([None, good]) == [good]  # an item whose points all left the image is dropped
    assert _valid_batch([good, empty]) is None
    assert _valid_batch([None, None]) is None


def test_without_augmentation_the_tile_goes_to_the_model_as_it_is() -> None:
    image, mask = make_cells((64, 64), 8, radius=(6, 9), seed=6)
    tiles = make_tiles(image, mask, tile=32, min_items=1)
    rules = PromptSettings(min_cell_area=10, border=2)
    item = CellTileDataset(tiles, image_size=64, augment=None, prompts=rules)[0]
    assert item["image"].shape == (3, 32, 32)  # SAM pads it to 64 x 64
    assert item["targets"].shape[1:] == (16, 16)  # the tile resized to the logits, as the reference
    resized = CellTileDataset(tiles, image_size=64, augment=None, prompts=rules, unaugmented="resize")[0]
    assert resized["image"].shape == (3, 64, 64)


# --------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------


def _bce(logit: float, target: float) -> float:
    return -(target * math.log(1 / (1 + math.exp(-logit))) + (1 - target) * math.log(1 - 1 / (1 + math.exp(-logit))))


def test_bce_covers_only_cell_prompts() -> None:
    logits = torch.tensor([[[2.0, -1.0], [0.5, 0.0]], [[-3.0, 1.0], [1.5, -0.5]], [[4.0, 4.0], [4.0, 4.0]]])
    targets = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    iou = torch.tensor([0.9, 0.6, 0.3])
    cell_prob = torch.tensor([1.0, 1.0, 0.0])  # two positive prompts, one negative
    parts = cellseg1_loss(logits[:, None], iou[:, None], targets, cell_prob)
    bce = np.mean([_bce(lo, t) for lo, t in zip(logits[:2].flatten().tolist(), targets[:2].flatten().tolist(),
                                                 strict=True)])
    mse = ((0.9 - 1) ** 2 + (0.6 - 1) ** 2 + 0.3**2) / 3
    assert parts.mask == pytest.approx(bce, rel=1e-6) and parts.iou == pytest.approx(mse, rel=1e-6)
    assert float(parts.total) == pytest.approx(mse + bce, rel=1e-6)
    everything = cellseg1_loss(logits[:, None], iou[:, None], targets, cell_prob, mask_loss_on="all")
    assert everything.mask > parts.mask
    # no cell prompt: the mask term is 0
    none = cellseg1_loss(logits[2:, None], iou[2:, None], targets[2:], cell_prob[2:])
    assert none.mask == 0.0 and float(none.total) == pytest.approx(0.09)


def test_targets_are_downsampled_nearest_exact() -> None:
    full = torch.zeros(1, 8, 8)
    full[0, 2, 6] = 1.0  # the centre pixel of low-res cell (0, 1): rows/cols 2 and 6 are sampled
    logits = torch.zeros(1, 1, 2, 2)
    parts = cellseg1_loss(logits, torch.ones(1, 1), full, torch.ones(1))
    assert parts.mask == pytest.approx(math.log(2))  # BCE at logit 0 is log 2 whatever the 0/1 target
    shifted = torch.tensor([[[-5.0, 5.0], [-5.0, -5.0]]])[:, None]  # right only where the target is 1
    assert cellseg1_loss(shifted, torch.ones(1, 1), full, torch.ones(1)).mask == pytest.approx(_bce(5, 1), rel=1e-5)
    other = torch.zeros(1, 8, 8)
    other[0, 3, 7] = 1.0  # not a sampled pixel: the low-res target is empty (an area mean would not be)
    assert cellseg1_loss(shifted, torch.ones(1, 1), other, torch.ones(1)).mask == pytest.approx(
        (3 * _bce(-5, 0) + _bce(5, 0)) / 4, rel=1e-5)


def test_a_positive_with_an_empty_low_res_target_gets_cell_prob_0() -> None:
    tile = np.zeros((64, 64, 3), dtype=np.uint8)
    labels = np.zeros((64, 64), dtype=np.int32)
    labels[10:54, 5] = 1  # a one-pixel-wide cell in column 5; the 16 x 16 targets sample columns 2, 6, 10 ...
    labels[30:50, 30:50] = 2
    rules = PromptSettings(min_cell_area=20, border=2, negative_ratio=0)
    item = CellTileDataset([(tile, labels)], image_size=64, augment=None, prompts=rules)[0]
    on_line = item["points"][:, 0] == 5
    assert on_line.sum() == 1
    assert item["cell_prob"][on_line].tolist() == [0.0] and item["cell_prob"][~on_line].tolist() == [1.0]
    assert float(item["targets"][on_line].sum()) == 0.0


# --------------------------------------------------------------------------
# LoRA dropout
# --------------------------------------------------------------------------


def test_output_dropout_zeroes_k_too_and_is_inert_in_eval() -> None:
    from cellseg1d.model.lora import apply_lora, lora_parameter_names, unwrap
    from cellseg1d.model.sam import build_sam

    torch.manual_seed(0)
    model = apply_lora(build_sam("tiny", 64), dropout=0.5)
    qkv = unwrap(model).image_encoder.blocks[0].attn.qkv
    q_proj = unwrap(model).mask_decoder.transformer.layers[0].self_attn.q_proj
    x = torch.randn(1, 4, 4, qkv.in_features)
    tokens = torch.randn(1, 5, q_proj.in_features)
    dim = qkv.in_features
    model.train()
    out = qkv(x)
    assert 0.3 < float((out[..., dim : 2 * dim] == 0).float().mean()) < 0.7  # k has no adapter, still dropped
    assert 0.3 < float((q_proj(tokens) == 0).float().mean()) < 0.7
    model.eval()
    assert torch.equal(qkv(x), torch.cat([qkv.q(x), qkv.k(x), qkv.v(x)], dim=-1))
    peft_style = apply_lora(build_sam("tiny", 64), dropout=0.5, dropout_mode="input")
    peft_qkv = unwrap(peft_style).image_encoder.blocks[0].attn.qkv
    peft_style.train()
    assert not bool((peft_qkv(x)[..., dim : 2 * dim] == 0).any())
    # the hook has no weights: adapters keep their keys
    assert lora_parameter_names(model) == lora_parameter_names(peft_style)
    assert model.peft_config["default"].lora_dropout == 0.5


# --------------------------------------------------------------------------
# Steps and schedule
# --------------------------------------------------------------------------


def _one_cycle(step: float, total: int, peak: float = 3e-3, pct: float = 0.3) -> float:
    start, low = peak / 25, peak / 25 / 1e4
    end_warm = pct * total - 1
    if step <= end_warm:
        p, a, b = step / end_warm, start, peak
    else:
        p, a, b = (step - end_warm) / (total - 1 - end_warm), peak, low
    return b + (a - b) / 2 * (math.cos(math.pi * p) + 1)


def test_reference_schedule_steps_and_learning_rates() -> None:
    plan = training_plan(48, TrainSettings())  # 300 epochs of 48 items, batch 4, 8 accumulated
    assert (plan.batches_per_epoch, plan.steps_per_epoch, plan.total_steps) == (12, 2, 600)
    assert plan.scheduler_steps == 300 * 19 // 8 == 712
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    scheduler = make_scheduler(optimizer, TrainSettings(), plan)
    rates = [optimizer.param_groups[0]["lr"]]
    for _ in range(600):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[0] == pytest.approx(1.2e-4)
    assert int(np.argmax(rates)) in (212, 213) and max(rates) == pytest.approx(3e-3, rel=1e-4)
    assert rates[600] == pytest.approx(_one_cycle(600, 712), rel=1e-6)
    assert 3.4e-4 < rates[600] < 3.7e-4  # never annealed
    annealed = training_plan(48, TrainSettings(schedule="annealed"))
    assert (annealed.total_steps, annealed.scheduler_steps) == (600, 600)
    assert _one_cycle(599, 600) < 1e-7
    short = training_plan(48, TrainSettings(max_steps=60))
    assert (short.total_steps, short.scheduler_steps) == (60, math.ceil(60 * 712 / 600))


def test_fit_steps_after_every_grad_accum_batches_and_at_the_epoch_end() -> None:
    from cellseg1d.model.sam import build_sam
    from cellseg1d.model.train import fit

    torch.manual_seed(0)
    sam = build_sam("tiny", 32)
    for name, param in sam.named_parameters():
        param.requires_grad_(name.startswith("mask_decoder.iou_prediction_head"))
    image, mask = make_cells((32, 32), 4, radius=(5, 7), seed=1)
    tiles = make_tiles(image, mask, tile=32, min_items=11, min_cells=1)  # 1 tile x 12
    rules = PromptSettings(min_cell_area=5, border=1, max_cells=2, max_negatives=1)
    dataset = CellTileDataset(tiles, image_size=32, augment=None, prompts=rules)
    settings = TrainSettings(epochs=3, batch_size=1, grad_accum=8, image_size=32, device="cpu")
    seen = []
    result = fit(sam, dataset, settings, progress=False, on_step=lambda info: seen.append(info.lr))
    # 12 batches per epoch: steps after batches 8 and 12 -> 6 steps; schedule built for 3 * 19 // 8 = 7
    assert result.steps == 6 and result.extra["scheduler_steps"] == 7
    assert seen[0] == pytest.approx(3e-3 / 25)
    assert result.extra["last_lr"] == pytest.approx(_one_cycle(6, 7), rel=1e-6)
