"""Adapters in the file format of the CellSeg1 reference implementation (a torch ``.pth``), both ways.

The CellSeg1 reference implementation saves a trained adapter as one
``torch.save`` dict of tensors (its ``save_lora_parameters``):

========================  ==================================================================
key                       cellseg1d module (LoRA: ``y = proj(x) + B(A(x))``, scale 1)
========================  ==================================================================
``w_a_{2i:03d}``,         ``image_encoder.blocks.{i}.attn.qkv.q``: A (rank, dim), B (dim, rank);
``w_b_{2i:03d}``          added to the first third (q) of the fused qkv output
``w_a_{2i+1:03d}``,       ``image_encoder.blocks.{i}.attn.qkv.v``: added to the last third (v)
``w_b_{2i+1:03d}``
``sa_a/sa_b_{2l:03d}``    ``mask_decoder.transformer.layers.{l}.self_attn.q_proj``
``sa_a/sa_b_{2l+1:03d}``  ``... layers.{l}.self_attn.v_proj``
``cti_a/cti_b_...``       ``... layers.{l}.cross_attn_token_to_image.q_proj`` / ``v_proj`` (same numbering)
``cit_a/cit_b_...``       ``... layers.{l}.cross_attn_image_to_token.q_proj`` / ``v_proj``
``fati_qa``, ``fati_qb``  ``mask_decoder.transformer.final_attn_token_to_image.q_proj``: A, B
``fati_va``, ``fati_vb``  ``... final_attn_token_to_image.v_proj``
``prompt_encoder.*``      every prompt-encoder tensor of the SAM state dict
``mask_decoder.*``        every mask-decoder tensor outside ``transformer`` (the heads)
========================  ==================================================================

i runs over the encoder blocks in order (so there are ``2 * depth`` encoder
A and B matrices), l over the two decoder layers. The reference trains only
the LoRA matrices: the prompt encoder and the heads are frozen, so in a file
it wrote they are bit-for-bit the base checkpoint's. cellseg1d adapters hold
only LoRA weights, so :func:`read_cellseg1_pth` refuses a file whose heads
differ from the base checkpoint (another base, or parts trained unfrozen),
and :func:`write_cellseg1_pth` takes them from the base checkpoint.

The backbone is inferred from the file: encoder blocks = number of ``w_a``
keys / 2, width = the A matrices' second dimension; it must be the base
checkpoint's. The rank is the A matrices' first dimension and must be the
same everywhere (cellseg1d's adapters have one rank). Files are read with
``torch.load(weights_only=True)`` only: an adapter file is data, never code.
"""

from __future__ import annotations

import os
import pickle
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from cellseg1d.errors import CellsegError
from cellseg1d.model.adapters import AdapterMetadata, read_adapter_weights, read_metadata, write_adapter
from cellseg1d.model.checkpoint import (
    infer_model_type,
    refused_objects,
    sha256_file,
    unpickling_reason,
)
from cellseg1d.model.lora import is_lora_target
from cellseg1d.model.qkv import split_qkv
from cellseg1d.model.sam import SPECS, build_sam

FORMAT = "cellseg1"
#: Two-way transformer layers in SAM's mask decoder (every SAM variant).
DECODER_LAYERS = 2
#: The input size of the paper's published adapters (the reference's ``sam_image_size``).
REFERENCE_IMAGE_SIZE = 512
#: The reference's LoRA dropout during training (no effect at inference).
REFERENCE_DROPOUT = 0.1
PEFT_PREFIX = "base_model.model."

#: (reference prefix, decoder attention module) in the order the reference numbers and saves them.
_DECODER_ATTENTIONS = (("sa", "self_attn"), ("cti", "cross_attn_token_to_image"),
                       ("cit", "cross_attn_image_to_token"))
_SHOWN = 4


class Cellseg1FormatError(CellsegError):
    """A CellSeg1 reference adapter file cannot be read, does not fit the base model, or cannot be written."""


@dataclass(frozen=True)
class LoraPair:
    """One adapted projection: its A and B keys in the reference file, and the cellseg1d module it adapts."""

    a_key: str
    b_key: str
    module: str

    @property
    def peft_a(self) -> str:
        return f"{PEFT_PREFIX}{self.module}.lora_A.weight"

    @property
    def peft_b(self) -> str:
        return f"{PEFT_PREFIX}{self.module}.lora_B.weight"


def lora_layout(depth: int, decoder_layers: int = DECODER_LAYERS) -> list[LoraPair]:
    """Every LoRA pair of a ``depth``-block SAM, in the reference's numbering (see the module docstring)."""
    pairs = []
    for block in range(depth):
        for offset, part in enumerate("qv"):
            index = 2 * block + offset
            pairs.append(LoraPair(f"w_a_{index:03d}", f"w_b_{index:03d}",
                                  f"image_encoder.blocks.{block}.attn.qkv.{part}"))
    for prefix, attention in _DECODER_ATTENTIONS:
        for layer in range(decoder_layers):
            for offset, projection in enumerate(("q_proj", "v_proj")):
                index = 2 * layer + offset
                pairs.append(LoraPair(f"{prefix}_a_{index:03d}", f"{prefix}_b_{index:03d}",
                                      f"mask_decoder.transformer.layers.{layer}.{attention}.{projection}"))
    for part in "qv":
        pairs.append(LoraPair(f"fati_{part}a", f"fati_{part}b",
                              f"mask_decoder.transformer.final_attn_token_to_image.{part}_proj"))
    return pairs


def is_head_key(key: str) -> bool:
    """Whether the reference stores this SAM state-dict key in its adapter files (prompt encoder, decoder heads)."""
    return key.startswith("prompt_encoder.") or (key.startswith("mask_decoder.") and "transformer" not in key)


def head_keys(base_state: Mapping[str, torch.Tensor]) -> list[str]:
    """The prompt-encoder and mask-decoder head keys of a SAM state dict, in its order."""
    return [key for key in base_state if is_head_key(key)]


def reference_keys(depth: int, heads: list[str]) -> list[str]:
    """The keys of a reference adapter file for a ``depth``-block SAM with head keys ``heads``, in its order."""
    pairs = lora_layout(depth)
    keys = []
    for prefix in ("w", *(p for p, _ in _DECODER_ATTENTIONS)):
        group = [pair for pair in pairs if pair.a_key.startswith(f"{prefix}_a_")]
        keys += [pair.a_key for pair in group] + [pair.b_key for pair in group]
    keys += [key for key in heads if key.startswith("prompt_encoder.")]
    keys += [key for key in heads if key.startswith("mask_decoder.")]
    return keys + ["fati_qa", "fati_qb", "fati_va", "fati_vb"]


def _projection_sizes(model_type: str) -> dict[str, tuple[int, int]]:
    """(in, out) features of every LoRA target of a ``model_type`` SAM (built on the meta device)."""
    with torch.device("meta"):
        sam = split_qkv(build_sam(model_type, 256))
    return {name: (module.in_features, module.out_features) for name, module in sam.named_modules()
            if is_lora_target(name)}


def _layout_for(model_type: str) -> list[LoraPair]:
    pairs = lora_layout(SPECS[model_type].depth)
    targets = _projection_sizes(model_type)
    if {pair.module for pair in pairs} != set(targets):  # pragma: no cover - the layout and LORA_TARGETS agree
        raise Cellseg1FormatError("internal error: the CellSeg1 key layout does not match cellseg1d's LoRA targets")
    return pairs


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:_SHOWN]) + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def _load_pth(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a reference adapter file, read weights-only; Cellseg1FormatError otherwise."""
    if not path.is_file():
        raise Cellseg1FormatError(f"{path} does not exist or is not a file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if refused_objects(exc):
            raise Cellseg1FormatError(
                f"{path} is not a plain weights file (it holds Python objects other than tensors), so it was not "
                f"loaded: cellseg1d never executes code from adapter files. A CellSeg1 adapter saved by the "
                f"reference's save_lora_parameters holds tensors only; get the original file again") from None
        raise Cellseg1FormatError(f"{path} cannot be read (truncated, corrupted or not a PyTorch file?): "
                                  f"{unpickling_reason(exc)}; download it again") from None
    except Exception as exc:  # torch raises many kinds on truncated or foreign files
        raise Cellseg1FormatError(f"{path} cannot be read (truncated, corrupted or not a PyTorch file?): "
                                  f"{type(exc).__name__}: {exc}; download it again") from None
    if not isinstance(loaded, Mapping):
        raise Cellseg1FormatError(f"{path} is not a CellSeg1 adapter: it holds a {type(loaded).__name__}, not a "
                                  f"dict of tensors")
    bad = [repr(key) for key, value in loaded.items()
           if not isinstance(key, str) or not isinstance(value, torch.Tensor)]
    if bad:
        raise Cellseg1FormatError(f"{path} is not a CellSeg1 adapter: entries {_listed(bad)} are not tensors")
    return {key: value.detach() for key, value in loaded.items()}


@dataclass(frozen=True)
class Cellseg1Adapter:
    """A reference adapter file converted to cellseg1d's LoRA weights."""

    #: LoRA tensors under peft state-dict keys (what ``adapter.safetensors`` holds), float32.
    tensors: dict[str, torch.Tensor]
    rank: int
    #: The backbone, inferred from the file (and equal to the base checkpoint's).
    model_type: str
    #: SHA-256 of the source file.
    sha256: str


def read_cellseg1_pth(path: str | os.PathLike[str], base_state: Mapping[str, torch.Tensor], *,
                      base_name: str = "the base checkpoint") -> Cellseg1Adapter:
    """Read and check a CellSeg1 reference adapter file against the SAM state dict it was trained on.

    Refused (:class:`Cellseg1FormatError`, naming the file and what to do):
    unreadable or non-tensor content, a backbone other than the base's,
    missing or extra keys, wrong shapes, ranks that differ between layers,
    non-finite values, and prompt-encoder or head tensors that are not
    exactly (bit for bit, as float32) the base checkpoint's. ``base_name``
    names the base checkpoint in messages.
    """
    path = Path(path).expanduser()
    state = _load_pth(path)
    base_type = infer_model_type(base_state, base_name)
    base_spec = SPECS[base_type]

    # the backbone the file was trained on: 2 encoder A matrices (q, v) per block, width = A's columns
    encoder = [key for key in state if re.fullmatch(r"w_a_\d{3}", key)]
    if not encoder:
        raise Cellseg1FormatError(
            f"{path} is not a CellSeg1 adapter: it has no image-encoder LoRA weights (w_a_000, w_b_000, ...); "
            f"its keys start {_listed(sorted(state))}. Import files written by the CellSeg1 reference "
            f"implementation (save_lora_parameters)")
    if len(encoder) % 2:
        raise Cellseg1FormatError(
            f"{path} has {len(encoder)} image-encoder A matrices (w_a_...), an odd number: CellSeg1 adapts q and "
            f"v of every block, two per block. The file is truncated or was not written by CellSeg1; get it again")
    blocks = len(encoder) // 2
    first = state.get("w_a_000")
    width = int(first.shape[1]) if first is not None and first.dim() == 2 else None
    file_type = next((name for name, spec in SPECS.items() if (spec.embed_dim, spec.depth) == (width, blocks)), None)
    if file_type != base_type:
        what = f"a {file_type} adapter" if file_type else "an adapter for an unknown backbone"
        raise Cellseg1FormatError(
            f"{path} is {what} ({blocks} encoder blocks, width {width}) but {base_name} is a {base_type} SAM "
            f"({base_spec.depth} blocks, width {base_spec.embed_dim}). Import it with the SAM checkpoint it was "
            f"trained on (the paper's published adapters: the official vit_h checkpoint sam_vit_h_4b8939.pth, "
            f"'cellseg1d models fetch vit_h')")

    pairs = _layout_for(base_type)
    heads = head_keys(base_state)
    expected = reference_keys(base_spec.depth, heads)
    missing = [key for key in expected if key not in state]
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        parts = [f"{len(keys)} {label} ({_listed(keys)})" for label, keys in (("missing", missing),
                                                                            ("unexpected", extra)) if keys]
        raise Cellseg1FormatError(
            f"{path} does not have the keys of a CellSeg1 {base_type} adapter: {'; '.join(parts)}. The file is "
            f"truncated, was written by other code, or was trained with LoRA on other layers (CellSeg1 adapts q "
            f"and v of every encoder block and decoder attention); get the original file again")

    # one rank everywhere: A is (rank, in), B is (out, rank)
    ranks: dict[int, str] = {}
    for pair in pairs:
        for key, axis in ((pair.a_key, 0), (pair.b_key, 1)):
            tensor = state[key]
            if tensor.dim() == 2:
                ranks.setdefault(int(tensor.shape[axis]), key)
    if len(ranks) > 1:
        found = ", ".join(f"{key} has rank {rank}" for rank, key in sorted(ranks.items()))
        raise Cellseg1FormatError(
            f"{path} has LoRA matrices of different ranks ({found}); cellseg1d adapters have one rank for every "
            f"layer (train it in the reference with image_encoder_lora_rank = mask_decoder_lora_rank)")
    rank = next(iter(ranks), 0)
    sizes = _projection_sizes(base_type)
    shapes = {}
    for pair in pairs:
        fan_in, fan_out = sizes[pair.module]
        shapes[pair.a_key], shapes[pair.b_key] = (rank, fan_in), (fan_out, rank)
    shapes.update({key: tuple(base_state[key].shape) for key in heads})
    wrong = [f"{key} {tuple(state[key].shape)} (expected {shapes[key]})" for key in expected
             if tuple(state[key].shape) != shapes[key]]
    if rank < 1 or wrong:
        raise Cellseg1FormatError(
            f"{path} has tensors of the wrong shape for a rank-{rank} {base_type} adapter: {_listed(wrong)}. The "
            f"file is damaged or was not written by CellSeg1; get the original file again")
    not_float = [key for key in expected if not state[key].is_floating_point()]
    if not_float:
        raise Cellseg1FormatError(f"{path}: tensors {_listed(not_float)} are not floating point; the file is damaged")
    not_finite = [pair.a_key for pair in pairs if not torch.isfinite(state[pair.a_key]).all()]
    not_finite += [pair.b_key for pair in pairs if not torch.isfinite(state[pair.b_key]).all()]
    if not_finite:
        raise Cellseg1FormatError(f"{path}: LoRA tensors {_listed(not_finite)} hold NaN or infinite values (a "
                                  f"diverged training run); retrain the adapter")

    # the frozen parts must be the base checkpoint's, exactly
    differ = []
    for key in heads:
        ours, theirs = state[key].float(), base_state[key].float()
        if not torch.equal(ours, theirs):
            gap = (ours - theirs).abs().max().item()
            differ.append(f"{key} (max |difference| {gap:.3g})")
    if differ:
        raise Cellseg1FormatError(
            f"{path}: its prompt-encoder / mask-decoder head tensors differ from {base_name}'s: {_listed(differ)} "
            f"({len(differ)} of {len(heads)} compared exactly, as float32). CellSeg1 keeps these parts frozen, so "
            f"they equal the checkpoint the adapter was trained on: import it with that checkpoint (the paper's "
            f"published adapters: the official vit_h one, sam_vit_h_4b8939.pth). A file trained with these parts "
            f"unfrozen cannot be imported: cellseg1d adapters hold LoRA weights only")

    tensors: dict[str, torch.Tensor] = {}
    for pair in pairs:
        tensors[pair.peft_a] = state[pair.a_key].float().contiguous().clone()
        tensors[pair.peft_b] = state[pair.b_key].float().contiguous().clone()
    return Cellseg1Adapter(tensors=tensors, rank=rank, model_type=base_type, sha256=sha256_file(path))


def to_reference_dict(tensors: Mapping[str, torch.Tensor], base_state: Mapping[str, torch.Tensor], *,
                      source: str = "the adapter", base_name: str = "the base checkpoint") -> dict[str, torch.Tensor]:
    """The reference file's dict for LoRA ``tensors`` (peft keys) on the SAM of ``base_state``, in its key order.

    Every tensor is a float32, contiguous CPU copy; the prompt encoder and the
    mask-decoder heads are the base checkpoint's.
    """
    model_type = infer_model_type(base_state, base_name)
    pairs = _layout_for(model_type)
    wanted = {key for pair in pairs for key in (pair.peft_a, pair.peft_b)}
    missing = sorted(wanted - set(tensors))
    extra = sorted(set(tensors) - wanted)
    if missing or extra:
        raise Cellseg1FormatError(
            f"{source} does not fit a {model_type} SAM ({base_name}): {len(missing)} LoRA weight(s) missing "
            f"({_listed(missing)}), {len(extra)} unexpected ({_listed(extra)})")
    by_key: dict[str, torch.Tensor] = {}
    for pair in pairs:
        by_key[pair.a_key], by_key[pair.b_key] = tensors[pair.peft_a], tensors[pair.peft_b]
    by_key.update({key: base_state[key] for key in head_keys(base_state)})
    keys = reference_keys(SPECS[model_type].depth, head_keys(base_state))
    return {key: by_key[key].detach().to("cpu", torch.float32).contiguous().clone() for key in keys}


def write_cellseg1_pth(tensors: Mapping[str, torch.Tensor], base_state: Mapping[str, torch.Tensor],
                       path: str | os.PathLike[str], *, source: str = "the adapter",
                       base_name: str = "the base checkpoint") -> Path:
    """Write LoRA ``tensors`` (peft keys) as a file the reference's ``load_lora_parameters`` reads; its path.

    The file holds exactly the keys the reference's ``save_lora_parameters``
    writes for the base's backbone (see the module docstring), float32. It is
    written to a temporary file in the same folder, flushed to disk and then
    renamed over ``path``, so a reader never sees a partial file.
    """
    path = Path(path).expanduser()
    if path.suffix not in (".pth", ".pt"):
        raise Cellseg1FormatError(f"{path}: the file name must end with .pth or .pt (the reference's "
                                  f"load_lora_parameters refuses other names)")
    data = to_reference_dict(tensors, base_state, source=source, base_name=base_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with temporary.open("wb") as handle:
            torch.save(data, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def default_adapter_name(path: str | os.PathLike[str]) -> str:
    """A registry name from a file name: ``cellpose_specialized_12.pth`` -> ``cellpose_specialized_12``.

    Characters other than letters, digits, ``_`` and ``-`` become ``-``; the
    name starts with a letter or digit and has at most 64 characters.
    """
    stem = Path(path).name
    for suffix in (".pth", ".pt"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", stem).lstrip("_-")[:64].rstrip("-")
    return name or "cellseg1-adapter"


def import_cellseg1_adapter(path: str | os.PathLike[str], base_state: Mapping[str, torch.Tensor], base_sha256: str,
                            directory: str | os.PathLike[str], name: str, *,
                            image_size: int = REFERENCE_IMAGE_SIZE,
                            base_name: str = "the base checkpoint") -> AdapterMetadata:
    """Convert the reference adapter file ``path`` into a cellseg1d adapter directory; its metadata.

    ``base_state`` / ``base_sha256`` are the SAM checkpoint it was trained on
    (recorded as the adapter's base). The metadata notes the source file and
    its SHA-256 (``settings.imported_from``).
    """
    path = Path(path).expanduser()
    adapter = read_cellseg1_pth(path, base_state, base_name=base_name)
    metadata = AdapterMetadata(
        name=name, base_model_type=adapter.model_type, base_checkpoint_sha256=base_sha256, rank=adapter.rank,
        dropout=REFERENCE_DROPOUT, image_size=image_size,
        settings={"imported_from": {"format": FORMAT, "file": str(path.resolve()), "sha256": adapter.sha256,
                                    "encoder_blocks": SPECS[adapter.model_type].depth}},
    )
    write_adapter(adapter.tensors, directory, metadata, overwrite=False)
    return read_metadata(directory)


def export_cellseg1_adapter(directory: str | os.PathLike[str], base_state: Mapping[str, torch.Tensor],
                            base_sha256: str, out: str | os.PathLike[str], *,
                            base_name: str = "the base checkpoint") -> tuple[AdapterMetadata, Path]:
    """Write the cellseg1d adapter in ``directory`` as a reference adapter file ``out``; (metadata, path).

    ``base_state`` must be the checkpoint the adapter was trained on (its
    SHA-256 ``base_sha256`` is compared with the adapter's metadata): the file
    carries that checkpoint's prompt encoder and mask-decoder heads.
    """
    directory = Path(directory)
    metadata, tensors = read_adapter_weights(directory)
    if metadata.base_checkpoint_sha256 != base_sha256:
        raise Cellseg1FormatError(
            f"adapter {metadata.name} ({directory}) was trained on base checkpoint sha256 "
            f"{metadata.base_checkpoint_sha256}, but {base_name} has sha256 {base_sha256}: the exported file "
            f"carries the base's prompt encoder and mask-decoder heads, so give the checkpoint it was trained on")
    path = write_cellseg1_pth(tensors, base_state, out, source=f"adapter {metadata.name} ({directory})",
                              base_name=base_name)
    return metadata, path
