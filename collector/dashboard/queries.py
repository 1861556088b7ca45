"""What the dashboard reads, as SQLAlchemy Core queries on the collector's tables (`collector.schema`).

Read-only and portable (SQLite and PostgreSQL): percentiles and histograms are computed in numpy over a
bounded number of recent rows, so a page refresh costs the same on a day-old database as on a year-old one.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from PIL import Image
from sqlalchemy.engine import Connection, Engine

from collector.schema import blobs, drift_state, events, inspections, stations

__all__ = [
    "EventItem",
    "FleetSummary",
    "Histogram",
    "NokItem",
    "StationRow",
    "fleet_rows",
    "fleet_summary",
    "inspection_images",
    "recent_events",
    "recent_nok",
    "score_histograms",
]

# Rows per station that percentiles and histograms look at (the newest ones in the window).
MAX_ROWS_PER_STATION = 2000
# Largest id the routes accept: a bigger number is a bad key (404), not a database overflow.
MAX_ID = 2**63 - 1
_DRIFT_RANK = {"alarm": 2, "ok": 1, "unknown": 0}


@dataclass(frozen=True)
class StationRow:
    station_id: str
    online: bool
    last_seen_s_ago: float
    bundle_version: str
    fps: float | None
    p95_latency_ms: float | None
    result_count: int
    nok_count: int
    nok_rate: float | None  # NOK / (OK + NOK) in the window; None without results
    drift_state: str  # ok | alarm | unknown
    drift_detail: str


@dataclass(frozen=True)
class NokItem:
    inspection_id: int
    station_id: str
    frame_id: str
    decision_ts: float
    image_score: float | None
    threshold: float | None
    bundle_version: str
    variant: str
    has_map: bool
    has_thumb: bool


@dataclass(frozen=True)
class Histogram:
    station_id: str
    edges: tuple[float, ...]
    ok_counts: tuple[int, ...]
    nok_counts: tuple[int, ...]
    threshold: float | None

    @property
    def total(self) -> int:
        return sum(self.ok_counts) + sum(self.nok_counts)


@dataclass(frozen=True)
class FleetSummary:
    stations: int
    online: int
    results: int
    nok: int
    drift_alarms: int


@dataclass(frozen=True)
class EventItem:
    station_id: str
    ts: float
    kind: str
    bundle_version: str
    detail: dict[str, str]


@dataclass(frozen=True)
class InspectionImages:
    """The stored images of one inspection: the map as uint8 codes (H, W) and the thumbnail bytes."""

    map_codes: np.ndarray | None
    thumbnail: bytes | None
    thumbnail_media_type: str | None


def _window_counts(conn: Connection, since_ts: float) -> dict[str, tuple[int, int]]:
    """station -> (results, NOK) among OK/NOK decisions since `since_ts` (shadow results excluded)."""
    query = (
        sa.select(inspections.c.station_id, inspections.c.decision, sa.func.count())
        .where(inspections.c.decision_ts >= since_ts, inspections.c.shadow.is_(False))
        .where(inspections.c.decision.in_(("OK", "NOK")))
        .group_by(inspections.c.station_id, inspections.c.decision)
    )
    out: dict[str, list[int]] = {}
    for station_id, decision, count in conn.execute(query):
        totals = out.setdefault(station_id, [0, 0])
        totals[0] += int(count)
        if decision == "NOK":
            totals[1] += int(count)
    return {k: (v[0], v[1]) for k, v in out.items()}


def _p95_latency(conn: Connection, station_id: str, since_ts: float) -> float | None:
    query = (
        sa.select(inspections.c.latency_total_ms)
        .where(inspections.c.station_id == station_id, inspections.c.decision_ts >= since_ts)
        .where(inspections.c.latency_total_ms.is_not(None))
        .order_by(inspections.c.decision_ts.desc())
        .limit(MAX_ROWS_PER_STATION)
    )
    values = [row[0] for row in conn.execute(query)]
    return float(np.percentile(values, 95)) if values else None


def _recent_fps(conn: Connection, station_id: str, now_ts: float, span_s: float = 60.0) -> float | None:
    """Results per second over the last `span_s`, for stations whose heartbeats carry no fps."""
    query = sa.select(sa.func.count(), sa.func.min(inspections.c.decision_ts)).where(
        inspections.c.station_id == station_id, inspections.c.decision_ts >= now_ts - span_s
    )
    count, first_ts = conn.execute(query).one()
    if not count or first_ts is None:
        return None
    return float(count) / max(now_ts - float(first_ts), 1.0)


def _drift_by_station(conn: Connection) -> dict[tuple[str, str], tuple[str, str]]:
    """(station, bundle_id) -> (worst state over its variants, a short detail)."""
    out: dict[tuple[str, str], tuple[str, str]] = {}
    for row in conn.execute(sa.select(drift_state)):
        key = (row.station_id, row.bundle_id)
        bits = [f"{row.variant}: {row.state}"]
        if row.psi is not None:
            bits.append(f"PSI {row.psi:.3f}")
        if row.ks is not None:
            bits.append(f"KS {row.ks:.3f}")
        bits.append(f"n={row.n}")
        detail = ", ".join(bits) + (f" ({row.reason})" if row.reason else "")
        current = out.get(key)
        if current is None or _DRIFT_RANK.get(row.state, 0) > _DRIFT_RANK.get(current[0], 0):
            out[key] = (row.state if row.state in _DRIFT_RANK else "unknown", detail)
    return out


def fleet_rows(
    engine: Engine, window_s: float = 3600.0, online_after_s: float = 15.0, now_ts: float | None = None
) -> list[StationRow]:
    """One row per known station, alarms first, then by station id."""
    now = time.time() if now_ts is None else now_ts
    since = now - window_s
    rows: list[StationRow] = []
    with engine.connect() as conn:
        counts = _window_counts(conn, since)
        drift = _drift_by_station(conn)
        for st in conn.execute(sa.select(stations).order_by(stations.c.station_id)):
            results, nok = counts.get(st.station_id, (0, 0))
            fps = float(st.fps) if st.fps and st.fps > 0 else _recent_fps(conn, st.station_id, now)
            state, detail = drift.get((st.station_id, st.bundle_id), ("unknown", "no drift data yet"))
            rows.append(
                StationRow(
                    station_id=st.station_id,
                    online=now - float(st.last_seen) <= online_after_s,
                    last_seen_s_ago=max(0.0, now - float(st.last_seen)),
                    bundle_version=st.bundle_version,
                    fps=fps,
                    p95_latency_ms=_p95_latency(conn, st.station_id, since),
                    result_count=results,
                    nok_count=nok,
                    nok_rate=(nok / results) if results else None,
                    drift_state=state,
                    drift_detail=detail,
                )
            )
    rows.sort(key=lambda r: (r.drift_state != "alarm", r.station_id))
    return rows


def fleet_summary(rows: list[StationRow]) -> FleetSummary:
    return FleetSummary(
        stations=len(rows),
        online=sum(r.online for r in rows),
        results=sum(r.result_count for r in rows),
        nok=sum(r.nok_count for r in rows),
        drift_alarms=sum(r.drift_state == "alarm" for r in rows),
    )


def recent_nok(engine: Engine, limit: int = 12) -> list[NokItem]:
    """The newest NOK results (shadow ones excluded), newest first."""
    c = inspections.c
    query = (
        sa.select(
            c.id,
            c.station_id,
            c.frame_id,
            c.decision_ts,
            c.image_score,
            c.threshold,
            c.bundle_version,
            c.variant,
            c.map_key,
            c.thumb_key,
        )
        .where(c.decision == "NOK", c.shadow.is_(False))
        .order_by(c.decision_ts.desc(), c.id.desc())
        .limit(max(1, min(int(limit), 200)))
    )
    with engine.connect() as conn:
        return [
            NokItem(
                inspection_id=int(r.id),
                station_id=r.station_id,
                frame_id=r.frame_id,
                decision_ts=float(r.decision_ts),
                image_score=r.image_score,
                threshold=r.threshold,
                bundle_version=r.bundle_version,
                variant=r.variant,
                has_map=r.map_key is not None,
                has_thumb=r.thumb_key is not None,
            )
            for r in conn.execute(query)
        ]


def _bins(scores: np.ndarray, threshold: float | None, n_bins: int) -> np.ndarray:
    lo, hi = float(scores.min()), float(scores.max())
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.04
    return np.linspace(lo - pad, hi + pad, n_bins + 1)


def score_histograms(
    engine: Engine, window_s: float = 3600.0, n_bins: int = 30, now_ts: float | None = None
) -> list[Histogram]:
    """Per station: image scores (OK and NOK, not shadow) in the window, and its newest threshold."""
    now = time.time() if now_ts is None else now_ts
    c = inspections.c
    out: list[Histogram] = []
    with engine.connect() as conn:
        station_ids = [
            r[0] for r in conn.execute(sa.select(stations.c.station_id).order_by(stations.c.station_id))
        ]
        for station_id in station_ids:
            query = (
                sa.select(c.image_score, c.threshold, c.decision)
                .where(c.station_id == station_id, c.decision_ts >= now - window_s, c.shadow.is_(False))
                .where(c.decision.in_(("OK", "NOK")), c.image_score.is_not(None))
                .order_by(c.decision_ts.desc())
                .limit(MAX_ROWS_PER_STATION)
            )
            rows = conn.execute(query).all()
            if not rows:
                out.append(Histogram(station_id, (0.0, 1.0), (0,), (0,), None))
                continue
            scores = np.array([r[0] for r in rows], dtype=np.float64)
            is_nok = np.array([r[2] == "NOK" for r in rows], dtype=bool)
            threshold = rows[0][1]
            edges = _bins(scores, threshold, n_bins)
            ok_counts, _ = np.histogram(scores[~is_nok], bins=edges)
            nok_counts, _ = np.histogram(scores[is_nok], bins=edges)
            out.append(
                Histogram(
                    station_id,
                    tuple(edges.tolist()),
                    tuple(int(n) for n in ok_counts),
                    tuple(int(n) for n in nok_counts),
                    threshold,
                )
            )
    return out


def _decode_map_png(data: bytes) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return np.asarray(img.convert("L"))
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"stored anomaly map is not a readable PNG: {err}") from None


def inspection_images(engine: Engine, inspection_id: int, want_map: bool = True) -> InspectionImages | None:
    """The map codes and thumbnail of one inspection; None when the inspection does not exist.

    A stored map that cannot be decoded raises ValueError (the route answers 404 for it).
    """
    if not 0 < inspection_id <= MAX_ID:
        return None
    c = inspections.c
    with engine.connect() as conn:
        row = conn.execute(sa.select(c.map_key, c.thumb_key).where(c.id == inspection_id)).one_or_none()
        if row is None:
            return None
        keys = [k for k in (row.map_key if want_map else None, row.thumb_key) if k is not None]
        stored = {}
        if keys:
            query = sa.select(blobs.c.key, blobs.c.media_type, blobs.c.data).where(blobs.c.key.in_(keys))
            stored = {r.key: (r.media_type, bytes(r.data)) for r in conn.execute(query)}
    map_blob = stored.get(row.map_key) if want_map and row.map_key else None
    thumb_blob = stored.get(row.thumb_key) if row.thumb_key else None
    return InspectionImages(
        map_codes=_decode_map_png(map_blob[1]) if map_blob else None,
        thumbnail=thumb_blob[1] if thumb_blob else None,
        thumbnail_media_type=thumb_blob[0] if thumb_blob else None,
    )


def recent_events(engine: Engine, limit: int = 8) -> list[EventItem]:
    """The newest station events (bundle loaded, update failed, ...), newest first."""
    query = (
        sa.select(events).order_by(events.c.ts.desc(), events.c.id.desc()).limit(max(1, min(int(limit), 200)))
    )
    with engine.connect() as conn:
        return [
            EventItem(r.station_id, float(r.ts), r.kind, r.bundle_version, dict(r.detail or {}))
            for r in conn.execute(query)
        ]
