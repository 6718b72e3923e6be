"""A catalog of really processed images for the dashboard tests (HTTP and browser).

Synthetic OME-Zarr images go through the real pipeline (``cellseg1d.testing.run_pipeline``) and their
results are recorded through the real job queue, as the daemon does: done images (one plate), one that
failed an attempt and waits for its retry, one quarantined by a plugin error, one rejected at readiness,
and one whose files were deleted after it was processed (its thumbnail is an error tile). Two adapter
versions are registered by rows in the catalog (a tiny LoRA file is not needed to show them).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from cellseg1d.catalog import Adapter, Assignment, Catalog, Experiment, Job, utcnow
from cellseg1d.catalog.jobs import ImageFacts, JobQueue, run_key
from cellseg1d.config import Config, build_config
from cellseg1d.ngff.reader import open_image
from cellseg1d.testing import run_pipeline, write_synthetic_image


@dataclass
class DashboardCatalog:
    """What :func:`build_catalog` made: the config, the catalog, and image path -> id."""

    config: Config
    catalog: Catalog
    acquisition: Path
    ids: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # lowest level (height, width)
    objects: dict[str, int] = field(default_factory=dict)
    failed_job: int = 0
    quarantined_job: int = 0


def _facts(path: Path, root: Path, container: Path, experiment: str) -> ImageFacts:
    image = open_image(path)
    return ImageFacts(str(path), str(root), str(container), image.fingerprint, image.ngff_version,
                      "".join(image.axes), "x".join(map(str, image.shape)), str(image.dtype), experiment)


def build_catalog(tmp: Path) -> DashboardCatalog:
    """Images processed by the real pipeline and recorded by the real job queue (a few seconds)."""
    acquisition, state = tmp / "acquisition", tmp / "state"
    acquisition.mkdir(parents=True, exist_ok=True)
    config = build_config({"state_dir": str(state), "watch": {"roots": [{"path": str(acquisition)}]}})
    catalog = Catalog(config.catalog_url)
    catalog.migrate()
    root = config.watch.roots[0].path
    queue = JobQueue(catalog, "test-daemon", max_attempts=3, retry_backoff_seconds=600)
    out = DashboardCatalog(config, catalog, root)
    now = utcnow()
    with catalog.session() as s:  # two versions of an adapter, v2 assigned to "hela"
        for name in ("hela", "nuclei"):
            s.add(Experiment(name=name, created_at=now))
        s.flush()
        v1 = Adapter(name="hela", version=1, sha256="a" * 64, base_model_type="tiny", base_sha256="b" * 64,
                     store_path="/nowhere/hela/v1", meta={"metrics": {"steps": 40}}, created_at=now)
        v2 = Adapter(name="hela", version=2, sha256="c" * 64, base_model_type="tiny", base_sha256="b" * 64,
                     store_path="/nowhere/hela/v2", meta={"metrics": {"steps": 80}}, created_at=now)
        s.add_all([v1, v2])
        s.flush()
        hela = s.query(Experiment).filter_by(name="hela").one()
        s.add(Assignment(experiment_id=hela.id, adapter_id=v1.id, pinned=True,
                         assigned_at=now - timedelta(hours=2), unassigned_at=now - timedelta(hours=1)))
        s.add(Assignment(experiment_id=hela.id, adapter_id=v2.id, pinned=True, assigned_at=now - timedelta(hours=1)))
        adapter_ids = [v1.id, v2.id]

    def process(name: str, kind: str, seed: int, experiment: str, adapter_id: int | None) -> None:
        synthetic = write_synthetic_image(root, kind, name=name, size=256, n_cells=30, seed=seed)
        for path in synthetic.fields:
            run = run_pipeline(path, state_dir=state)
            queue.enqueue(_facts(path, root, synthetic.container, experiment),
                          run_key(open_image(path).fingerprint), adapter_id=adapter_id)
            job = queue.claim()
            assert job is not None and job.image_path == str(path)
            assert queue.complete(job, run.result.catalog_fields(), 0.5 + seed / 10, run.result.export_outcomes)
            image = open_image(path)
            out.sizes[str(path)] = tuple(image.levels[-1].array.shape[-2:])  # type: ignore[assignment]
            out.objects[str(path)] = run.result.object_count

    process("hela-01.ome.zarr", "2d", 1, "hela", adapter_ids[0])
    process("hela-02.ome.zarr", "2d", 2, "hela", adapter_ids[1])
    process("plate-01.ome.zarr", "plate", 3, "nuclei", None)
    process("gone.ome.zarr", "2d", 4, "nuclei", None)
    shutil.rmtree(root / "gone.ome.zarr")  # processed, then deleted: an error tile

    for name, seed, permanent in (("retry.ome.zarr", 5, False), ("broken.ome.zarr", 6, True)):
        synthetic = write_synthetic_image(root, "2d", name=name, size=256, n_cells=30, seed=seed)
        queue.enqueue(_facts(synthetic.path, root, synthetic.container, "nuclei"),
                      run_key(open_image(synthetic.path).fingerprint))
        job = queue.claim()
        assert job is not None
        state_after = queue.fail(job, f"plugin 'measurements' failed in hook 'export': ValueError: <b>bad</b> {name}",
                                 permanent=permanent, plugin="measurements")
        if permanent:
            out.quarantined_job = job.job_id
        else:
            out.failed_job = job.job_id
        assert state_after == ("quarantined" if permanent else "failed")
    queue.record_rejected(ImageFacts(str(root / "bad.ome.zarr"), str(root), str(root / "bad.ome.zarr")),
                          "rejected:bad", "bad.ome.zarr: no OME-NGFF image metadata")
    with catalog.session() as s:
        from sqlalchemy import select

        from cellseg1d.catalog import Image

        out.ids = {path: i for i, path in s.execute(select(Image.id, Image.path)).all()}
        assert s.query(Job).count() == 8, s.query(Job).count()
    return out


def lowest_size(data: DashboardCatalog, name: str) -> tuple[int, int]:
    """(height, width) of the lowest level of the image whose path ends with ``name``."""
    return next(v for k, v in data.sizes.items() if k.endswith(name))


def image_id(data: DashboardCatalog, name: str) -> int:
    """The catalog id of the image whose path ends with ``name``."""
    return next(v for k, v in data.ids.items() if k.endswith(name))


def as_dict(data: DashboardCatalog) -> dict[str, Any]:
    return {"ids": data.ids, "sizes": data.sizes}
