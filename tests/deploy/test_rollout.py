"""The rollout state machine on a real SQLite database, with stations and results simulated as rows.

No sockets, no models: check-ins and update reports go through the same functions the registry calls, and
results are inserted into the collector's `inspections` table, so every transition (and a restart of the
engine at any point) is exercised in well under a second per case.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from collector.db import make_engine, upgrade_collector
from collector.schema import inspections
from deploy.bundle_store import chunk_digests
from deploy.db import dumps, open_db
from deploy.fleet import handle_checkin, handle_report, set_policy
from deploy.rollout import (
    RolloutEngine,
    RolloutError,
    RolloutSpec,
    create_rollout,
    manual_rollback,
    rollout_status,
)
from deploy.tables import bundles
from protocol.deploy_messages import CheckIn, UpdateReport

OLD, NEW = "a" * 32, "b" * 32
STATIONS = ("st-1", "st-2", "st-3")


PG_ENV = "M3DM_TEST_PG_URL"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """SQLite, and a fresh PostgreSQL database per test (skipped only outside CI without a server)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        if os.environ.get("CI"):
            pytest.fail(f"{PG_ENV} is not set under CI")
        pytest.skip(f"{PG_ENV} not set (outside CI); .ci/run provides PostgreSQL")
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    name = f"m3dm_deploy_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.engine.make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture()
def engine(db_url: str, tmp_path: Path) -> Iterator[sa.Engine]:
    url = db_url
    collector_engine = make_engine(url)
    upgrade_collector(collector_engine)
    collector_engine.dispose()
    eng = open_db(url)
    payload = tmp_path / "b.tar"
    payload.write_bytes(b"x" * 10)
    digest, chunks = chunk_digests(payload, 4)
    with eng.begin() as conn:
        for bid, version in ((OLD, "1.0.0"), (NEW, "1.1.0")):
            conn.execute(
                bundles.insert().values(
                    bundle_id=bid,
                    version=version,
                    class_name="ring",
                    anti_rollback_counter=1,
                    size_bytes=10,
                    sha256=digest,
                    chunk_bytes=4,
                    chunk_sha256=dumps(chunks),
                    path=str(payload),
                    published_ts=0.0,
                    published_by="test",
                )
            )
    for sid in STATIONS:
        checkin(eng, sid, OLD)
    yield eng
    eng.dispose()


def checkin(engine: sa.Engine, sid: str, active: str, previous: str = "") -> object:
    msg = CheckIn(
        station_id=sid,
        epoch=1,
        ts=time.time(),
        tags=("class=ring",),
        active_bundle_id=active,
        previous_bundle_id=previous,
    )
    return handle_checkin(engine, msg, f"key-{sid}")


def report(engine: sa.Engine, sid: str, rollout_id: str, outcome: str, active: str, check: str = "") -> None:
    rep = UpdateReport(
        station_id=sid,
        epoch=1,
        ts=time.time(),
        bundle_id=NEW,
        outcome=outcome,
        rollout_id=rollout_id,
        active_bundle_id=active,
        check=check,
        reason="x" if check else "",
    )
    handle_report(engine, rep, f"key-{sid}")


def results(
    engine: sa.Engine, sid: str, bundle_id: str, decisions: str, since: float, start_seq: int
) -> None:
    with engine.begin() as conn:
        for i, d in enumerate(decisions):
            ts = since + 0.001 * (i + 1)
            conn.execute(
                inspections.insert().values(
                    station_id=sid,
                    epoch=1,
                    seq=start_seq + i,
                    frame_id=f"f{start_seq + i}",
                    capture_ts=ts,
                    decision_ts=ts,
                    received_ts=ts,
                    bundle_id=bundle_id,
                    bundle_version="",
                    variant="v",
                    decision="NOK" if d == "N" else "OK",
                    image_score=5.0 + (i % 3),
                    bank_scores={},
                    threshold=8.0,
                    threshold_version=0,
                    latency_ms={},
                    shadow=False,
                    labels={},
                )
            )


def states(engine: sa.Engine, rid: str) -> tuple[str, dict[str, str]]:
    with engine.connect() as conn:
        r = rollout_status(conn, rid)[0]
    return r["state"], {s["station_id"]: s["state"] for s in r["stations"]}


def spec(**kw: object) -> RolloutSpec:
    base = dict(
        bundle_id=NEW,
        selector="class=ring",
        canary=1,
        wave_size=2,
        soak_s=0.0,
        min_results=3,
        max_nok_rate_delta=0.2,
        max_score_shift=2.0,
        install_timeout_s=60.0,
    )
    return RolloutSpec(**{**base, **kw})


def install(engine: sa.Engine, rid: str, sid: str) -> None:
    reply = checkin(engine, sid, OLD)
    assert reply.bundle is not None and reply.bundle.bundle_id == NEW and reply.rollout_id == rid
    report(engine, sid, rid, "installed", NEW)
    checkin(engine, sid, NEW, OLD)


def test_canary_then_waves_while_healthy_and_resume_after_restart(engine: sa.Engine) -> None:
    t0 = time.time() - 10
    for sid in STATIONS:
        results(engine, sid, OLD, "OOOOON", t0, 1)
    rid = create_rollout(engine, spec(), "alice", "weekly model")
    RolloutEngine(engine, engine).tick()
    assert states(engine, rid) == ("wave", {"st-1": "assigned", "st-2": "pending", "st-3": "pending"})
    assert checkin(engine, "st-2", OLD).bundle is None  # not its wave yet
    install(engine, rid, "st-1")
    RolloutEngine(engine, engine).tick()  # a fresh engine: nothing lives outside the database
    assert states(engine, rid)[0] == "soak"
    RolloutEngine(engine, engine).tick()
    assert states(engine, rid)[0] == "soak"  # too few results on the new bundle yet
    results(engine, "st-1", NEW, "OOON", time.time(), 100)
    RolloutEngine(engine, engine).tick()
    assert states(engine, rid) == ("wave", {"st-1": "healthy", "st-2": "pending", "st-3": "pending"})
    RolloutEngine(engine, engine).tick()
    for sid in ("st-2", "st-3"):
        install(engine, rid, sid)
        results(engine, sid, NEW, "OOOOON", time.time(), 100)
    RolloutEngine(engine, engine).tick()
    RolloutEngine(engine, engine).tick()
    assert states(engine, rid) == ("done", dict.fromkeys(STATIONS, "healthy"))


def test_refusal_aborts_and_nothing_else_changes(engine: sa.Engine) -> None:
    rid = create_rollout(engine, spec(), "alice")
    RolloutEngine(engine, engine).tick()
    report(engine, "st-1", rid, "failed", OLD, check="golden")
    RolloutEngine(engine, engine).tick()
    state, per_station = states(engine, rid)
    assert (state, per_station) == ("aborted", {"st-1": "failed", "st-2": "cancelled", "st-3": "cancelled"})
    assert checkin(engine, "st-1", OLD).bundle is None  # no retry of the refused bundle
    with engine.connect() as conn:
        assert "[golden]" in rollout_status(conn, rid)[0]["reason"]


def test_nok_rate_shift_rolls_back_the_updated_station(engine: sa.Engine) -> None:
    results(engine, "st-1", OLD, "OOOOOOOOON", time.time() - 10, 1)
    rid = create_rollout(engine, spec(), "alice")
    RolloutEngine(engine, engine).tick()
    install(engine, rid, "st-1")
    RolloutEngine(engine, engine).tick()
    results(engine, "st-1", NEW, "NNNO", time.time(), 100)
    RolloutEngine(engine, engine).tick()
    assert states(engine, rid) == (
        "rolling_back",
        {"st-1": "rolling_back", "st-2": "cancelled", "st-3": "cancelled"},
    )
    reply = checkin(engine, "st-1", NEW, OLD)
    assert reply.bundle is not None and reply.bundle.bundle_id == OLD  # told to go back
    checkin(engine, "st-1", OLD, NEW)
    RolloutEngine(engine, engine).tick()
    assert states(engine, rid)[0] == "aborted"
    with engine.connect() as conn:
        assert "NOK rate 0.750 vs 0.100" in rollout_status(conn, rid)[0]["reason"]


def test_install_timeout_manual_rollback_and_overlap_refused(engine: sa.Engine) -> None:
    rid = create_rollout(engine, spec(install_timeout_s=0.0), "alice")
    with pytest.raises(RolloutError, match="active rollout"):
        create_rollout(engine, spec(), "bob")
    RolloutEngine(engine, engine).tick()
    RolloutEngine(engine, engine).tick(time.time() + 1)
    state, _ = states(engine, rid)
    assert state == "aborted"
    with engine.connect() as conn:
        assert "did not install" in rollout_status(conn, rid)[0]["reason"]
    checkin(engine, "st-2", NEW, OLD)
    out = manual_rollback(engine, "st-2", "carol", "line 2 complains")
    assert out == [{"station_id": "st-2", "bundle_id": OLD, "note": "rolling back"}]
    assert checkin(engine, "st-2", NEW, OLD).bundle.bundle_id == OLD


def test_policy_versions_reach_matching_stations(engine: sa.Engine) -> None:
    v1 = set_policy(engine, "st-1", "alice", None, 7.5, None, "too many false rejects")
    v2 = set_policy(engine, "class=ring", "alice", None, 9.0, 5)
    assert v2 > v1
    reply = checkin(engine, "st-1", OLD)
    assert (reply.policy.version, reply.policy.threshold, reply.policy.map_every_n_ok) == (v2, 9.0, 5)
    msg = CheckIn(
        station_id="st-1",
        epoch=1,
        ts=time.time(),
        tags=("class=ring",),
        active_bundle_id=OLD,
        policy_version=v2,
    )
    assert handle_checkin(engine, msg, "key-st-1").policy is None  # already applied
    with pytest.raises(Exception, match="enrolled with key"):
        handle_checkin(engine, msg, "another-key")


def shadow_pairs(engine: sa.Engine, sid: str, flips: int, n: int, since: float) -> None:
    """n frames scored live by OLD and in shadow by NEW; the first `flips` of them decided differently."""
    with engine.begin() as conn:
        for i in range(n):
            ts = since + 0.001 * (i + 1)
            for bundle_id, shadow in ((OLD, False), (NEW, True)):
                nok = shadow and i < flips
                conn.execute(
                    inspections.insert().values(
                        station_id=sid,
                        epoch=1,
                        seq=500 + 2 * i + shadow,
                        frame_id=f"s{i}",
                        capture_ts=ts,
                        decision_ts=ts,
                        received_ts=ts,
                        bundle_id=bundle_id,
                        bundle_version="",
                        variant="v",
                        decision="NOK" if nok else "OK",
                        image_score=5.0 + i,
                        bank_scores={},
                        threshold=8.0,
                        threshold_version=0,
                        latency_ms={},
                        shadow=shadow,
                        labels={},
                    )
                )


@pytest.mark.parametrize(("flips", "expect"), [(0, "wave"), (3, "aborted")])
def test_required_shadow_period_gates_the_canary(engine: sa.Engine, flips: int, expect: str) -> None:
    rid = create_rollout(engine, spec(require_shadow=True, shadow_s=0.0, max_flip_rate=0.1), "alice")
    reply = checkin(engine, "st-1", OLD)
    assert reply.shadow is not None and reply.shadow.offer.bundle_id == NEW and reply.bundle is None
    shadow_pairs(engine, "st-1", flips, 10, time.time())
    RolloutEngine(engine, engine).tick()
    state, per_station = states(engine, rid)
    assert state == expect
    if expect == "wave":
        assert per_station == {"st-1": "pending", "st-2": "pending", "st-3": "pending"}
    else:
        with engine.connect() as conn:
            assert "3 of 10 decisions flip" in rollout_status(conn, rid)[0]["reason"]
    msg = CheckIn(
        station_id="st-1",
        epoch=1,
        ts=time.time(),
        tags=("class=ring",),
        active_bundle_id=OLD,
        shadow_bundle_id=NEW,
    )
    assert handle_checkin(engine, msg, "key-st-1").clear_shadow  # the shadow period is over either way


def test_migrations_match_the_tables(engine: sa.Engine) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from deploy.tables import metadata

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": "deploy_alembic_version"})
        # the collector's tables share the database; only ours must match
        diff = [d for d in compare_metadata(ctx, metadata) if "deploy_" in repr(d)]
    assert diff == []
    assert "deploy_alembic_version" in sa.inspect(engine).get_table_names()
