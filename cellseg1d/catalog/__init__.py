"""Layer ``catalog``: what is remembered, in SQLite or PostgreSQL.

The tables (``models``), the engine and migrations (``db``), the job queue
(``jobs``), finished containers (``containers``) and read-only reports
(``report``). May import only the shared top level; imported by every layer
above it.
"""

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
