"""OME-Zarr (NGFF 0.4 and 0.5) input and OME-NGFF labels output."""

from cellseg1d.ngff.reader import OmeImage, open_image

__all__ = ["OmeImage", "open_image"]
