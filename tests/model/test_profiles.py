"""Named inference profiles (``sam.profile``): validation, what each sets, and what status shows."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from cellseg1d.builtin.sam import inference_settings, settings_record
from cellseg1d.config import SAM_PROFILES, SamSettings
from cellseg1d.model.inference import InferenceSettings, precision_dtype, segment_image, sub_batches
from cellseg1d.model.profiles import PROFILES, get_profile, profile_of
from tests.model.devices import CUDA_MARKS


def test_paper_is_the_default_and_changes_nothing():
    assert SamSettings().profile == "paper"
    assert inference_settings(SamSettings()) == InferenceSettings()
    assert PROFILES["paper"].exact and not PROFILES["fast"].exact and not PROFILES["quick"].exact
    assert tuple(PROFILES) == SAM_PROFILES  # the names the config accepts are the profiles defined here


def test_unknown_profile_is_refused_naming_the_setting_and_the_choices():
    with pytest.raises(ValidationError) as info:
        SamSettings(profile="turbo")
    text = str(info.value)
    assert "sam.profile" in text and "paper" in text and "fast" in text and "turbo" in text
    with pytest.raises(ValueError, match="known: paper, fast, quick"):
        get_profile("turbo")


def test_profile_values_apply_and_written_settings_win():
    quick = inference_settings(SamSettings(profile="quick"))
    assert (quick.points_per_side, quick.crop_n_layers, quick.encoder_precision) == (16, 1, "auto")
    mine = inference_settings(SamSettings(profile="quick", points_per_side=24, crop_n_layers=0))
    assert (mine.points_per_side, mine.crop_n_layers) == (24, 0)
    fast = inference_settings(SamSettings(profile="fast"))
    assert (fast.points_per_side, fast.crop_n_layers) == (32, 1) and fast.decoder_precision == "fp32"
    assert settings_record(SamSettings(profile="fast"))["profile"] == "fast"


def test_profile_of_tells_status_what_each_root_runs(tmp_path):
    classical = SimpleNamespace(sam=SamSettings())
    assert profile_of(classical, None)["segmenter"] == "classical"
    ckpt = tmp_path / "sam.pth"
    paper = profile_of(SimpleNamespace(sam=SamSettings(checkpoint=ckpt)), None)
    assert (paper["segmenter"], paper["profile"], paper["exact"]) == ("sam", "paper", True)
    assert profile_of(SimpleNamespace(sam=SamSettings(checkpoint=ckpt, points_per_side=16)), None)["exact"] is False
    quick = profile_of(SimpleNamespace(sam=SamSettings(checkpoint=ckpt, profile="quick", points_per_side=32)), None)
    assert quick["profile"] == "quick" and quick["overrides"] == {"points_per_side": 32} and quick["exact"] is False


def test_precision_values():
    cpu = torch.device("cpu")
    assert precision_dtype("fp32", cpu) is None
    assert precision_dtype("bf16", cpu) is torch.bfloat16 and precision_dtype("fp16", cpu) is torch.float16
    assert precision_dtype("auto", cpu, "decoder") is None  # the CPU decoder stays float32
    with pytest.raises(ValueError, match="encoder_precision"):
        InferenceSettings(encoder_precision="int4")


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA_MARKS)])
def test_auto_precision_is_bf16_on_cuda(device):
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    assert precision_dtype("auto", torch.device(device), "decoder") is expected


def test_sub_batches_never_split_off_a_single_prompt():
    assert [(s.start, s.stop) for s in sub_batches(17, 8)] == [(0, 8), (8, 17)]
    assert [(s.start, s.stop) for s in sub_batches(16, 8)] == [(0, 8), (8, 16)]
    assert [(s.start, s.stop) for s in sub_batches(1, 8)] == [(0, 1)]
    assert [(s.start, s.stop) for s in sub_batches(5, 1)] == [(0, 2), (2, 5)]


def test_bf16_encoder_runs_and_returns_labels():
    """A reduced-precision profile runs end to end on a tiny random model (agreement is measured, not tested)."""
    from cellseg1d.model.sam import build_sam

    torch.manual_seed(0)
    sam = build_sam("tiny", 128)
    rgb = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    settings = InferenceSettings(image_size=128, points_per_side=4, crop_n_layers=0, encoder_precision="bf16",
                                 pred_iou_thresh=0.0, stability_score_thresh=0.0, max_area_fraction=1.0)
    labels = segment_image(sam, rgb, settings)
    assert labels.shape == (96, 96) and labels.dtype == np.uint32
