"""Layer ``cli``, a front-end: the ``cellseg1d`` command, its subcommands and the demo.

``main`` parses the command line; each subcommand has its own module. The
top of the layers: may import every layer below; nothing imports it.
"""

from cellseg1d.cli.main import main

__all__ = ["main"]
