"""Config reload (SIGHUP) in-process: what takes effect, what waits for a restart, what is refused.

The daemon is built for real (catalog, plugins, tracker); ``reload()`` is what
the scheduler loop calls after SIGHUP, with a loader that reads a real TOML
file. The subprocess test in test_service.py covers roots and the signal.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from cellseg1d.config import Config, load_config
from cellseg1d.service.daemon import Daemon
from cellseg1d.hookspecs import hookimpl


class SettingsRecorder:
    """A plugin that records the settings each ``configure`` call hands it, and can refuse."""

    def __init__(self) -> None:
        self.__name__ = "recorder"  # the name pluggy registers it under
        self.seen: list[dict[str, Any]] = []

    @hookimpl
    def configure(self, config: Any) -> None:
        settings = config.plugin_settings.get("recorder", {})
        self.seen.append(settings)
        if settings.get("refuse"):
            raise ValueError("threshold must be positive")


def toml(root: Path, state: Path, extra: str = "") -> str:
    return f'state_dir = "{state}"\n{extra}\n[[watch.roots]]\npath = "{root}"\n'


@pytest.fixture
def setup(tmp_path: Path, acquisition: Path, state: Path):
    path = tmp_path / "cellseg1d.toml"
    path.write_text(toml(acquisition, state, '[plugin_settings.recorder]\nthreshold = 1\n'))
    recorder = SettingsRecorder()
    daemon = Daemon(load_config(path), extra_plugins=(recorder,), config_loader=lambda: load_config(path))
    yield path, daemon, recorder
    daemon.catalog.close()
    daemon.lock.release()


def test_plugin_settings_and_rules_take_effect_without_rebuilding_the_watches(setup, acquisition, state) -> None:
    path, daemon, recorder = setup
    tracker = daemon.tracker
    path.write_text(toml(acquisition, state, '[readiness]\nsettle_seconds = 3\n'
                                           '[plugin_settings.recorder]\nthreshold = 5\n')
                    + 'experiments = [{ glob = "hela/**", experiment = "hela" }]\n')
    assert daemon.reload() is True
    assert recorder.seen[-1] == {"threshold": 5}
    assert daemon.config.readiness.settle_seconds == 3 and daemon.tracker.settle == 3
    assert daemon.roots[0].experiments[0].experiment == "hela"
    assert daemon.pipeline.config is daemon.config
    assert daemon.tracker is tracker  # same roots: candidates and their settle timers are kept


def test_a_plugin_refusing_the_new_settings_keeps_the_running_config(setup, acquisition, state, caplog) -> None:
    path, daemon, recorder = setup
    before = daemon.config
    path.write_text(toml(acquisition, state, '[plugin_settings.recorder]\nthreshold = 1\nrefuse = true\n'))
    with caplog.at_level(logging.ERROR, logger="cellseg1d.service.daemon"):
        assert daemon.reload() is False
    assert daemon.config is before
    assert "plugin 'recorder' refused the new configuration" in caplog.text
    assert "threshold must be positive" in caplog.text
    assert recorder.seen[-1] == {"threshold": 1}  # the running settings were handed back


@pytest.mark.parametrize("bad, words", [
    ("[readiness]\nsettle_seconds = -1\n", "settle_seconds"),
    ("[readines]\nsettle_seconds = 1\n", "unknown setting"),
    ("[readiness\n", "is not valid TOML"),
], ids=["invalid value", "unknown section", "syntax"])
def test_a_bad_config_is_refused_with_a_message(setup, acquisition, state, caplog, bad: str, words: str) -> None:
    path, daemon, _ = setup
    before = daemon.config
    path.write_text(toml(acquisition, state, bad))
    with caplog.at_level(logging.ERROR, logger="cellseg1d.service.daemon"):
        assert daemon.reload() is False
    assert daemon.config is before
    assert "configuration reload refused" in caplog.text and words in caplog.text


def test_a_missing_root_is_refused(setup, tmp_path, state, caplog) -> None:
    path, daemon, _ = setup
    path.write_text(toml(tmp_path / "not-there", state))
    with caplog.at_level(logging.ERROR, logger="cellseg1d.service.daemon"):
        assert daemon.reload() is False
    assert "watch.roots[0].path" in caplog.text and "not-there" in caplog.text


def test_restart_only_settings_are_kept_and_named(setup, acquisition, state, tmp_path, caplog) -> None:
    path, daemon, _ = setup
    path.write_text(toml(acquisition, tmp_path / "other-state",
                         '[jobs]\nworkers = 4\nmax_attempts = 7\n[catalog]\nurl = "sqlite:////tmp/x.sqlite"\n'
                         '[plugin_settings.recorder]\nthreshold = 1\n'))
    with caplog.at_level(logging.WARNING, logger="cellseg1d.service.daemon"):
        assert daemon.reload() is True
    cfg: Config = daemon.config
    assert cfg.state_dir == state and cfg.catalog.url is None and cfg.jobs.workers == 1
    assert cfg.jobs.max_attempts == 7 and daemon.queue.max_attempts == 7  # this one applies at once
    for key in ("state_dir", "catalog", "jobs.workers"):
        assert f"setting {key} changed; it takes effect when the daemon is restarted" in caplog.text


def test_roots_added_and_removed(setup, acquisition, state, tmp_path) -> None:
    path, daemon, _ = setup
    other = tmp_path / "other"
    other.mkdir()
    path.write_text(toml(acquisition, state) + f'[[watch.roots]]\npath = "{other}"\n')
    assert daemon.reload() is True
    assert daemon.tracker.roots == [acquisition.resolve(), other.resolve()]
    path.write_text(toml(other, state))
    assert daemon.reload() is True
    assert daemon.tracker.roots == [other.resolve()]
    # A job queued from the removed root still finds its settings.
    assert daemon._root_for(str(acquisition.resolve())) is not None
    assert daemon._root_for(str(tmp_path / "never")) is None
