"""Generators of malformed OME-Zarr containers, one function per kind of bad input.

Every generator has the signature ``gen(folder, version) -> BadInput``: it writes
one container ``<folder>/<kind>-<v>.zarr`` (``v`` is ``04`` for NGFF 0.4 on zarr
v2, ``05`` for NGFF 0.5 on zarr v3) and says what an error about it must say:

* ``culprit``: the name of the file or folder at fault (relative to the
  container), which the error message must contain;
* ``words``: words about the problem, at least one of which the (lower-cased)
  message must contain;
* ``stage``: where the problem surfaces: ``"open"`` (``open_image`` raises),
  ``"list"`` (the container holds no image: ``list_images`` finds none or
  raises), ``"chunks"`` (``missing_chunks`` reports it; the daemon rejects the
  image at readiness), ``"read"`` (only reading pixels fails, in the job) or
  ``"job"`` (the image is fine, but its channels or labels group are not, in the job);
* ``missing``: for ``"chunks"``, the ``(missing, total)`` chunk counts expected.

Every image is segmented with :data:`CONFIG_CHANNELS` (``segmentation.channels``).

:data:`CASES` lists every (kind, version) pair; :data:`PERMISSION_CASES` the
unreadable-file kinds, which only fail where reads can be denied (not for root
with CAP_DAC_OVERRIDE, see :func:`reads_can_be_denied`); :data:`GOOD_CONTROLS`
lists unusual-but-valid inputs that must be processed (float32 pixels, names
with spaces and non-ASCII letters, a link loop that stays inside the image).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numcodecs import GZip
from zarr.codecs import GzipCodec

from cellseg1d.testing.synthetic import make_czyx, write_ome_zarr

SIZE = 64
N_CELLS = 6
#: ``segmentation.channels`` for every run over the corpus (the daemon's ``--channel``).
CONFIG_CHANNELS = ["nuclei"]
CHANNEL_NAMES = ["nuclei", "membrane"]


@dataclass(frozen=True)
class BadInput:
    """A malformed container on disk and what an error about it must say."""

    kind: str
    version: str
    path: Path
    culprit: str
    words: tuple[str, ...]
    stage: str
    missing: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        return self.path.name

    def check_message(self, message: str, where: Path | None = None) -> None:
        """Assert that ``message`` names the culprit (below ``where``, default the container)."""
        base = self.path if where is None else where
        culprit = str(base / self.culprit) if self.culprit else str(base)
        assert culprit in message, f"{self.kind}: message does not name {culprit}: {message}"
        lower = message.lower()
        assert any(w in lower for w in self.words), (
            f"{self.kind}: message says none of {self.words}: {message}"
        )


def container_name(kind: str, version: str) -> str:
    return f"{kind}-{version.replace('.', '')}.zarr"


def _zarr_format(version: str) -> int:
    return 3 if version == "0.5" else 2


def _group_meta(version: str) -> str:
    return "zarr.json" if version == "0.5" else ".zattrs"


def _array_meta(version: str) -> str:
    return "zarr.json" if version == "0.5" else ".zarray"


def _fresh(folder: Path, kind: str, version: str) -> Path:
    path = Path(folder) / container_name(kind, version)
    if path.exists():
        shutil.rmtree(path)
    return path


def good_image(path: Path, version: str, *, dtype: str = "uint16", seed: int = 0,
               chunks: tuple[int, ...] | None = None, channel_names: list[str] | None = None) -> Path:
    """A valid small 2-channel czyx image (the base that most generators then break)."""
    data, _ = make_czyx((SIZE, SIZE), N_CELLS, seed=seed)
    data = data[0]
    if dtype != "uint16":
        data = (data.astype(np.float64) / 4000.0).astype(dtype)
    return write_ome_zarr(path, data, axes="czyx", ngff_version=version, chunks=chunks,
                          channel_names=channel_names or CHANNEL_NAMES)


def raw_image(path: Path, version: str, arrays: list[np.ndarray], axes: list[Any], *,
              dataset_paths: list[str] | None = None, ome_version: str | None = None,
              compressors: Any = "auto") -> Path:
    """Write NGFF metadata and arrays exactly as given (no validation at all)."""
    zarr_format = _zarr_format(version)
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    names = [str(i) for i in range(len(arrays))]
    for name, data in zip(names, arrays, strict=True):
        kwargs: dict[str, Any] = {"compressors": compressors}
        if zarr_format == 2:
            kwargs["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
        arr = group.create_array(
            name, shape=data.shape, chunks=tuple(max(1, min(32, n)) for n in data.shape) or (1,),
            dtype=data.dtype, fill_value=np.zeros((), data.dtype).item(), **kwargs,
        )
        if data.size:
            arr[...] = data
    paths = dataset_paths or names
    multiscale: dict[str, Any] = {
        "name": path.name,
        "axes": [{"name": a} if isinstance(a, str) else a for a in axes],
        "datasets": [{"path": p, "coordinateTransformations": [
            {"type": "scale", "scale": [1.0] * len(axes)}]} for p in paths],
    }
    v = ome_version or version
    ome: dict[str, Any] = {"multiscales": [multiscale]}
    names = [a if isinstance(a, str) else a.get("name") for a in axes]
    if "c" in names:  # channel names, so that CONFIG_CHANNELS resolves
        n_channels = arrays[0].shape[names.index("c")]
        ome["omero"] = {"channels": [{"label": n} for n in (CHANNEL_NAMES + ["extra"] * n_channels)[:n_channels]]}
    if zarr_format == 3:
        group.attrs.update({"ome": {"version": v, **ome}})
    else:
        multiscale["version"] = v
        group.attrs.update(ome)
    return path


def _planes(n: int = 2, dtype: Any = np.uint16) -> np.ndarray:
    data, _ = make_czyx((SIZE, SIZE), N_CELLS)
    return data[0, :n, 0].astype(dtype)  # (c, y, x)


def _chunk_files(array_dir: Path) -> list[Path]:
    meta = {"zarr.json", ".zarray", ".zattrs"}
    return sorted(p for p in array_dir.rglob("*") if p.is_file() and p.name not in meta)


# --------------------------------------------------------------------------
# The kinds
# --------------------------------------------------------------------------


def no_ome(folder: Path, version: str) -> BadInput:
    """A zarr group with an array and attributes, but no OME metadata at all."""
    path = _fresh(folder, "no_ome", version)
    group = zarr.open_group(str(path), mode="w", zarr_format=_zarr_format(version))
    group.attrs.update({"instrument": "scope-3", "note": "plain zarr, not OME"})
    group.create_array("data", shape=(SIZE, SIZE), chunks=(32, 32), dtype="uint16", fill_value=0)[...] = 1
    return BadInput("no_ome", version, path, "", ("no ome-ngff", "not an ome", "no group with 'multiscales'"),
                    "list")


def invalid_json(folder: Path, version: str) -> BadInput:
    """The group metadata file (zarr.json or .zattrs) is not valid JSON."""
    path = good_image(_fresh(folder, "invalid_json", version), version)
    meta = path / _group_meta(version)
    text = meta.read_text()
    meta.write_text(text.replace("{", "{,", 1))  # a stray comma: what a hand edit leaves
    return BadInput("invalid_json", version, path, meta.name, ("invalid json",), "open")


def truncated_metadata(folder: Path, version: str) -> BadInput:
    """The group metadata file was cut in half (interrupted copy)."""
    path = good_image(_fresh(folder, "truncated_metadata", version), version)
    meta = path / _group_meta(version)
    raw = meta.read_bytes()
    meta.write_bytes(raw[: len(raw) // 2])
    return BadInput("truncated_metadata", version, path, meta.name, ("invalid json",), "open")


def invalid_array_json(folder: Path, version: str) -> BadInput:
    """The metadata of the full-resolution array (0/zarr.json or 0/.zarray) is garbage."""
    path = good_image(_fresh(folder, "invalid_array_json", version), version)
    meta = path / "0" / _array_meta(version)
    meta.write_text("{ this is not json")
    return BadInput("invalid_array_json", version, path, "0", ("cannot open array",), "open")


def missing_chunks(folder: Path, version: str) -> BadInput:
    """Some level-0 chunk files were deleted after writing (truncated copy)."""
    path = good_image(_fresh(folder, "missing_chunks", version), version, chunks=(1, 1, 32, 32))
    chunks = _chunk_files(path / "0")
    assert len(chunks) == 8, chunks
    for chunk in chunks[1::3]:
        chunk.unlink()
    return BadInput("missing_chunks", version, path, "0", ("missing",), "chunks", (3, 8))


def corrupt_chunk(folder: Path, version: str) -> BadInput:
    """A level-0 chunk of channel 0 overwritten with random bytes (noticed only when read)."""
    path = good_image(_fresh(folder, "corrupt_chunk", version), version, chunks=(1, 1, 32, 32))
    chunk = _chunk_files(path / "0")[0]
    chunk.write_bytes(np.random.default_rng(1).bytes(max(64, chunk.stat().st_size)))
    return BadInput("corrupt_chunk", version, path, "0", ("corrupt",), "read")


def corrupt_chunk_gzip(folder: Path, version: str) -> BadInput:
    """Like corrupt_chunk, with gzip compression: gzip reports bad bytes as an OSError subclass."""
    path = _fresh(folder, "corrupt_chunk_gzip", version)
    compressors = [GZip()] if version == "0.4" else [GzipCodec()]
    raw_image(path, version, [_planes()], ["c", "y", "x"], compressors=compressors)
    chunk = _chunk_files(path / "0")[0]
    chunk.write_bytes(np.random.default_rng(2).bytes(max(64, chunk.stat().st_size)))
    return BadInput("corrupt_chunk_gzip", version, path, "0", ("corrupt",), "read")


def truncated_chunk(folder: Path, version: str) -> BadInput:
    """A level-0 chunk file cut in half (interrupted copy).

    Only written for NGFF 0.5: zstd (the zarr v3 default) detects it. A truncated
    blosc chunk (the zarr v2 default) is read past its end by numcodecs' Blosc
    decoder (zarr-developers/numcodecs#228): the outcome depends on the memory
    after the buffer (usually an error, sometimes wrong pixels), so it is not a
    reliable test case, and not a safe one.
    """
    path = good_image(_fresh(folder, "truncated_chunk", version), version, chunks=(1, 1, 32, 32))
    chunk = _chunk_files(path / "0")[0]
    raw = chunk.read_bytes()
    chunk.write_bytes(raw[: len(raw) // 2])
    return BadInput("truncated_chunk", version, path, "0", ("corrupt", "truncated"), "read")


def bad_labels_group(folder: Path, version: str) -> BadInput:
    """A valid image whose existing labels group has damaged metadata (seen only by the job)."""
    path = good_image(_fresh(folder, "bad_labels_group", version), version)
    labels = path / "labels"
    labels.mkdir()
    if version == "0.5":
        meta = labels / "zarr.json"
        meta.write_text('{"zarr_format": 3, "node_type": "group", "attributes": {"ome": {"labels": [')
    else:
        (labels / ".zgroup").write_text('{"zarr_format": 2}')
        meta = labels / ".zattrs"
        meta.write_text('{"labels": "manual"}')  # valid JSON, but not a list
    return BadInput("bad_labels_group", version, path, f"labels/{meta.name}", ("invalid",), "job")


def dtype_bool(folder: Path, version: str) -> BadInput:
    """Boolean pixels (a mask stored as an image)."""
    path = _fresh(folder, "dtype_bool", version)
    raw_image(path, version, [_planes() > 1000], ["c", "y", "x"])
    return BadInput("dtype_bool", version, path, "0", ("not supported",), "open")


def dtype_complex64(folder: Path, version: str) -> BadInput:
    """complex64 pixels (e.g. a Fourier transform)."""
    path = _fresh(folder, "dtype_complex64", version)
    raw_image(path, version, [_planes(dtype=np.complex64)], ["c", "y", "x"])
    return BadInput("dtype_complex64", version, path, "0", ("not supported",), "open")


def axes_no_yx(folder: Path, version: str) -> BadInput:
    """Axes t, c, z: no y/x plane to segment."""
    path = _fresh(folder, "axes_no_yx", version)
    raw_image(path, version, [np.ones((2, 2, 8), np.uint16)], ["t", "c", "z"])
    return BadInput("axes_no_yx", version, path, _group_meta(version), ("lack",), "open")


def axes_unknown(folder: Path, version: str) -> BadInput:
    """An axis named "q" (not one of t, c, z, y, x)."""
    path = _fresh(folder, "axes_unknown", version)
    raw_image(path, version, [_planes()], ["q", "y", "x"])
    return BadInput("axes_unknown", version, path, _group_meta(version), ("unsupported axes",), "open")


def empty_array(folder: Path, version: str) -> BadInput:
    """A zero-sized axis: shape (2, 0, 64, 64)."""
    path = _fresh(folder, "empty_array", version)
    raw_image(path, version, [np.zeros((2, 0, SIZE, SIZE), np.uint16)], ["c", "z", "y", "x"])
    return BadInput("empty_array", version, path, "0", ("empty",), "open")


def unknown_version(folder: Path, version: str) -> BadInput:
    """NGFF version "0.9" (from the future)."""
    path = _fresh(folder, "unknown_version", version)
    raw_image(path, version, [_planes()], ["c", "y", "x"], ome_version="0.9")
    return BadInput("unknown_version", version, path, _group_meta(version), ("not supported",), "open")


def one_d(folder: Path, version: str) -> BadInput:
    """A 1-D array with a single axis "x"."""
    path = _fresh(folder, "one_d", version)
    raw_image(path, version, [np.arange(SIZE, dtype=np.uint16)], ["x"])
    return BadInput("one_d", version, path, _group_meta(version), ("lack",), "open")


def dotdot_path(folder: Path, version: str) -> BadInput:
    """A dataset path with ".." that leaves the image (an array does exist at the target)."""
    path = _fresh(folder, "dotdot_path", version)
    raw_image(path, version, [_planes()], ["c", "y", "x"], dataset_paths=["0/../../" + path.name + "/0"])
    return BadInput("dotdot_path", version, path, "", ("dataset path", "not a relative path"), "open")


def levels_ndim(folder: Path, version: str) -> BadInput:
    """Two multiscale levels of different dimensionality (level 1 lost its c axis)."""
    path = _fresh(folder, "levels_ndim", version)
    planes = _planes()
    raw_image(path, version, [planes, planes[0, ::2, ::2]], ["c", "y", "x"])
    return BadInput("levels_ndim", version, path, "1", ("dimensions",), "open")


def v05_on_zarr_v2(folder: Path, version: str) -> BadInput:
    """NGFF 0.5 metadata written as zarr v2 (.zattrs); 0.5 requires zarr v3."""
    path = _fresh(folder, "v05_on_zarr_v2", "0.4")
    raw_image(path, "0.4", [_planes()], ["c", "y", "x"], ome_version="0.5")
    return BadInput("v05_on_zarr_v2", "0.4", path, "", ("needs zarr v3",), "open")


def six_d(folder: Path, version: str) -> BadInput:
    """A 6-D array: t, c, z, y, x and an extra "angle" axis (light-sheet views)."""
    path = _fresh(folder, "six_d", version)
    raw_image(path, version, [np.ones((1, 2, 1, 2, 16, 16), np.uint16)], ["t", "c", "z", "angle", "y", "x"])
    return BadInput("six_d", version, path, _group_meta(version), ("unsupported axes",), "open")


def empty_yx(folder: Path, version: str) -> BadInput:
    """A zero-sized plane axis: shape (2, 64, 0)."""
    path = _fresh(folder, "empty_yx", version)
    raw_image(path, version, [np.zeros((2, SIZE, 0), np.uint16)], ["c", "y", "x"])
    return BadInput("empty_yx", version, path, "0", ("empty",), "open")


HUGE_T = 10**9


def huge_shape(folder: Path, version: str) -> BadInput:
    """A time-lapse declaring a billion time points of which only the first was written.

    Pre-allocating the whole shape is what open-ended acquisitions do; the image
    counts as still acquiring, then as truncated: it must never be allocated or
    have its declared chunks enumerated one by one.
    """
    path = _fresh(folder, "huge_shape", version)
    zarr_format = _zarr_format(version)
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    kwargs: dict[str, Any] = {"chunk_key_encoding": {"name": "v2", "separator": "/"}} if zarr_format == 2 else {}
    arr = group.create_array("0", shape=(HUGE_T, 2, SIZE, SIZE), chunks=(1, 1, 32, 32), dtype="uint16",
                             fill_value=0, **kwargs)
    arr[0] = _planes()
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"},
            {"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    multiscale = {"name": path.name, "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0] * 4}]}]}
    omero = {"channels": [{"label": n} for n in CHANNEL_NAMES]}
    if zarr_format == 3:
        group.attrs.update({"ome": {"version": version, "multiscales": [multiscale], "omero": omero}})
    else:
        group.attrs.update({"multiscales": [{**multiscale, "version": version}], "omero": omero})
    total = HUGE_T * 2 * 4
    return BadInput("huge_shape", version, path, "0", ("missing",), "chunks", (total - 8, total))


def huge_plane(folder: Path, version: str) -> BadInput:
    """A declared 2^20 x 2^20 plane (one chunk written): far too large to read as one plane."""
    path = _fresh(folder, "huge_plane", version)
    zarr_format = _zarr_format(version)
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    kwargs: dict[str, Any] = {"chunk_key_encoding": {"name": "v2", "separator": "/"}} if zarr_format == 2 else {}
    arr = group.create_array("0", shape=(1, 2**20, 2**20), chunks=(1, 256, 256), dtype="uint8",
                             fill_value=0, **kwargs)
    arr[0, :256, :256] = 7
    multiscale = {"name": path.name, "axes": [{"name": a} for a in "cyx"], "datasets": [{"path": "0"}]}
    if zarr_format == 3:
        group.attrs.update({"ome": {"version": version, "multiscales": [multiscale]}})
    else:
        group.attrs.update({"multiscales": [{**multiscale, "version": version}]})
    return BadInput("huge_plane", version, path, "0", ("exceeds",), "open")


def channel_missing(folder: Path, version: str) -> BadInput:
    """Channels "DAPI" and "GFP": the configured channel ("nuclei") is not in the image."""
    path = good_image(_fresh(folder, "channel_missing", version), version, channel_names=["DAPI", "GFP"])
    return BadInput("channel_missing", version, path, "", ("no channel named 'nuclei'",), "job")


def levels_shape(folder: Path, version: str) -> BadInput:
    """Level 1 has 3 channels and a larger plane than level 0 (levels from different images)."""
    path = _fresh(folder, "levels_shape", version)
    planes = _planes()
    bigger = np.zeros((3, SIZE * 2, SIZE * 2), np.uint16)
    raw_image(path, version, [planes, bigger], ["c", "y", "x"])
    return BadInput("levels_shape", version, path, "", ("does not fit",), "open")


def foreign_label_image(folder: Path, version: str) -> BadInput:
    """A valid image whose labels group holds a label image named like ours, written by another tool."""
    path = good_image(_fresh(folder, "foreign_label_image", version), version)
    labels = zarr.open_group(str(path / "labels"), mode="w", zarr_format=_zarr_format(version))
    foreign = labels.create_group("cellseg1d")
    kwargs: dict[str, Any] = {"chunk_key_encoding": {"name": "v2", "separator": "/"}} if version == "0.4" else {}
    foreign.create_array("0", shape=(1, SIZE, SIZE), chunks=(1, SIZE, SIZE), dtype="uint8",
                         fill_value=0, **kwargs)[...] = 3
    meta = {"multiscales": [{"axes": [{"name": a} for a in "zyx"], "datasets": [{"path": "0"}]}],
            "image-label": {"source": {"image": "../../"}}}
    if version == "0.5":
        foreign.attrs["ome"] = {"version": "0.5", **meta}
        labels.attrs["ome"] = {"version": "0.5", "labels": ["cellseg1d"]}
    else:
        meta["multiscales"][0]["version"] = "0.4"
        foreign.attrs.update(meta)
        labels.attrs["labels"] = ["cellseg1d"]
    return BadInput("foreign_label_image", version, path, "labels/cellseg1d", ("not written by cellseg1d",), "job")


def labels_is_file(folder: Path, version: str) -> BadInput:
    """A plain file named "labels" where the labels group belongs."""
    path = good_image(_fresh(folder, "labels_is_file", version), version)
    (path / "labels").write_text("segmentation notes, not a zarr group\n")
    return BadInput("labels_is_file", version, path, "labels", ("not a folder",), "job")


def _outside(folder: Path) -> Path:
    """A folder beside the containers, outside every image (and outside the root for moved ones)."""
    out = Path(folder) / "outside-data"
    out.mkdir(exist_ok=True)
    return out


def link_out_chunk(folder: Path, version: str) -> BadInput:
    """A level-0 chunk that is a symbolic link to a file outside the image."""
    path = good_image(_fresh(folder, "link_out_chunk", version), version, chunks=(1, 1, 32, 32))
    chunk = _chunk_files(path / "0")[0]
    secret = _outside(folder) / f"secret-{path.stem}.bin"
    secret.write_bytes(chunk.read_bytes())
    chunk.unlink()
    os.symlink(secret, chunk)
    return BadInput("link_out_chunk", version, path, str(chunk.relative_to(path)), ("points outside",), "open")


def link_out_array(folder: Path, version: str) -> BadInput:
    """The full-resolution array folder "0" is a symbolic link to an array outside the image."""
    path = good_image(_fresh(folder, "link_out_array", version), version)
    target = _outside(folder) / f"array-{path.stem}"
    if target.exists():
        shutil.rmtree(target)
    shutil.move(str(path / "0"), target)
    os.symlink(target, path / "0")
    return BadInput("link_out_array", version, path, "0", ("points outside",), "open")


def link_out_labels(folder: Path, version: str) -> BadInput:
    """The image's "labels" is a symbolic link to a folder outside: labels must not be written there."""
    path = good_image(_fresh(folder, "link_out_labels", version), version)
    target = _outside(folder) / f"labels-{path.stem}"
    target.mkdir(exist_ok=True)
    os.symlink(target, path / "labels")
    return BadInput("link_out_labels", version, path, "labels", ("points outside",), "open")


def symlink_loop(folder: Path, version: str) -> BadInput:
    """A symbolic link pointing to itself inside the array folder (and a harmless "up -> .." loop)."""
    path = good_image(_fresh(folder, "symlink_loop", version), version)
    os.symlink("..", path / "0" / "up")
    os.symlink("self", path / "0" / "self")
    return BadInput("symlink_loop", version, path, "0/self", ("loop",), "open")


def unreadable_metadata(folder: Path, version: str) -> BadInput:
    """The group metadata file is chmod 000 (a writer with a restrictive umask)."""
    path = good_image(_fresh(folder, "unreadable_metadata", version), version)
    os.chmod(path / _group_meta(version), 0)
    return BadInput("unreadable_metadata", version, path, _group_meta(version), ("permission denied",), "open")


def unreadable_chunk(folder: Path, version: str) -> BadInput:
    """A level-0 chunk of channel 0 is chmod 000."""
    path = good_image(_fresh(folder, "unreadable_chunk", version), version, chunks=(1, 1, 32, 32))
    os.chmod(_chunk_files(path / "0")[0], 0)
    return BadInput("unreadable_chunk", version, path, "0", ("permission denied",), "read")


def _group_meta_with(path: Path, version: str, attributes_json: str) -> Path:
    """Rewrite the image's group metadata with ``attributes_json`` as its attributes (raw text)."""
    meta = path / _group_meta(version)
    if version == "0.5":
        meta.write_text('{"zarr_format": 3, "node_type": "group", "attributes": ' + attributes_json + "}")
    else:
        meta.write_text(attributes_json)
    return meta


def deep_json(folder: Path, version: str) -> BadInput:
    """Group metadata nested 100,000 levels deep: Python's JSON parser raises RecursionError on it."""
    path = good_image(_fresh(folder, "deep_json", version), version)
    depth = 100_000
    meta = _group_meta_with(path, version, '{"x": ' + "[" * depth + "]" * depth + "}")
    return BadInput("deep_json", version, path, meta.name, ("too deeply nested",), "open")


def deep_json_parses(folder: Path, version: str) -> BadInput:
    """Group metadata nested 300 levels deep: parses, but deep enough to break code that walks it."""
    path = good_image(_fresh(folder, "deep_json_parses", version), version)
    depth = 300
    meta = _group_meta_with(path, version, '{"x": ' + '{"y": ' * depth + "1" + "}" * depth + "}")
    return BadInput("deep_json_parses", version, path, meta.name, ("too deeply nested",), "open")


def huge_metadata(folder: Path, version: str) -> BadInput:
    """Group metadata of 17 MiB (a writer that dumped a whole log into the attributes)."""
    path = good_image(_fresh(folder, "huge_metadata", version), version)
    meta = _group_meta_with(path, version, '{"log": "' + "x" * (17 << 20) + '"}')
    return BadInput("huge_metadata", version, path, meta.name, ("too large",), "open")


def bigint_json(folder: Path, version: str) -> BadInput:
    """An integer of 10,000 digits: Python refuses to convert it (ValueError, not a JSON error)."""
    path = good_image(_fresh(folder, "bigint_json", version), version)
    meta = _group_meta_with(path, version, '{"n": ' + "9" * 10_000 + "}")
    return BadInput("bigint_json", version, path, meta.name, ("invalid json",), "open")


def metadata_is_folder(folder: Path, version: str) -> BadInput:
    """The group metadata file was replaced by a folder of the same name."""
    path = good_image(_fresh(folder, "metadata_is_folder", version), version)
    meta = path / _group_meta(version)
    meta.unlink()
    meta.mkdir()
    (meta / "stray").write_text("x")
    return BadInput("metadata_is_folder", version, path, meta.name, ("is a folder",), "open")


def array_is_file(folder: Path, version: str) -> BadInput:
    """The full-resolution array's folder was replaced by a file of the same name."""
    path = good_image(_fresh(folder, "array_is_file", version), version)
    shutil.rmtree(path / "0")
    (path / "0").write_bytes(b"not an array")
    return BadInput("array_is_file", version, path, "0", ("cannot open array",), "open")


def chunk_is_folder(folder: Path, version: str) -> BadInput:
    """A chunk file of the full-resolution array was replaced by a folder: it counts as a missing chunk."""
    path = good_image(_fresh(folder, "chunk_is_folder", version), version, chunks=(1, 1, 32, 32))
    chunk = _chunk_files(path / "0")[0]
    chunk.unlink()
    chunk.mkdir()
    (chunk / "stray").write_bytes(b"x")
    return BadInput("chunk_is_folder", version, path, "0", ("missing",), "chunks", (1, 8))


KINDS: dict[str, Callable[[Path, str], BadInput]] = {
    f.__name__: f
    for f in (
        no_ome, invalid_json, truncated_metadata, invalid_array_json, missing_chunks, corrupt_chunk,
        corrupt_chunk_gzip, truncated_chunk, bad_labels_group, dtype_bool, dtype_complex64,
        axes_no_yx, axes_unknown, empty_array, unknown_version, one_d,
        dotdot_path, levels_ndim, v05_on_zarr_v2,
        six_d, empty_yx, huge_shape, huge_plane, channel_missing, levels_shape, foreign_label_image,
        labels_is_file, link_out_chunk, link_out_array, link_out_labels, symlink_loop,
        unreadable_metadata, unreadable_chunk,
        deep_json, deep_json_parses, huge_metadata, bigint_json, metadata_is_folder, array_is_file,
        chunk_is_folder,
    )
}

#: Kinds that are bad only where file permissions stop reads (see reads_can_be_denied).
PERMISSION_KINDS = ("unreadable_metadata", "unreadable_chunk")

#: Kinds written in one version only: v05_on_zarr_v2 is about zarr v2; a truncated
#: chunk is detected with zstd (v3) only (see truncated_chunk).
_ONLY = {"v05_on_zarr_v2": ("0.4",), "truncated_chunk": ("0.5",)}

#: Every (kind, version) case, but the permission ones.
CASES: list[tuple[str, str]] = [
    (kind, version) for kind in KINDS if kind not in PERMISSION_KINDS
    for version in _ONLY.get(kind, ("0.4", "0.5"))
]
PERMISSION_CASES: list[tuple[str, str]] = [(k, v) for k in PERMISSION_KINDS for v in ("0.4", "0.5")]


def reads_can_be_denied() -> bool:
    """Whether a chmod 000 file is unreadable to this process (not so for root with CAP_DAC_OVERRIDE)."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe"
        probe.write_bytes(b"x")
        os.chmod(probe, 0)
        try:
            probe.read_bytes()
        except PermissionError:
            return True
        return False


def float32_image(folder: Path, version: str) -> Path:
    """Positive control: float32 pixels (0..1) must be processed like integers."""
    return good_image(Path(folder) / container_name("float32", version), version, dtype="float32")


#: A container name with spaces, non-ASCII letters and shell-special characters.
UNICODE_NAME = "Probe Ü 細胞 #1 (Kopie) é & 'x'"


def unicode_image(folder: Path, version: str) -> Path:
    """Positive control: a container named with spaces and non-ASCII letters is processed normally."""
    return good_image(Path(folder) / f"{UNICODE_NAME} {version}.zarr", version, seed=3)


def inner_loop_image(folder: Path, version: str) -> Path:
    """Positive control: a link loop that stays inside the image ("0/up -> ..") is not followed, no harm."""
    path = good_image(Path(folder) / container_name("inner_loop", version), version, seed=4)
    os.symlink("..", path / "0" / "up")
    return path


GOOD_CONTROLS: dict[str, Callable[[Path, str], Path]] = {
    "float32": float32_image, "unicode": unicode_image, "inner_loop": inner_loop_image,
}


def write_all(folder: Path, cases: list[tuple[str, str]] | None = None) -> list[BadInput]:
    """Write every case (or the given ones) into ``folder``."""
    return [KINDS[kind](folder, version) for kind, version in (cases or CASES)]

