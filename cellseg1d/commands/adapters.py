"""``cellseg1d adapters add|list|show|assign|remove``: the adapter registry from the command line.

The commands work on the daemon's catalog and adapter store (``--config`` or
``--state-dir``, as ``cellseg1d status``); a running daemon sees the changes
at once (assigning an adapter releases the experiment's held jobs, which the
daemon then runs). When the config names a SAM checkpoint, adapters trained
on another base are refused.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from cellseg1d.catalog.db import open_catalog
from cellseg1d.config import Config
from cellseg1d.registry import Registry, configured_base, parse_ref


def open_registry(config: Config, check_base: bool = True) -> Registry:
    """The registry of ``config``'s catalog (created and migrated if new) and adapter store."""
    catalog = open_catalog(config)
    catalog.migrate()
    return Registry(catalog, config.adapter_store, configured_base(config) if check_base else None)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _short(sha: str) -> str:
    return sha[:12]


def adapters_command(args: argparse.Namespace, config: Config) -> int:
    """Run one ``cellseg1d adapters`` action."""
    console = Console()
    action = args.action
    registry = open_registry(config, check_base=action in ("add", "assign"))
    try:
        if action == "add":
            row = registry.add(args.folder, args.name)
            console.print(f"registered [bold]{row.label}[/bold] (sha256 {_short(row.sha256)}, base "
                          f"{row.base_model_type} {_short(row.base_sha256)}) -> {row.store_path}")
            if args.assign:
                _, released = registry.assign(args.assign, row.name, row.version)
                console.print(f"assigned {row.label} to experiment {args.assign}; {released} held job(s) released")
        elif action == "list":
            adapters, experiments = registry.list(args.all), registry.experiments()
            if args.json:
                _print_json({"adapters": adapters, "experiments": experiments})
                return 0
            table = Table(title=f"{len(adapters)} adapter version(s)")
            for col in ("adapter", "sha256", "base", "experiments", "created"):
                table.add_column(col, overflow="fold")
            for a in adapters:
                table.add_row(a["adapter"] + (" (removed)" if a["removed_at"] else ""), _short(a["sha256"]),
                              f"{a['base_model_type']} {_short(a['base_sha256'])}", ", ".join(a["experiments"]),
                              str(a["created_at"])[:19])
            console.print(table)
            exps = Table(title="experiments")
            for col in ("experiment", "adapter", "held jobs"):
                exps.add_column(col)
            for e in experiments:
                exps.add_row(e["experiment"], e["adapter"] or "-", str(e["held_jobs"]))
            console.print(exps)
        elif action == "show":
            name, version = parse_ref(args.adapter)
            info = registry.show(name, version)
            if args.json:
                _print_json(info)
                return 0
            for key in ("adapter", "sha256", "base_model_type", "base_sha256", "path", "created_at", "results"):
                console.print(f"[bold]{key}[/bold]: {info[key]}")
            console.print(f"[bold]assigned to[/bold]: {', '.join(info['experiments']) or '-'}")
            for item in info["assignments"]:
                until = item["unassigned_at"] or "now"
                console.print(f"  {item['experiment']}: {str(item['assigned_at'])[:19]} .. {str(until)[:19]}")
            console.print_json(json.dumps(info["metadata"], default=str))
        elif action == "assign":
            name, version = parse_ref(args.adapter)
            row, released = registry.assign(args.experiment, name, version)
            console.print(f"assigned {row.label} to experiment {args.experiment}; {released} held job(s) released")
        elif action == "remove":
            name, version = parse_ref(args.adapter)
            if version is None:
                from cellseg1d.registry import RegistryError

                raise RegistryError(f"name the version to remove: cellseg1d adapters remove {name}@vN "
                                    "(see cellseg1d adapters list)")
            row = registry.remove(name, version)
            console.print(f"removed {row.label} (its catalog record stays for the results it made)")
    finally:
        registry.catalog.close()
    return 0


def add_parser(sub: Any, add_catalog_options: Any) -> None:
    """The ``adapters`` subcommand and its actions."""
    parser = sub.add_parser("adapters", help="adapter registry: add, list, show, assign, remove")
    actions = parser.add_subparsers(dest="action", required=True)

    add = actions.add_parser("add", help="register an adapter folder (made by cellseg1d train) as a new version")
    add.add_argument("folder", help="adapter folder: adapter.safetensors + adapter.json")
    add.add_argument("--name", help="register under this name (default: the name in adapter.json)")
    add.add_argument("--assign", metavar="EXPERIMENT", help="also assign the new version to this experiment")
    listing = actions.add_parser("list", help="adapter versions and experiments")
    listing.add_argument("--all", action="store_true", help="include removed versions")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    show = actions.add_parser("show", help="one adapter version: metadata, assignments, results")
    show.add_argument("adapter", help="NAME (latest version) or NAME@vN")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    assign = actions.add_parser("assign", help="pin an experiment to an adapter version; releases held jobs")
    assign.add_argument("experiment", help="experiment name ('default': the adapter for images without one)")
    assign.add_argument("adapter", help="NAME (latest version) or NAME@vN")
    remove = actions.add_parser("remove", help="remove an unused adapter version (files; the record stays)")
    remove.add_argument("adapter", help="NAME@vN")
    for p in (add, listing, show, assign, remove):
        add_catalog_options(p)
