"""Thumbnails with label outlines: the lowest-resolution level of an image, outlines drawn over it (PNG).

Made on demand and cached under ``<state_dir>/dashboard-cache`` (never in the
acquisition folder), keyed by the image path and the result id, so a new run
of the image makes a new thumbnail. An image or label image that cannot be
read gives an error tile (a PNG saying why), never an exception.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from cellseg1d.ngff.reader import open_image

log = logging.getLogger(__name__)

#: Longest side of a thumbnail in pixels (a larger lowest level is subsampled).
MAX_SIDE = 1024
#: Outline colour (RGB).
OUTLINE = (255, 214, 0)
#: Size of an error tile.
TILE = (256, 256)


class OverlayError(Exception):
    """The thumbnail cannot be made; the message says why (shown on the error tile)."""


def cache_path(cache_dir: Path, image_path: str, result_id: int) -> Path:
    """Where the thumbnail of ``image_path``'s result ``result_id`` is cached."""
    key = hashlib.sha256(f"{image_path}\x00{result_id}".encode()).hexdigest()[:32]
    return cache_dir / f"{key}.png"


def _stretch(plane: np.ndarray) -> np.ndarray:
    """A plane to 8-bit gray, 0.5th..99.5th percentile to 0..255."""
    data = plane.astype(np.float32)
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return np.zeros(data.shape, np.uint8)
    lo, hi = np.percentile(finite, (0.5, 99.5))
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((np.nan_to_num(data, nan=lo) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _outlines(labels: np.ndarray) -> np.ndarray:
    """Pixels of an object whose right, left, lower or upper neighbour is another label."""
    edge = np.zeros(labels.shape, bool)
    diff_x = labels[:, 1:] != labels[:, :-1]
    diff_y = labels[1:, :] != labels[:-1, :]
    edge[:, 1:] |= diff_x
    edge[:, :-1] |= diff_x
    edge[1:, :] |= diff_y
    edge[:-1, :] |= diff_y
    return edge & (labels > 0)


def _resize_nearest(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if labels.shape == shape:
        return labels
    ys = (np.arange(shape[0]) * labels.shape[0] // shape[0]).clip(0, labels.shape[0] - 1)
    xs = (np.arange(shape[1]) * labels.shape[1] // shape[1]).clip(0, labels.shape[1] - 1)
    return labels[ys][:, xs]


def _channel(image: Any, channels: Sequence[Any]) -> int:
    """The first segmented channel (from the result's provenance), else channel 0."""
    for item in channels or ():
        if isinstance(item, int) and 0 <= item < image.n_channels:
            return item
        if isinstance(item, str) and item in image.channel_names:
            return image.channel_names.index(item)
    return 0


def render_overlay(image_path: Path, labels_path: Path, channels: Sequence[Any] = ()) -> tuple[bytes, int, int]:
    """PNG bytes, width and height of the lowest level of ``image_path`` with ``labels_path``'s outlines.

    Raises :class:`OverlayError` with a one-line reason when either cannot be read.
    """
    try:
        image = open_image(image_path)
        level = len(image.levels) - 1
        t, z = 0, image.size("z") // 2
        plane = image.read_plane(t, z, [_channel(image, channels)], level_index=level)[0]
    except Exception as err:  # noqa: BLE001 - any reader error becomes the tile's text
        raise OverlayError(f"cannot read the image: {_one_line(err)}") from None
    try:
        labels_image = open_image(labels_path)
        best = min(range(len(labels_image.levels)),
                   key=lambda i: abs(labels_image.levels[i].array.shape[-1] - plane.shape[-1]))
        labels = labels_image.read_plane(0, min(z, labels_image.size("z") - 1), [0], level_index=best)[0]
    except Exception as err:  # noqa: BLE001
        raise OverlayError(f"cannot read the label image: {_one_line(err)}") from None
    step = max(1, -(-max(plane.shape) // MAX_SIDE))
    plane = plane[::step, ::step]
    labels = _resize_nearest(np.asarray(labels), plane.shape)
    gray = _stretch(plane)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    rgb[_outlines(labels)] = OUTLINE
    out = io.BytesIO()
    PILImage.fromarray(rgb, "RGB").save(out, format="PNG", optimize=False)
    return out.getvalue(), int(rgb.shape[1]), int(rgb.shape[0])


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


def error_tile(message: str, size: tuple[int, int] = TILE) -> bytes:
    """A dark PNG tile with ``message`` written on it."""
    tile = PILImage.new("RGB", size, (60, 20, 20))
    draw = ImageDraw.Draw(tile)
    draw.rectangle((0, 0, size[0] - 1, size[1] - 1), outline=(220, 60, 60), width=3)
    lines = ["thumbnail unavailable", ""] + textwrap.wrap(message, width=max(10, size[0] // 7))[:14]
    draw.multiline_text((10, 10), "\n".join(lines), fill=(255, 220, 220), spacing=3)
    out = io.BytesIO()
    tile.save(out, format="PNG")
    return out.getvalue()


def cached_overlay(cache_dir: Path, image_path: Path, labels_path: Path, result_id: int,
                   channels: Sequence[Any] = ()) -> bytes:
    """The thumbnail PNG from the cache, made and stored first when missing. Raises :class:`OverlayError`."""
    target = cache_path(cache_dir, str(image_path), result_id)
    try:
        return target.read_bytes()
    except OSError:
        pass
    png, _, _ = render_overlay(image_path, labels_path, channels)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".thumb-", suffix=".png", dir=cache_dir)
        with os.fdopen(fd, "wb") as handle:
            handle.write(png)
        os.replace(tmp, target)
    except OSError as err:  # a full or read-only state dir: serve it uncached
        log.warning("dashboard: cannot cache a thumbnail in %s: %s", cache_dir, err)
    return png
