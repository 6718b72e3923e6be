"""Export outcomes: one row per export plugin per job attempt (ok, failed or timed out).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

Only adds a table, so it runs on SQLite and PostgreSQL and keeps every row.
"""

import sqlalchemy as sa
from alembic import op

from cellseg1d.catalog.models import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "export_outcomes",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("plugin", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("seconds", sa.Float()),
        sa.Column("error", sa.Text()),
        sa.Column("record", sa.JSON()),
        sa.Column("at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_export_outcomes_job_id", "export_outcomes", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_export_outcomes_job_id", "export_outcomes")
    op.drop_table("export_outcomes")
