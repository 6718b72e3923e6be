"""Built-in classical segmenter plugin: the fallback when no SAM model answers ``segment``."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from cellseg1d.hookspecs import hookimpl
from cellseg1d.model.classical import ClassicalParams, segment_classical
from cellseg1d.types import SegmentRequest, Segmentation

NAME = "classical"


def params_from_config(config: object | None) -> ClassicalParams:
    """The segmenter's parameters from the ``[classical]`` config section (defaults without one)."""
    section = getattr(config, "classical", None)
    if section is None:
        return ClassicalParams()
    return ClassicalParams(
        sigma=section.sigma, min_distance=section.min_distance,
        min_size=section.min_size, threshold=section.threshold,
    )


@hookimpl(trylast=True)
def segment(plane: np.ndarray, request: SegmentRequest) -> Segmentation:
    """Threshold + distance-transform watershed on the selected channels."""
    params = params_from_config(request.config)
    labels = segment_classical(plane, params, request.stats)
    return Segmentation(labels=labels, segmenter=NAME, details={"params": asdict(params)})
