"""The exact speed rewrites give the same label images as the code they replace.

Each rewrite has a switch back to the original computation (segment-anything's
encoder blocks, one transformer pass per prompt batch, the first layer's image
side recomputed per batch); on the tiny SAM pretrained on synthetic cells, at
the paper's profile (32 x 32 points, crop layer 1), the labels must be equal
pixel for pixel. Devices: the CPU always, CUDA when present (``cuda`` marker).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything.modeling.image_encoder import Attention, Block

from cellseg1d.model import fastdecode
from cellseg1d.model.inference import InferenceReport, InferenceSettings, decode_scores, decoder_image, segment_image
from cellseg1d.model.sam import SPECS, FusedAttention, FusedBlock, build_sam, resize_state_dict, set_fused_attention
from cellseg1d.testing.synthetic import make_cells
from tests.helpers import TINY_BASE
from tests.model.devices import DEVICES


def _tiny_base(image_size: int) -> torch.nn.Module:
    if not TINY_BASE.is_file():
        pytest.skip(f"{TINY_BASE} not present")
    from safetensors.torch import load_file

    state = {k: v.float() for k, v in load_file(str(TINY_BASE)).items()}
    sam = build_sam("tiny", image_size=image_size)
    sam.load_state_dict(resize_state_dict(state, SPECS["tiny"], image_size))
    return sam.eval()


def _cells(side: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    image, truth = make_cells((side, side), n, radius=(8, 14), seed=seed)
    gray = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2), truth


@pytest.fixture(scope="module")
def base256():
    return _tiny_base(256)


def test_build_sam_uses_the_fused_modules_and_the_switch_restores_segment_anythings():
    sam = build_sam("tiny", 128)
    assert all(type(b) is FusedBlock and type(b.attn) is FusedAttention for b in sam.image_encoder.blocks)
    set_fused_attention(sam, False)
    assert all(type(b) is Block and type(b.attn) is Attention for b in sam.image_encoder.blocks)
    assert set(sam.state_dict()) == set(build_sam("tiny", 128).state_dict())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("image_size", [256, 320])  # 320: grid 20, windows of 8 -> the padding path
def test_fused_encoder_equals_segment_anythings_blocks(device, image_size):
    sam = _tiny_base(image_size).to(device)
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1)).to(device) * 50
    with torch.inference_mode():
        fused = sam.image_encoder(x)
        set_fused_attention(sam, False)
        plain = sam.image_encoder(x)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    # in training the original code runs (gradients flow through segment-anything's modules)
    set_fused_attention(sam, True)
    sam.image_encoder(x[:1]).sum().backward()
    assert sam.image_encoder.blocks[0].attn.rel_pos_h.grad is not None


@pytest.mark.parametrize("device", DEVICES)
def test_shared_image_side_and_sub_batches_are_bitwise_equal(device, base256):
    sam = base256.to(device)
    with torch.inference_mode():
        embedding = sam.image_encoder(torch.rand(1, 3, 256, 256, device=device) * 255)
        pe = sam.prompt_encoder.get_dense_pe()
        coords = torch.rand(24, 1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(device) * 256
        iou, token, tokens = decode_scores(sam, embedding, pe, coords)
        shared = decoder_image(sam, embedding, pe)
        iou_s, token_s, tokens_s = decode_scores(sam, embedding, pe, coords, shared=shared)
        assert torch.equal(iou, iou_s) and torch.equal(token, token_s) and torch.equal(tokens, tokens_s)
        parts = [decode_scores(sam, embedding, pe, coords[i : i + 8], shared=shared)[0] for i in range(0, 24, 8)]
    torch.testing.assert_close(torch.cat(parts), iou, rtol=1e-5, atol=1e-6)
    sam.cpu()


@pytest.mark.parametrize("device", DEVICES)
def test_paper_profile_labels_are_equal_with_and_without_every_rewrite(device, base256):
    """Paper profile (32 x 32, crop layer 1) on the pretrained tiny base: identical label images."""
    sam = base256.to(device)
    rgb, truth = _cells(160, 50, seed=5100)
    fast = InferenceReport()
    labels = segment_image(sam, rgb, InferenceSettings(image_size=256), report=fast)
    assert fast.counts["prompts"] == 5 * 32 * 32 and labels.max() >= 10
    set_fused_attention(sam, False)
    original_shared = fastdecode.shared_image
    try:
        # one transformer pass per 64 prompts, and the first layer's image side recomputed every pass
        fastdecode_calls = []

        def no_sharing(*args, **kwargs):
            fastdecode_calls.append(1)
            return None

        import cellseg1d.model.inference as inference

        inference.shared_image = no_sharing
        plain = segment_image(sam, rgb, InferenceSettings(image_size=256, decode_batch=64))
    finally:
        inference.shared_image = original_shared
        set_fused_attention(sam, True)
        sam.cpu()
    assert fastdecode_calls  # the switch was used
    assert np.array_equal(labels, plain)


@pytest.mark.parametrize("decode_batch", [1, 5, 64])
def test_decode_batch_does_not_change_the_labels(decode_batch, base256):
    rgb, _ = _cells(128, 40, seed=5200)
    settings = InferenceSettings(image_size=256, points_per_side=12)
    expected = segment_image(base256, rgb, settings)
    got = segment_image(base256, rgb, InferenceSettings(image_size=256, points_per_side=12, decode_batch=decode_batch))
    assert np.array_equal(got, expected)


def test_windowed_padding_path_keeps_the_labels():
    """A base at input 320 pads its 20 x 20 grid to windows of 8: fused and plain blocks give the same labels."""
    sam = _tiny_base(320)
    rgb, _ = _cells(200, 60, seed=5300)
    settings = InferenceSettings(image_size=320, points_per_side=16)
    fused = segment_image(sam, rgb, settings)
    set_fused_attention(sam, False)
    assert np.array_equal(fused, segment_image(sam, rgb, settings))
