"""Write OME-NGFF label images: staged under a temporary name, published by rename.

Layout written (NGFF 0.4 on zarr v2 or 0.5 on zarr v3, matching the source image)::

    <base>/labels/                 group; attributes list the label images ("labels": [...])
    <base>/labels/<name>/          multiscale label image, "image-label" metadata
    <base>/labels/<name>/<level>/  one uint32 array per resolution level of the source image

``<base>`` is the image itself (in-place output) or its mirror folder. Label
axes are the image's axes without ``c``. While a job runs, the label image
lives at ``labels/.<name>.partial-<id>``; :meth:`StagedLabels.publish` renames
it into place, so readers see either the previous complete label image or the
new complete one, never a half-written one.
"""

from __future__ import annotations

import colorsys
import errno
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from cellseg1d.errors import ImageError
from cellseg1d.types import check_output_name
from cellseg1d.ngff.reader import OmeImage, load_json, read_group_attributes

LABEL_DTYPE = np.dtype("uint32")
#: Label images with more objects than this get no per-label colour table.
MAX_COLORS = 10_000
PROVENANCE_KEY = "cellseg1d"


def _write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. disk full: leave no temporary file behind
        raise


@contextmanager
def output_errors(path: Path) -> Iterator[None]:
    """Turn "disk full" and "read-only" errors while writing under ``path`` into clear messages.

    The errno is kept (these are storage conditions, so the job is retried), and the
    message names the label image being written and what to do.
    """
    try:
        yield
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            what = "no space left on device (disk full or quota exceeded)"
            todo = "free space on that disk (storage errors are retried up to jobs.max_attempts times)"
        elif err.errno == errno.EROFS:
            what, todo = "read-only file system", "make it writable or use output = \"mirror\""
        else:
            raise
        raise OSError(err.errno, f"{what} while writing the label image {path}: {todo}",
                      err.filename) from err


def label_colors(n_labels: int) -> list[dict[str, Any]]:
    """A fixed, well-spread RGBA colour per label value 1..n (golden-ratio hues)."""
    colors = []
    for value in range(1, min(n_labels, MAX_COLORS) + 1):
        r, g, b = colorsys.hsv_to_rgb((value * 0.618033988749895) % 1.0, 0.75, 1.0)
        colors.append({"label-value": value, "rgba": [int(r * 255), int(g * 255), int(b * 255), 255]})
    return colors


def _drop_channel(values: Sequence[Any], c_index: int | None) -> list[Any]:
    return [v for i, v in enumerate(values) if i != c_index]


def _label_transforms(image: OmeImage, level: int, c_index: int | None) -> list[dict[str, Any]]:
    transforms = []
    for item in image.levels[level].transforms:
        item = dict(item)
        for key in ("scale", "translation"):
            if isinstance(item.get(key), list) and len(item[key]) == len(image.axes):
                item[key] = _drop_channel(item[key], c_index)
        transforms.append(item)
    if not any(t.get("type") == "scale" for t in transforms):
        base, shape = image.levels[0].array.shape, image.levels[level].array.shape
        scale = [b / s for b, s in zip(base, shape, strict=True)]
        transforms.insert(0, {"type": "scale", "scale": _drop_channel(scale, c_index)})
    return transforms


def ensure_group(path: Path, zarr_format: int, ngff_version: str) -> None:
    """Create an (empty-attribute) zarr group at ``path`` unless one is there."""
    if (path / "zarr.json").is_file() or (path / ".zgroup").is_file():
        return
    path.mkdir(parents=True, exist_ok=True)
    if zarr_format == 3:
        _write_json_atomic(
            path / "zarr.json",
            {"zarr_format": 3, "node_type": "group", "attributes": {"ome": {"version": ngff_version}}},
        )
    else:
        _write_json_atomic(path / ".zgroup", {"zarr_format": 2})


def _labels_list(labels_dir: Path, zarr_format: int, ngff_version: str) -> tuple[Path, dict[str, Any], list[Any]]:
    """``(metadata file, its document, the labels list in it)`` of an existing labels group.

    Raises ImageError naming the file when it is unreadable or its ``labels`` is not a list
    (a foreign or damaged labels group), so that nothing is written into it.
    """
    if zarr_format == 3:
        meta = labels_dir / "zarr.json"
        doc = load_json(meta)
        attrs = doc.setdefault("attributes", {})
        ome = attrs.setdefault("ome", {"version": ngff_version}) if isinstance(attrs, dict) else None
        if not isinstance(ome, dict):
            raise ImageError(f"invalid labels group metadata in {meta}: 'attributes.ome' is not an object")
        owner = ome
    else:
        meta = labels_dir / ".zattrs"
        doc = load_json(meta) if meta.is_file() else {}
        owner = doc
    names = owner.setdefault("labels", [])
    if not isinstance(names, list):
        raise ImageError(
            f"invalid labels group metadata in {meta}: 'labels' is {type(names).__name__}, not a list"
        )
    return meta, doc, names


def register_label_name(labels_dir: Path, name: str, zarr_format: int, ngff_version: str) -> None:
    """Add ``name`` to the ``labels`` list of the labels group (once), keeping other entries."""
    ensure_group(labels_dir, zarr_format, ngff_version)
    meta, doc, names = _labels_list(labels_dir, zarr_format, ngff_version)
    if name not in names:
        names.append(name)
        _write_json_atomic(meta, doc)


def cleanup_staging(labels_dir: Path, name: str) -> list[Path]:
    """Remove what crashed attempts left for label image ``name``; return what was removed."""
    removed = []
    if labels_dir.is_dir():
        for entry in labels_dir.iterdir():
            if entry.name.startswith((f".{name}.partial-", f".{name}.replaced-")):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def written_by_cellseg1d(label_path: Path) -> bool:
    """Whether the label image at ``label_path`` carries cellseg1d's provenance attribute."""
    try:
        _, attrs = read_group_attributes(label_path)
    except ImageError:
        return False
    return PROVENANCE_KEY in attrs


@dataclass
class LabelsTarget:
    """Where a label image goes: ``<base>/labels/<name>``, describing ``image``."""

    base: Path
    name: str

    @property
    def labels_dir(self) -> Path:
        return self.base / "labels"

    @property
    def final_path(self) -> Path:
        return self.labels_dir / self.name


class StagedLabels:
    """A label image under construction for one source image.

    Use :meth:`create`, then :meth:`write_plane` for every (t, z) plane, then
    :meth:`finish` and :meth:`publish`; :meth:`discard` on failure.
    """

    def __init__(self, image: OmeImage, target: LabelsTarget, staging: Path) -> None:
        self.image = image
        self.target = target
        self.staging = staging
        #: Whether this job created the ``labels`` group (removed again on failure if empty).
        self.made_labels_group = False
        self.c_index = image.axes.index("c") if "c" in image.axes else None
        self.axes = tuple(a for a in image.axes if a != "c")
        self._levels: list[zarr.Array] = []

    @classmethod
    def create(cls, image: OmeImage, target: LabelsTarget) -> StagedLabels:
        """Make the staging group and one empty array per resolution level of ``image``."""
        check_output_name(target.name)
        for path in (target.base, target.labels_dir, target.final_path):
            if path.is_symlink():
                raise ImageError(
                    f"{path} is a symbolic link; cellseg1d never writes through links. Replace it "
                    "by a folder or choose another segmentation.labels_name."
                )
        if target.labels_dir.exists() and not target.labels_dir.is_dir():
            raise ImageError(
                f"{target.labels_dir} exists but is not a folder, so no labels group can be written "
                "there; move it away (OME-NGFF keeps label images in the 'labels' group)"
            )
        if target.final_path.exists() and not written_by_cellseg1d(target.final_path):
            raise ImageError(
                f"{target.final_path} exists and was not written by cellseg1d; refusing to "
                "overwrite it. Choose another segmentation.labels_name."
            )
        made_labels_group = not target.labels_dir.exists()
        staging = target.labels_dir / f".{target.name}.partial-{uuid.uuid4().hex[:12]}"
        staged = cls(image, target, staging)
        staged.made_labels_group = made_labels_group
        try:
            with output_errors(target.final_path):
                if target.base != image.path:
                    ensure_group(target.base, image.zarr_format, image.ngff_version)
                ensure_group(target.labels_dir, image.zarr_format, image.ngff_version)
                # A damaged labels group must fail the job now, not after publishing the label image.
                _labels_list(target.labels_dir, image.zarr_format, image.ngff_version)
                cleanup_staging(target.labels_dir, target.name)
                staged._create_arrays()
        except BaseException:
            staged.discard()  # e.g. disk full: leave no half-made staging folder or labels group
            raise
        return staged

    def _create_arrays(self) -> None:
        group = zarr.open_group(str(self.staging), mode="w", zarr_format=self.image.zarr_format)
        for level in self.image.levels:
            shape = tuple(_drop_channel(level.array.shape, self.c_index))
            src_chunks = _drop_channel(level.array.chunks, self.c_index)
            chunks = tuple(
                1 if axis in "tz" else max(min(c, n), min(256, n))
                for axis, c, n in zip(self.axes, src_chunks, shape, strict=True)
            )
            kwargs: dict[str, Any] = {}
            if self.image.zarr_format == 3:
                kwargs["dimension_names"] = list(self.axes)
            else:
                kwargs["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
            self._levels.append(
                group.create_array(
                    name=level.path, shape=shape, chunks=chunks, dtype=LABEL_DTYPE, fill_value=0, **kwargs
                )
            )

    def _plane_selection(self, t: int, z: int) -> tuple[Any, ...]:
        return tuple(t if a == "t" else z if a == "z" else slice(None) for a in self.axes)

    def _index_maps(self, level: zarr.Array) -> list[np.ndarray]:
        """Nearest-neighbour index maps from ``level`` back to full resolution, per axis."""
        return [
            np.minimum((np.arange(n) * (n0 / n)).astype(np.int64), n0 - 1)
            for n0, n in zip(self._levels[0].shape, level.shape, strict=True)
        ]

    def _planewise(self, level: zarr.Array) -> bool:
        """Whether ``level`` keeps every (t, z) plane, so it can be written plane by plane."""
        return all(n == n0 for a, n, n0 in zip(self.axes, level.shape, self._levels[0].shape, strict=True)
                   if a in "tz")

    def write_plane(self, t: int, z: int, labels: np.ndarray) -> None:
        """Store the (Y, X) label plane for time point ``t`` and z slice ``z`` (and its downsampled copies)."""
        if self.axes.index("y") > self.axes.index("x"):
            labels = labels.T
        labels = labels.astype(LABEL_DTYPE, copy=False)
        selection = self._plane_selection(t, z)
        # zarr creates missing parent folders: writing after the image was deleted
        # would bring back a folder holding nothing but labels.
        self._check_staging()
        with output_errors(self.target.final_path):
            self._levels[0][selection] = labels
            for level in self._levels[1:]:
                if self._planewise(level):
                    maps = [m for a, m in zip(self.axes, self._index_maps(level), strict=True) if a not in "tz"]
                    level[selection] = labels[maps[0]][:, maps[1]]

    def _check_staging(self) -> None:
        if not self.staging.is_dir():
            raise ImageError(
                f"{self.staging} vanished while the label image was being written: was "
                f"{self.image.path} deleted or moved while being processed? Nothing was published"
            )

    def _build_pyramid(self) -> None:
        """Fill levels that also downsample t or z (3-D pyramids) from full resolution."""
        base = self._levels[0]
        for level in self._levels[1:]:
            if self._planewise(level):
                continue  # written with each plane
            maps = self._index_maps(level)
            t_n = level.shape[self.axes.index("t")] if "t" in self.axes else 1
            z_n = level.shape[self.axes.index("z")] if "z" in self.axes else 1
            for t in range(t_n):
                for z in range(z_n):
                    src = tuple(
                        int(m[t]) if a == "t" else int(m[z]) if a == "z" else m
                        for a, m in zip(self.axes, maps, strict=True)
                    )
                    level[self._plane_selection(t, z)] = base.oindex[src]

    def finish(self, n_objects: int, provenance: dict[str, Any]) -> None:
        """Write lower resolution levels and the NGFF metadata of the staged label image."""
        self._check_staging()
        with output_errors(self.target.final_path):
            self._finish(n_objects, provenance)

    def _finish(self, n_objects: int, provenance: dict[str, Any]) -> None:
        self._build_pyramid()
        image = self.image
        axes_meta = _drop_channel(image.axes_metadata, self.c_index)
        datasets = [
            {"path": lvl.path, "coordinateTransformations": _label_transforms(image, i, self.c_index)}
            for i, lvl in enumerate(image.levels)
        ]
        multiscale: dict[str, Any] = {"name": self.target.name, "axes": axes_meta, "datasets": datasets}
        source = os.path.relpath(image.path, self.target.final_path)
        image_label: dict[str, Any] = {"colors": label_colors(n_objects), "source": {"image": source}}
        attrs: dict[str, Any]
        if image.ngff_version == "0.5":
            attrs = {"ome": {"version": "0.5", "multiscales": [multiscale], "image-label": image_label}}
        else:
            multiscale["version"] = image.ngff_version
            image_label["version"] = image.ngff_version
            attrs = {"multiscales": [multiscale], "image-label": image_label}
        attrs[PROVENANCE_KEY] = provenance
        group = zarr.open_group(str(self.staging), mode="r+", zarr_format=image.zarr_format)
        group.attrs.update(attrs)

    def publish(self) -> Path:
        """Move the staged label image into place (replacing an earlier cellseg1d one)."""
        final = self.target.final_path
        self._check_staging()
        if final.is_symlink() or (final.exists() and not written_by_cellseg1d(final)):
            # Appeared while the job ran: never replace someone else's label image.
            raise ImageError(f"{final} appeared while the job ran and was not written by cellseg1d; "
                             "refusing to overwrite it. Choose another segmentation.labels_name.")
        replaced = None
        if final.exists():
            replaced = final.with_name(f".{self.target.name}.replaced-{uuid.uuid4().hex[:12]}")
            os.rename(final, replaced)
        os.rename(self.staging, final)
        try:
            with output_errors(final):
                register_label_name(
                    self.target.labels_dir, self.target.name, self.image.zarr_format, self.image.ngff_version
                )
        except BaseException:
            # Not listed in the labels group (e.g. disk full): put everything back as it was.
            os.rename(final, self.staging)
            if replaced is not None:
                os.rename(replaced, final)
            raise
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        return final

    def read_plane(self, t: int, z: int) -> np.ndarray:
        """Read back a staged full-resolution (Y, X) label plane (for exports)."""
        plane = np.asarray(self._levels[0][self._plane_selection(t, z)])
        return plane.T if self.axes.index("y") > self.axes.index("x") else plane

    def discard(self) -> None:
        """Remove the staged label image (after a failure), and a labels group this job created."""
        # When one zarr write fails, its sibling writes may still be in flight and land
        # (recreating folders) after the error surfaced: remove until nothing comes back.
        deadline = time.monotonic() + 2.0
        while True:
            shutil.rmtree(self.staging, ignore_errors=True)
            time.sleep(0.05)
            if not self.staging.exists() or time.monotonic() > deadline:
                break
        labels_dir = self.target.labels_dir
        metadata = {"zarr.json", ".zgroup", ".zattrs"}
        if self.made_labels_group and labels_dir.is_dir() and not set(os.listdir(labels_dir)) - metadata:
            shutil.rmtree(labels_dir, ignore_errors=True)
