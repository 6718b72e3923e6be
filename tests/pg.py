"""A real, private PostgreSQL server for tests: ``initdb`` in a temporary folder, ``pg_ctl`` on loopback.

The server listens on 127.0.0.1 on a free port, with its unix socket in its
own folder. PostgreSQL refuses to run as root, so when the tests run as root
(as in CI containers) the server commands run as the ``postgres`` system user
(``runuser``), which owns the data folder. Authentication: ``trust`` for the
superuser ``postgres`` and for every role but :data:`PASSWORD_ROLE`, which
must give its password (scram-sha-256), so password handling is tested for
real.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

#: A role that logs in with a password (scram-sha-256 over TCP).
PASSWORD_ROLE = "cellseg1d_pw"
PG_USER = "postgres"


def find_pg_bindir() -> Path | None:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``, or None when PostgreSQL is not installed."""
    candidates: list[Path] = []
    if os.environ.get("CELLSEG1D_PG_BINDIR"):
        candidates.append(Path(os.environ["CELLSEG1D_PG_BINDIR"]))
    if shutil.which("pg_config"):
        try:
            out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10)
            candidates.append(Path(out.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    # Debian/Ubuntu keep server binaries out of PATH, one folder per major version (newest first).
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                                           key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit()
                                           else 0, reverse=True)]
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).resolve().parent)  # type: ignore[arg-type]
    for folder in candidates:
        if all((folder / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """One private PostgreSQL server (data folder, port and socket of its own)."""

    def __init__(self, bindir: Path, *, fsync: bool = False) -> None:
        self.bindir = bindir
        self.fsync = fsync
        self.as_root = os.geteuid() == 0
        self.base = Path(tempfile.mkdtemp(prefix="cellseg1d-pg-"))
        self.data = self.base / "data"
        self.sockets = self.base / "sockets"
        self.logfile = self.base / "server.log"
        self.port = _free_port()
        self.host = "127.0.0.1"
        self.password = "pw-" + uuid.uuid4().hex  # PASSWORD_ROLE's; unique, so a leak is easy to spot
        self.sockets.mkdir()
        if self.as_root:
            try:
                user = pwd.getpwnam(PG_USER)
            except KeyError:
                raise RuntimeError(f"running as root and there is no '{PG_USER}' user to run PostgreSQL as")
            for path in (self.base, self.sockets):
                os.chown(path, user.pw_uid, user.pw_gid)
        self.base.chmod(0o700)

    def _run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", PG_USER, "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.base)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}\n"
                               f"{self.log()}")
        return out

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def init(self) -> PgServer:
        """``initdb`` with the authentication rules described in the module docstring."""
        self._run("initdb", "-D", str(self.data), "-U", PG_USER, "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            f"host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n"
            "host all all 127.0.0.1/32 trust\n"
        )
        return self

    def start(self) -> PgServer:
        opts = (f"-c listen_addresses={self.host} -p {self.port} -c unix_socket_directories={self.sockets} "
                f"-c max_connections=200 -c fsync={'on' if self.fsync else 'off'} "
                f"-c full_page_writes={'on' if self.fsync else 'off'}")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-o", opts, "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def admin_url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{PG_USER}@{self.host}:{self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres") -> list[tuple]:
        """Run one statement as the superuser (autocommit); rows if it returns any."""
        import psycopg

        with psycopg.connect(host=self.host, port=self.port, user=PG_USER, dbname=database,
                             autocommit=True) as conn:
            cur = conn.execute(statement)
            return cur.fetchall() if cur.description else []

    def create_database(self, name: str | None = None) -> str:
        """A new empty database owned by :data:`PASSWORD_ROLE`; returns its URL (user ``postgres``, no password)."""
        name = name or "t_" + uuid.uuid4().hex[:12]
        self.sql(f'CREATE DATABASE "{name}" OWNER {PASSWORD_ROLE}')
        return self.admin_url(name)

    def password_url(self, database: str) -> str:
        """URL of ``database`` for :data:`PASSWORD_ROLE`, without the password (give it by env or file)."""
        return f"postgresql+psycopg://{PASSWORD_ROLE}@{self.host}:{self.port}/{database}"

    def setup_roles(self) -> None:
        self.sql(f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD '{self.password}'")

    def destroy(self) -> None:
        if self.data.exists():
            self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


def start_server(*, fsync: bool = False) -> PgServer:
    """Init and start a private server (raises RuntimeError with the server's log if it cannot start)."""
    bindir = find_pg_bindir()
    if bindir is None:
        raise FileNotFoundError("no PostgreSQL server binaries (initdb, pg_ctl, postgres)")
    server = PgServer(bindir, fsync=fsync)
    try:
        server.init().start()
        server.setup_roles()
    except BaseException:
        server.destroy()
        raise
    return server
