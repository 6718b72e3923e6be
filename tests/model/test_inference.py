"""CellSeg1 inference (cellseg1d.model.inference, postprocess, prompts).

The model is a tiny, randomly initialised SAM (seeded): it finds no cells, so
thresholds are lowered where masks must pass, and the clean-up and painting
rules are tested directly on constructed masks.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy import ndimage
from segment_anything.utils import amg

from cellseg1d.model.metrics import average_precision

from cellseg1d.model.inference import (
    InferenceReport,
    InferenceSettings,
    as_rgb_uint8,
    crop_candidates,
    decode_masks,
    decode_scores,
    near_crop_edge,
    segment_image,
    stability_score,
)
from cellseg1d.model.postprocess import (
    keep_largest_regions,
    largest_component,
    paint_labels,
    relabel_sequential,
    remove_small_regions,
)
from cellseg1d.model.prompts import CropBox, crop_boxes, point_grid, resized_shape
from cellseg1d.model.sam import build_sam
from cellseg1d.model.tiling import segment_large
from cellseg1d.testing.synthetic import make_cells
from tests.helpers import TINY_BASE

SIZE = 128  # model input of the tiny test model

pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(2)
    return build_sam("tiny", image_size=SIZE)


def _cells_rgb(shape: tuple[int, int], seed: int = 1) -> np.ndarray:
    image, _ = make_cells(shape, 12, seed=seed)
    gray = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def _passing_settings(**overrides) -> InferenceSettings:
    """Settings under which some of the random model's masks pass every filter."""
    values = dict(image_size=SIZE, points_per_side=8, pred_iou_thresh=-0.12, stability_score_thresh=0.0,
                  stability_score_offset=0.02, max_area_fraction=0.3)
    values.update(overrides)
    return InferenceSettings(**values)


# ---------------------------------------------------------------- prompts


def test_settings_defaults_are_the_papers():
    s = InferenceSettings()
    assert (s.points_per_side, s.points_per_batch, s.crop_n_layers) == (32, 64, 1)
    assert s.crop_overlap_ratio == pytest.approx(512 / 1500)
    assert (s.pred_iou_thresh, s.stability_score_thresh, s.stability_score_offset) == (0.8, 0.6, 0.8)
    assert (s.max_area_fraction, s.nms_thresh, s.crop_nms_thresh) == (0.1, 0.05, 0.05)
    assert (s.min_region_area, s.image_size) == (20, 512)


def test_point_grid_and_crop_boxes_match_segment_anything():
    np.testing.assert_allclose(point_grid(32), amg.build_point_grid(32), atol=1e-12)
    for shape in [(512, 512), (300, 451), (97, 40)]:
        ours = crop_boxes(shape, 1, 512 / 1500)
        theirs, layers = amg.generate_crop_boxes(shape, 1, 512 / 1500)
        assert [c.as_tuple() for c in ours] == [tuple(b) for b in theirs]
        assert [c.layer for c in ours] == layers
    assert len(crop_boxes((64, 64), 0, 0.3)) == 1
    assert resized_shape(300, 451, 512) == (341, 512)


# ---------------------------------------------------------------- filters


def test_stability_score_matches_segment_anything():
    logits = torch.randn(6, 20, 30) * 3
    logits[5] = -5  # empty: 0 here, NaN in segment-anything
    ours = stability_score(logits, 0.0, 0.8)
    theirs = amg.calculate_stability_score(logits, 0.0, 0.8)
    np.testing.assert_allclose(ours[:5].numpy(), theirs[:5].numpy(), atol=1e-6)
    assert ours[5] == 0


def test_near_crop_edge_ignores_image_edges():
    crop = CropBox(100, 0, 300, 200, 1)  # touches the image top; left/right/bottom are interior
    boxes = torch.tensor([
        [5, 0, 50, 40],  # at the crop's left (interior) edge
        [50, 0, 90, 40],  # at the image top only
        [50, 50, 90, 90],  # inside
        [150, 50, 200, 90],  # at the crop's right edge (interior)
        [50, 170, 90, 200],  # at the crop's bottom edge (interior)
    ])
    assert near_crop_edge(boxes, crop, (400, 500), 20.0).tolist() == [True, False, False, True, True]
    whole = CropBox(0, 0, 300, 400, 0)
    assert not near_crop_edge(boxes, whole, (400, 300), 20.0).any()


# ---------------------------------------------------------------- postprocess


def test_remove_small_regions_fills_holes_and_removes_islands():
    masks = np.zeros((3, 40, 40), dtype=bool)
    masks[0, 5:25, 5:25] = True
    masks[0, 10:13, 10:13] = False  # hole of 9 px: filled
    masks[0, 15:22, 15:22] = False  # hole of 49 px: kept
    masks[0, 30:33, 30:33] = True  # island of 9 px: removed
    masks[1, 2:5, 2:5] = True  # only small components: the largest stays
    masks[1, 30:32, 30:32] = True
    masks[2, 1:30, 1:30] = True  # untouched
    out, changed = remove_small_regions(masks, 20)
    expected0 = np.zeros((40, 40), dtype=bool)
    expected0[5:25, 5:25] = True
    expected0[15:22, 15:22] = False
    assert np.array_equal(out[0], expected0)
    assert out[1].sum() == 9 and out[1, 2:5, 2:5].all()
    assert np.array_equal(out[2], masks[2])
    assert changed.tolist() == [True, True, False]
    assert np.array_equal(masks[0, 10:13, 10:13], np.zeros((3, 3), bool))  # input untouched


def test_holes_are_8_connected_and_a_small_region_at_the_image_border_is_a_hole():
    """segment-anything labels the whole image: a small background region cut off at the border is a hole."""
    masks = np.zeros((1, 40, 40), dtype=bool)
    masks[0, 0:10, 0:10] = True
    masks[0, 0:3, 0:3] = False  # 9 px notch at the image corner, enclosed by the mask and the border
    out, changed = remove_small_regions(masks, 20)
    assert changed[0] and out[0, 0:10, 0:10].all() and out[0].sum() == 100
    masks[0, 3, 3] = False  # 8-connected to the notch only diagonally: one 10 px region, still a hole
    out, _ = remove_small_regions(masks, 20)
    assert out[0, 0:10, 0:10].all()


def test_largest_component_is_4_connected():
    masks = np.zeros((2, 12, 12), dtype=bool)
    masks[0, 0:3, 0:3] = True
    masks[0, 3:7, 3:7] = True  # diagonal neighbour: a separate 4-connected component (16 > 9)
    masks[1, 5, 5] = True
    out = largest_component(masks)
    assert out[0].sum() == 16 and out[0, 3:7, 3:7].all()
    assert out[1].sum() == 1


def test_paint_labels_smaller_wins_largest_component_relabel():
    h, w = 30, 30
    big = np.zeros((h, w), bool)
    big[0:20, 0:20] = True  # 400 px
    small = np.zeros((h, w), bool)
    small[5:10, 5:10] = True  # inside big: wins there
    split = np.zeros((h, w), bool)
    split[22:28, 0:6] = True  # 36 px main part
    split[22:24, 25:27] = True  # 4 px fragment: dropped
    hidden = np.zeros((h, w), bool)
    hidden[12:14, 12:14] = True
    hidden_cover = np.zeros((h, w), bool)
    hidden_cover[12:14, 12:14] = True  # same size, later in input order: painted after, wins
    labels = paint_labels(np.stack([small, big, split, hidden, hidden_cover]))
    assert labels.dtype == np.uint32 and labels.shape == (h, w)
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2, 3, 4]  # 1..N, hidden vanished
    assert labels[7, 7] == labels[5:10, 5:10].min() != labels[0, 0]
    assert (labels == labels[0, 0]).sum() == 400 - 25 - 4
    assert labels[22:24, 25:27].max() == 0
    assert labels[1, 1] == 1  # painted first (largest)


def test_paint_labels_largest_piece_mode_keeps_the_largest_piece_of_a_split_mask():
    big = np.zeros((1, 20, 30), bool)
    big[0, 5:15, 0:30] = True  # 300 px
    bar = np.zeros((1, 20, 30), bool)
    bar[0, 0:20, 8:10] = True  # 40 px: cuts big into 8 + 20 columns
    labels = paint_labels(np.concatenate([big, bar]), mode="largest_piece")
    assert labels.max() == 2
    assert labels[10, 20] == 1 and labels[10, 9] == 2 and labels[10, 3] == 0  # left piece dropped
    assert (labels == 1).sum() == 10 * 20
    # the reference's rule keeps both pieces of the split mask under one label
    reference = paint_labels(np.concatenate([big, bar]))
    assert reference[10, 20] == 1 and reference[10, 3] == 1 and (reference == 1).sum() == 300 - 20


def test_keep_largest_regions():
    labels = np.array([[1, 1, 0, 1], [0, 0, 0, 0], [2, 0, 3, 3], [2, 0, 0, 0]], dtype=np.uint32)
    out = keep_largest_regions(labels)
    assert out.dtype == np.uint32
    assert out.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [2, 0, 3, 3], [2, 0, 0, 0]]
    diagonal = np.array([[5, 0], [0, 5]])
    assert keep_largest_regions(diagonal).tolist() == [[5, 0], [0, 0]]  # 4-connected
    assert keep_largest_regions(np.zeros((3, 3), np.uint32)).max() == 0


def test_relabel_sequential():
    labels = np.array([[0, 7, 7], [3, 0, 100]])
    assert relabel_sequential(labels).tolist() == [[0, 2, 2], [1, 0, 3]]
    assert relabel_sequential(np.zeros((2, 2), int)).dtype == np.uint32


# ---------------------------------------------------------------- model


def test_as_rgb_uint8():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert as_rgb_uint8(gray).shape == (3, 4, 3)
    assert np.array_equal(as_rgb_uint8(gray[:, :, None]), as_rgb_uint8(gray))
    with pytest.raises(ValueError):
        as_rgb_uint8(gray.astype(np.float32))
    with pytest.raises(ValueError):
        as_rgb_uint8(np.zeros((3, 4, 2), np.uint8))


def test_two_stage_decoder_matches_sam_mask_decoder(sam):
    with torch.inference_mode():
        embedding = sam.image_encoder(torch.randn(1, 3, SIZE, SIZE))
        pe = sam.prompt_encoder.get_dense_pe()
        coords = torch.rand(10, 1, 2) * SIZE
        iou, token, image_tokens = decode_scores(sam, embedding, pe, coords)
        logits = decode_masks(sam, token[3:7], image_tokens[3:7])
        sparse, dense = sam.prompt_encoder(points=(coords, torch.ones(10, 1, dtype=torch.int)), boxes=None,
                                           masks=None)
        ref_logits, ref_iou = sam.mask_decoder(image_embeddings=embedding, image_pe=pe,
                                               sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                               multimask_output=False)
    assert logits.shape == (4, 1, SIZE // 4, SIZE // 4)
    torch.testing.assert_close(iou, ref_iou[:, 0])
    torch.testing.assert_close(logits, ref_logits[3:7], atol=1e-5, rtol=1e-5)


def test_segment_image_shape_dtype_determinism(sam):
    rgb = _cells_rgb((120, 100))
    settings = _passing_settings()
    report = InferenceReport()
    first = segment_image(sam, rgb, settings, "cpu", report=report)
    second = segment_image(sam, rgb, settings)
    assert first.dtype == np.uint32 and first.shape == (120, 100)
    assert np.array_equal(first, second)
    assert first.max() >= 1
    assert np.array_equal(np.unique(first), np.arange(first.max() + 1))
    assert report.counts["prompts"] == 5 * 64
    assert report.counts["filters"] > report.counts["crop_nms"] >= report.counts["labels"] == first.max()
    assert set(report.seconds) >= {"embed", "decode", "mask_decode", "filter", "nms", "postprocess"}
    # paper thresholds: the random model finds nothing, which is a valid empty label image
    empty = segment_image(sam, rgb, InferenceSettings(image_size=SIZE, points_per_side=4))
    assert empty.dtype == np.uint32 and empty.shape == (120, 100) and empty.max() == 0


def test_fast_path_keeps_the_same_masks_as_upsampling_everything(sam):
    rgb = _cells_rgb((120, 100))
    settings = _passing_settings()
    image_t = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    total = 0
    with torch.inference_mode():
        for crop in crop_boxes((120, 100), 1, settings.crop_overlap_ratio):
            fast = crop_candidates(sam, image_t, crop, settings)
            slow = crop_candidates(sam, image_t, crop, settings, upsample_all=True)
            assert torch.equal(fast.masks, slow.masks)
            assert torch.equal(fast.iou_pred, slow.iou_pred)
            assert torch.equal(fast.stability, slow.stability)
            assert torch.equal(fast.boxes, slow.boxes)
            total += len(fast)
    assert total > 0  # the comparison saw masks
    # a threshold <= 0 tests nothing (the reference's rule): shift the IoU head so that a positive one skips some
    shifted = copy.deepcopy(sam)
    with torch.no_grad():
        shifted.mask_decoder.iou_prediction_head.layers[-1].bias += 0.2
    settings = _passing_settings(pred_iou_thresh=0.08)
    fast_report, slow_report = InferenceReport(), InferenceReport()
    fast_labels = segment_image(shifted, rgb, settings, report=fast_report)
    slow_labels = segment_image(shifted, rgb, settings, upsample_all=True, report=slow_report)
    assert np.array_equal(fast_labels, slow_labels) and fast_labels.max() > 0
    assert 0 < fast_report.counts["iou"] == slow_report.counts["iou"] < 5 * 64  # some prompts were skipped


def test_non_square_and_grayscale_inputs(sam):
    settings = _passing_settings(points_per_side=4)
    rgb = _cells_rgb((70, 150), seed=5)
    gray = rgb[:, :, 0]
    a = segment_image(sam, gray, settings)
    b = segment_image(sam, rgb, settings)
    c = segment_image(sam, gray[:, :, None], settings)
    assert a.shape == (70, 150) and a.dtype == np.uint32
    assert np.array_equal(a, b) and np.array_equal(a, c)
    tall = segment_image(sam, np.ascontiguousarray(rgb.transpose(1, 0, 2)), settings)
    assert tall.shape == (150, 70)


def test_image_smaller_than_model_input_size_setting(sam):
    # crops resized to 96 px and padded to the model's 128
    labels = segment_image(sam, _cells_rgb((60, 80)), _passing_settings(image_size=96, points_per_side=4))
    assert labels.shape == (60, 80)
    with pytest.raises(ValueError):
        segment_image(sam, _cells_rgb((60, 80)), InferenceSettings(image_size=256))


def test_device_must_be_the_models(sam):
    with pytest.raises(ValueError):
        segment_image(sam, _cells_rgb((40, 40)), _passing_settings(points_per_side=2), device="cuda")


def test_bf16_autocast_runs_on_cpu_and_returns_labels(sam):
    settings = _passing_settings(points_per_side=4, crop_n_layers=0)
    rgb = _cells_rgb((64, 64))
    fp32 = segment_image(sam, rgb, settings)
    bf16 = segment_image(sam, rgb, settings, autocast=torch.bfloat16)
    assert bf16.dtype == np.uint32 and bf16.shape == fp32.shape
    assert np.array_equal(np.unique(bf16), np.arange(bf16.max() + 1))
    with torch.inference_mode():
        image_t = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
        crop = crop_boxes((64, 64), 0, 0.3)[0]
        cand = crop_candidates(sam, image_t, crop, settings, autocast=torch.bfloat16)
        ref = crop_candidates(sam, image_t, crop, settings)
    assert cand.iou_pred.dtype == torch.float32 and cand.stability.dtype == torch.float32
    if len(cand) and len(ref):  # bf16 rounding may move masks across the thresholds, not far
        assert abs(len(cand) - len(ref)) <= max(2, len(ref) // 2)


def test_area_limit_and_crop_edge_filters_drop_masks(sam):
    rgb = _cells_rgb((120, 100))
    base = InferenceReport()
    segment_image(sam, rgb, _passing_settings(), report=base)
    tiny_area = InferenceReport()
    labels = segment_image(sam, rgb, _passing_settings(max_area_fraction=1e-4), report=tiny_area)
    assert labels.max() == 0 and tiny_area.counts.get("filters", 0) == 0 < base.counts["filters"]
    no_edge = InferenceReport()
    segment_image(sam, rgb, _passing_settings(crop_edge_margin=-1.0), report=no_edge)  # edge filter off
    assert no_edge.counts["filters"] >= base.counts["filters"]


@pytest.mark.slow
def test_paper_defaults_end_to_end_on_tiny_model():
    """The paper's grid and crops (1024 prompts per crop, 5 crops) at input 256."""
    torch.manual_seed(0)
    model = build_sam("tiny", image_size=256)
    rgb = _cells_rgb((256, 230))
    report = InferenceReport()
    labels = segment_image(model, rgb, InferenceSettings(image_size=256), report=report)
    assert labels.shape == (256, 230) and labels.dtype == np.uint32
    assert report.counts["prompts"] == 5 * 32 * 32
    assert np.array_equal(np.unique(labels), np.arange(labels.max() + 1))




@pytest.fixture(scope="module")
def trained_sam():
    """The tiny SAM trained on synthetic bright cells (input 256) by scripts/make_tiny_base.py."""
    if not TINY_BASE.is_file():
        pytest.skip(f"{TINY_BASE} not present")
    from safetensors.torch import load_file

    model = build_sam("tiny", image_size=256)
    model.load_state_dict({k: v.float() for k, v in load_file(str(TINY_BASE)).items()})
    return model.eval()


def _bright_cells(shape: tuple[int, int], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    image, truth = make_cells(shape, n, radius=(8, 14), seed=seed)
    gray = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2), truth


def test_trained_tiny_model_finds_cells_and_fast_path_is_exact(trained_sam):
    """With a model that really segments cells, many masks pass: both orders still agree exactly."""
    rgb, truth = _bright_cells((128, 128), 40, seed=3100)
    settings = InferenceSettings(image_size=256, points_per_side=8)
    report = InferenceReport()
    labels = segment_image(trained_sam, rgb, settings, report=report)
    assert report.counts["iou"] < report.counts["prompts"] and report.counts["filters"] > 50
    assert average_precision(labels, truth, 0.5)[0].ap >= 0.6
    assert np.array_equal(labels, segment_image(trained_sam, rgb, settings, upsample_all=True))
    for value, where in enumerate(ndimage.find_objects(labels), start=1):
        assert ndimage.label(labels[where] == value)[1] == 1  # every label is one piece


@pytest.mark.slow
def test_trained_tiny_model_tiled_image(trained_sam):
    rgb, truth = _bright_cells((256, 256), 80, seed=3300)
    labels = segment_large(trained_sam, rgb, InferenceSettings(image_size=256, points_per_side=8), tile=128,
                           overlap=48)
    assert average_precision(labels, truth, 0.5)[0].ap >= 0.8
    for value, where in enumerate(ndimage.find_objects(labels), start=1):
        assert ndimage.label(labels[where] == value)[1] == 1
