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
    chamfer_distance,
    collate_items,
    make_tiles,
    renumber_labels,
    resize_linear_exact,
    sample_prompts,
    to_uint8_rgb,
)
from cellseg1d.testing.synthetic import make_cells

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
    for mode in ("minmax", "percentile"):
        rgb = to_uint8_rgb(image, normalize=mode)
        assert rgb.shape == (100, 80, 3) and rgb.dtype == np.uint8
        assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
        assert rgb.min() == 0 and rgb.max() == 255
    # min-max (the reference): a single hot pixel squashes the rest; the percentile stretch is robust to it
    image[0, 0] = 65535
    assert to_uint8_rgb(image)[50, 40, 0] < 30
    assert to_uint8_rgb(image, normalize="percentile")[50, 40, 0] > 100


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
    assert flat.min() == flat.max() == 7  # a constant image is clipped to 0..255, not stretched
    already = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    assert np.array_equal(to_uint8_rgb(already, normalize="percentile"), already)
    full = already.copy()
    full[0, 0] = (0, 255, 0)
    assert np.array_equal(to_uint8_rgb(full), full)  # joint range already 0..255: unchanged


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
    # cellpose's positions: starts 0, 85, 170, 256 in both directions: 16 tiles, repeated 32 // 16 + 1 = 3 times
    assert len(tiles) == 48
    assert all(t.shape == (256, 256, 3) and m.shape == (256, 256) for t, m in tiles)
    rgb = to_uint8_rgb(image)
    assert np.array_equal(tiles[0][0], rgb[:256, :256])
    assert np.array_equal(tiles[1][1], renumber_labels(mask[:256, 85:341]))  # 2/3 overlap with tile 0
    assert np.array_equal(tiles[15][1], renumber_labels(mask[256:, 256:]))
    assert np.array_equal(tiles[16][1], tiles[0][1])  # the list repeats

    # a non-multiple size: the last tile is aligned with the edge
    tiles = make_tiles(image[:, :300], mask[:, :300], tile=256, min_items=1)
    assert len(tiles) == 4 * 3  # 300 px: ceil(2 * 300 / 256) = 3 tiles at 0, 22, 44
    assert np.array_equal(tiles[2][1], renumber_labels(mask[:256, 44:300]))


def test_small_images_are_upscaled_to_the_tile() -> None:
    image, mask = make_cells((100, 300), 20, seed=2)
    tiles = make_tiles(image, mask, tile=256, min_items=1)
    # the short side is resized to the tile (the reference's resize_to_short_edge): (256, 768)
    assert {t.shape for t, _ in tiles} == {(256, 256, 3)}
    assert len(tiles) == 6


def test_resize_to_a_size_or_the_longest_side() -> None:
    image, mask = make_cells((200, 100), 12, seed=4)
    tiles = make_tiles(image, mask, tile=200, min_items=1, resize_to=400)
    # int: longest side, aspect kept: (200, 100) -> (400, 200); 4 tiles of 200 along the long side
    assert len(tiles) == 4
    tile_image, tile_mask = tiles[0]
    assert tile_mask.shape == (200, 200) and tile_image.shape == (200, 200, 3)
    assert np.array_equal(tile_image, resize_linear_exact(to_uint8_rgb(image), (400, 200))[:200])
    assert set(np.unique(tile_mask)) <= set(range(13))
    # (h, w): exactly that size, aspect not kept
    tiles = make_tiles(image, mask, tile=128, min_items=1, resize_to=(256, 256))
    assert len(tiles) == 16 and tiles[0][0].shape == (128, 128, 3)


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
    """The reference's region: chamfer distance in the cell's box, the int(fraction x area) largest."""
    inside = mask == cell
    box = ndimage.find_objects(inside.astype(int))[0]
    distance = np.zeros(mask.shape, dtype=np.float32)
    distance[box] = chamfer_distance(inside[box])
    distance[~inside] = 0
    k = int(inside.sum() * fraction)
    return inside & (distance >= np.sort(distance.ravel())[-k])


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
    mask[0:12, 20:32] = 3  # touches the top edge, reaches beyond the 5 px band: kept
    mask[80:92, 96:100] = 4  # 48 px, entirely within 5 px of the right edge
    mask[70:82, 20:32] = 5  # 18 px from the bottom edge
    rules = PromptSettings(min_cell_area=40, border=5, negative_ratio=0)
    prompts = sample_prompts(mask, np.random.default_rng(0), rules)
    assert sorted(prompts.cell_ids.tolist()) == [1, 2, 3, 5]
    rules = PromptSettings(min_cell_area=100, border=0, negative_ratio=0)
    prompts = sample_prompts(mask, np.random.default_rng(0), rules)
    assert sorted(prompts.cell_ids.tolist()) == [1, 3, 5]


def test_at_most_max_cells_positive_points(cells) -> None:
    _, mask = cells
    prompts = sample_prompts(mask, np.random.default_rng(0), PromptSettings(min_cell_area=20, border=4, max_cells=7))
    assert (prompts.labels == 1).sum() == 7  # 7 cells picked, all usable here


def test_negative_points_in_the_far_background_with_caps(cells) -> None:
    _, mask = cells
    prompts = sample_prompts(mask, np.random.default_rng(1), SMALL_RULES)
    n_cells = len(np.unique(mask)) - 1
    negatives = prompts.labels == 0
    # the border counts as foreground: distances in the mask padded with foreground by `border`
    padded = chamfer_distance(np.pad(mask == 0, 4))
    distance, flat = padded[4:-4, 4:-4], padded.ravel()
    threshold = np.sort(flat)[-int(np.count_nonzero(flat) * 0.2)]
    candidates = int(np.count_nonzero(flat >= threshold))
    assert negatives.sum() == min(-(-n_cells // 2), 30, candidates // 1000 + 1)
    for x, y in prompts.points[negatives].astype(int):
        assert mask[y, x] == 0 and distance[y, x] >= threshold
    assert np.all(prompts.cell_ids[negatives] == 0)

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
    item = next(it for it in (dataset[i] for i in range(len(dataset))) if it is not None)
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
    # a positive target is its cell's (0/1) mask near its point; negative targets are empty
    for (x, y), target in zip(item["points"][positives], item["targets"][positives], strict=True):
        assert target[max(0, int(y) // 4 - 1) : int(y) // 4 + 2, max(0, int(x) // 4 - 1) : int(x) // 4 + 2].max() > 0
        assert set(torch.unique(target).tolist()) == {0.0, 1.0}
    assert float(item["targets"][~positives].sum()) == 0.0

    first = next(i for i in range(len(dataset)) if dataset[i] is not None)
    again = CellTileDataset(tiles, image_size=128, seed=1, prompts=SMALL_RULES)[first]
    assert all(torch.equal(item[k], again[k]) for k in item)
    dataset.set_epoch(1)
    other = dataset[first]
    assert other is None or not torch.equal(item["image"], other["image"])
    assert sorted(dataset.order(3).tolist()) == list(range(len(dataset)))

    batch = collate_items([item, item])
    assert batch["image"].shape == (2, 3, 128, 128) and len(batch["points"]) == 2
