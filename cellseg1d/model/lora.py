"""LoRA adapters on SAM, the CellSeg1 way, with the ``peft`` library.

Adapted Linears (rank 4, scale 1, dropout 0.1; A kaiming-uniform, B zero, so
a new adapter leaves the model's output unchanged):

* image encoder: the q and v parts of every block's attention projection
  (``image_encoder.blocks.N.attn.qkv.q`` / ``.v`` after :func:`split_qkv`);
  k is not adapted;
* mask decoder: ``q_proj`` and ``v_proj`` of ``self_attn``,
  ``cross_attn_token_to_image`` and ``cross_attn_image_to_token`` in every
  two-way transformer layer, and of ``final_attn_token_to_image``.

Everything else is frozen. Trainable parameters: vit_b 171,008,
vit_l 416,768, vit_h 678,912.
"""

from __future__ import annotations

import re

from peft import LoraConfig, PeftModel, get_peft_model
from segment_anything.modeling import Sam
from torch import nn

from cellseg1d.model.qkv import split_qkv

DEFAULT_RANK = 4
DEFAULT_DROPOUT = 0.1

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


def apply_lora(sam: Sam, rank: int = DEFAULT_RANK, dropout: float = DEFAULT_DROPOUT,
               adapter_name: str = "default", train_all: bool = False) -> PeftModel:
    """Wrap ``sam`` (modified in place) in a peft model with one new, trainable LoRA adapter.

    The fused q/k/v projections are split first. Only the adapter's weights
    require gradients, unless ``train_all`` is set: then every base weight is
    trainable too, which is meant for small or custom bases (test models,
    full fine-tuning experiments), not for official SAM checkpoints. The
    returned model is in ``sam``'s train/eval mode (LoRA dropout included).
    """
    check_adapter_name(adapter_name)
    training = sam.training
    split_qkv(sam)
    model = get_peft_model(sam, lora_config(rank, dropout), adapter_name=adapter_name)
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
