"""Checks of this machine: filesystems, the inotify limit, the state dir, disk space, the device."""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cellseg1d.ngff.discover import is_container_name
from cellseg1d.service.doctor.common import (
    FAIL,
    OK,
    SKIP,
    WARN,
    Check,
    Context,
    _creatable,
    _gib,
    _merge,
    _size,
    _user,
    nearest_existing,
)

#: Free space below which a location fails (a label image or the catalog cannot be written safely).
DISK_FAIL_BYTES = 100 * 1024**2
#: Free space below which a location is a warning.
DISK_WARN_BYTES = 1024**3
#: Share of the inotify watch limit above which the folder count is a warning.
INOTIFY_WARN_SHARE = 0.8
#: Seconds the folder count may take before it stops and reports "at least N".
FOLDER_COUNT_BUDGET_S = 3.0

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
