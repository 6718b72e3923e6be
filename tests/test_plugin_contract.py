"""The plugin contract: API versions, ``cellseg1d plugins``, and export isolation (errors, hangs, outcomes).

Installed plugins are real distributions: a ``.dist-info`` folder with an
``entry_points.txt`` on ``PYTHONPATH``, discovered by importlib.metadata in a
``cellseg1d`` subprocess, exactly as a pip-installed package would be.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cellseg1d.catalog import ExportOutcome
from cellseg1d.errors import ConfigError
from cellseg1d.pipeline.exports import ExportsFailed
from cellseg1d.hookspecs import PLUGIN_API, hookimpl
from cellseg1d.plugins import build_plugin_manager
from tests.helpers import REPO, catalog_rows, image_status, jobs_for, wait_for
from tests.test_plugins import DaemonThread, quiet_watchdog


def install_fake_dist(site: Path, name: str, module_source: str, entry: str | None = None) -> None:
    """A minimal installed distribution ``name`` 1.0 whose module registers entry point ``entry``."""
    module = name.replace("-", "_")
    (site / f"{module}.py").write_text(module_source)
    info = site / f"{module}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[cellseg1d]\n{entry or name} = {module}\n")


EXPORT = "from cellseg1d.hookspecs import hookimpl\n@hookimpl\ndef export(labels, context):\n    return None\n"


@pytest.fixture
def site(tmp_path: Path) -> Path:
    folder = tmp_path / "site"
    folder.mkdir()
    install_fake_dist(folder, "future-plugin", f"CELLSEG1D_PLUGIN_API = {PLUGIN_API + 1}\n" + EXPORT, "future")
    install_fake_dist(folder, "current-plugin", f"CELLSEG1D_PLUGIN_API = {PLUGIN_API}\n" + EXPORT, "current")
    install_fake_dist(folder, "broken-plugin", "import no_such_module_anywhere\n", "broken")
    install_fake_dist(folder, "typo-plugin", "from cellseg1d.hookspecs import hookimpl\n"
                      "@hookimpl\ndef exprot(labels):\n    return None\n", "typo")
    return folder


def cellseg1d(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}", "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "cellseg1d", *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=REPO)


def test_plugins_command_lists_every_plugin_and_why_one_does_not_load(site: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[plugins]\nenable = ["current", "future"]\n'
                      'disable = ["classical"]\n')
    proc = cellseg1d(site, "plugins", "--config", str(config), "--json")
    assert proc.returncode == 1, proc.stderr  # an enabled plugin does not load
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["readiness"]["source"] == "built-in" and rows["readiness"]["hooks"] == ["image_ready"]
    assert rows["classical"]["enabled"] is False and rows["classical"]["loaded"] is True
    assert rows["current"] == {**rows["current"], "source": "entry point", "enabled": True, "loaded": True,
                               "package": "current-plugin", "version": "1.0", "api": PLUGIN_API,
                               "hooks": ["export"], "error": None}
    assert rows["future"]["loaded"] is False and "written for cellseg1d plugin API 2" in rows["future"]["error"]
    assert rows["broken"]["enabled"] is False and rows["broken"]["loaded"] is False
    assert "No module named 'no_such_module_anywhere'" in rows["broken"]["error"]
    assert rows["typo"]["loaded"] is False and "exprot" in rows["typo"]["error"]
    text = cellseg1d(site, "plugins", "--config", str(config))
    assert "future-plugin 1.0" in text.stdout and "written for cellseg1d plugin API 2" in text.stdout


def test_a_plugin_for_a_newer_api_is_refused_at_start(site: Path, tmp_path: Path) -> None:
    acq = tmp_path / "acq"
    acq.mkdir()
    config = tmp_path / "c.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[[watch.roots]]\npath = "{acq}"\n'
                      '[plugins]\nenable = ["future"]\n')
    proc = cellseg1d(site, "run", "--config", str(config))
    assert proc.returncode == 2
    assert "plugin 'future' (package future-plugin 1.0) was written for cellseg1d plugin API 2" in proc.stderr
    assert "remove 'future' from plugins.enable" in proc.stderr


@pytest.mark.parametrize("declared, ok", [(PLUGIN_API, True), (PLUGIN_API + 1, False), ("1", False), (0, False)])
def test_declared_api_versions(declared: object, ok: bool) -> None:
    class Plugin:
        __name__ = "declaring"
        CELLSEG1D_PLUGIN_API = declared

        @hookimpl
        def export(self, labels):
            return None

    if ok:
        assert build_plugin_manager(extra=[Plugin()]).has_plugin("declaring")
    else:
        with pytest.raises(ConfigError, match="plugin 'declaring'"):
            build_plugin_manager(extra=[Plugin()])


# --------------------------------------------------------------------------
# Export isolation
# --------------------------------------------------------------------------


class Export:
    def __init__(self, name: str, behaviour: str) -> None:
        self.__name__ = name
        self.behaviour = behaviour
        self.calls = 0
        self.release = threading.Event()

    @hookimpl
    def export(self, labels, context):
        self.calls += 1
        if self.behaviour == "raise":
            raise RuntimeError(f"{self.__name__} is broken")
        if self.behaviour == "hang":
            self.release.wait(60)
        path = context.atomic_path(f"{self.__name__}.txt")
        path.write_text(str(labels.n_objects))
        return {"kind": self.__name__, "objects": labels.n_objects}


def test_every_export_is_attempted_and_each_outcome_reported(synthetic_image, run_pipeline) -> None:
    image = synthetic_image("2d")
    raising, fine, hanging = Export("raising", "raise"), Export("fine", "ok"), Export("hanging", "hang")
    started = time.monotonic()
    with pytest.raises(ExportsFailed) as err:
        run_pipeline(image, plugins=[raising, fine, hanging], config={"plugins": {"timeout_seconds": 1}})
    hanging.release.set()
    assert time.monotonic() - started < 20
    assert raising.calls == fine.calls == hanging.calls == 1  # each attempted despite the others
    outcomes = {o.plugin: o for o in err.value.outcomes}
    assert outcomes["raising"].status == "failed" and "raising is broken" in outcomes["raising"].error
    assert outcomes["fine"].status == "ok" and outcomes["fine"].record["kind"] == "fine"
    assert outcomes["hanging"].status == "timeout" and "plugins.timeout_seconds" in outcomes["hanging"].error
    message = str(err.value)
    assert "failed in hook 'export'" in message and "plugin 'raising'" in message and "plugin 'hanging'" in message
    assert err.value.plugin in ("raising", "hanging")
    # Nothing of the failed run is published: no label image, no export file under its final name.
    assert not (image.path / "labels" / "cellseg1d").exists()
    exports = image.path.parent / (image.path.name + ".cellseg1d")
    assert not (exports / "fine.txt").exists()


@pytest.mark.slow
@quiet_watchdog
def test_daemon_records_export_outcomes_and_a_hung_export_never_holds_the_others(
        tmp_path: Path, acquisition: Path, make_image) -> None:
    from cellseg1d.config import build_config

    state = tmp_path / "state"
    config = build_config({"state_dir": str(state), "watch": {"roots": [{"path": str(acquisition)}]},
                           "readiness": {"settle_seconds": 0.3}, "plugins": {"timeout_seconds": 1}})
    hanging, fine = Export("hanging", "hang"), Export("fine", "ok")
    try:
        with DaemonThread(config, hanging, fine):
            paths = [make_image(acquisition / f"img{i}.zarr", seed=i)[0].resolve() for i in range(4)]
            wait_for(lambda: all(image_status(state).get(str(p)) == "failed" for p in paths), 90,
                     what="every image failed on the hung export")
    finally:
        hanging.release.set()
    # The hung export was called at most MAX_HUNG_CALLS times; later images failed at once, naming it.
    assert hanging.calls <= 2 and fine.calls == 4
    for p in paths:
        (job,) = jobs_for(state, str(p))
        assert job[0] == "quarantined" and job[3] == "hanging" and "plugin 'hanging'" in job[2]
    rows = catalog_rows(state, "SELECT plugin, status, record FROM export_outcomes ORDER BY id")
    assert sorted({(p, s) for p, s, _ in rows}) == [("fine", "ok"), ("hanging", "timeout")]
    assert len(rows) == 8 and all(json.loads(r)["kind"] == "fine" for p, s, r in rows if p == "fine")


def test_export_outcomes_are_stored_with_a_done_job(tmp_path: Path, catalog, synthetic_image) -> None:
    from sqlalchemy import select

    from cellseg1d.catalog.jobs import ImageFacts, JobQueue

    queue = JobQueue(catalog, "me", 60, 3, 0)
    queue.enqueue(ImageFacts("/a.zarr", "/", "/a.zarr", "fp"), "fp:p1")
    job = queue.claim()
    result = {"labels_path": "/a.zarr/labels/x", "object_count": 1, "planes": 1, "segmenter": "s",
              "cellseg1d_version": "t", "pipeline_version": "1", "exports": {}}
    rows = [{"plugin": "geo", "status": "ok", "seconds": 0.1, "error": None, "record": {"kind": "geojson"}}]
    assert queue.complete(job, result, 1.0, rows)
    with catalog.session() as s:
        (stored,) = s.scalars(select(ExportOutcome)).all()
        assert (stored.plugin, stored.status, stored.attempt, stored.record) == ("geo", "ok", 1, {"kind": "geojson"})
