"""The audit log: who did what, to what, when and why. Every registry action writes one row."""

from __future__ import annotations

import getpass
import socket
import time
from typing import Any

import sqlalchemy as sa

from deploy.db import dumps, loads
from deploy.tables import audit

__all__ = ["default_actor", "read_audit", "record"]


def default_actor() -> str:
    """`user@host` of whoever runs the command (the registry itself records as `registry`)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def record(
    conn: sa.Connection,
    actor: str,
    action: str,
    target: str,
    reason: str = "",
    detail: dict[str, Any] | None = None,
) -> None:
    conn.execute(
        audit.insert().values(
            ts=time.time(),
            actor=actor,
            action=action,
            target=target,
            reason=reason,
            detail=dumps(detail or {}),
        )
    )


def read_audit(conn: sa.Connection, limit: int = 200, target: str | None = None) -> list[dict[str, Any]]:
    query = sa.select(audit).order_by(audit.c.id.desc()).limit(limit)
    if target is not None:
        query = query.where(audit.c.target.contains(target))
    rows = [dict(r._mapping) for r in conn.execute(query)]
    for row in rows:
        row["detail"] = loads(row["detail"], {})
    return rows[::-1]
