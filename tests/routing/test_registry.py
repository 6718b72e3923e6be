"""The adapter registry on a real SQLite catalog and store: versions, checks, assignments, held jobs, reprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from cellseg1d.catalog import Assignment, Catalog, Job, JobState
from cellseg1d.catalog.db import alembic_config
from cellseg1d.cli.reprocess import reprocess
from cellseg1d.config import build_config
from cellseg1d.catalog.jobs import ImageFacts, JobQueue, run_key
from cellseg1d.model.adapters import WEIGHTS_FILE, AdapterMetadata, save_adapter
from cellseg1d.model.lora import apply_lora
from cellseg1d.model.sam import build_sam
from cellseg1d.routing.registry import BaseModel, Registry, RegistryError, parse_ref, route_for, sha256_of
from tests.helpers import REPO
from tests.model.test_lora import randomize_lora

BASE = BaseModel("tiny", "b" * 64)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def registry(catalog: Catalog, tmp_path: Path) -> Registry:
    return Registry(catalog, tmp_path / "store", BASE)


@pytest.fixture
def make_adapter(tmp_path: Path):
    """Factory: an adapter folder with random LoRA weights on a tiny base of sha256 ``base_sha``."""

    def _make(name: str, seed: int, base_sha: str = BASE.sha256, model_type: str = "tiny") -> Path:
        torch.manual_seed(0)
        model = apply_lora(build_sam("tiny", 64))
        randomize_lora(model, seed=seed)
        meta = AdapterMetadata(name, "tiny", base_sha)
        directory = save_adapter(model, tmp_path / "made" / f"{name}-{seed}", meta)
        if model_type != "tiny":  # as if trained on another architecture
            data = json.loads((directory / "adapter.json").read_text())
            data["base_model_type"] = model_type
            (directory / "adapter.json").write_text(json.dumps(data))
        return directory

    return _make


def store_entries(registry: Registry) -> list[str]:
    if not registry.store.exists():
        return []
    return sorted(str(p.relative_to(registry.store)) for p in registry.store.rglob("*"))


def test_add_copies_into_the_store_with_versions_and_checksums(registry: Registry, make_adapter) -> None:
    first = registry.add(make_adapter("hela", seed=1))
    second = registry.add(make_adapter("hela", seed=2))
    other = registry.add(make_adapter("hela", seed=3), name="u2os")
    assert [first.label, second.label, other.label] == ["hela@v1", "hela@v2", "u2os@v1"]
    assert Path(second.store_path) == registry.store / "hela" / "v2"
    assert sha256_of(Path(second.store_path) / WEIGHTS_FILE) == second.sha256
    assert second.base_sha256 == BASE.sha256 and second.meta["name"] == "hela"
    assert not [e for e in store_entries(registry) if "/." in e or e.startswith(".")]  # no temporary folder left
    with pytest.raises(RegistryError, match=r"already registered as hela@v1"):
        registry.add(make_adapter("hela", seed=1))
    assert registry.get("hela").version == 2 and registry.get("hela", 1).sha256 == first.sha256
    assert [a["adapter"] for a in registry.list()] == ["hela@v1", "hela@v2", "u2os@v1"]
    with pytest.raises(RegistryError, match=r"no registered adapter hela@v7 \(registered: hela@v1, hela@v2"):
        registry.get("hela", 7)
    with pytest.raises(RegistryError, match="invalid adapter name"):
        registry.add(make_adapter("hela", seed=4), name="../evil")


def test_mismatched_or_corrupted_adapters_are_refused(registry: Registry, make_adapter) -> None:
    foreign = make_adapter("hela", seed=1, base_sha="c" * 64)
    with pytest.raises(RegistryError) as caught:
        registry.add(foreign)
    message = str(caught.value)
    assert str(foreign) in message and "c" * 64 in message and BASE.sha256 in message and "sam.checkpoint" in message
    with pytest.raises(RegistryError, match=r"trained on a vit_b SAM but the daemon's base model is a tiny"):
        registry.add(make_adapter("hela", seed=2, model_type="vit_b"))
    corrupted = make_adapter("hela", seed=3)
    data = bytearray((corrupted / WEIGHTS_FILE).read_bytes())
    data[-10] ^= 0xFF
    (corrupted / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(RegistryError, match=r"does not match its metadata .*Retrain the adapter or restore"):
        registry.add(corrupted)
    assert registry.list() == [] and store_entries(registry) == []
    # a registered version whose store copy was modified is not assigned
    good = registry.add(make_adapter("hela", seed=4))
    (Path(good.store_path) / WEIGHTS_FILE).write_bytes(b"tampered")
    with pytest.raises(RegistryError, match=r"missing or were modified"):
        registry.assign("exp", "hela")


def enqueue_held(catalog: Catalog, n: int, experiment: str) -> int:
    facts = ImageFacts(f"/acq/{experiment}{n}.zarr", "/acq", f"/acq/{experiment}{n}.zarr", f"fp{n}",
                       experiment=experiment)
    job = JobQueue(catalog, "t").enqueue(facts, run_key(f"fp{n}", "held"), held=True)
    assert job is not None
    return job


def test_assign_pins_keeps_history_and_releases_held_jobs(registry: Registry, catalog: Catalog,
                                                          make_adapter) -> None:
    v1 = registry.add(make_adapter("hela", seed=1))
    v2 = registry.add(make_adapter("hela", seed=2))
    held_hela = [enqueue_held(catalog, n, "hela") for n in range(2)]
    held_other = enqueue_held(catalog, 9, "u2os")
    assert JobQueue(catalog, "w").claim() is None  # held jobs are not claimed

    row, released = registry.assign("hela", "hela", 1)
    assert row.id == v1.id and released == 2
    with catalog.session() as s:
        jobs = {j.id: j for j in s.scalars(select(Job))}
    for job_id in held_hela:
        assert jobs[job_id].state == JobState.QUEUED and jobs[job_id].adapter_id == v1.id
        assert jobs[job_id].run_key.endswith(":p1:hela@v1")
    assert jobs[held_other].state == JobState.HELD
    claimed = JobQueue(catalog, "w").claim()
    assert claimed is not None and claimed.adapter_id == v1.id and claimed.experiment == "hela"

    registry.assign("hela", "hela")  # latest: v2
    assert registry.current("hela").id == v2.id
    with catalog.session() as s:
        history = s.scalars(select(Assignment).order_by(Assignment.id)).all()
    assert [(a.adapter_id, a.unassigned_at is None) for a in history] == [(v1.id, False), (v2.id, True)]
    shown = registry.show("hela", 1)
    assert shown["experiments"] == [] and [h["experiment"] for h in shown["assignments"]] == ["hela"]
    assert {e["experiment"]: (e["adapter"], e["held_jobs"]) for e in registry.experiments()} == {
        "hela": ("hela@v2", 0), "u2os": (None, 1)}


def test_remove_keeps_the_record_and_refuses_assigned_versions(registry: Registry, make_adapter) -> None:
    v1 = registry.add(make_adapter("hela", seed=1))
    registry.add(make_adapter("hela", seed=2))
    registry.assign("hela", "hela", 1)
    with pytest.raises(RegistryError, match=r"hela@v1 is assigned to experiment\(s\) hela; assign them another"):
        registry.remove("hela", 1)
    registry.assign("hela", "hela", 2)
    registry.remove("hela", 1)
    assert not Path(v1.store_path).exists()
    assert [a["adapter"] for a in registry.list()] == ["hela@v2"]
    assert [a["adapter"] for a in registry.list(include_removed=True)] == ["hela@v1", "hela@v2"]
    with pytest.raises(RegistryError, match="no registered adapter hela@v1"):
        registry.assign("other", "hela", 1)
    assert registry.add(make_adapter("hela", seed=3)).version == 3  # version numbers are never reused


def test_routes_follow_assignment_and_root_policy(registry: Registry, catalog: Catalog, make_adapter,
                                                  tmp_path: Path) -> None:
    roots = {policy: build_config({"watch": {"roots": [{"path": str(tmp_path), "without_adapter": policy}]}})
             .watch.roots[0] for policy in ("default", "classical", "hold")}
    assert route_for(catalog, "hela", roots["hold"], sam_enabled=False).tag is None  # no SAM: nothing to route
    assert route_for(catalog, "hela", roots["hold"], True).held
    assert route_for(catalog, "hela", roots["classical"], True).tag == "classical"
    assert route_for(catalog, "hela", roots["default"], True).tag == "default"
    fallback = registry.add(make_adapter("generic", seed=1))
    registry.assign("default", "generic")
    route = route_for(catalog, "hela", roots["default"], True)
    assert (route.tag, route.adapter_id) == ("generic@v1", fallback.id)
    assert route_for(catalog, "hela", roots["hold"], True).held  # "hold" does not take the default adapter
    hela = registry.add(make_adapter("hela", seed=2))
    registry.assign("hela", "hela")
    for root in roots.values():
        assert route_for(catalog, "hela", root, True).adapter_id == hela.id
    assert parse_ref("hela@v3") == ("hela", 3) and parse_ref("hela@3") == ("hela", 3) and parse_ref("x") == ("x", None)


def process(catalog: Catalog, n: int, experiment: str, tag: str | None) -> str:
    """Queue and finish a run of image n; returns its path."""
    facts = ImageFacts(f"/acq/{experiment}{n}.zarr", "/acq", f"/acq/{experiment}{n}.zarr", f"fp{n}",
                       experiment=experiment)
    queue = JobQueue(catalog, "w")
    queue.enqueue(facts, run_key(f"fp{n}", tag))
    job = queue.claim()
    assert job is not None
    queue.complete(job, dict(labels_path="/x", object_count=1, planes=1, segmenter="s", cellseg1d_version="t",
                             pipeline_version="1", exports={}), 0.1)
    return facts.path


def test_reprocess_queues_each_image_once_per_adapter_version(registry: Registry, catalog: Catalog,
                                                               make_adapter) -> None:
    with pytest.raises(RegistryError, match=r"experiment 'hela' has no adapter assigned; .*adapters assign hela"):
        reprocess(catalog, registry, "hela")
    v1 = registry.add(make_adapter("hela", seed=1))
    registry.assign("hela", "hela")
    done = [process(catalog, n, "hela", "hela@v1") for n in range(2)]
    process(catalog, 5, "u2os", "default")
    enqueue_held(catalog, 7, "hela")  # never processed: not reprocessed (the next assignment releases it)

    report = reprocess(catalog, registry, "hela")
    assert report.queued == [] and report.already == done  # v1 already made them
    registry.add(make_adapter("hela", seed=2))
    registry.assign("hela", "hela")
    report = reprocess(catalog, registry, "hela")
    assert report.adapter == "hela@v2" and report.queued == done
    assert reprocess(catalog, registry, "hela").queued == []  # twice queues nothing new
    with catalog.session() as s:
        keys = sorted(s.scalars(select(Job.run_key).where(Job.state == JobState.QUEUED)))
    assert keys == ["fp0:p1:hela@v2", "fp1:p1:hela@v2", "fp7:p1:hela@v2"]  # fp7: released by assign
    from datetime import UTC, datetime, timedelta

    assert reprocess(catalog, registry, "hela", since=datetime.now(UTC) + timedelta(days=1)).queued == []
    assert v1.version == 1


def test_claim_groups_jobs_by_adapter(registry: Registry, catalog: Catalog, make_adapter) -> None:
    a = registry.add(make_adapter("a", seed=1)).id
    b = registry.add(make_adapter("b", seed=2)).id
    queue = JobQueue(catalog, "w")
    for n, adapter in enumerate([a, b, a, None]):
        queue.enqueue(ImageFacts(f"/acq/{n}.zarr", "/acq", f"/acq/{n}.zarr", f"fp{n}"), f"k{n}", adapter_id=adapter)
    order, last = [], None
    while (job := queue.claim(prefer_adapter=last)) is not None:
        order.append(job.job_id)
        last = job.adapter_id if job.adapter_id is not None else last
    assert order == [1, 3, 2, 4]  # the second "a" job runs before "b": one switch less


def test_upgrade_from_0001_keeps_rows(tmp_path: Path) -> None:
    from alembic import command

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    catalog = Catalog(url)
    with catalog.engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0001")
    with catalog.engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO images (id, path, root, container, status, first_seen, updated_at) VALUES "
                             "(1, '/a.zarr', '/', '/a.zarr', 'done', '2026-01-01', '2026-01-01')")
        conn.exec_driver_sql("INSERT INTO jobs (id, image_id, run_key, state, attempts, created_at) VALUES "
                             "(1, 1, 'fp:p1', 'done', 1, '2026-01-01')")
    catalog.migrate()
    assert catalog.schema_revision() == "0005"
    with catalog.engine.begin() as conn:
        assert conn.exec_driver_sql("SELECT run_key, experiment, adapter_id FROM jobs").all() == [("fp:p1", None, None)]
    # an image processed before the upgrade is not queued again: its run key has no route
    assert JobQueue(catalog, "w").has_version("/a.zarr", "fp:p1")


@pytest.mark.slow
def test_adapters_cli(tmp_path: Path, make_adapter) -> None:
    checkpoint = tmp_path / "base.pth"
    torch.save(build_sam("tiny", 64).state_dict(), checkpoint)  # its sha256, and its backbone read from the shapes
    sha = sha256_of(checkpoint)
    config = tmp_path / "cellseg1d.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[sam]\ncheckpoint = "{checkpoint}"\n'
                      'model_type = "tiny"\nallow_custom_checkpoint = true\n')

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cellseg1d", "adapters", *args, "--config", str(config)],
                              capture_output=True, text=True, timeout=120, cwd=REPO)

    refused = cli("add", str(make_adapter("hela", seed=1)))  # trained on another base
    assert refused.returncode == 2 and "refused adapter" in refused.stderr and sha in refused.stderr
    out = cli("add", str(make_adapter("hela", seed=2, base_sha=sha)), "--assign", "hela")
    assert out.returncode == 0 and "registered hela@v1" in out.stdout and "assigned hela@v1" in out.stdout
    listed = json.loads(cli("list", "--json").stdout)
    assert [a["adapter"] for a in listed["adapters"]] == ["hela@v1"]
    assert listed["experiments"][0]["experiment"] == "hela" and listed["experiments"][0]["adapter"] == "hela@v1"
    shown = json.loads(cli("show", "hela@v1", "--json").stdout)
    assert shown["base_sha256"] == sha and shown["metadata"]["name"] == "hela"
    assert cli("remove", "hela").returncode == 2
    out = cli("remove", "hela@v1")
    assert out.returncode == 2 and "assigned to experiment(s) hela" in out.stderr


@pytest.mark.slow
def test_train_with_experiment_registers_and_assigns(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image as PILImage

    from cellseg1d.ngff.imageio import write_labels
    from cellseg1d.testing.synthetic import make_cells

    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pth"
    torch.save(build_sam("tiny", 1024).state_dict(), checkpoint)
    image, mask = make_cells((96, 96), 8, seed=3)
    PILImage.fromarray((image * 255).clip(0, 255).astype(np.uint8)).save(tmp_path / "cells.png")
    write_labels(tmp_path / "cells_mask.tif", mask)
    config = tmp_path / "cellseg1d.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[sam]\ncheckpoint = "{checkpoint}"\n'
                      'model_type = "tiny"\nallow_custom_checkpoint = true\n')
    model = ["--checkpoint", str(checkpoint), "--model-type", "tiny", "--allow-custom-checkpoint",
             "--image-size", "256", "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1"]

    def train(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cellseg1d", "train", str(tmp_path / "cells.png"), "--mask",
                               str(tmp_path / "cells_mask.tif"), *model, *extra, "--config", str(config)],
                              capture_output=True, text=True, timeout=600, cwd=REPO,
                              env={**__import__("os").environ, "OMP_NUM_THREADS": "2"})

    out = train("--experiment", "hela", "--assign")
    assert out.returncode == 0, out.stderr
    assert "registered hela@v1" in out.stdout and "assigned hela@v1 to experiment hela" in out.stdout
    catalog = Catalog(f"sqlite:///{tmp_path / 'state' / 'catalog.sqlite'}")
    registry = Registry(catalog, tmp_path / "state" / "adapters")
    current = registry.current("hela")
    assert current is not None and current.label == "hela@v1" and current.base_sha256 == sha256_of(checkpoint)
    assert [p.name for p in (tmp_path / "state" / "adapters").iterdir()] == ["hela"]  # no training leftovers
    other = tmp_path / "other.pth"
    torch.save(build_sam("tiny", 1024).state_dict(), other)  # another random base: refused before training
    out = subprocess.run([sys.executable, "-m", "cellseg1d", "train", str(tmp_path / "cells.png"), "--mask",
                          str(tmp_path / "cells_mask.tif"), *model[2:], "--checkpoint", str(other),
                          "--experiment", "hela", "--config", str(config)],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 2 and "is not the daemon's base model" in out.stderr
