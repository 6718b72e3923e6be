"""The rearranged two-way transformer computes what segment-anything's does, with and without LoRA."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling.transformer import TwoWayTransformer
from torch import nn

from cellseg1d.model.fastdecode import affine_parts, two_way_transformer
from cellseg1d.model.inference import decode_masks, decode_scores
from cellseg1d.model.lora import apply_lora, unwrap
from cellseg1d.model.sam import build_sam
from tests.model.test_lora import randomize_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _reference(sam, embedding: torch.Tensor, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.ones(coords.shape[0], 1, dtype=torch.int)
    sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    masks, iou = sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=False)
    return masks, iou[:, 0]


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_transformer_matches_segment_anything(depth: int) -> None:
    torch.manual_seed(depth)
    transformer = TwoWayTransformer(depth=depth, embedding_dim=64, num_heads=4, mlp_dim=128).eval()
    image, pe = torch.randn(1, 64, 8, 8), torch.randn(1, 64, 8, 8)
    tokens = torch.randn(5, 7, 64)
    with torch.inference_mode():
        ref_queries, ref_keys = transformer(image, pe, tokens)
        queries, keys = two_way_transformer(transformer, image, pe, tokens)
        first, _ = two_way_transformer(transformer, image, pe, tokens, first_tokens=2)
    torch.testing.assert_close(queries, ref_queries, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(keys, ref_keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first, ref_queries[:, :2], atol=1e-5, rtol=1e-5)


def test_affine_parts_of_a_lora_module_reproduce_it() -> None:
    torch.manual_seed(0)
    sam = build_sam("tiny", 128)
    model = apply_lora(sam)
    randomize_lora(model)
    model.eval()
    proj = unwrap(model).mask_decoder.transformer.layers[1].cross_attn_image_to_token.q_proj
    assert type(proj) is not nn.Linear, "expected a peft LoRA wrapper"
    x = torch.randn(9, proj.in_features)
    with torch.inference_mode():
        weight, bias = affine_parts(proj, proj.in_features, x)
        base = proj.base_layer(x)
        torch.testing.assert_close(x @ weight.T + bias, proj(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(proj(x), base, atol=1e-4), "the LoRA delta should change the output"


@pytest.mark.parametrize("with_lora", [False, True])
def test_decoder_with_fast_transformer_matches_sam(with_lora: bool) -> None:
    torch.manual_seed(3)
    sam = build_sam("tiny", 128)
    if with_lora:
        model = apply_lora(sam)
        randomize_lora(model)
        sam = unwrap(model)
    sam.eval()
    with torch.inference_mode():
        embedding = sam.image_encoder(torch.randn(1, 3, 128, 128))
        coords = torch.rand(6, 1, 2) * 128
        iou, token, image_tokens = decode_scores(sam, embedding, sam.prompt_encoder.get_dense_pe(), coords)
        logits = decode_masks(sam, token, image_tokens)
        ref_logits, ref_iou = _reference(sam, embedding, coords)
    torch.testing.assert_close(iou, ref_iou, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
