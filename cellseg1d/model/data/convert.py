"""Image conversion to 8-bit RGB, as the CellSeg1 reference converts its training images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cellseg1d.errors import CellsegError

#: Percentiles mapped to 0 and 255 by ``to_uint8_rgb(normalize="percentile")``.
LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5
#: ``to_uint8_rgb`` modes: "minmax" (the reference: min..max to 0..255, truncated) or "percentile".
NORMALIZE_MODES = ("minmax", "percentile")
#: SAM's low-resolution mask logits are this many times smaller than its input.
LOW_RES_FACTOR = 4
#: Fill of pixels an augmentation maps from outside the tile: "zero" (the reference) or "median".
FILL_MODES = ("zero", "median")
#: Items without augmentation: "pad" (the reference: the tile as it is, SAM pads it) or "resize".
UNAUGMENTED_MODES = ("pad", "resize")


class TrainingDataError(CellsegError, ValueError):
    """The training image or mask cannot be used; the message says what to do."""


def _rescale(channel: np.ndarray, low: float, high: float,
             bounds: tuple[float, float] | None = None) -> np.ndarray:
    """Map the ``low``/``high`` percentiles of ``channel`` (or ``bounds``) to 0/255 (clipped, rounded), as uint8."""
    values = np.asarray(channel, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.uint8)
    lo, hi = bounds if bounds is not None else np.percentile(values[finite], [low, high])
    if hi <= lo:  # (nearly) constant channel: keep it dark rather than noise-amplified
        lo, hi = float(values[finite].min()), float(values[finite].max())
        if hi <= lo:
            return np.zeros(values.shape, dtype=np.uint8)
    scaled = (np.where(finite, values, lo) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _float_type(dtype: np.dtype) -> type:
    """The float type the reference's stretch computes in: float32 for float16/32 input, else float64."""
    return np.float32 if dtype in (np.float16, np.float32) else np.float64


def _minmax_uint8(values: np.ndarray, bounds: tuple[float, float] | None = None) -> np.ndarray:
    """Stretch min..max of ``values`` (or ``bounds``: those of the whole plane) to 0..255 and truncate.

    The reference calls ``skimage.exposure.rescale_intensity(x, out_range=(0, 255)).astype(np.uint8)``;
    this does the same arithmetic (same dtype of the intermediate: float32 for
    float16/float32 input, float64 otherwise; a constant image is clipped to
    0..255 and truncated). Unlike the reference, non-finite values do not
    spread NaN over the image: the range is that of the finite values, NaN and
    -inf become the minimum, +inf the maximum (0 everywhere if none is finite).
    """
    x = np.asarray(values)
    if x.dtype == np.float16:
        x = x.astype(np.float32)
    elif x.dtype == np.bool_:
        x = x.astype(np.uint8)
    if np.issubdtype(x.dtype, np.floating):
        finite = np.isfinite(x)
        if not finite.all():
            if not finite.any():
                return np.zeros(x.shape, dtype=np.uint8)
            lo, hi = (x[finite].min(), x[finite].max()) if bounds is None else bounds
            x = np.where(np.isnan(x) | (x == -np.inf), lo, np.where(x == np.inf, hi, x)).astype(x.dtype)
    work = _float_type(x.dtype)
    imin, imax = (float(x.min()), float(x.max())) if bounds is None else (float(bounds[0]), float(bounds[1]))
    if imin != imax:
        clipped = np.clip(x, imin, imax)
        scaled = (clipped - imin) / (imax - imin)
        out = (scaled * (255.0 - 0.0) + 0.0).astype(work)
    else:
        out = np.clip(x.astype(np.float64), 0.0, 255.0).astype(work)
    return out.astype(np.uint8)


def _reference_rgb(planes: list[np.ndarray], bounds: list[tuple[float, float]] | None = None) -> np.ndarray:
    """The reference's channel rules on 1-3 planes (one plane: grayscale; 2-3: red, green[, blue]).

    Grayscale is stretched and stacked x3. Of an RGB image only channels that
    are not all zero count: none -> black (the reference refuses such an
    image; a blank plane must not stop the daemon); one -> that channel
    stretched and stacked x3; two -> stacked x3 if identical, else each
    stretched on its own (the empty channel stays 0); three -> one joint
    stretch over all three channels. ``bounds`` (one (min, max) per plane,
    those of the whole image the planes are a block of) replace the planes'
    own ranges, and a channel is empty when its bounds are (0, 0).
    """
    if len(planes) == 1:
        gray = _minmax_uint8(planes[0], bounds[0] if bounds else None)
        return np.stack([gray] * 3, axis=-1)
    rgb = list(planes) + [np.zeros_like(planes[0])] * (3 - len(planes))
    ranges: list[tuple[float, float] | None] = (list(bounds) + [(0.0, 0.0)] * (3 - len(bounds)) if bounds
                                                 else [None] * 3)
    if bounds:
        nonempty = [i for i, r in enumerate(ranges) if r is not None and tuple(r) != (0.0, 0.0)]
    else:
        nonempty = [i for i, plane in enumerate(rgb) if not np.all(plane == 0)]
    h, w = rgb[0].shape
    if not nonempty:
        return np.zeros((h, w, 3), dtype=np.uint8)
    if len(nonempty) == 1:
        return np.stack([_minmax_uint8(rgb[nonempty[0]], ranges[nonempty[0]])] * 3, axis=-1)
    if len(nonempty) == 2:
        c0, c1 = nonempty
        if np.all(rgb[c0] == rgb[c1]):
            return np.stack([_minmax_uint8(rgb[c0], ranges[c0])] * 3, axis=-1)
        out = np.zeros((h, w, 3), dtype=np.uint8)
        out[..., c0] = _minmax_uint8(rgb[c0], ranges[c0])
        out[..., c1] = _minmax_uint8(rgb[c1], ranges[c1])
        return out
    joint = None
    if bounds:
        joint = (min(float(r[0]) for r in ranges if r), max(float(r[1]) for r in ranges if r))
    return _minmax_uint8(np.stack(rgb, axis=-1), joint)


def to_uint8_rgb(
    image: np.ndarray,
    channels: int | tuple[int, ...] | list[int] | None = None,
    *,
    normalize: str = "minmax",
    low: float = LOW_PERCENTILE,
    high: float = HIGH_PERCENTILE,
    ranges: Sequence[tuple[float, float]] | None = None,
) -> np.ndarray:
    """Convert an image of any dtype to the uint8 RGB image SAM expects.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W) grayscale, (C, H, W) channel-first with C >= 1, or an (H, W, 3)
        uint8 RGB image.
    channels : int or sequence of int, optional
        Channels of a (C, H, W) image to use, at most 3 (required when C > 3).
        One channel is grayscale; two or three are red, green (and blue) in
        the given order.
    normalize : {"minmax", "percentile"}, optional
        "minmax" (default, the reference): the range min..max becomes 0..255,
        truncated to integers; grayscale is stacked x3; of 2-3 channels, those
        that are all zero are ignored, one non-empty channel is shown as gray,
        two are stretched each on its own (or shown as gray if identical),
        three get one joint stretch (an (H, W, 3) uint8 image too).
        "percentile": every channel's ``low``/``high`` percentiles become
        0/255 (robust to hot pixels; rounded); uint8 RGB is returned as it is.
    low, high : float, optional
        Percentiles of ``normalize="percentile"``.
    ranges : sequence of (float, float), optional
        One (lo, hi) per used channel, the range mapped to 0..255 instead of
        the image's own: a block of a plane passes the whole plane's (min,
        max) for "minmax" or its (low, high) percentiles for "percentile", so
        every block is stretched alike.

    Returns
    -------
    numpy.ndarray
        uint8 (H, W, 3).
    """
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZE_MODES)}, got {normalize!r}")
    arr = np.asarray(image)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TrainingDataError(f"image must be numeric, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 3 and arr.dtype == np.uint8 and arr.shape[0] > 4 and channels is None:
        if normalize == "percentile":
            return arr.copy()
        return _reference_rgb([arr[..., 0], arr[..., 1], arr[..., 2]])
    if arr.ndim == 2:
        planes = arr[None]
    elif arr.ndim == 3:
        planes = arr
    else:
        raise TrainingDataError(
            f"image must be 2-D (H, W) or 3-D (C, H, W), got shape {arr.shape}; "
            "select one plane/time point first"
        )
    if channels is not None:
        picked = [channels] if isinstance(channels, int) else list(channels)
        if not 1 <= len(picked) <= 3:
            raise TrainingDataError(f"channels must name 1 to 3 channels, got {channels!r}")
        for c in picked:
            if not -planes.shape[0] <= c < planes.shape[0]:
                raise TrainingDataError(
                    f"channel {c} does not exist: the image has {planes.shape[0]} channel(s)"
                )
        planes = planes[picked]
    elif planes.shape[0] > 3:
        raise TrainingDataError(
            f"image has {planes.shape[0]} channels; pass channels=(i,) or up to 3 channel indices "
            "to choose which ones to train on"
        )
    if planes.shape[0] == 0 or planes.shape[1] == 0 or planes.shape[2] == 0:
        raise TrainingDataError(f"image is empty (shape {arr.shape})")
    if ranges is not None and len(ranges) != planes.shape[0]:
        raise ValueError(f"ranges: one (lo, hi) per channel needed, got {len(ranges)} for {planes.shape[0]}")
    if normalize == "minmax":
        return _reference_rgb(list(planes), list(ranges) if ranges is not None else None)
    scaled = [_rescale(p, low, high, ranges[i] if ranges is not None else None) for i, p in enumerate(planes)]
    if len(scaled) == 1:
        scaled = scaled * 3
    while len(scaled) < 3:
        scaled.append(np.zeros_like(scaled[0]))
    return np.stack(scaled, axis=-1)
