"""SAM's two-way transformer for many point prompts on one image, with fewer multiply-adds.

``segment_anything``'s :class:`TwoWayTransformer` runs the image side once
per prompt: for B prompts and N = G*G image tokens of width C it projects
B x N x C tensors to keys, values and queries (C -> C/2) in every
attention. :func:`two_way_transformer` computes the same function with the
same weights, but moves each linear projection to the small side of the
attention, which is exact because a projection is affine:

* tokens -> image (T tokens attend to the N image rows): instead of
  ``k = Wk x + bk`` for every image row, each query is pulled back,
  ``q . (Wk x + bk) = (Wk^T q) . x + q . bk``; and the values are projected
  after the weighted sum, ``sum_i s_i (Wv x_i + bv) = Wv (sum_i s_i x_i) + bv``
  (the softmax weights sum to 1). Per head and token that is one C-vector,
  so the image side costs N x (H*T) x C twice instead of N x C x C/2 three
  times (plus the head reshuffling copies);
* image -> tokens (every image row attends to the T tokens): the key side is
  pulled back into the image rows' space the same way, and the output
  projection is applied to the T value vectors of each head before the
  attention-weighted sum, ``Wo (sum_t a_t v_t) = sum_t a_t (Wo_h v_t)``.

Where the image side is shared by all prompts (the first layer, before the
first image update) the original order is cheaper and is kept: the image is
projected once with batch size 1 and broadcast.

Projections are used only through their input/output behaviour, so LoRA
(peft) wrappers of ``q_proj``/``v_proj`` work unchanged: the effective
weight matrix and bias are read off by applying the module to zero and to
the identity (:func:`affine_parts`). The module must be in eval mode
(dropout off). Results equal ``segment_anything``'s to float rounding
(tested against ``sam.mask_decoder``).

The first layer's image side is the same for every batch of prompts on one
crop: :func:`shared_image` computes it once (the image + positional
encoding and its three projections) and :func:`two_way_transformer` takes
it as ``shared``; the same operations on the same tensors, so the results
are bit for bit those without it.

Shapes: image tokens (B or 1, N, C); prompt tokens (B, T, C); H heads of
width d = C_internal / H.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from segment_anything.modeling.transformer import Attention, TwoWayTransformer
from torch import nn


def affine_parts(module: nn.Module, in_features: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (D, C), b (D,)) with ``module(x) == x @ W.T + b`` for an affine module (Linear, LoRA Linear...)."""
    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
        if bias is None:
            bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        return weight, bias
    probe = torch.cat([
        torch.zeros((1, in_features), dtype=like.dtype, device=like.device),
        torch.eye(in_features, dtype=like.dtype, device=like.device),
    ])
    out = module(probe)  # (1 + C, D)
    bias = out[0]
    return (out[1:] - bias).T, bias


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, D) -> (B, T, H, d), a view."""
    return x.view(x.shape[0], x.shape[1], heads, x.shape[2] // heads)


@dataclass
class SharedImage:
    """The prompt-independent image side of the first transformer layer of one crop (see :func:`shared_image`)."""

    keys: torch.Tensor  # (1, N, C) image embedding (+ "no mask" embedding)
    key_pe: torch.Tensor  # (1, N, C) positional encoding
    keys_pe: torch.Tensor  # (1, N, C) keys + key_pe
    t2i_k: torch.Tensor  # (H, d, N) first token-to-image attention: projected keys, by head
    t2i_v: torch.Tensor  # (H, N, d) its projected values
    i2t_q: torch.Tensor  # (N, H, d) first image-to-token attention: projected queries


def shared_image(transformer: TwoWayTransformer, image: torch.Tensor, image_pe: torch.Tensor) -> SharedImage:
    """The first layer's image side for ``image`` and ``image_pe`` (1, C, G, G); reuse it for every prompt batch.

    Computed by the same calls as inside :func:`two_way_transformer`, so using it changes no bit of the result.
    """
    keys = image.flatten(2).transpose(1, 2)  # (1, N, C)
    key_pe = image_pe.flatten(2).transpose(1, 2)
    keys_pe = keys + key_pe
    layer = transformer.layers[0]
    t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    t2i_k, t2i_v = _shared_kv(t2i, keys_pe, keys)
    width = i2t.internal_dim // i2t.num_heads
    i2t_q = i2t.q_proj(keys_pe)[0].view(-1, i2t.num_heads, width)  # (N, H, d)
    return SharedImage(keys, key_pe, keys_pe, t2i_k, t2i_v, i2t_q)


def _shared_kv(attn: Attention, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected keys (H, d, N) and values (H, N, d) of image rows k, v (1, N, C)."""
    heads = attn.num_heads
    width = attn.internal_dim // heads
    kh = attn.k_proj(k[0]).view(-1, heads, width).permute(1, 2, 0)  # (H, d, N)
    vh = attn.v_proj(v[0]).view(-1, heads, width).transpose(0, 1)  # (H, N, d)
    return kh, vh


def token_to_image(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   shared_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``attn(q=q, k=k, v=v)`` for prompt tokens q (B, T, C) attending to image rows k, v (B or 1, N, C).

    ``shared_kv``: k and v (batch 1) already projected (:class:`SharedImage`).
    """
    if k.shape[0] == 1:
        return token_to_shared_image(attn, q, k, v, shared_kv)
    batch, n_tokens, channels = q.shape
    heads = attn.num_heads
    width = attn.internal_dim // heads
    wk, bk = affine_parts(attn.k_proj, channels, q)
    wv, bv = affine_parts(attn.v_proj, channels, q)
    qh = _heads(attn.q_proj(q), heads)  # (B, T, H, d)
    q_pulled = torch.einsum("bthd,hdc->bhtc", qh, wk.view(heads, width, channels)).reshape(batch, -1, channels)
    q_bias = torch.einsum("bthd,hd->bht", qh, bk.view(heads, width)).reshape(batch, 1, -1)
    # (B, N, H*T): image rows stay the leading operand, so no B x N x C tensor is transposed or copied
    logits = torch.baddbmm(q_bias, k, q_pulled.transpose(1, 2))
    weights = torch.softmax(logits.mul_(1.0 / math.sqrt(width)), dim=1)
    pooled = torch.matmul(weights.transpose(1, 2), v).view(batch, heads, n_tokens, channels)  # (B, H, T, C)
    out = torch.einsum("bhtc,hdc->bthd", pooled, wv.view(heads, width, channels)) + bv.view(heads, width)
    return attn.out_proj(out.reshape(batch, n_tokens, heads * width))


def token_to_shared_image(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          shared_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``attn(q=q, k=k, v=v)`` for prompt tokens q (B, T, C) attending to image rows k, v (1, N, C) shared by all.

    The image side is projected once (or taken from ``shared_kv``); the heads are the batch of the matrix
    products, so nothing of size B x N is expanded (as broadcasting a batch-1 operand in ``attn`` would).
    """
    batch, n_tokens, _ = q.shape
    heads = attn.num_heads
    width = attn.internal_dim // heads
    qh = attn.q_proj(q).view(batch * n_tokens, heads, width).transpose(0, 1)  # (H, B*T, d)
    kh, vh = shared_kv if shared_kv is not None else _shared_kv(attn, k, v)  # (H, d, N), (H, N, d)
    weights = torch.softmax(torch.bmm(qh, kh).mul_(1.0 / math.sqrt(width)), dim=-1)  # (H, B*T, N)
    out = torch.bmm(weights, vh).transpose(0, 1).reshape(batch, n_tokens, heads * width)
    return attn.out_proj(out)


def image_to_token(
    attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: torch.Tensor | None = None,
    shared_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """``attn(q=q, k=k, v=v)`` (+ ``residual``) for image rows q (B or 1, N, C) attending to prompt tokens
    k, v (B, T, C); ``residual`` (B or 1, N, C) is added in the same matrix product (in place when it has
    batch B and no gradient is recorded: pass a residual the caller no longer needs). ``shared_q``: q (batch 1)
    already projected, (N, H, d)."""
    batch, n_tokens, channels = k.shape
    heads = attn.num_heads
    width = attn.internal_dim // heads
    kh = _heads(attn.k_proj(k), heads)  # (B, T, H, d)
    vh = _heads(attn.v_proj(v), heads)
    scale = 1.0 / math.sqrt(width)
    if q.shape[0] == 1:
        # Shared image side: project it once, attend per prompt.
        qh = shared_q if shared_q is not None else attn.q_proj(q)[0].view(-1, heads, width)  # (N, H, d)
        logits = torch.einsum("nhd,bthd->bnht", qh, kh)  # (B, N, H, T)
    else:
        wq, bq = affine_parts(attn.q_proj, channels, k)
        k_pulled = torch.einsum("bthd,hdc->bhtc", kh, wq.view(heads, width, channels)).reshape(batch, -1, channels)
        k_bias = torch.einsum("bthd,hd->bht", kh, bq.view(heads, width)).reshape(batch, 1, -1)
        logits = (torch.matmul(q, k_pulled.transpose(1, 2)) + k_bias).view(batch, -1, heads, n_tokens)
    weights = _softmax_last(logits.mul_(scale)).flatten(2)  # (B, N, H*T)
    wo, bo = affine_parts(attn.out_proj, attn.internal_dim, k)  # (C, H*d)
    projected = torch.einsum("bthd,chd->bhtc", vh, wo.view(-1, heads, width)).reshape(batch, -1, wo.shape[0])
    # The weights of each head sum to 1, so adding bo / H to every row adds bo to the output.
    projected = projected + bo / heads
    if residual is None:
        return torch.matmul(weights, projected)
    same_dtype = residual.dtype == weights.dtype == projected.dtype  # not under autocast to another dtype
    if residual.shape[0] == batch > 1 and same_dtype and not torch.is_grad_enabled():
        # per-prompt image tokens (never the shared batch-1 image) that the caller replaces by the
        # result: accumulate into them instead of a copy
        return residual.baddbmm_(weights, projected)
    return torch.baddbmm(residual.expand(batch, -1, -1), weights, projected)  # residual + attention output


def _softmax_last(x: torch.Tensor) -> torch.Tensor:
    """Softmax over a short last axis (the T prompt tokens); faster than torch.softmax there on CPU.

    In place on the temporary after the subtraction (same arithmetic, half the memory traffic).
    """
    e = (x - x.amax(dim=-1, keepdim=True)).exp_()
    return e.div_(e.sum(dim=-1, keepdim=True))


def two_way_transformer(
    transformer: TwoWayTransformer,
    image: torch.Tensor,
    image_pe: torch.Tensor,
    tokens: torch.Tensor,
    first_tokens: int | None = None,
    shared: SharedImage | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``transformer(image, image_pe, tokens)`` for B prompts on one image.

    ``image`` and ``image_pe`` are (1, C, G, G), ``tokens`` (B, T, C). Returns
    the prompt tokens (B, T, C) and the image tokens (B, G*G, C), as the
    original does. With ``first_tokens`` = n only the first n prompt tokens
    are returned: the final attention treats every token on its own, so the
    others (e.g. the three multimask tokens, for single-mask output) are
    not computed there. ``shared`` (:func:`shared_image` of ``image`` and
    ``image_pe``) skips recomputing the first layer's image side.
    """
    if shared is None:
        keys = image.flatten(2).transpose(1, 2)  # (1, N, C)
        key_pe = image_pe.flatten(2).transpose(1, 2)
    else:
        keys, key_pe = shared.keys, shared.key_pe
    queries = tokens
    for index, layer in enumerate(transformer.layers):
        first = shared is not None and index == 0
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + tokens
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)

        keys_pe = shared.keys_pe if first else keys + key_pe
        q = queries + tokens
        attn_out = token_to_image(layer.cross_attn_token_to_image, q, keys_pe, keys,
                                  shared_kv=(shared.t2i_k, shared.t2i_v) if first else None)
        queries = layer.norm2(queries + attn_out)
        queries = layer.norm3(queries + layer.mlp(queries))

        q = queries + tokens
        keys = layer.norm4(image_to_token(layer.cross_attn_image_to_token, keys_pe, q, queries, residual=keys,
                                          shared_q=shared.i2t_q if first else None))

    if first_tokens is not None:
        queries, tokens = queries[:, :first_tokens], tokens[:, :first_tokens]
    q = queries + tokens
    keys_pe = keys + key_pe
    attn_out = token_to_image(transformer.final_attn_token_to_image, q, keys_pe, keys)
    queries = transformer.norm_final_attn(queries + attn_out)
    if keys.shape[0] != tokens.shape[0]:  # depth 0: the image was never updated per prompt
        keys = keys.expand(tokens.shape[0], -1, -1)
    return queries, keys
