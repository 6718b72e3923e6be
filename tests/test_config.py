"""Config: TOML + environment overrides, validated with errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellseg1d.config import load_config
from cellseg1d.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cellseg1d.toml"
    path.write_text(text)
    return path


def test_full_config_is_read(tmp_path: Path) -> None:
    (tmp_path / "acq").mkdir()
    cfg = load_config(write(tmp_path, f"""
state_dir = "{tmp_path / 'state'}"
[[watch.roots]]
path = "{tmp_path / 'acq'}"
[readiness]
settle_seconds = 4.5
require_marker = true
[segmentation]
channels = ["DAPI", 1]
[plugins]
enable = ["measurements"]
"""), environ={})
    assert cfg.readiness.settle_seconds == 4.5 and cfg.readiness.require_marker
    assert cfg.segmentation.channels == ["DAPI", 1]
    assert cfg.watch.roots[0].path == tmp_path / "acq"
    assert cfg.catalog_url == f"sqlite:///{tmp_path / 'state' / 'catalog.sqlite'}"
    cfg.check_runnable()


def test_unknown_setting_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"setting readiness\.setle_seconds: unknown setting"):
        load_config(write(tmp_path, "[readiness]\nsetle_seconds = 3\n"), environ={})


def test_wrong_type_is_named_with_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[readiness]\nsettle_seconds = "soon"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert str(path) in str(err.value) and "readiness.settle_seconds" in str(err.value)


def test_invalid_toml_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[readiness\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, environ={})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[readiness]\nsettle_seconds = 3\n")
    cfg = load_config(path, environ={
        "CELLSEG1D_READINESS__SETTLE_SECONDS": "7.5",
        "CELLSEG1D_CATALOG__URL": "postgresql+psycopg://u@localhost/db",
        "UNRELATED": "1",
    })
    assert cfg.readiness.settle_seconds == 7.5
    assert cfg.catalog_url == "postgresql+psycopg://u@localhost/db"


def test_no_roots_is_not_runnable(tmp_path: Path) -> None:
    cfg = load_config(None, {"state_dir": str(tmp_path)}, environ={})
    with pytest.raises(ConfigError, match=r"\[\[watch.roots\]\]"):
        cfg.check_runnable()


def test_missing_root_folder_is_named(tmp_path: Path) -> None:
    cfg = load_config(None, {"watch.roots": [{"path": str(tmp_path / "gone")}]}, environ={})
    with pytest.raises(ConfigError, match=r"watch\.roots\[0\]\.path: .*gone is not an existing folder"):
        cfg.check_runnable()


def test_mirror_needs_root_outside_watched_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mirror_root"):
        load_config(None, {"watch.roots": [{"path": str(tmp_path), "output": "mirror"}]}, environ={})
    with pytest.raises(ConfigError, match="inside the watched folder"):
        load_config(None, {"watch.roots": [
            {"path": str(tmp_path), "output": "mirror", "mirror_root": str(tmp_path / "out")}]}, environ={})


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "", "x" * 200])
def test_unsafe_labels_name_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="segmentation.labels_name"):
        load_config(None, {"segmentation.labels_name": name}, environ={})
