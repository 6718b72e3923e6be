"""Connecting to the catalog database and bringing its schema up to date.

SQLite (the default) runs in WAL mode with a busy timeout, and every write
transaction starts with ``BEGIN IMMEDIATE`` so that concurrent writers queue
instead of failing on lock upgrades. PostgreSQL (``postgresql+psycopg://``)
is for catalogs shared by several daemons: connections are checked before
use (``pool_pre_ping``), the password comes from the environment or a private
file (never from logs), and migrations run under an advisory lock so that
daemons starting together upgrade the schema once. The schema is created and
upgraded only by Alembic migrations (``cellseg1d/catalog/migrations``), on
every backend.

When the database goes away during a run, :meth:`Catalog.retry` waits with
backoff and tries again; the outage is logged once when it starts and once
when it ends, however many threads are waiting.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.orm import Session, sessionmaker

from cellseg1d.errors import CatalogError

log = logging.getLogger(__name__)
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_MS = 30_000
#: Environment variable holding the catalog database password.
PASSWORD_ENV = "CELLSEG1D_CATALOG_PASSWORD"
#: Key of the PostgreSQL advisory lock held while migrating (any constant shared by all daemons).
MIGRATION_LOCK_KEY = 0x63656C6C  # "cell"
#: Seconds a PostgreSQL connection attempt may take before it counts as a failure.
PG_CONNECT_TIMEOUT_S = 10
#: First and longest wait between retries while the catalog is unreachable.
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 5.0
_NEVER = threading.Event()  # an event nobody sets: retry for ever
T = TypeVar("T")


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


class _SecretFilter(logging.Filter):
    """Replaces known secrets in log records (message and traceback) with ``***``."""

    def __init__(self) -> None:
        super().__init__("cellseg1d-secrets")
        self.secrets: set[str] = set()

    def scrub(self, value: str) -> str:
        for secret in self.secrets:
            value = value.replace(secret, "***")
        return value

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            record.msg, record.args = self.scrub(record.getMessage()), None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = self.scrub(record.exc_text)
        return True


_SECRETS = _SecretFilter()


def _hide_secret(secret: str) -> None:
    """Keep ``secret`` out of every log line from now on (handlers of the root logger)."""
    if len(secret) < 4:  # replacing one or two characters everywhere would garble the log
        return
    _SECRETS.secrets.add(secret)
    for handler in logging.getLogger().handlers:
        if _SECRETS not in handler.filters:
            handler.addFilter(_SECRETS)


def scrub(message: str) -> str:
    """``message`` with every catalog password replaced by ``***`` (for errors printed, not logged)."""
    return _SECRETS.scrub(message)


def read_password_file(path: Path) -> str:
    """The password in ``path`` (first line); refuses a file others may read."""
    try:
        info = path.stat()
        content = path.read_text(encoding="utf-8")
    except OSError as err:
        raise CatalogError(f"setting catalog.password_file: cannot read {path}: {err.strerror}") from None
    if info.st_mode & (stat.S_IROTH | stat.S_IWOTH):
        raise CatalogError(
            f"setting catalog.password_file: {path} is readable or writable by every user "
            f"(mode {stat.filemode(info.st_mode)}); refusing to use it. Run 'chmod o-rwx {path}' "
            "(0600 or 0640 with the service's group)"
        )
    password = content.splitlines()[0] if content.strip() else ""
    if not password:
        raise CatalogError(f"setting catalog.password_file: {path} is empty")
    return password


def resolve_password(password_file: Path | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The catalog password from ``catalog.password_file`` or ``$CELLSEG1D_CATALOG_PASSWORD`` (not both)."""
    env_value = (os.environ if environ is None else environ).get(PASSWORD_ENV) or None
    if password_file is not None and env_value is not None:
        raise CatalogError(
            f"the catalog password is given twice ({PASSWORD_ENV} and catalog.password_file); keep one"
        )
    return read_password_file(password_file) if password_file is not None else env_value


def is_transient(err: BaseException, backend: str) -> bool:
    """Whether ``err`` means "the catalog cannot be reached right now" (retry) rather than a wrong query."""
    if isinstance(err, DisconnectionError):
        return True
    if not isinstance(err, DBAPIError):
        return False
    if err.connection_invalidated:
        return True
    if backend == "sqlite":
        # Most SQLite OperationalErrors are bugs ("no such column"); only waiting helps with these.
        words = ("locked", "busy", "unable to open", "disk i/o")
        return isinstance(err, OperationalError) and any(w in str(err.orig).lower() for w in words)
    # PostgreSQL drivers raise OperationalError for refused or broken connections, server
    # shutdown and restarts; constraint and syntax errors are other classes.
    return isinstance(err, (OperationalError, InterfaceError))


def _one_line(err: BaseException) -> str:
    text_ = str(getattr(err, "orig", None) or err).strip()
    return scrub(text_.splitlines()[0] if text_ else type(err).__name__)


class Catalog:
    """A handle on the catalog database: engine, sessions, migrations and outage handling."""

    def __init__(self, url: str, *, password_file: Path | None = None, password: str | None = None,
                 connect_timeout: float = PG_CONNECT_TIMEOUT_S) -> None:
        self.url = url
        try:
            parsed = make_url(url)
            backend = parsed.get_backend_name()
        except ArgumentError:
            raise CatalogError(
                f"setting catalog.url: {redact(url)} is not a valid database URL "
                "(expected sqlite:///PATH or postgresql+psycopg://USER@HOST/DB)"
            ) from None
        self.backend = backend
        if parsed.password is not None:
            _hide_secret(str(parsed.password))
        if backend != "sqlite":
            password = password if password is not None else resolve_password(password_file)
            if password is not None and parsed.password is not None:
                raise CatalogError(f"the catalog password is given in catalog.url and in {PASSWORD_ENV} "
                                   "or catalog.password_file; remove it from the URL")
            if password is not None:
                _hide_secret(password)
        try:
            if backend == "sqlite":
                self.engine = _sqlite_engine(url)
            else:
                connect_args: dict[str, Any] = {}
                if backend == "postgresql" and parsed.get_driver_name() == "psycopg":
                    connect_args = {"connect_timeout": max(1, round(connect_timeout)),
                                    "application_name": "cellseg1d"}
                if password is not None:
                    connect_args["password"] = password  # not in the URL: nothing renders it
                self.engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args)
        except (SQLAlchemyError, ImportError, OSError) as err:
            raise CatalogError(f"cannot open the catalog at {redact(url)}: {scrub(str(err))}") from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._outage_lock = threading.Lock()
        self._down_since: float | None = None
        self._up_since = float("-inf")

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        with self._sessions() as session, session.begin():
            yield session

    def migrate(self) -> None:
        """Create or upgrade the schema to the newest migration.

        On PostgreSQL the upgrade runs in one transaction holding an advisory
        lock, so daemons starting at the same moment upgrade once, one after
        the other (the second finds the schema at head).
        """
        from alembic import command

        try:
            with self.engine.begin() as conn:
                if self.backend == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
                cfg = alembic_config(conn)
                command.upgrade(cfg, "head")
        except OperationalError as err:
            raise CatalogError(f"cannot open the catalog at {redact(self.url)}: {_one_line(err)}") from None

    def schema_revision(self) -> str | None:
        """The Alembic revision the database is at (None for an empty database)."""
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def has_schema(self) -> bool:
        """Whether the database has cellseg1d's tables (a clear error if it cannot be reached)."""
        try:
            return inspect(self.engine).has_table("jobs")
        except OperationalError as err:
            raise CatalogError(f"cannot open the catalog at {redact(self.url)}: {_one_line(err)}") from None

    def close(self) -> None:
        self.engine.dispose()

    # -- outages ----------------------------------------------------------------

    def is_transient(self, err: BaseException) -> bool:
        """Whether ``err`` means the catalog is unreachable for now (see :func:`is_transient`)."""
        return is_transient(err, self.backend)

    def note_unreachable(self, err: BaseException) -> None:
        """Record a failed catalog call; logs only when an outage starts."""
        with self._outage_lock:
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("catalog %s unreachable (%s); waiting for it and retrying "
                            "(work in progress is kept)", redact(self.url), _one_line(err))

    def note_reachable(self) -> None:
        """Record a successful catalog call; logs only when an outage ends."""
        if self._down_since is None:  # the common case, without taking the lock
            return
        with self._outage_lock:
            if self._down_since is not None:
                log.info("catalog reachable again after %.0f s", time.monotonic() - self._down_since)
                self._down_since = None
                self._up_since = time.monotonic()

    @property
    def unreachable(self) -> bool:
        """Whether the last catalog call (of any thread) found the catalog unreachable."""
        return self._down_since is not None

    def seconds_since_outage(self) -> float:
        """Seconds since the last outage ended (infinite if there was none; 0 during one)."""
        return 0.0 if self._down_since is not None else time.monotonic() - self._up_since

    def retry(self, fn: Callable[..., T], *args: Any, until: threading.Event | None = None,
              on_wait: Callable[[], None] | None = None, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, called again with backoff for as long as the catalog is unreachable.

        ``fn`` must be one transaction (it is run again from the start). Other
        errors propagate at once; so does the last transient one when
        ``until`` is set. ``on_wait`` is called before each wait (the daemon's
        scheduler feeds the systemd watchdog there: waiting out an outage is
        not a hang).
        """
        delay = RETRY_FIRST_S
        stop = until or _NEVER
        while True:
            try:
                result = fn(*args, **kwargs)
            except SQLAlchemyError as err:
                if not self.is_transient(err) or stop.is_set():
                    raise
                self.note_unreachable(err)
                if on_wait is not None:
                    on_wait()
                if stop.wait(delay):
                    raise
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            self.note_reachable()
            return result

    def ping(self) -> None:
        """One round trip to the database."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def wait_until_reachable(self, until: threading.Event | None = None) -> None:
        """Block until the catalog answers (or ``until`` is set: then raise the last error)."""
        self.retry(self.ping, until=until)


def alembic_config(connection: Any = None) -> Any:
    """An Alembic Config for cellseg1d's migrations, optionally bound to a connection."""
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


def open_catalog(config: Any, connect_timeout: float = PG_CONNECT_TIMEOUT_S) -> Catalog:
    """The catalog of a :class:`cellseg1d.config.Config` (URL and password setting)."""
    return Catalog(config.catalog_url, password_file=config.catalog.password_file, connect_timeout=connect_timeout)
