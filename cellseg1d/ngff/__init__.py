"""Layer ``ngff``: images in and out.

OME-Zarr (NGFF 0.4 and 0.5) reading, container discovery, per-plane
statistics, OME-NGFF labels output, and single-file images (``imageio``:
TIFF, PNG). May import only the shared top level; imported by every layer
above it.
"""

from cellseg1d.ngff.reader import OmeImage, open_image

__all__ = ["OmeImage", "open_image"]
