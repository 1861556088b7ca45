"""The registry's view of the fleet: check-ins in, desired state out, update reports recorded.

Pure database logic (no sockets), so the registry loop, the CLI and tests share it. A station is enrolled
at its first check-in and bound to the CURVE key it used: a later check-in under the same id from another
key is refused, so one station cannot pose as another.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import sqlalchemy as sa

from deploy.audit import record
from deploy.bundle_store import offer_for
from deploy.db import dumps, loads, writer
from deploy.selector import matches, select
from deploy.tables import bundles, policies, rollout_stations, stations
from protocol.deploy_messages import BundleOffer, CheckIn, CheckInReply, PolicySpec, ShadowSpec, UpdateReport

__all__ = [
    "StationRefusedError",
    "clear_shadow",
    "handle_checkin",
    "handle_report",
    "list_stations",
    "policy_for",
    "select_stations",
    "set_desired_bundle",
    "set_policy",
    "set_shadow",
]

log = logging.getLogger("m3dm.deploy")


class StationRefusedError(Exception):
    """A check-in or report the registry will not accept (wrong key for this station id)."""


def list_stations(conn: sa.Connection) -> list[dict[str, Any]]:
    rows = [dict(r._mapping) for r in conn.execute(sa.select(stations).order_by(stations.c.station_id))]
    for row in rows:
        row["tags"] = loads(row["tags"], [])
        row["health"] = loads(row["health"], {})
        row["last_report"] = loads(row["last_report"], {})
    return rows


def select_stations(conn: sa.Connection, selector: str) -> list[str]:
    pairs = [
        (r.station_id, loads(r.tags, []))
        for r in conn.execute(sa.select(stations.c.station_id, stations.c.tags))
    ]
    return select(selector, pairs)


def policy_for(conn: sa.Connection, station_id: str, tags: list[str]) -> Any | None:
    """The newest runtime policy whose selector matches this station (versions only grow)."""
    for row in conn.execute(sa.select(policies).order_by(policies.c.version.desc())):
        if matches(row.selector, station_id, tags):
            return row
    return None


def _upsert_checkin(conn: sa.Connection, msg: CheckIn, fingerprint: str) -> Any:
    row = conn.execute(sa.select(stations).where(stations.c.station_id == msg.station_id)).first()
    if row is not None and row.key_fingerprint and fingerprint and row.key_fingerprint != fingerprint:
        raise StationRefusedError(
            f"station {msg.station_id} is enrolled with key {row.key_fingerprint}, not {fingerprint}"
        )
    values = {
        "tags": dumps(sorted(msg.tags)),
        "epoch": msg.epoch,
        "active_bundle_id": msg.active_bundle_id,
        "active_version": msg.active_version,
        "previous_bundle_id": msg.previous_bundle_id,
        "previous_version": msg.previous_version,
        "policy_version": msg.policy_version,
        "shadow_bundle_id": msg.shadow_bundle_id,
        "locked": msg.locked,
        "health": dumps(dict(msg.health)),
        "last_checkin_ts": time.time(),
    }
    if row is None:
        conn.execute(
            stations.insert().values(station_id=msg.station_id, key_fingerprint=fingerprint, **values)
        )
        record(
            conn,
            f"station:{msg.station_id}",
            "enroll",
            f"station:{msg.station_id}",
            "first check-in",
            {"key": fingerprint, "tags": sorted(msg.tags), "bundle": msg.active_bundle_id},
        )
        log.info("station %s enrolled (key %s, bundle %s)", msg.station_id, fingerprint, msg.active_version)
    else:
        if row.locked != msg.locked:
            record(
                conn,
                f"station:{msg.station_id}",
                "lock" if msg.locked else "unlock",
                f"station:{msg.station_id}",
                "operator on the station",
            )
        conn.execute(stations.update().where(stations.c.station_id == msg.station_id).values(**values))
    return conn.execute(sa.select(stations).where(stations.c.station_id == msg.station_id)).one()


def _bundle_row(conn: sa.Connection, bundle_id: str) -> Any | None:
    if not bundle_id:
        return None
    return conn.execute(sa.select(bundles).where(bundles.c.bundle_id == bundle_id)).first()


def kept_only_offer(bundle_id: str) -> BundleOffer:
    """An offer with no bytes behind it: the station must already keep this bundle (a rollback target)."""
    return BundleOffer(
        bundle_id=bundle_id, version="", size_bytes=0, sha256="", chunk_bytes=1, chunk_sha256=()
    )


def handle_checkin(engine: sa.Engine, msg: CheckIn, fingerprint: str, checkin_s: float = 0.0) -> CheckInReply:
    """Record a check-in and answer with what the station should run. Raises StationRefusedError."""
    with writer(engine).begin() as conn:
        row = _upsert_checkin(conn, msg, fingerprint)
        offer = None
        if row.desired_bundle_id and row.desired_bundle_id != msg.active_bundle_id:
            bundle = _bundle_row(conn, row.desired_bundle_id)
            # not in the store (a station's first bundle, installed by hand): only a kept copy can serve
            offer = offer_for(bundle) if bundle is not None else kept_only_offer(row.desired_bundle_id)
        policy = None
        prow = policy_for(conn, msg.station_id, list(msg.tags))
        if prow is not None and prow.version != msg.policy_version:
            policy = PolicySpec(
                version=prow.version,
                variant=prow.variant,
                threshold=prow.threshold,
                map_every_n_ok=prow.map_every_n_ok,
            )
            conn.execute(
                stations.update()
                .where(stations.c.station_id == msg.station_id)
                .values(desired_policy_version=prow.version)
            )
        shadow = None
        clear = False
        if row.desired_shadow_bundle_id and row.desired_shadow_bundle_id != msg.shadow_bundle_id:
            bundle = _bundle_row(conn, row.desired_shadow_bundle_id)
            if bundle is not None:
                shadow = ShadowSpec(offer=offer_for(bundle), sample_every_n=row.shadow_every_n)
        elif not row.desired_shadow_bundle_id and msg.shadow_bundle_id:
            clear = True
    return CheckInReply(
        bundle=offer,
        policy=policy,
        shadow=shadow,
        clear_shadow=clear,
        rollout_id=row.desired_rollout_id if offer is not None else "",
        checkin_s=checkin_s,
    )


def _report_detail(rep: UpdateReport) -> dict[str, Any]:
    return {
        "bundle_id": rep.bundle_id,
        "version": rep.version,
        "outcome": rep.outcome,
        "check": rep.check,
        "reason": rep.reason,
        "rollout_id": rep.rollout_id,
        "active_bundle_id": rep.active_bundle_id,
        "timings_ms": dict(rep.timings_ms),
        "ts": rep.ts,
    }


def _rollout_station_update(conn: sa.Connection, rep: UpdateReport) -> None:
    where = (rollout_stations.c.rollout_id == rep.rollout_id) & (
        rollout_stations.c.station_id == rep.station_id
    )
    rs = conn.execute(sa.select(rollout_stations).where(where)).first()
    if rs is None:
        return
    values: dict[str, Any] = {"timings": dumps(dict(rep.timings_ms))}
    if rs.state == "assigned" and rep.outcome == "installed":
        values.update(state="installed", installed_ts=time.time(), reason="")
    elif rs.state == "assigned" and rep.outcome == "failed":
        values.update(state="failed", reason=f"[{rep.check}] {rep.reason}" if rep.check else rep.reason)
    elif rs.state == "assigned" and rep.outcome == "deferred":
        values.update(reason=f"deferred: {rep.reason}")
    elif (
        rs.state == "rolling_back"
        and rep.outcome in ("installed", "rolled_back")
        and (rep.active_bundle_id == rs.previous_bundle_id)
    ):
        values.update(state="rolled_back")
    conn.execute(rollout_stations.update().where(where).values(**values))


def handle_report(engine: sa.Engine, rep: UpdateReport, fingerprint: str) -> None:
    """Record an UpdateReport on the station, its rollout (if any) and in the audit log."""
    with writer(engine).begin() as conn:
        row = conn.execute(sa.select(stations).where(stations.c.station_id == rep.station_id)).first()
        if row is None:
            raise StationRefusedError(f"station {rep.station_id} reported before its first check-in")
        if row.key_fingerprint and fingerprint and row.key_fingerprint != fingerprint:
            raise StationRefusedError(f"station {rep.station_id} is enrolled with another key")
        values: dict[str, Any] = {"last_report": dumps(_report_detail(rep))}
        if rep.active_bundle_id:
            values["active_bundle_id"] = rep.active_bundle_id
        conn.execute(stations.update().where(stations.c.station_id == rep.station_id).values(**values))
        if rep.rollout_id:
            _rollout_station_update(conn, rep)
        reason = f"[{rep.check}] {rep.reason}" if rep.check else rep.reason
        record(
            conn,
            f"station:{rep.station_id}",
            f"update_{rep.outcome}",
            f"bundle:{rep.bundle_id}",
            reason,
            _report_detail(rep),
        )
    log.info(
        "station %s: %s bundle %s %s %s", rep.station_id, rep.outcome, rep.bundle_id[:8], rep.version, reason
    )


def set_desired_bundle(conn: sa.Connection, station_ids: list[str], bundle_id: str, rollout_id: str) -> None:
    conn.execute(
        stations.update()
        .where(stations.c.station_id.in_(station_ids))
        .values(desired_bundle_id=bundle_id, desired_rollout_id=rollout_id)
    )


def set_policy(
    engine: sa.Engine,
    selector: str,
    actor: str,
    variant: str | None,
    threshold: float | None,
    map_every_n_ok: int | None,
    reason: str = "",
) -> int:
    """A new runtime policy version for the stations `selector` matches (now and later). Returns it."""
    with writer(engine).begin() as conn:
        version = conn.execute(
            policies.insert().values(
                selector=selector,
                variant=variant,
                threshold=threshold,
                map_every_n_ok=map_every_n_ok,
                created_ts=time.time(),
                actor=actor,
                reason=reason,
            )
        ).inserted_primary_key[0]
        record(
            conn,
            actor,
            "set_policy",
            f"stations:{selector}",
            reason,
            {
                "version": version,
                "variant": variant,
                "threshold": threshold,
                "map_every_n_ok": map_every_n_ok,
                "stations": select_stations(conn, selector),
            },
        )
    return int(version)


def set_shadow(
    engine: sa.Engine, selector: str, bundle_id: str, every_n: int, actor: str, reason: str = ""
) -> list[str]:
    with writer(engine).begin() as conn:
        if _bundle_row(conn, bundle_id) is None:
            raise KeyError(f"bundle {bundle_id} is not published")
        ids = select_stations(conn, selector)
        conn.execute(
            stations.update()
            .where(stations.c.station_id.in_(ids))
            .values(desired_shadow_bundle_id=bundle_id, shadow_every_n=every_n)
        )
        record(
            conn, actor, "shadow_start", f"bundle:{bundle_id}", reason, {"stations": ids, "every_n": every_n}
        )
    return ids


def clear_shadow(conn: sa.Connection, station_ids: list[str], actor: str, reason: str = "") -> None:
    conn.execute(
        stations.update().where(stations.c.station_id.in_(station_ids)).values(desired_shadow_bundle_id="")
    )
    record(conn, actor, "shadow_stop", f"stations:{','.join(station_ids)}", reason)
