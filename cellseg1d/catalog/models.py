"""The catalog's tables: images, jobs, results, experiments, adapters and assignments (SQLAlchemy 2 ORM).

The catalog is the source of truth for what was processed. An image row is
one image group on disk; a job row is one run of the pipeline over one
version of that image with one adapter version (its ``run_key``); a result
row is what a finished job wrote. Experiments name kinds of images (sample,
stain, microscope setting); adapters are the registered LoRA adapter
versions; an assignment points an experiment at one adapter version (the
assignment with ``unassigned_at`` NULL is the current one; older rows are
the history). Job events record what happened to a job besides its state
(quarantined, released, retried now, redone at start-up) and why. A
container row says that the watcher finished with a container (every image
in it handed on) and what its metadata looked like then, so that a restart
skips it without opening it while it is unchanged.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the catalog; use cellseg1d.catalog.utcnow()")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class ImageStatus:
    """Values of ``Image.status``: the state of the image's latest job, in words for users."""

    #: Waiting to run: new, or a failed attempt waiting for its retry.
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    #: Needs a person: the image's job is quarantined (bad input, permanent error, attempts used up).
    FAILED = "failed"
    #: Waiting for an adapter to be assigned to the image's experiment.
    HELD = "held"


class JobState:
    """Values of ``Job.state`` (docs/jobs.md draws the machine).

    ``held -> queued -> running -> done``; from ``running`` a transient error
    goes to ``failed`` (claimed again when ``next_attempt_at`` is due) and a
    permanent one, or the last allowed attempt, to ``quarantined``, which
    only ``cellseg1d quarantine --release`` leaves (back to ``queued``).
    """

    QUEUED = "queued"
    #: Claimed by a worker holding a lease (``lease_owner``, ``lease_expires_at``, renewed by heartbeats).
    RUNNING = "running"
    DONE = "done"
    #: An attempt failed; the job runs again at ``next_attempt_at`` (exponential backoff), ``error`` says why.
    FAILED = "failed"
    #: Terminal: a permanent error, ``jobs.max_attempts`` used up, or a job that kept killing its daemon.
    #: ``cellseg1d quarantine --release`` queues it again.
    QUARANTINED = "quarantined"
    #: Waiting for an adapter: the image's experiment has none and its root holds such jobs.
    HELD = "held"

    #: Waiting to run, claimable once due; ACTIVE adds the running ones.
    PENDING = (QUEUED, FAILED)
    ACTIVE = (QUEUED, FAILED, RUNNING)


class Image(Base):
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(primary_key=True)
    path: Mapped[str] = mapped_column(Text, unique=True)
    root: Mapped[str] = mapped_column(Text)
    container: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    ngff_version: Mapped[str | None] = mapped_column(String(16))
    axes: Mapped[str | None] = mapped_column(String(16))
    shape: Mapped[str | None] = mapped_column(String(128))
    dtype: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), index=True)
    error: Mapped[str | None] = mapped_column(Text)
    first_seen: Mapped[datetime]
    updated_at: Mapped[datetime]
    #: The experiment the image belongs to (``experiments.name``), once resolved.
    experiment: Mapped[str | None] = mapped_column(String(200), index=True)

    jobs: Mapped[list[Job]] = relationship(back_populates="image", order_by="Job.id")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("image_id", "run_key", name="uq_jobs_image_run"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    #: Identity of this run: image fingerprint + pipeline version + adapter version (or route).
    run_key: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    next_attempt_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    #: The plugin an error came from, when it came from one.
    error_plugin: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    seconds: Mapped[float | None] = mapped_column(Float)
    #: The experiment this run was queued for.
    experiment: Mapped[str | None] = mapped_column(String(200))
    #: The adapter version this run uses (None: no registered adapter, see ``run_key``).
    adapter_id: Mapped[int | None] = mapped_column(ForeignKey("adapters.id"), index=True)

    image: Mapped[Image] = relationship(back_populates="jobs")
    result: Mapped[Result | None] = relationship(back_populates="job")
    events: Mapped[list[JobEvent]] = relationship(back_populates="job", order_by="JobEvent.id")
    exports: Mapped[list[ExportOutcome]] = relationship(back_populates="job", order_by="ExportOutcome.id")


class JobEventKind:
    """Values of ``JobEvent.kind``."""

    QUARANTINED = "quarantined"
    RELEASED = "released"
    RETRY_NOW = "retry-now"
    #: Start-up reconciliation queued the job again (its label image was missing or incomplete).
    REDO = "redo"
    #: Start-up reconciliation found the job's label image on disk while the job was not done.
    LABELS_WITHOUT_DONE = "labels-without-done"


class JobEvent(Base):
    """Something that happened to a job besides its state changing: who, when, why."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime]
    #: One of :class:`JobEventKind`.
    kind: Mapped[str] = mapped_column(String(32))
    #: Why (the error, the reason given on release, what reconciliation found).
    detail: Mapped[str | None] = mapped_column(Text)
    #: Who: a daemon's lease owner id, ``cellseg1d quarantine``, ``cellseg1d retry``, ...
    actor: Mapped[str | None] = mapped_column(String(200))

    job: Mapped[Job] = relationship(back_populates="events")


class ExportStatus:
    """Values of ``ExportOutcome.status``."""

    OK = "ok"
    FAILED = "failed"
    #: The plugin did not return within ``plugins.timeout_seconds``.
    TIMEOUT = "timeout"


class ExportOutcome(Base):
    """What one export plugin did in one attempt of a job: its record, or its error."""

    __tablename__ = "export_outcomes"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int]
    plugin: Mapped[str] = mapped_column(String(200))
    #: One of :class:`ExportStatus`.
    status: Mapped[str] = mapped_column(String(16))
    seconds: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    #: What the plugin returned (its ``kind``, files, summary), when it succeeded.
    record: Mapped[dict[str, Any] | None]
    at: Mapped[datetime]

    job: Mapped[Job] = relationship(back_populates="exports")


class Result(Base):
    __tablename__ = "results"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    labels_path: Mapped[str] = mapped_column(Text)
    object_count: Mapped[int] = mapped_column(Integer)
    planes: Mapped[int] = mapped_column(Integer)
    segmenter: Mapped[str] = mapped_column(String(200))
    cellseg1d_version: Mapped[str] = mapped_column(String(32))
    pipeline_version: Mapped[str] = mapped_column(String(32))
    #: ``{"records": [export hook answers], "experiment": ..., "timings": {...}, "segmentation": details}``.
    exports: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime]
    #: Experiment, adapter (name, version, sha256), base model (type, sha256), settings, versions.
    provenance: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    job: Mapped[Job] = relationship(back_populates="result")


class Experiment(Base):
    """A kind of image that gets its own adapter (sample type, stain, microscope setting)."""

    __tablename__ = "experiments"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime]


class Adapter(Base):
    """One registered version of a LoRA adapter, its files in the adapter store."""

    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_adapters_name_version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    #: SHA-256 of ``adapter.safetensors``.
    sha256: Mapped[str] = mapped_column(String(64))
    base_model_type: Mapped[str] = mapped_column(String(32))
    base_sha256: Mapped[str] = mapped_column(String(64))
    #: The adapter's folder in the store (``<store>/<name>/v<version>``).
    store_path: Mapped[str] = mapped_column(Text)
    #: The adapter's ``adapter.json`` as registered.
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    created_at: Mapped[datetime]
    #: Set when the version was removed (its files deleted; the row stays for provenance).
    removed_at: Mapped[datetime | None]

    @property
    def label(self) -> str:
        """``name@vN``."""
        return f"{self.name}@v{self.version}"


class Assignment(Base):
    """Experiment -> adapter version; the row with ``unassigned_at`` NULL is the current one."""

    __tablename__ = "assignments"

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"), index=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"))
    #: The experiment uses exactly this version until assigned another one.
    pinned: Mapped[bool] = mapped_column(Boolean, default=True)
    assigned_at: Mapped[datetime]
    unassigned_at: Mapped[datetime | None]

    experiment: Mapped[Experiment] = relationship()
    adapter: Mapped[Adapter] = relationship()


class Container(Base):
    """A container the watcher finished with: every image in it handed on (queued, done or rejected).

    ``signature`` is a stat-level summary of the container's folders and
    metadata files (:func:`cellseg1d.service.watch.container_signature`) over
    ``images`` (the image groups' paths inside the container, ``""`` for the
    container itself): while it is unchanged the container is not opened again.
    """

    __tablename__ = "containers"

    id: Mapped[int] = mapped_column(primary_key=True)
    path: Mapped[str] = mapped_column(Text, unique=True)
    #: The watched folder it was found under.
    root: Mapped[str] = mapped_column(Text)
    signature: Mapped[str] = mapped_column(String(64))
    images: Mapped[list[str]] = mapped_column(JSON)
    recorded_at: Mapped[datetime]
