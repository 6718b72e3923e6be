"""The catalog: every image, job and result, in SQLite or PostgreSQL."""

from cellseg1d.catalog.db import Catalog
from cellseg1d.catalog.models import (
    Adapter,
    Assignment,
    Container,
    Experiment,
    ExportOutcome,
    ExportStatus,
    Image,
    ImageStatus,
    Job,
    JobEvent,
    JobEventKind,
    JobState,
    Result,
    utcnow,
)

__all__ = [
    "Adapter", "Assignment", "Catalog", "Container", "Experiment", "ExportOutcome", "ExportStatus", "Image", "ImageStatus", "Job", "JobEvent", "JobEventKind",
    "JobState", "Result", "utcnow",
]
