"""Staged rollouts as a persisted state machine: every step reads and writes the database, nothing else.

A rollout's stations are fixed at creation (sorted; wave 0 = the canary, then waves of `wave_size`).
States (deploy_rollouts.state):
  shadow        (only with require_shadow) the candidate scores beside the active bundle on the canary
                stations for `shadow_s`; flip rate and NOK-rate delta must stay within bounds
  wave          this wave's stations are told to install; wait for every one to report
  soak          all installed; after `soak_s`, judge health from the collector's results
  done          every wave healthy
  rolling_back  a check failed: stations already updated are told to return to their previous bundle
  aborted       finished after a failure (reason recorded); nothing left to roll back
Per station (deploy_rollout_stations.state): pending, assigned, installed, healthy, failed, rolling_back,
rolled_back, cancelled.

`RolloutEngine.tick()` is idempotent and resumable: a registry killed at any point and restarted carries
on from the stored states (a wave already assigned is not assigned twice; a soak started is not restarted).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from deploy.audit import record
from deploy.db import writer
from deploy.fleet import clear_shadow, select_stations, set_desired_bundle
from deploy.health import bundle_stats, compare_shadow, judge
from deploy.tables import bundles, rollout_stations, rollouts, stations

__all__ = [
    "ACTIVE_STATES",
    "RolloutError",
    "RolloutEngine",
    "RolloutSpec",
    "create_rollout",
    "manual_rollback",
]

log = logging.getLogger("m3dm.deploy")

ACTIVE_STATES = ("shadow", "wave", "soak", "rolling_back")
ENGINE = "registry"


class RolloutError(ValueError):
    """A rollout that cannot start (unknown bundle, no stations, another rollout on the same stations)."""


@dataclass(frozen=True)
class RolloutSpec:
    bundle_id: str
    selector: str
    canary: int = 1
    wave_size: int = 1
    soak_s: float = 60.0
    max_nok_rate_delta: float = 0.05
    max_score_shift: float = 1.0
    min_results: int = 5
    install_timeout_s: float = 300.0
    require_shadow: bool = False
    shadow_s: float = 60.0
    shadow_every_n: int = 1
    max_flip_rate: float = 0.05


def _waves(station_ids: list[str], canary: int, wave_size: int) -> list[list[str]]:
    waves = [station_ids[:canary]]
    rest = station_ids[canary:]
    waves += [rest[i : i + wave_size] for i in range(0, len(rest), wave_size)]
    return [w for w in waves if w]


def create_rollout(engine: sa.Engine, spec: RolloutSpec, actor: str, reason: str = "") -> str:
    """Record a rollout (the registry's engine drives it). Returns its id."""
    if spec.canary < 1 or spec.wave_size < 1:
        raise RolloutError("--canary and --wave-size must be >= 1")
    with writer(engine).begin() as conn:
        bundle = conn.execute(sa.select(bundles).where(bundles.c.bundle_id == spec.bundle_id)).first()
        if bundle is None:
            raise RolloutError(f"bundle {spec.bundle_id} is not published (m3dm deploy publish first)")
        ids = select_stations(conn, spec.selector)
        if not ids:
            raise RolloutError(f"selector {spec.selector!r} matches no known station")
        busy = conn.execute(
            sa.select(rollout_stations.c.station_id, rollouts.c.rollout_id)
            .join(rollouts, rollouts.c.rollout_id == rollout_stations.c.rollout_id)
            .where(rollouts.c.state.in_(ACTIVE_STATES), rollout_stations.c.station_id.in_(ids))
        ).first()
        if busy is not None:
            raise RolloutError(f"station {busy.station_id} is in active rollout {busy.rollout_id}")
        rollout_id = uuid.uuid4().hex
        now = time.time()
        conn.execute(
            rollouts.insert().values(
                rollout_id=rollout_id,
                bundle_id=spec.bundle_id,
                selector=spec.selector,
                canary=spec.canary,
                wave_size=spec.wave_size,
                soak_s=spec.soak_s,
                max_nok_rate_delta=spec.max_nok_rate_delta,
                max_score_shift=spec.max_score_shift,
                min_results=spec.min_results,
                install_timeout_s=spec.install_timeout_s,
                require_shadow=spec.require_shadow,
                shadow_s=spec.shadow_s,
                shadow_every_n=spec.shadow_every_n,
                max_flip_rate=spec.max_flip_rate,
                state="shadow" if spec.require_shadow else "wave",
                wave=0,
                phase_ts=now,
                reason="",
                created_ts=now,
                updated_ts=now,
                actor=actor,
            )
        )
        waves = _waves(ids, spec.canary, spec.wave_size)
        for index, wave in enumerate(waves):
            for sid in wave:
                conn.execute(
                    rollout_stations.insert().values(
                        rollout_id=rollout_id, station_id=sid, wave=index, state="pending"
                    )
                )
        if spec.require_shadow:
            conn.execute(
                stations.update()
                .where(stations.c.station_id.in_(waves[0]))
                .values(desired_shadow_bundle_id=spec.bundle_id, shadow_every_n=spec.shadow_every_n)
            )
        record(
            conn,
            actor,
            "rollout_create",
            f"rollout:{rollout_id}",
            reason,
            {"bundle_id": spec.bundle_id, "version": bundle.version, "waves": waves, **spec.__dict__},
        )
    return rollout_id


def _stations_of(conn: sa.Connection, rollout_id: str, wave: int | None = None) -> list[Any]:
    query = sa.select(rollout_stations).where(rollout_stations.c.rollout_id == rollout_id)
    if wave is not None:
        query = query.where(rollout_stations.c.wave == wave)
    return list(conn.execute(query.order_by(rollout_stations.c.station_id)))


def _station_rows(conn: sa.Connection, ids: list[str]) -> dict[str, Any]:
    return {r.station_id: r for r in conn.execute(sa.select(stations).where(stations.c.station_id.in_(ids)))}


def _set_rs(conn: sa.Connection, rollout_id: str, station_id: str, **values: Any) -> None:
    conn.execute(
        rollout_stations.update()
        .where((rollout_stations.c.rollout_id == rollout_id) & (rollout_stations.c.station_id == station_id))
        .values(**values)
    )


def _set_rollout(conn: sa.Connection, rollout_id: str, **values: Any) -> None:
    conn.execute(
        rollouts.update().where(rollouts.c.rollout_id == rollout_id).values(updated_ts=time.time(), **values)
    )


def _start_rollback(conn: sa.Connection, r: Any, reason: str, actor: str = ENGINE) -> None:
    """Abort: every station this rollout touched goes back to the bundle it ran before."""
    now = time.time()
    back = []
    for rs in _stations_of(conn, r.rollout_id):
        if rs.state == "pending":
            _set_rs(conn, r.rollout_id, rs.station_id, state="cancelled")
            continue
        if rs.state in ("rolled_back", "cancelled"):
            continue
        station = _station_rows(conn, [rs.station_id]).get(rs.station_id)
        if station is None:
            continue
        set_desired_bundle(conn, [rs.station_id], rs.previous_bundle_id, r.rollout_id)
        if station.active_bundle_id == r.bundle_id:
            _set_rs(conn, r.rollout_id, rs.station_id, state="rolling_back")
            back.append(rs.station_id)
        elif rs.state != "failed":
            _set_rs(conn, r.rollout_id, rs.station_id, state="cancelled")
    state = "rolling_back" if back else "aborted"
    _set_rollout(conn, r.rollout_id, state=state, reason=reason, phase_ts=now)
    record(conn, actor, "rollout_abort", f"rollout:{r.rollout_id}", reason, {"rolling_back": back})
    log.warning(
        "rollout %s of bundle %s aborted: %s; rolling back %s",
        r.rollout_id[:8],
        r.bundle_id[:8],
        reason,
        back or "nothing",
    )


class RolloutEngine:
    """Drives every active rollout one step per `tick()` (the registry calls it a few times a second)."""

    def __init__(self, engine: sa.Engine, collector_engine: sa.Engine | None) -> None:
        self.engine = engine
        self.collector_engine = collector_engine

    def tick(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.engine.connect() as conn:
            active = [
                r.rollout_id
                for r in conn.execute(
                    sa.select(rollouts.c.rollout_id).where(rollouts.c.state.in_(ACTIVE_STATES))
                )
            ]
        for rollout_id in active:
            try:
                self._advance(rollout_id, now)
            except sa.exc.OperationalError as err:  # a locked or vanished database: try again next tick
                log.warning("rollout %s: database busy (%s); retrying", rollout_id[:8], err)

    def _advance(self, rollout_id: str, now: float) -> None:
        with writer(self.engine).begin() as conn:
            r = conn.execute(sa.select(rollouts).where(rollouts.c.rollout_id == rollout_id)).one()
            step = {
                "shadow": self._shadow,
                "wave": self._wave,
                "soak": self._soak,
                "rolling_back": self._rolling_back,
            }
            step[r.state](conn, r, now)

    # ------------------------------------------------------------------------------------------ states

    def _shadow(self, conn: sa.Connection, r: Any, now: float) -> None:
        if now - r.phase_ts < r.shadow_s:
            return
        canary = [rs.station_id for rs in _stations_of(conn, r.rollout_id, 0)]
        rows = _station_rows(conn, canary)
        actives = sorted({rows[s].active_bundle_id for s in canary if s in rows})
        if self.collector_engine is None:
            self._finish_shadow(conn, r, canary, now, "no collector database to judge the shadow period")
            return
        n_pairs, worst = 0, None
        for active in actives:
            cmp = compare_shadow(self.collector_engine, active, r.bundle_id, canary, since_ts=r.phase_ts)
            n_pairs += cmp.n_pairs
            if cmp.n_pairs and (
                cmp.flip_rate > r.max_flip_rate or abs(cmp.nok_rate_delta) > r.max_nok_rate_delta
            ):
                worst = cmp
        if worst is not None:
            reason = (
                f"shadow: {worst.flips} of {worst.n_pairs} decisions flip (rate {worst.flip_rate:.3f}, bound "
                f"{r.max_flip_rate}), NOK rate delta {worst.nok_rate_delta:+.3f}"
            )
            self._finish_shadow(conn, r, canary, now, reason)
            return
        if n_pairs < r.min_results:
            if now - r.phase_ts > r.shadow_s + r.install_timeout_s:
                self._finish_shadow(conn, r, canary, now, f"shadow: only {n_pairs} paired results")
            return
        record(
            conn,
            ENGINE,
            "shadow_passed",
            f"rollout:{r.rollout_id}",
            f"{n_pairs} paired results within bounds",
        )
        self._finish_shadow(conn, r, canary, now, None)

    def _finish_shadow(
        self, conn: sa.Connection, r: Any, canary: list[str], now: float, failure: str | None
    ) -> None:
        clear_shadow(conn, canary, ENGINE, "shadow period over")
        if failure is None:
            _set_rollout(conn, r.rollout_id, state="wave", wave=0, phase_ts=now)
            return
        for rs in _stations_of(conn, r.rollout_id):
            _set_rs(conn, r.rollout_id, rs.station_id, state="cancelled")
        _set_rollout(conn, r.rollout_id, state="aborted", reason=failure, phase_ts=now)
        record(conn, ENGINE, "rollout_abort", f"rollout:{r.rollout_id}", failure)

    def _wave(self, conn: sa.Connection, r: Any, now: float) -> None:
        wave = _stations_of(conn, r.rollout_id, r.wave)
        rows = _station_rows(conn, [rs.station_id for rs in wave])
        for rs in wave:
            station = rows.get(rs.station_id)
            if rs.state == "pending" and station is not None:
                set_desired_bundle(conn, [rs.station_id], r.bundle_id, r.rollout_id)
                _set_rs(
                    conn,
                    r.rollout_id,
                    rs.station_id,
                    state="assigned",
                    assigned_ts=now,
                    previous_bundle_id=station.active_bundle_id,
                )
                record(
                    conn,
                    ENGINE,
                    "assign",
                    f"station:{rs.station_id}",
                    f"rollout {r.rollout_id[:8]} wave {r.wave}",
                    {"bundle_id": r.bundle_id, "previous_bundle_id": station.active_bundle_id},
                )
            elif rs.state == "assigned" and station is not None and station.active_bundle_id == r.bundle_id:
                _set_rs(conn, r.rollout_id, rs.station_id, state="installed", installed_ts=now)
        wave = _stations_of(conn, r.rollout_id, r.wave)
        failed = [rs for rs in wave if rs.state == "failed"]
        if failed:
            _start_rollback(conn, r, f"station {failed[0].station_id} refused the bundle: {failed[0].reason}")
            return
        late = [rs for rs in wave if rs.state == "assigned" and now - rs.assigned_ts > r.install_timeout_s]
        if late:
            _start_rollback(
                conn, r, f"station {late[0].station_id} did not install within {r.install_timeout_s:g} s"
            )
            return
        if all(rs.state == "installed" for rs in wave):
            _set_rollout(conn, r.rollout_id, state="soak", phase_ts=max(rs.installed_ts for rs in wave))

    def _soak(self, conn: sa.Connection, r: Any, now: float) -> None:
        if now - r.phase_ts < r.soak_s:
            return
        wave = _stations_of(conn, r.rollout_id, r.wave)
        verdicts = []
        for rs in wave:
            verdict = self._judge_station(r, rs)
            if verdict is None:  # not enough results yet
                if now - r.phase_ts > r.soak_s + r.install_timeout_s:
                    _start_rollback(
                        conn, r, f"station {rs.station_id}: fewer than {r.min_results} results after soak"
                    )
                return
            verdicts.append((rs.station_id, verdict))
        for station_id, verdict in verdicts:
            if not verdict.ok:
                _start_rollback(conn, r, f"station {station_id}: {verdict.reason}")
                return
        for station_id, verdict in verdicts:
            _set_rs(conn, r.rollout_id, station_id, state="healthy", reason=verdict.reason)
        record(
            conn,
            ENGINE,
            "wave_healthy",
            f"rollout:{r.rollout_id}",
            f"wave {r.wave}",
            {s: v.to_dict() for s, v in verdicts},
        )
        last = conn.execute(
            sa.select(sa.func.max(rollout_stations.c.wave)).where(
                rollout_stations.c.rollout_id == r.rollout_id
            )
        ).scalar_one()
        if r.wave >= last:
            _set_rollout(conn, r.rollout_id, state="done", phase_ts=now, reason="every wave healthy")
            record(conn, ENGINE, "rollout_done", f"rollout:{r.rollout_id}", "every wave healthy")
        else:
            _set_rollout(conn, r.rollout_id, state="wave", wave=r.wave + 1, phase_ts=now)

    def _judge_station(self, r: Any, rs: Any) -> Any | None:
        """Health of one station's install, or None while it has too few results to judge."""
        if self.collector_engine is None:
            return judge(None, bundle_stats_empty(), r.max_nok_rate_delta, r.max_score_shift)
        new = bundle_stats(self.collector_engine, r.bundle_id, [rs.station_id], since_ts=rs.installed_ts)
        if new.n < r.min_results:
            return None
        old = None
        if rs.previous_bundle_id:
            old = bundle_stats(
                self.collector_engine,
                rs.previous_bundle_id,
                [rs.station_id],
                until_ts=rs.assigned_ts,
                last_n=max(4 * r.min_results, 200),
            )
        return judge(old, new, r.max_nok_rate_delta, r.max_score_shift)

    def _rolling_back(self, conn: sa.Connection, r: Any, now: float) -> None:
        back = [rs for rs in _stations_of(conn, r.rollout_id) if rs.state == "rolling_back"]
        rows = _station_rows(conn, [rs.station_id for rs in back])
        for rs in back:
            station = rows.get(rs.station_id)
            if station is not None and station.active_bundle_id == rs.previous_bundle_id:
                _set_rs(conn, r.rollout_id, rs.station_id, state="rolled_back")
                record(
                    conn,
                    ENGINE,
                    "rolled_back",
                    f"station:{rs.station_id}",
                    r.reason,
                    {"bundle_id": rs.previous_bundle_id},
                )
        if not any(rs.state == "rolling_back" for rs in _stations_of(conn, r.rollout_id)):
            _set_rollout(conn, r.rollout_id, state="aborted", phase_ts=now)


def bundle_stats_empty() -> Any:
    from deploy.health import BundleStats

    return BundleStats(0, 0, float("nan"), float("nan"), float("nan"))


def manual_rollback(engine: sa.Engine, selector: str, actor: str, reason: str) -> list[dict[str, str]]:
    """Send the selected stations back to their previous bundle (and stop any active rollout on them)."""
    out = []
    with writer(engine).begin() as conn:
        ids = set(select_stations(conn, selector))
        for r in conn.execute(sa.select(rollouts).where(rollouts.c.state.in_(ACTIVE_STATES))).all():
            if ids & {rs.station_id for rs in _stations_of(conn, r.rollout_id)}:
                _start_rollback(conn, r, f"manual rollback by {actor}: {reason}", actor)
        for sid, station in _station_rows(conn, sorted(ids)).items():
            target = station.previous_bundle_id
            if not target:
                out.append({"station_id": sid, "bundle_id": "", "note": "no previous bundle"})
                continue
            if station.desired_bundle_id == target:
                out.append({"station_id": sid, "bundle_id": target, "note": "already rolling back"})
                continue
            set_desired_bundle(conn, [sid], target, "")
            record(
                conn,
                actor,
                "rollback",
                f"station:{sid}",
                reason,
                {"from": station.active_bundle_id, "to": target},
            )
            out.append({"station_id": sid, "bundle_id": target, "note": "rolling back"})
    return out


def rollout_status(conn: sa.Connection, rollout_id: str | None = None) -> list[dict[str, Any]]:
    query = sa.select(rollouts).order_by(rollouts.c.created_ts)
    if rollout_id is not None:
        query = query.where(rollouts.c.rollout_id.startswith(rollout_id))
    out = []
    for r in conn.execute(query):
        item = dict(r._mapping)
        item["stations"] = [dict(rs._mapping) for rs in _stations_of(conn, r.rollout_id)]
        out.append(item)
    return out
