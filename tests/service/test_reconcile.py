"""Start-up reconciliation of catalog and disk (cellseg1d/service/reconcile.py) on real folders, images and catalogs.

Jobs are processed by the real pipeline; the last two tests start a real
daemon subprocess on a state the test prepared (labels deleted or damaged,
labels published by a run that never committed) and check what it redoes.
"""

from __future__ import annotations

import os
import shutil
import socket
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from cellseg1d.catalog import Catalog, Job, JobEvent, Result, utcnow
from cellseg1d.config import Config, build_config
from cellseg1d.catalog.jobs import ImageFacts, JobQueue, run_key
from cellseg1d.ngff.reader import open_image
from cellseg1d.pipeline import Pipeline
from cellseg1d.plugins import build_plugin_manager
from cellseg1d.service.reconcile import label_image_problem, reconcile
from tests.helpers import catalog_rows, done_images, jobs_for, wait_for

STAGING = ".cellseg1d.partial-0123456789ab"
REPLACED = ".cellseg1d.replaced-abcdefabcdef"
EXPORT_TMP = ".measurements.csv.partial-00aa11bb22cc"


def config_for(acquisition: Path, state: Path) -> Config:
    return build_config({"state_dir": str(state), "watch": {"roots": [{"path": str(acquisition)}]}})


def open_catalog(state: Path) -> Catalog:
    catalog = Catalog(f"sqlite:///{state / 'catalog.sqlite'}")
    catalog.migrate()
    return catalog


def facts_of(image: Path, acquisition: Path) -> ImageFacts:
    ome = open_image(image)
    return ImageFacts(str(image), str(acquisition), str(image), ome.fingerprint, ome.ngff_version,
                      "".join(ome.axes), "x".join(map(str, ome.shape)), str(ome.dtype), "default")


def claim(catalog: Catalog, config: Config, image: Path, owner: str = "test#1", lease: float = 300):
    """Queue and claim a job for ``image`` as a daemon with lease owner ``owner`` would."""
    root = config.watch.roots[0]
    facts = facts_of(image, root.path)
    queue = JobQueue(catalog, owner, lease_seconds=lease)
    assert queue.enqueue(facts, run_key(facts.fingerprint)) is not None
    job = queue.claim()
    assert job is not None and job.image_path == str(image)
    return queue, job


def process(catalog: Catalog, config: Config, image: Path, *, commit: bool = True) -> int:
    """Run ``image`` through the real pipeline; commit the job unless ``commit`` is False (a crash)."""
    queue, job = claim(catalog, config, image)
    pipeline = Pipeline(config, build_plugin_manager(config.plugins.enable, config.plugins.disable))
    result = pipeline.run(image, config.watch.roots[0], image)
    if commit:
        assert queue.complete(job, result.catalog_fields(), 0.1)
    return job.job_id


def restart(daemons, state: Path, *args: str):
    """Start a daemon on a state dir that had one before; wait for *its* start (the log file is shared)."""
    log = state.parent / f"{state.name}-daemon.log"
    before = log.read_text().count("watching") if log.exists() else 0
    daemon = daemons(state, *args)
    wait_for(lambda: daemon.log().count("watching") > before, 60, what="daemon start")
    return daemon


def events(catalog: Catalog) -> dict[int, list[tuple[str, str]]]:
    with catalog.session() as s:
        out: dict[int, list[tuple[str, str]]] = {}
        for e in s.scalars(select(JobEvent).order_by(JobEvent.id)):
            out.setdefault(e.job_id, []).append((e.kind, e.detail or ""))
        return out


def test_leftovers_removed_except_under_a_live_lease(tmp_path: Path, acquisition: Path, make_image) -> None:
    acq = acquisition.resolve()
    state = tmp_path / "state"
    config, catalog = config_for(acq, state), open_catalog(state)
    done, _ = make_image(acq / "done.zarr", size=64, n_cells=4)
    live, _ = make_image(acq / "live.zarr", size=64, n_cells=4, seed=1)
    dead, _ = make_image(acq / "dead.zarr", size=64, n_cells=4, seed=2)
    process(catalog, config, done)
    claim(catalog, config, live, owner="otherhost:/state#7", lease=600)  # another daemon, working right now
    _, dead_job = claim(catalog, config, dead, owner="otherhost:/state#8", lease=600)
    with catalog.session() as s:  # that daemon died: its lease ran out
        s.execute(update(Job).where(Job.id == dead_job.job_id).values(lease_expires_at=utcnow() - timedelta(1)))

    planted = []
    for image in (done, live, dead):
        for name in (STAGING, REPLACED):
            (image / "labels" / name / "0").mkdir(parents=True)
            (image / "labels" / name / "0" / "c").write_bytes(b"x")
            planted.append(image / "labels" / name)
        exports = image.parent / (image.name + ".cellseg1d")
        exports.mkdir(exist_ok=True)
        (exports / EXPORT_TMP).write_text("half a table")
        (exports / "measurements.csv").write_text("a finished table")
        planted.append(exports / EXPORT_TMP)
    (done / "labels" / ".keep").write_text("not ours")

    # On a shared catalog, fresh leftovers are kept for a grace period (a daemon may have just claimed the image).
    report = reconcile(catalog, config, "test", grace_seconds=3600)
    assert report.removed == [] and all(p.exists() for p in planted)

    report = reconcile(catalog, config, "test")
    assert report.skipped_live == [str(live)]
    for path in planted:  # (live.zarr.cellseg1d, the export folder, counts as the live image's)
        assert path.exists() == str(path).startswith(str(live)), path
    assert sorted(report.removed) == sorted(str(p) for p in planted if not str(p).startswith(str(live)))
    assert (done / "labels" / ".keep").exists() and (done / "labels" / "cellseg1d").is_dir()
    assert (acq / "done.zarr.cellseg1d" / "measurements.csv").exists()
    assert (live / "labels" / STAGING).is_dir() and (acq / "live.zarr.cellseg1d" / EXPORT_TMP).exists()
    assert report.redone == []  # the done job's labels are complete


def test_label_image_problem_names_what_is_wrong(tmp_path: Path, acquisition: Path, make_image) -> None:
    acq = acquisition.resolve()
    state = tmp_path / "state"
    config, catalog = config_for(acq, state), open_catalog(state)
    image, _ = make_image(acq / "img.zarr", size=64, n_cells=4, ngff_version="0.4")
    process(catalog, config, image)
    labels = image / "labels" / "cellseg1d"
    assert label_image_problem(labels, "czyx", "2x1x64x64") is None
    assert "shape" in label_image_problem(labels, "czyx", "2x1x32x64")
    shutil.rmtree(labels / "1")
    assert "level '1'" in label_image_problem(labels)
    (labels / ".zattrs").write_text("{broken")
    assert "metadata" in label_image_problem(labels)
    shutil.rmtree(labels)
    assert "missing" in label_image_problem(labels)


@pytest.mark.slow
def test_done_jobs_with_missing_or_incomplete_labels_are_redone(tmp_path: Path, acquisition: Path, daemons,
                                                                 make_image) -> None:
    acq = acquisition.resolve()
    state = tmp_path / "state"
    images = {name: make_image(acq / f"{name}.zarr", size=64, n_cells=4, seed=i)[0]
              for i, name in enumerate(("missing", "incomplete", "unlisted", "intact"))}
    daemon = daemons(state, "--watch", str(acq), "--settle-seconds", "0.3")
    wait_for(lambda: {str(p) for p in images.values()} <= done_images(state), 60, what="first processing")
    assert daemon.stop() == 0
    results = dict(catalog_rows(state, "SELECT image_id, id FROM results"))

    shutil.rmtree(images["missing"] / "labels" / "cellseg1d")
    shutil.rmtree(images["incomplete"] / "labels" / "cellseg1d" / "1")
    meta = images["unlisted"] / "labels" / "zarr.json"  # the labels group forgot it (publish cut short)
    meta.write_text(meta.read_text().replace('"cellseg1d"', '"other"'))
    # chunks are not checked (zarr may legitimately skip chunks holding only zeros): no redo for this one
    shutil.rmtree(images["intact"] / "labels" / "cellseg1d" / "0" / "c")

    daemon = restart(daemons, state, "--watch", str(acq), "--settle-seconds", "0.3")
    catalog = open_catalog(state)
    broken = ("missing", "incomplete", "unlisted")
    wait_for(lambda: {str(images[n]) for n in broken} <= done_images(state) and len(catalog_rows(
        state, "SELECT id FROM results")) == 4, 60, what="redone")
    log = daemon.log()
    assert "queued 3 done job(s) again" in log
    all_events = events(catalog)
    for name, path in images.items():
        jobs = jobs_for(state, str(path))
        assert [(j[0], j[1]) for j in jobs] == [("done", 1)], (name, jobs)
        assert label_image_problem(path / "labels" / "cellseg1d") is None, name
        (job_id,), = catalog_rows(state, "SELECT jobs.id FROM jobs JOIN images ON images.id = jobs.image_id "
                                         "WHERE images.path = ?", (str(path),))
        if name == "intact":
            assert job_id not in all_events
            continue
        (kind, detail), = all_events[job_id]
        assert kind == "redo" and "old result" in detail, detail
        assert {"missing": "is missing", "incomplete": "level '1'", "unlisted": "does not list"}[name] in detail
    with catalog.session() as s:
        assert s.scalar(select(Result.id).join(Job).where(Job.state == "done").limit(1)) is not None
    new_results = dict(catalog_rows(state, "SELECT image_id, id FROM results"))
    intact_image = next(i for i, r in results.items() if new_results.get(i) == r)
    assert len(new_results) == 4 and intact_image
    assert not any(p.name.startswith(".") for image in images.values() for p in (image / "labels").iterdir())


@pytest.mark.slow
def test_published_but_uncommitted_labels_are_replaced(tmp_path: Path, acquisition: Path, daemons,
                                                       make_image) -> None:
    """The daemon was killed between renaming the labels into place and committing the job."""
    acq = acquisition.resolve()
    state = tmp_path / "state"
    config, catalog = config_for(acq, state), open_catalog(state)
    image, _ = make_image(acq / "img.zarr", size=64, n_cells=4)
    node = f"{socket.gethostname()}:{state.resolve()}"
    queue, job = claim(catalog, config, image, owner=f"{node}#1")  # as the killed daemon held it
    pipeline = Pipeline(config, build_plugin_manager((), ()))
    pipeline.run(image, config.watch.roots[0], image)  # published; no commit
    final = image / "labels" / "cellseg1d"
    first_inode = os.stat(final).st_ino
    (image / "labels" / STAGING).mkdir()  # and a staging folder of the attempt after it

    daemon = daemons(state, "--watch", str(acq), "--settle-seconds", "0.3")
    wait_for(lambda: str(image) in done_images(state), 60, what="redone")
    assert [(j[0], j[1]) for j in jobs_for(state, str(image))] == [("done", 2)]
    assert len(catalog_rows(state, "SELECT id FROM results")) == 1
    kinds = [k for k, _ in events(catalog)[job.job_id]]
    assert kinds == ["labels-without-done"]
    assert os.stat(final).st_ino != first_inode, "the label image was not replaced by the new run"
    assert label_image_problem(final) is None
    assert not (image / "labels" / STAGING).exists()
    assert "replaces it" in daemon.log()
