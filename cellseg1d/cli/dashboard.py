"""``cellseg1d dashboard``: the read-only web dashboard of a daemon's catalog, in the foreground.

It reads the daemon's config (``--config``) or state dir, opens the existing
catalog without changing it, and serves until Ctrl-C. The address comes from
``--address``, else ``dashboard.address``, else ``127.0.0.1:8080``; a bare
port binds loopback only, and any other address needs a token
(``dashboard.token`` or ``CELLSEG1D_DASHBOARD_TOKEN``). Thumbnails are read
only from the watched folders of the config (or ``--watch``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellseg1d.config import Config
from cellseg1d.errors import ConfigError

DEFAULT_ADDRESS = "127.0.0.1:8080"


def add_parser(sub: Any, add_catalog_options: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    """Register ``cellseg1d dashboard`` (the caller sets ``func``)."""
    p = sub.add_parser("dashboard", help="read-only web dashboard: overview, images with outlines, adapters, failures")
    add_catalog_options(p)
    p.add_argument("--address", metavar="HOST:PORT",
                   help=f"where to serve (default: dashboard.address, else {DEFAULT_ADDRESS}); a bare PORT binds "
                        "loopback only; another host needs dashboard.token or CELLSEG1D_DASHBOARD_TOKEN")
    p.add_argument("--watch", type=Path, action="append", default=[], metavar="DIR",
                   help="watched folder whose images may be shown (repeatable; replaces the config's roots; "
                        "the caller's config loader applies it, as for 'run --watch')")
    return p


def dashboard_command(args: argparse.Namespace, config: Config) -> int:
    """Serve the dashboard of ``config``'s catalog until interrupted."""
    from rich.console import Console

    from cellseg1d.catalog.db import open_catalog, redact
    from cellseg1d.config import parse_address
    from cellseg1d.service.dashboard import serve_dashboard

    address = args.address or config.dashboard.address or DEFAULT_ADDRESS
    try:
        parse_address(address)
    except ValueError as err:
        raise ConfigError(f"--address: {err}") from None
    if config.catalog.url is None and not (config.state_dir / "catalog.sqlite").exists():
        raise ConfigError(f"no catalog in {config.state_dir}; has the daemon run with this state dir? "
                          "(pass --state-dir or --config)")
    catalog = open_catalog(config)
    if not catalog.has_schema():
        raise ConfigError(f"the catalog at {redact(config.catalog_url)} has no cellseg1d tables yet")
    console = Console()

    def ready(url: str, token: str | None) -> None:
        console.print(f"cellseg1d dashboard on [bold]{url}/[/bold]" + (" (needs its token: open "
                      f"{url}/?token=... once)" if token else "") + "; Ctrl-C stops it")
        if not config.watch.roots:
            console.print("[yellow]no watched folder in the config: thumbnails are off (pass --watch DIR or "
                          "--config)[/yellow]")

    try:
        serve_dashboard(config, catalog, address, on_ready=ready)
    except KeyboardInterrupt:
        pass
    finally:
        catalog.close()
    return 0

