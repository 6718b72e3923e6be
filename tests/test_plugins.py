"""The plugin contract: how the pipeline and the daemon treat what plugins do.

Plugins here are real objects with ``@hookimpl`` methods registered through
``build_plugin_manager(extra=...)`` (or ``Daemon(extra_plugins=...)``); every
test runs the real pipeline on real OME-Zarr images on disk.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pluggy
import pytest
import zarr

from cellseg1d.builtin.readiness import has_completion_marker
from cellseg1d.config import Config, ReadinessSettings, build_config
from cellseg1d.errors import ConfigError, PluginError
from cellseg1d.hookspecs import hookimpl
from cellseg1d.ngff.reader import open_image
from cellseg1d.pipeline import Pipeline, PipelineResult
from cellseg1d.plugins import build_plugin_manager
from cellseg1d.testing.synthetic import make_czyx, write_plate
from cellseg1d.types import ExportContext, ReadinessQuery, SegmentRequest, Segmentation
from tests.helpers import catalog_rows, image_status, jobs_for, wait_for

# ---------------------------------------------------------------------------
# Plugins used by the tests
# ---------------------------------------------------------------------------


class Named:
    """Base: pluggy registers an object under its ``__name__``."""

    def __init__(self, name: str) -> None:
        self.__name__ = name
        self.calls = 0


class RaisingSegmenter(Named):
    @hookimpl
    def segment(self, plane: np.ndarray, request: SegmentRequest) -> Segmentation:
        self.calls += 1
        raise RuntimeError("model weights are corrupt")


class AbstainingSegmenter(Named):
    @hookimpl
    def segment(self, plane: np.ndarray) -> None:  # declares only what it needs
        self.calls += 1
        return None


class FixedSegmenter(Named):
    """Answers with a given label image (or a wrong one)."""

    def __init__(self, name: str, labels: np.ndarray) -> None:
        super().__init__(name)
        self.labels = labels

    @hookimpl
    def segment(self, plane: np.ndarray, request: SegmentRequest) -> Segmentation:
        self.calls += 1
        return Segmentation(labels=self.labels, segmenter=f"{self.__name__}:v1", details={"score": 0.9})


class GoodExporter(Named):
    @hookimpl(tryfirst=True)  # runs before the raising exporter, so it has written its file
    def export(self, context: ExportContext) -> dict[str, Any]:
        self.calls += 1
        context.atomic_path("good.txt").write_text("written before the other export failed\n")
        return {"kind": "good"}


class QuotaExceeded(RuntimeError):
    """A plugin's own exception type (not an OSError: those count as transient storage trouble and are retried)."""


class RaisingExporter(Named):
    @hookimpl
    def export(self, image: Any, labels: Any, context: ExportContext) -> dict[str, Any]:
        self.calls += 1
        context.atomic_path("half.csv").write_text("label,area\n1,")
        raise QuotaExceeded("disk quota exceeded while writing half.csv")


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _config(acquisition: Path, tmp_path: Path, **extra: Any) -> Config:
    return build_config({
        "state_dir": str(tmp_path / "state"),
        "watch": {"roots": [{"path": str(acquisition)}]},
        **extra,
    })


def _run(config: Config, image: Path, *extra: Any, disable: tuple[str, ...] = ()) -> PipelineResult:
    pm = build_plugin_manager(enable=config.plugins.enable, disable=disable or config.plugins.disable, extra=extra)
    return Pipeline(config, pm).run(image, config.watch.roots[0], image)


def _assert_nothing_published(image: Path, acquisition: Path) -> None:
    assert not (image / "labels" / "cellseg1d").exists(), "a label image was published"
    leftovers = [p for p in acquisition.rglob("*") if ".partial-" in p.name or ".replaced-" in p.name]
    assert leftovers == [], f"temporary files left behind: {leftovers}"
    export_dir = image.parent / (image.name + ".cellseg1d")
    files = [p for p in export_dir.rglob("*") if p.is_file()] if export_dir.exists() else []
    assert files == [], f"export files left behind: {files}"


# ---------------------------------------------------------------------------
# segment
# ---------------------------------------------------------------------------


def test_raising_segmenter_fails_the_image_naming_the_plugin(tmp_path: Path, acquisition: Path, make_image) -> None:
    image, _ = make_image(acquisition / "a.zarr")
    plugin = RaisingSegmenter("flaky-model")
    pm = build_plugin_manager(extra=[plugin])
    assert pm.get_name(plugin) == "flaky-model"
    config = _config(acquisition, tmp_path)

    with pytest.raises(PluginError) as info:
        Pipeline(config, pm).run(image, config.watch.roots[0], image)

    err = info.value
    assert err.plugin == "flaky-model"
    assert err.hook == "segment"
    assert "plugin 'flaky-model' failed in hook 'segment'" in str(err)
    assert "RuntimeError: model weights are corrupt" in str(err)
    assert plugin.calls == 1
    _assert_nothing_published(image, acquisition)


@pytest.mark.parametrize("labels, expected", [
    (np.ones((10, 10), np.uint16), "shape (10, 10)"),
    (np.ones((64, 64), np.float32), "dtype float32"),
    (np.full((64, 64), -1, np.int32), "negative label values"),
])
def test_invalid_labels_give_a_clear_error(
    tmp_path: Path, acquisition: Path, make_image, labels: np.ndarray, expected: str,
) -> None:
    image, _ = make_image(acquisition / "a.zarr", size=64)
    plugin = FixedSegmenter("broken-model", labels)

    with pytest.raises(PluginError) as info:
        _run(_config(acquisition, tmp_path), image, plugin)

    message = str(info.value)
    assert info.value.hook == "segment"
    assert info.value.plugin == "broken-model:v1"  # named by the segmenter it reported
    assert expected in message
    if "shape" in expected:
        assert "expected an integer array of shape (64, 64)" in message
    _assert_nothing_published(image, acquisition)


def test_segmenter_returning_none_falls_through_to_classical(tmp_path: Path, acquisition: Path, make_image) -> None:
    image, mask = make_image(acquisition / "a.zarr", n_cells=10)
    plugin = AbstainingSegmenter("picky-model")

    result = _run(_config(acquisition, tmp_path), image, plugin)

    assert plugin.calls == 1  # it was asked, and declined
    assert result.segmenter == "classical"
    assert result.object_count >= 8
    assert (image / "labels" / "cellseg1d").is_dir()


def test_custom_segmenter_wins_over_classical_and_is_recorded(tmp_path: Path, acquisition: Path, make_image) -> None:
    image, mask = make_image(acquisition / "a.zarr", n_cells=10)
    # The oracle answers with the true mask, ids shifted so relabelling is visible.
    oracle = FixedSegmenter("oracle", np.where(mask > 0, mask + 100, 0).astype(np.int64))

    result = _run(_config(acquisition, tmp_path), image, oracle)

    assert oracle.calls == 1
    assert result.segmenter == "oracle:v1"
    assert result.object_count == int(mask.max())
    published = open_image(Path(result.labels_path))
    labels = published.read_plane(0, 0, [0])[0]
    np.testing.assert_array_equal(labels, mask)  # relabelled 1..N in the same order
    provenance = json.dumps(published.attributes)
    assert '"segmenter": "oracle:v1"' in provenance


def test_no_segmenter_left_is_an_error(tmp_path: Path, acquisition: Path, make_image) -> None:
    image, _ = make_image(acquisition / "a.zarr")
    config = _config(acquisition, tmp_path, plugins={"disable": ["classical"]})

    with pytest.raises(PluginError) as info:
        _run(config, image, AbstainingSegmenter("picky-model"))

    assert info.value.hook == "segment"
    assert "no segmenter answered" in str(info.value)
    _assert_nothing_published(image, acquisition)


# ---------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------


def test_raising_export_publishes_nothing(tmp_path: Path, acquisition: Path, make_image) -> None:
    image, _ = make_image(acquisition / "a.zarr")
    good, bad = GoodExporter("thumbnails"), RaisingExporter("lims-export")

    with pytest.raises(PluginError) as info:
        _run(_config(acquisition, tmp_path), image, bad, good)

    assert good.calls == 1 and bad.calls == 1  # the good export had written its file first
    assert info.value.plugin == "lims-export"
    assert info.value.hook == "export"
    assert "disk quota exceeded" in str(info.value)
    _assert_nothing_published(image, acquisition)


def test_successful_exports_are_committed_and_recorded(tmp_path: Path, acquisition: Path, make_image) -> None:
    image, _ = make_image(acquisition / "a.zarr")
    good = GoodExporter("thumbnails")

    result = _run(_config(acquisition, tmp_path), image, good)

    assert {"kind": "good"} in result.exports
    assert (acquisition / "a.zarr.cellseg1d" / "good.txt").read_text().startswith("written")
    assert not [p for p in acquisition.rglob("*") if ".partial-" in p.name]


# ---------------------------------------------------------------------------
# Enabling and disabling
# ---------------------------------------------------------------------------


def test_enabling_a_missing_plugin_names_the_setting() -> None:
    with pytest.raises(ConfigError) as info:
        build_plugin_manager(enable=["no-such-plugin"])
    message = str(info.value)
    assert "plugins.enable" in message and "'no-such-plugin'" in message


def test_daemon_refuses_to_start_with_a_missing_plugin(tmp_path: Path, acquisition: Path) -> None:
    from cellseg1d.service.daemon import Daemon

    config = _config(acquisition, tmp_path, plugins={"enable": ["no-such-plugin"]})
    with pytest.raises(ConfigError, match="plugins.enable"):
        Daemon(config)
    # The state-dir lock was released: a corrected daemon can start.
    daemon = Daemon(_config(acquisition, tmp_path))
    daemon.catalog.close()
    daemon.lock.release()


def test_disabling_an_unknown_builtin_names_the_setting() -> None:
    with pytest.raises(ConfigError) as info:
        build_plugin_manager(disable=["classic"])
    message = str(info.value)
    assert "plugins.disable" in message and "classic" in message and "classical" in message


def test_builtins_are_registered_and_can_be_disabled() -> None:
    pm = build_plugin_manager()
    assert {"readiness", "classical", "sam"} <= {name for name, _ in pm.list_name_plugin()}
    pm = build_plugin_manager(disable=["classical", "readiness", "sam"])
    assert pm.hook.segment.get_hookimpls() == []
    assert pm.hook.image_ready.get_hookimpls() == []


# ---------------------------------------------------------------------------
# image_ready and the built-in readiness plugin's markers
# ---------------------------------------------------------------------------

ATTRS = ["acquisition_complete", "finalized_at"]
SENTINELS = ["acquisition_complete", ".complete"]


def test_marker_attribute_on_the_image(acquisition: Path, make_image) -> None:
    done, _ = make_image(acquisition / "done.zarr", attrs={"finalized_at": "2025-01-01T00:00:00Z"})
    falsy, _ = make_image(acquisition / "falsy.zarr", attrs={"acquisition_complete": False})
    plain, _ = make_image(acquisition / "plain.zarr")
    assert has_completion_marker(done, done, ATTRS, SENTINELS)
    assert not has_completion_marker(falsy, falsy, ATTRS, SENTINELS)
    assert not has_completion_marker(plain, plain, ATTRS, SENTINELS)


def _plate(path: Path) -> Path:
    data, _ = make_czyx((32, 32), 2, seed=1)
    return write_plate(path, {("A", "1", "0"): data[0], ("B", "2", "0"): data[0]})


def test_marker_attribute_on_the_plate_root(acquisition: Path) -> None:
    plate = _plate(acquisition / "plate.zarr")
    field = plate / "A" / "1" / "0"
    assert not has_completion_marker(field, plate, ATTRS, SENTINELS)
    zarr.open_group(str(plate), mode="r+").attrs.update({"acquisition_complete": True})
    assert has_completion_marker(field, plate, ATTRS, SENTINELS)
    # A marker outside the container does not count.
    other = _plate(acquisition / "other.zarr")
    assert not has_completion_marker(other / "B" / "2" / "0", other, ATTRS, SENTINELS)


def test_sentinel_file_in_the_image_or_container(acquisition: Path, make_image) -> None:
    image, _ = make_image(acquisition / "img.zarr")
    assert not has_completion_marker(image, image, ATTRS, SENTINELS)
    (image / ".complete").touch()
    assert has_completion_marker(image, image, ATTRS, SENTINELS)

    plate = _plate(acquisition / "plate.zarr")
    field = plate / "B" / "2" / "0"
    (plate / "unrelated.txt").touch()
    assert not has_completion_marker(field, plate, ATTRS, SENTINELS)
    (plate / "acquisition_complete").touch()
    assert has_completion_marker(field, plate, ATTRS, SENTINELS)


def test_image_ready_hook_answers(acquisition: Path, make_image) -> None:
    """The built-in answers only when a marker is required; another plugin's answer comes first."""
    image, _ = make_image(acquisition / "img.zarr")
    opened = open_image(image)

    def ask(pm: pluggy.PluginManager, settings: ReadinessSettings) -> bool | None:
        return pm.hook.image_ready(query=ReadinessQuery(opened, image, 1.0, settings))

    pm = build_plugin_manager()
    assert ask(pm, ReadinessSettings()) is None  # no opinion: ready
    assert ask(pm, ReadinessSettings(require_marker=True)) is False
    (image / ".complete").touch()
    assert ask(pm, ReadinessSettings(require_marker=True)) is True

    class Vendor(Named):
        @hookimpl
        def image_ready(self, query: ReadinessQuery) -> bool:
            return bool(query.image.attributes.get("vendor_done"))

    pm = build_plugin_manager(extra=[Vendor("vendor")])
    assert ask(pm, ReadinessSettings(require_marker=True)) is False  # the vendor plugin answers first


# ---------------------------------------------------------------------------
# The daemon in-process with extra plugins
# ---------------------------------------------------------------------------


class DaemonThread:
    """A :class:`cellseg1d.service.daemon.Daemon` run in a thread (no signal handlers)."""

    def __init__(self, config: Config, *plugins: Any) -> None:
        from cellseg1d.service.daemon import Daemon

        self.daemon = Daemon(config, extra_plugins=plugins)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="daemon-under-test", daemon=True)

    def _run(self) -> None:
        try:
            self.daemon.run()
        except BaseException as err:  # surfaced by stop()
            self.error = err

    def __enter__(self) -> DaemonThread:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self.daemon.stop_event.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the daemon did not stop"
        if self.error is not None:
            raise AssertionError(f"the daemon raised {self.error!r}") from self.error


class BadForSomeImages(Named):
    """Fails segmentation of images whose path contains 'bad'; its notifications raise too."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.failed: list[tuple[str, str | None, bool]] = []
        self.done: list[str] = []

    @hookimpl
    def segment(self, request: SegmentRequest) -> None:
        if "bad" in str(request.image_path):
            raise ValueError("this plugin cannot handle bad images")
        return None

    @hookimpl
    def image_failed(self, image_path: str, plugin: str | None, will_retry: bool) -> None:
        self.failed.append((image_path, plugin, will_retry))

    @hookimpl
    def image_done(self, image_path: str) -> None:
        self.done.append(image_path)
        raise RuntimeError("the chat server is down")  # logged and ignored


# watchdog warns when the daemon renames its label staging folder (harmless; the CLI silences it).
quiet_watchdog = pytest.mark.filterwarnings("ignore::RuntimeWarning:watchdog.observers.inotify")


def _daemon_config(acquisition: Path, tmp_path: Path) -> Config:
    return _config(acquisition, tmp_path, readiness={"settle_seconds": 0.5},
                   watch={"roots": [{"path": str(acquisition)}], "rescan_seconds": 2})


@pytest.mark.slow
@quiet_watchdog
def test_failing_plugin_does_not_stop_the_daemon(tmp_path: Path, acquisition: Path, make_image) -> None:
    config = _daemon_config(acquisition, tmp_path)
    state = config.state_dir
    plugin = BadForSomeImages("picky-plugin")
    with DaemonThread(config, plugin) as running:
        good, _ = make_image(acquisition / "good.zarr")
        bad, _ = make_image(acquisition / "bad.zarr", seed=1)
        paths = {str(good.resolve()): "done", str(bad.resolve()): "failed"}
        wait_for(lambda: all(image_status(state).get(p) == s for p, s in paths.items()), 90,
                 what=f"images recorded as {paths}: {image_status(state)}")
        # After both: a third image still gets processed.
        later, _ = make_image(acquisition / "later.zarr", seed=2)
        wait_for(lambda: image_status(state).get(str(later.resolve())) == "done", 90, what="later.zarr done")
        assert running.thread.is_alive()

    (state_, attempts, error, error_plugin), = jobs_for(state, str(bad.resolve()))
    assert state_ == "quarantined" and attempts == 1  # a plugin error is permanent: no retry
    assert error_plugin == "picky-plugin"
    assert "plugin 'picky-plugin' failed in hook 'segment'" in error
    assert "cannot handle bad images" in error
    assert jobs_for(state, str(good.resolve()))[-1][0] == "done"
    (segmenter,), = catalog_rows(
        state, "SELECT results.segmenter FROM results JOIN images ON images.id = results.image_id "
        "WHERE images.path = ?", (str(good.resolve()),))
    assert segmenter == "classical"
    assert plugin.failed == [(str(bad.resolve()), "picky-plugin", False)]
    assert sorted(plugin.done) == sorted([str(good.resolve()), str(later.resolve())])
    assert not (bad / "labels" / "cellseg1d").exists()


class Gate(Named):
    """An instrument plugin: images are ready only once the gate is opened."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.open = threading.Event()

    @hookimpl
    def image_ready(self, query: ReadinessQuery) -> bool:
        self.calls += 1
        return self.open.is_set()


@pytest.mark.slow
@quiet_watchdog
def test_image_ready_false_keeps_an_image_waiting(tmp_path: Path, acquisition: Path, make_image) -> None:
    config = _daemon_config(acquisition, tmp_path)
    state = config.state_dir
    gate = Gate("acquisition-gate")
    with DaemonThread(config, gate):
        image, _ = make_image(acquisition / "img.zarr")
        path = str(image.resolve())
        wait_for(lambda: gate.calls >= 2, 30, what="the gate asked twice")  # asked, and asked again
        assert path not in image_status(state)  # not queued while the plugin says no
        assert not (image / "labels").exists()
        gate.open.set()
        wait_for(lambda: image_status(state).get(path) == "done", 60, what=f"{path} done once the gate opened")
