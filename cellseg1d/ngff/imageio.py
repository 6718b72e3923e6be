"""Reading single images and label images for the ``train``, ``segment`` and ``evaluate`` commands.

Accepted inputs: OME-Zarr images (first time point and z slice unless told
otherwise), TIFF, PNG and ``.npy``. Images come back as ``(C, Y, X)``, label
images as ``(Y, X)`` integer arrays (0 is background).
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Sequence

import numpy as np

from cellseg1d.errors import ImageError
from cellseg1d.ngff.reader import open_image

TIFF_SUFFIXES = (".tif", ".tiff")
PLAIN_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def is_ome_zarr(path: Path) -> bool:
    return path.is_dir() and any((path / n).is_file() for n in ("zarr.json", ".zattrs", ".zgroup"))


def _channels_first(data: np.ndarray, path: Path) -> np.ndarray:
    if data.ndim == 2:
        return data[np.newaxis]
    if data.ndim == 3:
        # (Y, X, C) with few channels (PNG/RGB TIFF) or (C, Y, X)
        return np.moveaxis(data, -1, 0) if data.shape[-1] <= 4 and data.shape[0] > 4 else data
    raise ImageError(f"{path}: expected a 2-D image (optionally with channels), found shape {data.shape}")


def read_image(path: Path, channels: Sequence[str | int] = (), t: int = 0, z: int = 0) -> np.ndarray:
    """One ``(C, Y, X)`` image plane from an OME-Zarr, TIFF, PNG or ``.npy`` file."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path} does not exist")
    if is_ome_zarr(path):
        image = open_image(path)
        return image.read_plane(t, z, image.channel_indices(channels) if channels else range(image.n_channels))
    data = _read_file(path)
    data = _channels_first(np.asarray(data), path)
    if channels:
        indices = [c for c in channels if isinstance(c, int)]
        if len(indices) != len(channels):
            raise ImageError(f"{path}: channels can only be chosen by index for non-OME files")
        bad = [c for c in indices if not 0 <= c < data.shape[0]]
        if bad:
            raise ImageError(f"{path}: channel index {bad} out of range (the image has {data.shape[0]})")
        data = data[indices]
    return data


def _read_file(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    try:
        if suffix in TIFF_SUFFIXES:
            import tifffile

            return tifffile.imread(path)
        if suffix in PLAIN_SUFFIXES:
            import imageio.v3 as iio

            return iio.imread(path)
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ImageError(f"cannot read {path}: {err}") from None
    raise ImageError(f"{path}: unsupported file type '{suffix}' (use OME-Zarr, TIFF, PNG or .npy)")


def read_labels(path: Path, labels_name: str | None = None) -> np.ndarray:
    """A ``(Y, X)`` label image from a file, or from an OME-Zarr's ``labels/<labels_name>``."""
    path = Path(path)
    if is_ome_zarr(path):
        if labels_name is None:
            target = path
        else:
            target = path / "labels" / labels_name
            if not target.exists():
                raise ImageError(f"{path} has no label image '{labels_name}' (looked in {target})")
        labels = open_image(target)
        plane = labels.read_plane(0, 0, [0])[0]
    else:
        data = np.asarray(_read_file(path))
        plane = np.squeeze(data)
        if plane.ndim != 2:
            raise ImageError(f"{path}: a label image must be 2-D, found shape {data.shape}")
    if plane.dtype.kind not in "ui":
        if plane.dtype.kind == "f" and np.all(np.mod(plane, 1) == 0):
            plane = plane.astype(np.int64)
        else:
            raise ImageError(f"{path}: label images must hold integers, found {plane.dtype}")
    if plane.size and plane.min() < 0:
        raise ImageError(f"{path}: label images must not hold negative values")
    return plane


def write_labels(path: Path, labels: np.ndarray) -> Path:
    """Write a label image to ``.tif``/``.tiff``, ``.png`` (< 65536 objects) or ``.npy``."""
    path = Path(path)
    suffix = path.suffix.lower()
    tmp = path.with_name(f".{path.name}.partial")
    if suffix in TIFF_SUFFIXES:
        import tifffile

        tifffile.imwrite(tmp, labels.astype(np.uint32), compression="zlib")
    elif suffix == ".png":
        if labels.max(initial=0) > 65535:
            raise ImageError(f"{path}: more than 65535 objects do not fit a PNG; use .tif")
        import imageio.v3 as iio

        iio.imwrite(tmp, labels.astype(np.uint16), extension=".png")
    elif suffix == ".npy":
        with open(tmp, "wb") as fh:
            np.save(fh, labels)
    else:
        raise ImageError(f"{path}: unsupported output type '{suffix}' (use .tif, .png or .npy)")
    tmp.replace(path)
    return path
