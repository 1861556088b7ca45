"""Issue 13: a station SIGKILLed in the middle of a bundle update, with real processes and CURVE sockets.

`m3dm edge run` (with an [updater] table) scores a looping stream into `m3dm collector serve` and checks in
with `m3dm deploy serve`. A rollout offers it v1.1 (v1 re-signed: new id, version, counter). The test
watches the station's state folder and SIGKILLs it at one moment of the update:

  download  `downloads/<id>.tar.part` holds a quarter of the chunks or more, but not all (the bundle is
            published in small chunks so that the download lasts long enough to be caught);
  staging   `staging/<id>/` exists: the tar is being unpacked, verified, loaded or golden-replayed;
  swap      `bundles/<id>/` exists: the staged folder was moved into place, `active.json` may or may not
            have been replaced yet.

Then, before the restart, the bundle `active.json` names must verify (signature and every hash). The station
is restarted on the same config: it must come up on that bundle, finish the update (the rollout ends
`done`), and a last `--once` run drains its outbox. Exact reconciliation: every (epoch, seq) the outbox
assigned is stored once, nothing else; each epoch runs v1 then v1.1, never back, never a third bundle.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from reliability import servers
from reliability.figures import record
from reliability.harness import make_keys, outbox_depth, outbox_epochs, reconcile

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STATION = "st-upd"
# The bundle tar is published in this many chunks, one request each: the download lasts ~1-10 s here, long
# enough to be caught a quarter of the way in by a 2 ms poll.
N_CHUNKS = 200


def _deploy_conftest() -> Any:
    """tests/deploy/conftest.py as a module, for its `resign` (its fixtures are scoped to tests/deploy)."""
    path = Path(__file__).resolve().parents[1] / "deploy" / "conftest.py"
    spec = importlib.util.spec_from_file_location("deploy_test_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def update_bundles(fleet_bundle: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """v1 (the shared fleet bundle) and v1.1: the same model re-signed, a good update that passes golden."""
    v11 = _deploy_conftest().resign(
        fleet_bundle["bundle"],
        fleet_bundle["keys"],
        tmp_path_factory.mktemp("update-kill") / "v11",
        "1.1.0",
        2,
    )
    return {"v1": fleet_bundle, "v11": v11, "good_dir": fleet_bundle["data"] / fleet_bundle["class_name"]}


def _station_toml(path: Path, b: dict, keys: Any, station_keys: Path, registry_key: Path, ends: dict) -> None:
    good = b["good_dir"] / "test" / "good"
    path.write_text(
        f"""station_id = "{STATION}"
bundle = "{b["v1"]["bundle"]}"
key = "{b["v1"]["keys"]}"
source = "folder:{good}?loop=1&fps=5"
backend = "ort"
collector = "{ends["collector"]}"
curve_dir = "{station_keys}"
collector_key = "{keys.collector_public}"
outbox = "{path.parent / "outbox.sqlite"}"
sinks = []
backpressure = "block"
map_every_n_ok = 0
thumbnail_px = 0

[updater]
registry = "{ends["registry"]}"
registry_key = "{registry_key}"
state_dir = "{path.parent / "state"}"
tags = ["line=1"]
checkin_s = 0.3
backend = "ort"
"""
    )


class Station:
    """`m3dm edge run --config` as a process, its output in its own log per start."""

    def __init__(self, toml: Path, n: int, *extra: str) -> None:
        self.log = toml.parent / f"station.{n}.log"
        cmd = [*servers.M3DM, "edge", "run", "--config", str(toml), *extra]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=servers.env())

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def wait_for(self, what: str, check: Callable[[], Any], timeout_s: float, poll_s: float = 0.1) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = check()
            if value:
                return value
            assert self.proc.poll() is None, (
                f"station exited ({self.proc.returncode}) before {what}:\n{self.tail()}"
            )
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.tail()}"
            time.sleep(poll_s)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def _kill_point(moment: str, state: Path, v11: dict, size_bytes: int) -> Callable[[], Any]:
    """A check that is truthy once the station's update is at `moment` (what it saw, for the figures)."""
    bid = v11["bundle_id"]
    part = state / "downloads" / f"{bid}.tar.part"

    def download() -> Any:
        try:
            have = part.stat().st_size
        except FileNotFoundError:
            done = (state / "downloads" / f"{bid}.tar").exists() or (state / "staging" / bid).exists()
            assert not done, (
                f"the download finished between two polls: publish in more than {N_CHUNKS} chunks"
            )
            return None
        return size_bytes // 4 <= have < size_bytes and {"part_bytes": have, "size_bytes": size_bytes}

    def staging() -> Any:
        return (state / "staging" / bid).is_dir() and {"staged": True}

    def swap() -> Any:
        return (state / "bundles" / bid).is_dir() and {"settled": True}

    return {"download": download, "staging": staging, "swap": swap}[moment]


def _results(engine: sa.Engine) -> list[Any]:
    from collector.schema import inspections as t

    with engine.connect() as conn:
        query = sa.select(t.c.epoch, t.c.seq, t.c.frame_id, t.c.bundle_id, t.c.decision, t.c.shadow)
        return list(conn.execute(query.where(t.c.station_id == STATION).order_by(t.c.epoch, t.c.seq)))


def _events(engine: sa.Engine) -> list[Any]:
    from collector.schema import events as t

    with engine.connect() as conn:
        return list(conn.execute(sa.select(t.c.epoch, t.c.kind, t.c.detail).where(t.c.station_id == STATION)))


def _registry_station(engine: sa.Engine) -> Any:
    from deploy.tables import stations

    with engine.connect() as conn:
        return conn.execute(sa.select(stations).where(stations.c.station_id == STATION)).first()


def _audit_actions(engine: sa.Engine) -> list[tuple[str, str]]:
    from deploy.tables import audit

    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(audit.c.action, audit.c.target).where(audit.c.actor == f"station:{STATION}")
        )
        return [(r.action, r.target) for r in rows]


def _rollout(engine: sa.Engine, rollout_id: str) -> dict[str, Any]:
    from deploy.rollout import rollout_status

    with engine.connect() as conn:
        return rollout_status(conn, rollout_id)[0]


def _verified_active(state: Path, key: Path) -> tuple[str, str]:
    """(bundle_id, version) of the bundle active.json names, after verifying that folder in full."""
    from edge.bundle import verify_bundle
    from edge.update_state import load_state

    active = load_state(state).active
    assert active is not None, "active.json names no bundle"
    manifest = verify_bundle(Path(active.path), key / "bundle_signing.pub")  # raises on any torn file
    assert manifest.bundle_id == active.bundle_id
    return active.bundle_id, active.version


class Rig:
    """Collector, registry (v1 and v1.1 published in small chunks), one station's config; all on loopback."""

    def __init__(self, tmp_path: Path, b: dict, stack: contextlib.ExitStack) -> None:
        from collector.db import make_engine
        from deploy.bundle_store import publish
        from deploy.db import open_db
        from protocol.curve import generate_keypair

        self.b, self.v1, self.v11 = b, b["v1"]["bundle_id"], b["v11"]["bundle_id"]
        self.sign_keys = b["v1"]["keys"]
        keys = make_keys(tmp_path / "keys")
        station_keys = keys.station(STATION)
        registry_public, _ = generate_keypair(tmp_path / "keys" / "registry", "registry")
        self.size_bytes = b["v11"]["tar"].stat().st_size
        self.chunk_bytes = max(1024, -(-self.size_bytes // N_CHUNKS))
        self.folder = tmp_path / STATION
        self.folder.mkdir()
        self.state = self.folder / "state"
        self.outbox = self.folder / "outbox.sqlite"
        collector = stack.enter_context(servers.collector(tmp_path, keys.collector_dir, keys.allow_dir))
        extra = ("--checkin-s", "0.3", "--tick-s", "0.1", "--collector-db", servers.db_url(tmp_path))
        registry = stack.enter_context(
            servers.registry(tmp_path, registry_public.parent, keys.allow_dir, self.sign_keys, *extra)
        )
        self.reg_db = open_db(servers.registry_db_url(tmp_path))
        stack.callback(self.reg_db.dispose)
        self.col_db = make_engine(servers.db_url(tmp_path))
        stack.callback(self.col_db.dispose)
        for name in ("v1", "v11"):
            tar = b[name]["tar"]
            publish(
                self.reg_db, tar, tmp_path / "store", self.sign_keys, "test", chunk_bytes=self.chunk_bytes
            )
        self.toml = self.folder / "station.toml"
        ends = {"collector": collector.endpoint, "registry": registry.endpoint}
        _station_toml(self.toml, b, keys, station_keys, registry_public, ends)

    def station(self, n: int, *extra: str) -> Station:
        return Station(self.toml, n, *extra)

    def rollout(self) -> str:
        from deploy.rollout import RolloutSpec, create_rollout

        spec = RolloutSpec(
            self.v11, STATION, canary=1, soak_s=0.5, max_nok_rate_delta=1.0,
            max_score_shift=100.0, min_results=0, install_timeout_s=900.0,
        )  # fmt: skip
        return create_rollout(self.reg_db, spec, "test")

    def n_results(self, bundle_id: str | None = None) -> int:
        return sum(bundle_id is None or r.bundle_id == bundle_id for r in _results(self.col_db))


def _kill_at(rig: Rig, boot: int, moment: str, rollout_id: str | None) -> dict[str, Any]:
    """Boot the station, (on the first boot) roll v1.1 out to it, SIGKILL it once the update is at `moment`.

    Returns what was seen on disk, and the bundle active.json names after the kill (verified in full).
    """
    station = rig.station(boot)
    try:
        if rollout_id is None:
            station.wait_for(
                "check-in and 3 stored results",
                lambda: _registry_station(rig.reg_db) is not None and rig.n_results() >= 3,
                120,
            )
            rollout_id = rig.rollout()
        t0 = time.monotonic()
        check = _kill_point(moment, rig.state, rig.b["v11"], rig.size_bytes)
        seen = station.wait_for(f"the update at {moment}", check, 180, 0.002)
        station.stop(signal.SIGKILL)
        seen["wait_s"] = round(time.monotonic() - t0, 2)
    finally:
        station.stop(signal.SIGKILL)
    assert station.proc.returncode == -signal.SIGKILL
    # On disk, before the restart: active.json names a bundle whose every file verifies.
    at_kill, _ = _verified_active(rig.state, rig.sign_keys)
    if moment != "swap":
        assert at_kill == rig.v1, f"killed at {moment}, before the swap, the station must still name v1"
    staging = rig.state / "staging"
    seen["staging_at_kill"] = len(list(staging.iterdir())) if staging.is_dir() else 0
    if moment == "download":
        log = station.log.with_name(f"station.{boot + 1}.log")
        seen["resume_log"] = log
    return {"moment": moment, "seen": seen, "at_kill": at_kill, "rollout_id": rollout_id}


def _restart_until_done(rig: Rig, boot: int, rollout_id: str) -> tuple[dict[str, Any], float]:
    """Restart on the same config; the rollout must end `done` and v1.1 score. Then a --once run drains."""
    station = rig.station(boot)
    t0 = time.monotonic()
    try:
        station.wait_for(
            "the rollout to finish",
            lambda: _rollout(rig.reg_db, rollout_id)["state"] in ("done", "aborted"),
            400,
            0.2,
        )
        restart_to_done_s = round(time.monotonic() - t0, 2)
        station.wait_for("2 results on v1.1", lambda: rig.n_results(rig.v11) >= 2, 60)
    finally:
        assert station.stop() == 0, station.tail()
    rollout = _rollout(rig.reg_db, rollout_id)
    assert rollout["state"] == "done", rollout
    # A last run on the same config scores the good folder once and exits when every result is acked.
    good = rig.b["good_dir"] / "test" / "good"
    last = rig.station(boot + 1, "--source", f"folder:{good}", "--once")
    assert last.proc.wait(timeout=180) == 0, last.tail()
    return rollout, restart_to_done_s


def _assert_on_v11_with_nothing_half_done(rig: Rig, installed_by_restart: bool) -> dict[str, Any]:
    state, v1, v11 = rig.state, rig.v1, rig.v11
    assert _verified_active(state, rig.sign_keys) == (v11, "1.1.0")
    assert json.loads((state / "active.json").read_text())["previous"]["bundle_id"] == v1
    assert sorted(p.name for p in (state / "bundles").iterdir()) == sorted([v1, v11])
    assert list((state / "staging").iterdir()) == [], "a staged folder was left behind"
    assert list((state / "downloads").iterdir()) == [], "a download was left behind"
    station_row = _registry_station(rig.reg_db)
    assert station_row.active_bundle_id == v11
    report = json.loads(station_row.last_report or "{}")
    if installed_by_restart:  # the restarted station did the install itself, so it must have reported it
        assert ("update_installed", f"bundle:{v11}") in _audit_actions(rig.reg_db)
        assert report["outcome"] == "installed", report
    return report


def _assert_reconciled(rig: Rig, kills: list[dict[str, Any]]) -> dict[str, Any]:
    """Every (epoch, seq) the outbox assigned stored once; per boot, v1 then v1.1 and never back."""
    v1, v11 = rig.v1, rig.v11
    assert outbox_depth(rig.outbox) == 0
    assigned = outbox_epochs(rig.outbox)
    epochs = sorted(assigned)
    assert len(epochs) == len(kills) + 2, assigned  # the killed boots, the restart, the --once run
    rows = _results(rig.col_db)
    identity_rows = [(STATION, r.epoch, r.seq, r.frame_id, r.decision, 0.0, 0) for r in rows if not r.shadow]
    figures = reconcile(identity_rows, STATION, assigned, [])
    assert all(r.decision != "ERROR" for r in rows)
    by_epoch = {e: [r.bundle_id for r in rows if r.epoch == e] for e in epochs}
    for epoch, ids in by_epoch.items():
        assert set(ids) <= {v1, v11}, f"epoch {epoch} scored with a bundle that is neither v1 nor v1.1"
        assert ids == sorted(ids, key=lambda i: i == v11), f"epoch {epoch} went back to v1 after v1.1"
    for epoch, kill in zip(epochs, kills, strict=False):
        if kill["moment"] != "swap":
            assert set(by_epoch[epoch]) <= {v1}, f"killed at {kill['moment']}, the boot never swapped"
    restart, last = epochs[-2], epochs[-1]
    came_up_on_v1 = kills[-1]["at_kill"] == v1
    if came_up_on_v1:
        assert by_epoch[restart][0] == v1 and by_epoch[restart][-1] == v11, "the restart: v1, then v1.1"
    assert set(by_epoch[last]) == {v11}, "the last run loads the bundle active.json names"
    events = _events(rig.col_db)
    loaded = {e: d.get("bundle_version") for e, kind, d in events if kind == "bundle_loaded"}
    assert loaded[restart] == ("1.0.0" if came_up_on_v1 else "1.1.0") and loaded[last] == "1.1.0", loaded
    installed = [e for e, kind, _ in events if kind == "bundle_installed"]
    # killed after the swap, the event may or may not have reached the outbox before the kill
    assert installed == [restart] if came_up_on_v1 else installed in ([], [epochs[-3]]), events
    return {
        "sent": sum(assigned.values()),
        "stored": figures["stored"],
        "per_boot": [len(by_epoch[e]) for e in epochs],
        "results_v1": sum(r.bundle_id == v1 for r in rows),
        "results_v11": sum(r.bundle_id == v11 for r in rows),
    }


def test_station_sigkilled_at_each_step_of_an_update_comes_back_consistent_and_reconciles(
    tmp_path: Path, update_bundles: dict
) -> None:
    """One update, three SIGKILLs: mid-download, mid-staging (unpack/verify/load/golden), at the swap."""
    with contextlib.ExitStack() as stack:
        rig = Rig(tmp_path, update_bundles, stack)
        kills: list[dict[str, Any]] = []
        rollout_id = None
        for boot, moment in enumerate(("download", "staging", "swap"), start=1):
            kills.append(_kill_at(rig, boot, moment, rollout_id))
            rollout_id = kills[-1]["rollout_id"]
        rollout, restart_to_done_s = _restart_until_done(rig, len(kills) + 1, rollout_id)
        time.sleep(0.3)
        report = _assert_on_v11_with_nothing_half_done(rig, kills[-1]["at_kill"] == rig.v1)
        figures = _assert_reconciled(rig, kills)
    # the boot after the download kill resumed from the chunks already on disk, not from zero
    log = kills[0]["seen"].pop("resume_log").read_text(errors="replace")
    assert "resuming download at chunk" in log, log[-3000:]
    resumed = int(log.split("resuming download at chunk ")[1].split()[0])
    # Every whole chunk on disk when the kill was decided must be kept. The poll can catch a chunk half
    # written (stat races the write), and that partial chunk is rightly dropped, so count whole ones only.
    whole_chunks_seen = kills[0]["seen"]["part_bytes"] // rig.chunk_bytes
    assert resumed >= max(whole_chunks_seen, 1), (resumed, whole_chunks_seen)
    record(
        "station_sigkill_update",
        kills=[
            {"moment": k["moment"], **k["seen"], "active_at_kill": "v1" if k["at_kill"] == rig.v1 else "v1.1"}
            for k in kills
        ],
        resumed_at_chunk=resumed,
        chunks=-(-rig.size_bytes // rig.chunk_bytes),
        **figures,
        lost=0,
        duplicated=0,
        restart_to_done_s=restart_to_done_s,
        install_timings_ms={k: round(v, 1) for k, v in report.get("timings_ms", {}).items()},
        rollout=rollout["state"],
    )
