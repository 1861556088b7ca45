"""Collector fixtures: a fresh database per test on each backend, and result factories.

`db_url` runs a test on SQLite and on PostgreSQL. The PostgreSQL case needs `M3DM_TEST_PG_URL` (a role that
may CREATE DATABASE; `.ci/run` starts a server and exports it). It is skipped only on a developer machine
without it; under CI (`CI` set) a missing URL is a failure, never a skip.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

PG_ENV = "M3DM_TEST_PG_URL"
# collector_procs.py (process and client helpers) sits next to this file; test modules import it by name
sys.path.insert(0, str(Path(__file__).parent))


def pg_base_url() -> str | None:
    url = os.environ.get(PG_ENV)
    if url:
        return url
    if os.environ.get("CI"):
        pytest.fail(f"{PG_ENV} is not set under CI: .ci/run must start PostgreSQL and export it")
    return None


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """One PostgreSQL database for the session, created and migrated once, dropped at the end."""
    import sqlalchemy as sa

    from collector.db import make_engine, upgrade_collector

    base = pg_base_url()
    if base is None:
        pytest.skip(f"{PG_ENV} not set (outside CI); .ci/run provides PostgreSQL")
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    name = f"m3dm_t_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(base).set(database=name).render_as_string(hide_password=False)
    engine = make_engine(url)
    upgrade_collector(engine)
    engine.dispose()
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def pg_url(pg_database: str) -> str:
    """The session's PostgreSQL database, emptied for this test (TRUNCATE is quicker than CREATE DATABASE)."""
    import sqlalchemy as sa

    from collector.schema import metadata

    engine = sa.create_engine(pg_database)
    with engine.begin() as conn:
        conn.execute(
            sa.text(f"TRUNCATE {', '.join(t.name for t in metadata.sorted_tables)} RESTART IDENTITY")
        )
    engine.dispose()
    return pg_database


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(db_url: str) -> Iterator:
    from collector.store import Store

    s = Store.open(db_url)
    try:
        yield s
    finally:
        s.close()


def make_message(
    seq: int,
    station: str = "st1",
    epoch: int = 1,
    decision: str = "OK",
    score: float | None = 0.5,
    ts: float | None = None,
    bundle_version: str = "1.0.0",
    bundle_id: str = "b" * 32,
    with_map: bool = False,
    threshold: float | None = 1.0,
):
    """(InspectionResult, blobs) as a station would send it."""
    from protocol.frames import quantise_map
    from protocol.messages import InspectionResult

    now = time.time() if ts is None else ts
    blobs: list[bytes] = []
    meta = None
    if with_map:
        values = np.random.default_rng(seq).random((24, 32), dtype=np.float32) * 3.0
        meta, payload = quantise_map(values, 1)
        blobs.append(payload)
    msg = InspectionResult(
        station_id=station,
        epoch=epoch,
        seq=seq,
        frame_id=f"{station}-{epoch}-{seq}",
        capture_ts=now - 0.01,
        decision_ts=now,
        bundle_id=bundle_id,
        bundle_version=bundle_version,
        variant="rgb+point+fusion",
        decision=decision,
        image_score=None if decision == "ERROR" else score,
        bank_scores={} if decision == "ERROR" else {"rgb": 0.1, "point": 0.2, "fusion": 0.3},
        threshold=threshold,
        latency_ms={"total": 10.0 + seq % 10},
        error_reason="corrupt TIFF" if decision == "ERROR" else None,
        error_file="/data/bad.tiff" if decision == "ERROR" else None,
        anomaly_map=meta,
    )
    return msg, blobs


@pytest.fixture
def record() -> Callable:
    """record(seq, **kw) -> ResultRecord (see make_message for the keywords)."""
    from collector.records import result_record

    def make(seq: int, **kw):
        msg, blobs = make_message(seq, **kw)
        return result_record(msg, blobs)

    return make
