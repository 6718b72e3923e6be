"""cellseg1d plugin: readiness from the completion markers of acquisition software.

Implements ``configure`` and ``image_ready``. Some acquisition programs that
write OME-Zarr record in the metadata whether an acquisition has finished
(Squid writes ``"_squid": {"acquisition_complete": false}`` when it starts and
``true`` when it is done; ImSwitch's OME-Zarr writer adds
``acquisition_complete`` and ``finalized_at`` at the end). This plugin knows
those markers (presets, one per program) so that a site does not have to list
attribute names in ``[readiness]`` by hand.

For each image that has been quiet for the settle time it looks, from the
image group up to its container (plate, bioformats2raw layout or the image
itself), for the first group that carries a known marker, and answers:

* True: a completion marker is present and set (processed now);
* False: a marker says "in progress" (``acquisition_complete: false``), or
  ``require = true`` and no marker was found (asked again later);
* None: no marker and ``require = false`` (no opinion: the built-in
  ``readiness`` plugin decides).

Sentinel files (``sentinel_files``) in those folders count as completion
markers. Only metadata files (``zarr.json`` / ``.zattrs``) are read, never a
chunk; the image group's own attributes come from the already opened image.
A malformed marker (a string where a boolean belongs, a broken metadata file
above the image) is treated as absent: this hook never raises.

Enable it in the daemon config::

    [plugins]
    enable = ["markers"]

    [plugin_settings.markers]        # optional
    software = ["auto"]              # or e.g. ["squid"]; see PRESETS
    require = false                  # true: no marker -> not ready
    attributes = ["my_lab.done"]     # extra attribute names (dotted: nested)
    sentinel_files = ["DONE"]        # extra file names
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from cellseg1d.hookspecs import hookimpl
from cellseg1d.ngff.discover import folders_up_to
from cellseg1d.ngff.reader import read_group_attributes

#: The cellseg1d plugin API version this plugin was written for.
CELLSEG1D_PLUGIN_API = 1

__version__ = "0.1.0"

#: The plugin's name: its entry point and its ``[plugin_settings.<NAME>]`` table.
NAME = "markers"

#: What a marker says about an acquisition.
COMPLETE, IN_PROGRESS = "complete", "in progress"


@dataclass(frozen=True)
class Marker:
    """A group attribute that tells whether the acquisition has finished.

    ``path`` is the key path into the group's attributes (looked up at the top
    level and under ``"ome"``). ``kind``:

    * ``"flag"``: ``true`` = complete, ``false`` = in progress, anything else = absent;
    * ``"stamp"``: a non-empty string or a positive number = complete, anything else = absent;
    * ``"any"`` (custom attributes): a boolean acts as a flag, a string or number as a stamp.
    """

    path: tuple[str, ...]
    kind: str = "flag"

    @property
    def name(self) -> str:
        return ".".join(self.path)


@dataclass(frozen=True)
class Preset:
    """The markers one acquisition program writes, and where that is documented."""

    name: str
    software: str
    attributes: tuple[Marker, ...] = ()
    sentinel_files: tuple[str, ...] = ()
    source: str = ""


#: Known markers, by preset name (``software = [...]``; ``"auto"`` = all of them).
PRESETS: dict[str, Preset] = {
    "squid": Preset(
        "squid", "Squid (Cephla) with File Saving Format ZARR_V3",
        attributes=(
            Marker(("_squid", "acquisition_complete")),
            Marker(("_squid_metadata", "acquisition_complete")),
        ),
        source="https://github.com/Cephla-Lab/Squid: software/docs/zarr-v3-format.md and "
               "software/control/core/zarr_writer.py (false at start, true in finalize(), "
               "false with aborted: true in abort(); older writers used _squid_metadata)",
    ),
    "imswitch": Preset(
        "imswitch", "ImSwitch (OME_ZARR writer)",
        attributes=(Marker(("acquisition_complete",)), Marker(("finalized_at",), "stamp")),
        source="https://github.com/openUC2/ImSwitch: imswitch/imcontrol/model/writers/ome_zarr_writer.py "
               "(finalize() sets acquisition_complete = True and finalized_at = time.time())",
    ),
    "cellseg1d": Preset(
        "cellseg1d", "the cellseg1d convention (defaults of [readiness] marker_attributes / sentinel_files)",
        attributes=(Marker(("acquisition_complete",)), Marker(("finalized_at",), "stamp")),
        sentinel_files=("acquisition_complete", ".complete"),
        source="cellseg1d/config.py ReadinessSettings",
    ),
}

#: Programs checked for markers that write none usable (see the README for the sources).
NO_MARKER: dict[str, str] = {
    "bioformats2raw": "bioformats2raw writes bioformats2raw.layout and OME/METADATA.ome.xml before the pixel "
                      "data, so neither marks the end of a conversion",
    "ome-zarr-py": "ome-zarr-py's writer adds no completion attribute",
    "pymmcore-plus": "pymmcore-plus's OMEZarrWriter writes useq_MDASequence with the first frame of each "
                     "position and nothing when the sequence finishes",
    "useq": "useq_MDASequence (pymmcore-plus) is written with the first frame, not at the end",
    "ome-writers": "ome-writers documents no completion marker in its OME-Zarr output",
    "pycro-manager": "pycro-manager / AcqEngJ save NDTiff (NDStorage), not OME-Zarr",
    "micro-manager": "Micro-Manager's acquisition engine saves NDTiff or TIFF, not OME-Zarr",
    "napari-micromanager": "napari-micromanager saves TIFF files, not OME-Zarr",
}

_KNOWN = ("software", "require", "attributes", "sentinel_files")


@dataclass(frozen=True)
class Settings:
    """The ``[plugin_settings.markers]`` table of the daemon config."""

    #: Preset names, or ("auto",) for every preset.
    software: tuple[str, ...] = ("auto",)
    #: True: an image with no known marker is not ready.
    require: bool = False
    #: Extra attribute names (a dotted name is also tried as a nested path).
    attributes: tuple[str, ...] = ()
    #: Extra sentinel file names.
    sentinel_files: tuple[str, ...] = ()

    @cached_property
    def presets(self) -> tuple[Preset, ...]:
        names = list(PRESETS) if "auto" in self.software else list(self.software)
        return tuple(PRESETS[n] for n in names)

    @cached_property
    def markers(self) -> tuple[Marker, ...]:
        found: dict[tuple[tuple[str, ...], str], Marker] = {}
        for preset in self.presets:
            for marker in preset.attributes:
                found.setdefault((marker.path, marker.kind), marker)
        for name in self.attributes:
            marker = Marker(tuple(name.split(".")) if "." in name else (name,), "any")
            found.setdefault((marker.path, marker.kind), marker)
            if "." in name:  # the exact key too, e.g. "vendor.done" as one attribute name
                exact = Marker((name,), "any")
                found.setdefault((exact.path, exact.kind), exact)
        return tuple(found.values())

    @cached_property
    def sentinels(self) -> tuple[str, ...]:
        names = [name for preset in self.presets for name in preset.sentinel_files]
        return tuple(dict.fromkeys([*names, *self.sentinel_files]))


def _string_list(table: Mapping[str, Any], key: str) -> list[str]:
    value = table.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"setting plugin_settings.{NAME}.{key}: expected a list of non-empty names, got {value!r}")
    return [v.strip() for v in value]


def settings_from_config(config: Any) -> Settings:
    """Read and check ``config.plugin_settings["markers"]`` (defaults when absent).

    Raises ValueError naming the setting (``plugin_settings.markers.<key>``)
    when a value is wrong or a key unknown.
    """
    table = (getattr(config, "plugin_settings", None) or {}).get(NAME) or {}
    if not isinstance(table, Mapping):
        raise ValueError(f"setting plugin_settings.{NAME}: expected a table of settings, got {table!r}")  # noqa: TRY004 - settings errors are ValueErrors
    unknown = sorted(set(table) - set(_KNOWN))
    if unknown:
        raise ValueError(f"setting plugin_settings.{NAME}.{unknown[0]}: unknown setting (known: {', '.join(_KNOWN)})")
    software = _string_list(table, "software") if "software" in table else ["auto"]
    for name in software:
        if name == "auto" or name in PRESETS:
            continue
        if name.lower() in NO_MARKER:
            raise ValueError(
                f"setting plugin_settings.{NAME}.software: {name!r} has no completion marker to read "
                f"({NO_MARKER[name.lower()]}); use readiness.settle_seconds, sentinel_files or attributes instead"
            )
        hint = f" (did you mean {name.lower()!r}?)" if name.lower() in PRESETS else ""
        raise ValueError(
            f"setting plugin_settings.{NAME}.software: unknown preset {name!r}{hint}; "
            f"known: auto, {', '.join(PRESETS)}"
        )
    require = table.get("require", False)
    if not isinstance(require, bool):
        raise ValueError(f"setting plugin_settings.{NAME}.require: expected true or false, got {require!r}")  # noqa: TRY004 - settings errors are ValueErrors
    attributes = _string_list(table, "attributes")
    sentinels = _string_list(table, "sentinel_files")
    for name in sentinels:
        if "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError(
                f"setting plugin_settings.{NAME}.sentinel_files: {name!r} must be a plain file name "
                "(it is looked for in the image folder and every folder above it up to the container)"
            )
    settings = Settings(tuple(dict.fromkeys(software)), require, tuple(attributes), tuple(sentinels))
    if not settings.markers and not settings.sentinels:
        raise ValueError(
            f"setting plugin_settings.{NAME}.software: empty and no attributes or sentinel_files given: "
            "there is no marker to look for"
        )
    return settings


# ---------------------------------------------------------------------------
# Reading markers
# ---------------------------------------------------------------------------


def _lookup(attrs: Mapping[str, Any], path: tuple[str, ...]) -> tuple[bool, Any]:
    node: Any = attrs
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return False, None
        node = node[key]
    return True, node


def _state(marker: Marker, value: Any) -> str | None:
    """What ``value`` of ``marker`` says: COMPLETE, IN_PROGRESS or None (absent or malformed)."""
    if isinstance(value, bool):
        if marker.kind == "stamp":
            return None
        return COMPLETE if value else IN_PROGRESS
    if marker.kind == "flag":
        return None
    if isinstance(value, int | float):
        return COMPLETE if math.isfinite(value) and value > 0 else None
    if isinstance(value, str):
        return COMPLETE if value.strip() else None
    return None


def attribute_state(attrs: Any, markers: Iterable[Marker]) -> str | None:
    """The state the markers in one group's attributes give (in progress wins over complete)."""
    if not isinstance(attrs, Mapping):
        return None
    scopes = [attrs]
    if isinstance(attrs.get("ome"), Mapping):
        scopes.append(attrs["ome"])
    states = set()
    for marker in markers:
        for scope in scopes:
            present, value = _lookup(scope, marker.path)
            if present:
                state = _state(marker, value)
                if state is not None:
                    states.add(state)
    if IN_PROGRESS in states:
        return IN_PROGRESS
    return COMPLETE if COMPLETE in states else None


def _group_attributes(folder: Path) -> Any:
    try:
        return read_group_attributes(folder)[1]
    except Exception:  # noqa: BLE001 - not a group, unreadable, malformed: no marker here
        return None


def _has_sentinel(folder: Path, names: Iterable[str]) -> bool:
    for name in names:
        try:
            if (folder / name).exists():
                return True
        except OSError:
            continue
    return False


def marker_state(image: Any, container: Path, settings: Settings) -> str | None:
    """COMPLETE, IN_PROGRESS or None: what the nearest group with a marker says.

    Walks from the image group up to the container; in each folder the group
    attributes and the sentinel files are looked at, an "in progress"
    attribute overriding a sentinel file of the same folder. Never raises.
    """
    markers, sentinels = settings.markers, settings.sentinels
    try:
        image_path = Path(image.path)
        folders = folders_up_to(image_path, Path(container))
    except Exception:  # noqa: BLE001 - a strange query object: no opinion
        return None
    for folder in folders:
        if folder == image_path:
            attrs = getattr(image, "attributes", None)
            if not isinstance(attrs, Mapping):
                attrs = _group_attributes(folder)
        else:
            attrs = _group_attributes(folder)
        state = attribute_state(attrs, markers) if markers else None
        if state == IN_PROGRESS:
            return IN_PROGRESS
        if state == COMPLETE or (sentinels and _has_sentinel(folder, sentinels)):
            return COMPLETE
    return None


# ---------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------

#: Set by ``configure``; the defaults until then.
_settings = Settings()


def current_settings() -> Settings:
    """The settings ``configure`` accepted last (defaults before)."""
    return _settings


@hookimpl
def configure(config: Any) -> None:
    """Check ``[plugin_settings.markers]``."""
    global _settings
    _settings = settings_from_config(config)


@hookimpl
def image_ready(query: Any) -> bool | None:
    """True when a completion marker is set, False while a marker says in progress
    (or none was found and ``require`` is on), None otherwise."""
    settings = _settings
    try:
        state = marker_state(query.image, query.container, settings)
    except Exception:  # noqa: BLE001 - readiness must never fail an image over a marker
        state = None
    if state == COMPLETE:
        return True
    if state == IN_PROGRESS:
        return False
    return False if settings.require else None
