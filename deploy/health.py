"""Health of a bundle on stations, read from the collector's database (its `inspections` table).

Two questions, both answered from stored results (never from the station's own say-so):
  rollout health  does bundle NEW on stations S decide like bundle OLD did on the same stations?
                  NOK rate delta = NOK rate(NEW, after install) - NOK rate(OLD, before); the score shift is
                  |median(NEW) - median(OLD)| in units of OLD's interquartile range (robust to outliers,
                  comparable across classes whatever a bundle's score scale).
  shadow compare  on frames both scored (same station, boot epoch and frame_id; the candidate's result has
                  shadow=True), how many decisions flip, how well scores correlate, NOK rate delta.
ERROR results count towards neither rate (they are not decisions).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa

from collector.schema import inspections

__all__ = ["BundleStats", "Comparison", "HealthVerdict", "bundle_stats", "compare_shadow", "judge"]


@dataclass(frozen=True)
class BundleStats:
    n: int
    n_nok: int
    nok_rate: float
    median_score: float
    iqr_score: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stats(decisions: list[str], scores: list[float]) -> BundleStats:
    n = len(decisions)
    n_nok = sum(d == "NOK" for d in decisions)
    values = np.asarray(scores, dtype=np.float64)
    if values.size:
        q1, median, q3 = np.quantile(values, [0.25, 0.5, 0.75])
    else:
        q1 = median = q3 = float("nan")
    return BundleStats(n, n_nok, n_nok / n if n else float("nan"), float(median), float(q3 - q1))


def bundle_stats(
    engine: sa.Engine,
    bundle_id: str,
    station_ids: list[str],
    since_ts: float | None = None,
    until_ts: float | None = None,
    last_n: int | None = None,
) -> BundleStats:
    """Decisions of `bundle_id` (not shadow, not ERROR) on `station_ids` in [since_ts, until_ts)."""
    t = inspections
    query = sa.select(t.c.decision, t.c.image_score).where(
        t.c.bundle_id == bundle_id,
        t.c.station_id.in_(station_ids),
        t.c.shadow.is_(False),
        t.c.decision.in_(("OK", "NOK")),
    )
    if since_ts is not None:
        query = query.where(t.c.decision_ts >= since_ts)
    if until_ts is not None:
        query = query.where(t.c.decision_ts < until_ts)
    if last_n is not None:
        query = query.order_by(t.c.decision_ts.desc()).limit(last_n)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return _stats([r.decision for r in rows], [r.image_score for r in rows if r.image_score is not None])


@dataclass(frozen=True)
class HealthVerdict:
    ok: bool
    reason: str
    old: BundleStats | None
    new: BundleStats
    nok_rate_delta: float
    score_shift: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "reason": self.reason,
            "old": None if self.old is None else self.old.to_dict(),
            "new": self.new.to_dict(),
            "nok_rate_delta": self.nok_rate_delta,
            "score_shift": self.score_shift,
        }


def judge(
    old: BundleStats | None, new: BundleStats, max_nok_rate_delta: float, max_score_shift: float
) -> HealthVerdict:
    """Within bounds of the previous bundle? Without a baseline (a fresh station) only `new` is reported."""
    if old is None or old.n == 0:
        return HealthVerdict(True, "no baseline results of the previous bundle", old, new, 0.0, 0.0)
    delta = new.nok_rate - old.nok_rate
    spread = old.iqr_score if old.iqr_score > 1e-12 else max(abs(old.median_score), 1e-12)
    shift = abs(new.median_score - old.median_score) / spread
    if abs(delta) > max_nok_rate_delta:
        reason = (
            f"NOK rate {new.nok_rate:.3f} vs {old.nok_rate:.3f} before (delta {delta:+.3f}, "
            f"bound {max_nok_rate_delta})"
        )
        return HealthVerdict(False, reason, old, new, delta, shift)
    if shift > max_score_shift:
        reason = f"median score shifted by {shift:.3f} IQRs of the previous bundle (bound {max_score_shift})"
        return HealthVerdict(False, reason, old, new, delta, shift)
    return HealthVerdict(
        True, f"NOK rate delta {delta:+.3f}, score shift {shift:.3f}", old, new, delta, shift
    )


@dataclass(frozen=True)
class Comparison:
    active: str
    candidate: str
    n_pairs: int
    flips: int
    flips_ok_to_nok: int
    flips_nok_to_ok: int
    flip_rate: float
    score_correlation: float
    nok_rate_active: float
    nok_rate_candidate: float
    nok_rate_delta: float
    flipped_frames: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_shadow(
    engine: sa.Engine,
    active: str,
    candidate: str,
    station_ids: list[str] | None = None,
    since_ts: float | None = None,
) -> Comparison:
    """Pair each shadow result of `candidate` with the live result of `active` on the same frame."""
    live, shadow = inspections.alias("live"), inspections.alias("shadow")
    query = (
        sa.select(
            live.c.station_id,
            live.c.frame_id,
            live.c.decision.label("d_active"),
            shadow.c.decision.label("d_candidate"),
            live.c.image_score.label("s_active"),
            shadow.c.image_score.label("s_candidate"),
        )
        .join(
            shadow,
            (shadow.c.station_id == live.c.station_id)
            & (shadow.c.epoch == live.c.epoch)  # frame ids repeat after a station restart
            & (shadow.c.frame_id == live.c.frame_id),
        )
        .where(
            live.c.bundle_id == active,
            live.c.shadow.is_(False),
            shadow.c.bundle_id == candidate,
            shadow.c.shadow.is_(True),
            live.c.decision.in_(("OK", "NOK")),
            shadow.c.decision.in_(("OK", "NOK")),
        )
    )
    if station_ids is not None:
        query = query.where(live.c.station_id.in_(station_ids))
    if since_ts is not None:
        query = query.where(shadow.c.decision_ts >= since_ts)
    with engine.connect() as conn:
        rows = conn.execute(query.order_by(live.c.station_id, live.c.decision_ts)).all()
    n = len(rows)
    up = [r for r in rows if r.d_active == "OK" and r.d_candidate == "NOK"]
    down = [r for r in rows if r.d_active == "NOK" and r.d_candidate == "OK"]
    a = np.asarray([r.s_active for r in rows], dtype=np.float64)
    c = np.asarray([r.s_candidate for r in rows], dtype=np.float64)
    corr = float("nan")
    if n >= 2 and a.std() > 0 and c.std() > 0:
        corr = float(np.corrcoef(a, c)[0, 1])
    nok_a = sum(r.d_active == "NOK" for r in rows) / n if n else float("nan")
    nok_c = sum(r.d_candidate == "NOK" for r in rows) / n if n else float("nan")
    flipped = sorted(f"{r.station_id}/{r.frame_id}" for r in up + down)
    return Comparison(
        active,
        candidate,
        n,
        len(up) + len(down),
        len(up),
        len(down),
        (len(up) + len(down)) / n if n else float("nan"),
        corr,
        nok_a,
        nok_c,
        nok_c - nok_a,
        flipped,
    )
