"""The CellSeg1 reference's inference rules, one test per rule, on small inputs with known answers.

Each test pins one rule of the path from checkpoint to label image where an
earlier cellseg1d differed from the reference implementation (see
docs/engine.md, "Faithfulness to the reference"). Where segment-anything
ships the function the reference calls, it is the oracle.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything.utils import amg
from segment_anything.utils.transforms import ResizeLongestSide

from cellseg1d.model import nms as nms_ops
from cellseg1d.model.inference import (
    InferenceSettings,
    _model_input,
    cleanup_nms,
    near_crop_edge,
    passes_iou,
    resize_crop,
    segment_image,
)
from cellseg1d.model.postprocess import paint_labels, remove_small_regions
from cellseg1d.model.prompts import CropBox, point_grid
from cellseg1d.model.sam import SPECS, _resize_table, build_sam, resize_state_dict

# ------------------------------------------------------------------ resizing the 1024 checkpoint to 512


def test_relative_position_table_is_resized_bilinear_with_align_corners():
    table = torch.tensor([[0.0, 10.0], [2.0, 20.0], [6.0, 0.0]])  # (3, 2)
    resized = _resize_table(table, 5)
    # align_corners=True: rows sit at source positions 0, 0.5, 1, 1.5, 2; the columns are untouched
    expected = torch.tensor([[0.0, 10.0], [1.0, 15.0], [2.0, 20.0], [4.0, 10.0], [6.0, 0.0]])
    torch.testing.assert_close(resized, expected, rtol=0, atol=1e-6)


def test_position_embedding_is_resized_bilinear_with_align_corners():
    state = build_sam("tiny", 64).state_dict()  # grid 4 x 4
    pos = torch.zeros(1, 4, 4, 192)
    pos[0, :, :, 0] = torch.arange(4.0)[:, None] * 3  # rows 0, 3, 6, 9
    pos[0, :, :, 1] = torch.arange(4.0)[None, :]  # columns 0, 1, 2, 3
    state["image_encoder.pos_embed"] = pos
    out = resize_state_dict(state, SPECS["tiny"], 48)["image_encoder.pos_embed"]  # grid 3 x 3
    assert out.shape == (1, 3, 3, 192)
    # corners kept, the middle sample at source position 1.5: 4.5 and 1.5
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.0, 4.5, 9.0]))
    torch.testing.assert_close(out[0, 0, :, 1], torch.tensor([0.0, 1.5, 3.0]))
    # the global-attention tables follow (2 * 3 - 1 rows); a windowed block keeps its own
    resized = resize_state_dict(state, SPECS["tiny"], 48)
    assert resized["image_encoder.blocks.1.attn.rel_pos_h"].shape == (5, 48)
    assert torch.equal(resized["image_encoder.blocks.0.attn.rel_pos_h"], state["image_encoder.blocks.0.attn.rel_pos_h"])


# ------------------------------------------------------------------ each crop to the model input


@pytest.mark.parametrize("shape", [(300, 200), (97, 140), (40, 40)])
def test_crop_is_resized_as_resize_longest_side_does(shape):
    """segment-anything's ResizeLongestSide.apply_image (PIL bilinear) is what the reference feeds SAM."""
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    expected = ResizeLongestSide(128).apply_image(image)
    assert np.array_equal(resize_crop(image, expected.shape[:2]), expected)
    sam = build_sam("tiny", 128)
    image_t = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    x, new_hw = _model_input(sam, image_t, CropBox(0, 0, shape[1], shape[0], 0), 128)
    assert new_hw == expected.shape[:2]
    reference_input = sam.preprocess(torch.as_tensor(expected).permute(2, 0, 1)[None])
    assert torch.equal(x, reference_input)


def test_point_grid_is_bitwise_the_reference_grid():
    for n in (1, 7, 16, 32, 64):
        assert np.array_equal(point_grid(n), amg.build_point_grid(n))


# ------------------------------------------------------------------ filters


def test_iou_threshold_is_strict_and_zero_disables_it():
    scores = torch.tensor([0.8, 0.8000001, 0.9, -0.5])
    assert passes_iou(scores, 0.8).tolist() == [False, True, True, False]
    assert passes_iou(scores, 0.0).tolist() == [True, True, True, True]  # negative scores pass too


def test_crop_edge_test_uses_the_last_row_and_column_of_the_box():
    crop = CropBox(0, 0, 100, 100, 1)  # an interior edge at x = 100 and y = 100 of a 200 x 200 image
    margin = 20
    # last column 79: 21 px from the edge at 100 -> kept; last column 80: exactly 20 px -> dropped
    boxes = torch.tensor([[30, 30, 80, 60], [30, 30, 81, 60], [30, 30, 60, 80], [30, 30, 60, 81]])
    near = near_crop_edge(boxes, crop, (200, 200), margin)
    assert near.tolist() == [False, True, False, True]
    # the same as segment-anything's is_box_near_crop_edge on boxes with inclusive ends
    inclusive = boxes - torch.tensor([0, 0, 1, 1])
    assert amg.is_box_near_crop_edge(inclusive, list(crop.as_tuple()), [0, 0, 200, 200], margin).tolist() == near.tolist()


def test_crop_edge_test_matches_segment_anything_on_random_boxes():
    rng = np.random.default_rng(7)
    image_hw = (300, 260)
    for crop in (CropBox(0, 0, 260, 300, 0), CropBox(0, 0, 150, 170, 1), CropBox(110, 130, 260, 300, 1)):
        x0 = rng.integers(0, crop.width - 1, 500)
        y0 = rng.integers(0, crop.height - 1, 500)
        x1 = np.minimum(x0 + rng.integers(1, 60, 500), crop.width)
        y1 = np.minimum(y0 + rng.integers(1, 60, 500), crop.height)
        boxes = torch.as_tensor(np.stack([x0, y0, x1, y1], axis=1))
        ours = near_crop_edge(boxes, crop, image_hw, 20.0)
        shifted = boxes + torch.tensor([crop.x0, crop.y0, crop.x0 - 1, crop.y0 - 1])  # image frame, inclusive
        crop_frame = shifted - torch.tensor([crop.x0, crop.y0, crop.x0, crop.y0])
        theirs = amg.is_box_near_crop_edge(crop_frame, list(crop.as_tuple()), [0, 0, image_hw[1], image_hw[0]], 20.0)
        assert torch.equal(ours, theirs)


# ------------------------------------------------------------------ mask NMS


def test_masks_whose_boxes_share_one_column_never_suppress_each_other():
    masks = torch.zeros(3, 10, 12, dtype=torch.bool)
    masks[0, :, 0:3] = True  # columns 0-2
    masks[1, :, 2:5] = True  # columns 2-4: one shared column, mask IoU 10 / 50 = 0.2
    masks[2, :, 4:8] = True  # columns 4-7: shares column 4 with mask 1
    scores = torch.tensor([0.9, 0.8, 0.7])
    boxes = nms_ops.mask_boxes(masks)
    assert nms_ops.mask_nms(masks, scores, 0.05, gate_boxes=boxes).tolist() == [0, 1, 2]
    assert nms_ops.mask_nms(masks, scores, 0.05).tolist() == [0, 2]  # without the gate: by mask IoU alone
    masks[1, :, 1:5] = True  # two shared columns: compared, suppressed
    assert nms_ops.mask_nms(masks, scores, 0.05, gate_boxes=nms_ops.mask_boxes(masks)).tolist() == [0, 2]


def test_cleanup_nms_compares_the_masks_before_cleanup_and_keeps_ties_in_order():
    h = w = 40
    ring = torch.zeros(h, w, dtype=torch.bool)
    ring[5:25, 5:25] = True
    ring[12:15, 12:17] = False  # a 15 px hole: the mask is "changed" by the clean-up
    patch = torch.zeros(h, w, dtype=torch.bool)
    patch[12:17, 12:17] = True  # covers the hole (15 px) and 10 px of the ring
    masks = torch.stack([ring, patch])
    cleaned_np, changed_np = remove_small_regions(masks.numpy(), 20)
    cleaned, changed = torch.from_numpy(cleaned_np), torch.from_numpy(changed_np)
    assert changed.tolist() == [True, False]
    quality = torch.tensor([0.9, 0.5])
    settings = InferenceSettings()
    # before clean-up the IoU is 10 / 400 = 0.025 <= 0.05: both stay, the unchanged mask first
    assert cleanup_nms(masks, cleaned, changed, quality, settings).tolist() == [1, 0]
    # on the cleaned masks the IoU is 25 / 400 = 0.0625: the changed ring goes
    cleaned_mode = InferenceSettings(cleanup_nms="cleaned")
    assert cleanup_nms(masks, cleaned, changed, quality, cleaned_mode).tolist() == [1]
    # two unchanged overlapping masks tie (score 1 each): the earlier one wins, whatever its quality
    twins = torch.stack([patch, patch])
    kept = cleanup_nms(twins, twins, torch.tensor([False, False]), torch.tensor([0.2, 0.9]), settings)
    assert kept.tolist() == [0]


# ------------------------------------------------------------------ holes and islands


def test_a_mask_whose_only_component_is_small_counts_as_changed():
    masks = np.zeros((2, 30, 30), dtype=bool)
    masks[0, 10:14, 10:14] = True  # 16 px < 20: kept (the largest), but flagged
    masks[1, 5:15, 5:15] = True  # 100 px, no hole, no island
    out, changed = remove_small_regions(masks, 20)
    assert np.array_equal(out, masks)
    assert changed.tolist() == [True, False]


def test_equal_small_islands_tie_broken_in_2x2_block_order():
    """OpenCV numbers components block by block (2 x 2 pixels); the first block wins a tie, not the first pixel."""
    masks = np.zeros((1, 30, 40), dtype=bool)
    masks[0, 1, 10:13] = True  # first pixel (1, 10): block (0, 5)
    masks[0, 0, 15:18] = True  # first pixel (0, 15): earlier in raster order, but block (0, 7)
    out, changed = remove_small_regions(masks, 20)
    assert changed[0]
    assert out[0, 1, 10:13].all() and not out[0, 0, 15:18].any()


# ------------------------------------------------------------------ painting the label image


def test_painting_clears_a_masks_whole_area_then_paints_its_largest_piece():
    big = np.zeros((20, 30), bool)
    big[0:10, 0:10] = True  # 100 px, painted first
    two_pieces = np.zeros((20, 30), bool)
    two_pieces[4:6, 4:6] = True  # 4 px inside big
    two_pieces[12:18, 20:26] = True  # 36 px elsewhere: the largest piece
    labels = paint_labels(np.stack([big, two_pieces]))
    assert labels[4:6, 4:6].max() == 0  # cleared, not painted: a hole in big
    assert (labels == 1).sum() == 96 and (labels == 2).sum() == 36
    kept = paint_labels(np.stack([big, two_pieces]), mode="largest_piece")
    assert (kept[4:6, 4:6] == 1).all()  # the alternative leaves big whole


def test_equal_areas_are_painted_in_candidate_order():
    a = np.zeros((10, 10), bool)
    a[0:3, 0:3] = True
    b = np.zeros((10, 10), bool)
    b[1:4, 1:4] = True  # same area, overlaps a: painted after a, so b wins the overlap
    labels = paint_labels(np.stack([a, b]))
    assert labels[2, 2] == 2 and labels[0, 0] == 1


# ------------------------------------------------------------------ settings


def test_within_crop_nms_uses_the_crop_threshold():
    """The reference passes crop_nms_thresh to the NMS inside each crop; box_nms_thresh only to the clean-up NMS."""
    torch.manual_seed(0)
    sam = build_sam("tiny", 64).eval()
    rng = np.random.default_rng(0)
    rgb = np.repeat(rng.integers(0, 255, (60, 60, 1), dtype=np.uint8), 3, axis=2)
    base = dict(image_size=64, points_per_side=6, crop_n_layers=0, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                stability_score_offset=0.02, max_area_fraction=0.5, min_region_area=0)
    crop_only = segment_image(sam, rgb, InferenceSettings(**base, nms_thresh=0.99, crop_nms_thresh=0.05))
    both = segment_image(sam, rgb, InferenceSettings(**base, nms_thresh=0.05, crop_nms_thresh=0.05))
    loose = segment_image(sam, rgb, InferenceSettings(**base, nms_thresh=0.05, crop_nms_thresh=0.99))
    assert np.array_equal(crop_only, both)
    assert not np.array_equal(loose, both)


def test_unknown_modes_are_refused():
    with pytest.raises(ValueError, match="cleanup_nms"):
        InferenceSettings(cleanup_nms="best")
    with pytest.raises(ValueError, match="paint"):
        InferenceSettings(paint="all")
