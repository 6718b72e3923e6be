"""Checks of the model: the SAM checkpoint, the fallback adapter, the assigned adapters."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from cellseg1d.service.doctor.common import (
    FAIL,
    OK,
    SKIP,
    Check,
    Context,
    _merge,
)

# -- 8. SAM checkpoint and fallback adapter --------------------------------------------------------------


def check_checkpoint(ctx: Context) -> list[Check]:
    """sam.checkpoint exists, its backbone is read from its shapes, and it is the official file of that
    backbone (or custom files are allowed); a set sam.model_type must be that backbone."""
    sam = ctx.config.sam
    path: Path | None = sam.checkpoint
    if path is None:
        return [Check("sam.checkpoint", OK, "SAM off (sam.checkpoint not set): the classical segmenter runs")]
    details: dict[str, Any] = {"path": str(path), "model_type": None, "configured_model_type": sam.model_type}
    if ctx.config.executor.kind != "local" and not os.path.lexists(path):
        return [Check("sam.checkpoint", SKIP, f"{path} is the Dask workers' file (executor.kind = "
                      f"'{ctx.config.executor.kind}'): the executor row checks that they see it; each worker "
                      "checks its sha256 when it loads it", "", details)]
    from cellseg1d.model.checkpoint import OFFICIAL, CheckpointError, checkpoint_model_type, sha256_file
    from cellseg1d.model.sam import SPECS

    if sam.model_type is not None and sam.model_type not in SPECS:
        return [Check("sam.checkpoint", FAIL, f"sam.model_type: {sam.model_type!r} is not a SAM model type "
                      f"(known: {', '.join(s for s in SPECS if s != 'tiny')})", "leave sam.model_type out: the "
                      "backbone is read from the checkpoint", details)]
    # the official type this file is meant to be: the setting, else the official file name
    meant = sam.model_type if sam.model_type in OFFICIAL else next(
        (name for name, item in OFFICIAL.items() if item.filename == path.name), None)
    official = OFFICIAL.get(meant) if meant else None
    fetch = (f"correct the path, or run 'cellseg1d models fetch {meant} --model-dir {path.parent}' "
             f"(or copy {official.filename} there) and point sam.checkpoint at it" if official
             else f"correct the path, or run 'cellseg1d models fetch vit_h --model-dir {path.parent}' (the "
                  "paper's backbone; or vit_l, vit_b) and point sam.checkpoint at it")
    if not os.path.lexists(path):
        return [Check("sam.checkpoint", FAIL, f"sam.checkpoint: {path} does not exist", fetch, details)]
    if not path.is_file():
        return [Check("sam.checkpoint", FAIL, f"sam.checkpoint: {path} is not a file", fetch, details)]
    started = time.monotonic()
    sha = sha256_file(path)
    details.update(sha256=sha, size_bytes=path.stat().st_size, hash_seconds=round(time.monotonic() - started, 2))
    ctx.base_sha256 = sha
    try:  # from the hash when official, else from the shapes (memory-mapped: no weights are loaded)
        model_type = checkpoint_model_type(path, sha256=sha)
    except CheckpointError as err:
        if official is not None:
            return [Check("sam.checkpoint", FAIL, f"sam.checkpoint: {path} is not the official {meant} "
                          f"checkpoint (sha256 {sha}, expected {official.sha256}) and cannot be used: {err}",
                          f"if the download was incomplete or corrupted, delete it and run 'cellseg1d models "
                          f"fetch {meant} --model-dir {path.parent}'", details)]
        return [Check("sam.checkpoint", FAIL, f"sam.checkpoint: {err}", fetch, details)]
    details["model_type"] = model_type
    if sam.model_type is not None and sam.model_type != model_type:
        return [Check("sam.checkpoint", FAIL, f"sam.checkpoint: {path} is a {model_type} checkpoint (read from "
                      f"its shapes) but sam.model_type is {sam.model_type!r}",
                      f"leave sam.model_type out (the backbone is read from the checkpoint), or point "
                      f"sam.checkpoint at a {sam.model_type} checkpoint", details)]
    ctx.base_model_type = model_type
    official = OFFICIAL.get(model_type)
    if official is not None and sha == official.sha256:
        return [Check("sam.checkpoint", OK, f"{path}: the official {model_type} checkpoint "
                      f"({official.filename}); backbone {model_type} read from the file", "", details)]
    if sam.allow_custom_checkpoint:
        return [Check("sam.checkpoint", OK, f"{path}: a custom {model_type} checkpoint (backbone read from its "
                      f"shapes; sha256 {sha[:12]}...), allowed by sam.allow_custom_checkpoint = true; only "
                      "loading it at start proves it fits", "", details)]
    if official is None:
        return [Check("sam.checkpoint", FAIL, f"sam.checkpoint: {path}: model type {model_type!r} (read from its "
                      "shapes) has no official checkpoint to verify it against",
                      "set sam.allow_custom_checkpoint = true for a custom base", details)]
    return [Check("sam.checkpoint", FAIL, f"sam.checkpoint: {path} is not the official {model_type} "
                  f"checkpoint (sha256 {sha}, expected {official.sha256}); its shapes are {model_type}'s",
                  f"if the download was incomplete or corrupted, delete it and run 'cellseg1d models fetch "
                  f"{model_type} --model-dir {path.parent}'; for a fine-tuned base set "
                  "sam.allow_custom_checkpoint = true", details)]


def _weights_problems(key: str, folder: Path, meta: Any, registered: str | None) -> list[tuple[str, str, str]]:
    """Problems with the weights of the adapter in ``folder`` (metadata ``meta``, registered sha256 if any)."""
    from cellseg1d.routing.registry import WEIGHTS_FILE, sha256_of

    problems: list[tuple[str, str, str]] = []
    weights = folder / WEIGHTS_FILE
    wanted = registered or meta.weights_sha256
    if not weights.is_file():
        problems.append((FAIL, f"{key}: {weights} is missing", "restore the adapter files"))
    else:
        actual = sha256_of(weights)
        if actual != wanted:
            what = "registered" if registered else "in its adapter.json"
            problems.append((FAIL, f"{key}: {weights} was modified (sha256 {actual}, {what} {wanted})",
                             "restore the adapter files"))
    if registered is not None and meta.weights_sha256 != registered:
        problems.append((FAIL, (f"{key}: the adapter.json in {folder} names weights sha256 {meta.weights_sha256}, "
                         f"not the registered {registered}"), "restore the adapter files"))
    return problems


def _base_problem(ctx: Context, model_type: str, base_sha: str) -> str | None:
    """Why an adapter trained on (``model_type``, ``base_sha``) does not fit the configured SAM, or None.

    The checkpoint's sha256 and backbone are compared when the checkpoint check could read them, else only
    the configured sam.model_type (when set).
    """
    from cellseg1d.routing.registry import BaseModel, base_mismatch

    sam = ctx.config.sam
    if sam.checkpoint is None:
        return None
    if ctx.base_model_type is None:  # the checkpoint row could not read the backbone
        if sam.model_type is not None and model_type != sam.model_type:
            return f"it was trained on a {model_type} SAM but sam.model_type is {sam.model_type}"
        if ctx.base_sha256 is not None and base_sha != ctx.base_sha256:
            return (f"it was trained on base checkpoint sha256 {base_sha} but sam.checkpoint has sha256 "
                    f"{ctx.base_sha256}")
        return None
    return base_mismatch(model_type, base_sha, BaseModel(ctx.base_model_type, ctx.base_sha256, "sam.checkpoint"))


def check_fallback_adapter(ctx: Context) -> list[Check]:
    """sam.adapter (the fallback adapter folder), when set: metadata loads, weights intact, same base."""
    config = ctx.config
    folder: Path | None = config.sam.adapter
    if folder is None:
        return []
    from cellseg1d.model.adapters import AdapterError, read_metadata

    details = {"path": str(folder)}
    try:
        meta = read_metadata(folder)
    except AdapterError as err:
        return [Check("sam.adapter", FAIL, f"sam.adapter: {err}",
                      "point sam.adapter at a folder made by 'cellseg1d train' (adapter.json + "
                      "adapter.safetensors)", details)]
    problems = _weights_problems("sam.adapter", folder, meta, None)
    mismatch = _base_problem(ctx, meta.base_model_type, meta.base_checkpoint_sha256)
    if mismatch:
        problems.append((FAIL, f"sam.adapter: {folder}: {mismatch}",
                         "train the adapter on the configured base (cellseg1d train --checkpoint ...)"))
    unused = "" if config.sam.checkpoint is not None else " (not used while SAM is off)"
    return [_merge("sam.adapter", problems, f"{folder}: adapter {meta.name} for a {meta.base_model_type} "
                   f"base, weights intact{unused}", details)]


# -- 9. registered adapters ------------------------------------------------------------------------------


def check_assigned_adapters(ctx: Context) -> list[Check]:
    """Every adapter assigned to an experiment: store files intact, trained on the configured base."""
    catalog = ctx.catalog
    if catalog is None:
        return [Check("adapters", SKIP, "not checked: the catalog is not available at this version's schema "
                      "(see the catalog row)")]
    from sqlalchemy import select

    from cellseg1d.catalog import Adapter, Assignment, Experiment
    from cellseg1d.model.adapters import AdapterError, read_metadata

    with catalog.session() as session:
        rows = session.execute(
            select(Experiment.name, Adapter).join(Assignment, Assignment.experiment_id == Experiment.id)
            .join(Adapter, Adapter.id == Assignment.adapter_id)
            .where(Assignment.unassigned_at.is_(None)).order_by(Experiment.name)
        ).all()
    if not rows:
        return [Check("adapters", OK, "no adapter is assigned to an experiment")]
    sam_on = ctx.config.sam.checkpoint is not None
    checks = []
    for experiment, row in rows:
        name = f"adapter {row.label} ({experiment})"
        key = f"adapter {row.label} (experiment {experiment})"
        folder = Path(row.store_path)
        details = {"experiment": experiment, "adapter": row.label, "store_path": str(folder), "sha256": row.sha256,
                   "base_model_type": row.base_model_type, "base_sha256": row.base_sha256}
        redo = ("restore the store copy, or register the adapter again (cellseg1d adapters add FOLDER --assign "
                f"{experiment})")
        if not folder.is_dir():
            checks.append(Check(name, FAIL, f"{key}: its store folder {folder} is missing", redo, details))
            continue
        try:
            meta = read_metadata(folder)
        except AdapterError as err:
            checks.append(Check(name, FAIL, f"{key}: {err}", redo, details))
            continue
        problems = [(status, text, redo) for status, text, _ in _weights_problems(key, folder, meta, row.sha256)]
        mismatch = _base_problem(ctx, row.base_model_type, row.base_sha256)
        if mismatch:
            problems.append((FAIL, f"{key}: {mismatch}", (f"assign {experiment} an adapter trained on the "
                             f"configured base (cellseg1d adapters assign {experiment} NAME@vN)")))
        unused = "" if sam_on else " (not used while SAM is off)"
        checks.append(_merge(name, problems, f"{folder}: weights match the registered sha256 "
                             f"{row.sha256[:12]}..., base {row.base_model_type}{unused}", details))
    return checks
