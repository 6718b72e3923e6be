"""Run one image through the hooks: experiment -> segment every plane -> exports -> publish labels.

Planes are segmented through the executor (``[executor]``: in this thread,
or on a Dask cluster), one task per plane, or per block of a plane larger
than ``executor.block_size``; blocks are stitched here (:mod:`cellseg1d.model.stitch`).

The worker passes the experiment and adapter the job was queued with (the
scheduler resolved them); without them (``cellseg1d segment``) the
experiment is resolved here.

Nothing is visible to users until the end: label planes are written to a
staging label group and export files to temporary names; only when every
plane and every export succeeded are they renamed into place. The caller
(the worker) then commits the job in the catalog.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pluggy

from cellseg1d import PIPELINE_VERSION, __version__
from cellseg1d.routing import experiments as experiment_rules
from cellseg1d.config import Config, WatchRoot
from cellseg1d.errors import ImageError, PluginError
from cellseg1d.pipeline.executor import Executor, SegmentTask, make_executor, plane_regions
from cellseg1d.routing.experiments import DEFAULT_EXPERIMENT
from cellseg1d.pipeline.exports import run_exports
from cellseg1d.ngff.labels import LabelsTarget, StagedLabels
from cellseg1d.types import check_output_name
from cellseg1d.ngff.reader import OmeImage, open_image
from cellseg1d.ngff.stats import image_plane_stats
from cellseg1d.plugins import call_hook
from cellseg1d.model.stitch import relabel_sequential as renumber
from cellseg1d.model.stitch import stitch
from cellseg1d.types import AdapterRef, ExportContext, LabelsView

log = logging.getLogger(__name__)
EXPORTS_SUFFIX = ".cellseg1d"


@dataclass
class PipelineResult:
    """What one successful run produced (stored in the catalog's result row)."""

    labels_path: str
    object_count: int
    planes: int
    segmenter: str
    experiment: str
    exports: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    #: The segmenter's ``details`` for the first plane (model versions, parameters).
    segmentation: dict[str, Any] = field(default_factory=dict)
    #: Experiment, adapter, base model, settings and versions (also in the label group's metadata).
    provenance: dict[str, Any] = field(default_factory=dict)
    #: One row per export plugin: plugin, status, seconds, record or error (the catalog's export_outcomes).
    export_outcomes: list[dict[str, Any]] = field(default_factory=list)

    def catalog_fields(self) -> dict[str, Any]:
        """The columns of the catalog's result row."""
        return {
            "provenance": self.provenance,
            "labels_path": self.labels_path,
            "object_count": self.object_count,
            "planes": self.planes,
            "segmenter": self.segmenter,
            "cellseg1d_version": __version__,
            "pipeline_version": PIPELINE_VERSION,
            "exports": {
                "records": self.exports, "experiment": self.experiment,
                "timings": self.timings, "segmentation": self.segmentation,
            },
        }


def output_base(image_path: Path, root: WatchRoot) -> Path:
    """The folder that receives ``labels/`` for an image: the image, or its mirror."""
    if root.output == "mirror":
        assert root.mirror_root is not None
        return root.mirror_root / image_path.relative_to(root.path)
    return image_path


def exports_dir(image_path: Path, container: Path, root: WatchRoot) -> Path:
    """Folder for export files: ``<container>.cellseg1d/<image path inside the container>``."""
    base = container.parent / (container.name + EXPORTS_SUFFIX)
    if root.output == "mirror":
        assert root.mirror_root is not None
        base = root.mirror_root / base.relative_to(root.path)
    return base / image_path.relative_to(container)


def labels_name_for(config: Config, adapter: AdapterRef | None) -> str:
    """The label image name: ``segmentation.labels_name``, with the adapter version when versioned."""
    name = config.segmentation.labels_name
    if adapter is None or not config.segmentation.versioned_labels:
        return name
    return check_output_name(f"{name}-{adapter.name}-v{adapter.version}")


def build_provenance(config: Config, experiment: str, segmenter: str, details: dict[str, Any],
                     channels: tuple[str, ...], fingerprint: str,
                     executor: dict[str, Any] | None = None) -> dict[str, Any]:
    """What produced a label image: experiment, adapter, base model, settings, versions, executor.

    Adapter and base model come from the segmenter's ``details`` (what it really
    used: ``adapter`` = {name, version, sha256}, ``model_type``,
    ``checkpoint_sha256``, ``settings``); None when it used none. ``executor``:
    its kind (and scheduler), the blocks per plane and the worker(s) of each plane.
    """
    settings = details.get("settings") or details.get("params") or {}
    base = None
    if details.get("model_type") is not None:
        base = {"type": details["model_type"], "sha256": details.get("checkpoint_sha256")}
    return {
        "version": __version__, "pipeline_version": PIPELINE_VERSION, "segmenter": segmenter,
        "experiment": experiment, "adapter": details.get("adapter"), "base_model": base,
        "settings": {"segmenter": settings, "channels": list(channels),
                     "labels_name": config.segmentation.labels_name,
                     "versioned_labels": config.segmentation.versioned_labels},
        "channels": list(channels), "source_fingerprint": fingerprint, "executor": executor,
    }


def pixel_size(image: OmeImage) -> tuple[float, float] | None:
    """(y, x) pixel size from the full-resolution scale transform, if declared."""
    for item in image.levels[0].transforms:
        scale = item.get("scale") if isinstance(item, dict) else None
        if isinstance(scale, list) and len(scale) == len(image.axes):
            return float(scale[image.axes.index("y")]), float(scale[image.axes.index("x")])
    return None


def relabel_sequential(labels: np.ndarray, offset: int) -> tuple[np.ndarray, int]:
    """Map the non-zero values of ``labels`` to ``offset+1 .. offset+n``; return (labels, n)."""
    out = renumber(labels)
    n = int(out.max()) if out.size else 0
    if offset and n:
        out[out > 0] += np.uint32(offset)
    return out, n


class Pipeline:
    """Processes images with one plugin manager and config (shared by worker threads)."""

    def __init__(self, config: Config, pm: pluggy.PluginManager, executor: Executor | None = None) -> None:
        self.config = config
        self.pm = pm
        #: Where planes are segmented (``[executor]``; the caller starts and closes it).
        self.executor = executor if executor is not None else make_executor(config, pm)
        if not pm.has_plugin(experiment_rules.PLUGIN_NAME):
            # The config's experiment rules answer after every plugin (trylast).
            pm.register(experiment_rules, name=experiment_rules.PLUGIN_NAME)

    def experiment_for(self, image: OmeImage, root: WatchRoot) -> str:
        """The image's experiment: plugins, then the root's rules, else ``"default"``."""
        name = call_hook(self.pm, "resolve_experiment", image=image, root=root)
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise PluginError("unknown", "resolve_experiment", f"returned {name!r}; expected a non-empty str or None")
        return name.strip() if name else DEFAULT_EXPERIMENT

    def run(
        self,
        image_path: Path,
        root: WatchRoot,
        container: Path,
        should_abort: Callable[[], bool] = lambda: False,
        on_plane: Callable[[int, int], None] | None = None,
        *,
        experiment: str | None = None,
        adapter: AdapterRef | None = None,
        fallback: bool = False,
    ) -> PipelineResult:
        """Segment every plane of the image at ``image_path`` and publish the outputs.

        ``experiment`` and ``adapter`` are those the job was queued with
        (``experiment`` is resolved here when None); ``fallback`` asks model
        segmenters to step aside for the classical one.
        """
        started = time.perf_counter()
        timings = {"read": 0.0, "segment": 0.0, "write": 0.0}
        if not image_path.exists():
            raise ImageError(f"{image_path} no longer exists (deleted or moved before processing)")
        image = open_image(image_path)
        if experiment is None:
            experiment = self.experiment_for(image, root)
        channels = image.channel_indices(self.config.segmentation.channels)
        channel_names = tuple(
            image.channel_names[i] if i < len(image.channel_names) else f"ch{i}" for i in channels
        )
        target = LabelsTarget(output_base(image_path, root), labels_name_for(self.config, adapter))
        staged = StagedLabels.create(image, target)
        context = ExportContext(
            experiment=experiment,
            output_dir=exports_dir(image_path, container, root),
            read_image_plane=lambda t, z: image.read_plane(t, z, range(image.n_channels)),
            config=self.config,
        )
        try:
            segmenters: set[str] = set()
            details: dict[str, Any] = {}
            n_objects = 0
            planes = list(image.planes())
            yx_shape = (image.size("y"), image.size("x"))
            settings = self.config.executor
            regions = plane_regions(yx_shape, settings.block_size, settings.block_overlap)
            fingerprint, pixels = image.fingerprint, pixel_size(image)
            # Blocks of one plane share the plane's intensity statistics (computed here, once per plane);
            # a plane segmented whole gets them from the plane its worker reads.
            stats = {(t, z): image_plane_stats(image, t, z, channels) if len(regions) > 1 else None
                     for t, z in planes}
            tasks = [
                SegmentTask(
                    image_path=image_path, fingerprint=fingerprint, t=t, z=z, channels=tuple(channels),
                    channel_names=channel_names, region=region, plane_shape=yx_shape, experiment=experiment,
                    adapter=adapter, fallback=fallback, pixel_size=pixels, config=self.config,
                    stats=stats[t, z],
                )
                for t, z in planes for region in regions
            ]
            plane_workers: list[dict[str, Any]] = []
            results = self.executor.map(tasks, image, should_abort)
            try:
                for done, (t, z) in enumerate(planes):
                    parts = [next(results) for _ in regions]
                    t1 = time.perf_counter()
                    if len(parts) == 1:
                        labels = np.asarray(parts[0].labels)
                    else:
                        labels = stitch([(r[0], r[1], p.labels) for r, p in zip(regions, parts, strict=True)],
                                        yx_shape, settings.block_overlap)
                    # Object ids are unique across all planes of the image.
                    labels, n = relabel_sequential(labels, n_objects)
                    n_objects += n
                    for part in parts:
                        segmenters.add(part.segmenter)
                    details = details or dict(parts[0].details)
                    t2 = time.perf_counter()
                    staged.write_plane(t, z, labels)
                    t3 = time.perf_counter()
                    timings["read"] += sum(p.read_seconds for p in parts)
                    timings["segment"] += sum(p.segment_seconds for p in parts)
                    timings["stitch"] = timings.get("stitch", 0.0) + (t2 - t1)
                    timings["write"] += t3 - t2
                    plane_workers.append({"t": t, "z": z, "workers": sorted({p.worker for p in parts})})
                    if on_plane:
                        on_plane(done + 1, len(planes))
            finally:
                results.close()  # an error: the tasks still on the cluster are cancelled
            executor = {**self.executor.describe(), "blocks_per_plane": len(regions), "planes": plane_workers}
            if len(regions) > 1:
                executor.update(block_size=settings.block_size, block_overlap=settings.block_overlap)
            segmenter = ",".join(sorted(segmenters))
            t4 = time.perf_counter()
            provenance = build_provenance(self.config, experiment, segmenter, details, channel_names,
                                          fingerprint, executor)
            staged.finish(n_objects, provenance=provenance)
            timings["pyramid"] = time.perf_counter() - t4
            view = LabelsView(staged.read_plane, planes, n_objects)
            t5 = time.perf_counter()
            outcomes = run_exports(self.pm, self.config.plugins.timeout_seconds,
                                   image=image, labels=view, context=context)
            exports = [o.record for o in outcomes if o.record is not None]
            timings["exports"] = time.perf_counter() - t5
            context.commit()
            final = staged.publish()
        except BaseException:
            staged.discard()
            context.discard()
            raise
        timings["total"] = time.perf_counter() - started
        return PipelineResult(
            labels_path=str(final), object_count=n_objects, planes=len(planes),
            segmenter=segmenter, experiment=experiment, exports=exports, timings=timings,
            segmentation=details, provenance=provenance, export_outcomes=[o.as_row() for o in outcomes],
        )
