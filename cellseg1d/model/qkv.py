"""Splitting the image encoder's fused q/k/v projection into three Linears.

SAM's image-encoder attention computes queries, keys and values with one
Linear of shape (dim -> 3 dim). CellSeg1 adapts only the query and value
parts, and LoRA libraries adapt whole Linears, so at load time each fused
projection is replaced by a :class:`SplitQKV` holding three (dim -> dim)
Linears whose weights are row slices of the fused one. Its output is the
concatenation ``[q(x), k(x), v(x)]``, laid out exactly like the fused
output, so the attention code that reshapes it is used unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from segment_anything.modeling import Sam
from torch import nn


class SplitQKV(nn.Module):
    """Three (dim -> dim) projections standing in for one fused (dim -> 3 dim) Linear."""

    def __init__(self, dim: int, *, bias: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = dim
        self.out_features = 3 * dim
        self.q = nn.Linear(dim, dim, bias=bias, device=device, dtype=dtype)
        self.k = nn.Linear(dim, dim, bias=bias, device=device, dtype=dtype)
        self.v = nn.Linear(dim, dim, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_fused(cls, fused: nn.Linear) -> SplitQKV:
        """A split copy of ``fused`` (weight (3 dim, dim), rows ordered q, k, v)."""
        dim = fused.in_features
        if fused.out_features != 3 * dim:
            raise ValueError(f"expected a (dim -> 3 dim) Linear, got {fused.in_features} -> {fused.out_features}")
        split = cls(dim, bias=fused.bias is not None, device=fused.weight.device, dtype=fused.weight.dtype)
        with torch.no_grad():
            for index, part in enumerate((split.q, split.k, split.v)):
                rows = slice(index * dim, (index + 1) * dim)
                part.weight.copy_(fused.weight[rows])  # (dim, dim)
                if fused.bias is not None:
                    part.bias.copy_(fused.bias[rows])  # (dim,)
                part.weight.requires_grad_(fused.weight.requires_grad)
                if part.bias is not None and fused.bias is not None:
                    part.bias.requires_grad_(fused.bias.requires_grad)
        return split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., 3 dim), the same layout as the fused projection."""
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Also accept the fused form (``<prefix>weight`` / ``<prefix>bias``) and split it on the fly."""
        dim = self.in_features
        for param in ("weight", "bias"):
            fused = state_dict.get(prefix + param)
            if fused is not None and fused.shape[0] == 3 * dim:
                state_dict.pop(prefix + param)
                for index, part in enumerate("qkv"):
                    state_dict[f"{prefix}{part}.{param}"] = fused[index * dim:(index + 1) * dim]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"dim={self.in_features}"


def split_qkv(sam: Sam) -> Sam:
    """Replace every image-encoder block's fused ``attn.qkv`` by a :class:`SplitQKV`, in place.

    Idempotent: blocks already split are left alone. Returns ``sam``.
    """
    for block in sam.image_encoder.blocks:
        attn = block.attn
        if isinstance(attn.qkv, nn.Linear):
            attn.qkv = SplitQKV.from_fused(attn.qkv)
    return sam
