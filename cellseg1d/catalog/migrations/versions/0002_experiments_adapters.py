"""Experiments, adapter registry and assignments; experiment, adapter and provenance on images, jobs, results.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

Only columns are added to the existing tables (no table is rebuilt), so an
upgrade keeps every row, on SQLite as on PostgreSQL.
"""

import sqlalchemy as sa
from alembic import op

from cellseg1d.catalog.models import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "experiments",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "adapters",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("base_model_type", sa.String(32), nullable=False),
        sa.Column("base_sha256", sa.String(64), nullable=False),
        sa.Column("store_path", sa.Text(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("removed_at", UTCDateTime()),
        sa.UniqueConstraint("name", "version", name="uq_adapters_name_version"),
    )
    op.create_table(
        "assignments",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("experiment_id", sa.Integer(), sa.ForeignKey("experiments.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("adapter_id", sa.Integer(), sa.ForeignKey("adapters.id"), nullable=False),
        sa.Column("pinned", sa.Boolean(), nullable=False),
        sa.Column("assigned_at", UTCDateTime(), nullable=False),
        sa.Column("unassigned_at", UTCDateTime()),
    )
    op.create_index("ix_assignments_experiment_id", "assignments", ["experiment_id"])
    op.add_column("images", sa.Column("experiment", sa.String(200)))
    op.create_index("ix_images_experiment", "images", ["experiment"])
    op.add_column("jobs", sa.Column("experiment", sa.String(200)))
    # REFERENCES inline: SQLite cannot add a foreign key to an existing table otherwise.
    op.add_column("jobs", sa.Column("adapter_id", sa.Integer(), sa.ForeignKey("adapters.id")),
                  inline_references=True)
    op.create_index("ix_jobs_adapter_id", "jobs", ["adapter_id"])
    op.add_column("results", sa.Column("provenance", sa.JSON()))


def downgrade() -> None:
    op.drop_column("results", "provenance")
    op.drop_index("ix_jobs_adapter_id", "jobs")
    op.drop_column("jobs", "adapter_id")
    op.drop_column("jobs", "experiment")
    op.drop_index("ix_images_experiment", "images")
    op.drop_column("images", "experiment")
    op.drop_table("assignments")
    op.drop_table("adapters")
    op.drop_table("experiments")
