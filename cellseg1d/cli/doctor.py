"""``cellseg1d doctor``: check a daemon's setup before (or while) it runs.

Runs the checks of :mod:`cellseg1d.service.doctor` (config, watched folders,
filesystems, inotify limit, state dir, disk space, catalog and migrations,
SAM checkpoint, adapters, device, plugins) and prints them as a table, or as
JSON with ``--json``. Exit status 0 when no check failed (warnings do not
fail), 1 when one did. Passwords never appear in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def add_parser(sub: Any, add_catalog_options: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("doctor", help="check config, folders, catalog, model, adapters, device and plugins")
    add_catalog_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _config_source(args: argparse.Namespace) -> Path | None:
    """The config file the command line (or $CELLSEG1D_CONFIG) names, as the other commands find it."""
    if getattr(args, "config", None) is not None:
        return Path(args.config)
    env = os.environ.get("CELLSEG1D_CONFIG")
    return Path(env) if env else None


def _secrets(args: argparse.Namespace) -> list[str]:
    """Passwords that must not be printed: the catalog URL's and the environment's (the catalog adds its own)."""
    from sqlalchemy.engine import make_url

    found = []
    for url in (getattr(args, "catalog_url", None), os.environ.get("CELLSEG1D_CATALOG__URL")):
        try:
            password = make_url(url).password if url else None
        except Exception:  # noqa: BLE001 - an invalid URL is reported by the catalog check
            password = None
        if password:
            found.append(str(password))
    if os.environ.get("CELLSEG1D_CATALOG_PASSWORD"):
        found.append(os.environ["CELLSEG1D_CATALOG_PASSWORD"])
    return found


def _scrubber(extra: Iterable[str]) -> Callable[[Any], Any]:
    from cellseg1d.catalog.db import scrub

    secrets = sorted({s for s in extra if len(s) >= 4}, key=len, reverse=True)

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            value = scrub(value)
            for secret in secrets:
                value = value.replace(secret, "***")
            return value
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return clean


def summary(rows: list[dict[str, Any]]) -> str:
    """``"N ok, N warnings, N failed"`` (and skipped ones, if any)."""
    count = {status: sum(1 for r in rows if r["status"] == status) for status in _STYLE}
    text = f"{count['ok']} ok, {count['warn']} warnings, {count['fail']} failed"
    return text + (f", {count['skip']} skipped" if count["skip"] else "")


def print_report(rows: list[dict[str, Any]], console: Any = None) -> None:
    """The rows as a table, then the summary line."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console.width = 160  # a journal or a file: long paths, no terminal to fit
    table = Table(title="cellseg1d doctor")
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("message", overflow="fold")
    table.add_column("fix", overflow="fold")
    for row in rows:
        style = _STYLE.get(row["status"], "")
        table.add_row(escape(row["name"]), f"[{style}]{row['status']}[/]", escape(row["message"]),
                      escape(row["fix"]))
    console.print(table)
    failed = any(r["status"] == "fail" for r in rows)
    console.print(f"[{'bold red' if failed else 'green'}]{escape(summary(rows))}[/]")


def doctor_command(args: argparse.Namespace, load_config: Callable[[], Any]) -> int:
    """Run every check; print a table (or JSON); 1 when a check failed, else 0."""
    from cellseg1d.service.doctor import FAIL, run_checks

    checks = run_checks(load_config, _config_source(args))
    clean = _scrubber(_secrets(args))
    rows = [clean(check.as_dict()) for check in checks]
    ok = not any(row["status"] == FAIL for row in rows)
    if getattr(args, "json", False):
        print(json.dumps({"ok": ok, "summary": summary(rows), "checks": rows}, indent=2, default=str))
    else:
        print_report(rows)
    sys.stdout.flush()
    return 0 if ok else 1
