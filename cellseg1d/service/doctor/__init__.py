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

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellseg1d.service.doctor import host  # noqa: F401  (its limits and /proc paths, for tests)
from cellseg1d.service.doctor.common import (
    FAIL,
    OK,
    SKIP,
    WARN,
    Check,
    Context,
    worst,
)
from cellseg1d.service.doctor.host import (
    DISK_FAIL_BYTES,
    DISK_WARN_BYTES,
    Mount,
    check_device,
    check_disk_space,
    check_filesystems,
    check_inotify,
    check_state_dir,
    classify_fstype,
    count_folders,
    disk_space_status,
    filesystem_check,
    find_mount,
    inotify_check,
    parse_mountinfo,
)
from cellseg1d.service.doctor.models import (
    check_assigned_adapters,
    check_checkpoint,
    check_fallback_adapter,
)
from cellseg1d.service.doctor.setup import (
    check_catalog,
    check_config,
    check_executor,
    check_plugins,
    check_roots,
    migration_state,
)

__all__ = [
    "FAIL",
    "OK",
    "SKIP",
    "WARN",
    "Check",
    "check_assigned_adapters",
    "check_catalog",
    "check_checkpoint",
    "check_config",
    "check_device",
    "check_disk_space",
    "check_executor",
    "check_fallback_adapter",
    "check_filesystems",
    "check_inotify",
    "check_plugins",
    "check_roots",
    "check_state_dir",
    "CHECKS",
    "classify_fstype",
    "Context",
    "count_folders",
    "DISK_FAIL_BYTES",
    "disk_space_status",
    "DISK_WARN_BYTES",
    "filesystem_check",
    "find_mount",
    "inotify_check",
    "migration_state",
    "Mount",
    "parse_mountinfo",
    "run_checks",
    "worst",
]


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
