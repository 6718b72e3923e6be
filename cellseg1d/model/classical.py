"""Classical cell segmentation: threshold, distance transform and watershed.

This is the segmenter cellseg1d falls back to when no SAM model is
configured. It needs no training and no GPU, and it works well for
fluorescence images of roundish, mostly convex cells or nuclei on a dark
background. It is deterministic: the same plane and parameters always give
the same labels.

The steps are:

1. Normalise every channel robustly (1st to 99.8th percentile mapped to
   0..1, clipped) and average the channels.
2. Smooth with a Gaussian filter.
3. Threshold globally (Otsu or Li) to get a foreground mask.
4. Fill holes and remove connected components smaller than ``min_size``.
5. Compute the Euclidean distance transform of the mask and take its local
   maxima (at least ``min_distance`` apart, found per connected component)
   as markers.
6. Run a watershed on the negated distance, restricted to the mask, so that
   touching cells are split along their neck.
7. Drop objects smaller than ``min_size`` (and, if asked, objects that touch
   the image border) and relabel the rest 1..N.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import threshold_li, threshold_otsu
from skimage.segmentation import watershed

from cellseg1d.types import ChannelStats, PlaneStats

__all__ = ["ClassicalParams", "segment_classical"]

#: Global threshold methods :func:`segment_classical` understands.
THRESHOLD_METHODS: tuple[str, ...] = ("otsu", "li")

#: Percentiles that are mapped to 0 and 1 when a channel is normalised.
_NORM_LOW_PERCENTILE = 1.0
_NORM_HIGH_PERCENTILE = 99.8

#: Connectivity used for connected components (8-connected in 2-D).
_STRUCTURE = np.ones((3, 3), dtype=bool)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class ClassicalParams:
    """Parameters of :func:`segment_classical`.

    Parameters
    ----------
    sigma : float, optional
        Standard deviation, in pixels, of the Gaussian smoothing applied
        before thresholding. ``0`` disables smoothing.
    min_distance : int, optional
        Minimum distance, in pixels, between two watershed markers (peaks of
        the distance transform). Larger values split fewer cells; roughly
        half the radius of the smallest cell is a good start.
    min_size : int, optional
        Objects with fewer pixels than this are removed, both from the
        foreground mask and from the final labels.
    threshold : {"otsu", "li"}, optional
        Global threshold method used to separate cells from background.
    exclude_border : bool, optional
        If True, objects touching the image border are removed from the
        result (useful when cells cut by the field of view must not be
        measured).

    Raises
    ------
    ValueError
        If a field has an invalid type or value; the message names the field.
    """

    sigma: float = 1.5
    min_distance: int = 5
    min_size: int = 20
    threshold: str = "otsu"
    exclude_border: bool = False

    def __post_init__(self) -> None:
        sigma = self.sigma
        if (
            isinstance(sigma, (bool, np.bool_))
            or not isinstance(sigma, numbers.Real)
            or not math.isfinite(float(sigma))
            or float(sigma) < 0
        ):
            raise ValueError(
                f"ClassicalParams.sigma must be a finite number >= 0, got {sigma!r}"
            )
        if not _is_int(self.min_distance) or int(self.min_distance) < 1:
            raise ValueError(
                f"ClassicalParams.min_distance must be an integer >= 1, got {self.min_distance!r}"
            )
        if not _is_int(self.min_size) or int(self.min_size) < 0:
            raise ValueError(
                f"ClassicalParams.min_size must be an integer >= 0, got {self.min_size!r}"
            )
        if not isinstance(self.threshold, str) or self.threshold not in THRESHOLD_METHODS:
            raise ValueError(
                f"ClassicalParams.threshold must be one of {list(THRESHOLD_METHODS)}, "
                f"got {self.threshold!r}"
            )
        if not isinstance(self.exclude_border, (bool, np.bool_)):
            raise ValueError(
                f"ClassicalParams.exclude_border must be a bool, got {self.exclude_border!r}"
            )


def _validate_plane(plane: np.ndarray) -> np.ndarray:
    """Return ``plane`` as an array, raising ValueError if it cannot be segmented."""
    arr = np.asarray(plane)
    if arr.ndim not in (2, 3):
        raise ValueError(
            f"plane must be 2-D (Y, X) or 3-D (C, Y, X), got {arr.ndim}-D array "
            f"of shape {arr.shape}"
        )
    dtype = arr.dtype
    if dtype == np.bool_ or not (
        np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)
    ):
        raise ValueError(
            f"plane must have a real numeric dtype (integer or floating point), got {dtype}"
        )
    return arr


def _normalise_channel(channel: np.ndarray, stats: ChannelStats | None = None) -> np.ndarray | None:
    """Map a channel's 1st..99.8th percentile range to 0..1, clipped.

    Parameters
    ----------
    channel : ndarray of float64, shape (Y, X)
        Finite values only.
    stats : ChannelStats, optional
        The whole plane's statistics: its percentiles are used instead of the
        channel's own (a block of a plane is normalised like the plane).

    Returns
    -------
    ndarray of float64 or None
        The normalised channel, or None if the channel is constant (it then
        carries no information).
    """
    if stats is not None:
        lo, hi, top = stats.percentile(_NORM_LOW_PERCENTILE), stats.percentile(_NORM_HIGH_PERCENTILE), stats.max
    else:
        lo, hi = np.percentile(channel, [_NORM_LOW_PERCENTILE, _NORM_HIGH_PERCENTILE])
        top = channel.max()
    if not hi > lo:
        # Sparse images (bright objects on less than 0.2 % of the pixels) have
        # equal percentiles; fall back to the maximum so the objects survive.
        hi = top
    span = float(hi) - float(lo)
    if not (span > 0 and math.isfinite(span)):
        return None
    out = (channel - lo) / span
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _normalised_intensity(arr: np.ndarray, stats: PlaneStats | None = None) -> np.ndarray | None:
    """Average of the robustly normalised channels, or None if all are constant."""
    channels = arr[np.newaxis] if arr.ndim == 2 else arr
    total = np.zeros(channels.shape[1:], dtype=np.float64)
    n_informative = 0
    for index, channel in enumerate(channels):
        values = channel.astype(np.float64, copy=True)
        values[~np.isfinite(values)] = 0.0  # NaN and +-inf count as 0
        normalised = _normalise_channel(values, stats.channels[index] if stats is not None else None)
        if normalised is not None:
            total += normalised
            n_informative += 1
    if n_informative == 0:
        return None
    # Constant channels add nothing, but still count in the average so that
    # the result does not depend on which channels happen to be empty.
    total /= channels.shape[0]
    return total


def _remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Set objects of ``labels`` with fewer than ``min_size`` pixels to 0 (in place)."""
    if min_size <= 1:
        return labels
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    if small.any():
        labels[small[labels]] = 0
    return labels


def _clear_border(labels: np.ndarray) -> np.ndarray:
    """Set objects of ``labels`` that touch the image border to 0 (in place)."""
    border = np.concatenate((labels[0, :], labels[-1, :], labels[:, 0], labels[:, -1]))
    ids = np.unique(border)
    ids = ids[ids != 0]
    if ids.size:
        labels[np.isin(labels, ids)] = 0
    return labels


def _relabel_sequential(labels: np.ndarray) -> np.ndarray:
    """Relabel the objects of ``labels`` to 1..N (keeping their order) as uint32."""
    present = np.bincount(labels.ravel()) > 0
    present[0] = False
    lut = np.zeros(present.size, dtype=np.uint32)
    lut[present] = np.arange(1, int(present.sum()) + 1, dtype=np.uint32)
    return lut[labels]


def _plane_level(stats: PlaneStats, params: ClassicalParams) -> float | None:
    """The threshold of the whole plane: on its statistics' sample, normalised and smoothed like a block.

    The sample is the plane shrunk by area means over ``sample_stride``
    cells, so the smoothing still to apply there is what remains of
    ``sigma`` after that averaging (a mean over s pixels has the variance of
    a Gaussian of sigma**2 = (s**2 - 1) / 12), in sample pixels.
    """
    sample = np.stack([c.sample.astype(np.float64) for c in stats.channels])
    intensity = _normalised_intensity(sample, stats)
    if intensity is None:
        return None
    if params.sigma > 0:
        sy, sx = stats.channels[0].sample_stride
        sigma = [math.sqrt(max(0.0, params.sigma**2 - (s * s - 1) / 12)) / s for s in (sy, sx)]
        if max(sigma) > 0:
            intensity = ndi.gaussian_filter(intensity, sigma=sigma, mode="nearest", truncate=4.0)
    if not float(intensity.max()) > float(intensity.min()):
        return None
    return float(threshold_otsu(intensity) if params.threshold == "otsu" else threshold_li(intensity))


def segment_classical(
    plane: np.ndarray, params: ClassicalParams = ClassicalParams(), stats: PlaneStats | None = None
) -> np.ndarray:
    """Segment cells in one plane with threshold + distance-transform watershed.

    Parameters
    ----------
    plane : ndarray, shape (Y, X) or (C, Y, X)
        Intensity image of any real dtype (unsigned or signed integer,
        float32, float64). NaN and infinite values are treated as 0. A 2-D
        plane is treated like a single channel. Every channel is normalised
        robustly (1st to 99.8th percentile mapped to 0..1, clipped), so the
        result does not depend on the intensity scale, and the channels are
        averaged. Cells must be brighter than the background.
    params : ClassicalParams, optional
        Segmentation parameters; see :class:`ClassicalParams`.
    stats : PlaneStats, optional
        Statistics of the whole plane ``plane`` belongs to (a block of it):
        the percentiles of the normalisation and the threshold come from the
        plane, not from the block, so every block is segmented alike. The
        threshold is then computed on the statistics' sample (the plane
        shrunk by area means, smoothed by what remains of ``sigma``).

    Returns
    -------
    labels : ndarray of uint32, shape (Y, X)
        Label image: 0 is background, cells are numbered 1..N without gaps.
        A constant plane (for example all zeros) gives all zeros.

    Raises
    ------
    ValueError
        If ``plane`` is not 2-D or 3-D, or its dtype is not a real number
        type (bool and complex are rejected).
    TypeError
        If ``params`` is not a :class:`ClassicalParams`.

    Notes
    -----
    The foreground is found with a global threshold, so an image without
    any cells but with structured background (noise, gradients) can still
    produce objects; ``min_size`` removes the smallest of them.
    """
    arr = _validate_plane(plane)
    if not isinstance(params, ClassicalParams):
        raise TypeError(f"params must be a ClassicalParams, got {type(params).__name__}")
    shape = arr.shape[-2:]
    empty = np.zeros(shape, dtype=np.uint32)
    if arr.size == 0:
        return empty

    if stats is not None and len(stats.channels) != (1 if arr.ndim == 2 else arr.shape[0]):
        raise ValueError(f"stats describe {len(stats.channels)} channel(s), the plane has "
                         f"{1 if arr.ndim == 2 else arr.shape[0]}")
    intensity = _normalised_intensity(arr, stats)
    if intensity is None:
        return empty
    if params.sigma > 0:
        intensity = ndi.gaussian_filter(
            intensity, sigma=float(params.sigma), mode="nearest", truncate=4.0
        )
    if stats is None and not float(intensity.max()) > float(intensity.min()):
        return empty

    if stats is not None:
        plane_level = _plane_level(stats, params)
        if plane_level is None:
            return empty
        level = plane_level
    elif params.threshold == "otsu":
        level = float(threshold_otsu(intensity))
    else:
        level = float(threshold_li(intensity))
    mask = intensity > level
    mask = ndi.binary_fill_holes(mask)

    components, n_components = ndi.label(mask, structure=_STRUCTURE)
    if n_components == 0:
        return empty
    components = _remove_small(components, int(params.min_size))
    mask = components > 0
    if not mask.any():
        return empty

    distance = ndi.distance_transform_edt(mask)
    peaks = peak_local_max(
        distance,
        min_distance=int(params.min_distance),
        exclude_border=False,
        labels=components,
    )
    markers = np.zeros(shape, dtype=np.int32)
    if len(peaks):
        markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    labels = watershed(-distance, markers, mask=mask).astype(np.int64, copy=False)

    # A component without any peak (e.g. a thin line whose distance transform
    # is flat) gets no marker and stays 0 in the watershed: keep it as one object.
    unassigned = mask & (labels == 0)
    if unassigned.any():
        leftover, _ = ndi.label(unassigned, structure=_STRUCTURE)
        offset = int(labels.max())
        labels[leftover > 0] = leftover[leftover > 0] + offset

    labels = _remove_small(labels, int(params.min_size))
    if params.exclude_border:
        labels = _clear_border(labels)
    return _relabel_sequential(labels)
