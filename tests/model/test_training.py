"""Training a CellSeg1 adapter: parameter updates, interruption and resuming, learning.

The fast tests use the "tiny" SAM at input 64. The slow ones train for real
(minutes on two CPU cores) and check that segmentation gets much better.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from cellseg1d.model.lora import apply_lora, unwrap
from cellseg1d.model.sam import build_sam
from cellseg1d.model.prompt_score import point_prompt_score
from cellseg1d.model.train import (
    TrainingError,
    TrainingInterrupted,
    TrainSettings,
    train_adapter,
)
from cellseg1d.testing.synthetic import make_cells
from tests.helpers import TINY_BASE
from tests.model.devices import DEVICES


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny(image_size: int = 64, seed: int = 123):
    torch.manual_seed(seed)
    return build_sam("tiny", image_size=image_size)


def _fast_settings(**overrides) -> TrainSettings:
    values = dict(image_size=64, tile=64, min_items=4, epochs=50, batch_size=2, grad_accum=2, max_steps=4,
                  min_cell_area=8, border=2, max_cells=6, device="cpu", resize_to=None)
    values.update(overrides)
    return TrainSettings(**values)



@pytest.fixture(scope="module")
def small_cells() -> tuple[np.ndarray, np.ndarray]:
    return make_cells((96, 96), 14, radius=(5, 8), seed=7)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    after = model.state_dict()
    return {name for name, value in before.items() if not torch.equal(value, after[name])}


# --------------------------------------------------------------------------
# Fast
# --------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_one_step_updates_only_the_lora_weights(small_cells, device) -> None:
    image, mask = small_cells
    torch.manual_seed(0)
    model = apply_lora(_tiny())
    before = _params(model)
    result = train_adapter(model, image, mask, _fast_settings(max_steps=1, grad_accum=1, device=device),
                           progress=False)
    assert result.device.startswith(device)
    model.cpu()
    assert result.steps == 1 and len(result.losses) == 1 and np.isfinite(result.losses[0])
    assert result.losses[0] > 0 and np.isfinite(result.mask_losses[0]) and np.isfinite(result.iou_losses[0])
    changed = _changed(before, model)
    assert changed, "no weight changed"
    assert all("lora_" in name for name in changed), sorted(changed)[:5]
    assert any("lora_B" in name for name in changed)
    assert not model.training  # handed back in eval mode


def test_train_all_updates_the_base_weights(small_cells) -> None:
    image, mask = small_cells
    sam = _tiny()
    result = train_adapter(sam, image, mask, _fast_settings(max_steps=1, grad_accum=1, train_all=True),
                           progress=False)
    model = result.model
    assert np.isfinite(result.losses[0])
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert not frozen
    # the base weights are trained, not just the adapter
    encoder = unwrap(model).image_encoder
    assert encoder.patch_embed.proj.weight.grad is None  # gradients are freed after training
    before = _tiny()
    assert not torch.equal(before.image_encoder.patch_embed.proj.weight, encoder.patch_embed.proj.weight)
    assert not torch.equal(before.mask_decoder.iou_token.weight, unwrap(model).mask_decoder.iou_token.weight)


def test_interrupt_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(small_cells, tmp_path) -> None:
    image, mask = small_cells
    settings = _fast_settings()
    full = train_adapter(_tiny(), image, mask, settings, progress=False)
    assert full.steps == full.total_steps == 4

    checkpoint = tmp_path / "run" / "train.ckpt"
    seen = []

    def stop_after_two(info) -> None:
        seen.append(info.step)
        if info.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match="resume=True") as caught:
        train_adapter(_tiny(), image, mask, settings, progress=False, checkpoint_path=checkpoint,
                      on_step=stop_after_two)
    assert isinstance(caught.value, KeyboardInterrupt)
    assert caught.value.step == 2 and seen == [1, 2]
    assert checkpoint.is_file() and str(checkpoint) in str(caught.value)

    resumed = train_adapter(_tiny(), image, mask, settings, progress=False, checkpoint_path=checkpoint,
                            resume=True)
    assert resumed.start_step == 2 and resumed.steps == 4
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5)
    expected = {n: p for n, p in full.model.named_parameters() if p.requires_grad}
    got = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert expected.keys() == got.keys() and any("lora_" in n for n in got)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_interrupt_without_checkpoint_path_says_so(small_cells) -> None:
    image, mask = small_cells

    def stop(info) -> None:
        raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match="no checkpoint was saved"):
        train_adapter(_tiny(), image, mask, _fast_settings(max_steps=2, grad_accum=1), progress=False,
                      on_step=stop)


def test_resume_refuses_missing_or_mismatched_checkpoints(small_cells, tmp_path) -> None:
    image, mask = small_cells
    with pytest.raises(TrainingError, match="no training checkpoint"):
        train_adapter(_tiny(), image, mask, _fast_settings(), progress=False, checkpoint_path=tmp_path / "none",
                      resume=True)
    checkpoint = tmp_path / "train.ckpt"

    def stop(info) -> None:
        raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train_adapter(_tiny(), image, mask, _fast_settings(max_steps=2, grad_accum=1), progress=False,
                      checkpoint_path=checkpoint, on_step=stop)
    with pytest.raises(TrainingError, match="lr="):
        train_adapter(_tiny(), image, mask, _fast_settings(max_steps=2, grad_accum=1, lr=1e-4), progress=False,
                      checkpoint_path=checkpoint, resume=True)
    with pytest.raises(TrainingError, match="another training image"):
        train_adapter(_tiny(), image[::-1].copy(), mask[::-1].copy(), _fast_settings(max_steps=2, grad_accum=1),
                      progress=False, checkpoint_path=checkpoint, resume=True)


def test_training_without_usable_prompts_says_what_to_do() -> None:
    # 4 x 4 px cells (16 px, not above min_cell_area) cover the image: no positive point, and the
    # foreground / background ratio > 5 allows no negative one: every batch is skipped
    mask = (np.arange(64)[:, None] // 4 * 16 + np.arange(64)[None, :] // 4 + 1).astype(np.int32)
    mask[::8, ::8] = 0
    image = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    with pytest.raises(TrainingError, match="every batch was skipped.*min_cell_area"):
        train_adapter(_tiny(), image, mask, _fast_settings(min_cell_area=20), progress=False)


def test_model_input_size_must_match(small_cells) -> None:
    image, mask = small_cells
    with pytest.raises(TrainingError, match="image_size=96"):
        train_adapter(_tiny(64), image, mask, _fast_settings(image_size=96, tile=96), progress=False)


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        TrainSettings(image_size=100)
    with pytest.raises(ValueError, match="batch_size"):
        TrainSettings(batch_size=0)
    rules = TrainSettings(image_size=256).prompt_settings()
    assert (rules.min_cell_area, rules.border, rules.max_cells) == (25, 10, 30)
    rules = TrainSettings().prompt_settings()
    assert (rules.min_cell_area, rules.border) == (100, 20)
    with pytest.raises(ValueError, match="schedule"):
        TrainSettings(schedule="linear")
    with pytest.raises(ValueError, match="dropout_mode"):
        TrainSettings(dropout_mode="both")
    with pytest.raises(ValueError, match="resize_to"):
        TrainSettings(resize_to=(512, 0))
    # the reference's recipe by default
    default = TrainSettings()
    assert (default.resize_to, default.schedule, default.dropout_mode, default.mask_loss_on) == (
        (512, 512), "reference", "output", "cells")
    assert (default.augment_fill, default.normalize, default.mixed_precision) == ("zero", "minmax", False)


# --------------------------------------------------------------------------
# The stored tiny base (fast) and learning (slow)
# --------------------------------------------------------------------------


def _load_tiny_base():
    """The pretrained tiny base of ``scripts/make_tiny_base.py`` (float32, eval mode)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not TINY_BASE.is_file():
        pytest.fail(f"{TINY_BASE} is missing; create it with: .venv/bin/python scripts/make_tiny_base.py")
    with safe_open(str(TINY_BASE), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    sam = build_sam(metadata["spec"], image_size=int(metadata["image_size"]))
    sam.load_state_dict({k: v.float() for k, v in load_file(str(TINY_BASE)).items()})
    return sam.eval(), metadata


def _bright_cells(seed: int, shape=(128, 128)):
    """Synthetic cells at the scale the tiny base was trained on (128 px tiles, shown at 256)."""
    return make_cells(shape, 40, radius=(8, 14), seed=seed)


def _inverted(image: np.ndarray) -> np.ndarray:
    """The other style: dark cells on a bright background."""
    return (1.0 - image).astype(np.float32)


def _mean_miou(model, images) -> float:
    return float(np.mean([point_prompt_score(model, image, mask).miou for image, mask in images]))


def test_stored_tiny_base_segments_bright_cells_but_not_inverted_ones() -> None:
    assert TINY_BASE.stat().st_size <= 12_000_000
    sam, metadata = _load_tiny_base()
    assert metadata["spec"] == "tiny" and metadata["image_size"] == "256"
    images = [_bright_cells(seed) for seed in (3100, 3101)]
    assert _mean_miou(sam, images) >= 0.6
    assert _mean_miou(sam, [(_inverted(i), m) for i, m in images]) <= 0.2


@pytest.mark.slow
def test_lora_adapts_the_tiny_base_to_a_new_image_style(capsys) -> None:
    """One training image of a strongly shifted style (inverted) is enough for LoRA to adapt the base.

    With the Dice term: this weak base gives under-confident masks, and with
    BCE + MSE alone 100 steps were seed-dependent (measured mIoU 0.21-0.45 for
    LoRA seeds 0/1 at lr 1e-2, 0.13 at lr 3e-3); with Dice 0.45-0.47 for both.
    """
    sam, _ = _load_tiny_base()
    test_images = [(_inverted(i), m) for i, m in (_bright_cells(seed) for seed in (3200, 3201, 3202, 3203))]
    before = _mean_miou(sam, test_images)
    train_image, train_mask = _bright_cells(3300, shape=(256, 256))
    settings = TrainSettings(
        image_size=256, tile=128, epochs=10**4, max_steps=100, batch_size=2, grad_accum=1, lr=3e-3,
        max_cells=8, max_negatives=4, dice_weight=1.0, device="cpu", resize_to=None,
    )
    started = time.perf_counter()
    result = train_adapter(sam, _inverted(train_image), train_mask, settings, progress=False)
    after = _mean_miou(result.model, test_images)
    with capsys.disabled():
        print(f"\nLoRA on one inverted image: point-prompt mIoU {before:.3f} -> {after:.3f} "
              f"({result.steps} steps, {time.perf_counter() - started:.0f} s; loss {result.losses[0]:.3f} -> "
              f"{np.mean(result.losses[-10:]):.3f})")
    assert all("lora_" in n for n, p in result.model.named_parameters() if p.requires_grad)
    assert after >= before + 0.2, (before, after)


@pytest.mark.slow
def test_training_from_scratch_learns_to_segment_cells(capsys) -> None:
    """The whole pipeline: train every weight of a random tiny SAM on one image, then segment other images.

    Input 128 (cheap) and the Dice term (a from-scratch model otherwise first
    settles on empty masks); grid inference without crops on held-out images.
    Two named alternatives to the reference's rules, which are made for a
    LoRA on a pretrained SAM: peft's input dropout (the reference's dropout
    on every projection's whole output, applied to all weights of a model
    from scratch, left the loss at 1.17 and AP at 0.0 after 250 steps) and
    the mask loss over all prompts (with background prompts out of the BCE,
    grid AP 0.13; with them 0.73: nothing else teaches a new model empty
    masks for background points).
    """
    from cellseg1d.model.metrics import average_precision
    from cellseg1d.model.data import to_uint8_rgb
    from cellseg1d.model.inference import InferenceSettings, segment_image

    size = 128
    image, mask = make_cells((2 * size, 2 * size), 60, radius=(10, 16), seed=5)
    test_images = [make_cells((size, size), 30, radius=(10, 16), seed=900 + k) for k in range(4)]
    inference = InferenceSettings(image_size=size, crop_n_layers=0, points_per_side=16)

    def grid_ap(model) -> float:
        return float(np.mean([
            average_precision(segment_image(unwrap(model), to_uint8_rgb(i), inference, "cpu"), m, 0.5)[0].ap
            for i, m in test_images
        ]))

    sam = _tiny(size, seed=0)
    before = grid_ap(sam)
    settings = TrainSettings(
        image_size=size, tile=size, epochs=10**4, max_steps=250, batch_size=4, grad_accum=1, lr=1e-3,
        train_all=True, max_cells=8, max_negatives=4, dice_weight=1.0, device="cpu", resize_to=None,
        dropout_mode="input", mask_loss_on="all",
    )
    started = time.perf_counter()
    result = train_adapter(sam, image, mask, settings, progress=False)
    after = grid_ap(result.model)
    with capsys.disabled():
        print(f"\nfrom scratch (train_all): grid AP@0.5 {before:.3f} -> {after:.3f} ({result.steps} steps, "
              f"{time.perf_counter() - started:.0f} s; loss {result.losses[0]:.3f} -> "
              f"{np.mean(result.losses[-10:]):.3f})")
    assert before <= 0.1
    assert after >= 0.4, after


def test_ctrl_c_during_an_optimiser_step_is_deferred_to_its_end() -> None:
    import signal

    from cellseg1d.model.train_state import defer_sigint

    done = []
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job
    with pytest.raises(KeyboardInterrupt):
        with defer_sigint():
            signal.raise_signal(signal.SIGINT)
            done.append("rest of the step")
    assert done == ["rest of the step"]
    assert signal.getsignal(signal.SIGINT) is before  # the previous handler is back
