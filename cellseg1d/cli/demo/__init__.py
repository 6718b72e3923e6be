"""``cellseg1d demo``: a simulated microscope, a real daemon, and what it found (``run``).

``microscope`` plans and writes the images, ``watching`` follows the daemon
through its log and catalog, ``sam`` prepares the CellSeg1 flow of
``--sam``, and ``run`` ties them together and prints the summary.
"""

from cellseg1d.cli.demo.microscope import Microscope, plan_acquisitions
from cellseg1d.cli.demo.run import run_demo

__all__ = ["Microscope", "plan_acquisitions", "run_demo"]
