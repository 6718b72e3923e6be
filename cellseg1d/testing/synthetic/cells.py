"""Synthetic cells with known masks: rendered nuclei and membranes, time-lapses and z-stacks."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

_BACKGROUND = 0.08  # background level of rendered images (before noise)
_NOISE_SIGMA = 0.03  # standard deviation of the additive gaussian noise
_EDGE_WIDTH = 0.7  # width (pixels) of the soft logistic cell edge
_UINT16_OFFSET = 100.0  # camera offset of :func:`to_uint16`
_UINT16_GAIN = 3900.0  # counts per unit intensity of :func:`to_uint16`


@dataclass(frozen=True)
class _Cell:
    """One elliptical cell: center, semi-axes, orientation and brightness."""

    cy: float
    cx: float
    a: float  # semi-major axis (pixels)
    b: float  # semi-minor axis (pixels)
    theta: float  # orientation of the major axis (radians)
    intensity: float  # peak brightness of the nuclear signal, 0.5..1.0
    membrane: float  # peak brightness of the membrane signal

    @property
    def extent(self) -> float:
        """Largest distance from the center to the cell boundary."""
        return self.a


def _place_cells(
    shape: tuple[int, int],
    n_cells: int,
    radius: tuple[float, float],
    rng: np.random.Generator,
    min_gap: float,
) -> list[_Cell]:
    """Place up to ``n_cells`` non-overlapping cells by rejection sampling.

    Parameters
    ----------
    shape : tuple of int
        Image size (Y, X).
    n_cells : int
        Number of cells wanted.
    radius : tuple of float
        Range (low, high) of the mean cell radius in pixels.
    rng : numpy.random.Generator
        Source of randomness; the result is deterministic given its state.
    min_gap : float
        Minimum distance in pixels between the extents of two cells.

    Returns
    -------
    list of _Cell
        The cells placed, at most ``n_cells`` (fewer when they do not fit).
    """
    r_lo, r_hi = float(min(radius)), float(max(radius))
    if r_lo <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    height, width = shape
    cells: list[_Cell] = []
    centers = np.empty((0, 2))
    extents = np.empty(0)
    max_attempts = 200 * n_cells + 1000
    for _ in range(max_attempts):
        if len(cells) >= n_cells:
            break
        r = rng.uniform(r_lo, r_hi)
        elongation = rng.uniform(1.0, 1.35)
        a, b = r * math.sqrt(elongation), r / math.sqrt(elongation)
        theta = rng.uniform(0.0, math.pi)
        margin = a + 1.0
        if height - 1 - 2 * margin < 0 or width - 1 - 2 * margin < 0:
            continue
        cy = rng.uniform(margin, height - 1 - margin)
        cx = rng.uniform(margin, width - 1 - margin)
        if len(cells):
            dist = np.hypot(centers[:, 0] - cy, centers[:, 1] - cx)
            if np.any(dist < extents + a + min_gap):
                continue
        cell = _Cell(
            cy=cy,
            cx=cx,
            a=a,
            b=b,
            theta=theta,
            intensity=rng.uniform(0.5, 1.0),
            membrane=rng.uniform(0.35, 0.6),
        )
        cells.append(cell)
        centers = np.vstack([centers, [cy, cx]])
        extents = np.append(extents, a)
    return cells


def _cell_window(
    cell: _Cell, shape: tuple[int, int], pad: int = 4
) -> tuple[tuple[slice, slice], np.ndarray]:
    """Return the bounding window of a cell and the normalised radius inside it.

    The normalised radius ``d`` is 1 on the ellipse boundary, 0 at the center.
    """
    half = int(math.ceil(cell.extent)) + pad
    y0, y1 = max(int(cell.cy) - half, 0), min(int(cell.cy) + half + 1, shape[0])
    x0, x1 = max(int(cell.cx) - half, 0), min(int(cell.cx) + half + 1, shape[1])
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dy, dx = yy - cell.cy, xx - cell.cx
    cos, sin = math.cos(cell.theta), math.sin(cell.theta)
    u = dx * cos + dy * sin
    v = -dx * sin + dy * cos
    d = np.sqrt((u / cell.a) ** 2 + (v / cell.b) ** 2)
    return (slice(y0, y1), slice(x0, x1)), d


def _render_mask(cells: list[_Cell], shape: tuple[int, int]) -> np.ndarray:
    """Render the label mask: cell ``i`` gets label ``i + 1``, background 0."""
    mask = np.zeros(shape, dtype=np.uint32)
    for label, cell in enumerate(cells, start=1):
        window, d = _cell_window(cell, shape)
        region = mask[window]
        region[d <= 1.0] = label
    return mask


def _render_nuclei(cells: list[_Cell], shape: tuple[int, int]) -> np.ndarray:
    """Render filled cells with a soft edge (half maximum on the mask boundary)."""
    signal = np.zeros(shape, dtype=np.float64)
    for cell in cells:
        window, d = _cell_window(cell, shape)
        mean_r = math.sqrt(cell.a * cell.b)
        edge = 1.0 / (1.0 + np.exp(np.clip((d - 1.0) * mean_r / _EDGE_WIDTH, -50, 50)))
        shading = 1.0 - 0.15 * np.minimum(d, 1.0) ** 2
        np.maximum(signal[window], cell.intensity * edge * shading, out=signal[window])
    return signal


def _render_membrane(cells: list[_Cell], shape: tuple[int, int]) -> np.ndarray:
    """Render dimmer rings along the cell boundaries over a faint interior."""
    signal = np.zeros(shape, dtype=np.float64)
    for cell in cells:
        window, d = _cell_window(cell, shape)
        mean_r = math.sqrt(cell.a * cell.b)
        ring = np.exp(-(((d - 1.0) * mean_r) ** 2) / (2 * 1.2**2))
        interior = 0.12 / (1.0 + np.exp(np.clip((d - 1.0) * mean_r / _EDGE_WIDTH, -50, 50)))
        np.maximum(signal[window], cell.membrane * (ring + interior), out=signal[window])
    return signal


def _add_noise(signal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Add the background level and gaussian noise; return float32."""
    noisy = signal + _BACKGROUND + rng.normal(0.0, _NOISE_SIGMA, size=signal.shape)
    return noisy.astype(np.float32)


def make_cells(
    shape: tuple[int, int],
    n_cells: int,
    radius: tuple[float, float] = (6, 11),
    seed: int = 0,
    min_gap: float = 2.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a 2-D image of bright, non-overlapping cells and its label mask.

    Parameters
    ----------
    shape : tuple of int
        Image size (Y, X).
    n_cells : int
        Number of cells wanted. When they do not all fit, as many as fit are
        placed (deterministically for a given ``seed``).
    radius : tuple of float, optional
        Range (low, high) of the mean cell radius in pixels. Cells are
        slightly elongated ellipses with a random orientation.
    seed : int, optional
        Seed of the random generator; equal seeds give equal results.
    min_gap : float, optional
        Minimum gap in pixels kept between the extents of two cells.

    Returns
    -------
    image : numpy.ndarray
        float32 (Y, X): cells of brightness 0.5..1.0 with a soft edge on a
        dark background (about 0.08), plus gaussian noise (sigma 0.03).
    mask : numpy.ndarray
        uint32 (Y, X): labels 1..N, one per cell, 0 for the background.
    """
    shape = (int(shape[0]), int(shape[1]))
    rng = np.random.default_rng(seed)
    cells = _place_cells(shape, n_cells, radius, rng, min_gap)
    image = _add_noise(_render_nuclei(cells, shape), rng)
    return image, _render_mask(cells, shape)


def make_realistic_cells(
    shape: tuple[int, int],
    n_cells: int,
    radius: tuple[float, float] = (6, 12),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A harder image than :func:`make_cells`: what real widefield nuclei images look like.

    Cells of very different brightness (a quarter to all of the brightest),
    with texture inside; a textured background; illumination that falls off
    by half from the brightest corner to the opposite one; noise. Whatever
    normalises or thresholds on part of the image only (a block) sees other
    numbers than on the whole.

    Returns
    -------
    image : float32 (Y, X), roughly 0..1
    mask : uint32 (Y, X), labels 1..N
    """
    shape = (int(shape[0]), int(shape[1]))
    rng = np.random.default_rng(seed)
    cells = _place_cells(shape, n_cells, radius, rng, 2.0)
    for index, cell in enumerate(cells):
        cells[index] = dataclasses.replace(cell, intensity=float(rng.uniform(0.25, 1.0)))
    signal = _render_nuclei(cells, shape)
    texture = ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape), 2.0)
    texture /= max(float(np.abs(texture).max()), 1e-9)
    signal *= 1.0 + 0.25 * texture  # chromatin-like texture inside the cells
    background = 0.06 + 0.03 * ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape), 6.0) / 0.05
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    illumination = 1.0 - 0.5 * (yy / max(shape[0] - 1, 1) + xx / max(shape[1] - 1, 1)) / 2.0
    image = (signal + np.clip(background, 0.0, None)) * illumination + rng.normal(0.0, 0.02, shape)
    return image.astype(np.float32), _render_mask(cells, shape)


def to_uint16(image: np.ndarray) -> np.ndarray:
    """Scale an image of intensities around 0..1 to a camera-like 16-bit range.

    Parameters
    ----------
    image : numpy.ndarray
        Float image, 0 meaning no light and 1 a bright cell.

    Returns
    -------
    numpy.ndarray
        uint16 image ``100 + 3900 * image`` (so 0 maps to 100 and 1 to 4000),
        rounded and clipped to the uint16 range.
    """
    scaled = _UINT16_OFFSET + _UINT16_GAIN * np.asarray(image, dtype=np.float64)
    return np.clip(np.rint(scaled), 0, np.iinfo(np.uint16).max).astype(np.uint16)


def make_czyx(
    shape_yx: tuple[int, int],
    n_cells: int,
    n_channels: int = 2,
    n_z: int = 1,
    n_t: int = 1,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a multi-channel, multi-plane acquisition of one field of cells.

    The same cells appear in every plane. Channel 0 ("nuclei") shows filled
    bright cells; channel 1 ("membrane") shows dimmer rings along the cell
    boundaries. Further channels alternate between the two patterns, dimmer.
    Planes away from the middle of the stack are dimmer (out of focus), later
    time points slightly bleached, and every plane has its own noise.

    Parameters
    ----------
    shape_yx : tuple of int
        Plane size (Y, X).
    n_cells : int
        Number of cells wanted (see :func:`make_cells`).
    n_channels, n_z, n_t : int, optional
        Number of channels, z planes and time points (each at least 1).
    seed : int, optional
        Seed of the random generator. The mask equals the mask that
        :func:`make_cells` returns for the same shape, count and seed.

    Returns
    -------
    data : numpy.ndarray
        uint16, always 5-D with axes (t, c, z, y, x).
    mask : numpy.ndarray
        uint32 (Y, X) label mask of the cells, shared by all planes.
    """
    if min(n_channels, n_z, n_t) < 1:
        raise ValueError("n_channels, n_z and n_t must all be at least 1")
    shape = (int(shape_yx[0]), int(shape_yx[1]))
    rng = np.random.default_rng(seed)
    cells = _place_cells(shape, n_cells, (6, 11), rng, 2.0)
    patterns = [_render_nuclei(cells, shape), _render_membrane(cells, shape)]
    data = np.empty((n_t, n_channels, n_z, *shape), dtype=np.uint16)
    z_mid = (n_z - 1) / 2.0
    for t in range(n_t):
        bleach = 0.98**t
        for c in range(n_channels):
            dim = 1.0 / (1 + c // 2)
            for z in range(n_z):
                focus = 0.6 + 0.4 * math.exp(-(((z - z_mid) / max(n_z / 3.0, 1.0)) ** 2))
                plane = patterns[c % 2] * (bleach * dim * focus)
                data[t, c, z] = to_uint16(_add_noise(plane, rng))
    return data, _render_mask(cells, shape)
