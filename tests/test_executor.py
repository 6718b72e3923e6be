"""The executor layer without a cluster: task errors as data, path mapping, the worker plugin in-process,
aborts, reload and metrics. (A real Dask cluster is in tests/test_dask.py.)"""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cellseg1d.catalog import Catalog
from cellseg1d.config import build_config
from cellseg1d.daemon import Daemon
from cellseg1d.errors import ImageError, JobAborted, PluginError
from cellseg1d.executor import ExecutorError, SegmentTask, make_executor, plane_regions
from cellseg1d.executor.dask import DaskExecutor, worker_config
from cellseg1d.executor.local import LocalExecutor
from cellseg1d.executor.tasks import TaskError
from cellseg1d.executor.worker import CellsegWorkerPlugin, probe
from cellseg1d.ngff.reader import open_image
from cellseg1d.plugins import build_plugin_manager
from cellseg1d.service.telemetry import Telemetry
from cellseg1d.testing import write_synthetic_image
from cellseg1d.types import AdapterRef


def _config(tmp_path: Path, **executor) -> object:
    return build_config({"state_dir": str(tmp_path / "state"), "watch": {"roots": [{"path": str(tmp_path)}]},
                         "executor": executor})


def _tasks(image_path: Path, config, block_size: int | None = None) -> list[SegmentTask]:
    image = open_image(image_path)
    shape = (image.size("y"), image.size("x"))
    regions = plane_regions(shape, block_size or max(shape), 16)
    return [SegmentTask(image_path=image_path, fingerprint=image.fingerprint, t=t, z=z, channels=(0,),
                        channel_names=("nuclei",), region=r, plane_shape=shape, experiment="default",
                        adapter=None, fallback=False, pixel_size=None, config=config)
            for t, z in image.planes() for r in regions]


def test_task_errors_come_back_as_the_exception_the_local_executor_raises() -> None:
    plugin_err = TaskError.of(PluginError("geo", "segment", "boom", transient=True), "tcp://w:1").exception()
    assert isinstance(plugin_err, PluginError) and plugin_err.plugin == "geo" and plugin_err.transient
    assert str(plugin_err) == "plugin 'geo' failed in hook 'segment': boom"  # named once, as locally
    image_err = TaskError.of(ImageError("bad chunk in /a.zarr"), "tcp://w:1").exception()
    assert isinstance(image_err, ImageError) and str(image_err) == "bad chunk in /a.zarr"
    storage = TaskError.of(FileNotFoundError(2, "No such file", "/mnt/x"), "tcp://w:1")
    assert storage.transient and isinstance(storage.exception(), ExecutorError)
    assert "tcp://w:1" in str(storage.exception()) and "/mnt/x" in str(storage.exception())
    assert isinstance(TaskError.of(JobAborted("stop"), "w").exception(), JobAborted)
    other = TaskError.of(ZeroDivisionError("division by zero"), "tcp://w:1")
    assert other.transient and "ZeroDivisionError" in str(other.exception())
    assert pickle.loads(pickle.dumps(other)) == other  # plain data: always travels back


def test_paths_are_sent_as_the_workers_see_them(tmp_path: Path) -> None:
    config = build_config({
        "state_dir": str(tmp_path / "state"), "watch": {"roots": [{"path": str(tmp_path)}]},
        "sam": {"checkpoint": "/mnt/models/sam_vit_b.pth", "adapter": "/srv/other/adapter"},
        "executor": {"kind": "dask", "scheduler": "tcp://gpu:8786", "path_map": [
            {"daemon": "/mnt", "worker": "/data"},
            {"daemon": str(tmp_path), "worker": "/cluster/scope1"},
        ]},
    })
    mapped = worker_config(config)
    assert mapped.sam.checkpoint == Path("/data/models/sam_vit_b.pth")
    assert mapped.sam.adapter == Path("/srv/other/adapter")  # outside every mapped prefix: unchanged
    assert config.sam.checkpoint == Path("/mnt/models/sam_vit_b.pth")  # the daemon's own config is untouched
    executor = DaskExecutor(config)  # not started: mapping needs no scheduler
    adapter = AdapterRef("hela", 2, "ab" * 32, tmp_path / "store" / "hela" / "v2", "vit_b", "cd" * 32)
    image = write_synthetic_image(tmp_path / "acq", "2d").path
    task = _tasks(image, config)[0]
    sent = executor._for_workers(SegmentTask(**{**task.__dict__, "adapter": adapter}))
    assert sent.image_path == Path("/cluster/scope1/acq") / image.name
    assert sent.adapter.path == Path("/cluster/scope1/store/hela/v2")
    assert sent.config.sam.checkpoint == Path("/data/models/sam_vit_b.pth")
    assert (sent.t, sent.z, sent.region, sent.experiment) == (task.t, task.z, task.region, task.experiment)


def test_worker_plugin_segments_tasks_in_process_and_reports_errors_as_data(tmp_path: Path) -> None:
    image = write_synthetic_image(tmp_path / "acq", "zstack", n_cells=10)
    config = _config(tmp_path)
    plugin = pickle.loads(pickle.dumps(CellsegWorkerPlugin()))  # how Dask ships it: state rebuilt there
    plugin.setup(SimpleNamespace(address="tcp://10.0.0.7:4000"))
    results = [plugin.run(t) for t in _tasks(image.path, config)]
    assert [r.error for r in results] == [None, None, None]
    assert all(r.worker == "tcp://10.0.0.7:4000" and r.labels.dtype == np.uint16 for r in results)
    assert all(len(np.unique(r.labels[r.labels > 0])) == image.n_cells for r in results)
    assert plugin.tasks == 3 and len(plugin._managers) == 1 and len(plugin._images) == 1  # opened once

    gone = SegmentTask(**{**_tasks(image.path, config)[0].__dict__, "image_path": tmp_path / "nowhere.zarr"})
    error = plugin.run(gone).error
    assert error is not None and error.transient and "executor.path_map" in error.message
    assert "tcp://10.0.0.7:4000" in error.message and "nowhere.zarr" in error.message
    other = SegmentTask(**{**_tasks(image.path, config)[0].__dict__, "fingerprint": "0" * 32})
    plugin._images.clear()
    assert "sees another image" in plugin.run(other).error.message


def test_local_executor_reads_blocks_and_stops_when_asked(tmp_path: Path) -> None:
    image = write_synthetic_image(tmp_path / "acq", "2d", size=128)
    config = _config(tmp_path)
    executor = make_executor(config, build_plugin_manager())
    assert isinstance(executor, LocalExecutor) and executor.available()
    tasks = _tasks(image.path, config, block_size=64)
    assert len(tasks) == 9 and all(t.is_block for t in tasks)
    results = list(executor.map(tasks, open_image(image.path)))
    assert [r.labels.shape for r in results] == [t.shape for t in tasks]
    assert all(r.worker.startswith("local:") for r in results)
    calls = iter([False, False, True])
    with pytest.raises(JobAborted, match="stopped before plane t=0 z=0 \\(block"):
        list(executor.map(tasks, open_image(image.path), lambda: next(calls)))


def test_probe_reports_missing_paths(tmp_path: Path) -> None:
    info = probe([str(tmp_path), str(tmp_path / "missing")])
    assert info["missing"] == [str(tmp_path / "missing")] and info["version"]


def test_reload_keeps_the_executor_connection_settings_until_restart(tmp_path: Path) -> None:
    old = _config(tmp_path, kind="dask", scheduler="tcp://a:8786", block_size=2048)
    new = _config(tmp_path, kind="local", scheduler="tcp://b:8786", block_size=1024)
    kept, changed = Daemon._keep_restart_only(SimpleNamespace(RESTART_ONLY=Daemon.RESTART_ONLY), old, new)
    assert changed == ["executor.kind", "executor.scheduler"]
    assert (kept.executor.kind, kept.executor.scheduler) == ("dask", "tcp://a:8786")  # both kept
    assert kept.executor.block_size == 1024  # takes effect at once


def test_executor_metrics_follow_the_health_answer(tmp_path: Path) -> None:
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.sqlite'}")
    catalog.migrate()
    try:
        answer = {"executor": {"kind": "dask", "available": False, "workers": 0}}
        telemetry = Telemetry(catalog, health=lambda: (True, answer))
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(telemetry.render().decode()) for s in f.samples}
        assert samples[("cellseg1d_executor_up", (("kind", "dask"),))] == 0
        assert samples[("cellseg1d_executor_workers", ())] == 0
        answer["executor"] = {"kind": "dask", "available": True, "workers": 3}
        text = telemetry.render().decode()
        assert 'cellseg1d_executor_up{kind="dask"} 1.0' in text and "cellseg1d_executor_workers 3.0" in text
    finally:
        catalog.close()


def test_adapters_are_registered_on_a_pc_without_the_workers_checkpoint(tmp_path: Path, caplog) -> None:
    from cellseg1d.registry import RegistryError, configured_base

    sam = {"checkpoint": str(tmp_path / "on-the-workers" / "sam_vit_b.pth")}
    local = build_config({"state_dir": str(tmp_path / "s"), "sam": sam})
    with pytest.raises(RegistryError, match="sam.checkpoint: .* does not exist"):
        configured_base(local)
    dask = build_config({"state_dir": str(tmp_path / "s"), "sam": sam,
                         "executor": {"kind": "dask", "scheduler": "tcp://gpu:8786"}})
    assert configured_base(dask) is None
    assert "it is the workers' file" in caplog.text
