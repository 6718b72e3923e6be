"""The markers plugin on real OME-Zarr images written by the plugin kit (nothing mocked)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import cellseg1d_markers as markers
import pytest
import zarr

from cellseg1d.config import build_config
from cellseg1d.ngff.reader import open_image
from cellseg1d.plugins import build_plugin_manager
from cellseg1d.types import ReadinessQuery


def make_config(root: Path, settings: dict[str, Any] | None = None, readiness: dict[str, Any] | None = None,
                enable: tuple[str, ...] = ("markers",)) -> Any:
    return build_config({
        "state_dir": str(root / "state"),
        "watch": {"roots": [{"path": str(root)}]},
        "plugins": {"enable": list(enable)},
        "plugin_settings": {"markers": settings or {}},
        "readiness": readiness or {},
    }, source="test")


def query_for(path: Path, container: Path, config: Any) -> ReadinessQuery:
    """The query the daemon builds in Daemon._consider."""
    return ReadinessQuery(open_image(path), container, config.readiness.settle_seconds, config.readiness)


def ask(image_path: Path, container: Path, tmp_path: Path, **settings: Any) -> bool | None:
    """Configure the plugin with ``settings`` and ask it about one image."""
    config = make_config(tmp_path, settings)
    markers.configure(config)
    return markers.image_ready(query_for(image_path, container, config))


def set_group_attrs(path: Path, attrs: dict[str, Any]) -> None:
    zarr.open_group(str(path), mode="r+").attrs.update(attrs)


@pytest.fixture(autouse=True)
def _default_settings():
    yield
    markers._settings = markers.Settings()


# ---------------------------------------------------------------------------
# Each preset's completion marker
# ---------------------------------------------------------------------------

COMPLETE_MARKERS = {
    "squid": {"_squid": {"structure": "5D-TCZYX", "pixel_size_um": 0.5, "acquisition_complete": True}},
    "squid (older writer)": {"_squid_metadata": {"acquisition_complete": True, "shape": [1, 2, 1, 128, 128]}},
    "imswitch": {"acquisition_complete": True, "finalized_at": 1718000000.25},
    "imswitch finalized_at only": {"finalized_at": 1718000000.25},
    "cellseg1d": {"acquisition_complete": True},
}
PRESET_OF = {"squid": "squid", "squid (older writer)": "squid", "imswitch": "imswitch",
             "imswitch finalized_at only": "imswitch", "cellseg1d": "cellseg1d"}


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("case", list(COMPLETE_MARKERS))
def test_each_preset_marker_makes_the_image_ready(synthetic_image, tmp_path, case, version):
    image = synthetic_image("2d", version, attrs=COMPLETE_MARKERS[case])
    assert ask(image.path, image.container, tmp_path) is True  # software = ["auto"]
    assert ask(image.path, image.container, tmp_path, software=[PRESET_OF[case]]) is True


def test_a_preset_not_selected_is_not_read(synthetic_image, tmp_path):
    image = synthetic_image("2d", attrs=COMPLETE_MARKERS["squid"])
    assert ask(image.path, image.container, tmp_path, software=["imswitch"]) is None
    assert ask(image.path, image.container, tmp_path, software=["imswitch"], require=True) is False


@pytest.mark.parametrize("name", ["acquisition_complete", ".complete"])
def test_cellseg1d_sentinel_file_in_the_image_folder(synthetic_image, tmp_path, name):
    image = synthetic_image("2d")
    (image.path / name).touch()
    assert ask(image.path, image.container, tmp_path) is True
    assert ask(image.path, image.container, tmp_path, software=["squid"]) is None  # not a squid marker


# ---------------------------------------------------------------------------
# In progress, none, require
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("attrs", [
    {"_squid": {"structure": "5D-TCZYX", "acquisition_complete": False}},  # Squid while acquiring
    {"_squid": {"acquisition_complete": False, "aborted": True}},  # Squid after abort()
    {"_squid_metadata": {"acquisition_complete": False, "aborted": True}},
    {"acquisition_complete": False},
], ids=["squid-acquiring", "squid-aborted", "squid-old-aborted", "flag-false"])
def test_in_progress_marker_means_not_ready(synthetic_image, tmp_path, attrs):
    image = synthetic_image("2d", attrs=attrs)
    assert ask(image.path, image.container, tmp_path) is False
    assert ask(image.path, image.container, tmp_path, require=False) is False


def test_in_progress_wins_over_a_sentinel_in_the_same_folder(synthetic_image, tmp_path):
    image = synthetic_image("2d", attrs={"_squid": {"acquisition_complete": False}})
    (image.path / ".complete").touch()
    assert ask(image.path, image.container, tmp_path) is False


def test_no_marker_without_require_is_no_opinion(synthetic_image, tmp_path):
    image = synthetic_image("2d")
    assert ask(image.path, image.container, tmp_path) is None


def test_no_marker_with_require_is_not_ready(synthetic_image, tmp_path):
    image = synthetic_image("2d")
    assert ask(image.path, image.container, tmp_path, require=True) is False


# ---------------------------------------------------------------------------
# Plates and containers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_marker_on_the_plate_group_applies_to_its_fields(synthetic_image, tmp_path, version):
    plate = synthetic_image("plate", version)
    for field in plate.fields:
        assert ask(field, plate.container, tmp_path) is None
    set_group_attrs(plate.container, {"_squid": {"acquisition_complete": False}})
    for field in plate.fields:
        assert ask(field, plate.container, tmp_path) is False
    set_group_attrs(plate.container, {"_squid": {"acquisition_complete": True}})
    for field in plate.fields:
        assert ask(field, plate.container, tmp_path) is True


def test_marker_on_the_well_group_applies_too(synthetic_image, tmp_path):
    plate = synthetic_image("plate")
    set_group_attrs(plate.container / "A" / "1", {"acquisition_complete": True})
    assert all(ask(field, plate.container, tmp_path) is True for field in plate.fields)


def test_the_nearest_marker_decides(synthetic_image, tmp_path):
    # Squid marks each field; a plate-level "in progress" does not hold back a field marked complete
    plate = synthetic_image("plate")
    set_group_attrs(plate.container, {"acquisition_complete": False})
    set_group_attrs(plate.fields[0], {"_squid": {"acquisition_complete": True}})
    assert ask(plate.fields[0], plate.container, tmp_path) is True
    assert ask(plate.fields[1], plate.container, tmp_path) is False


def test_sentinel_file_in_the_container(synthetic_image, tmp_path):
    plate = synthetic_image("plate")
    (plate.container / "DONE").touch()
    assert ask(plate.fields[0], plate.container, tmp_path, require=True) is False  # not a known name
    for field in plate.fields:
        assert ask(field, plate.container, tmp_path, require=True, sentinel_files=["DONE"]) is True
    (plate.container / "DONE").unlink()
    (plate.container / ".complete").touch()
    assert ask(plate.fields[1], plate.container, tmp_path, require=True) is True


def test_only_metadata_is_read(synthetic_image, tmp_path):
    image = synthetic_image("2d", attrs=COMPLETE_MARKERS["squid"])
    config = make_config(tmp_path)
    markers.configure(config)
    query = query_for(image.path, image.container, config)
    for level in ("0", "1"):  # remove every chunk: the answer must not need them
        chunks = image.path / level / "c"
        if chunks.exists():
            shutil.rmtree(chunks)
        for item in (image.path / level).iterdir():
            if item.is_dir():
                shutil.rmtree(item)
    assert markers.image_ready(query) is True


# ---------------------------------------------------------------------------
# Malformed markers never raise
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("attrs", [
    {"_squid": "complete"},
    {"_squid": {"acquisition_complete": "yes"}},
    {"_squid": ["acquisition_complete", True]},
    {"_squid_metadata": {"acquisition_complete": 1}},
    {"acquisition_complete": "maybe"},
    {"acquisition_complete": None},
    {"finalized_at": True},
    {"finalized_at": {"when": 1}},
    {"finalized_at": -5},
    {"finalized_at": ""},
])
def test_malformed_marker_is_treated_as_absent(synthetic_image, tmp_path, attrs):
    image = synthetic_image("2d", attrs=attrs)
    assert ask(image.path, image.container, tmp_path) is None
    assert ask(image.path, image.container, tmp_path, require=True) is False


def test_malformed_marker_on_the_image_lets_the_plate_decide(synthetic_image, tmp_path):
    plate = synthetic_image("plate")
    set_group_attrs(plate.fields[0], {"_squid": {"acquisition_complete": "yes"}})
    set_group_attrs(plate.container, {"_squid": {"acquisition_complete": True}})
    assert ask(plate.fields[0], plate.container, tmp_path) is True


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_broken_metadata_above_the_image_never_raises(synthetic_image, tmp_path, version):
    plate = synthetic_image("plate", version)
    meta = plate.container / ("zarr.json" if version == "0.5" else ".zattrs")
    meta.write_text("{ this is not json")
    well = plate.container / "A" / "1" / ("zarr.json" if version == "0.5" else ".zattrs")
    well.write_bytes(b"\xff\xfe\x00")
    field = plate.fields[0]
    config = make_config(tmp_path)
    markers.configure(config)
    query = query_for(field, plate.container, config)  # the field itself is fine
    assert markers.image_ready(query) is None
    markers.configure(make_config(tmp_path, {"require": True}))
    assert markers.image_ready(query) is False
    (plate.container / ".complete").touch()
    assert markers.image_ready(query) is True


def test_a_strange_query_never_raises(tmp_path):
    class Odd:
        path = "not/a/real/image"
        attributes = "not a dict"

    markers.configure(make_config(tmp_path, {"require": True}))
    assert markers.image_ready(ReadinessQuery(Odd(), tmp_path / "nowhere.zarr", 0.0, None)) is False


# ---------------------------------------------------------------------------
# Custom attributes and sentinel files
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("attrs", "expected"), [
    ({"lab": {"done": "2024-06-01T10:00:00Z"}}, True),
    ({"lab": {"done": True}}, True),
    ({"lab": {"done": False}}, False),
    ({"lab.done": 1}, True),
    ({"lab": {"done": []}}, None),
    ({"other": True}, None),
])
def test_custom_attributes(synthetic_image, tmp_path, attrs, expected):
    image = synthetic_image("2d", attrs=attrs)
    assert ask(image.path, image.container, tmp_path, software=[], attributes=["lab.done"]) is expected


def test_custom_sentinel_only(synthetic_image, tmp_path):
    image = synthetic_image("2d", attrs=COMPLETE_MARKERS["squid"])
    settings = {"software": [], "sentinel_files": ["ACQ_DONE"], "require": True}
    assert ask(image.path, image.container, tmp_path, **settings) is False  # squid marker not looked at
    (image.path / "ACQ_DONE").touch()
    assert ask(image.path, image.container, tmp_path, **settings) is True


# ---------------------------------------------------------------------------
# Through a real plugin manager, as the daemon asks
# ---------------------------------------------------------------------------


def test_answers_the_image_ready_hook_through_a_plugin_manager(synthetic_image, tmp_path):
    squid = synthetic_image("2d", attrs=COMPLETE_MARKERS["squid"])
    acquiring = synthetic_image("2d", attrs={"_squid": {"acquisition_complete": False}})
    plain = synthetic_image("2d")
    pm = build_plugin_manager(["markers"], (), ())
    assert pm.has_plugin("markers") and pm.has_plugin("readiness")
    assert pm.get_plugin("markers").CELLSEG1D_PLUGIN_API == 1

    # the built-in readiness requires its own markers; ours (Squid only) answers first for the
    # Squid images and defers (None) on the plain image, so the built-in one decides there
    config = make_config(tmp_path, {"software": ["squid"]}, readiness={"require_marker": True})
    pm.hook.configure(config=config)
    assert pm.hook.image_ready(query=query_for(squid.path, squid.container, config)) is True
    assert pm.hook.image_ready(query=query_for(acquiring.path, acquiring.container, config)) is False
    assert pm.hook.image_ready(query=query_for(plain.path, plain.container, config)) is False  # built-in
    (plain.path / ".complete").touch()
    assert pm.hook.image_ready(query=query_for(plain.path, plain.container, config)) is True

    # without require anywhere: no marker -> no plugin objects -> the daemon treats it as ready (None)
    config = make_config(tmp_path, {})
    pm.hook.configure(config=config)
    other = synthetic_image("2d")
    assert pm.hook.image_ready(query=query_for(other.path, other.container, config)) is None
    # with require: not ready until marked
    config = make_config(tmp_path, {"require": True, "software": ["squid"]})
    pm.hook.configure(config=config)
    assert pm.hook.image_ready(query=query_for(other.path, other.container, config)) is False
    assert pm.hook.image_ready(query=query_for(squid.path, squid.container, config)) is True


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("settings", "expected"), [
    ({"software": ["squidd"]}, "plugin_settings.markers.software: unknown preset 'squidd'"),
    ({"software": ["Squid"]}, "did you mean 'squid'?"),
    ({"software": ["bioformats2raw"]}, "plugin_settings.markers.software: 'bioformats2raw' has no completion marker"),
    ({"software": "auto", "require": "yes"}, "plugin_settings.markers.require: expected true or false"),
    ({"attributes": [1]}, "plugin_settings.markers.attributes: expected a list of non-empty names"),
    ({"attributes": [""]}, "plugin_settings.markers.attributes: expected a list of non-empty names"),
    ({"sentinel_files": ["a/b"]}, "plugin_settings.markers.sentinel_files: 'a/b' must be a plain file name"),
    ({"sentinel_files": [".."]}, "plugin_settings.markers.sentinel_files: '..' must be a plain file name"),
    ({"software": []}, "plugin_settings.markers.software: empty and no attributes or sentinel_files"),
    ({"presets": ["squid"]}, "plugin_settings.markers.presets: unknown setting"),
])
def test_bad_settings_are_refused_by_configure(tmp_path, settings, expected):
    pm = build_plugin_manager(["markers"], (), ())
    with pytest.raises(ValueError) as info:
        pm.hook.configure(config=make_config(tmp_path, settings))
    assert expected in str(info.value)


def test_defaults(tmp_path):
    settings = markers.settings_from_config(make_config(tmp_path))
    assert settings.software == ("auto",) and settings.require is False
    assert {p.name for p in settings.presets} == set(markers.PRESETS)
    assert {m.name for m in settings.markers} == {
        "_squid.acquisition_complete", "_squid_metadata.acquisition_complete", "acquisition_complete", "finalized_at",
    }
    assert settings.sentinels == ("acquisition_complete", ".complete")
