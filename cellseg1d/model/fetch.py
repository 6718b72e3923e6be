"""Downloading official SAM checkpoints, verified by SHA-256.

The file is streamed to ``<model_dir>/<filename>.partial`` while being hashed,
and renamed into place only when its hash is the expected one, so a
checkpoint under its final name is always complete. On machines without
network access the error says which file (name and hash) to copy in by hand.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from cellseg1d.model.checkpoint import OFFICIAL, CheckpointError, OfficialCheckpoint, sha256_file

_CHUNK = 1024 * 1024
_TIMEOUT_S = 30.0


def _manual_copy_hint(official: OfficialCheckpoint, target: Path, sha256: str) -> str:
    return (f"To install it by hand, download {official.url} on a machine with internet access and copy it to "
            f"{target} (its sha256 must be {sha256}).")


def _download(url: str, partial: Path, expected_size: int | None, show_progress: bool) -> str:
    """Stream ``url`` into ``partial``; the hex SHA-256 of what was written."""
    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "cellseg1d"})
    with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else expected_size
        if total is not None:
            free = shutil.disk_usage(partial.parent).free
            if free < total:
                raise CheckpointError(f"not enough disk space in {partial.parent} for {partial.name[:-8]}: "
                                      f"{total / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free")
        progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), console=Console(stderr=True), disable=not show_progress, transient=False,
        )
        with progress, partial.open("wb") as handle:
            task = progress.add_task(partial.name[: -len(".partial")], total=total)
            while chunk := response.read(_CHUNK):
                handle.write(chunk)
                digest.update(chunk)
                progress.advance(task, len(chunk))
            handle.flush()
            os.fsync(handle.fileno())
    return digest.hexdigest()


def fetch_checkpoint(
    model_type: str,
    model_dir: str | os.PathLike[str],
    *,
    url: str | None = None,
    progress: bool = True,
    expected_sha256: str | None = None,
) -> Path:
    """Download the official checkpoint of ``model_type`` into ``model_dir``; its path.

    A file already there with the expected hash is returned without
    downloading. ``url`` overrides the download address (a mirror);
    ``expected_sha256`` overrides the official hash (tests).
    """
    if model_type not in OFFICIAL:
        raise CheckpointError(f"no official checkpoint for SAM model type {model_type!r}; "
                              f"known: {', '.join(OFFICIAL)}")
    official = OFFICIAL[model_type]
    sha256 = (expected_sha256 or official.sha256).lower()
    source = url or official.url
    directory = Path(model_dir).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / official.filename
    partial = directory / (official.filename + ".partial")

    if target.is_file():
        actual = sha256_file(target)
        if actual == sha256:
            return target
        raise CheckpointError(
            f"{target} exists but is not the expected {model_type} checkpoint: sha256 expected {sha256}, actual "
            f"{actual}. Delete or move it, then fetch again."
        )

    try:
        actual = _download(source, partial, official.size if expected_sha256 is None else None, progress)
    except CheckpointError:
        partial.unlink(missing_ok=True)
        raise
    except urllib.error.HTTPError as exc:
        partial.unlink(missing_ok=True)
        raise CheckpointError(
            f"downloading {source} failed: the server answered HTTP {exc.code} {exc.reason}. "
            + _manual_copy_hint(official, target, sha256)
        ) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        partial.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
        raise CheckpointError(
            f"downloading {source} failed ({reason}); this machine may be offline or unable to reach the "
            f"server. " + _manual_copy_hint(official, target, sha256)
        ) from None
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write the checkpoint to {partial}: {exc}") from None
    except BaseException:  # e.g. Ctrl-C: leave no partial file behind
        partial.unlink(missing_ok=True)
        raise

    if actual != sha256:
        partial.unlink(missing_ok=True)
        raise CheckpointError(
            f"downloaded {source} but its sha256 is wrong (expected {sha256}, actual {actual}); the file was "
            f"deleted. Try again. " + _manual_copy_hint(official, target, sha256)
        )
    os.replace(partial, target)
    return target
