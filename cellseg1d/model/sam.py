"""Building Segment Anything models at any input size, from specs or official checkpoints.

SAM is built from segment-anything's own modules. CellSeg1 runs SAM at input
size 512 instead of 1024: the absolute position embedding of the image
encoder and the relative-position tables of its global-attention blocks are
interpolated from the 1024 checkpoint (windowed blocks keep their tables; the
window size is unchanged), bilinearly with ``align_corners=True``, as the
CellSeg1 reference does (docs/engine.md, "Faithfulness").

Shapes (input size S, patch 16, grid G = S / 16):
    image (B, 3, S, S) -> encoder tokens (B, G, G, C) -> neck (B, 256, G, G)
    pos_embed (1, G, G, C); global-attention rel_pos_h/w (2G - 1, C / heads)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

PATCH_SIZE = 16
PROMPT_EMBED_DIM = 256
CHECKPOINT_IMAGE_SIZE = 1024
DEFAULT_IMAGE_SIZE = 512


@dataclass(frozen=True)
class SamSpec:
    """The architecture of one SAM image encoder variant (the decoder is shared)."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    #: Width of the mask decoder's MLP (2048 in official SAM; smaller in test models).
    decoder_mlp_dim: int = 2048
    extra: dict[str, str] = field(default_factory=dict)


SPECS: dict[str, SamSpec] = {
    "vit_b": SamSpec("vit_b", 768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamSpec("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamSpec("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
    # Small models for tests and CPU experiments (same building blocks, fewer and narrower).
    "tiny": SamSpec("tiny", 192, 4, 4, (1, 3), window_size=8, decoder_mlp_dim=512),
}


def get_spec(model_type: str) -> SamSpec:
    """The spec of ``model_type``; ValueError listing the known types otherwise."""
    try:
        return SPECS[model_type]
    except KeyError:
        raise ValueError(f"unknown SAM model type {model_type!r}; known: {', '.join(SPECS)}") from None


def build_sam(spec: SamSpec | str, image_size: int = DEFAULT_IMAGE_SIZE) -> Sam:
    """A randomly initialised SAM of ``spec`` for inputs of ``image_size`` pixels, in eval mode."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    if image_size % PATCH_SIZE:
        raise ValueError(f"image_size must be a multiple of {PATCH_SIZE}, got {image_size}")
    grid = image_size // PATCH_SIZE
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=spec.depth,
            embed_dim=spec.embed_dim,
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=spec.num_heads,
            patch_size=PATCH_SIZE,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=spec.global_attn_indexes,
            window_size=spec.window_size,
            out_chans=PROMPT_EMBED_DIM,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=spec.decoder_mlp_dim, num_heads=8
            ),
            transformer_dim=PROMPT_EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sam.eval()
    return sam


def _resize_table(table: torch.Tensor, length: int) -> torch.Tensor:
    """Interpolate a (L, C) relative-position table to (length, C), bilinear with ``align_corners=True``.

    The table is treated as a (1, 1, L, C) image resized to (length, C), so
    the C axis is unchanged and the first and last rows are kept exactly.
    """
    if table.shape[0] == length:
        return table
    resized = F.interpolate(table[None, None].float(), size=(length, table.shape[1]), mode="bilinear",
                            align_corners=True)
    return resized[0, 0].to(table.dtype)


def resize_state_dict(
    state: dict[str, torch.Tensor], spec: SamSpec, image_size: int
) -> dict[str, torch.Tensor]:
    """Adapt a checkpoint's state dict (any input size) to a model built for ``image_size``.

    ``image_encoder.pos_embed`` (1, G0, G0, C) is resized to (1, G, G, C) and
    the ``rel_pos_h/w`` tables of global-attention blocks (2 G0 - 1, D) to
    (2 G - 1, D), all bilinearly with ``align_corners=True`` (the corner
    values are kept). Nothing is resized when the grid already fits.
    """
    grid = image_size // PATCH_SIZE
    out = dict(state)
    pos = state.get("image_encoder.pos_embed")
    if pos is None or pos.shape[1] == grid:
        return out
    resized = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=(grid, grid), mode="bilinear",
                            align_corners=True)
    out["image_encoder.pos_embed"] = resized.permute(0, 2, 3, 1).to(pos.dtype)
    for index in spec.global_attn_indexes:
        for axis in ("h", "w"):
            key = f"image_encoder.blocks.{index}.attn.rel_pos_{axis}"
            if key in state:
                out[key] = _resize_table(state[key], 2 * grid - 1)
    return out
