"""Containers the watcher finished with, and their stat-level signature.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04

A restart looks at each recorded container with a few ``stat`` calls
instead of opening its images. Only adds a table, so it runs on SQLite and
PostgreSQL and keeps every row; a catalog upgraded from 0004 has no rows
yet, so the first start after the upgrade still opens every container once
(and records it).
"""

import sqlalchemy as sa
from alembic import op

from cellseg1d.catalog.models import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "containers",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("path", sa.Text(), nullable=False, unique=True),
        sa.Column("root", sa.Text(), nullable=False),
        sa.Column("signature", sa.String(64), nullable=False),
        sa.Column("images", sa.JSON(), nullable=False),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("containers")
