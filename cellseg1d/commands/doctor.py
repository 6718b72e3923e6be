"""``cellseg1d doctor``: check a daemon's setup before (or while) it runs. (Being written.)"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def add_parser(sub: Any, add_catalog_options: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("doctor", help="check config, folders, catalog, model, adapters, device and plugins")
    add_catalog_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def doctor_command(args: argparse.Namespace, load_config: Callable[[], Any]) -> int:
    raise NotImplementedError
