"""``python -m cellseg1d`` runs the command-line interface."""

import sys

from cellseg1d.cli import main

sys.exit(main())
