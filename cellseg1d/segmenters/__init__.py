"""Segmenters: functions that turn an image plane into a label image."""

from cellseg1d.segmenters.classical import ClassicalParams, segment_classical

__all__ = ["ClassicalParams", "segment_classical"]
