"""Find OME-Zarr containers under a watched folder and the images inside each.

A *container* is the top-most folder under a watched root whose name ends with
a configured suffix (``.zarr`` by default). Inside it, every zarr group with
``multiscales`` metadata is an *image*: a plain image is the container itself;
an HCS plate has one per field (``A/1/0``); a bioformats2raw layout has one per
series. ``labels`` groups are outputs, never inputs. Symbolic links are never
followed, so nothing outside a watched root is read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from cellseg1d.errors import ImageError
from cellseg1d.ngff.reader import NotAGroup, ome_attributes, read_group_attributes

#: How deep below a container images are looked for (plate/row/column/field).
MAX_IMAGE_DEPTH = 4
OUTPUT_DIR_NAMES = frozenset({"labels"})
#: The files that make a folder a zarr group (v3, then v2).
GROUP_METADATA = ("zarr.json", ".zattrs", ".zgroup")


def is_container_name(name: str, suffixes: Sequence[str]) -> bool:
    lower = name.lower()
    return any(lower.endswith(s.lower()) for s in suffixes)


def container_of(path: Path, root: Path, suffixes: Sequence[str]) -> Path | None:
    """The container that ``path`` (a file or folder under ``root``) belongs to, if any."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        return None
    current = root
    for part in rel.parts:
        current = current / part
        if is_container_name(part, suffixes):
            return current
    return None


def link_on_the_way(path: Path, root: Path) -> Path | None:
    """The first symbolic link between ``root`` (excluded) and ``path`` (included), if any.

    A path reached through a link may lie outside the watched root; such paths are
    neither discovered nor read.
    """
    try:
        rel = path.relative_to(root)
    except ValueError:
        return path
    current = root
    for part in rel.parts:
        current = current / part
        if current.is_symlink():
            return current
    return None


def folders_up_to(image_path: Path, container: Path) -> list[Path]:
    """The image folder and every folder above it up to the container, the container included."""
    folders = [image_path]
    current = image_path
    while current != container and container in current.parents:
        current = current.parent
        folders.append(current)
    if container not in folders:
        folders.append(container)
    return folders


def find_containers(root: Path, suffixes: Sequence[str],
                    on_folder: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Every container under ``root``; does not descend into containers or follow links.

    Folders are listed as a stream (a folder of a million containers is never
    held in memory). ``on_folder`` is called with ``root`` and every folder of
    containers below it, before that folder is listed.
    """
    stack = [root]
    while stack:
        folder = stack.pop()
        if on_folder is not None:
            on_folder(folder)
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    try:
                        if not entry.is_dir(follow_symlinks=False):
                            continue
                    except OSError:
                        continue  # vanished while listing
                    if is_container_name(entry.name, suffixes):
                        yield Path(entry.path)
                    elif not entry.name.startswith("."):
                        stack.append(Path(entry.path))
        except OSError:
            continue  # vanished or unreadable folder: nothing to find there now


def is_output_path(path: Path, container: Path) -> bool:
    """Whether ``path`` lies in a labels group or staging folder (cellseg1d's own outputs)."""
    try:
        parts = path.relative_to(container).parts
    except ValueError:
        return False
    return any(p in OUTPUT_DIR_NAMES for p in parts)


def has_group_metadata(folder: Path) -> bool:
    """Whether ``folder`` has zarr metadata (a folder in a metadata file's place counts: it is reported)."""
    return any(os.path.lexists(folder / n) for n in GROUP_METADATA)


def list_images(container: Path, problems: list[tuple[Path, str]] | None = None) -> list[Path]:
    """Image groups inside ``container`` (the container itself for a plain image).

    Raises ImageError when the container's own metadata cannot be read: the
    caller decides whether that means "still being written" or "bad". A
    sub-group (plate well, field, series) whose metadata cannot be read is
    skipped and, when ``problems`` is given, appended to it as ``(path, error)``
    so the caller can report it once it stays broken; the other groups are
    still listed.
    """
    images: list[Path] = []
    _, attrs = read_group_attributes(container)
    _collect(container, attrs, 0, images, problems if problems is not None else [])
    return images


def _collect(folder: Path, attrs: dict, depth: int, images: list[Path], problems: list[tuple[Path, str]]) -> None:
    if "multiscales" in ome_attributes(attrs):
        images.append(folder)
        return
    if depth >= MAX_IMAGE_DEPTH:
        return
    try:
        children = sorted(
            Path(e.path)
            for e in os.scandir(folder)
            if e.is_dir(follow_symlinks=False) and not e.name.startswith(".") and e.name not in OUTPUT_DIR_NAMES
        )
    except OSError as err:
        problems.append((folder, f"cannot list {folder}: {err.strerror or err}"))
        return
    for child in children:
        try:
            if not has_group_metadata(child):
                continue
            _, child_attrs = read_group_attributes(child)
            _collect(child, child_attrs, depth + 1, images, problems)
        except NotAGroup:
            continue  # an array beside the images (e.g. a plate's extra data)
        except ImageError as err:
            problems.append((child, str(err)))  # possibly still being written: reported once it stays so
        except Exception as err:  # noqa: BLE001 - one odd group never hides its siblings
            problems.append((child, f"cannot read {child}: {type(err).__name__}: {err}"))
