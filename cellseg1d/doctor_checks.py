"""The checks of ``cellseg1d doctor``: each looks at one part of a daemon's setup and says what to do.

Every check returns :class:`Check` rows (name, status, message, fix,
details). Checks only look: they create nothing in the state dir, never
create a SQLite catalog, never migrate and never load the SAM checkpoint, so
doctor is safe to run beside a running daemon. :func:`run_checks` runs them
in order and turns any unexpected exception into a failing row naming the
check, so the command itself never ends in a traceback.

Pure helpers (mountinfo parsing, the inotify and disk-space verdicts, the
folder count) take their inputs as parameters so that they can be tested
without the machine's real limits.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from cellseg1d.ngff.discover import is_container_name

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
_RANK = {SKIP: 0, OK: 1, WARN: 2, FAIL: 3}

#: Free space below which a location fails (a label image or the catalog cannot be written safely).
DISK_FAIL_BYTES = 100 * 1024**2
#: Free space below which a location is a warning.
DISK_WARN_BYTES = 1024**3
#: Share of the inotify watch limit above which the folder count is a warning.
INOTIFY_WARN_SHARE = 0.8
#: Seconds the folder count may take before it stops and reports "at least N".
FOLDER_COUNT_BUDGET_S = 3.0
#: Connect timeout (seconds) for a PostgreSQL catalog while doctor checks it.
PG_CONNECT_TIMEOUT_S = 5

MOUNTINFO = Path("/proc/self/mountinfo")
INOTIFY_MAX_USER_WATCHES = Path("/proc/sys/fs/inotify/max_user_watches")

#: Filesystems whose changes made on other machines produce no inotify event here.
NETWORK_FS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "smb", "ncpfs", "9p", "afs", "ceph", "glusterfs", "lustre",
    "beegfs", "gpfs", "ocfs2", "gfs2", "orangefs", "pvfs2", "virtiofs", "vboxsf", "prl_fs", "vmhgfs",
    "davfs", "coda", "fuse.sshfs", "fuse.glusterfs", "fuse.ceph-fuse", "fuse.rclone", "fuse.s3fs",
    "fuse.gcsfuse", "fuse.juicefs", "fuse.davfs2", "fuse.vmhgfs-fuse", "fuse.beegfs", "fuse.lizardfs",
    "fuse.moosefs", "fuse.mfs", "fuse.seaweedfs", "fuse.goofys", "fuse.blobfuse", "fuse.blobfuse2",
})


@dataclass
class Context:
    """What the checks share: the parsed config and what earlier checks found."""

    config: Any
    #: The config file (None: defaults and command-line options only).
    config_file: Path | None = None
    #: sha256 of sam.checkpoint, once the checkpoint check hashed it.
    base_sha256: str | None = None
    #: The backbone read from sam.checkpoint (vit_b, vit_l, vit_h), once the checkpoint check read it.
    base_model_type: str | None = None
    #: The open catalog, once the catalog check found it at this version's schema.
    catalog: Any = None


@dataclass
class Check:
    """One row of the doctor's report."""

    name: str
    status: str
    message: str
    fix: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def worst(statuses: Iterable[str]) -> str:
    """The most serious of ``statuses`` (fail > warn > ok > skip); ok for none."""
    found = list(statuses)
    return max(found, key=_RANK.__getitem__) if found else OK


def _merge(name: str, problems: list[tuple[str, str, str]], ok_message: str,
           details: dict[str, Any] | None = None) -> Check:
    """One row from (status, message, fix) problems: the worst status, every message and fix."""
    if not problems:
        return Check(name, OK, ok_message, "", details or {})
    fixes = [fix for _, _, fix in problems if fix]
    return Check(name, worst(s for s, _, _ in problems), "; ".join(m for _, m, _ in problems),
                 " ".join(dict.fromkeys(fixes)), details or {})


def _user(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _gib(n: float) -> str:
    return f"{n / 1024**3:.1f} GiB"


def _size(n: float) -> str:
    return _gib(n) if n >= 1024**3 else f"{n / 1024**2:.0f} MiB"


def nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest ancestor that exists (for "can it be created?")."""
    current = path
    while not os.path.lexists(current) and current != current.parent:
        current = current.parent
    return current


def _creatable(path: Path) -> str | None:
    """Why ``path`` (which does not exist) cannot be created by this user, or None if it can."""
    ancestor = nearest_existing(path)
    if not ancestor.is_dir():
        return f"{ancestor} is not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable by {_user(os.geteuid())}"
    return None


# -- 1. config -------------------------------------------------------------------------------------------


def check_config(load_config: Callable[[], Any], source: Path | None) -> tuple[Any, Check]:
    """(the Config or None, its row): parses the config the way the daemon would."""
    from cellseg1d.errors import ConfigError

    where = str(source) if source is not None else "no config file (defaults and command-line options)"
    try:
        config = load_config()
    except ConfigError as err:
        text = str(err)
        if source is not None and str(source) not in text:
            text = f"{source}: {text}"
        return None, Check("config", FAIL, text,
                           "correct the setting or the syntax named above (every setting, with its default, "
                           "is described in deploy/cellseg1d.toml)", {"file": str(source) if source else None})
    except OSError as err:
        return None, Check("config", FAIL, f"config file {source}: cannot be read: {err.strerror or err}",
                           "pass a readable TOML file with --config", {"file": str(source)})
    message = f"{where} parsed" if source is not None else f"{where}; state dir {config.state_dir}"
    return config, Check("config", OK, message, "", {"file": str(source) if source else None})


# -- 2. watched folders ----------------------------------------------------------------------------------


def check_roots(ctx: Context) -> list[Check]:
    """Each watched folder exists, is a readable folder, and its labels can be written."""
    roots = ctx.config.watch.roots
    if not roots:
        if ctx.config_file is not None:
            return [Check("watch.roots", FAIL, "watch.roots: no folder to watch is configured; the daemon "
                          "refuses to start",
                          "add a [[watch.roots]] table with path = '/data/acquisitions' to the config file")]
        return [Check("watch.roots", WARN, "watch.roots: no config file, so no watched folder to check "
                      "(a quick-start daemon gets them from 'cellseg1d run --watch DIR')",
                      "pass --config FILE to check the folders a service watches")]
    return [_check_root(i, root) for i, root in enumerate(roots)]


def _check_root(i: int, root: Any) -> Check:
    name = f"watch.roots[{i}]"
    key = f"watch.roots[{i}].path"
    path: Path = root.path
    details = {"path": str(path), "output": root.output,
               "mirror_root": str(root.mirror_root) if root.mirror_root else None}
    user = _user(os.geteuid())
    if not os.path.lexists(path):
        return Check(name, FAIL, f"{key}: {path} does not exist", "create the folder or correct the path",
                     details)
    if not path.is_dir():
        return Check(name, FAIL, f"{key}: {path} is not a folder", "point the setting at the acquisition folder",
                     details)
    if not os.access(path, os.R_OK | os.X_OK):
        return Check(name, FAIL, f"{key}: {path} is not readable by {user}",
                     f"give {user} read access (e.g. its group), or run the daemon as a user that has it",
                     details)
    problems: list[tuple[str, str, str]] = []
    if root.output == "in_place":
        if not os.access(path, os.W_OK | os.X_OK):
            problems.append((FAIL, (f"{key}: {path} is not writable by {user}, but labels are written inside "
                             "each image (output = \"in_place\")"),
                             f"give {user} write access, or set output = \"mirror\" with a writable mirror_root"))
        where = f"labels go inside the images (in place, {path} writable)"
    else:
        mirror: Path = root.mirror_root
        mkey = f"watch.roots[{i}].mirror_root"
        if os.path.lexists(mirror):
            if not mirror.is_dir():
                problems.append((FAIL, f"{mkey}: {mirror} is not a folder", "point mirror_root at a folder"))
            elif not os.access(mirror, os.W_OK | os.X_OK):
                problems.append((FAIL, f"{mkey}: {mirror} is not writable by {user}",
                                 f"give {user} write access to {mirror} or choose another mirror_root"))
            where = f"labels go to mirror_root {mirror} (writable)"
        else:
            why = _creatable(mirror)
            if why:
                problems.append((FAIL, f"{mkey}: {mirror} does not exist and cannot be created: {why}",
                                 "create the folder, or choose a mirror_root that can be created"))
            where = f"labels go to mirror_root {mirror} (created at the first result)"
    return _merge(name, problems, f"{path}: readable folder; {where}", details)


# -- 3. filesystem type ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo."""

    mount_point: str
    fstype: str
    source: str


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), text)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a /proc/self/mountinfo text, in order (malformed lines are skipped)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-", 6)
            mounts.append(Mount(_unescape(fields[4]), fields[sep + 1], _unescape(fields[sep + 2])))
        except (ValueError, IndexError):
            continue
    return mounts


def find_mount(path: Path | str, mounts: Sequence[Mount]) -> Mount | None:
    """The mount holding ``path``: the longest mount point that is a prefix of it (the last one on ties)."""
    target = PurePosixPath(path)
    best: Mount | None = None
    for mount in mounts:
        point = PurePosixPath(mount.mount_point)
        inside = target == point or target.is_relative_to(point)
        if inside and (best is None or len(point.parts) >= len(PurePosixPath(best.mount_point).parts)):
            best = mount
    return best


def classify_fstype(fstype: str) -> str:
    """"network", "fuse" (user-space: unknown, maybe network) or "local"."""
    if fstype in NETWORK_FS or fstype.split(".")[0] in NETWORK_FS:
        return "network"
    if fstype == "fuse" or fstype.startswith("fuse."):
        return "fuse"
    return "local"


def filesystem_check(name: str, key: str, path: Path, polling: bool, mounts: Sequence[Mount]) -> Check:
    """The filesystem verdict for one watched folder, from parsed mountinfo."""
    mount = find_mount(path, mounts)
    if mount is None:
        return Check(name, SKIP, f"{key}: no mount found for {path} in the mount table")
    kind = classify_fstype(mount.fstype)
    details = {"path": str(path), "fstype": mount.fstype, "mount_point": mount.mount_point,
               "source": mount.source, "kind": kind}
    on = f"{path} is on {mount.fstype} (mounted at {mount.mount_point} from {mount.source})"
    if kind == "local":
        note = "; watch.polling = true works here but inotify (polling = false) is cheaper" if polling else ""
        return Check(name, OK, f"{on}: local{note}", "", details)
    if polling:
        return Check(name, OK, f"{on}: a network filesystem, watched by polling (watch.polling = true)", "",
                     details)
    if kind == "network":
        return Check(name, WARN, f"{key}: {on}, a network filesystem: inotify sees no changes made by other "
                     "machines; set watch.polling = true",
                     "set polling = true in [watch] (until then only the rescan every watch.rescan_seconds "
                     "finds new images)", details)
    return Check(name, WARN, f"{key}: {on}, a FUSE filesystem: inotify may see no changes made elsewhere "
                 "(e.g. on a network share behind it); set watch.polling = true if other machines write here",
                 "set polling = true in [watch] when the microscope writes over the network", details)


def check_filesystems(ctx: Context) -> list[Check]:
    """Network or local filesystem of each watched folder."""
    config = ctx.config
    roots = [(i, r) for i, r in enumerate(config.watch.roots) if r.path.is_dir()]
    if not roots:
        return []
    try:
        mounts = parse_mountinfo(MOUNTINFO.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return [Check("filesystem", SKIP, f"{MOUNTINFO} cannot be read (not Linux?): filesystem types not checked")]
    return [filesystem_check(f"watch.roots[{i}] filesystem", f"watch.roots[{i}].path", r.path.resolve(),
                             config.watch.polling, mounts) for i, r in roots]


# -- 4. inotify watch limit ------------------------------------------------------------------------------


def count_folders(roots: Sequence[Path], stop_after: int, budget_s: float = FOLDER_COUNT_BUDGET_S,
                  clock: Callable[[], float] = time.monotonic, suffixes: Sequence[str] = ()) -> tuple[int, bool]:
    """(folders under ``roots``, roots included; whether the count is complete).

    Links are not followed, and folders whose name ends in one of
    ``suffixes`` (containers) are neither counted nor entered: the watcher
    watches a container's folders only while it is being written. Counting
    stops at ``stop_after`` folders or when ``budget_s`` seconds have
    passed; the count is then a lower bound.
    """
    deadline = clock() + budget_s
    count = 0
    pending = [p for p in roots if p.is_dir()]
    count += len(pending)
    while pending:
        if count >= stop_after or clock() > deadline:
            return count, False
        folder = pending.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False) and not is_container_name(entry.name, suffixes):
                            count += 1
                            pending.append(Path(entry.path))
                    except OSError:
                        continue
        except OSError:
            continue
    return count, True


def inotify_check(folders: int, complete: bool, limit: int, polling: bool) -> Check:
    """The verdict on ``folders`` folders (a lower bound unless ``complete``) against the watch limit."""
    counted = f"{folders} folder(s)" if complete else f"at least {folders} folders (counting stopped)"
    details = {"folders": folders, "complete": complete, "max_user_watches": limit, "polling": polling}
    limit_text = f"fs.inotify.max_user_watches = {limit}"
    raise_fix = ("raise the limit: echo fs.inotify.max_user_watches=1048576 | sudo tee "
                 "/etc/sysctl.d/90-cellseg1d.conf && sudo sysctl --system")
    if polling:
        if folders > limit:
            return Check("inotify", WARN, f"{counted} under the watched folders, more than {limit_text}; "
                         "inotify is not used (watch.polling = true), but polling stats all of them every "
                         "watch.poll_interval_seconds", "move finished acquisitions out of the watched folders, "
                         "or raise watch.poll_interval_seconds", details)
        return Check("inotify", OK, f"{counted} under the watched folders; inotify is not used "
                     f"(watch.polling = true), {limit_text}", "", details)
    if folders > limit:
        return Check("inotify", FAIL, f"{counted} holding containers under the watched folders need one inotify watch each, more "
                     f"than {limit_text}: new images in the rest are found only by the rescan",
                     f"{raise_fix}; or set watch.polling = true", details)
    if folders >= INOTIFY_WARN_SHARE * limit:
        return Check("inotify", WARN, f"{counted} under the watched folders use "
                     f"{100 * folders / limit:.0f}% of {limit_text} (other programs of this user share it)",
                     raise_fix, details)
    if not complete:
        return Check("inotify", WARN, f"{counted} under the watched folders within "
                     f"{FOLDER_COUNT_BUDGET_S:.0f} s: cannot tell whether they fit {limit_text}",
                     f"check the count (find ROOT -type d | wc -l) against the limit; {raise_fix}", details)
    return Check("inotify", OK, f"{counted} under the watched folders, {limit_text} "
                 f"({100 * folders / limit:.1f}% used by them)", "", details)


def check_inotify(ctx: Context) -> list[Check]:
    """inotify watch limit vs. the folders the watcher would watch."""
    config = ctx.config
    roots = [r.path for r in config.watch.roots if r.path.is_dir()]
    if not roots:
        return [Check("inotify", SKIP, "no existing watched folder to count")]
    try:
        limit = int(INOTIFY_MAX_USER_WATCHES.read_text().strip())
    except (OSError, ValueError):
        if config.watch.polling:
            return [Check("inotify", OK, "inotify is not used (watch.polling = true)")]
        return [Check("inotify", SKIP, f"{INOTIFY_MAX_USER_WATCHES} cannot be read (not Linux?): watch limit "
                      "not checked")]
    folders, complete = count_folders(roots, limit + 1, suffixes=config.watch.container_suffixes)
    return [inotify_check(folders, complete, limit, config.watch.polling)]


# -- 5. state dir ----------------------------------------------------------------------------------------


def _daemon_pid(state_dir: Path) -> int | None:
    """The pid in ``daemon.lock`` if that process exists (read only: the lock itself is not touched)."""
    try:
        pid = int((state_dir / "daemon.lock").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def check_state_dir(ctx: Context) -> list[Check]:
    """The state dir: a private folder of this user, writable (created by the daemon if missing)."""
    config = ctx.config
    path: Path = config.state_dir
    details: dict[str, Any] = {"path": str(path)}
    me = os.geteuid()
    if not os.path.lexists(path):
        why = _creatable(path)
        if why:
            return [Check("state_dir", FAIL, f"state_dir: {path} does not exist and cannot be created: {why}",
                          "create it for the service user (install -d -m 700 -o USER DIR) or choose another "
                          "state_dir", details)]
        return [Check("state_dir", WARN, f"state_dir: {path} does not exist yet; the daemon creates it "
                      "(mode 0700) at its first start", "", details)]
    if not path.is_dir():
        return [Check("state_dir", FAIL, f"state_dir: {path} is not a folder", "choose a folder for state_dir",
                      details)]
    info = path.stat()
    mode = stat.S_IMODE(info.st_mode)
    details.update(mode=f"{mode:04o}", owner=_user(info.st_uid))
    problems: list[tuple[str, str, str]] = []
    if not os.access(path, os.W_OK | os.X_OK):
        problems.append((FAIL, f"state_dir: {path} is not writable by {_user(me)}",
                         f"chown the folder to the service user or run as its owner ({_user(info.st_uid)})"))
    if info.st_uid != me:
        problems.append((WARN, (f"state_dir: {path} is owned by {_user(info.st_uid)}, not by {_user(me)} "
                         "who runs this check"),
                         ("run doctor as the service user (sudo -u USER cellseg1d doctor ...), or chown the "
                         "folder to it")))
    if mode & stat.S_IWOTH:
        problems.append((FAIL, (f"state_dir: {path} has mode {mode:04o}: every user may write into it (and "
                         "replace the catalog)"), f"chmod 700 {path}"))
    elif mode & (stat.S_IRWXG | stat.S_IRWXO):
        problems.append((WARN, (f"state_dir: {path} has mode {mode:04o}: other users may look into it (the "
                         "catalog lists the facility's acquisition paths); 0700 expected"),
                         f"chmod 700 {path} (the daemon also makes it 0700 at its next start)"))
    sqlite = path / "catalog.sqlite"
    if config.catalog.url is None and sqlite.is_file():
        file_mode = stat.S_IMODE(sqlite.stat().st_mode)
        if file_mode & stat.S_IRWXO:
            problems.append((WARN, f"state_dir: {sqlite} has mode {file_mode:04o}: readable by every user",
                             f"chmod 600 {sqlite}"))
    pid = _daemon_pid(path)
    details["daemon_pid"] = pid
    running = f"; a daemon (pid {pid}) is using it" if pid else ""
    return [_merge("state_dir", problems, f"{path}: private folder (mode {mode:04o}) of {_user(info.st_uid)}, "
                   f"writable{running}", details)]


# -- 6. disk space ---------------------------------------------------------------------------------------


def disk_space_status(free_bytes: int) -> str:
    """fail below :data:`DISK_FAIL_BYTES`, warn below :data:`DISK_WARN_BYTES`, else ok."""
    if free_bytes < DISK_FAIL_BYTES:
        return FAIL
    if free_bytes < DISK_WARN_BYTES:
        return WARN
    return OK


def _space_row(name: str, key: str, path: Path) -> Check:
    where = nearest_existing(path)
    usage = shutil.disk_usage(where)
    status = disk_space_status(usage.free)
    details = {"path": str(path), "measured_at": str(where), "free_bytes": usage.free,
               "total_bytes": usage.total}
    text = f"{key}: {_size(usage.free)} free of {_size(usage.total)} at {where}"
    if status == OK:
        return Check(name, OK, text, "", details)
    limit = DISK_FAIL_BYTES if status == FAIL else DISK_WARN_BYTES
    return Check(name, status, f"{text} (below {_size(limit)})",
                 "free space on that filesystem (old acquisitions, exports) or move the folder", details)


def check_disk_space(ctx: Context) -> list[Check]:
    """Free space for the state dir and every place labels are written."""
    config = ctx.config
    rows = [_space_row("disk space: state_dir", "state_dir", config.state_dir)]
    for i, root in enumerate(config.watch.roots):
        if root.output == "mirror":
            target, key = root.mirror_root, f"watch.roots[{i}].mirror_root"
        else:
            target, key = root.path, f"watch.roots[{i}].path"
        if not os.path.lexists(target) and not nearest_existing(target).is_dir():
            continue  # already a failing row of the folder check
        rows.append(_space_row(f"disk space: watch.roots[{i}]", key, target))
    return rows


# -- 7. catalog ------------------------------------------------------------------------------------------


def migration_state(current: str | None) -> tuple[str, list[str]]:
    """(head revision, revisions still to apply to a database at ``current``, oldest first).

    Raises KeyError when ``current`` is not a revision this cellseg1d knows.
    """
    from alembic.script import ScriptDirectory

    from cellseg1d.catalog.db import alembic_config

    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    if current is not None:
        try:
            script.get_revision(current)
        except Exception as err:  # alembic raises several kinds for an unknown revision
            raise KeyError(current) from err
    pending = [r.revision for r in script.iterate_revisions("heads", current or "base")]
    return head, list(reversed(pending))


def check_catalog(ctx: Context) -> list[Check]:
    """The catalog answers and its schema is at this version's head (``ctx.catalog`` is set then)."""
    config = ctx.config
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from cellseg1d.catalog.db import _one_line, open_catalog, redact
    from cellseg1d.errors import CellsegError

    url = config.catalog_url
    shown = redact(url)
    details: dict[str, Any] = {"url": shown}
    try:
        parsed = make_url(url)
    except ArgumentError:
        return [Check("catalog", FAIL, f"catalog.url: {shown} is not a valid database URL",
                      "expected sqlite:///PATH or postgresql+psycopg://USER@HOST/DB", details)]
    reach_fix = ("check catalog.url (host, port, database name), that the server runs and accepts this "
                 "machine, and the password (catalog.password_file or CELLSEG1D_CATALOG_PASSWORD)")
    if parsed.get_backend_name() == "sqlite":
        reach_fix = "check the state dir and the catalog file's permissions"
        db_file = parsed.database
        if not db_file or db_file == ":memory:":
            return [Check("catalog", WARN, f"catalog.url: {shown} is an in-memory database: nothing is kept "
                          "between starts", "use a file (sqlite:///PATH) or leave catalog.url empty", details)]
        if not Path(db_file).exists():
            return [Check("catalog", WARN, f"catalog: {db_file} does not exist yet; it is created at the "
                          "first start", "", details)]
    try:
        catalog = open_catalog(config, connect_timeout=PG_CONNECT_TIMEOUT_S)
    except CellsegError as err:
        return [Check("catalog", FAIL, str(err), reach_fix, details)]
    try:
        catalog.ping()
        current = catalog.schema_revision()
        has_tables = catalog.has_schema()
    except (SQLAlchemyError, CellsegError, OSError) as err:
        catalog.close()
        return [Check("catalog", FAIL, f"catalog: cannot reach {shown}: {_one_line(err)}", reach_fix, details)]
    details["revision"] = current
    try:
        head, pending = migration_state(current)
    except KeyError:
        catalog.close()
        return [Check("catalog", FAIL, f"catalog at {shown}: schema revision {current} is unknown to this "
                      "cellseg1d (written by a newer version?)",
                      "upgrade cellseg1d to the version the other daemons run", details)]
    details.update(head=head, pending=pending)
    if current is None:
        catalog.close()
        if has_tables:
            return [Check("catalog", FAIL, f"catalog at {shown}: cellseg1d tables without a schema revision "
                          "(alembic_version is missing)", "restore the catalog from a backup", details)]
        return [Check("catalog", WARN, f"catalog at {shown}: empty database; the daemon creates the schema at "
                      "its first start", "", details)]
    if pending:
        catalog.close()
        return [Check("catalog", FAIL, f"catalog at {shown}: schema at revision {current}, {len(pending)} "
                      f"migration(s) pending ({', '.join(pending)}, head {head})",
                      "back up the catalog, then start this version's daemon: it applies the migrations at "
                      "start", details)]
    ctx.catalog = catalog
    return [Check("catalog", OK, f"{shown} reachable, schema at head ({head})", "", details)]


# -- 8. SAM checkpoint and fallback adapter --------------------------------------------------------------


def check_checkpoint(ctx: Context) -> list[Check]:
    """sam.checkpoint exists, its backbone is read from its shapes, and it is the official file of that
    backbone (or custom files are allowed); a set sam.model_type must be that backbone."""
    sam = ctx.config.sam
    path: Path | None = sam.checkpoint
    if path is None:
        return [Check("sam.checkpoint", OK, "SAM off (sam.checkpoint not set): the classical segmenter runs")]
    details: dict[str, Any] = {"path": str(path), "model_type": None, "configured_model_type": sam.model_type}
    if ctx.config.executor.kind != "local" and not os.path.lexists(path):
        return [Check("sam.checkpoint", SKIP, f"{path} is the Dask workers' file (executor.kind = "
                      f"'{ctx.config.executor.kind}'): the executor row checks that they see it; each worker "
                      "checks its sha256 when it loads it", "", details)]
    from cellseg1d.model.checkpoint import OFFICIAL, CheckpointError, checkpoint_model_type, sha256_file
    from cellseg1d.model.sam import SPECS

    if sam.model_type is not None and sam.model_type not in SPECS:
        return [Check("sam.checkpoint", FAIL, f"sam.model_type: {sam.model_type!r} is not a SAM model type "
                      f"(known: {', '.join(s for s in SPECS if s != 'tiny')})", "leave sam.model_type out: the "
                      "backbone is read from the checkpoint", details)]
    # the official type this file is meant to be: the setting, else the official file name
    meant = sam.model_type if sam.model_type in OFFICIAL else next(
        (name for name, item in OFFICIAL.items() if item.filename == path.name), None)
    official = OFFICIAL.get(meant) if meant else None
    fetch = (f"correct the path, or run 'cellseg1d models fetch {meant} --model-dir {path.parent}' "
             f"(or copy {official.filename} there) and point sam.checkpoint at it" if official
             else f"correct the path, or run 'cellseg1d models fetch vit_h --model-dir {path.parent}' (the "
                  "paper's backbone; or vit_l, vit_b) and point sam.checkpoint at it")
    if not os.path.lexists(path):
        return [Check("sam.checkpoint", FAIL, f"sam.checkpoint: {path} does not exist", fetch, details)]
    if not path.is_file():
        return [Check("sam.checkpoint", FAIL, f"sam.checkpoint: {path} is not a file", fetch, details)]
    started = time.monotonic()
    sha = sha256_file(path)
    details.update(sha256=sha, size_bytes=path.stat().st_size, hash_seconds=round(time.monotonic() - started, 2))
    ctx.base_sha256 = sha
    try:  # from the hash when official, else from the shapes (memory-mapped: no weights are loaded)
        model_type = checkpoint_model_type(path, sha256=sha)
    except CheckpointError as err:
        if official is not None:
            return [Check("sam.checkpoint", FAIL, f"sam.checkpoint: {path} is not the official {meant} "
                          f"checkpoint (sha256 {sha}, expected {official.sha256}) and cannot be used: {err}",
                          f"if the download was incomplete or corrupted, delete it and run 'cellseg1d models "
                          f"fetch {meant} --model-dir {path.parent}'", details)]
        return [Check("sam.checkpoint", FAIL, f"sam.checkpoint: {err}", fetch, details)]
    details["model_type"] = model_type
    if sam.model_type is not None and sam.model_type != model_type:
        return [Check("sam.checkpoint", FAIL, f"sam.checkpoint: {path} is a {model_type} checkpoint (read from "
                      f"its shapes) but sam.model_type is {sam.model_type!r}",
                      f"leave sam.model_type out (the backbone is read from the checkpoint), or point "
                      f"sam.checkpoint at a {sam.model_type} checkpoint", details)]
    ctx.base_model_type = model_type
    official = OFFICIAL.get(model_type)
    if official is not None and sha == official.sha256:
        return [Check("sam.checkpoint", OK, f"{path}: the official {model_type} checkpoint "
                      f"({official.filename}); backbone {model_type} read from the file", "", details)]
    if sam.allow_custom_checkpoint:
        return [Check("sam.checkpoint", OK, f"{path}: a custom {model_type} checkpoint (backbone read from its "
                      f"shapes; sha256 {sha[:12]}...), allowed by sam.allow_custom_checkpoint = true; only "
                      "loading it at start proves it fits", "", details)]
    if official is None:
        return [Check("sam.checkpoint", FAIL, f"sam.checkpoint: {path}: model type {model_type!r} (read from its "
                      "shapes) has no official checkpoint to verify it against",
                      "set sam.allow_custom_checkpoint = true for a custom base", details)]
    return [Check("sam.checkpoint", FAIL, f"sam.checkpoint: {path} is not the official {model_type} "
                  f"checkpoint (sha256 {sha}, expected {official.sha256}); its shapes are {model_type}'s",
                  f"if the download was incomplete or corrupted, delete it and run 'cellseg1d models fetch "
                  f"{model_type} --model-dir {path.parent}'; for a fine-tuned base set "
                  "sam.allow_custom_checkpoint = true", details)]


def _weights_problems(key: str, folder: Path, meta: Any, registered: str | None) -> list[tuple[str, str, str]]:
    """Problems with the weights of the adapter in ``folder`` (metadata ``meta``, registered sha256 if any)."""
    from cellseg1d.registry import WEIGHTS_FILE, sha256_of

    problems: list[tuple[str, str, str]] = []
    weights = folder / WEIGHTS_FILE
    wanted = registered or meta.weights_sha256
    if not weights.is_file():
        problems.append((FAIL, f"{key}: {weights} is missing", "restore the adapter files"))
    else:
        actual = sha256_of(weights)
        if actual != wanted:
            what = "registered" if registered else "in its adapter.json"
            problems.append((FAIL, f"{key}: {weights} was modified (sha256 {actual}, {what} {wanted})",
                             "restore the adapter files"))
    if registered is not None and meta.weights_sha256 != registered:
        problems.append((FAIL, (f"{key}: the adapter.json in {folder} names weights sha256 {meta.weights_sha256}, "
                         f"not the registered {registered}"), "restore the adapter files"))
    return problems


def _base_problem(ctx: Context, model_type: str, base_sha: str) -> str | None:
    """Why an adapter trained on (``model_type``, ``base_sha``) does not fit the configured SAM, or None.

    The checkpoint's sha256 and backbone are compared when the checkpoint check could read them, else only
    the configured sam.model_type (when set).
    """
    from cellseg1d.registry import BaseModel, base_mismatch

    sam = ctx.config.sam
    if sam.checkpoint is None:
        return None
    if ctx.base_model_type is None:  # the checkpoint row could not read the backbone
        if sam.model_type is not None and model_type != sam.model_type:
            return f"it was trained on a {model_type} SAM but sam.model_type is {sam.model_type}"
        if ctx.base_sha256 is not None and base_sha != ctx.base_sha256:
            return (f"it was trained on base checkpoint sha256 {base_sha} but sam.checkpoint has sha256 "
                    f"{ctx.base_sha256}")
        return None
    return base_mismatch(model_type, base_sha, BaseModel(ctx.base_model_type, ctx.base_sha256, "sam.checkpoint"))


def check_fallback_adapter(ctx: Context) -> list[Check]:
    """sam.adapter (the fallback adapter folder), when set: metadata loads, weights intact, same base."""
    config = ctx.config
    folder: Path | None = config.sam.adapter
    if folder is None:
        return []
    from cellseg1d.model.adapters import AdapterError, read_metadata

    details = {"path": str(folder)}
    try:
        meta = read_metadata(folder)
    except AdapterError as err:
        return [Check("sam.adapter", FAIL, f"sam.adapter: {err}",
                      "point sam.adapter at a folder made by 'cellseg1d train' (adapter.json + "
                      "adapter.safetensors)", details)]
    problems = _weights_problems("sam.adapter", folder, meta, None)
    mismatch = _base_problem(ctx, meta.base_model_type, meta.base_checkpoint_sha256)
    if mismatch:
        problems.append((FAIL, f"sam.adapter: {folder}: {mismatch}",
                         "train the adapter on the configured base (cellseg1d train --checkpoint ...)"))
    unused = "" if config.sam.checkpoint is not None else " (not used while SAM is off)"
    return [_merge("sam.adapter", problems, f"{folder}: adapter {meta.name} for a {meta.base_model_type} "
                   f"base, weights intact{unused}", details)]


# -- 9. registered adapters ------------------------------------------------------------------------------


def check_assigned_adapters(ctx: Context) -> list[Check]:
    """Every adapter assigned to an experiment: store files intact, trained on the configured base."""
    catalog = ctx.catalog
    if catalog is None:
        return [Check("adapters", SKIP, "not checked: the catalog is not available at this version's schema "
                      "(see the catalog row)")]
    from sqlalchemy import select

    from cellseg1d.catalog import Adapter, Assignment, Experiment
    from cellseg1d.model.adapters import AdapterError, read_metadata

    with catalog.session() as session:
        rows = session.execute(
            select(Experiment.name, Adapter).join(Assignment, Assignment.experiment_id == Experiment.id)
            .join(Adapter, Adapter.id == Assignment.adapter_id)
            .where(Assignment.unassigned_at.is_(None)).order_by(Experiment.name)
        ).all()
    if not rows:
        return [Check("adapters", OK, "no adapter is assigned to an experiment")]
    sam_on = ctx.config.sam.checkpoint is not None
    checks = []
    for experiment, row in rows:
        name = f"adapter {row.label} ({experiment})"
        key = f"adapter {row.label} (experiment {experiment})"
        folder = Path(row.store_path)
        details = {"experiment": experiment, "adapter": row.label, "store_path": str(folder), "sha256": row.sha256,
                   "base_model_type": row.base_model_type, "base_sha256": row.base_sha256}
        redo = ("restore the store copy, or register the adapter again (cellseg1d adapters add FOLDER --assign "
                f"{experiment})")
        if not folder.is_dir():
            checks.append(Check(name, FAIL, f"{key}: its store folder {folder} is missing", redo, details))
            continue
        try:
            meta = read_metadata(folder)
        except AdapterError as err:
            checks.append(Check(name, FAIL, f"{key}: {err}", redo, details))
            continue
        problems = [(status, text, redo) for status, text, _ in _weights_problems(key, folder, meta, row.sha256)]
        mismatch = _base_problem(ctx, row.base_model_type, row.base_sha256)
        if mismatch:
            problems.append((FAIL, f"{key}: {mismatch}", (f"assign {experiment} an adapter trained on the "
                             f"configured base (cellseg1d adapters assign {experiment} NAME@vN)")))
        unused = "" if sam_on else " (not used while SAM is off)"
        checks.append(_merge(name, problems, f"{folder}: weights match the registered sha256 "
                             f"{row.sha256[:12]}..., base {row.base_model_type}{unused}", details))
    return checks


# -- 10. device ------------------------------------------------------------------------------------------


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_device(ctx: Context) -> list[Check]:
    """What sam.device resolves to on this machine, with its memory."""
    config = ctx.config
    sam_on = config.sam.checkpoint is not None
    wanted = config.sam.device
    details: dict[str, Any] = {"sam.device": wanted, "cpu_count": os.cpu_count(), "ram_bytes": _ram_bytes()}
    try:
        import torch

        from cellseg1d.model.device import pick_device
    except ImportError as err:
        status = FAIL if sam_on else SKIP
        return [Check("device", status, f"PyTorch cannot be imported ({err}); SAM cannot run",
                      "reinstall cellseg1d with its dependencies (scripts/dev.sh setup)", details)]
    from cellseg1d.errors import ConfigError

    details["torch"] = torch.__version__
    try:
        device = pick_device(wanted)
    except ConfigError as err:
        if sam_on:
            return [Check("device", FAIL, f"sam.device = {wanted!r}: {err}",
                          "set sam.device = \"auto\" or \"cpu\", or install the GPU driver / a CUDA build of "
                          "PyTorch", details)]
        return [Check("device", WARN, f"sam.device = {wanted!r}: {err} (not used while SAM is off; the daemon "
                      "would refuse to start once sam.checkpoint is set)",
                      "set sam.device = \"auto\" or \"cpu\"", details)]
    details["device"] = str(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        gpu = torch.cuda.get_device_name(index)
        free, total = torch.cuda.mem_get_info(index)
        details.update(gpu=gpu, gpu_free_bytes=free, gpu_total_bytes=total)
        text = f"cuda:{index} {gpu}, {_gib(free)} free of {_gib(total)}"
    elif device.type == "mps":
        text = "Apple MPS"
    else:
        ram = _ram_bytes()
        text = f"CPU, {os.cpu_count()} cores, {_gib(ram) if ram else 'unknown'} RAM"
        if sam_on:
            text += " (SAM on the CPU is slow: docs/engine.md)"
    off = "; SAM off: the classical segmenter runs on the CPU" if not sam_on else ""
    return [Check("device", OK, f"sam.device = {wanted!r} -> {text}{off}", "", details)]


# -- 11. plugins -----------------------------------------------------------------------------------------


def check_plugins(ctx: Context) -> list[Check]:
    """Build the plugin manager as the daemon does and run each plugin's configure hook on its own."""
    config = ctx.config
    from cellseg1d.errors import ConfigError
    from cellseg1d.plugins import BUILTINS, build_plugin_manager, plugin_names

    try:
        pm = build_plugin_manager(config.plugins.enable, config.plugins.disable, ())
    except ConfigError as err:
        return [Check("plugins", FAIL, str(err), "install the plugin's package or remove it from the setting",
                      {"enable": list(config.plugins.enable), "disable": list(config.plugins.disable)})]
    names = plugin_names(pm)
    checks = []
    if not pm.hook.segment.get_hookimpls():
        checks.append(Check("plugins", FAIL, "plugins: no segmenter: every plugin implementing 'segment' is "
                            "disabled; the daemon refuses to start",
                            "remove 'classical' from plugins.disable or enable a model plugin", {"loaded": names}))
    else:
        checks.append(Check("plugins", OK, f"loaded: {', '.join(names)}", "", {"loaded": names}))
    for impl in pm.hook.configure.get_hookimpls():
        name = impl.plugin_name
        row = f"plugin {name}"
        if name == "sam" and config.sam.checkpoint is not None:
            checks.append(Check(row, SKIP, "configure not run: it loads the SAM checkpoint (slow, gigabytes of "
                                "memory); the checkpoint is checked in the sam.checkpoint row"))
            continue
        others = [plugin for other, plugin in pm.list_name_plugin() if other != name and plugin is not None]
        try:
            pm.subset_hook_caller("configure", remove_plugins=others)(config=config)
        except (Exception, SystemExit) as err:  # noqa: BLE001 - a plugin must not end the check
            text = str(err).strip().splitlines()[0] if str(err).strip() else ""
            off = f"add '{name}' to plugins.disable" if name in BUILTINS else f"remove '{name}' from plugins.enable"
            checks.append(Check(row, FAIL, f"plugin '{name}' refused the configuration: {type(err).__name__}: "
                                f"{text}", f"correct its settings ([plugin_settings.{name}]) or {off}",
                                {"plugin": name}))
        else:
            checks.append(Check(row, OK, "configure accepted the configuration", "", {"plugin": name}))
    return checks


def check_executor(ctx: Context) -> list[Check]:
    """With executor.kind = "dask": the scheduler answers, has workers, and each worker runs this version
    of cellseg1d and sees the watched folders and model files (at their executor.path_map paths)."""
    config = ctx.config
    settings = config.executor
    if settings.kind == "local":
        return [Check("executor", OK, "local: planes are segmented by the daemon itself")]
    from cellseg1d import __version__
    from cellseg1d.executor.dask import worker_config
    from cellseg1d.executor.worker import probe

    details: dict[str, Any] = {"scheduler": settings.scheduler}
    try:
        from distributed import Client

        client = Client(settings.scheduler, timeout=settings.connect_timeout_seconds, set_as_default=False)
    except Exception as err:  # noqa: BLE001 - any failure to connect is the finding
        return [Check("executor", FAIL, f"executor.scheduler: no Dask scheduler answers at {settings.scheduler} "
                      f"({type(err).__name__}: {err})", "start 'dask scheduler' on the server (docs/dask.md) or "
                      "correct executor.scheduler; the daemon refuses to start until it answers", details)]
    try:
        mapped = worker_config(config)
        wanted = [str(settings.to_worker(r.path)) for r in config.watch.roots]
        wanted += [str(p) for p in (mapped.sam.checkpoint, mapped.sam.adapter) if p is not None]
        if config.sam.checkpoint is not None and config.adapter_store.exists():
            wanted.append(str(settings.to_worker(config.adapter_store)))  # registered adapters are read there
        answers = client.run(probe, wanted)
    finally:
        client.close()
    details["workers"] = answers
    if not answers:
        return [Check("executor", WARN, f"the Dask scheduler {settings.scheduler} has no workers: jobs wait",
                      f"start workers: 'dask worker {settings.scheduler} --nthreads 1' on each GPU", details)]
    problems: list[tuple[str, str, str]] = []
    for address, info in sorted(answers.items()):
        if info["version"] != __version__:
            problems.append((FAIL, f"worker {address} runs cellseg1d {info['version']}, this is {__version__}",
                             "install the same cellseg1d version on the workers"))
        if info["missing"]:
            problems.append((FAIL, f"worker {address} ({info['host']}) does not see {', '.join(info['missing'])}",
                             "mount the shared storage on the workers at these paths, or map them with "
                             "[[executor.path_map]] daemon = ... worker = ..."))
    gpus = sum(int(info.get("cuda_devices") or 0) for info in answers.values())
    return [_merge("executor", problems, f"Dask scheduler {settings.scheduler}: {len(answers)} worker(s), "
                   f"{gpus} CUDA device(s) among them, all see the watched folders and model files", details)]


# -- running them all ------------------------------------------------------------------------------------

#: Check groups after the config, in order: (name for a crashed check's row, function of this module,
#: looked up when run).
CHECKS = (
    ("watch.roots", "check_roots"),
    ("filesystem", "check_filesystems"),
    ("inotify", "check_inotify"),
    ("state_dir", "check_state_dir"),
    ("disk space", "check_disk_space"),
    ("catalog", "check_catalog"),
    ("sam.checkpoint", "check_checkpoint"),
    ("sam.adapter", "check_fallback_adapter"),
    ("adapters", "check_assigned_adapters"),
    ("device", "check_device"),
    ("plugins", "check_plugins"),
    ("executor", "check_executor"),
)


def _crashed(name: str, err: BaseException) -> Check:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return Check(name, FAIL, f"the {name} check could not run: {type(err).__name__}: {text}",
                 "look at the message; if it names nothing you can fix, report it as a cellseg1d bug",
                 {"exception": type(err).__name__})


def run_checks(load_config: Callable[[], Any], config_source: Path | None) -> list[Check]:
    """Every check's rows, in order; a config that does not parse skips the rest."""
    try:
        config, row = check_config(load_config, config_source)
    except Exception as err:  # noqa: BLE001 - a check must never crash the command
        config, row = None, _crashed("config", err)
    rows = [row]
    if config is None:
        rows += [Check(name, SKIP, "skipped: the config did not parse") for name, _ in CHECKS]
        return rows
    ctx = Context(config, config_source)
    module = globals()
    try:
        for name, function in CHECKS:
            try:
                rows += module[function](ctx)
            except Exception as err:  # noqa: BLE001 - a check must never crash the command
                rows.append(_crashed(name, err))
    finally:
        if ctx.catalog is not None:
            ctx.catalog.close()
    return rows
