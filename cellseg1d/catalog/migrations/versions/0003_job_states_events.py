"""Job states as issue 5 names them (failed = waiting for a retry, quarantined = terminal); job events.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27

Before 0003, ``failed`` was terminal and a job waiting for its retry was
``queued`` with an error and a ``next_attempt_at``. Now ``failed`` is a
failed attempt waiting for its retry and ``quarantined`` is terminal, so the
rows are moved over (terminal ``failed`` first, then the retry waiters). The
new ``job_events`` table records releases, quarantines and start-up redos.
Nothing is rebuilt (on SQLite a table rebuild would cascade-delete results),
and only portable statements are used, so it runs on SQLite and PostgreSQL.
"""

import sqlalchemy as sa
from alembic import op

from cellseg1d.catalog.models import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text()),
        sa.Column("actor", sa.String(200)),
    )
    op.create_index("ix_job_events_job_id", "job_events", ["job_id"])
    op.execute("UPDATE jobs SET state = 'quarantined' WHERE state = 'failed'")
    op.execute("UPDATE jobs SET state = 'failed' WHERE state = 'queued' AND error IS NOT NULL "
               "AND next_attempt_at IS NOT NULL")


def downgrade() -> None:
    op.execute("UPDATE jobs SET state = 'queued' WHERE state = 'failed'")
    op.execute("UPDATE jobs SET state = 'failed' WHERE state = 'quarantined'")
    op.drop_index("ix_job_events_job_id", "job_events")
    op.drop_table("job_events")
