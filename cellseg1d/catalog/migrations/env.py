"""Alembic environment for the cellseg1d catalog: always run on a given connection."""

from __future__ import annotations

from alembic import context

from cellseg1d.catalog.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("cellseg1d migrations run through Catalog.migrate(), which passes a connection")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
