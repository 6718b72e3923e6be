"""Building Segment Anything models at any input size, from specs or official checkpoints.

SAM is built from segment-anything's own modules. CellSeg1 runs SAM at input
size 512 instead of 1024: the absolute position embedding of the image
encoder and the relative-position tables of its global-attention blocks are
interpolated from the 1024 checkpoint (windowed blocks keep their tables; the
window size is unchanged), bilinearly with ``align_corners=True``, as the
CellSeg1 reference does (docs/engine.md, "Faithfulness").

When no gradient is needed, the image encoder runs two exact rewrites of
segment-anything's blocks (segment-anything's own code runs in training):

* :class:`FusedAttention`: one fused scaled-dot-product attention with the
  decomposed relative-position bias as its additive mask (equal to float
  rounding);
* :class:`FusedBlock`: a windowed block projects q/k/v and the output only
  for the real tokens, not for the zero padding that fills the grid up to
  whole windows (32 -> 42 at input 512: 72 % more rows); the padding's
  q/k/v are the projection of zero, as before, so the same values enter the
  attention.

The label images are tested equal with and without them (``set_fused_attention``).

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
from segment_anything.modeling.image_encoder import Attention, Block, get_rel_pos

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


class FusedAttention(Attention):
    """segment-anything's image-encoder ``Attention`` with a fused attention kernel at inference.

    Without gradients, ``softmax(q k^T / sqrt(d) + bias) v`` runs as
    ``torch.nn.functional.scaled_dot_product_attention`` with the decomposed
    relative-position bias (``rel_h`` + ``rel_w``, as ``add_decomposed_rel_pos``
    computes them) as the additive mask: no separately scaled query, no
    attention matrix written, scaled, biased and normalised in separate passes.
    With gradients (training) it is segment-anything's forward. The q/k/v
    projection is called as a module, so split and LoRA-wrapped projections work.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        if torch.is_grad_enabled():
            return super().forward(x)
        return self.proj(self.attend(self.qkv(x)))

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Attention of projected tokens qkv (B, H, W, 3C) -> (B, H, W, C), before the output projection."""
        batch, height, width, _ = qkv.shape
        heads = self.num_heads
        qkv = qkv.reshape(batch, height * width, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, nh, HW, d)
        bias = None
        if self.use_rel_pos:
            bias = relative_position_bias(q, self.rel_pos_h, self.rel_pos_w, (height, width))  # (B, nh, HW, HW)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)  # (B, nh, HW, d)
        return out.transpose(1, 2).reshape(batch, height, width, -1)


class FusedBlock(Block):
    """segment-anything's encoder ``Block``; without gradients a windowed block projects only real tokens.

    segment-anything pads the normalised tokens with zeros to whole windows and
    runs the q/k/v and output projections on every padded row. Here q/k/v are
    computed for the real rows, the padding rows get the projection of a zero
    row (what they had), and the output projection runs after the padding is
    cut off. Rows are independent in both projections, so this is the same function.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        if torch.is_grad_enabled() or self.window_size <= 0 or not isinstance(self.attn, FusedAttention):
            return super().forward(x)
        shortcut = x
        x = self.norm1(x)
        batch, height, width, channels = x.shape
        size = self.window_size
        qkv = self.attn.qkv(x)  # (B, H, W, 3C)
        pad_h, pad_w = (size - height % size) % size, (size - width % size) % size
        if pad_h or pad_w:
            zero = self.attn.qkv(x.new_zeros(1, channels))  # (1, 3C): a padding row's q/k/v
            padded = zero.view(1, 1, 1, -1).repeat(batch, height + pad_h, width + pad_w, 1)
            padded[:, :height, :width] = qkv
            qkv = padded
        rows, cols = (height + pad_h) // size, (width + pad_w) // size
        windows = qkv.view(batch, rows, size, cols, size, -1).permute(0, 1, 3, 2, 4, 5)
        out = self.attn.attend(windows.reshape(-1, size, size, qkv.shape[-1]))  # (B*nW, ws, ws, C)
        out = out.view(batch, rows, cols, size, size, -1).permute(0, 1, 3, 2, 4, 5)
        out = out.reshape(batch, rows * size, cols * size, -1)[:, :height, :width]
        x = shortcut + self.attn.proj(out)
        return x + self.mlp(self.norm2(x))


def relative_position_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                           size: tuple[int, int]) -> torch.Tensor:
    """The decomposed relative-position bias (B, nh, HW, HW) of queries q (B, nh, HW, d) on an H x W grid.

    The terms segment-anything's ``add_decomposed_rel_pos`` adds to the attention logits: for query (i, j)
    and key (k, l), ``q . Rh[i - k] + q . Rw[j - l]``, computed from the unscaled queries.
    """
    height, width = size
    batch, heads, _, dim = q.shape
    r_q = q.reshape(batch * heads, height, width, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(height, height, rel_pos_h))  # (B*nh, H, W, H)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(width, width, rel_pos_w))  # (B*nh, H, W, W)
    bias = rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]  # (B*nh, H, W, H, W)
    return bias.reshape(batch, heads, height * width, height * width)


def set_fused_attention(sam: Sam, enabled: bool = True) -> Sam:
    """Use :class:`FusedAttention` and :class:`FusedBlock` (or, ``enabled=False``, segment-anything's
    ``Attention`` and ``Block``) in every image-encoder block of ``sam``, in place; weights and state-dict
    keys are unchanged. Returns ``sam``."""
    for block in sam.image_encoder.blocks:
        block.attn.__class__ = FusedAttention if enabled else Attention
        block.__class__ = FusedBlock if enabled else Block
    return sam


def build_sam(spec: SamSpec | str, image_size: int = DEFAULT_IMAGE_SIZE) -> Sam:
    """A randomly initialised SAM of ``spec`` for inputs of ``image_size`` pixels, in eval mode.

    The image encoder uses :class:`FusedAttention` (``set_fused_attention(sam, False)`` turns it off).
    """
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
    set_fused_attention(sam)
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
