"""LoRA adapters on SAM, the CellSeg1 way, with the ``peft`` library.

Adapted Linears (rank 4, scale 1; A kaiming-uniform, B zero, so a new
adapter leaves the model's output unchanged):

* image encoder: the q and v parts of every block's attention projection
  (``image_encoder.blocks.N.attn.qkv.q`` / ``.v`` after :func:`split_qkv`);
  k is not adapted;
* mask decoder: ``q_proj`` and ``v_proj`` of ``self_attn``,
  ``cross_attn_token_to_image`` and ``cross_attn_image_to_token`` in every
  two-way transformer layer, and of ``final_attn_token_to_image``.

Everything else is frozen. Trainable parameters: vit_b 171,008,
vit_l 416,768, vit_h 678,912.

Dropout (rate 0.1), ``dropout_mode``:

* ``"output"`` (default, the reference): in training mode, dropout on the
  whole output of every adapted projection, base and LoRA together: the
  image encoder's fused q|k|v output (k included, though k has no adapter)
  and the decoder's ``q_proj(x) + lora(x)`` / ``v_proj(x) + lora(x)``. It is
  a forward hook (no weights, so adapter files and their keys are
  unchanged); peft's own dropout is replaced by the identity; in eval mode
  nothing changes.
* ``"input"``: peft's LoRA dropout, on the input of the low-rank branch only.

The adapter's peft config records the rate in both modes.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from segment_anything.modeling import Sam
from torch import nn

from cellseg1d.model.qkv import split_qkv

DEFAULT_RANK = 4
DEFAULT_DROPOUT = 0.1
#: Where LoRA dropout acts: "output" (whole projection output, the reference) or "input" (peft's).
DROPOUT_MODES = ("output", "input")

#: peft ``target_modules`` as a regular expression (peft full-matches it against module names).
LORA_TARGETS = (
    r"image_encoder\.blocks\.\d+\.attn\.qkv\.[qv]"
    r"|mask_decoder\.transformer\.layers\.\d+"
    r"\.(?:self_attn|cross_attn_token_to_image|cross_attn_image_to_token)\.(?:q_proj|v_proj)"
    r"|mask_decoder\.transformer\.final_attn_token_to_image\.(?:q_proj|v_proj)"
)

_TARGETS_RE = re.compile(LORA_TARGETS)


def is_lora_target(module_name: str) -> bool:
    """Whether the module called ``module_name`` (in a bare, split SAM) gets a LoRA adapter."""
    return _TARGETS_RE.fullmatch(module_name) is not None


def check_adapter_name(name: str) -> None:
    """ValueError unless ``name`` can name a peft adapter on SAM.

    Adapter names become keys of the LoRA layers' module dicts, so they may not
    contain '.', be an attribute of a torch module (e.g. 'training') or be
    part of peft's parameter prefix 'lora_' (peft would mistake them for it).
    """
    if not name or "." in name or name in "lora_" or hasattr(nn.ModuleDict(), name):
        raise ValueError(f"invalid adapter name {name!r}: use a non-empty name without '.', that is not "
                         f"part of 'lora_' or an attribute of torch modules (such as 'training')")


def lora_config(rank: int = DEFAULT_RANK, dropout: float = DEFAULT_DROPOUT) -> LoraConfig:
    """The peft configuration of a CellSeg1 adapter (scale alpha / rank = 1)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    return LoraConfig(
        r=rank,
        lora_alpha=rank,  # scale 1
        lora_dropout=dropout,
        target_modules=LORA_TARGETS,
        init_lora_weights=True,  # A kaiming-uniform, B zero
        bias="none",
    )


class OutputDropout:
    """A forward hook: dropout on a module's whole output while the module is in training mode."""

    def __init__(self, p: float) -> None:
        self.p = float(p)

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training or self.p <= 0:
            return None
        return F.dropout(output, self.p, training=True)


_HOOK_ATTR = "_cellseg1d_output_dropout"


def output_dropout_modules(sam: Sam) -> list[nn.Module]:
    """The modules whose output the reference drops out: encoder q|k|v projections, decoder q/v projections."""
    modules: list[nn.Module] = [block.attn.qkv for block in sam.image_encoder.blocks]
    for name, module in sam.named_modules():
        if name.startswith("mask_decoder.") and is_lora_target(name):
            modules.append(module)
    return modules


def set_output_dropout(sam: Sam, p: float) -> None:
    """Put (p > 0) or remove (p == 0) the reference's output dropout on ``sam``'s adapted projections."""
    for module in output_dropout_modules(sam):
        handle = getattr(module, _HOOK_ATTR, None)
        if handle is not None:
            handle.remove()
            delattr(module, _HOOK_ATTR)
        if p > 0:
            setattr(module, _HOOK_ATTR, module.register_forward_hook(OutputDropout(p)))


def _disable_peft_dropout(sam: Sam, adapter_name: str) -> None:
    for module in sam.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict) and adapter_name in dropouts:
            dropouts[adapter_name] = nn.Identity()


def apply_lora(sam: Sam, rank: int = DEFAULT_RANK, dropout: float = DEFAULT_DROPOUT,
               adapter_name: str = "default", train_all: bool = False, dropout_mode: str = "output") -> PeftModel:
    """Wrap ``sam`` (modified in place) in a peft model with one new, trainable LoRA adapter.

    The fused q/k/v projections are split first. Only the adapter's weights
    require gradients, unless ``train_all`` is set: then every base weight is
    trainable too, which is meant for small or custom bases (test models,
    full fine-tuning experiments), not for official SAM checkpoints. The
    returned model is in ``sam``'s train/eval mode (LoRA dropout included).
    ``dropout_mode`` (see the module docstring): "output" (the reference) or "input" (peft's).
    """
    check_adapter_name(adapter_name)
    if dropout_mode not in DROPOUT_MODES:
        raise ValueError(f"dropout_mode must be one of {', '.join(DROPOUT_MODES)}, got {dropout_mode!r}")
    training = sam.training
    split_qkv(sam)
    model = get_peft_model(sam, lora_config(rank, dropout), adapter_name=adapter_name)
    inner = unwrap(model)
    if dropout_mode == "output":
        _disable_peft_dropout(inner, adapter_name)
    set_output_dropout(inner, dropout if dropout_mode == "output" else 0.0)
    # peft creates the LoRA layers (and their dropout) in training mode: keep sam's mode.
    model.train(training)
    if train_all:
        for param in model.parameters():
            param.requires_grad_(True)
    return model


def unwrap(model: PeftModel | Sam) -> Sam:
    """The SAM inside ``model``, with its LoRA layers (and the active adapter) in place.

    Call its parts directly, e.g. ``unwrap(model).image_encoder(x)``; a bare
    ``Sam`` is returned as it is.
    """
    if isinstance(model, Sam):
        return model
    sam = model.base_model.model
    if not isinstance(sam, Sam):
        raise TypeError(f"expected a peft model wrapping a Sam, found {type(sam).__name__}")
    return sam


def trainable_parameters(model: nn.Module) -> int:
    """The number of parameters of ``model`` that require gradients."""
    return sum(param.numel() for param in model.parameters() if param.requires_grad)


def lora_parameter_names(model: nn.Module) -> list[str]:
    """Names of ``model``'s LoRA adapter parameters (all adapters)."""
    return [name for name, _ in model.named_parameters() if ".lora_A." in name or ".lora_B." in name]
