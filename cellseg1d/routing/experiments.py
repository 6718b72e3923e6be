"""Which experiment an image belongs to: the per-root rules of the config (``watch.roots[i].experiments``).

A rule matches the image's path under its watched folder (a glob or a
regular expression with named groups) or reads a key from the OME-Zarr
attributes of the image or a group above it. The first rule that matches
names the experiment. This module is registered as a ``trylast``
``resolve_experiment`` implementation, so site plugins answer first and the
rules decide for every image no plugin claimed; when nothing answers the
experiment is ``"default"``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from cellseg1d.config import ExperimentRule, WatchRoot
from cellseg1d.errors import ImageError
from cellseg1d.hookspecs import hookimpl
from cellseg1d.ngff.reader import read_group_attributes

#: The experiment of an image that no plugin and no rule placed.
DEFAULT_EXPERIMENT = "default"
#: Plugin name this module is registered under.
PLUGIN_NAME = "experiment-rules"
_MAX_NAME = 200


@lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """A regular expression for a path glob: ``*`` and ``?`` stay within a folder, ``**`` spans folders."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def _glob_matches(pattern: str, relative: str) -> bool:
    """Whether ``pattern`` matches the path or one of its leading folders (``hela/*`` matches images in a container)."""
    regex = glob_regex(pattern)
    parts = relative.split("/")
    return any(regex.fullmatch("/".join(parts[:n])) for n in range(len(parts), 0, -1))


def _lookup(attributes: dict[str, Any], dotted: str) -> Any:
    value: Any = attributes
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _metadata_value(dotted: str, image_path: Path, root_path: Path, attributes: dict[str, Any]) -> str | None:
    """The value of ``dotted`` in the image's attributes, else in the nearest group above it (within the root)."""
    value = _lookup(attributes, dotted)
    folder = image_path.parent
    while value is None and folder != root_path and root_path in folder.parents:
        try:
            value = _lookup(read_group_attributes(folder)[1], dotted)
        except ImageError:
            pass  # not a zarr group (a plain folder): keep looking above
        folder = folder.parent
    if value is None or isinstance(value, dict | list) or value == "":
        return None
    return str(value)


def _fill(template: str, values: dict[str, str | None]) -> str | None:
    name = template.format_map({k: v or "" for k, v in values.items()}).strip()
    if not name or len(name) > _MAX_NAME or any(ord(ch) < 32 for ch in name):
        return None
    return name


def match_rules(rules: Sequence[ExperimentRule], image_path: Path, root_path: Path,
                attributes: dict[str, Any]) -> str | None:
    """The experiment named by the first rule that matches the image, or None.

    ``image_path`` lies under ``root_path``; ``attributes`` are the image
    group's attributes. A rule whose template fills to an empty name does
    not match.
    """
    try:
        relative = image_path.relative_to(root_path).as_posix()
    except ValueError:
        relative = image_path.as_posix()
    for rule in rules:
        name: str | None = None
        if rule.glob is not None:
            if _glob_matches(rule.glob, relative):
                name = _fill(rule.experiment, {})
        elif rule.regex is not None:
            found = re.search(rule.regex, relative)
            if found:
                name = _fill(rule.experiment, found.groupdict())
        elif rule.metadata is not None:
            value = _metadata_value(rule.metadata, image_path, root_path, attributes)
            if value is not None:
                name = _fill(rule.experiment, {"value": value})
        if name is not None:
            return name
    return None


@hookimpl(trylast=True)
def resolve_experiment(image: Any, root: WatchRoot) -> str | None:
    """The config's rules for ``root`` (asked after every plugin)."""
    rules = getattr(root, "experiments", None)
    if not rules:
        return None
    return match_rules(rules, Path(image.path), Path(root.path), image.attributes)
