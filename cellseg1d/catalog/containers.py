"""The containers the watcher finished with (table ``containers``): record, look up, page through.

The watcher records a container once every image in it was handed on and
it stayed quiet (:class:`cellseg1d.service.watch.Retired`). At start and at every
rescan the daemon then needs, per container found on disk, one indexed
look-up (is it recorded?) and, per recorded container, a few ``stat`` calls
(is it unchanged?); none of them opens an image. Every function here works
in pages, so nothing is loaded whole, however many containers there are.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from cellseg1d.catalog.db import Catalog
from cellseg1d.catalog.models import Container, utcnow

#: Rows per query (an ``IN`` list or a page).
PAGE = 500


@dataclass(frozen=True)
class ContainerRecord:
    """A container as recorded: where, under which watched folder, its signature and its images."""

    path: str
    root: str
    signature: str
    images: tuple[str, ...]
    id: int = 0


def record_containers(catalog: Catalog, records: Sequence[ContainerRecord]) -> None:
    """Record (or update) finished containers in one transaction per page."""
    for start in range(0, len(records), PAGE):
        page = {r.path: r for r in records[start:start + PAGE]}
        try:
            _record_page(catalog, page)
        except IntegrityError:
            _record_page(catalog, page)  # another daemon recorded one of them meanwhile: now it is an update


def _record_page(catalog: Catalog, page: dict[str, ContainerRecord]) -> None:
    now = utcnow()
    with catalog.session() as s:
        existing = {row.path: row for row in s.scalars(select(Container).where(Container.path.in_(list(page))))}
        for path, rec in page.items():
            row = existing.get(path)
            if row is None:
                s.add(Container(path=path, root=rec.root, signature=rec.signature, images=list(rec.images),
                                recorded_at=now))
            else:
                row.root, row.signature, row.images, row.recorded_at = rec.root, rec.signature, list(rec.images), now


def recorded_among(catalog: Catalog, paths: Iterable[str]) -> set[str]:
    """Which of ``paths`` are recorded containers."""
    wanted = list(paths)
    found: set[str] = set()
    for start in range(0, len(wanted), PAGE):
        with catalog.session() as s:
            found.update(s.scalars(select(Container.path).where(Container.path.in_(wanted[start:start + PAGE]))))
    return found


def recorded_page(catalog: Catalog, roots: Sequence[str], after_id: int = 0,
                  limit: int = PAGE) -> list[ContainerRecord]:
    """Recorded containers under ``roots`` with an id above ``after_id``, by id (keyset paging)."""
    with catalog.session() as s:
        rows: list[Any] = s.execute(
            select(Container.id, Container.path, Container.root, Container.signature, Container.images)
            .where(Container.id > after_id, Container.root.in_(list(roots)))
            .order_by(Container.id).limit(limit)
        ).all()
    return [ContainerRecord(path, root, signature, tuple(images or ()), id_)
            for id_, path, root, signature, images in rows]


def forget_containers(catalog: Catalog, paths: Sequence[str]) -> None:
    """Remove the records of containers that are gone from disk."""
    for start in range(0, len(paths), PAGE):
        with catalog.session() as s:
            s.execute(delete(Container).where(Container.path.in_(list(paths[start:start + PAGE]))))
