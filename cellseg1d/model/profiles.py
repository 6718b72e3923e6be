"""Named inference profiles (``sam.profile``): the paper's settings, and faster approximations of them.

A profile is a set of :class:`cellseg1d.model.inference.InferenceSettings`
values. ``paper`` (the default) changes nothing: the CellSeg1 paper's
settings, whose label images equal the CellSeg1 reference's. The other
profiles trade accuracy for speed; their measured time and agreement with
``paper`` are in docs/engine.md ("Profiles"). Settings written explicitly in
the ``[sam]`` section win over the profile's.

The names are :data:`cellseg1d.config.SAM_PROFILES` (the configuration, one
layer down, validates them); this module says what each one sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Values of ``encoder_precision`` / ``decoder_precision``.
PRECISIONS = ("fp32", "bf16", "fp16", "auto")


@dataclass(frozen=True)
class Profile:
    """One named profile."""

    name: str
    #: One line for users (``cellseg1d status``, docs).
    description: str
    #: InferenceSettings values the profile sets (the rest keep their paper defaults).
    settings: dict[str, Any] = field(default_factory=dict)
    #: True when the labels equal the CellSeg1 reference's (the paper profile).
    exact: bool = False


PROFILES: dict[str, Profile] = {
    "paper": Profile(
        "paper",
        "the CellSeg1 paper's settings (32 x 32 points, crop layer 1, float32): labels equal the reference's",
        {},
        exact=True,
    ),
    "fast": Profile(
        "fast",
        "the paper's prompts and crops; bfloat16 image encoder where the hardware has it (CUDA, AMX/AVX512-BF16 "
        "CPUs), float32 decoder, 256 prompts per batch (on a GPU: 4x fewer decoder passes)",
        {"encoder_precision": "auto", "decoder_precision": "fp32", "points_per_batch": 256},
    ),
    "quick": Profile(
        "quick",
        "as fast, with a 16 x 16 grid per crop: 4x fewer prompts; finds about as many cells, but other "
        "masks win than with the paper's grid (docs/engine.md)",
        {"encoder_precision": "auto", "decoder_precision": "fp32", "points_per_batch": 256, "points_per_side": 16},
    ),
}

DEFAULT_PROFILE = "paper"


def get_profile(name: str) -> Profile:
    """The profile called ``name``; ValueError naming the known profiles otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown SAM profile {name!r}; known: {', '.join(PROFILES)}") from None


def profile_values(name: str, explicit: dict[str, Any] | None = None) -> dict[str, Any]:
    """InferenceSettings values of profile ``name`` with ``explicit`` settings (written by the user) on top."""
    return {**get_profile(name).settings, **(explicit or {})}


def profile_of(config: Any, root: Any = None) -> dict[str, Any]:
    """What a watch root runs, for ``cellseg1d status``: ``{"segmenter", "profile", "exact", "description"}``.

    ``config`` is a :class:`cellseg1d.config.Config`; ``root`` a ``WatchRoot`` (or None). Every root runs
    ``sam.profile`` when SAM is configured (``sam.checkpoint``); otherwise the classical segmenter, whose
    profile is None. Settings written explicitly in ``[sam]`` over the profile are listed under "overrides".
    """
    sam = getattr(config, "sam", None)
    if sam is None or getattr(sam, "checkpoint", None) is None:
        return {"segmenter": "classical", "profile": None, "exact": None, "description": "classical segmenter"}
    profile = get_profile(getattr(sam, "profile", DEFAULT_PROFILE))
    explicit = explicit_settings(sam)
    overrides = {k: v for k, v in explicit.items() if k in profile.settings and profile.settings[k] != v}
    return {"segmenter": "sam", "profile": profile.name, "exact": profile.exact and not explicit_changes(explicit),
            "description": profile.description, "overrides": overrides}


#: SamSettings fields that change the label image when they differ from the paper's values.
_PAPER_VALUES: dict[str, Any] = {
    "points_per_side": 32, "crop_n_layers": 1, "pred_iou_thresh": 0.8, "stability_score_thresh": 0.6,
    "skip_covered_points": False, "cleanup_nms": "reference", "paint": "reference",
}


def explicit_changes(explicit: dict[str, Any]) -> dict[str, Any]:
    """The explicitly written settings that move the result away from the paper's."""
    return {k: v for k, v in explicit.items() if k in _PAPER_VALUES and v != _PAPER_VALUES[k]}


def explicit_settings(sam: Any) -> dict[str, Any]:
    """The ``[sam]`` settings the user wrote (pydantic's ``model_fields_set``), as a dict; {} for other objects."""
    written = getattr(sam, "model_fields_set", None)
    if not written:
        return {}
    return {name: getattr(sam, name) for name in written if name != "profile"}
