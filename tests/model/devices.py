"""Devices the engine tests run on: the CPU always, CUDA when present (``cuda`` marker, else skipped)."""

from __future__ import annotations

import pytest
import torch

#: Skip reason when the machine has no CUDA device.
NO_CUDA = "no CUDA device"
#: Marks of a test (or parameter) that needs CUDA.
CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]
#: ``@pytest.mark.parametrize("device", DEVICES)``: "cpu" and "cuda".
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=CUDA_MARKS)]
