"""Storage on both backends: migrations, idempotent ingest, ack state, retention, queries, stats, blobs."""

from __future__ import annotations

import time

import numpy as np
import pytest
import sqlalchemy as sa

from collector.records import png_to_map
from collector.store import HeartbeatIn, Retention, Store
from protocol.messages import Heartbeat, StationEvent


def test_migrations_create_exactly_the_schema_and_rerun_harmlessly(store: Store) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from collector.db import COLLECTOR_VERSION_TABLE, upgrade_collector
    from collector.schema import metadata

    upgrade_collector(store.engine)  # a second start must find the schema current
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": COLLECTOR_VERSION_TABLE})
        assert compare_metadata(context, metadata) == []
        assert conn.execute(sa.text(f"SELECT version_num FROM {COLLECTOR_VERSION_TABLE}")).scalar() == "0001"


def test_sqlite_runs_in_wal_mode(tmp_path) -> None:
    s = Store.open(f"sqlite:///{tmp_path / 'x.db'}")
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    s.close()


def test_resend_is_idempotent_and_still_acked(store: Store, record) -> None:
    batch = [record(seq) for seq in (1, 2, 3)]
    first = store.insert_batch(batch)
    assert first.inserted == 3 and first.upto == {("st1", 1): 3}
    again = store.insert_batch([record(2), record(3), record(4)])
    assert again.inserted == 1
    assert again.stored == {("st1", 1, 2), ("st1", 1, 3), ("st1", 1, 4)}
    assert again.upto == {("st1", 1): 4}
    assert store.identities() == [("st1", 1, s) for s in (1, 2, 3, 4)]


def test_cumulative_ack_waits_for_the_gap_and_survives_a_restart(store: Store, record) -> None:
    out = store.insert_batch([record(1), record(2), record(5), record(6)])
    assert out.upto == {("st1", 1): 2}  # 3 and 4 missing: 5, 6 are acked individually, not cumulatively
    # a second collector process on the same database (or this one after a restart) starts from the DB
    other = Store(store.engine)
    assert other.acked_upto("st1", 1) == 2
    out = other.insert_batch([record(3), record(4)])
    assert out.upto == {("st1", 1): 6}
    # the first process learns about 3 and 4 from the database, not from its own memory: at most once a
    # second per stalled epoch (a permanent gap must not cost a query per batch)
    assert store.insert_batch([record(7)]).upto == {("st1", 1): 2}
    assert store.insert_batch([record(8)], now=time.time() + 1.5).upto == {("st1", 1): 8}
    assert Store(store.engine).acked_upto("st1", 1) == 8
    # epochs are independent
    assert store.insert_batch([record(1, epoch=2)]).upto == {("st1", 2): 1}


def test_a_failed_transaction_stores_and_acks_nothing(store: Store, record) -> None:
    store.insert_batch([record(1)])
    bad = record(2)
    bad.row["decision"] = None  # NOT NULL: the whole batch must roll back
    with pytest.raises(
        sa.exc.IntegrityError,
        match='NOT NULL constraint failed: inspections.decision|null value in column "decision"',
    ):
        store.insert_batch([record(3), bad])
    assert store.identities() == [("st1", 1, 1)]
    assert store.acked_upto("st1", 1) == 1


def test_events_and_heartbeats(store: Store) -> None:
    event = StationEvent(station_id="st1", epoch=1, event_id="e" * 32, ts=1.0, kind="bundle_loaded")
    hb = Heartbeat(sender="st1", epoch=1, ts=1.0, bundle_version="1.0.0", fps=12.5, health={"temp_c": 51.0})
    now = time.time()
    out = store.insert_batch(events=[event], heartbeats=[HeartbeatIn(hb, "fp0123")], now=now)
    assert out.event_ids == {"e" * 32} and out.events_inserted == 1
    assert store.insert_batch(events=[event]).events_inserted == 0
    assert [e["kind"] for e in store.events()] == ["bundle_loaded"]
    (station,) = store.stations(now=now + 1)
    assert station["online"] and station["fps"] == 12.5 and station["health"] == {"temp_c": 51.0}
    assert station["key_fingerprint"] == "fp0123" and station["bundle_version"] == "1.0.0"
    assert not store.stations(now=now + store.offline_after_s + 1)[0]["online"]


def test_retention_keeps_nok_longer_and_drops_their_blobs(store: Store, record) -> None:
    now = time.time()
    old, recent = now - 10 * 86400, now - 3600
    rows = [record(1, ts=old), record(2, ts=old, decision="NOK", with_map=True), record(3, ts=recent)]
    rows += [
        record(4, ts=old, decision="ERROR"),
        record(5, ts=old - 100 * 86400, decision="NOK", with_map=True),
    ]
    store.insert_batch(rows)
    assert store.blob("st1/1/5/map.png") is not None
    deleted = store.apply_retention(Retention(ok_max_age_s=7 * 86400, nok_max_age_s=90 * 86400), now=now)
    assert deleted["ok"] == 1 and deleted["nok"] == 1
    assert [r["seq"] for r in store.query(limit=None)] == [3, 4, 2]
    assert store.blob("st1/1/5/map.png") is None and store.blob("st1/1/2/map.png") is not None
    # the ack state does not move back when rows go
    assert store.acked_upto("st1", 1) == 5


def test_row_cap_removes_oldest_ok_first(store: Store, record) -> None:
    now = time.time()
    rows = [record(i, ts=now - 100 + i, decision="NOK" if i % 3 == 0 else "OK") for i in range(1, 10)]
    store.insert_batch(rows)
    store.apply_retention(Retention(ok_max_age_s=None, nok_max_age_s=None, max_rows=4), now=now)
    assert sorted(r["seq"] for r in store.query(limit=None)) == [3, 6, 8, 9]
    store.apply_retention(Retention(ok_max_age_s=None, nok_max_age_s=None, max_rows=2), now=now)
    assert sorted(r["seq"] for r in store.query(limit=None)) == [6, 9]


def test_query_filters_and_every_field(store: Store, record) -> None:
    now = time.time()
    store.insert_batch(
        [
            record(1, ts=now - 7200),
            record(2, ts=now - 60, decision="NOK", score=1.7),
            record(3, ts=now - 30, decision="ERROR"),
            record(1, station="st2", ts=now - 10, bundle_version="2.0.0"),
        ]
    )
    assert [r["seq"] for r in store.query(station="st1")] == [3, 2, 1]
    assert [r["seq"] for r in store.query(since=now - 3600, station="st1")] == [3, 2]
    assert [r["station_id"] for r in store.query(bundle="2.0.0")] == ["st2"]
    assert len(store.query(limit=2)) == 2
    (nok,) = store.query(decision="nok")
    assert nok["image_score"] == 1.7 and nok["bank_scores"] == {"rgb": 0.1, "point": 0.2, "fusion": 0.3}
    (err,) = store.query(decision="ERROR")
    assert err["image_score"] is None
    assert (err["error_reason"], err["error_file"]) == ("corrupt TIFF", "/data/bad.tiff")
    assert err["frame_id"] == "st1-1-3" and err["latency_ms"] == {"total": 13.0}
    assert [r["seq"] for r in store.recent_nok(limit=5)] == [2]


def test_stats_per_station_and_bundle(store: Store, record) -> None:
    rows = [record(i, score=float(i), decision="NOK" if i > 8 else "OK") for i in range(1, 11)]
    rows += [record(1, station="st2", bundle_version="2.0.0", decision="ERROR")]
    store.insert_batch(rows)
    stats = store.stats()
    st1 = next(s for s in stats["stations"] if s["station_id"] == "st1")
    assert st1["count"] == 10 and st1["nok"] == 2 and st1["nok_rate"] == pytest.approx(0.2)
    assert st1["score_p50"] == pytest.approx(5.5) and st1["score_p99"] == pytest.approx(9.91)
    assert st1["latency_p95_ms"] == pytest.approx(np.percentile([10 + i % 10 for i in range(1, 11)], 95))
    st2 = next(s for s in stats["stations"] if s["station_id"] == "st2")
    assert st2["error"] == 1 and st2["score_p50"] is None
    assert [b["bundle_version"] for b in stats["bundles"]] == ["1.0.0", "2.0.0"]


def test_map_is_stored_as_png_that_restores_the_quantised_values(store: Store, record) -> None:
    rec = record(1, decision="NOK", with_map=True)
    store.insert_batch([rec])
    (row,) = store.query()
    media, png = store.blob(row["map_key"])
    assert media == "image/png" and png.startswith(b"\x89PNG")
    restored = png_to_map(png, row["map_offset"], row["map_scale"])
    assert restored.shape == (row["map_height"], row["map_width"]) == (24, 32)
    values = np.random.default_rng(1).random((24, 32), dtype=np.float32) * 3.0
    assert np.max(np.abs(restored - values)) <= row["map_scale"] / 2 + 1e-6


def test_score_histogram(store: Store, record) -> None:
    rows = [record(i, score=0.1 * i, decision="NOK" if i >= 10 else "OK") for i in range(1, 13)]
    store.insert_batch(rows)
    hist = store.score_histogram("st1", bins=4)
    assert len(hist["edges"]) == 5 and hist["threshold"] == 1.0
    assert sum(hist["ok"]) == 9 and sum(hist["nok"]) == 3 and hist["n"] == 12
