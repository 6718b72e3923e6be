"""cellseg1d: segment cells in OME-Zarr images while the microscope is still acquiring."""

__version__ = "0.1.0"

#: Bumped whenever a change alters the labels the pipeline writes for the same
#: input; part of every run key, so a new pipeline version reprocesses images.
PIPELINE_VERSION = "1"

from cellseg1d import _moved

_moved.install()  # old import paths of moved modules keep working for one release, with a warning
