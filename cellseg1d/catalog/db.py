"""Connecting to the catalog database and bringing its schema up to date.

SQLite (the default) runs in WAL mode with a busy timeout, and every write
transaction starts with ``BEGIN IMMEDIATE`` so that concurrent writers queue
instead of failing on lock upgrades. The schema is created and upgraded only
by Alembic migrations (``cellseg1d/catalog/migrations``), on every backend.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from cellseg1d.errors import CatalogError

log = logging.getLogger(__name__)
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_MS = 30_000


def _sqlite_engine(url: str) -> Engine:
    db_path = make_url(url).database
    if db_path and db_path != ":memory:":
        path = Path(db_path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():
            # Created private: the catalog lists acquisition paths of a facility.
            fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
    engine = create_engine(url, connect_args={"isolation_level": None, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def redact(url: str) -> str:
    """The URL with any password hidden, for logs and messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid catalog URL>"


class Catalog:
    """A handle on the catalog database: engine, sessions and migrations."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            backend = make_url(url).get_backend_name()
        except ArgumentError:
            raise CatalogError(
                f"setting catalog.url: {redact(url)} is not a valid database URL "
                "(expected sqlite:///PATH or postgresql+psycopg://USER@HOST/DB)"
            ) from None
        self.backend = backend
        try:
            if backend == "sqlite":
                self.engine = _sqlite_engine(url)
            else:
                self.engine = create_engine(url, pool_pre_ping=True)
        except (SQLAlchemyError, ImportError, OSError) as err:
            raise CatalogError(f"cannot open the catalog at {redact(url)}: {err}") from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        with self._sessions() as session, session.begin():
            yield session

    def migrate(self) -> None:
        """Create or upgrade the schema to the newest migration."""
        from alembic import command

        try:
            with self.engine.begin() as conn:
                cfg = alembic_config(conn)
                command.upgrade(cfg, "head")
        except OperationalError as err:
            raise CatalogError(f"cannot open the catalog at {redact(self.url)}: {err.orig}") from None

    def schema_revision(self) -> str | None:
        """The Alembic revision the database is at (None for an empty database)."""
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def has_schema(self) -> bool:
        return inspect(self.engine).has_table("jobs")

    def close(self) -> None:
        self.engine.dispose()


def alembic_config(connection: Any = None) -> Any:
    """An Alembic Config for cellseg1d's migrations, optionally bound to a connection."""
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg
