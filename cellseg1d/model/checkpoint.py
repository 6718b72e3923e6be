"""Loading SAM checkpoints safely: known hashes, weights-only loading, resizing to the input size.

An official checkpoint is recognised by its SHA-256. A file of a type whose
hash does not match is refused unless the caller allows custom checkpoints
(a base fine-tuned elsewhere, of the stated architecture). Files are read
with ``torch.load(weights_only=True)``: a checkpoint is data, never code.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from segment_anything.modeling import Sam

from cellseg1d.errors import CellsegError
from cellseg1d.model.sam import DEFAULT_IMAGE_SIZE, build_sam, get_spec, resize_state_dict

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


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: a raw state dict or ``{"model": state_dict}``."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise CheckpointError(f"checkpoint {path} cannot be read (corrupted or not a PyTorch file?): "
                                  f"{str(exc).splitlines()[0]}") from None
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


def _describe_mismatch(missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            parts.append(f"{len(keys)} {label} ({shown})")
    return "; ".join(parts)


def load_sam(
    path: str | os.PathLike[str],
    model_type: str,
    image_size: int = DEFAULT_IMAGE_SIZE,
    *,
    allow_custom: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[Sam, CheckpointInfo]:
    """Load a SAM checkpoint of ``model_type`` for inputs of ``image_size`` pixels, in eval mode.

    The file's SHA-256 must be the official one for ``model_type`` unless
    ``allow_custom`` is set. Position embeddings and global-attention
    relative-position tables are interpolated to ``image_size``. The
    returned model's q/k/v projections are still fused (see ``split_qkv``).
    """
    spec = get_spec(model_type)
    path = Path(path).expanduser()
    if not path.is_file():
        hint = (f"run 'cellseg1d models fetch {model_type}' to download it, or copy "
                f"{OFFICIAL[model_type].filename} there by hand" if model_type in OFFICIAL
                else "check the configured path")
        raise CheckpointError(f"SAM checkpoint not found: {path}; {hint}")
    sha256, official = _verify(path, model_type, allow_custom)
    state = {key: value.float() if value.is_floating_point() else value
             for key, value in _read_state_dict(path).items()}
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
            f"checkpoint {path} does not fit a {model_type} SAM (is it a checkpoint of another model type?): "
            + _describe_mismatch(missing, unexpected, shapes)
        )
    sam.load_state_dict(state, strict=True, assign=True)
    leftover = [name for name, tensor in [*sam.named_parameters(), *sam.named_buffers()] if tensor.is_meta]
    if leftover:  # pragma: no cover - would mean Sam grew a new non-persistent buffer
        raise CheckpointError(f"internal error: {', '.join(leftover)} not initialised when loading {path}")
    sam.to(device)
    sam.eval()
    info = CheckpointInfo(path=path, model_type=model_type, sha256=sha256, official=official,
                          image_size=image_size)
    return sam, info
