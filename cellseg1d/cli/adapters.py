"""``cellseg1d adapters add|import|export|list|show|assign|remove``: the adapter registry from the command line.

The commands work on the daemon's catalog and adapter store (``--config`` or
``--state-dir``, as ``cellseg1d status``); a running daemon sees the changes
at once (assigning an adapter releases the experiment's held jobs, which the
daemon then runs). When the config names a SAM checkpoint, adapters trained
on another base are refused.

``import`` converts an adapter file of the CellSeg1 reference implementation
(``--format cellseg1``, a torch ``.pth``; e.g. the paper's published
adapters) into a registered version; ``export`` writes a registered version
in that format (see :mod:`cellseg1d.model.cellseg1_format`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cellseg1d.catalog.db import open_catalog
from cellseg1d.config import Config
from cellseg1d.errors import ConfigError
from cellseg1d.routing.registry import Registry, RegistryError, check_name, configured_base, parse_ref


def open_registry(config: Config, check_base: bool = True) -> Registry:
    """The registry of ``config``'s catalog (created and migrated if new) and adapter store."""
    catalog = open_catalog(config)
    catalog.migrate()
    return Registry(catalog, config.adapter_store, configured_base(config) if check_base else None)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _short(sha: str) -> str:
    return sha[:12]


def _base_checkpoint(args: argparse.Namespace, config: Config, why: str) -> tuple[Path, bool]:
    """(path, allow custom) of the SAM checkpoint named by ``--checkpoint``, else by ``sam.checkpoint``."""
    allow = bool(getattr(args, "allow_custom_checkpoint", False))
    if args.checkpoint is not None:
        return Path(args.checkpoint).expanduser(), allow
    if config.sam.checkpoint is not None:
        return config.sam.checkpoint, allow or config.sam.allow_custom_checkpoint
    raise ConfigError(f"give the SAM checkpoint {why}: --checkpoint SAM.pth (the paper's published adapters: the "
                      "official vit_h checkpoint sam_vit_h_4b8939.pth, 'cellseg1d models fetch vit_h'), or set "
                      "sam.checkpoint in the config")


def import_adapter(args: argparse.Namespace, config: Config, registry: Registry, console: Console) -> Any:
    """``adapters import FILE``: convert a CellSeg1 reference adapter file and register it; the new version."""
    from cellseg1d.model.cellseg1_format import default_adapter_name, import_cellseg1_adapter
    from cellseg1d.model.checkpoint import read_checkpoint

    source = Path(args.file).expanduser()
    name = check_name(args.name or default_adapter_name(source))
    checkpoint, allow_custom = _base_checkpoint(args, config, "the adapter was trained on")
    # memory-mapped: only the prompt encoder and the heads are read (compared with the file's)
    state, info = read_checkpoint(checkpoint, allow_custom=allow_custom, mmap=True)
    base = registry.base
    if base is not None and (base.model_type, base.sha256) != (info.model_type, info.sha256):
        raise ConfigError(
            f"--checkpoint {checkpoint} ({info.model_type}, sha256 {info.sha256}) is not the daemon's base model "
            f"({base.source}: {base.model_type}, sha256 {base.sha256}); the daemon would refuse the adapter. "
            "Import it with the daemon's checkpoint (leave --checkpoint out), or change sam.checkpoint first")
    config.adapter_store.mkdir(parents=True, exist_ok=True)
    work = config.adapter_store / f".import-{uuid.uuid4().hex[:8]}"
    try:
        meta = import_cellseg1_adapter(source, state, info.sha256, work / name, name, image_size=args.image_size,
                                       base_name=f"checkpoint {checkpoint}")
        console.print(f"converted {source} (CellSeg1 {meta.base_model_type} adapter, rank {meta.rank}, input "
                      f"{meta.image_size})")
        row = registry.add(work / name, name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    console.print(f"registered [bold]{row.label}[/bold] (sha256 {_short(row.sha256)}, base {row.base_model_type} "
                  f"{_short(row.base_sha256)}) -> {row.store_path}")
    return row


def export_adapter(args: argparse.Namespace, config: Config, registry: Registry, console: Console) -> Path:
    """``adapters export NAME[@vN]``: write a registered version as a CellSeg1 reference adapter file."""
    from cellseg1d.model.adapters import read_metadata
    from cellseg1d.model.cellseg1_format import export_cellseg1_adapter
    from cellseg1d.model.checkpoint import read_checkpoint

    name, version = parse_ref(args.adapter)
    row = registry.get(name, version)
    out = Path(args.out).expanduser()
    if out.exists() and not args.force:
        raise ConfigError(f"--out {out} already exists; choose another file or pass --force to replace it")
    checkpoint, _ = _base_checkpoint(args, config, f"{row.label} was trained on (sha256 {row.base_sha256})")
    # the base is identified by its sha256 (compared with the adapter's), so any verified-or-not file will do
    state, info = read_checkpoint(checkpoint, allow_custom=True, mmap=True)
    if read_metadata(row.store_path).weights_sha256 != row.sha256:
        raise RegistryError(f"{row.label}: its files in the store ({row.store_path}) are not the registered "
                            f"version; remove it (cellseg1d adapters remove {row.label}) and add it again")
    meta, path = export_cellseg1_adapter(row.store_path, state, info.sha256, out,
                                         base_name=f"checkpoint {checkpoint}")
    console.print(f"wrote {path}: {row.label} in the CellSeg1 reference format ({meta.base_model_type}, rank "
                  f"{meta.rank}, input {meta.image_size}); the reference loads it with vit_name = "
                  f"{meta.base_model_type}, sam_image_size = {meta.image_size}, image_encoder_lora_rank = "
                  f"mask_decoder_lora_rank = {meta.rank}")
    return path


def adapters_command(args: argparse.Namespace, config: Config) -> int:
    """Run one ``cellseg1d adapters`` action."""
    console = Console()
    action = args.action
    registry = open_registry(config, check_base=action in ("add", "assign", "import"))
    try:
        if action == "import":
            row = import_adapter(args, config, registry, console)
            if args.assign:
                _, released = registry.assign(args.assign, row.name, row.version)
                console.print(f"assigned {row.label} to experiment {args.assign}; {released} held job(s) released")
        elif action == "export":
            export_adapter(args, config, registry, console)
        elif action == "add":
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
                from cellseg1d.routing.registry import RegistryError

                raise RegistryError(f"name the version to remove: cellseg1d adapters remove {name}@vN "
                                    "(see cellseg1d adapters list)")
            row = registry.remove(name, version)
            console.print(f"removed {row.label} (its catalog record stays for the results it made)")
    finally:
        registry.catalog.close()
    return 0


def add_parser(sub: Any, add_catalog_options: Any) -> None:
    """The ``adapters`` subcommand and its actions."""
    parser = sub.add_parser("adapters", help="adapter registry: add, import, export, list, show, assign, remove")
    actions = parser.add_subparsers(dest="action", required=True)

    add = actions.add_parser("add", help="register an adapter folder (made by cellseg1d train) as a new version")
    add.add_argument("folder", help="adapter folder: adapter.safetensors + adapter.json")
    add.add_argument("--name", help="register under this name (default: the name in adapter.json)")
    add.add_argument("--assign", metavar="EXPERIMENT", help="also assign the new version to this experiment")
    imp = actions.add_parser("import", help="convert an adapter of the CellSeg1 reference implementation (.pth, "
                             "e.g. the paper's published ones) and register it as a new version")
    imp.add_argument("file", type=Path, help="the adapter file (.pth) written by the CellSeg1 reference")
    imp.add_argument("--format", choices=["cellseg1"], default="cellseg1",
                     help="the file's format (cellseg1: the reference's save_lora_parameters)")
    imp.add_argument("--checkpoint", type=Path, help="the SAM checkpoint the adapter was trained on (default: "
                     "sam.checkpoint of the config); the paper's adapters: the official vit_h")
    imp.add_argument("--allow-custom-checkpoint", action="store_true",
                     help="accept a checkpoint whose sha256 is not the official one")
    imp.add_argument("--name", help="register under this name (default: the file name without .pth)")
    imp.add_argument("--assign", metavar="EXPERIMENT", help="also assign the new version to this experiment")
    imp.add_argument("--image-size", type=int, default=512,
                     help="SAM input size the adapter was trained at (the reference's sam_image_size; default 512)")
    exp = actions.add_parser("export", help="write a registered version as a CellSeg1 reference adapter file")
    exp.add_argument("adapter", help="NAME (latest version) or NAME@vN")
    exp.add_argument("--format", choices=["cellseg1"], default="cellseg1",
                     help="the file's format (cellseg1: what the reference's load_lora_parameters reads)")
    exp.add_argument("--out", type=Path, required=True, help="the file to write (.pth)")
    exp.add_argument("--checkpoint", type=Path, help="the SAM checkpoint the adapter was trained on (default: "
                     "sam.checkpoint of the config); its prompt encoder and heads go into the file")
    exp.add_argument("--force", action="store_true", help="replace --out if it exists")
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
    for p in (add, imp, exp, listing, show, assign, remove):
        add_catalog_options(p)
