"""The registry's database: the collector's engine factory, and the registry's own Alembic history.

`open_db(url)` gives an engine with the registry tables migrated to head. The collector and the registry
may share one database (SQLite by default, PostgreSQL at scale): the registry's tables are `deploy_*` and
its Alembic history sits in `deploy_alembic_version`, so neither migrates the other's tables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from collector.db import make_engine, upgrade, writer
from deploy.tables import metadata

__all__ = ["DEPLOY_VERSION_TABLE", "MIGRATIONS_DIR", "dumps", "loads", "make_engine", "open_db", "writer"]

DEPLOY_VERSION_TABLE = "deploy_alembic_version"
MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def open_db(url: str) -> sa.Engine:
    """An engine on `url` with the registry's tables at the newest schema (safe at every start)."""
    engine = make_engine(url)
    upgrade(engine, MIGRATIONS_DIR, DEPLOY_VERSION_TABLE)
    return engine


def autogenerate(url: str, message: str) -> None:
    """Developer tool: write a new revision from the difference between `deploy.tables` and `url`'s schema."""
    from alembic import command
    from alembic.config import Config

    engine = make_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes.update(engine=writer(engine), version_table=DEPLOY_VERSION_TABLE, target_metadata=metadata)
    command.revision(cfg, message=message, autogenerate=True, rev_id="0001")


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def loads(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return default
