"""The adapter registry: adapter versions in a store folder and the catalog, assigned to experiments.

An adapter added to the registry is copied into the store as
``<store>/<name>/v<N>/`` (copied to a temporary folder, its weights' SHA-256
checked against its metadata, then renamed into place) and recorded in the
catalog with its version number, checksum and base model. An experiment is
assigned one adapter version (pinned: it keeps that version until assigned
another); every assignment is kept as history. Assigning releases the
experiment's held jobs.

:func:`route_for` decides what an image's job runs with: the experiment's
adapter, or what its watched folder says to do when there is none
(``watch.roots[i].without_adapter``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from cellseg1d.catalog import Adapter, Assignment, Catalog, Experiment, Job, JobState, Result, utcnow
from cellseg1d.config import Config, WatchRoot
from cellseg1d.errors import CellsegError
from cellseg1d.catalog.jobs import HELD_TAG, held_jobs, release_held
from cellseg1d.types import AdapterRef

log = logging.getLogger(__name__)
WEIGHTS_FILE = "adapter.safetensors"
METADATA_FILE = "adapter.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_REF = re.compile(r"^(?P<name>[^@]+?)(?:@v?(?P<version>\d+))?$")


class RegistryError(CellsegError):
    """An adapter cannot be registered, assigned or removed; the message says why and what to do."""


@dataclass(frozen=True)
class BaseModel:
    """The base SAM the daemon runs: adapters must have been trained on it."""

    model_type: str
    sha256: str
    #: Where it was configured (for messages).
    source: str = "sam.checkpoint"


@dataclass(frozen=True)
class Route:
    """What a job for an image of ``experiment`` runs with."""

    experiment: str
    #: Run-key suffix: ``name@vN``, ``default``, ``classical``, ``held``; None without SAM.
    tag: str | None
    adapter_id: int | None = None

    @property
    def held(self) -> bool:
        return self.tag == HELD_TAG


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def configured_base(config: Config) -> BaseModel | None:
    """The base model of the ``[sam]`` settings (hashing the checkpoint, reading its backbone), or None when off."""
    checkpoint = config.sam.checkpoint
    if checkpoint is None:
        return None
    if not checkpoint.is_file():
        if config.executor.kind != "local":
            log.warning("sam.checkpoint %s is not on this machine (executor.kind = %r: it is the workers' "
                        "file); adapters are checked against it when a worker loads them", checkpoint,
                        config.executor.kind)
            return None
        raise RegistryError(f"setting sam.checkpoint: {checkpoint} does not exist; correct the path")
    from cellseg1d.model.checkpoint import CheckpointError, checkpoint_model_type

    sha256 = sha256_of(checkpoint)
    try:  # the backbone is read from the checkpoint (from its hash when official); sam.model_type is a check
        model_type = checkpoint_model_type(checkpoint, sha256=sha256, expected=config.sam.model_type,
                                           setting="sam.model_type")
    except CheckpointError as err:
        raise RegistryError(f"setting sam.checkpoint: {err}") from None
    return BaseModel(model_type, sha256, f"sam.checkpoint ({checkpoint})")


def check_name(name: str) -> str:
    """``name`` if it can name an adapter, else RegistryError."""
    if not _NAME.match(name):
        raise RegistryError(f"invalid adapter name {name!r}: use 1-64 letters, digits, '_' or '-', starting "
                            "with a letter or digit (pass --name NAME)")
    return name


def parse_ref(text: str) -> tuple[str, int | None]:
    """``"hela"`` -> ("hela", None); ``"hela@v3"`` or ``"hela@3"`` -> ("hela", 3)."""
    found = _REF.match(text.strip())
    if not found:
        raise RegistryError(f"invalid adapter reference {text!r}: expected NAME or NAME@vVERSION")
    version = found["version"]
    return found["name"], int(version) if version is not None else None


def adapter_ref(row: Adapter) -> AdapterRef:
    """The job-side description of a registered adapter version."""
    return AdapterRef(row.name, row.version, row.sha256, Path(row.store_path), row.base_model_type,
                      row.base_sha256)


def ensure_experiment(catalog: Catalog, name: str) -> None:
    """Record experiment ``name`` in the catalog if it is new."""
    for _ in range(3):
        try:
            with catalog.session() as s:
                if s.scalar(select(Experiment.id).where(Experiment.name == name)) is None:
                    s.add(Experiment(name=name, created_at=utcnow()))
            return
        except IntegrityError:
            continue  # created by another process at the same moment


def _current(session: Any, experiment: str) -> Adapter | None:
    return session.scalar(
        select(Adapter).join(Assignment, Assignment.adapter_id == Adapter.id)
        .join(Experiment, Experiment.id == Assignment.experiment_id)
        .where(Experiment.name == experiment, Assignment.unassigned_at.is_(None))
    )


def route_for(catalog: Catalog, experiment: str, root: WatchRoot | None, sam_enabled: bool) -> Route:
    """What a new job for an image of ``experiment`` under ``root`` runs with."""
    if not sam_enabled:
        return Route(experiment, None)
    with catalog.session() as s:
        adapter = _current(s, experiment)
        if adapter is not None:
            return Route(experiment, adapter.label, adapter.id)
        policy = root.without_adapter if root is not None else "default"
        if policy == "hold":
            return Route(experiment, HELD_TAG)
        if policy == "classical":
            return Route(experiment, "classical")
        default = _current(s, "default")
        if default is not None:
            return Route(experiment, default.label, default.id)
        return Route(experiment, "default")


def base_mismatch(meta_type: str, meta_sha: str, base: BaseModel) -> str | None:
    if meta_type != base.model_type:
        return f"it was trained on a {meta_type} SAM but the daemon's base model is a {base.model_type}"
    if meta_sha != base.sha256:
        return (f"it was trained on base checkpoint sha256 {meta_sha} but the daemon's base checkpoint "
                f"({base.source}) has sha256 {base.sha256}")
    return None


class Registry:
    """Adapter versions in ``store`` and the catalog; ``base`` (when known) is checked on add and assign."""

    def __init__(self, catalog: Catalog, store: Path, base: BaseModel | None = None) -> None:
        self.catalog = catalog
        self.store = store
        self.base = base

    # -- adding -------------------------------------------------------------

    def add(self, source: Path, name: str | None = None) -> Adapter:
        """Register the adapter folder ``source`` as the next version of ``name`` (default: its metadata name)."""
        from cellseg1d.model.adapters import AdapterError, read_metadata

        source = Path(source).expanduser().resolve()
        try:
            meta = read_metadata(source)
        except AdapterError as err:
            raise RegistryError(f"cannot register {source}: {err}") from None
        weights = source / WEIGHTS_FILE
        if not weights.is_file():
            raise RegistryError(f"cannot register {source}: {WEIGHTS_FILE} is missing")
        actual = sha256_of(weights)
        if actual != meta.weights_sha256:
            raise RegistryError(
                f"refused adapter {source}: {WEIGHTS_FILE} does not match its metadata (sha256 expected "
                f"{meta.weights_sha256}, actual {actual}); the files are corrupted or were modified. "
                "Retrain the adapter or restore both files.")
        if self.base is not None:
            problem = base_mismatch(meta.base_model_type, meta.base_checkpoint_sha256, self.base)
            if problem:
                raise RegistryError(f"refused adapter {source}: {problem}. Train it on this base model "
                                    "(cellseg1d train --checkpoint ...) or register it with the daemon that "
                                    "runs its base.")
        else:
            log.warning("no sam.checkpoint configured: %s is not checked against a base model now "
                        "(it is when a job loads it)", source)
        name = check_name(name or meta.name)
        with self.catalog.session() as s:
            same = s.scalar(select(Adapter).where(Adapter.name == name, Adapter.sha256 == actual,
                                                  Adapter.removed_at.is_(None)))
            if same is not None:
                raise RegistryError(f"adapter {source} is already registered as {same.label} (same weights); "
                                    f"assign that version: cellseg1d adapters assign EXPERIMENT {same.label}")
            version = (s.scalar(select(func.max(Adapter.version)).where(Adapter.name == name)) or 0) + 1
            target = self.store / name / f"v{version}"
            row = Adapter(name=name, version=version, sha256=actual, base_model_type=meta.base_model_type,
                          base_sha256=meta.base_checkpoint_sha256, store_path=str(target),
                          meta=json.loads(meta.to_json()), created_at=utcnow())
            s.add(row)
            s.flush()  # a concurrent add of the same version fails here, before any file is copied
            self._copy_in(source, target, actual)
            try:
                s.flush()
            except BaseException:
                shutil.rmtree(target, ignore_errors=True)
                raise
        log.info("registered adapter %s from %s", row.label, source)
        return row

    def _copy_in(self, source: Path, target: Path, sha256: str) -> None:
        """Copy the adapter files to ``target`` atomically: temporary folder, checksum, rename."""
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # left by an add that crashed before its catalog commit: not registered
            shutil.rmtree(target)
        temporary = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        temporary.mkdir()
        try:
            for name in (WEIGHTS_FILE, METADATA_FILE):
                shutil.copyfile(source / name, temporary / name)
            copied = sha256_of(temporary / WEIGHTS_FILE)
            if copied != sha256:
                raise RegistryError(f"copying {source} into the adapter store {target.parent} changed its "
                                    f"weights (sha256 {copied}); check the disk and try again")
            temporary.rename(target)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise

    # -- looking up ---------------------------------------------------------

    def get(self, name: str, version: int | None = None) -> Adapter:
        """The registered version (latest when ``version`` is None) of adapter ``name``."""
        with self.catalog.session() as s:
            query = select(Adapter).where(Adapter.name == name, Adapter.removed_at.is_(None))
            if version is not None:
                query = query.where(Adapter.version == version)
            row = s.scalar(query.order_by(Adapter.version.desc()).limit(1))
            if row is None:
                known = s.scalars(select(Adapter).where(Adapter.removed_at.is_(None))
                                  .order_by(Adapter.name, Adapter.version)).all()
                listed = ", ".join(a.label for a in known) or "none"
                wanted = name if version is None else f"{name}@v{version}"
                raise RegistryError(f"no registered adapter {wanted} (registered: {listed}); "
                                    "add one with: cellseg1d adapters add FOLDER")
            return row

    def current(self, experiment: str) -> Adapter | None:
        """The adapter version assigned to ``experiment``, if any."""
        with self.catalog.session() as s:
            return _current(s, experiment)

    def list(self, include_removed: bool = False) -> list[dict[str, Any]]:
        """Every adapter version, with the experiments it is assigned to."""
        with self.catalog.session() as s:
            query = select(Adapter).order_by(Adapter.name, Adapter.version)
            if not include_removed:
                query = query.where(Adapter.removed_at.is_(None))
            assigned: dict[int, list[str]] = {}
            for adapter_id, experiment in s.execute(
                select(Assignment.adapter_id, Experiment.name).join(Experiment)
                .where(Assignment.unassigned_at.is_(None))
            ).all():
                assigned.setdefault(adapter_id, []).append(experiment)
            return [_describe(a, assigned.get(a.id, [])) for a in s.scalars(query)]

    def experiments(self) -> list[dict[str, Any]]:
        """Every experiment with its assigned adapter, image count and held jobs."""
        with self.catalog.session() as s:
            held = dict(s.execute(select(Job.experiment, func.count()).where(Job.state == JobState.HELD)
                                  .group_by(Job.experiment)).all())
            rows = []
            for exp in s.scalars(select(Experiment).order_by(Experiment.name)):
                adapter = _current(s, exp.name)
                rows.append({"experiment": exp.name, "adapter": adapter.label if adapter else None,
                             "held_jobs": int(held.get(exp.name, 0)), "created_at": exp.created_at})
            return rows

    def show(self, name: str, version: int | None = None) -> dict[str, Any]:
        """One adapter version in full: metadata, assignments (with history) and how many results it made."""
        row = self.get(name, version)
        with self.catalog.session() as s:
            history = [
                {"experiment": exp, "assigned_at": a.assigned_at, "unassigned_at": a.unassigned_at}
                for a, exp in s.execute(select(Assignment, Experiment.name).join(Experiment)
                                        .where(Assignment.adapter_id == row.id).order_by(Assignment.id)).all()
            ]
            results = s.scalar(select(func.count()).select_from(Result).join(Job, Job.id == Result.job_id)
                               .where(Job.adapter_id == row.id))
        current = [h["experiment"] for h in history if h["unassigned_at"] is None]
        return {**_describe(row, current), "metadata": row.meta, "assignments": history, "results": int(results)}

    # -- assigning and removing ----------------------------------------------

    def assign(self, experiment: str, name: str, version: int | None = None) -> tuple[Adapter, int]:
        """Pin ``experiment`` to adapter ``name`` (latest version unless given); release its held jobs.

        Returns the adapter and how many held jobs were queued.
        """
        if not experiment.strip():
            raise RegistryError("the experiment name is empty")
        row = self.get(name, version)
        if self.base is not None:
            problem = base_mismatch(row.base_model_type, row.base_sha256, self.base)
            if problem:
                raise RegistryError(f"refused to assign {row.label} to {experiment}: {problem}. Assign an "
                                    "adapter trained on this base model.")
        weights = Path(row.store_path) / WEIGHTS_FILE
        if not weights.is_file() or sha256_of(weights) != row.sha256:
            raise RegistryError(f"refused to assign {row.label}: its files in the store ({row.store_path}) are "
                                "missing or were modified; remove it (cellseg1d adapters remove "
                                f"{row.label}) and add it again")
        ensure_experiment(self.catalog, experiment)
        with self.catalog.session() as s:
            exp = s.scalar(select(Experiment).where(Experiment.name == experiment))
            assert exp is not None
            now = utcnow()
            for old in s.scalars(select(Assignment).where(Assignment.experiment_id == exp.id,
                                                          Assignment.unassigned_at.is_(None))):
                old.unassigned_at = now
            s.add(Assignment(experiment_id=exp.id, adapter_id=row.id, pinned=True, assigned_at=now))
            released = sum(release_held(s, job, row.label, row.id) for job in held_jobs(s, experiment))
        log.info("assigned %s to experiment %s; %d held job(s) released", row.label, experiment, released)
        return row, released

    def remove(self, name: str, version: int) -> Adapter:
        """Remove adapter version ``name@v<version>``: its files go, its catalog row stays for provenance."""
        row = self.get(name, version)
        with self.catalog.session() as s:
            users = s.scalars(select(Experiment.name).join(Assignment)
                              .where(Assignment.adapter_id == row.id, Assignment.unassigned_at.is_(None))).all()
            if users:
                raise RegistryError(f"{row.label} is assigned to experiment(s) {', '.join(users)}; assign "
                                    "them another adapter first (cellseg1d adapters assign EXPERIMENT NAME)")
            pending = s.scalar(select(func.count()).select_from(Job).where(
                Job.adapter_id == row.id, Job.state.in_(JobState.ACTIVE)))
            if pending:
                raise RegistryError(f"{row.label} has {pending} queued, running or retrying job(s); wait until "
                                    "they finish (cellseg1d status)")
            s.get(Adapter, row.id).removed_at = utcnow()  # type: ignore[union-attr]
        shutil.rmtree(row.store_path, ignore_errors=True)
        log.info("removed adapter %s", row.label)
        return row


def _describe(row: Adapter, experiments: list[str]) -> dict[str, Any]:
    return {
        "adapter": row.label, "name": row.name, "version": row.version, "sha256": row.sha256,
        "base_model_type": row.base_model_type, "base_sha256": row.base_sha256, "path": row.store_path,
        "created_at": row.created_at, "removed_at": row.removed_at, "experiments": sorted(experiments),
    }
