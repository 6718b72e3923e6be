"""The catalog's tables: images, jobs and results (SQLAlchemy 2 ORM).

The catalog is the source of truth for what was processed. An image row is
one image group on disk; a job row is one run of the pipeline over one
version of that image (its ``run_key``); a result row is what a finished job
wrote.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Text, TypeDecorator, UniqueConstraint
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
    """Values of ``Image.status``: the state of the image's latest job."""

    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


class JobState:
    """Values of ``Job.state``."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"

    ACTIVE = (QUEUED, RUNNING)


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

    jobs: Mapped[list[Job]] = relationship(back_populates="image", order_by="Job.id")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("image_id", "run_key", name="uq_jobs_image_run"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    #: Identity of this run: image fingerprint + segmenter + pipeline version.
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

    image: Mapped[Image] = relationship(back_populates="jobs")
    result: Mapped[Result | None] = relationship(back_populates="job")


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

    job: Mapped[Job] = relationship(back_populates="result")
