"""The deploy done-when test: registry, collector and 3 stations as real processes on loopback, with CURVE.

One fleet, scenarios in sequence (each builds on the state the previous one left):
  (a+d) a good bundle rolls out canary-first to all 3; the registry is SIGKILLed after the canary installed
        and restarted: the rollout resumes from its stored state and finishes. No frame is dropped, and each
        station's result sequence has no gap across the swap.
  (b)   a bundle whose golden samples fail, and one signed by another key, are refused at the canary: the
        rollout aborts with the reason and no other station changes.
  (c)   a bundle that installs but shifts the NOK rate past the bound is rolled back by the rollout itself.
  (e)   a shadow comparison of two bundles reports the flips the test planted (a lowered threshold).
Frames are the good test scans looping (block backpressure: capture waits, never drops). Everything the
assertions read comes from the shared SQLite database the collector and registry write.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

pytestmark = [pytest.mark.integration, pytest.mark.slow]

M3DM = str(Path(sys.executable).with_name("m3dm"))
STATIONS = ("st-1", "st-2", "st-3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, check: Callable[[], Any], timeout_s: float, procs: Any = None) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if procs is not None:
            procs.check_alive()
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class Procs:
    """Every process the test starts; all are killed at the end, whatever happened."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("ab")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        self.procs[name] = proc
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None and not name.endswith("-killed"):
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.logs / f"{name.removesuffix('-killed')}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        proc.wait(15)
        self.procs[f"{name}-killed"] = proc

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5  # a station finishes the frames it holds; no need to wait for that
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture()
def procs(tmp_path: Path) -> Iterator[Procs]:
    (tmp_path / "logs").mkdir()
    p = Procs(tmp_path / "logs")
    try:
        yield p
    finally:
        p.stop_all()


def _cli(*args: str, ok: bool = True) -> tuple[int, str]:
    done = subprocess.run([M3DM, "deploy", *args], capture_output=True, text=True, timeout=60)
    if ok:
        assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.returncode, done.stdout


def _keys(root: Path) -> dict[str, Path]:
    from protocol.curve import generate_keypair

    allow = root / "allow"
    allow.mkdir(parents=True)
    for name in ("collector", "registry", *STATIONS):
        public, _ = generate_keypair(root / name, name)
        if name.startswith("st-"):
            shutil.copy(public, allow / f"{name}.key")
    return {name: root / name for name in ("collector", "registry", *STATIONS)} | {"allow": allow}


def _station_toml(path: Path, sid: str, keys: dict, bundles: dict, collector: str, registry: str) -> None:
    source = f"folder:{bundles['good_dir']}?loop=1&fps=2"
    path.write_text(
        f"""station_id = "{sid}"
bundle = "{bundles["v1"]["bundle"]}"
key = "{bundles["keys"]}"
source = "{source}"
backend = "ort"
collector = "{collector}"
curve_dir = "{keys[sid]}"
collector_key = "{keys["collector"] / "collector.key"}"
outbox = "{path.parent / "outbox.sqlite"}"
sinks = []
backpressure = "block"
map_every_n_ok = 0
thumbnail_px = 0

[updater]
registry = "{registry}"
registry_key = "{keys["registry"] / "registry.key"}"
state_dir = "{path.parent / "state"}"
tags = ["class=ring", "line=1"]
checkin_s = 0.3
backend = "ort"
"""
    )


class Fleet:
    def __init__(self, tmp: Path, procs: Procs, bundles: dict) -> None:
        from collector.db import make_engine

        self.tmp, self.procs, self.bundles = tmp, procs, bundles
        self.keys = _keys(tmp / "keys")
        self.db = f"sqlite:///{tmp / 'fleet.db'}"
        self.store = tmp / "store"
        self.registry_port = _free_port()
        self.engine = make_engine(self.db)

    def start_collector(self) -> str:
        ready = self.tmp / "collector.ready"
        self.procs.start(
            "collector",
            [
                M3DM,
                "collector",
                "serve",
                "--bind",
                "tcp://127.0.0.1:0",
                "--db",
                self.db,
                "--http",
                "",
                "--curve-dir",
                str(self.keys["collector"]),
                "--allow",
                str(self.keys["allow"]),
                "--ready-file",
                str(ready),
            ],
        )
        _wait("collector", ready.exists, 60, self.procs)
        return json.loads(ready.read_text())["zmq"]

    def start_registry(self) -> None:
        ready = self.tmp / "registry.ready"
        ready.unlink(missing_ok=True)
        self.procs.start(
            "registry",
            [
                M3DM,
                "deploy",
                "serve",
                "--store",
                str(self.store),
                "--bind",
                f"tcp://127.0.0.1:{self.registry_port}",
                "--db",
                self.db,
                "--curve-dir",
                str(self.keys["registry"]),
                "--allow",
                str(self.keys["allow"]),
                "--signing-key",
                str(self.bundles["keys"]),
                "--checkin-s",
                "0.3",
                "--tick-s",
                "0.1",
                "--ready-file",
                str(ready),
            ],
        )
        _wait("registry", ready.exists, 60, self.procs)

    def start_stations(self, collector: str) -> None:
        for sid in STATIONS:
            folder = self.tmp / sid
            folder.mkdir()
            _station_toml(
                folder / "station.toml",
                sid,
                self.keys,
                self.bundles,
                collector,
                f"tcp://127.0.0.1:{self.registry_port}",
            )
            self.procs.start(sid, [M3DM, "edge", "run", "--config", str(folder / "station.toml")])

    def db_rows(self, query: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(query))

    def fleet(self) -> dict[str, Any]:
        from deploy.tables import stations

        return {r.station_id: r for r in self.db_rows(sa.select(stations))}

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        from deploy.rollout import rollout_status

        with self.engine.connect() as conn:
            return rollout_status(conn, rollout_id)[0]

    def wait_rollout(self, rollout_id: str, states: set[str], timeout_s: float) -> dict[str, Any]:
        return _wait(
            f"rollout in {states}",
            lambda: (r := self.rollout(rollout_id))["state"] in states and r,
            timeout_s,
            self.procs,
        )

    def results(self, sid: str) -> list[Any]:
        from collector.schema import inspections as t

        return self.db_rows(
            sa.select(
                t.c.epoch,
                t.c.seq,
                t.c.frame_id,
                t.c.bundle_id,
                t.c.decision,
                t.c.image_score,
                t.c.shadow,
                t.c.decision_ts,
                t.c.latency_total_ms,
            )
            .where(t.c.station_id == sid)
            .order_by(t.c.epoch, t.c.seq)
        )

    def n_results(self, sid: str, bundle_id: str) -> int:
        return sum(1 for r in self.results(sid) if r.bundle_id == bundle_id and not r.shadow)

    def start_rollout(self, bundle: str, *extra: str) -> str:
        _, out = _cli(
            "rollout",
            "--db",
            self.db,
            "--bundle",
            bundle,
            "--stations",
            "class=ring",
            "--json",
            "--soak",
            "1s",
            "--min-results",
            "2",
            "--install-timeout",
            "90s",
            *extra,
        )
        return json.loads(out)["rollout_id"]


def _assert_no_gaps(fleet: Fleet, good_frames: list[str]) -> None:
    """Every station: contiguous seqs in each epoch, and the live frames follow the source order exactly."""
    for sid in STATIONS:
        rows = fleet.results(sid)
        by_epoch: dict[int, list[int]] = {}
        for r in rows:
            by_epoch.setdefault(r.epoch, []).append(r.seq)
        for epoch, seqs in by_epoch.items():
            assert seqs == list(range(1, len(seqs) + 1)), f"{sid} epoch {epoch}: seq gap"
        for epoch in by_epoch:  # a restarted station starts its source over, in a new epoch
            live = [r.frame_id.split("#")[0] for r in rows if not r.shadow and r.epoch == epoch]
            expected = [good_frames[i % len(good_frames)] for i in range(len(live))]
            assert live == expected, f"{sid} epoch {epoch}: a frame was skipped: {live}"
        assert all(r.decision != "ERROR" for r in rows), f"{sid}: ERROR results"
    from collector.schema import stations as collector_stations

    dropped = {r.station_id: r.dropped for r in fleet.db_rows(sa.select(collector_stations))}
    assert dropped == dict.fromkeys(STATIONS, 0)  # the stations' own count, from their heartbeats


def test_fleet_rollout_refusal_rollback_resume_and_shadow(
    tmp_path: Path, procs: Procs, deploy_bundles: dict
) -> None:
    b = deploy_bundles
    fleet = Fleet(tmp_path, procs, b)
    collector = fleet.start_collector()
    fleet.start_registry()
    _publish_all(fleet, b)
    fleet.start_stations(collector)
    v1, v11, nok = b["v1"]["bundle_id"], b["v11"]["bundle_id"], b["nok"]["bundle_id"]
    _wait(
        "3 stations checked in on v1 with results",
        lambda: len(fleet.fleet()) == 3 and all(fleet.n_results(s, v1) >= 2 for s in STATIONS),
        120,
        procs,
    )

    timings = _good_rollout_with_registry_kill(fleet, v11)
    # (e) shadow, started now so it overlaps (b) and (c): st-3 scores the nok bundle beside v1.1
    _cli("shadow", "--db", fleet.db, "--stations", "st-3", "--bundle", nok, "--every", "1")
    _refused_at_canary(fleet, b, v11)
    _nok_shift_rolled_back(fleet, nok, v11)
    _shadow_compare(fleet, b, v11, nok)
    _restart_keeps_the_active_bundle(fleet, "st-3", v11)
    _assert_events(fleet)
    _assert_no_gaps(fleet, sorted(p.stem for p in (b["good_dir"] / "rgb").iterdir()))
    _report_swap_figures(fleet, timings, v1, v11)


def _publish_all(fleet: Fleet, b: dict) -> None:
    from deploy.bundle_store import publish

    _cli(
        "publish",
        str(b["v11"]["tar"]),
        "--db",
        fleet.db,
        "--store",
        str(fleet.store),
        "--key",
        str(b["keys"]),
    )
    rc, _ = _cli(
        "publish",
        str(b["wrongsig"]["tar"]),
        "--db",
        fleet.db,
        "--store",
        str(fleet.store),
        "--key",
        str(b["keys"]),
        ok=False,
    )
    assert rc == 1  # the registry's trusted key refuses a bundle another key signed
    for name in ("v1", "golden", "nok"):
        publish(fleet.engine, b[name]["tar"], fleet.store, b["keys"], "test")
    # a registry that (wrongly) trusts another key accepts it: the stations must still refuse it
    publish(fleet.engine, b["wrongsig"]["tar"], fleet.store, b["other_keys"], "test")


def _rollout(fleet: Fleet, bundle_id: str) -> str:
    from deploy.rollout import RolloutSpec, create_rollout

    spec = RolloutSpec(
        bundle_id,
        "class=ring",
        canary=1,
        wave_size=2,
        soak_s=1.0,
        max_nok_rate_delta=0.3,
        max_score_shift=5.0,
        min_results=2,
        install_timeout_s=90.0,
    )
    return create_rollout(fleet.engine, spec, "test")


def _good_rollout_with_registry_kill(fleet: Fleet, v11: str) -> dict[str, dict]:
    """(a + d) canary first; the registry is SIGKILLed once the canary installed, then restarted."""
    rid = fleet.start_rollout(
        v11, "--canary", "1", "--wave-size", "2", "--max-nok-rate-delta", "0.3", "--max-score-shift", "5"
    )
    _wait("canary installed", lambda: fleet.fleet()["st-1"].active_bundle_id == v11, 90, fleet.procs)
    status = fleet.rollout(rid)
    assert {s["station_id"]: s["state"] for s in status["stations"]}["st-2"] == "pending"  # canary first
    fleet.procs.kill("registry")
    fleet.start_registry()
    done = fleet.wait_rollout(rid, {"done", "aborted", "rolling_back"}, 120)
    assert done["state"] == "done", done
    assert {s["station_id"]: s["state"] for s in done["stations"]} == dict.fromkeys(STATIONS, "healthy")
    assert {s["station_id"]: s["wave"] for s in done["stations"]} == {"st-1": 0, "st-2": 1, "st-3": 1}
    installed = {s["station_id"]: s["installed_ts"] for s in done["stations"]}
    assert installed["st-1"] < min(installed["st-2"], installed["st-3"])
    return {s["station_id"]: json.loads(s["timings"]) for s in done["stations"]}


def _refused_at_canary(fleet: Fleet, b: dict, v11: str) -> None:
    """(b) golden samples fail / wrong signature: refused at the canary, nothing else changes."""
    for name, check in (("golden", "[golden]"), ("wrongsig", "[signature]")):
        status = fleet.wait_rollout(_rollout(fleet, b[name]["bundle_id"]), {"aborted", "done"}, 90)
        assert status["state"] == "aborted" and check in status["reason"], status
        states = {s["station_id"]: s["state"] for s in status["stations"]}
        assert states == {"st-1": "failed", "st-2": "cancelled", "st-3": "cancelled"}, states
        assert {sid: r.active_bundle_id for sid, r in fleet.fleet().items()} == dict.fromkeys(STATIONS, v11)


def _nok_shift_rolled_back(fleet: Fleet, nok: str, v11: str) -> None:
    """(c) installs fine, shifts the NOK rate past the bound: rolled back by the rollout itself."""
    status = fleet.wait_rollout(_rollout(fleet, nok), {"aborted", "done"}, 120)
    assert status["state"] == "aborted" and "NOK rate" in status["reason"], status
    states = {s["station_id"]: s["state"] for s in status["stations"]}
    assert states == {"st-1": "rolled_back", "st-2": "cancelled", "st-3": "cancelled"}, states
    assert fleet.n_results("st-1", nok) >= 2  # it really ran before it was judged
    assert fleet.fleet()["st-1"].active_bundle_id == v11


def _shadow_compare(fleet: Fleet, b: dict, v11: str, nok: str) -> None:
    """(e) the comparison finds exactly the planted flips: good scans between the two thresholds."""
    from deploy.db import writer
    from deploy.fleet import clear_shadow

    _wait(
        "shadow results on st-3", lambda: sum(r.shadow for r in fleet.results("st-3")) >= 4, 90, fleet.procs
    )
    with writer(fleet.engine).begin() as conn:
        clear_shadow(conn, ["st-3"], "test", "enough pairs")
    _wait("shadow stopped", lambda: fleet.fleet()["st-3"].shadow_bundle_id == "", 30, fleet.procs)

    def settled() -> bool:  # a live result is emitted before its shadow: 2 live ones after the last shadow
        rows = fleet.results("st-3")
        last_shadow = max(r.seq for r in rows if r.shadow)
        return sum(1 for r in rows if not r.shadow and r.seq > last_shadow) >= 2

    _wait("the last shadow results", settled, 60, fleet.procs)
    _, out = _cli("compare", "--db", fleet.db, "--active", v11, "--candidate", nok, "--json")
    cmp = json.loads(out)
    low = b["nok"]["manifest"].thresholds.image_threshold
    high = b["v11"]["manifest"].thresholds.image_threshold
    pairs = _shadow_pairs(fleet, "st-3", v11, nok)
    planted = sum(1 for s in pairs.values() if low < s <= high)
    assert cmp["n_pairs"] == len(pairs) >= 4
    assert cmp["flips"] == cmp["flips_ok_to_nok"] == planted > 0
    assert cmp["score_correlation"] > 0.999  # same scores, another threshold
    assert cmp["nok_rate_delta"] == pytest.approx(planted / len(pairs))


def _restart_keeps_the_active_bundle(fleet: Fleet, sid: str, v11: str) -> None:
    """SIGKILL a station and start it again with the same config (--bundle still says v1): it runs v1.1."""
    epoch = fleet.fleet()[sid].epoch
    fleet.procs.kill(sid)
    fleet.procs.start(sid, [M3DM, "edge", "run", "--config", str(fleet.tmp / sid / "station.toml")])
    _wait(
        f"{sid} back with a new epoch",
        lambda: (r := fleet.fleet()[sid]).epoch != epoch and r.active_bundle_id == v11,
        90,
        fleet.procs,
    )
    _wait(
        f"{sid} scoring again",
        lambda: any(r.epoch != epoch and r.bundle_id == v11 for r in fleet.results(sid)),
        90,
        fleet.procs,
    )
    assert all(r.bundle_id == v11 for r in fleet.results(sid) if r.epoch != epoch)


def _assert_events(fleet: Fleet) -> None:
    """The stations told the collector what happened to each update (StationEvents through the outbox)."""
    from collector.schema import events

    def kinds(sid: str) -> set[str]:
        return {r.kind for r in fleet.db_rows(sa.select(events.c.kind).where(events.c.station_id == sid))}

    _wait(
        "update events at the collector",
        lambda: (
            {"bundle_installed", "update_failed", "bundle_rolled_back"} <= kinds("st-1")
            and "shadow_started" in kinds("st-3")
        ),
        30,
        fleet.procs,
    )
    assert all("bundle_installed" in kinds(sid) for sid in STATIONS)
    health = {sid: json.loads(r.health) for sid, r in fleet.fleet().items()}
    assert all({"fps", "outbox_depth"} <= set(h) for h in health.values()), health  # check-ins carry health
    assert any(h["fps"] > 0 for h in health.values()), health


def _shadow_pairs(fleet: Fleet, sid: str, active: str, candidate: str) -> dict[str, float]:
    rows = fleet.results(sid)
    live = {r.frame_id: r.image_score for r in rows if r.bundle_id == active and not r.shadow}
    return {
        r.frame_id: live[r.frame_id]
        for r in rows
        if r.bundle_id == candidate and r.shadow and r.frame_id in live
    }


def _report_swap_figures(fleet: Fleet, timings: dict[str, dict], old: str, new: str) -> None:
    """Swap time (offer seen -> new bundle active) and frame-interval jitter around the swap, printed."""
    for sid in STATIONS:
        live = [r for r in fleet.results(sid) if not r.shadow]
        first_new = next(i for i, r in enumerate(live) if r.bundle_id == new)
        assert all(r.bundle_id == old for r in live[:first_new])  # one switch, never back and forth
        gaps = [live[i].decision_ts - live[i - 1].decision_ts for i in range(1, len(live))]
        around = gaps[max(0, first_new - 3) : first_new + 2]
        t = timings[sid]
        print(
            f"\n{sid}: swap total {t['total_ms']:.0f} ms (download {t.get('download_ms', 0):.0f}, golden "
            f"{t['golden_ms']:.0f}, swap {t['swap_ms']:.2f}); frame gaps around the swap "
            f"{[round(g, 2) for g in around]} s, median {sorted(gaps)[len(gaps) // 2]:.2f} s; "
            f"load {os.getloadavg()[0]:.1f}"
        )
