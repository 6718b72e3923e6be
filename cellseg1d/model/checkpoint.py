"""Loading SAM checkpoints safely: known hashes, weights-only loading, resizing to the input size.

The backbone (vit_b, vit_l, vit_h, or the small test spec ``tiny``) is read
from the checkpoint's tensor shapes (:func:`infer_model_type`): encoder width,
number of blocks, attention heads and which blocks attend globally. A model
type given by the caller is only a check. An official checkpoint is
recognised by its SHA-256, looked up for the inferred type; a file whose
hash does not match is refused unless the caller allows custom checkpoints
(a base fine-tuned elsewhere). Files are read with
``torch.load(weights_only=True)``: a checkpoint is data, never code.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from segment_anything.modeling import Sam

from cellseg1d.errors import CellsegError
from cellseg1d.model.sam import DEFAULT_IMAGE_SIZE, PATCH_SIZE, SPECS, SamSpec, build_sam, resize_state_dict

_HASH_CHUNK = 8 * 1024 * 1024


class CheckpointError(CellsegError):
    """A SAM checkpoint is missing, unverified, unreadable or of the wrong architecture."""


@dataclass(frozen=True)
class OfficialCheckpoint:
    """One of Meta's published SAM checkpoints."""

    filename: str
    sha256: str
    url: str
    #: Size in bytes, where known.
    size: int | None = None


OFFICIAL: dict[str, OfficialCheckpoint] = {
    "vit_b": OfficialCheckpoint(
        filename="sam_vit_b_01ec64.pth",
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        size=375042383,
    ),
    "vit_l": OfficialCheckpoint(
        filename="sam_vit_l_0b3195.pth",
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        size=None,
    ),
    "vit_h": OfficialCheckpoint(
        filename="sam_vit_h_4b8939.pth",
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        size=2564550879,
    ),
}


@dataclass(frozen=True)
class CheckpointInfo:
    """Where a loaded SAM came from."""

    path: Path
    model_type: str
    sha256: str
    #: True when ``sha256`` is the official hash of ``model_type``.
    official: bool
    image_size: int


#: sha256 of files already hashed in this process, keyed by (path, size, mtime_ns).
_hash_cache: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike[str], progress: Callable[[int, int], None] | None = None) -> str:
    """The hex SHA-256 of a file, read in chunks; ``progress(done_bytes, total_bytes)`` after each."""
    path = Path(path)
    total = path.stat().st_size
    digest = hashlib.sha256()
    done = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    return digest.hexdigest()


def _cached_sha256(path: Path) -> str:
    """sha256_file, remembered while the file's size and modification time are unchanged."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _hash_cache:
        _hash_cache[key] = sha256_file(path)
    return _hash_cache[key]


def official_type_of(sha256: str) -> str | None:
    """The model type whose official checkpoint has SHA-256 ``sha256``; None for any other file."""
    for name, item in OFFICIAL.items():
        if item.sha256 == sha256:
            return name
    return None


def _fetch_hint(path: Path, model_type: str | None) -> str | None:
    """The official type a file at ``path`` is probably meant to be (setting, else file name); None if unknown."""
    if model_type in OFFICIAL:
        return model_type
    for name, item in OFFICIAL.items():
        if path.name == item.filename:
            return name
    return None


def _verify(path: Path, model_type: str, allow_custom: bool) -> tuple[str, bool]:
    """(sha256, official) of ``path``; CheckpointError when it may not be used as ``model_type``."""
    actual = _cached_sha256(path)
    official = OFFICIAL.get(model_type)
    if official is not None and actual == official.sha256:
        return actual, True
    if allow_custom:
        return actual, False
    if official is None:
        raise CheckpointError(
            f"SAM model type {model_type!r} has no official checkpoint, so {path} (sha256 {actual}) cannot be "
            f"verified. To load it as a custom checkpoint of type {model_type!r}, allow custom checkpoints "
            f"(allow_custom=True, or the configuration's custom-checkpoint option)."
        )
    raise CheckpointError(
        f"checkpoint {path} is not the official {model_type} SAM checkpoint: sha256 expected "
        f"{official.sha256} (file {official.filename}), actual {actual}. If the download was incomplete or "
        f"corrupted, delete it and run 'cellseg1d models fetch {model_type}'. If it is a custom fine-tuned "
        f"{model_type} checkpoint, allow custom checkpoints (allow_custom=True, or the configuration's "
        f"custom-checkpoint option)."
    )


def _torch_load(path: Path, mmap: bool) -> object:
    if mmap:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # a legacy (pre-zip) file cannot be memory-mapped: read it whole
    return torch.load(path, map_location="cpu", weights_only=True)


def refused_objects(exc: pickle.UnpicklingError) -> bool:
    """Whether weights-only loading failed because the file holds Python objects (not because it is damaged)."""
    text = str(exc)
    return "weights only load failed" in text.lower() and "Unsupported global" in text


def unpickling_reason(exc: pickle.UnpicklingError) -> str:
    """The informative line of an unpickling error (torch wraps it in paragraphs of advice)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if "WeightsUnpickler error" in line:
            rest = line.split("WeightsUnpickler error:", 1)[-1].strip()
            return rest or (lines[index + 1] if index + 1 < len(lines) else line)
    return lines[0] if lines else type(exc).__name__


def _read_state_dict(path: Path, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: a raw state dict or ``{"model": state_dict}``.

    With ``mmap`` the tensors are memory-mapped (zip-format files): reading
    their shapes costs almost nothing, even for a 2.4 GB vit_h file.
    """
    try:
        loaded = _torch_load(path, mmap)
    except pickle.UnpicklingError as exc:
        if not refused_objects(exc):
            raise CheckpointError(f"checkpoint {path} cannot be read (truncated, corrupted or not a PyTorch "
                                  f"file?): {unpickling_reason(exc)}") from None
        raise CheckpointError(
            f"checkpoint {path} is not a plain weights file (it contains Python objects other than tensors), "
            f"so it was not loaded: cellseg1d never executes code from checkpoint files. Save the model's "
            f"state dict (tensors only) with torch.save."
        ) from None
    except Exception as exc:  # torch raises many kinds on truncated or foreign files
        raise CheckpointError(
            f"checkpoint {path} cannot be read (truncated, corrupted or not a PyTorch file?): "
            f"{type(exc).__name__}: {exc}"
        ) from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping):
        loaded = loaded["model"]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        raise CheckpointError(
            f"checkpoint {path} does not hold a SAM state dict (expected a mapping of parameter names to "
            f"tensors, or {{'model': state_dict}})"
        )
    return dict(loaded)


# -- the backbone, from the tensor shapes ------------------------------------------------------------------

_BLOCK_KEY = re.compile(r"image_encoder\.blocks\.(\d+)\.")


@dataclass(frozen=True)
class Backbone:
    """What a SAM state dict's shapes say about its image encoder (and decoder MLP width)."""

    embed_dim: int
    depth: int
    #: None when the width is not a multiple of the relative-position tables' head width.
    num_heads: int | None
    #: Token grid of the position embedding (64 for the official 1024-pixel checkpoints).
    grid: int
    #: Length of each block's relative-position table (``2 * window - 1``, or ``2 * grid - 1`` when global).
    rel_pos_lengths: tuple[int, ...]
    decoder_mlp_dim: int | None = None

    @property
    def global_blocks(self) -> tuple[int, ...]:
        """Blocks whose relative-position table spans the whole grid (global attention)."""
        return tuple(index for index, length in enumerate(self.rel_pos_lengths) if length == 2 * self.grid - 1)

    def fits(self, spec: SamSpec) -> bool:
        """Whether this is ``spec``'s architecture (at any input size)."""
        if (self.embed_dim, self.depth, self.num_heads) != (spec.embed_dim, spec.depth, spec.num_heads):
            return False
        if self.decoder_mlp_dim is not None and self.decoder_mlp_dim != spec.decoder_mlp_dim:
            return False
        windowed, whole = 2 * spec.window_size - 1, 2 * self.grid - 1
        return all(length == (whole if index in spec.global_attn_indexes else windowed)
                   for index, length in enumerate(self.rel_pos_lengths))

    def describe(self) -> str:
        heads = f"{self.num_heads} heads" if self.num_heads else "heads unknown"
        blocks = ", ".join(map(str, self.global_blocks)) or "none"
        return f"width {self.embed_dim}, {self.depth} blocks, {heads}, global attention in blocks {blocks}"


def describe_spec(spec: SamSpec) -> str:
    """``spec``'s encoder in the words of :meth:`Backbone.describe`."""
    blocks = ", ".join(map(str, spec.global_attn_indexes))
    return (f"width {spec.embed_dim}, {spec.depth} blocks, {spec.num_heads} heads, global attention in "
            f"blocks {blocks}")


def backbone_of(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> Backbone:
    """The encoder shapes of a SAM state dict; CheckpointError when it does not look like SAM's."""
    not_sam = (f"{source} is not a SAM checkpoint: {{}}. Point it at a SAM checkpoint (the official ones: "
               f"'cellseg1d models fetch vit_h', vit_l or vit_b)")
    patch = state.get("image_encoder.patch_embed.proj.weight")
    pos = state.get("image_encoder.pos_embed")
    if patch is None or patch.dim() != 4 or pos is None or pos.dim() != 4:
        raise CheckpointError(not_sam.format("it has no image encoder (image_encoder.patch_embed.proj.weight "
                                             "and image_encoder.pos_embed are missing or misshapen)"))
    indexes = sorted({int(found.group(1)) for key in state if (found := _BLOCK_KEY.match(key))})
    if not indexes or indexes != list(range(len(indexes))):
        raise CheckpointError(not_sam.format(f"its encoder blocks are not numbered 0..N-1 (found "
                                             f"{indexes[:8]}{' ...' if len(indexes) > 8 else ''})"))
    lengths, head_dims = [], set()
    for index in indexes:
        table = state.get(f"image_encoder.blocks.{index}.attn.rel_pos_h")
        if table is None or table.dim() != 2:
            raise CheckpointError(not_sam.format(f"block {index} has no relative-position table "
                                                 f"(image_encoder.blocks.{index}.attn.rel_pos_h)"))
        lengths.append(int(table.shape[0]))
        head_dims.add(int(table.shape[1]))
    embed_dim = int(patch.shape[0])
    head_dim = head_dims.pop() if len(head_dims) == 1 else 0
    heads = embed_dim // head_dim if head_dim and embed_dim % head_dim == 0 else None
    mlp = state.get("mask_decoder.transformer.layers.0.mlp.lin1.weight")
    return Backbone(embed_dim=embed_dim, depth=len(indexes), num_heads=heads, grid=int(pos.shape[1]),
                    rel_pos_lengths=tuple(lengths),
                    decoder_mlp_dim=int(mlp.shape[0]) if mlp is not None and mlp.dim() == 2 else None)


def infer_model_type(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> str:
    """The SPECS name (vit_b, vit_l, vit_h, tiny) whose architecture the state dict's shapes have.

    CheckpointError naming ``source`` and what was found when none fits.
    """
    found = backbone_of(state, source)
    for name, spec in SPECS.items():
        if found.fits(spec):
            return name
    known = "; ".join(f"{name}: {describe_spec(spec)}" for name, spec in SPECS.items())
    raise CheckpointError(f"{source} is a SAM-like checkpoint of an unknown backbone ({found.describe()}); "
                          f"cellseg1d runs these: {known}. Use an official SAM checkpoint (cellseg1d models "
                          f"fetch vit_h) or a checkpoint fine-tuned from one")


def check_known_type(model_type: str | None, setting: str = "model_type") -> None:
    """CheckpointError when ``model_type`` (named ``setting``) is given but is no SPECS name."""
    if model_type is not None and model_type not in SPECS:
        raise CheckpointError(f"{setting}: {model_type!r} is not a SAM model type (known: {', '.join(SPECS)}); "
                              f"leave it out: the type is read from the checkpoint")


def check_model_type(path: str | os.PathLike[str], inferred: str, expected: str | None,
                     setting: str = "model_type") -> None:
    """CheckpointError when a configured ``expected`` type (named ``setting``) is not the ``inferred`` one."""
    if expected is None:
        return
    check_known_type(expected, setting)
    if expected != inferred:
        raise CheckpointError(
            f"checkpoint {path} is a {inferred} SAM ({describe_spec(SPECS[inferred])}) but {setting} is "
            f"{expected!r}. Leave {setting} out (the backbone is read from the checkpoint) or point the "
            f"checkpoint setting at a {expected} checkpoint")


def checkpoint_model_type(path: str | os.PathLike[str], *, sha256: str | None = None, expected: str | None = None,
                          setting: str = "model_type") -> str:
    """The backbone of the checkpoint at ``path``, cheaply: from its hash when official, else its shapes.

    The shapes are read memory-mapped (no tensor data is loaded). ``expected``
    (named ``setting`` in messages) is checked against the result.
    """
    path = Path(path).expanduser()
    inferred = official_type_of(sha256) if sha256 is not None else None
    if inferred is None:
        if not path.is_file():
            raise CheckpointError(f"SAM checkpoint not found: {path}; {_missing_hint(path, expected)}")
        inferred = infer_model_type(_read_state_dict(path, mmap=True), f"checkpoint {path}")
    check_model_type(path, inferred, expected, setting)
    return inferred


def _missing_hint(path: Path, model_type: str | None) -> str:
    guess = _fetch_hint(path, model_type)
    if guess is not None:
        return (f"run 'cellseg1d models fetch {guess}' to download it, or copy {OFFICIAL[guess].filename} "
                f"there by hand")
    return "check the configured path (official checkpoints: 'cellseg1d models fetch vit_h', vit_l or vit_b)"


def read_checkpoint(path: str | os.PathLike[str], model_type: str | None = None, *, allow_custom: bool = False,
                    setting: str = "model_type", mmap: bool = False) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """The state dict of a SAM checkpoint (as stored: input size and dtype unchanged) and where it came from.

    The backbone is inferred from the shapes; ``model_type``, when given, must
    be that backbone (``setting`` names it in messages). The file's SHA-256
    must be the official one of the inferred type unless ``allow_custom``.
    ``info.image_size`` is the checkpoint's own input size. With ``mmap`` the
    tensors are memory-mapped, for callers that read only a few of them.
    """
    path = Path(path).expanduser()
    check_known_type(model_type, setting)
    if not path.is_file():
        raise CheckpointError(f"SAM checkpoint not found: {path}; {_missing_hint(path, model_type)}")
    try:
        state = _read_state_dict(path, mmap=mmap)
        inferred = infer_model_type(state, f"checkpoint {path}")
    except CheckpointError as err:
        guess = _fetch_hint(path, model_type)
        if guess is None or _cached_sha256(path) == OFFICIAL[guess].sha256:
            raise
        raise CheckpointError(f"{err}. If it is a download of the official {guess} checkpoint "
                              f"({OFFICIAL[guess].filename}), it is incomplete or corrupted: delete it and run "
                              f"'cellseg1d models fetch {guess}'") from None
    check_model_type(path, inferred, model_type, setting)
    sha256, official = _verify(path, inferred, allow_custom)
    grid = int(state["image_encoder.pos_embed"].shape[1])
    return state, CheckpointInfo(path=path, model_type=inferred, sha256=sha256, official=official,
                                 image_size=grid * PATCH_SIZE)


def _describe_mismatch(missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            parts.append(f"{len(keys)} {label} ({shown})")
    return "; ".join(parts)


def load_sam(
    path: str | os.PathLike[str],
    model_type: str | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    *,
    allow_custom: bool = False,
    device: torch.device | str = "cpu",
    setting: str = "model_type",
) -> tuple[Sam, CheckpointInfo]:
    """Load a SAM checkpoint for inputs of ``image_size`` pixels, in eval mode.

    The backbone (``info.model_type``) is read from the checkpoint's shapes;
    ``model_type``, when given, is only checked against it (``setting`` is
    its name in messages, e.g. ``"--model-type"`` or ``"sam.model_type"``).
    The file's SHA-256 must be the official one for the inferred type unless
    ``allow_custom`` is set. Position embeddings and global-attention
    relative-position tables are interpolated to ``image_size``. The
    returned model's q/k/v projections are still fused (see ``split_qkv``).
    """
    state, info = read_checkpoint(path, model_type, allow_custom=allow_custom, setting=setting)
    path, spec = info.path, SPECS[info.model_type]
    state = {key: value.float() if value.is_floating_point() else value for key, value in state.items()}
    state = resize_state_dict(state, spec, image_size)

    # Build on the meta device (no random initialisation, no second copy of the
    # weights), then adopt the loaded tensors. Non-persistent buffers
    # (pixel mean/std) are created on the CPU by Sam itself.
    with torch.device("meta"):
        sam = build_sam(spec, image_size)
    expected = sam.state_dict()
    shapes = [f"{key} {tuple(state[key].shape)} != {tuple(value.shape)}"
              for key, value in expected.items() if key in state and state[key].shape != value.shape]
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"checkpoint {path} does not fit a {info.model_type} SAM (its shapes say {info.model_type}, but "
            f"its keys differ): " + _describe_mismatch(missing, unexpected, shapes)
        )
    sam.load_state_dict(state, strict=True, assign=True)
    leftover = [name for name, tensor in [*sam.named_parameters(), *sam.named_buffers()] if tensor.is_meta]
    if leftover:  # pragma: no cover - would mean Sam grew a new non-persistent buffer
        raise CheckpointError(f"internal error: {', '.join(leftover)} not initialised when loading {path}")
    sam.to(device)
    sam.eval()
    return sam, replace(info, image_size=image_size)
