"""Alembic environment for the collector: engine and version table come from `collector.db.upgrade`."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

engine = context.config.attributes["engine"]
version_table = context.config.attributes["version_table"]

with engine.connect() as connection:
    # render_as_batch: SQLite cannot ALTER most things; batch mode rebuilds the table instead.
    context.configure(
        connection=connection,
        version_table=version_table,
        render_as_batch=connection.dialect.name == "sqlite",
        transaction_per_migration=False,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Several collectors may start at once on one database: one migrates, the others wait here
            # and then find the schema current. (SQLite: the writer engine's BEGIN IMMEDIATE does this.)
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:t))"), {"t": version_table})
        context.run_migrations()
