"""``cellseg1d plugins``: every discovered plugin, whether it is enabled and loads, and its hooks."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cellseg1d.plugins import PluginInfo, describe_plugins


def add_parser(sub: Any, add_catalog_options: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("plugins", help="list built-in and installed plugins: enabled, loaded, hooks")
    add_catalog_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def plugins_command(args: argparse.Namespace, config: Any) -> int:
    """Print the plugins for ``config``'s ``plugins.enable``/``disable``; exit 1 if an enabled one fails to load."""
    infos = describe_plugins(config.plugins.enable, config.plugins.disable)
    if args.json:
        print(json.dumps([asdict(i) for i in infos], indent=2))
    else:
        print_plugins(infos)
    return 1 if any(i.enabled and i.loaded is False for i in infos) else 0


def print_plugins(infos: list[PluginInfo], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="cellseg1d plugins")
    for col in ("name", "source", "package", "enabled", "loaded", "API", "hooks"):
        table.add_column(col, overflow="fold")
    for i in infos:
        loaded = {True: "yes", False: "[red]no[/red]", None: ""}[i.loaded]
        table.add_row(escape(i.name), i.source, escape(f"{i.package or ''} {i.version or ''}".strip()),
                      "yes" if i.enabled else "no", loaded, str(i.api or ""), ", ".join(i.hooks))
    console.print(table)
    for i in infos:
        if i.error:
            console.print(f"[red]{escape(i.name)}[/red]: {escape(i.error)}")
