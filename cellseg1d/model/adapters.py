"""Adapter files: saving, verifying and loading LoRA adapters, and switching between them.

An adapter is a directory holding

* ``adapter.safetensors``: the LoRA weights of one adapter (keys as returned
  by peft's ``get_peft_model_state_dict``, without the adapter name);
* ``adapter.json``: :class:`AdapterMetadata`, including the SHA-256 of the
  weights file and of the base checkpoint it was trained on.

Weights are read with safetensors only (never pickle). Loading checks the
weights' hash and that the adapter was trained on this base (model type, and
checkpoint hash when the caller knows it). Several adapters can live in one
model at once (peft multi-adapter); :class:`AdapterCache` keeps the most
recently used ones loaded, so switching experiment costs no model reload.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from segment_anything.modeling import Sam

from cellseg1d import __version__
from cellseg1d.errors import CellsegError
from cellseg1d.model.checkpoint import sha256_file
from cellseg1d.model.lora import check_adapter_name, is_lora_target, lora_config, unwrap
from cellseg1d.model.qkv import split_qkv
from cellseg1d.model.sam import SPECS

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "adapter.safetensors"
METADATA_FILE = "adapter.json"
_PEFT_PREFIX = "base_model.model."


class AdapterError(CellsegError):
    """An adapter directory is missing, invalid, corrupted or does not fit the base model."""


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class AdapterMetadata:
    """What an adapter is, what it was trained on and how (``adapter.json``)."""

    name: str
    base_model_type: str
    base_checkpoint_sha256: str
    rank: int = 4
    dropout: float = 0.1
    image_size: int = 512
    #: Identifies the training image (e.g. a hash of its pixels and mask); None if unknown.
    training_image_fingerprint: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    #: ISO 8601 UTC time of creation.
    created: str = field(default_factory=_utc_now)
    cellseg1d_version: str = __version__
    format_version: int = FORMAT_VERSION
    #: SHA-256 of ``adapter.safetensors``; filled in by :func:`save_adapter`.
    weights_sha256: str = ""

    def to_json(self) -> str:
        """The metadata as a JSON document."""
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter metadata") -> AdapterMetadata:
        """Validate and convert a parsed ``adapter.json``; unknown keys are ignored."""
        if not isinstance(data, dict):
            raise AdapterError(f"{source}: expected a JSON object")
        version = data.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise AdapterError(f"{source}: adapter format version {version!r} is newer than this cellseg1d "
                               f"({__version__}) supports ({FORMAT_VERSION}); upgrade cellseg1d")
        known = {f.name for f in fields(cls)}
        required = ["name", "base_model_type", "base_checkpoint_sha256", "weights_sha256"]
        missing = [key for key in required if key not in data]
        if missing:
            raise AdapterError(f"{source}: missing field(s) {', '.join(missing)}")
        values = {key: value for key, value in data.items() if key in known}
        checks: dict[str, tuple[type, ...]] = {
            "name": (str,), "base_model_type": (str,), "base_checkpoint_sha256": (str,), "weights_sha256": (str,),
            "rank": (int,), "dropout": (int, float), "image_size": (int,), "settings": (dict,),
            "metrics": (dict,), "created": (str,), "cellseg1d_version": (str,),
            "training_image_fingerprint": (str, type(None)),
        }
        for key, types in checks.items():
            if key in values and (not isinstance(values[key], types) or isinstance(values[key], bool)):
                raise AdapterError(f"{source}: field {key!r} has an invalid value {values[key]!r}")
        return cls(**values)


def infer_model_type(sam: Sam) -> str | None:
    """The SPECS name whose encoder width, depth and heads match ``sam``; None if none does."""
    encoder = sam.image_encoder
    embed_dim = encoder.patch_embed.proj.out_channels
    depth = len(encoder.blocks)
    heads = encoder.blocks[0].attn.num_heads if depth else 0
    for name, spec in SPECS.items():
        if (spec.embed_dim, spec.depth, spec.num_heads) == (embed_dim, depth, heads):
            return name
    return None


def _check_name(adapter_name: str) -> None:
    try:
        check_adapter_name(adapter_name)
    except ValueError as exc:
        raise AdapterError(f"{exc}; pass another adapter_name") from None


def save_adapter(model: PeftModel, directory: str | os.PathLike[str], metadata: AdapterMetadata,
                 adapter_name: str = "default", *, overwrite: bool = True) -> Path:
    """Write ``adapter_name``'s LoRA weights and ``metadata`` to ``directory``; the directory.

    Rank, dropout and image size are taken from the model (they are what the
    weights mean); the weights' SHA-256 is recorded. Files are written to a
    temporary sibling directory that then replaces ``directory`` (an existing
    adapter there is replaced unless ``overwrite`` is False). Only LoRA weights
    are saved: base weights trained with ``train_all`` are not.
    """
    directory = Path(directory)
    if adapter_name not in model.peft_config:
        raise AdapterError(f"model has no adapter {adapter_name!r} (it has: {', '.join(model.peft_config)})")
    if directory.exists() and not overwrite:
        raise AdapterError(f"adapter directory {directory} already exists")
    config = model.peft_config[adapter_name]
    sam = unwrap(model)
    model_type = infer_model_type(sam)
    if model_type is not None and model_type != metadata.base_model_type:
        raise AdapterError(f"metadata says base model type {metadata.base_model_type!r} but the model is a "
                           f"{model_type}")
    if any(param.requires_grad and ".lora_" not in name for name, param in model.named_parameters()):
        log.warning("base weights of the model are trainable (train_all) but an adapter file holds only the "
                    "LoRA weights of %r: changes to base weights are not saved in %s", adapter_name, directory)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
    if not tensors:
        raise AdapterError(f"adapter {adapter_name!r} has no weights to save")
    final = replace(metadata, rank=int(config.r), dropout=float(config.lora_dropout),
                    image_size=int(sam.image_encoder.img_size))
    return write_adapter(tensors, directory, final, overwrite=overwrite)


def write_adapter(tensors: dict[str, torch.Tensor], directory: str | os.PathLike[str], metadata: AdapterMetadata,
                  *, overwrite: bool = True) -> Path:
    """Write LoRA ``tensors`` (peft state-dict keys) and ``metadata`` as an adapter directory; the directory.

    The weights' SHA-256 is recorded in the metadata. Files are written to a
    temporary sibling directory that then replaces ``directory`` (an existing
    adapter there is replaced unless ``overwrite`` is False). The caller
    vouches that rank and image size in ``metadata`` describe the tensors.
    """
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise AdapterError(f"adapter directory {directory} already exists")
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    try:
        weights = temporary / WEIGHTS_FILE
        save_file(tensors, str(weights), metadata={"format": "pt"})
        final = replace(metadata, format_version=FORMAT_VERSION, weights_sha256=sha256_file(weights))
        with (temporary / METADATA_FILE).open("w", encoding="utf-8") as handle:
            handle.write(final.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
            directory.rename(old)
            temporary.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            temporary.rename(directory)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return directory


def read_metadata(directory: str | os.PathLike[str]) -> AdapterMetadata:
    """The metadata of the adapter in ``directory``."""
    directory = Path(directory)
    path = directory / METADATA_FILE
    if not directory.is_dir():
        raise AdapterError(f"adapter directory not found: {directory}")
    if not path.is_file():
        raise AdapterError(f"{directory} is not an adapter directory: {METADATA_FILE} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path} is not valid JSON: {exc}") from None
    return AdapterMetadata.from_dict(data, source=str(path))


def _expected_shapes(sam: Sam, rank: int) -> dict[str, tuple[int, ...]]:
    """The saved-key -> shape map of a rank-``rank`` adapter on ``sam`` (q/k/v already split)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, module in sam.named_modules():
        if is_lora_target(name):
            shapes[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = (rank, module.in_features)
            shapes[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = (module.out_features, rank)
    return shapes


def _read_weights(directory: Path, metadata: AdapterMetadata, sam: Sam) -> dict[str, torch.Tensor]:
    """The adapter's tensors, after checking their hash, keys and shapes against ``sam``."""
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise AdapterError(f"adapter {directory}: {WEIGHTS_FILE} is missing")
    data = path.read_bytes()  # a few MB: hashed and parsed from the same bytes
    actual = hashlib.sha256(data).hexdigest()
    if actual != metadata.weights_sha256:
        raise AdapterError(f"adapter {directory}: {WEIGHTS_FILE} is corrupted or was modified (sha256 expected "
                           f"{metadata.weights_sha256}, actual {actual}); retrain or restore the adapter")
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError) as exc:
        raise AdapterError(f"adapter {directory}: {WEIGHTS_FILE} cannot be read: {exc}") from None
    expected = _expected_shapes(sam, metadata.rank)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(key for key in expected if key in tensors and tuple(tensors[key].shape) != expected[key])
    if missing or unexpected or wrong:
        details = "; ".join(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                            for label, keys in (("missing", missing), ("unexpected", unexpected),
                                                ("wrong shape", wrong)) if keys)
        raise AdapterError(f"adapter {directory} does not fit this base model ({details})")
    return tensors


def read_adapter_weights(directory: str | os.PathLike[str]) -> tuple[AdapterMetadata, dict[str, torch.Tensor]]:
    """The metadata and LoRA tensors (peft keys) of the adapter in ``directory``, without a base model.

    The weights' hash, keys and shapes are checked against an architecture of
    the metadata's base model type (built on the meta device: no memory).
    """
    from cellseg1d.model.sam import build_sam

    directory = Path(directory)
    metadata = read_metadata(directory)
    spec = SPECS.get(metadata.base_model_type)
    if spec is None:
        raise AdapterError(f"adapter {directory}: unknown base model type {metadata.base_model_type!r} "
                           f"(known: {', '.join(SPECS)})")
    with torch.device("meta"):
        sam = split_qkv(build_sam(spec, metadata.image_size))
    return metadata, _read_weights(directory, metadata, sam)


def load_adapter(model: PeftModel | Sam, directory: str | os.PathLike[str], adapter_name: str | None = None,
                 *, expect_base_sha256: str | None = None, activate: bool = True,
                 trainable: bool = False) -> PeftModel:
    """Load the adapter in ``directory`` into ``model`` as ``adapter_name`` (default: its metadata name).

    ``model`` may be a bare Sam (it is split and wrapped; the peft model is
    returned) or a peft model that already holds other adapters. The
    weights' hash, the base model type and, when ``expect_base_sha256`` is
    given, the base checkpoint's hash are checked first; on a mismatch no
    adapter is added (q/k/v may have been split, which changes no output). The adapter is made active when ``activate`` is set, and
    its weights are frozen unless ``trainable`` is.
    """
    directory = Path(directory)
    metadata = read_metadata(directory)
    name = adapter_name or metadata.name
    _check_name(name)
    if isinstance(model, PeftModel) and name in model.peft_config:
        raise AdapterError(f"the model already holds an adapter named {name!r}; choose another name or delete it")
    sam = unwrap(model)
    tensors = _checked_weights(sam, directory, metadata, expect_base_sha256)

    training = sam.training
    config = lora_config(metadata.rank, metadata.dropout)
    if isinstance(model, PeftModel):
        model.add_adapter(name, config, low_cpu_mem_usage=True)
    else:
        model = get_peft_model(sam, config, adapter_name=name, low_cpu_mem_usage=True)
    result = set_peft_model_state_dict(model, tensors, adapter_name=name, low_cpu_mem_usage=True)
    if result.unexpected_keys:  # pragma: no cover - keys were checked above
        raise AdapterError(f"adapter {directory}: unexpected keys {result.unexpected_keys[:3]}")
    model.train(training)  # new LoRA layers start in training mode
    for param_name, param in model.named_parameters():
        if f".{name}." in param_name and (".lora_A." in param_name or ".lora_B." in param_name):
            param.requires_grad_(trainable)
    if activate:
        model.set_adapter(name, inference_mode=not trainable)
    return model


def _checked_weights(sam: Sam, directory: Path, metadata: AdapterMetadata,
                     expect_base_sha256: str | None) -> dict[str, torch.Tensor]:
    """The adapter's weights after checking its base model, checkpoint and file hash against ``sam``."""
    model_type = infer_model_type(sam)
    if model_type is not None and model_type != metadata.base_model_type:
        raise AdapterError(f"adapter {directory} was trained on a {metadata.base_model_type} SAM but the loaded "
                           f"base model is a {model_type}")
    if expect_base_sha256 is not None and expect_base_sha256 != metadata.base_checkpoint_sha256:
        raise AdapterError(f"adapter {directory} was trained on base checkpoint sha256 "
                           f"{metadata.base_checkpoint_sha256}, but the loaded base checkpoint is "
                           f"{expect_base_sha256}")
    image_size = int(sam.image_encoder.img_size)
    if metadata.image_size != image_size:
        log.warning("adapter %s was trained at input size %d, the model runs at %d", directory,
                    metadata.image_size, image_size)
    split_qkv(sam)
    return _read_weights(directory, metadata, sam)


class AdapterCache:
    """Keeps up to ``capacity`` adapters loaded on one base model, least recently used evicted first.

    ``activate(directory)`` loads the adapter if needed (an adapter whose
    files changed since it was loaded is reloaded) and makes it the active
    one; adapters already in the model under a name (e.g. one being
    trained) can be activated by that name and are never evicted. Use
    :meth:`use` to hold the cache's lock while running the model, when
    several threads share it.
    """

    def __init__(self, model: PeftModel | Sam, capacity: int = 8, *,
                 expect_base_sha256: str | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._model: PeftModel | Sam = model
        self.capacity = capacity
        self.expect_base_sha256 = expect_base_sha256
        #: resolved directory -> (peft adapter name, weights sha256), least recently used first.
        self._entries: OrderedDict[Path, tuple[str, str]] = OrderedDict()
        self._counter = 0
        self._lock = threading.RLock()
        self.loads = 0
        self.hits = 0
        self.evictions = 0
        #: Seconds the last activate() took (including any load).
        self.last_switch_s = 0.0
        self.active: str | None = None

    @property
    def model(self) -> PeftModel | Sam:
        """The model (a peft model once the first adapter is loaded)."""
        return self._model

    def loaded(self) -> list[Path]:
        """Directories of the cached adapters, least recently used first."""
        return list(self._entries)

    def activate(self, adapter: str | os.PathLike[str]) -> str:
        """Make ``adapter`` (a directory, or the name of an adapter already in the model) active; its name."""
        start = time.perf_counter()
        with self._lock:
            model = self._model
            if isinstance(adapter, str) and isinstance(model, PeftModel) and adapter in model.peft_config \
                    and adapter not in {name for name, _ in self._entries.values()}:
                name = adapter
                self.hits += 1
            else:
                name = self._ensure_loaded(Path(adapter))
            self._model.set_adapter(name, inference_mode=True)
            self.active = name
            self.last_switch_s = time.perf_counter() - start
            return name

    @contextmanager
    def use(self, adapter: str | os.PathLike[str]) -> Iterator[PeftModel]:
        """Activate ``adapter`` and hold the lock until the block ends; yields the model."""
        with self._lock:
            self.activate(adapter)
            yield self._model  # type: ignore[misc]

    def _ensure_loaded(self, directory: Path) -> str:
        key = directory.expanduser().resolve()
        metadata = read_metadata(key)
        entry = self._entries.get(key)
        if entry is not None and entry[1] == metadata.weights_sha256:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]
        if entry is None and len(self._entries) >= self.capacity and self._refill(key, metadata):
            return self._entries[key][0]
        self._counter += 1
        name = f"cached{self._counter}"
        while isinstance(self._model, PeftModel) and name in self._model.peft_config:
            self._counter += 1
            name = f"cached{self._counter}"
        self._model = load_adapter(self._model, key, name, expect_base_sha256=self.expect_base_sha256,
                                   activate=False)
        self.loads += 1
        self._model.set_adapter(name, inference_mode=True)  # so that no evicted adapter is the active one
        if entry is not None:  # the files changed on disk since it was loaded: drop the stale copy
            self._delete(entry[0])
        self._entries[key] = (name, metadata.weights_sha256)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            _, (old_name, _) = self._entries.popitem(last=False)
            self._delete(old_name)
            self.evictions += 1
        return name

    def _refill(self, key: Path, metadata: AdapterMetadata) -> bool:
        """Load the adapter at ``key`` into the least recently used slot, if its rank fits; evicts that one.

        Overwriting a slot's weights costs a file read; adding an adapter to the
        model (new peft layers in every targeted module) costs several times
        more. Only same-rank adapters fit (same tensor shapes, same scale).
        """
        model = self._model
        old_key, (slot, _) = next(iter(self._entries.items()))
        if not isinstance(model, PeftModel) or model.peft_config[slot].r != metadata.rank:
            return False
        tensors = _checked_weights(unwrap(model), key, metadata, self.expect_base_sha256)
        result = set_peft_model_state_dict(model, tensors, adapter_name=slot)
        if result.unexpected_keys:  # pragma: no cover - keys were checked
            raise AdapterError(f"adapter {key}: unexpected keys {result.unexpected_keys[:3]}")
        del self._entries[old_key]
        self._entries[key] = (slot, metadata.weights_sha256)
        self.loads += 1
        self.evictions += 1
        return True

    def _delete(self, name: str) -> None:
        """Remove adapter ``name`` from the model (never the one just loaded, so another remains)."""
        model = self._model
        assert isinstance(model, PeftModel)
        model.delete_adapter(name)
