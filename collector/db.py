"""Database engines and schema migrations shared by the central roles (collector, deploy registry).

`make_engine(url)` gives a SQLAlchemy 2.x engine tuned for the backend:
  sqlite:///PATH              WAL journal, NORMAL sync, a busy timeout and foreign keys, set on every new
                              connection, so readers (dashboard, CLI) never block the ingest writer
  postgresql+psycopg://...    psycopg 3, pre-ping (a restarted server does not break the pool)
Any other SQLAlchemy URL is passed through unchanged.

`upgrade(engine, script_location, version_table)` runs Alembic migrations in code (no alembic.ini):
each role keeps its own script folder and its own version table, so several roles can share one database.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

__all__ = ["COLLECTOR_VERSION_TABLE", "is_sqlite", "make_engine", "upgrade", "upgrade_collector", "writer"]

log = logging.getLogger("m3dm.db")

COLLECTOR_VERSION_TABLE = "collector_alembic_version"
_COLLECTOR_MIGRATIONS = Path(__file__).with_name("migrations")


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def _sqlite_pragmas(busy_timeout_ms: int):
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin (BEGIN on first statement).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # The busy timeout first: switching to WAL takes a lock, and must wait for it like any statement.
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash (SIGKILL); only an OS crash can lose
        # the last commits, which the stations' outboxes cover by resending.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return on_connect


WRITE_OPTION = "m3dm_write"


def _sqlite_begin(conn: Any) -> None:
    # BEGIN IMMEDIATE takes the write lock up front: two writers wait on busy_timeout instead of one
    # failing with "database is locked" when it upgrades a read transaction to a write.
    immediate = conn.get_execution_options().get(WRITE_OPTION, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def make_engine(url: str, busy_timeout_ms: int = 10_000, echo: bool = False, **kwargs: Any) -> Engine:
    """An engine for `url` (see the module docstring). Extra kwargs go to `sqlalchemy.create_engine`.

    For SQLite the parent folder of the file is created. Write through `writer(engine)`: its transactions
    take SQLite's write lock at BEGIN (on PostgreSQL the option does nothing).
    """
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, echo=echo, **kwargs)
        sa.event.listen(engine, "connect", _sqlite_pragmas(busy_timeout_ms))
        sa.event.listen(engine, "begin", _sqlite_begin)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in ("psycopg2", "default"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    kwargs.setdefault("pool_pre_ping", True)
    return sa.create_engine(parsed, echo=echo, **kwargs)


def writer(engine: Engine) -> Engine:
    """The same engine (same pool) whose transactions are write transactions (SQLite: BEGIN IMMEDIATE)."""
    return engine.execution_options(**{WRITE_OPTION: True})


def upgrade(engine: Engine, script_location: Path, version_table: str, revision: str = "head") -> None:
    """Alembic `upgrade` to `revision`, configured in code, on `engine` (safe to call at every start)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    cfg.attributes["engine"] = writer(engine)
    cfg.attributes["version_table"] = version_table
    command.upgrade(cfg, revision)


def upgrade_collector(engine: Engine) -> None:
    """Bring the collector's tables to the newest schema."""
    upgrade(engine, _COLLECTOR_MIGRATIONS, COLLECTOR_VERSION_TABLE)
