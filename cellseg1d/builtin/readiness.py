"""Built-in readiness plugin: completion markers (attributes or sentinel files)."""

from __future__ import annotations

from pathlib import Path

from cellseg1d.hookspecs import hookimpl
from cellseg1d.ngff.discover import folders_up_to
from cellseg1d.ngff.reader import read_group_attributes
from cellseg1d.errors import ImageError
from cellseg1d.types import ReadinessQuery


def has_completion_marker(image_path: Path, container: Path, attributes: list[str], sentinels: list[str]) -> bool:
    """Whether the image or a group above it (up to the container) carries a completion marker."""
    for folder in folders_up_to(image_path, container):
        if any((folder / name).exists() for name in sentinels):
            return True
        try:
            _, attrs = read_group_attributes(folder)
        except ImageError:
            continue
        scopes = [attrs, attrs.get("ome") if isinstance(attrs.get("ome"), dict) else {}]
        if any(scope.get(key) for scope in scopes for key in attributes):
            return True
    return False


@hookimpl(trylast=True)
def image_ready(query: ReadinessQuery) -> bool | None:
    """Ready unless a completion marker is required and absent."""
    settings = query.settings
    if not settings.require_marker:
        return None
    return has_completion_marker(
        query.image.path, query.container, settings.marker_attributes, settings.sentinel_files
    )
