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


def test_a_republish_is_a_no_op_and_other_bytes_under_the_same_id_are_refused(
    deploy_bundles: dict, tmp_path: Path
) -> None:
    import tarfile

    import pytest

    from deploy.bundle_store import PublishError

    engine = open_db(f"sqlite:///{tmp_path / 'registry.db'}")
    v11, keys, store = deploy_bundles["v11"], deploy_bundles["keys"], tmp_path / "store"
    first = publish(engine, v11["tar"], store, keys, "test")
    assert publish(engine, v11["tar"], store, keys, "test") == first
    # The same signed files in another member order: a valid bundle, other tar bytes, the same id.
    reordered = tmp_path / "reordered.tar"
    with tarfile.open(v11["tar"]) as src, tarfile.open(reordered, "w") as dst:
        for member in reversed(src.getmembers()):
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    with pytest.raises(
        PublishError, match=rf"^bundle {v11['bundle_id']} is already published with different bytes$"
    ):
        publish(engine, reordered, store, keys, "test")
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(bundles)).scalar_one() == 1
    assert sorted(p.name for p in store.iterdir()) == [f"{v11['bundle_id']}.tar"]  # no partial copy left
