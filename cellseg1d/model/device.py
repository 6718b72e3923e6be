"""Choosing the compute device and the mixed-precision dtype.

``auto`` prefers CUDA, then Apple MPS, then the CPU. Mixed precision is
bfloat16 autocast on CUDA devices that support it. On the CPU autocast is off
by default: PyTorch can run bfloat16 there too, but whether it is faster
depends on the processor and must be measured (``autocast_dtype(device,
cpu_bf16=True)`` opts in).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from cellseg1d.errors import ConfigError

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def pick_device(preference: str = "auto") -> torch.device:
    """The device to run on: ``auto`` (CUDA, then MPS, then CPU), ``cuda``, ``cuda:N``, ``mps`` or ``cpu``.

    An explicit choice that is not available raises ConfigError.
    """
    choice = preference.strip().lower()
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "mps":
        if not _mps_available():
            raise ConfigError("device 'mps' was requested but Apple MPS is not available on this machine; "
                              "use device 'auto' or 'cpu'")
        return torch.device("mps")
    if choice == "cuda" or choice.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {preference!r} was requested but CUDA is not available (no NVIDIA GPU, driver, or a "
                f"CPU-only PyTorch build: torch {torch.__version__}); use device 'auto' or 'cpu'"
            )
        device = torch.device(choice)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {preference!r} was requested but only {torch.cuda.device_count()} CUDA "
                              f"device(s) exist")
        return device
    raise ConfigError(f"unknown device {preference!r}; choose one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")


def autocast_dtype(device: torch.device, *, cpu_bf16: bool = False) -> torch.dtype | None:
    """The autocast dtype for ``device``, or None to run in float32.

    bfloat16 on CUDA devices that support it; None on MPS and, unless
    ``cpu_bf16`` is set, on the CPU (an opt-in to measure per machine).
    """
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and cpu_bf16:
        return torch.bfloat16
    return None


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast to ``dtype`` on ``device``'s type; a no-op when ``dtype`` is None."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
