"""The collector's storage behind one small interface, on SQLAlchemy Core (SQLite or PostgreSQL).

Used by ingest (`insert_batch`), the query CLI, the HTTP API and the dashboard. Every read method returns
plain JSON-ready values (dicts, lists, floats), newest first where there is an order.

Exactly-once ingest lives in the database: inspections are unique on (station_id, epoch, seq) and events on
event_id, and inserts are `INSERT ... ON CONFLICT DO NOTHING`, so a resent result is harmless and several
collector processes may write to one PostgreSQL database. What an Ack may promise (highest contiguous
stored seq per station and epoch) is kept in `station_epochs` and only ever raised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from collector import schema as t
from collector.db import make_engine, upgrade_collector, writer
from collector.records import ResultRecord
from protocol.messages import Heartbeat, StationEvent

__all__ = ["BatchOutcome", "HeartbeatIn", "Retention", "Store"]

log = logging.getLogger("m3dm.collector.store")

EpochKey = tuple[str, int]
_RESULT_COLUMNS = [c.name for c in t.inspections.columns if c.name != "id"]
_PERCENTILES = (50, 90, 99)
_GAP_RECHECK_S = 1.0


@dataclass(frozen=True)
class HeartbeatIn:
    """A station heartbeat and the fingerprint of the CURVE key it came with ("" if unknown)."""

    heartbeat: Heartbeat
    key_fingerprint: str = ""
    received_ts: float = 0.0


@dataclass
class BatchOutcome:
    """What one committed `insert_batch` stored.

    upto: (station, epoch) -> highest contiguous stored seq (what a cumulative Ack may promise).
    stored: every (station, epoch, seq) of the batch now in the database (new or already there).
    inserted: how many inspection rows were new. event_ids: every event of the batch now stored.
    """

    upto: dict[EpochKey, int] = field(default_factory=dict)
    stored: set[tuple[str, int, int]] = field(default_factory=set)
    inserted: int = 0
    event_ids: set[str] = field(default_factory=set)
    events_inserted: int = 0


@dataclass(frozen=True)
class Retention:
    """How long rows are kept. None disables a cap. NOK and ERROR rows count as NOK (kept longer).

    max_rows caps the inspections table: the oldest OK rows go first, NOK rows only when OK rows are gone.
    """

    ok_max_age_s: float | None = 7 * 86400.0
    nok_max_age_s: float | None = 90 * 86400.0
    max_rows: int | None = None
    event_max_age_s: float | None = 90 * 86400.0


@dataclass
class _EpochState:
    upto: int = 0
    above: set[int] = field(default_factory=set)  # stored seqs > upto seen by this process
    gap_checked_ts: float = 0.0


class Store:
    """Storage of the collector. `Store.open(url)` migrates the schema and returns a ready store.

    Writes are serialised inside one process (ingest has one writer thread); reads may come from any thread.
    `offline_after_s`: a station is online while its last message is younger than this.
    """

    def __init__(self, engine: Engine, offline_after_s: float = 15.0) -> None:
        self.engine = engine
        self._writer = writer(engine)
        self.offline_after_s = offline_after_s
        self.dialect = engine.dialect.name
        self._epochs: dict[EpochKey, _EpochState] = {}

    @classmethod
    def open(cls, url: str, offline_after_s: float = 15.0, migrate: bool = True, **engine_kw: Any) -> Store:
        """Engine for `url` (see `collector.db.make_engine`), Alembic upgrade to head, then the store."""
        engine = make_engine(url, **engine_kw)
        if migrate:
            upgrade_collector(engine)
        return cls(engine, offline_after_s)

    def close(self) -> None:
        self.engine.dispose()

    # ----------------------------------------------------------------------------------------------- writes
    def _insert(self, table: sa.Table) -> Any:
        return (postgresql if self.dialect == "postgresql" else sqlite).insert(table)

    def insert_batch(
        self,
        results: Sequence[ResultRecord] = (),
        events: Sequence[StationEvent] = (),
        heartbeats: Sequence[HeartbeatIn] = (),
        now: float | None = None,
    ) -> BatchOutcome:
        """Store a batch in ONE transaction; returns what is stored once this returns (i.e. committed).

        Idempotent: a result or event already stored is skipped (ON CONFLICT DO NOTHING) and still reported
        as stored, so its resend is acked again. Raises only on database errors (nothing then is stored).
        """
        now = time.time() if now is None else now
        outcome = BatchOutcome()
        new_states: dict[EpochKey, _EpochState] = {}
        with self._writer.begin() as conn:
            if results:
                outcome.inserted = self._insert_results(conn, results)
                outcome.stored = {r.identity for r in results}
            if events:
                outcome.events_inserted = self._insert_events(conn, events, now)
                outcome.event_ids = {e.event_id for e in events}
            self._touch_stations(conn, results, events, heartbeats, now)
            if results:
                new_states = self._advance_epochs(conn, outcome.stored, now)
                outcome.upto = {key: state.upto for key, state in new_states.items()}
        # only after the commit: the in-memory contiguity state must never run ahead of the database
        self._epochs.update(new_states)
        return outcome

    def _insert_results(self, conn: Connection, results: Sequence[ResultRecord]) -> int:
        # one lock order for every writer: two collectors inserting overlapping rows cannot deadlock
        rows = [r.row for r in sorted(results, key=lambda r: r.identity)]
        stmt = self._insert(t.inspections).on_conflict_do_nothing(
            index_elements=["station_id", "epoch", "seq"]
        )
        # RETURNING counts the new rows on both backends (executemany rowcount is -1 on psycopg)
        inserted = len(conn.execute(stmt.returning(t.inspections.c.seq), rows).all())
        blob_rows = [
            {"key": key, "media_type": media, "data": data, "created_ts": r.row["received_ts"]}
            for r in results
            for key, (media, data) in r.blobs.items()
        ]
        blob_rows.sort(key=lambda b: b["key"])
        if blob_rows:
            conn.execute(self._insert(t.blobs).on_conflict_do_nothing(index_elements=["key"]), blob_rows)
        return inserted

    def _insert_events(self, conn: Connection, events: Sequence[StationEvent], now: float) -> int:
        rows = [
            {
                "event_id": e.event_id,
                "station_id": e.station_id,
                "epoch": e.epoch,
                "ts": e.ts,
                "received_ts": now,
                "kind": e.kind,
                "bundle_id": e.bundle_id,
                "bundle_version": e.bundle_version,
                "detail": dict(e.detail),
            }
            for e in sorted(events, key=lambda e: e.event_id)
        ]
        stmt = self._insert(t.events).on_conflict_do_nothing(index_elements=["event_id"])
        return len(conn.execute(stmt.returning(t.events.c.event_id), rows).all())

    def _touch_stations(
        self,
        conn: Connection,
        results: Sequence[ResultRecord],
        events: Sequence[StationEvent],
        heartbeats: Sequence[HeartbeatIn],
        now: float,
    ) -> None:
        """One upsert per station: last seen now; heartbeats also set health; results their bundle."""
        rows: dict[str, dict[str, Any]] = {}
        for r in results:
            rows.setdefault(r.row["station_id"], {}).update(
                epoch=r.row["epoch"], bundle_id=r.row["bundle_id"], bundle_version=r.row["bundle_version"]
            )
        for e in events:
            rows.setdefault(e.station_id, {}).update(epoch=e.epoch)
        for h in heartbeats:
            hb = h.heartbeat
            values = rows.setdefault(hb.sender, {})
            values.update(epoch=hb.epoch, fps=hb.fps, outbox_depth=hb.outbox_depth, dropped=hb.dropped)
            values["health"] = dict(hb.health)
            if hb.bundle_version:
                values.update(bundle_id=hb.bundle_id, bundle_version=hb.bundle_version)
            if h.key_fingerprint:
                values["key_fingerprint"] = h.key_fingerprint
        for station_id, values in sorted(rows.items()):  # sorted: a fixed lock order between processes
            insert_values = {"health": {}, **values, "station_id": station_id}
            insert_values.update(first_seen=now, last_seen=now)
            stmt = self._insert(t.stations).values(**insert_values)
            update = {k: stmt.excluded[k] for k in values if k != "station_id"}
            update["last_seen"] = stmt.excluded.last_seen
            conn.execute(stmt.on_conflict_do_update(index_elements=["station_id"], set_=update))

    def _advance_epochs(
        self, conn: Connection, stored: set[tuple[str, int, int]], now: float
    ) -> dict[EpochKey, _EpochState]:
        by_epoch: dict[EpochKey, set[int]] = {}
        for station_id, epoch, seq in stored:
            by_epoch.setdefault((station_id, epoch), set()).add(seq)
        states = {}
        for key in sorted(by_epoch):
            state = self._epoch_state(conn, key)
            state.above |= {s for s in by_epoch[key] if s > state.upto}
            self._walk(state)
            if state.above and now - state.gap_checked_ts >= _GAP_RECHECK_S:
                # a gap: another collector process (or an earlier life of this one) may hold the missing seqs
                state.gap_checked_ts = now
                state.above |= self._stored_above(conn, key, state.upto, max(state.above))
                self._walk(state)
            self._raise_upto(conn, key, state.upto)
            states[key] = state
        return states

    def _epoch_state(self, conn: Connection, key: EpochKey) -> _EpochState:
        cached = self._epochs.get(key)
        if cached is not None:
            return _EpochState(cached.upto, set(cached.above), cached.gap_checked_ts)
        row = conn.execute(
            sa.select(t.station_epochs.c.upto_seq).where(
                t.station_epochs.c.station_id == key[0], t.station_epochs.c.epoch == key[1]
            )
        ).first()
        state = _EpochState(upto=row[0] if row else 0)
        state.above = self._stored_above(conn, key, state.upto, None)
        self._walk(state)
        return state

    @staticmethod
    def _walk(state: _EpochState) -> None:
        while state.upto + 1 in state.above:
            state.upto += 1
            state.above.discard(state.upto)

    def _stored_above(self, conn: Connection, key: EpochKey, upto: int, highest: int | None) -> set[int]:
        c = t.inspections.c
        query = sa.select(c.seq).where(c.station_id == key[0], c.epoch == key[1], c.seq > upto)
        if highest is not None:
            query = query.where(c.seq <= highest)
        return set(conn.execute(query.order_by(c.seq).limit(1_000_000)).scalars())

    def _raise_upto(self, conn: Connection, key: EpochKey, upto: int) -> None:
        stmt = self._insert(t.station_epochs).values(station_id=key[0], epoch=key[1], upto_seq=upto)
        current = t.station_epochs.c.upto_seq
        higher = sa.case((stmt.excluded.upto_seq > current, stmt.excluded.upto_seq), else_=current)
        conn.execute(
            stmt.on_conflict_do_update(index_elements=["station_id", "epoch"], set_={"upto_seq": higher})
        )

    def acked_upto(self, station_id: str, epoch: int) -> int:
        """Highest contiguous stored seq of (station, epoch) known to this process, else from the database."""
        cached = self._epochs.get((station_id, epoch))
        if cached is not None:
            return cached.upto
        c = t.station_epochs.c
        q = sa.select(c.upto_seq).where(c.station_id == station_id, c.epoch == epoch)
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar() or 0)

    def add_event(
        self,
        station_id: str,
        kind: str,
        detail: dict[str, str],
        bundle_id: str = "",
        bundle_version: str = "",
        now: float | None = None,
    ) -> None:
        """A collector-side event (drift alarm raised/cleared) about a station."""
        import uuid

        now = time.time() if now is None else now
        row = dict(event_id=uuid.uuid4().hex, station_id=station_id, epoch=0, ts=now, received_ts=now)
        row.update(kind=kind, bundle_id=bundle_id, bundle_version=bundle_version, detail=detail)
        with self._writer.begin() as conn:
            conn.execute(sa.insert(t.events).values(**row))

    def apply_retention(self, retention: Retention, now: float | None = None) -> dict[str, int]:
        """Delete what the caps say (with the blobs those rows reference); returns deleted row counts."""
        now = time.time() if now is None else now
        c = t.inspections.c
        deleted = {"ok": 0, "nok": 0, "rows_cap": 0, "events": 0}
        with self._writer.begin() as conn:
            if retention.ok_max_age_s is not None:
                where = sa.and_(c.decision == "OK", c.decision_ts < now - retention.ok_max_age_s)
                deleted["ok"] = self._delete_inspections(conn, where)
            if retention.nok_max_age_s is not None:
                where = sa.and_(c.decision != "OK", c.decision_ts < now - retention.nok_max_age_s)
                deleted["nok"] = self._delete_inspections(conn, where)
            if retention.max_rows is not None:
                deleted["rows_cap"] = self._cap_rows(conn, retention.max_rows)
            if retention.event_max_age_s is not None:
                stmt = sa.delete(t.events).where(t.events.c.ts < now - retention.event_max_age_s)
                deleted["events"] = conn.execute(stmt).rowcount
        return deleted

    def _delete_inspections(self, conn: Connection, where: Any) -> int:
        c = t.inspections.c
        for key_col in (c.map_key, c.thumb_key):
            keys = sa.select(key_col).where(where, key_col.is_not(None))
            conn.execute(sa.delete(t.blobs).where(t.blobs.c.key.in_(keys)))
        return conn.execute(sa.delete(t.inspections).where(where)).rowcount

    def _cap_rows(self, conn: Connection, max_rows: int) -> int:
        c = t.inspections.c
        total = conn.execute(sa.select(sa.func.count()).select_from(t.inspections)).scalar_one()
        deleted = 0
        for is_ok in (True, False):  # OK rows go first
            excess = total - deleted - max_rows
            if excess <= 0:
                break
            kind = (c.decision == "OK") if is_ok else (c.decision != "OK")
            oldest = sa.select(c.id).where(kind).order_by(c.decision_ts, c.id).limit(excess)
            ids = list(conn.execute(oldest).scalars())
            if ids:
                deleted += self._delete_inspections(conn, c.id.in_(ids))
        return deleted

    # ------------------------------------------------------------------------------------------------ reads
    def query(
        self,
        station: str | None = None,
        since: float | None = None,
        decision: str | None = None,
        bundle: str | None = None,
        limit: int | None = 100,
        until: float | None = None,
    ) -> list[dict[str, Any]]:
        """Stored results, newest first (by decision_ts, then seq). `since`/`until`: Unix seconds.

        `bundle` matches the bundle version or the bundle id. Each row has every field of the result
        message plus received_ts, latency_total_ms and the blob keys (map_key, thumb_key) with map_offset /
        map_scale / map_height / map_width. limit=None returns all.
        """
        c = t.inspections.c
        q = sa.select(*[c[name] for name in _RESULT_COLUMNS])
        q = q.where(*self._filters(station, since, decision, bundle, until))
        q = q.order_by(c.decision_ts.desc(), c.station_id, c.epoch.desc(), c.seq.desc())
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(q)]

    @staticmethod
    def _filters(
        station: str | None,
        since: float | None,
        decision: str | None,
        bundle: str | None,
        until: float | None,
    ) -> list[Any]:
        c = t.inspections.c
        where = []
        if station is not None:
            where.append(c.station_id == station)
        if since is not None:
            where.append(c.decision_ts >= since)
        if until is not None:
            where.append(c.decision_ts < until)
        if decision is not None:
            where.append(c.decision == decision.upper())
        if bundle is not None:
            where.append(sa.or_(c.bundle_version == bundle, c.bundle_id == bundle))
        return where

    def count(self, station: str | None = None, decision: str | None = None) -> int:
        """Number of stored inspections (optionally of one station / decision)."""
        q = sa.select(sa.func.count()).select_from(t.inspections)
        q = q.where(*self._filters(station, None, decision, None, None))
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def identities(self, station: str | None = None) -> list[tuple[str, int, int]]:
        """Every stored (station_id, epoch, seq), sorted (duplicates impossible: it is the unique key)."""
        c = t.inspections.c
        q = sa.select(c.station_id, c.epoch, c.seq).order_by(c.station_id, c.epoch, c.seq)
        if station is not None:
            q = q.where(c.station_id == station)
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(q)]

    def recent_nok(self, limit: int = 20, station: str | None = None) -> list[dict[str, Any]]:
        """The newest NOK results (rows as in `query`; map_key / thumb_key name their images in `blob`)."""
        return self.query(station=station, decision="NOK", limit=limit)

    def blob(self, key: str) -> tuple[str, bytes] | None:
        """(media type, bytes) of a stored anomaly-map PNG or thumbnail, or None."""
        q = sa.select(t.blobs.c.media_type, t.blobs.c.data).where(t.blobs.c.key == key)
        with self.engine.connect() as conn:
            row = conn.execute(q).first()
        return None if row is None else (row[0], bytes(row[1]))

    def stations(self, now: float | None = None) -> list[dict[str, Any]]:
        """Every known station: station_id, online, last_seen, first_seen, epoch, bundle_id, bundle_version,
        fps, outbox_depth, dropped, health (dict), key_fingerprint. Sorted by station id."""
        now = time.time() if now is None else now
        with self.engine.connect() as conn:
            rows = [
                dict(r._mapping)
                for r in conn.execute(sa.select(t.stations).order_by(t.stations.c.station_id))
            ]
        for row in rows:
            row["online"] = now - row["last_seen"] <= self.offline_after_s
        return rows

    def stats(
        self, since: float | None = None, station: str | None = None
    ) -> dict[str, list[dict[str, Any]]]:
        """Per station and per bundle version: count, ok/nok/error counts, nok_rate (NOK / count), image-score
        percentiles (score_p50/p90/p99 over scored rows) and latency_p95_ms (end to end, station side)."""
        c = t.inspections.c
        q = sa.select(c.station_id, c.bundle_version, c.decision, c.image_score, c.latency_total_ms)
        q = q.where(*self._filters(station, since, None, None, None))
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        return {
            "stations": _group_stats(rows, 0, "station_id"),
            "bundles": _group_stats(rows, 1, "bundle_version"),
        }

    def score_histogram(self, station: str, bins: int = 30, since: float | None = None) -> dict[str, Any]:
        """Image-score histogram of one station: {"station_id", "edges" (bins+1), "ok", "nok" (counts per
        bin), "threshold" (of the newest result, None if unknown), "n"}. Edges span scores and threshold."""
        c = t.inspections.c
        q = sa.select(c.decision, c.image_score, c.threshold).where(
            *self._filters(station, since, None, None, None), c.image_score.is_not(None)
        )
        newest = sa.select(c.threshold).where(c.station_id == station, c.threshold.is_not(None))
        newest = newest.order_by(c.decision_ts.desc()).limit(1)
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
            threshold = conn.execute(newest).scalar()
        scores = np.array([r[1] for r in rows], dtype=np.float64)
        nok = np.array([r[0] == "NOK" for r in rows], dtype=bool)
        span = list(scores) + ([threshold] if threshold is not None else [])
        lo, hi = (min(span), max(span)) if span else (0.0, 1.0)
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        ok_counts, _ = np.histogram(scores[~nok], edges)
        nok_counts, _ = np.histogram(scores[nok], edges)
        return {
            "station_id": station,
            "edges": edges.tolist(),
            "ok": ok_counts.tolist(),
            "nok": nok_counts.tolist(),
            "threshold": threshold,
            "n": len(rows),
        }

    def events(self, station: str | None = None, since: float | None = None, limit: int = 100) -> list[dict]:
        """Station and collector events, newest first (kind, detail, ts, ...)."""
        q = sa.select(t.events).order_by(t.events.c.ts.desc(), t.events.c.id.desc()).limit(limit)
        if station is not None:
            q = q.where(t.events.c.station_id == station)
        if since is not None:
            q = q.where(t.events.c.ts >= since)
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(q)]
        for row in rows:
            row.pop("id", None)
        return rows

    # ------------------------------------------------------------------------------------------------ drift
    def set_drift_reference(
        self, bundle_id: str, variant: str, quantiles: Sequence[float], threshold: float | None, source: str
    ) -> None:
        """Store (or replace) a bundle variant's validation-normal score quantiles (ascending)."""
        values = dict(bundle_id=bundle_id, variant=variant, quantiles=[float(q) for q in quantiles])
        values.update(threshold=threshold, source=source, updated_ts=time.time())
        stmt = self._insert(t.drift_reference).values(**values)
        update = {k: stmt.excluded[k] for k in ("quantiles", "threshold", "source", "updated_ts")}
        with self._writer.begin() as conn:
            conn.execute(stmt.on_conflict_do_update(index_elements=["bundle_id", "variant"], set_=update))

    def drift_reference(self, bundle_id: str, variant: str) -> dict[str, Any] | None:
        q = sa.select(t.drift_reference).where(
            t.drift_reference.c.bundle_id == bundle_id, t.drift_reference.c.variant == variant
        )
        with self.engine.connect() as conn:
            row = conn.execute(q).first()
        return None if row is None else dict(row._mapping)

    def active_streams(self, since: float) -> list[dict[str, Any]]:
        """(station_id, bundle_id, bundle_version, variant) with non-shadow results since `since`."""
        c = t.inspections.c
        q = sa.select(c.station_id, c.bundle_id, c.bundle_version, c.variant).distinct()
        q = q.where(c.decision_ts >= since, c.shadow.is_(False))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def ok_scores(self, station: str, bundle_id: str, variant: str, limit: int) -> list[float]:
        """The newest `limit` OK image scores of a station's (non-shadow) results of one bundle variant."""
        c = t.inspections.c
        q = sa.select(c.image_score).where(
            c.station_id == station,
            c.bundle_id == bundle_id,
            c.variant == variant,
            c.decision == "OK",
            c.shadow.is_(False),
            c.image_score.is_not(None),
        )
        q = q.order_by(c.decision_ts.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [float(v) for v in conn.execute(q).scalars()]

    def latest_threshold(self, station: str, bundle_id: str, variant: str) -> float | None:
        """The decision threshold of a station's newest result of this bundle variant (None if unknown)."""
        c = t.inspections.c
        q = sa.select(c.threshold).where(
            c.station_id == station, c.bundle_id == bundle_id, c.variant == variant, c.threshold.is_not(None)
        )
        with self.engine.connect() as conn:
            return conn.execute(q.order_by(c.decision_ts.desc()).limit(1)).scalar()

    def set_drift_state(self, row: dict[str, Any], now: float | None = None) -> str | None:
        """Upsert a station's drift state; returns the previous state if it changed (else None).

        row: station_id, bundle_id, variant, bundle_version, state, psi, ks, n, reason.
        """
        now = time.time() if now is None else now
        ds = t.drift_state
        key = (
            ds.c.station_id == row["station_id"],
            ds.c.bundle_id == row["bundle_id"],
            ds.c.variant == row["variant"],
        )
        with self._writer.begin() as conn:
            old = conn.execute(sa.select(ds.c.state).where(*key)).scalar()
            values = {**row, "updated_ts": now}
            if old is None:
                conn.execute(sa.insert(ds).values(**values, since_ts=now))
                return "none"
            if old != row["state"]:
                values["since_ts"] = now
            conn.execute(sa.update(ds).where(*key).values(**values))
        return old if old != row["state"] else None

    def drift_states(self) -> list[dict[str, Any]]:
        """Drift state per (station, bundle, variant): station_id, bundle_id, bundle_version, variant,
        state (ok | alarm | unknown), psi, ks, n (window size used), reason, since_ts, updated_ts."""
        q = sa.select(t.drift_state).order_by(t.drift_state.c.station_id, t.drift_state.c.bundle_id)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]


def _group_stats(rows: Iterable[Any], key_index: int, key_name: str) -> list[dict[str, Any]]:
    groups: dict[str, list[Any]] = {}
    for row in rows:
        groups.setdefault(row[key_index], []).append(row)
    out = []
    for key in sorted(groups):
        members = groups[key]
        decisions = [r[2] for r in members]
        scores = np.array([r[3] for r in members if r[3] is not None], dtype=np.float64)
        latencies = np.array([r[4] for r in members if r[4] is not None], dtype=np.float64)
        entry: dict[str, Any] = {key_name: key, "count": len(members)}
        entry.update(ok=decisions.count("OK"), nok=decisions.count("NOK"), error=decisions.count("ERROR"))
        entry["nok_rate"] = entry["nok"] / len(members)
        for p in _PERCENTILES:
            entry[f"score_p{p}"] = float(np.percentile(scores, p)) if scores.size else None
        entry["latency_p95_ms"] = float(np.percentile(latencies, 95)) if latencies.size else None
        out.append(entry)
    return out
