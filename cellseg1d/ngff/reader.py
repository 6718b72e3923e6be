"""Open OME-Zarr images (NGFF 0.4 on zarr v2, 0.5 on zarr v3) and read them plane by plane.

Metadata is parsed here rather than through a generic reader so that every
problem becomes an :class:`~cellseg1d.errors.ImageError` naming the file and
what is wrong with it. Pixels are read one 2-D (t, z) plane at a time, so an
image larger than memory is never loaded whole.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from cellseg1d.errors import ImageError

SUPPORTED_VERSIONS = ("0.4", "0.5")
KNOWN_AXES = "tczyx"
#: Largest 2-D plane read in one piece (pixels); larger planes are refused.
MAX_PLANE_PIXELS = 1 << 30


#: Metadata files larger than this are refused (NGFF metadata is kilobytes; a runaway writer is not).
MAX_METADATA_BYTES = 16 << 20
#: Deepest nesting of objects and lists accepted in a metadata file (NGFF needs about 6).
MAX_METADATA_DEPTH = 100


def json_depth(doc: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), walked without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(doc, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if depth > MAX_METADATA_DEPTH:
            return depth  # deep enough to refuse: stop walking
        stack.extend((child, depth) for child in children)
    return deepest


def check_metadata_size(path: Path) -> None:
    """Refuse a metadata file above :data:`MAX_METADATA_BYTES` before anything parses it."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return  # the caller's own read reports it
    except OSError as err:
        raise ImageError(f"cannot read {path}: {err.strerror or err}") from None
    if size > MAX_METADATA_BYTES:
        raise ImageError(
            f"metadata too large: {path} is {size / 2**20:.1f} MiB, over the "
            f"{MAX_METADATA_BYTES >> 20} MiB limit for one metadata file; is it really zarr metadata?"
        )


def load_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object from ``path``, raising ImageError with the file name on failure.

    Files over :data:`MAX_METADATA_BYTES` and documents nested deeper than
    :data:`MAX_METADATA_DEPTH` are refused ("metadata too large / too deeply
    nested"), so no metadata file can exhaust memory or the interpreter's stack.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_METADATA_BYTES + 1)
    except PermissionError:
        raise ImageError(
            f"cannot read {path}: permission denied; give the user running cellseg1d read access to it"
        ) from None
    except IsADirectoryError:
        raise ImageError(f"cannot read {path}: it is a folder, where a metadata file belongs") from None
    except OSError as err:
        raise ImageError(f"cannot read {path}: {err.strerror or err}") from None
    if len(raw) > MAX_METADATA_BYTES:
        raise ImageError(
            f"metadata too large: {path} is over the {MAX_METADATA_BYTES >> 20} MiB limit for one "
            "metadata file; is it really zarr metadata?"
        )
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ImageError(f"invalid JSON in {path}: {err}") from None
    except RecursionError:
        raise ImageError(
            f"metadata too deeply nested: {path} nests objects or lists deeper than the JSON parser "
            f"allows (cellseg1d accepts {MAX_METADATA_DEPTH} levels)"
        ) from None
    except (ValueError, MemoryError) as err:  # e.g. an integer literal with too many digits
        raise ImageError(f"invalid JSON in {path}: {type(err).__name__}: {err}") from None
    if not isinstance(doc, dict):
        raise ImageError(f"invalid metadata in {path}: expected a JSON object, found {type(doc).__name__}")
    if json_depth(doc) > MAX_METADATA_DEPTH:
        raise ImageError(
            f"metadata too deeply nested: {path} nests objects or lists more than "
            f"{MAX_METADATA_DEPTH} levels deep; NGFF metadata needs only a few"
        )
    return doc


class NotAGroup(ImageError):
    """The folder holds a zarr array, not a group (fine inside a container; not an image)."""


def read_group_attributes(path: Path) -> tuple[int, dict[str, Any]]:
    """Return ``(zarr_format, attributes)`` of the zarr group stored at ``path``."""
    v3 = path / "zarr.json"
    for name in ("zarr.json", ".zattrs", ".zgroup"):
        if (path / name).is_dir():
            raise ImageError(f"{path / name} is a folder, where zarr expects a metadata file")
    if v3.is_file():
        doc = load_json(v3)
        if doc.get("zarr_format") == 3 and doc.get("node_type") == "array":
            raise NotAGroup(f"{v3} describes a zarr array, not a group")
        if doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
            raise ImageError(
                f"{v3} does not describe a zarr v3 group "
                f"(zarr_format={doc.get('zarr_format')!r}, node_type={doc.get('node_type')!r})"
            )
        attrs = doc.get("attributes", {})
        if not isinstance(attrs, dict):
            raise ImageError(f"invalid metadata in {v3}: 'attributes' is not an object")
        return 3, attrs
    if (path / ".zattrs").is_file():
        return 2, load_json(path / ".zattrs")
    if (path / ".zgroup").is_file():
        return 2, {}
    raise ImageError(f"{path} is not a zarr group: no zarr.json, .zattrs or .zgroup in it")


def ome_attributes(attrs: dict[str, Any]) -> dict[str, Any]:
    """The NGFF part of a group's attributes (under ``ome`` in 0.5, top level before)."""
    ome = attrs.get("ome")
    return ome if isinstance(ome, dict) else attrs


def _ngff_version(ome: dict[str, Any], multiscale: dict[str, Any]) -> str | None:
    version = ome.get("version") or multiscale.get("version")
    return str(version) if version is not None else None


@dataclass(frozen=True)
class Level:
    """One resolution level of a multiscale image."""

    path: str
    array: zarr.Array
    transforms: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class OmeImage:
    """An opened OME-Zarr multiscale image. Axes are NGFF names from ``tczyx``."""

    path: Path
    ngff_version: str
    zarr_format: int
    axes: tuple[str, ...]
    axes_metadata: list[dict[str, Any]]
    levels: list[Level]
    channel_names: list[str]
    name: str
    attributes: dict[str, Any]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the full-resolution level, in ``axes`` order."""
        return tuple(self.levels[0].array.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.levels[0].array.dtype

    def size(self, axis: str) -> int:
        """Length of ``axis`` at full resolution (1 when the image lacks it)."""
        return self.shape[self.axes.index(axis)] if axis in self.axes else 1

    @property
    def n_channels(self) -> int:
        return self.size("c")

    def planes(self) -> Iterator[tuple[int, int]]:
        """Every (t, z) index pair, in storage order."""
        for t in range(self.size("t")):
            for z in range(self.size("z")):
                yield t, z

    @property
    def fingerprint(self) -> str:
        """Identity of the image's content layout: metadata plus array shapes, dtypes and chunks.

        It changes when the image is rewritten with other metadata or shapes, not
        when pixel values alone change (reading every chunk would be too costly).
        """
        h = hashlib.sha256()
        h.update(json.dumps(self.attributes, sort_keys=True, default=str).encode())
        for level in self.levels:
            arr = level.array
            h.update(f"|{level.path}:{arr.shape}:{arr.dtype}:{arr.chunks}".encode())
        return h.hexdigest()[:32]

    def channel_indices(self, selection: Sequence[str | int]) -> list[int]:
        """Resolve channel names or indices to indices; empty selection means channel 0."""
        if not selection:
            return [0]
        indices = []
        for item in selection:
            if isinstance(item, int):
                if not 0 <= item < self.n_channels:
                    raise ImageError(
                        f"{self.path}: channel index {item} (setting segmentation.channels) is out of "
                        f"range; the image has {self.n_channels} channel(s)"
                    )
                indices.append(item)
            elif item in self.channel_names:
                indices.append(self.channel_names.index(item))
            else:
                known = ", ".join(repr(n) for n in self.channel_names) or "none (no omero metadata)"
                raise ImageError(
                    f"{self.path}: no channel named {item!r} (setting segmentation.channels); "
                    f"channel names in this image: {known}"
                )
        return indices

    def missing_chunks(self) -> tuple[int, int]:
        """``(missing, total)`` stored chunks (shards for sharded arrays) of the full-resolution array.

        Counts the chunk files on disk and compares them with the chunk grid, so the
        cost follows the files written, not the declared shape: an image declaring
        a huge shape of which few chunks exist is answered at once. (zarr's own
        ``nchunks_initialized`` enumerates every declared chunk key.)
        """
        level = self.levels[0]
        return count_missing_chunks(level.array, self.path / level.path)

    def read_plane(self, t: int, z: int, channels: Sequence[int],
                   region: tuple[int, int, int, int] | None = None, level_index: int = 0) -> np.ndarray:
        """Read one full-resolution plane as a ``(C, Y, X)`` array of the stored dtype.

        ``region`` = ``(y0, x0, y1, x1)`` (exclusive ends) reads only that
        window of the plane (a block segmented on its own). ``level_index``
        reads the plane from a lower-resolution level of the pyramid instead
        (its own t, z and c must match the full resolution's).
        """
        level = self.levels[level_index]
        spans: dict[str, slice] = {}
        if region is not None:
            y0, x0, y1, x1 = region
            spans = {"y": slice(y0, y1), "x": slice(x0, x1)}
        selection: list[Any] = []
        kept: list[str] = []
        for axis in self.axes:
            if axis == "t":
                selection.append(t)
            elif axis == "z":
                selection.append(z)
            elif axis == "c":
                selection.append(list(channels))
                kept.append("c")
            else:
                selection.append(spans.get(axis, slice(None)))
                kept.append(axis)
        # A chunk file that is missing reads as the fill value: a deleted image would
        # silently read as empty planes, so check it is still there first.
        if not (self.path / level.path).is_dir():
            raise ImageError(
                f"{self.path / level.path} no longer exists: the image was deleted or moved while "
                f"being processed (before plane t={t} z={z}); nothing was written for it"
            )
        try:
            data = np.asarray(level.array.oindex[tuple(selection)])
        except PermissionError as err:
            raise ImageError(
                f"cannot read plane t={t} z={z} of {self.path / level.path}: permission denied on "
                f"{err.filename or 'a chunk file'}; give the user running cellseg1d read access"
            ) from None
        except (IsADirectoryError, NotADirectoryError) as err:
            raise ImageError(
                f"cannot read plane t={t} z={z} of {self.path / level.path}: {err.filename or 'a chunk'} "
                "is a folder where a chunk file belongs, or the reverse"
            ) from None
        except Exception as err:
            if isinstance(err, OSError) and err.errno is not None:
                raise  # storage trouble (network share, disk): transient, the job is retried
            # Codecs raise anything on bad bytes; gzip even an OSError without errno
            # (gzip.BadGzipFile), which is bad data, not storage trouble.
            raise ImageError(
                f"cannot read plane t={t} z={z} of {self.path / level.path}: "
                f"{type(err).__name__}: {err} (corrupt or truncated chunk?)"
            ) from None
        if "c" not in kept:
            data = data[np.newaxis]
            kept.insert(0, "c")
        return np.transpose(data, [kept.index(a) for a in "cyx"])


def _chunk_key_format(array: zarr.Array) -> tuple[str, str]:
    """``(prefix, separator)`` of the array's chunk keys, e.g. ``("c/", "/")`` for zarr v3 defaults."""
    meta = array.metadata
    encoding = getattr(meta, "chunk_key_encoding", None)
    separator = getattr(encoding, "separator", None) or getattr(meta, "dimension_separator", None) or "."
    zero = meta.encode_chunk_key((0,) * array.ndim)
    body = separator.join("0" * array.ndim)
    prefix = zero[: len(zero) - len(body)] if zero.endswith(body) else ""
    return prefix, separator


def count_missing_chunks(array: zarr.Array, array_dir: Path) -> tuple[int, int]:
    """``(missing, total)`` chunk (or shard) files of the zarr array stored in ``array_dir``.

    Walks ``array_dir`` once (symbolic links are not followed) and counts the files
    whose names are keys of the chunk grid; nothing the size of the declared
    shape is enumerated or allocated.
    """
    stored_block = array.shards or array.chunks
    grid = tuple(math.ceil(n / c) for n, c in zip(array.shape, stored_block, strict=True))
    total = math.prod(grid)
    if array.ndim == 0:
        return 0, 1
    prefix, separator = _chunk_key_format(array)
    found = 0
    for dirpath, dirnames, filenames in os.walk(array_dir):
        rel_dir = os.path.relpath(dirpath, array_dir)
        for name in filenames:
            key = name if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{name}"
            if not key.startswith(prefix):
                continue
            parts = key[len(prefix):].split(separator)
            if len(parts) != len(grid) or not all(p.isdigit() for p in parts):
                continue  # metadata, partial writes (<key>.<uuid>.partial), foreign files
            if all(int(p) < n for p, n in zip(parts, grid, strict=True)):
                found += 1
    return total - found, total


def check_links_inside(image_path: Path) -> None:
    """Refuse an image holding a symbolic link that leaves it, is broken or loops.

    zarr would follow such a link and read (or, for ``labels``, write) outside the
    image, possibly outside the watched folder. Links that stay inside the image
    are allowed. Walks every folder except inside ``labels/`` (outputs), whose own
    entry is still checked.
    """
    base = os.path.realpath(image_path)
    stack = [str(image_path)]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue  # unreadable or vanished: opening its metadata reports it
        for entry in entries:
            if entry.is_symlink():
                try:
                    target = os.path.realpath(entry.path, strict=True)
                except OSError as err:
                    what = "is a loop" if err.errno == errno.ELOOP else "is broken (its target does not exist)"
                    raise ImageError(
                        f"symbolic link {entry.path} {what}; remove it or replace it by the data"
                    ) from None
                if os.path.commonpath([base, target]) != base:
                    raise ImageError(
                        f"symbolic link {entry.path} points outside the image (to {target}); "
                        "cellseg1d never follows links out of an image: copy the data into it instead"
                    )
            elif entry.is_dir(follow_symlinks=False) and not (folder == str(image_path) and entry.name == "labels"):
                stack.append(entry.path)


def _check_axes(path: Path, axes_meta: Any) -> tuple[tuple[str, ...], list[dict[str, Any]]]:
    if not isinstance(axes_meta, list) or not axes_meta:
        raise ImageError(f"{path}: multiscales[0].axes is missing or empty")
    if not all(isinstance(a, dict) and isinstance(a.get("name"), str) for a in axes_meta):
        raise ImageError(
            f"{path}: multiscales[0].axes must be a list of objects with a 'name' "
            "(NGFF 0.4+); older string-list axes are not supported"
        )
    names = tuple(a["name"].lower() for a in axes_meta)
    unknown = [n for n in names if n not in KNOWN_AXES]
    if unknown:
        raise ImageError(
            f"{path}: unsupported axes {unknown} in {list(names)}; cellseg1d handles t, c, z, y, x "
            "(at most 5-D): store each value of the extra axis as its own image"
        )
    if len(set(names)) != len(names):
        raise ImageError(f"{path}: repeated axis names in {list(names)}")
    missing = [a for a in "yx" if a not in names]
    if missing:
        raise ImageError(
            f"{path}: axes {list(names)} lack {' and '.join(repr(a) for a in missing)}; "
            "a 2-D (y, x) image plane is needed"
        )
    return names, axes_meta


def _safe_dataset_path(image_path: Path, raw: Any) -> str:
    if not isinstance(raw, str) or not raw or raw.startswith("/") or ".." in Path(raw).parts:
        raise ImageError(f"{image_path}: dataset path {raw!r} is not a relative path inside the image")
    return raw


def open_image(path: Path) -> OmeImage:
    """Open the OME-Zarr multiscale image whose group is at ``path``.

    Raises
    ------
    ImageError
        When the metadata is missing, invalid or unsupported, or the arrays do
        not match it. The message names the file and the problem.
    """
    path = Path(path)
    zarr_format, attrs = read_group_attributes(path)
    check_links_inside(path)
    ome = ome_attributes(attrs)
    meta_file = path / ("zarr.json" if zarr_format == 3 else ".zattrs")
    multiscales = ome.get("multiscales")
    if not multiscales:
        raise ImageError(
            f"{path}: no OME-NGFF image metadata ('multiscales' not found in {meta_file.name}); "
            "is this an OME-Zarr image?"
        )
    if not isinstance(multiscales, list) or not isinstance(multiscales[0], dict):
        raise ImageError(f"{meta_file}: 'multiscales' must be a list of objects")
    multiscale = multiscales[0]
    version = _ngff_version(ome, multiscale)
    if version not in SUPPORTED_VERSIONS:
        raise ImageError(
            f"{meta_file}: NGFF version {version!r} is not supported; "
            f"cellseg1d reads versions {', '.join(SUPPORTED_VERSIONS)}"
        )
    if version == "0.5" and zarr_format != 3:
        raise ImageError(f"{path}: NGFF 0.5 needs zarr v3 (zarr.json), found zarr v2 metadata")
    axes, axes_meta = _check_axes(meta_file, multiscale.get("axes"))
    datasets = multiscale.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise ImageError(f"{meta_file}: multiscales[0].datasets is missing or empty")

    levels: list[Level] = []
    for i, dataset in enumerate(datasets):
        if not isinstance(dataset, dict):
            raise ImageError(f"{meta_file}: datasets[{i}] is not an object")
        ds_path = _safe_dataset_path(path, dataset.get("path"))
        array_dir = path / ds_path
        if array_dir.exists() and not array_dir.is_dir():
            raise ImageError(f"cannot open array {array_dir}: it is a file, where the array's folder belongs")
        for meta_name in ("zarr.json", ".zarray", ".zattrs"):
            check_metadata_size(array_dir / meta_name)  # zarr parses these itself, without limits
        try:
            array = zarr.open_array(store=str(array_dir), mode="r")
        except PermissionError as err:
            raise ImageError(
                f"cannot open array {array_dir}: permission denied on {err.filename or 'its metadata'}; "
                "give the user running cellseg1d read access"
            ) from None
        except RecursionError:
            raise ImageError(f"cannot open array {array_dir}: metadata too deeply nested") from None
        except Exception as err:
            raise ImageError(f"cannot open array {array_dir}: {type(err).__name__}: {err}") from None
        if array.ndim != len(axes):
            raise ImageError(
                f"array {array_dir} has {array.ndim} dimensions but the image declares "
                f"{len(axes)} axes {list(axes)}"
            )
        transforms = dataset.get("coordinateTransformations") or []
        levels.append(Level(ds_path, array, transforms if isinstance(transforms, list) else []))

    base = levels[0].array
    if base.dtype.kind not in "uif":
        raise ImageError(
            f"array {path / levels[0].path}: data type {base.dtype} is not supported; "
            "integer or floating-point pixels are needed"
        )
    if 0 in base.shape:
        raise ImageError(
            f"array {path / levels[0].path} is empty (shape {base.shape}, an axis of length 0): "
            "nothing to segment; it is looked at again when the image changes"
        )
    plane_pixels = base.shape[axes.index("y")] * base.shape[axes.index("x")]
    if plane_pixels > MAX_PLANE_PIXELS:
        raise ImageError(
            f"array {path / levels[0].path}: a y/x plane of {plane_pixels} pixels exceeds the "
            f"{MAX_PLANE_PIXELS}-pixel limit for one plane; check the shape in its metadata "
            "or split the image into smaller fields"
        )
    for level in levels[1:]:
        for axis, n0, n in zip(axes, base.shape, level.array.shape, strict=True):
            if (axis in "tc" and n != n0) or n > n0 or n == 0:
                raise ImageError(
                    f"{path}: multiscale level '{level.path}' has shape {level.array.shape}, which "
                    f"does not fit the full-resolution shape {base.shape} (axis {axis})"
                )

    channel_names: list[str] = []
    omero = ome.get("omero")
    if isinstance(omero, dict) and isinstance(omero.get("channels"), list):
        channel_names = [
            str(ch.get("label", f"ch{i}")) if isinstance(ch, dict) else f"ch{i}"
            for i, ch in enumerate(omero["channels"])
        ]
    name = str(multiscale.get("name") or path.name)
    return OmeImage(path, version, zarr_format, axes, axes_meta, levels, channel_names, name, attrs)
