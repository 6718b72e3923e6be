"""The plugin kit's functions: synthetic images written as a microscope would, and the real pipeline on one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellseg1d.hookspecs import hookimpl


KINDS = ("2d", "zstack", "timelapse", "plate")
#: A tiny SAM-architecture base pretrained on synthetic cells (``scripts/make_tiny_base.py``, about 10 MB):
#: the stand-in base of the tests and of ``cellseg1d demo --sam``. It segments synthetic cells, nothing else.
TINY_SAM_BASE = Path(__file__).with_name("data") / "tiny_sam_cells.safetensors"


@dataclass(frozen=True)
class SyntheticImage:
    """An OME-Zarr image written by :func:`write_synthetic_image` and what it shows."""

    #: The image group (for a plate: its first field, ``A/1/0``).
    path: Path
    #: The folder whose name ends in ``.zarr`` (the image itself, or the plate).
    container: Path
    kind: str
    ngff_version: str
    #: True instance labels of every field, ``(t, z, y, x)``; the same cells in every plane.
    mask: np.ndarray
    channel_names: tuple[str, ...]
    #: Every image group (one, or a plate's fields).
    fields: tuple[Path, ...] = ()
    #: (y, x) pixel size in micrometres as written in the metadata.
    pixel_size: float = 0.65

    @property
    def n_cells(self) -> int:
        """How many distinct cells the image shows."""
        return len(np.unique(self.mask[self.mask > 0]))


def write_synthetic_image(folder: Path, kind: str = "2d", ngff_version: str = "0.5", *, name: str | None = None,
                          size: int = 128, n_cells: int = 12, seed: int = 0, pixel_size: float = 0.65,
                          n_levels: int = 2, attrs: dict[str, Any] | None = None) -> SyntheticImage:
    """Write a synthetic 2-channel (``nuclei``, ``membrane``) image of ``kind`` into ``folder``.

    ``2d``: ``czyx`` with one z plane; ``zstack``: 3 z planes; ``timelapse``:
    ``tczyx`` with 2 time points; ``plate``: a plate with one well and two
    fields. ``attrs`` are merged into the image's attributes last (e.g. a
    completion marker).
    """
    from cellseg1d.testing.synthetic import make_czyx, write_ome_zarr, write_plate

    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: choose one of {KINDS}")
    n_z, n_t = (3 if kind == "zstack" else 1), (2 if kind == "timelapse" else 1)
    data, mask = make_czyx((size, size), n_cells, n_z=n_z, n_t=n_t, seed=seed)
    names = ("nuclei", "membrane")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or f"{kind}-{ngff_version.replace('.', '')}.zarr")
    kwargs: dict[str, Any] = dict(ngff_version=ngff_version, channel_names=list(names), pixel_size=pixel_size,
                                  n_levels=n_levels, attrs=attrs)
    planes = np.broadcast_to(mask, (n_t, n_z, size, size)).copy() if mask.ndim == 2 else mask
    if kind == "plate":
        write_plate(path, {("A", "1", "0"): data[0], ("A", "1", "1"): data[0]}, axes="czyx", **kwargs)
        fields = (path / "A" / "1" / "0", path / "A" / "1" / "1")
        return SyntheticImage(fields[0], path, kind, ngff_version, planes, names, fields, pixel_size)
    if kind == "timelapse":
        write_ome_zarr(path, data, axes="tczyx", **kwargs)
    else:
        write_ome_zarr(path, data[0], axes="czyx", **kwargs)
    return SyntheticImage(path, path, kind, ngff_version, planes, names, (path,), pixel_size)


class FixedSegmenter:
    """A segmenter plugin answering every plane with the same ``(Y, X)`` label image.

    For testing an export against labels of a known shape (holes, pieces,
    cells at the border, an empty plane): ``run_pipeline(image,
    plugins=[FixedSegmenter(labels)], enable=["my-export"])``.
    """

    __name__ = "fixed-segmenter"

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = np.asarray(labels)

    @hookimpl
    def segment(self, plane: np.ndarray, request: Any) -> Any:
        from cellseg1d.types import Segmentation

        return Segmentation(labels=self.labels.copy(), segmenter="fixed")


@dataclass
class PipelineRun:
    """What one pipeline run produced."""

    #: :class:`cellseg1d.pipeline.PipelineResult` (labels path, object count, export records, provenance).
    result: Any
    #: Full-resolution label image, ``(t, z, y, x)``.
    labels: np.ndarray
    labels_path: Path
    #: The image's export folder and the files in it, by name.
    export_dir: Path
    exports: dict[str, Path] = field(default_factory=dict)
    config: Any = None

    @property
    def records(self) -> list[dict[str, Any]]:
        """What the export hooks returned (as stored in the catalog's result row)."""
        return list(self.result.exports)

    @property
    def n_objects(self) -> int:
        """Distinct labels in the label image."""
        return len(np.unique(self.labels[self.labels > 0]))

    def record(self, kind: str) -> dict[str, Any]:
        """The export record whose ``kind`` is ``kind`` (KeyError if none)."""
        for rec in self.records:
            if rec.get("kind") == kind:
                return rec
        raise KeyError(f"no export record of kind {kind!r} in {self.records}")


def run_pipeline(image: Path | SyntheticImage, *, plugins: Sequence[Any] = (), enable: Sequence[str] = (),
                 disable: Sequence[str] = (), settings: dict[str, dict[str, Any]] | None = None,
                 config: dict[str, Any] | None = None, state_dir: Path | None = None) -> PipelineRun:
    """Run the real pipeline on one image and return its outputs.

    ``plugins``: plugin objects or modules registered as they are; ``enable``:
    installed entry-point plugins by name (``plugins.enable``); ``disable``:
    built-ins to switch off; ``settings``: ``plugin_settings`` by plugin name;
    ``config``: any other settings as a nested dict (e.g.
    ``{"segmentation": {"channels": ["nuclei"]}}``). The watched folder is the
    container's parent; labels go into the image (``output = "in_place"``).
    Every plugin's ``configure`` hook runs first, as at daemon start.
    """
    import zarr

    from cellseg1d.config import build_config
    from cellseg1d.ngff.discover import container_of
    from cellseg1d.ngff.reader import open_image
    from cellseg1d.pipeline.runner import Pipeline, exports_dir
    from cellseg1d.plugins import build_plugin_manager

    path = image.path if isinstance(image, SyntheticImage) else Path(image)
    container = image.container if isinstance(image, SyntheticImage) else None
    if container is None:
        container = next((p for p in (path, *path.parents) if p.name.lower().endswith(".zarr")), path)
    root = container.parent
    data: dict[str, Any] = {
        "state_dir": str(state_dir or root / ".cellseg1d-state"),
        "watch": {"roots": [{"path": str(root)}]},
        "plugins": {"enable": list(enable), "disable": list(disable)},
        "plugin_settings": dict(settings or {}),
        **(config or {}),
    }
    cfg = build_config(data, source="cellseg1d.testing.run_pipeline")
    pm = build_plugin_manager(cfg.plugins.enable, cfg.plugins.disable, tuple(plugins))
    pm.hook.configure(config=cfg)
    watch_root = cfg.watch.roots[0]
    resolved = container_of(path.resolve(), watch_root.path, cfg.watch.container_suffixes) or path.resolve()
    result = Pipeline(cfg, pm).run(path.resolve(), watch_root, resolved)
    labels_path = Path(result.labels_path)
    level0 = np.asarray(zarr.open_array(str(labels_path / "0"), mode="r"))
    axes = [a for a in open_image(path).axes if a != "c"]  # the label image's axes
    level0 = level0.reshape([level0.shape[axes.index(a)] if a in axes else 1 for a in "tzyx"])
    out = exports_dir(path.resolve(), resolved, watch_root)
    files = {p.name: p for p in sorted(out.iterdir()) if p.is_file()} if out.is_dir() else {}
    return PipelineRun(result, level0, labels_path, out, files, cfg)


def migrated_catalog(state_dir: Path) -> Any:
    """A migrated SQLite catalog (:class:`cellseg1d.catalog.Catalog`) at ``state_dir/catalog.sqlite``."""
    from cellseg1d.catalog import Catalog

    catalog = Catalog(f"sqlite:///{state_dir / 'catalog.sqlite'}")
    catalog.migrate()
    return catalog
