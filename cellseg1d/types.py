"""Plain data types passed to and returned from plugin hooks."""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_output_name(name: str) -> str:
    """Return ``name`` if it is safe as a folder name for outputs, else raise ValueError.

    Allowed: letters, digits, ``.``, ``_``, ``-``; starting with a letter or digit;
    at most 128 characters. No path separators, no ``..``, no hidden names.
    """
    if not _SAFE.match(name) or ".." in name:
        raise ValueError(
            f"'{name}' is not a safe output name: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (at most 128 characters)"
        )
    return name


@dataclass(frozen=True)
class ReadinessQuery:
    """Arguments of the ``image_ready`` hook."""

    #: The opened image (:class:`cellseg1d.ngff.OmeImage`).
    image: Any
    #: The OME-Zarr container folder the image lies in (the image itself for a plain image).
    container: Path
    #: How long nothing has changed in the image's folder, in seconds.
    quiet_seconds: float
    #: The daemon's :class:`cellseg1d.config.ReadinessSettings`.
    settings: Any


@dataclass(frozen=True)
class AdapterRef:
    """A registered adapter version a job runs with (from the experiment's assignment)."""

    name: str
    version: int
    #: SHA-256 of the adapter's weights file, as registered.
    sha256: str
    #: The adapter folder in the store (``adapter.safetensors`` + ``adapter.json``).
    path: Path
    base_model_type: str
    base_sha256: str

    @property
    def label(self) -> str:
        """``name@vN``."""
        return f"{self.name}@v{self.version}"

    def provenance(self) -> dict[str, Any]:
        """The JSON-able description recorded with results."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


@dataclass(frozen=True, eq=False)
class ChannelStats:
    """Intensity statistics of one channel over a whole plane (finite values only)."""

    min: float
    max: float
    #: Value at each percentile of :data:`STATS_PERCENTILES`, as ``(percentile, value)`` pairs.
    percentiles: tuple[tuple[float, float], ...]
    #: float32 (h, w): the plane shrunk by ``sample_stride`` (the mean of every sy x sx cell,
    #: non-finite values as 0; at most :data:`STATS_SAMPLE_SIZE` values), for statistics a segmenter
    #: computes itself (a threshold on the smoothed plane, for one).
    sample: np.ndarray
    #: Full-resolution pixels per sample value along y and x ((1, 1): the sample is the plane).
    sample_stride: tuple[int, int] = (1, 1)

    def percentile(self, q: float) -> float:
        """The value at percentile ``q`` (one of :data:`STATS_PERCENTILES`)."""
        for known, value in self.percentiles:
            if known == q:
                return value
        raise KeyError(f"percentile {q} is not in the plane statistics (known: "
                       f"{', '.join(str(k) for k, _ in self.percentiles)})")


#: Percentiles every :class:`ChannelStats` holds.
STATS_PERCENTILES = (0.5, 1.0, 99.5, 99.8)
#: Most sample values per channel.
STATS_SAMPLE_SIZE = 65536


@dataclass(frozen=True, eq=False)
class PlaneStats:
    """Statistics of the whole plane a block belongs to, one entry per channel of the request's plane.

    A plane split into blocks (``executor.block_size``) is segmented block by
    block; segmenters that normalise or threshold use these so that a cell's
    outline does not depend on which block it falls in.
    """

    channels: tuple[ChannelStats, ...]
    #: Where they were computed: ``"plane"`` (full resolution) or ``"level N"`` (a pyramid level).
    source: str = "plane"


@dataclass(frozen=True)
class SegmentRequest:
    """What a segmenter is asked to segment (the plane itself is passed beside it)."""

    image_path: Path
    experiment: str
    t: int
    z: int
    #: Names of the channels in the plane, in order.
    channels: tuple[str, ...]
    #: Pixel size in y and x in the image's unit (None when the metadata gives none).
    pixel_size: tuple[float, float] | None
    #: The daemon config (:class:`cellseg1d.config.Config`), for plugin settings.
    config: Any
    #: The adapter assigned to the experiment (None: none assigned, use the default).
    adapter: AdapterRef | None = None
    #: True when the experiment has no adapter and its root says "classical": model
    #: segmenters should return None and let the classical segmenter answer.
    fallback: bool = False
    #: Intensity statistics of the whole plane (every block of a plane gets the same); None
    #: for callers that give none (then a segmenter uses the plane it is given).
    stats: PlaneStats | None = None


@dataclass
class Segmentation:
    """A segmenter's answer for one plane."""

    #: (Y, X) integer label image, 0 background.
    labels: np.ndarray
    #: Which segmenter produced it, e.g. ``"classical"`` or ``"sam-lora:vit_b/exp1@3"``.
    segmenter: str
    #: Optional JSON-able details (model versions, parameters); those of the first
    #: plane are stored in the catalog's result row under ``exports["segmentation"]``.
    details: dict[str, Any] = field(default_factory=dict)


class LabelsView:
    """Read access to the finished label planes of the image being processed."""

    def __init__(self, read: Callable[[int, int], np.ndarray], planes: list[tuple[int, int]], n_objects: int):
        self._read = read
        self.planes = planes
        self.n_objects = n_objects

    def read_plane(self, t: int, z: int) -> np.ndarray:
        """The (Y, X) label plane at time point ``t`` and z slice ``z``."""
        return self._read(t, z)

    def __iter__(self) -> Iterator[tuple[int, int, np.ndarray]]:
        for t, z in self.planes:
            yield t, z, self._read(t, z)


@dataclass
class ExportContext:
    """What an export plugin needs beyond the image and its labels."""

    experiment: str
    #: Folder for this image's extra outputs (created on first use of atomic_path).
    output_dir: Path
    #: Reads a raw (C, Y, X) image plane: ``read_plane(t, z)`` with all channels.
    read_image_plane: Callable[[int, int], np.ndarray]
    config: Any
    _pending: list[tuple[Path, Path]] = field(default_factory=list)

    def atomic_path(self, name: str) -> Path:
        """A temporary path to write output file ``name`` to; it is moved into place on success."""
        check_output_name(name)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        final = self.output_dir / name
        tmp = self.output_dir / f".{name}.partial-{uuid.uuid4().hex[:12]}"
        self._pending.append((tmp, final))
        return tmp

    def commit(self) -> list[Path]:
        """Move every file written through :meth:`atomic_path` into place."""
        done = []
        for tmp, final in self._pending:
            if tmp.exists():
                tmp.replace(final)
                done.append(final)
        self._pending.clear()
        return done

    def discard(self) -> None:
        """Delete temporary files of a failed job."""
        for tmp, _ in self._pending:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        if self._pending:
            # Remove folders atomic_path created that are now empty.
            folder = self.output_dir
            while folder != folder.parent:
                try:
                    folder.rmdir()
                except OSError:
                    break
                if folder.name.endswith(".cellseg1d"):
                    break
                folder = folder.parent
        self._pending.clear()
