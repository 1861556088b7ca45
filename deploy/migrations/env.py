"""Alembic environment of the registry's tables; engine and version table come from `collector.db.upgrade`.

The registry shares its database with the collector, so its history lives in its own version table
(`deploy_alembic_version`) and every table it owns is prefixed `deploy_`.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

engine = context.config.attributes["engine"]
version_table = context.config.attributes["version_table"]
# target_metadata only matters to autogenerate (deploy.db.autogenerate); it never touches other roles' tables
target_metadata = context.config.attributes.get("target_metadata")

with engine.connect() as connection:
    context.configure(
        connection=connection,
        version_table=version_table,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        transaction_per_migration=False,
        include_name=lambda name, type_, _parent: type_ != "table" or name.startswith("deploy_"),
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # a registry and its CLI may start at once: one migrates, the other waits and finds it current
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:t))"), {"t": version_table})
        context.run_migrations()
