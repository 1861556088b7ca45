"""The bundle store under concurrent writers: publishing while the registry holds the write lock."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import sqlalchemy as sa

from deploy.audit import record
from deploy.bundle_store import publish
from deploy.db import open_db, writer
from deploy.tables import bundles


def test_publish_waits_for_a_concurrent_writer_instead_of_failing_locked(
    deploy_bundles: dict, tmp_path: Path
) -> None:
    # The demo's failure: the registry process commits while `deploy publish` is between its read and
    # its insert. A deferred transaction then fails at once with "database is locked" (a stale WAL
    # snapshot cannot be upgraded to a write, busy timeout or not); a write transaction waits.
    engine = open_db(f"sqlite:///{tmp_path / 'registry.db'}")
    holding, done = threading.Event(), threading.Event()

    def registry_write() -> None:
        with writer(engine).begin() as conn:
            record(conn, "registry", "tick", "fleet", "", {})
            holding.set()
            time.sleep(1.5)  # publish's read (if it runs before its lock) lands in this window
        done.set()

    thread = threading.Thread(target=registry_write)
    thread.start()
    try:
        assert holding.wait(10)
        v11 = deploy_bundles["v11"]
        row = publish(engine, v11["tar"], tmp_path / "store", deploy_bundles["keys"], "test")
    finally:
        thread.join(10)
    assert done.is_set()
    assert row["bundle_id"] == v11["bundle_id"]
    with engine.connect() as conn:
        stored = conn.execute(sa.select(bundles.c.bundle_id, bundles.c.sha256)).all()
    assert [(r.bundle_id, r.sha256) for r in stored] == [(v11["bundle_id"], row["sha256"])]
    assert (tmp_path / "store" / f"{v11['bundle_id']}.tar").is_file()
