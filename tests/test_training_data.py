"""Training data of the CellSeg1 engine: conversion, tiles, augmentation, point prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from cellseg1d.model.data import (
    AugmentSettings,
    CellTileDataset,
    PromptSettings,
    TrainingDataError,
    augment,
    collate_items,
    make_tiles,
    sample_prompts,
    to_uint8_rgb,
)
from cellseg1d.synthetic import make_cells

ALWAYS = AugmentSettings(p_brightness_contrast=1.0, p_flip=1.0, p_crop=1.0, p_shift_scale_rotate=1.0)
SMALL_RULES = PromptSettings(min_cell_area=20, border=4)


@pytest.fixture(scope="module")
def cells() -> tuple[np.ndarray, np.ndarray]:
    return make_cells((160, 160), 30, radius=(6, 10), seed=3)


# --------------------------------------------------------------------------
# to_uint8_rgb
# --------------------------------------------------------------------------


def test_grayscale_is_rescaled_and_stacked() -> None:
    image = np.linspace(1000, 5000, 100 * 80, dtype=np.float64).reshape(100, 80).astype(np.uint16)
    rgb = to_uint8_rgb(image)
    assert rgb.shape == (100, 80, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
    assert rgb.min() == 0 and rgb.max() == 255
    # robust: a single hot pixel does not squash the rest of the range
    image[0, 0] = 65535
    assert to_uint8_rgb(image)[50, 40, 0] > 100


def test_channels_map_to_rgb() -> None:
    rng = np.random.default_rng(0)
    two = rng.random((2, 32, 40)).astype(np.float32)
    rgb = to_uint8_rgb(two)
    assert rgb.shape == (32, 40, 3)
    assert rgb[..., 2].max() == 0 and rgb[..., 0].max() == 255 and rgb[..., 1].max() == 255
    picked = to_uint8_rgb(rng.random((5, 32, 40)), channels=(4, 1, 0))
    assert picked.shape == (32, 40, 3)
    one = to_uint8_rgb(rng.random((5, 32, 40)), channels=2)
    assert np.array_equal(one[..., 0], one[..., 2])
    flat = to_uint8_rgb(np.full((16, 16), 7.0))
    assert flat.max() == 0
    already = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    assert np.array_equal(to_uint8_rgb(already), already)


def test_too_many_channels_says_what_to_do() -> None:
    with pytest.raises(TrainingDataError, match="channels="):
        to_uint8_rgb(np.zeros((5, 16, 16)))
    with pytest.raises(TrainingDataError, match="does not exist"):
        to_uint8_rgb(np.zeros((2, 16, 16)), channels=(3,))


# --------------------------------------------------------------------------
# Tiles
# --------------------------------------------------------------------------


def test_tile_count_and_overlap() -> None:
    image, mask = make_cells((512, 512), 60, seed=1)
    tiles = make_tiles(image, mask, tile=256, overlap=0.5, min_items=32)
    # starts 0, 128, 256 in both directions: 9 tiles, repeated 4 times -> 36 >= 32
    assert len(tiles) == 36
    assert all(t.shape == (256, 256, 3) and m.shape == (256, 256) for t, m in tiles)
    rgb = to_uint8_rgb(image)
    assert np.array_equal(tiles[0][0], rgb[:256, :256])
    assert np.array_equal(tiles[1][1], mask[:256, 128:384])  # 50% overlap with tile 0
    assert np.array_equal(tiles[8][1], mask[256:, 256:])
    assert np.array_equal(tiles[9][1], tiles[0][1])  # the list repeats

    # a non-multiple size: the last tile is aligned with the edge
    tiles = make_tiles(image[:, :300], mask[:, :300], tile=256, min_items=1)
    assert len(tiles) == 3 * 2
    assert np.array_equal(tiles[1][1], mask[:256, 44:300])


def test_small_images_get_square_tiles_of_their_smaller_side() -> None:
    image, mask = make_cells((100, 300), 20, seed=2)
    tiles = make_tiles(image, mask, tile=256, min_items=1)
    assert {t.shape for t, _ in tiles} == {(100, 100, 3)}
    assert len(tiles) == len(range(0, 201, 50))  # stride 50, starts 0..200


def test_resize_to_longest_side() -> None:
    image, mask = make_cells((200, 100), 12, seed=4)
    tiles = make_tiles(image, mask, tile=512, min_items=1, resize_to=400)
    # (200, 100) -> (400, 200); square tiles of the smaller side, stride 100: 3 tiles
    assert len(tiles) == 3
    tile_image, tile_mask = tiles[0]
    assert tile_mask.shape == (200, 200) and tile_image.shape == (200, 200, 3)
    assert set(np.unique(tile_mask)) <= set(np.unique(mask))


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def test_mask_shape_mismatch_is_explained(cells) -> None:
    image, mask = cells
    with pytest.raises(TrainingDataError, match="does not match the image"):
        make_tiles(image, mask[:, :-1])
    with pytest.raises(TrainingDataError, match="2-D"):
        make_tiles(image, mask[None])


def test_empty_mask_is_explained(cells) -> None:
    image, mask = cells
    with pytest.raises(TrainingDataError, match="empty.*annotate"):
        make_tiles(image, np.zeros_like(mask))


def test_too_few_cells_is_explained(cells) -> None:
    image, mask = cells
    two = np.where(np.isin(mask, [1, 2]), mask, 0)
    with pytest.raises(TrainingDataError, match="only 2 cell.*at least 3"):
        make_tiles(image, two)
    make_tiles(image, two, min_cells=2)  # the minimum is a parameter


def test_binary_mask_is_explained(cells) -> None:
    image, mask = cells
    with pytest.raises(TrainingDataError, match="skimage.measure.label"):
        make_tiles(image, mask > 0)


# --------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------


def _tile(cells) -> tuple[np.ndarray, np.ndarray]:
    image, mask = cells
    return to_uint8_rgb(image), mask


def test_augmentation_keeps_image_and_mask_aligned(cells) -> None:
    rgb, mask = _tile(cells)
    inside = []
    for seed in range(12):
        out_image, out_mask = augment(rgb, mask, 192, np.random.default_rng(seed), ALWAYS)
        assert out_image.shape == (192, 192, 3) and out_image.dtype == np.uint8
        assert out_mask.shape == (192, 192) and out_mask.dtype == mask.dtype
        # cells are bright on a dark background: the mask's interior (eroded, away
        # from the soft edge) must be bright in the image and the far background dark
        gray = out_image[..., 0].astype(float)
        core = ndimage.binary_erosion(out_mask > 0, iterations=2)
        far = ~ndimage.binary_dilation(out_mask > 0, iterations=3)
        if core.sum() < 50:
            continue
        inside.append(np.median(gray[core]) - np.median(gray[far]))
        assert np.mean(gray[core] > np.median(gray[far]) + 40) > 0.95
    assert len(inside) >= 8


def test_augmentation_invents_no_labels(cells) -> None:
    rgb, mask = _tile(cells)
    for seed in range(10):
        _, out_mask = augment(rgb, mask, 128, np.random.default_rng(seed), ALWAYS)
        assert set(np.unique(out_mask)) <= set(np.unique(mask))


def test_augmentation_is_deterministic_with_a_seed(cells) -> None:
    rgb, mask = _tile(cells)
    a = augment(rgb, mask, 128, np.random.default_rng(5), ALWAYS)
    b = augment(rgb, mask, 128, np.random.default_rng(5), ALWAYS)
    c = augment(rgb, mask, 128, np.random.default_rng(6), ALWAYS)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_no_augmentation_only_resizes(cells) -> None:
    rgb, mask = _tile(cells)
    out_image, out_mask = augment(rgb, mask, 320, np.random.default_rng(0), None)
    assert np.array_equal(out_mask, np.repeat(np.repeat(mask, 2, axis=0), 2, axis=1))
    same_image, same_mask = augment(rgb, mask, 160, np.random.default_rng(0), None)
    assert np.array_equal(same_mask, mask) and np.abs(same_image.astype(int) - rgb).max() <= 1


def test_each_flip_moves_pixels_as_expected() -> None:
    mask = np.zeros((8, 8), dtype=np.uint16)
    mask[1, 2] = 7
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    flips_only = AugmentSettings(p_brightness_contrast=0, p_flip=1, p_crop=0, p_shift_scale_rotate=0)
    seen = set()
    for seed in range(30):
        _, out = augment(rgb, mask, 8, np.random.default_rng(seed), flips_only)
        seen.add(tuple(int(v) for v in np.argwhere(out == 7)[0]))
    assert seen == {(1, 5), (6, 2), (6, 5)}  # horizontal, vertical, both


# --------------------------------------------------------------------------
# Point prompts
# --------------------------------------------------------------------------


def _top_region(mask: np.ndarray, cell: int, fraction: float) -> np.ndarray:
    inside = mask == cell
    distance = ndimage.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1]
    values = distance[inside]
    return inside & (distance >= np.quantile(values, 1 - fraction))


def test_positive_points_lie_in_the_top_of_their_cells_distance_transform(cells) -> None:
    _, mask = cells
    for seed in range(5):
        prompts = sample_prompts(mask, np.random.default_rng(seed), SMALL_RULES)
        positives = prompts.labels == 1
        assert positives.sum() > 5
        for (x, y), cell in zip(prompts.points[positives].astype(int), prompts.cell_ids[positives], strict=True):
            assert mask[y, x] == cell
            assert _top_region(mask, cell, 0.2)[y, x]
        assert len(set(prompts.cell_ids[positives].tolist())) == positives.sum()  # one point per cell


def test_small_and_border_cells_are_skipped() -> None:
    mask = np.zeros((100, 100), dtype=np.uint8)
    mask[40:52, 40:52] = 1  # 144 px, well inside
    mask[10:17, 60:67] = 2  # 49 px: too small
    mask[0:12, 20:32] = 3  # touches the top edge
    mask[80:92, 85:97] = 4  # 3 px from the right edge
    mask[70:82, 20:32] = 5  # 18 px from the bottom edge
    rules = PromptSettings(min_cell_area=100, border=5, negative_ratio=0)
    prompts = sample_prompts(mask, np.random.default_rng(0), rules)
    assert sorted(prompts.cell_ids.tolist()) == [1, 5]
    rules = PromptSettings(min_cell_area=40, border=0, negative_ratio=0)
    prompts = sample_prompts(mask, np.random.default_rng(0), rules)
    assert sorted(prompts.cell_ids.tolist()) == [1, 2, 3, 4, 5]


def test_at_most_max_cells_positive_points(cells) -> None:
    _, mask = cells
    prompts = sample_prompts(mask, np.random.default_rng(0), PromptSettings(min_cell_area=20, border=4, max_cells=7))
    assert (prompts.labels == 1).sum() == 7


def test_negative_points_in_the_far_background_with_caps(cells) -> None:
    _, mask = cells
    prompts = sample_prompts(mask, np.random.default_rng(1), SMALL_RULES)
    n_pos = int((prompts.labels == 1).sum())
    negatives = prompts.labels == 0
    background = mask == 0
    bg_area = int(background.sum())
    assert negatives.sum() == min(n_pos // 2, 30, bg_area // 1000 + 1)
    distance = ndimage.distance_transform_edt(background)
    threshold = np.quantile(distance[background], 0.8)
    for x, y in prompts.points[negatives].astype(int):
        assert mask[y, x] == 0 and distance[y, x] >= threshold
    assert np.all(prompts.cell_ids[negatives] == 0)
    assert len({tuple(p) for p in prompts.points[negatives].tolist()}) == negatives.sum()

    # the background-area cap: 1 + area // 1000
    capped = sample_prompts(mask, np.random.default_rng(1), PromptSettings(
        min_cell_area=20, border=4, background_area_per_negative=10**6))
    assert (capped.labels == 0).sum() == 1


def test_no_negative_points_when_foreground_dominates() -> None:
    mask = np.zeros((60, 60), dtype=np.uint8)
    mask[:, :] = 1
    mask[:, 20:40] = 2
    mask[:, 40:] = 3
    mask[28:31, 28:31] = 0  # tiny background: fg / bg > 5
    prompts = sample_prompts(mask, np.random.default_rng(0), PromptSettings(min_cell_area=10, border=0))
    assert (prompts.labels == 1).sum() == 3 and (prompts.labels == 0).sum() == 0


def test_sampling_is_deterministic(cells) -> None:
    _, mask = cells
    a = sample_prompts(mask, np.random.default_rng(4), SMALL_RULES)
    b = sample_prompts(mask, np.random.default_rng(4), SMALL_RULES)
    assert np.array_equal(a.points, b.points) and np.array_equal(a.cell_ids, b.cell_ids)


# --------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------


def test_dataset_items(cells) -> None:
    image, mask = cells
    tiles = make_tiles(image, mask, tile=96, min_items=8)
    dataset = CellTileDataset(tiles, image_size=128, seed=1, prompts=SMALL_RULES)
    assert len(dataset) >= 8
    item = dataset[0]
    n = item["points"].shape[0]
    assert item["image"].shape == (3, 128, 128) and item["image"].dtype == torch.float32
    assert 0 <= float(item["image"].min()) and float(item["image"].max()) <= 255
    assert item["points"].shape == (n, 2) and item["point_labels"].shape == (n,)
    assert item["targets"].shape == (n, 32, 32) and item["cell_prob"].shape == (n,)
    # every point is a foreground click; background prompts differ only by their targets
    assert torch.all(item["point_labels"] == 1)
    positives = item["cell_prob"] == 1
    assert torch.all(item["cell_prob"][~positives] == 0)
    assert n > 0 and positives.any()
    # a positive target covers its point; negative targets are empty
    for (x, y), target in zip(item["points"][positives], item["targets"][positives], strict=True):
        assert target[int(y) // 4, int(x) // 4] > 0
        assert float(target.max()) == 1.0
    assert float(item["targets"][~positives].sum()) == 0.0

    again = CellTileDataset(tiles, image_size=128, seed=1, prompts=SMALL_RULES)[0]
    assert all(torch.equal(item[k], again[k]) for k in item)
    dataset.set_epoch(1)
    other = dataset[0]
    assert not torch.equal(item["image"], other["image"])
    assert sorted(dataset.order(3).tolist()) == list(range(len(dataset)))

    batch = collate_items([dataset[0], dataset[1]])
    assert batch["image"].shape == (2, 3, 128, 128) and len(batch["points"]) == 2
