"""Splitting q/k/v and the CellSeg1 LoRA adapters (targets, counts, initial identity, gradients)."""

from __future__ import annotations

import copy

import pytest
import torch
from segment_anything.modeling import Sam
from torch import nn

from cellseg1d.model.lora import (
    LORA_TARGETS,
    apply_lora,
    check_adapter_name,
    is_lora_target,
    lora_parameter_names,
    trainable_parameters,
    unwrap,
)
from cellseg1d.model.qkv import SplitQKV, split_qkv
from cellseg1d.model.sam import SPECS, build_sam

SIZE = 256  # tiny models run at 256 px in these tests: 16 x 16 tokens

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def tiny_sam(seed: int = 0) -> Sam:
    torch.manual_seed(seed)
    return build_sam("tiny", SIZE)


def run_sam(sam: Sam, image: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encoder embedding (1, 256, G, G), low-res masks (N, 1, 4G, 4G) and IoU (N, 1) for N single-point prompts."""
    embedding = sam.image_encoder(image)
    labels = torch.ones(points.shape[0], 1, dtype=torch.int)
    sparse, dense = sam.prompt_encoder(points=(points[:, None, :], labels), boxes=None, masks=None)
    masks, iou = sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=False)
    return embedding, masks, iou


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(1, 3, SIZE, SIZE, generator=generator)
    points = torch.tensor([[40.0, 60.0], [128.0, 128.0], [200.0, 30.0]])
    return image, points


def randomize_lora(model: nn.Module, seed: int = 2, std: float = 0.05) -> None:
    """Give every LoRA B (and A) random values, as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


# --- targets and counts -----------------------------------------------------------------------------------------


def test_target_regex() -> None:
    assert is_lora_target("image_encoder.blocks.0.attn.qkv.q")
    assert is_lora_target("image_encoder.blocks.31.attn.qkv.v")
    assert not is_lora_target("image_encoder.blocks.0.attn.qkv.k")
    assert not is_lora_target("image_encoder.blocks.0.attn.qkv")
    assert not is_lora_target("image_encoder.blocks.0.attn.proj")
    assert not is_lora_target("image_encoder.blocks.0.attn.qkv.q.base_layer")
    for layer in (0, 1):
        for attn in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
            assert is_lora_target(f"mask_decoder.transformer.layers.{layer}.{attn}.q_proj")
            assert is_lora_target(f"mask_decoder.transformer.layers.{layer}.{attn}.v_proj")
            assert not is_lora_target(f"mask_decoder.transformer.layers.{layer}.{attn}.k_proj")
            assert not is_lora_target(f"mask_decoder.transformer.layers.{layer}.{attn}.out_proj")
    assert is_lora_target("mask_decoder.transformer.final_attn_token_to_image.q_proj")
    assert is_lora_target("mask_decoder.transformer.final_attn_token_to_image.v_proj")
    assert not is_lora_target("mask_decoder.transformer.final_attn_token_to_image.k_proj")
    assert not is_lora_target("mask_decoder.iou_prediction_head.layers.0")
    assert isinstance(LORA_TARGETS, str)


@pytest.mark.parametrize("name", ["training", "a", "lora_", "exp.1", ""])
def test_invalid_adapter_names_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid adapter name"):
        check_adapter_name(name)
    check_adapter_name("exp_1")


@pytest.mark.parametrize(("model_type", "expected"), [("vit_b", 171_008), ("vit_l", 416_768), ("vit_h", 678_912)])
def test_trainable_parameter_counts(model_type: str, expected: int) -> None:
    with torch.device("meta"):
        sam = build_sam(model_type, 512)
    model = apply_lora(sam)
    assert trainable_parameters(model) == expected
    adapted = {name.removeprefix("base_model.model.").split(".lora_")[0] for name in lora_parameter_names(model)}
    depth = SPECS[model_type].depth
    assert len(adapted) == 2 * depth + 14  # q, v per encoder block; 2 layers x 3 attentions x 2 + final x 2
    assert all(is_lora_target(name) for name in adapted)
    assert all(".lora_" in name for name, p in model.named_parameters() if p.requires_grad)


# --- split q/k/v ------------------------------------------------------------------------------------------------


def test_split_qkv_matches_fused(inputs: tuple[torch.Tensor, torch.Tensor]) -> None:
    image, _ = inputs
    sam = tiny_sam()
    fused = sam.image_encoder.blocks[0].attn.qkv
    x = torch.randn(2, 5, 192)
    split = SplitQKV.from_fused(fused)
    with torch.no_grad():
        torch.testing.assert_close(split(x), fused(x), atol=1e-5, rtol=0)
        reference = sam.image_encoder(image)
        split_qkv(sam)
        assert all(isinstance(block.attn.qkv, SplitQKV) for block in sam.image_encoder.blocks)
        result = sam.image_encoder(image)
    torch.testing.assert_close(result, reference, atol=1e-5, rtol=0)


def test_split_qkv_is_idempotent_and_loads_fused_weights() -> None:
    sam = tiny_sam()
    fused_state = copy.deepcopy(sam.state_dict())
    split_qkv(sam)
    modules = [block.attn.qkv for block in sam.image_encoder.blocks]
    split_qkv(sam)
    assert [block.attn.qkv for block in sam.image_encoder.blocks] == modules
    # a split model still accepts an original (fused) state dict
    other = split_qkv(tiny_sam(seed=5))
    other.load_state_dict(fused_state, strict=True)
    for block, weight in zip(other.image_encoder.blocks, [fused_state[f"image_encoder.blocks.{i}.attn.qkv.weight"]
                                                          for i in range(4)], strict=True):
        assert torch.equal(torch.cat([block.attn.qkv.q.weight, block.attn.qkv.k.weight, block.attn.qkv.v.weight]),
                           weight)


# --- LoRA behaviour ---------------------------------------------------------------------------------------------


def test_new_adapter_leaves_outputs_unchanged(inputs: tuple[torch.Tensor, torch.Tensor]) -> None:
    image, points = inputs
    sam = tiny_sam()
    with torch.no_grad():
        reference = run_sam(sam, image, points)
        model = apply_lora(sam)
        assert any(name.endswith("lora_B.default.weight") for name in lora_parameter_names(model))
        assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if ".lora_B." in n)
        result = run_sam(unwrap(model), image, points)
    for ref, out in zip(reference, result, strict=True):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_adapter_changes_q_and_v_but_not_k(inputs: tuple[torch.Tensor, torch.Tensor]) -> None:
    image, points = inputs
    base = split_qkv(tiny_sam())
    model = apply_lora(copy.deepcopy(base))
    randomize_lora(model)

    def capture(sam: Sam) -> dict[str, torch.Tensor]:
        outputs: dict[str, torch.Tensor] = {}
        qkv = sam.image_encoder.blocks[0].attn.qkv  # block 0: same input in both models
        handles = [getattr(qkv, part).register_forward_hook(
            lambda _m, _i, out, part=part: outputs.__setitem__(part, out.detach())) for part in "qkv"]
        with torch.no_grad():
            outputs["masks"] = run_sam(sam, image, points)[1]
        for handle in handles:
            handle.remove()
        return outputs

    before, after = capture(base), capture(unwrap(model))
    assert torch.equal(after["k"], before["k"])
    assert not torch.allclose(after["q"], before["q"], atol=1e-4)
    assert not torch.allclose(after["v"], before["v"], atol=1e-4)
    assert not torch.allclose(after["masks"], before["masks"], atol=1e-4)
    # eval mode is kept: LoRA dropout is off, so the output is deterministic
    assert not model.base_model.model.image_encoder.blocks[0].attn.qkv.q.lora_dropout["default"].training
    assert torch.equal(capture(unwrap(model))["masks"], after["masks"])


def _backward(model: nn.Module, image: torch.Tensor, points: torch.Tensor) -> None:
    _, masks, iou = run_sam(unwrap(model), image, points)
    (masks.sigmoid().mean() + iou.square().mean()).backward()


def test_only_lora_parameters_train(inputs: tuple[torch.Tensor, torch.Tensor]) -> None:
    image, points = inputs
    model = apply_lora(tiny_sam())
    model.train()
    _backward(model, image, points)
    lora = set(lora_parameter_names(model))
    assert lora
    for name, param in model.named_parameters():
        if name in lora:
            assert param.requires_grad and param.grad is not None, name
        else:
            assert not param.requires_grad and param.grad is None, name
    # B starts at zero, so B gets the gradient signal first
    assert all(torch.count_nonzero(p.grad) > 0 for n, p in model.named_parameters() if ".lora_B." in n)


def test_train_all_makes_base_weights_trainable(inputs: tuple[torch.Tensor, torch.Tensor]) -> None:
    image, points = inputs
    model = apply_lora(tiny_sam(), train_all=True)
    assert all(p.requires_grad for p in model.parameters())
    assert trainable_parameters(model) == sum(p.numel() for p in model.parameters())
    model.train()
    _backward(model, image, points)
    sam = unwrap(model)
    for part in (sam.image_encoder, sam.mask_decoder):  # every weight of these takes part in the forward pass
        for name, param in part.named_parameters():
            assert param.grad is not None, name
    assert sam.image_encoder.blocks[0].attn.qkv.k.weight.grad is not None
