"""Registry + station updater in one process: real CURVE sockets, real bundles, real SQLite.

The registry serves in a thread; the updater is driven one check-in at a time, so every step is
deterministic. The multi-process fleet (stations scoring frames, collector, SIGKILL) is in
tests/deploy/test_fleet.py.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import msgspec
import pytest
import sqlalchemy as sa

pytestmark = pytest.mark.integration


@pytest.fixture()
def keys(tmp_path: Path) -> dict[str, Path]:
    from protocol.curve import generate_keypair

    generate_keypair(tmp_path / "registry", "registry")
    public, _ = generate_keypair(tmp_path / "st-1", "st-1")
    (tmp_path / "allow").mkdir()
    shutil.copy(public, tmp_path / "allow" / "st-1.key")
    return {"registry": tmp_path / "registry", "station": tmp_path / "st-1", "allow": tmp_path / "allow"}


@pytest.fixture()
def registry(tmp_path: Path, keys: dict[str, Path], deploy_bundles: dict):
    from collector.db import make_engine, upgrade_collector
    from deploy.config import RegistryConfig
    from deploy.registry import Registry

    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    upgrade_collector(make_engine(url))  # the rollout engine reads results from the same database
    cfg = RegistryConfig(
        store=tmp_path / "store",
        db=url,
        bind="tcp://127.0.0.1:0",
        curve_dir=keys["registry"],
        allow_dir=keys["allow"],
        signing_key=deploy_bundles["keys"],
        checkin_s=0.2,
        tick_s=0.05,
    )
    reg = Registry(cfg)
    ready = threading.Event()
    thread = threading.Thread(target=reg.serve, kwargs={"ready": lambda _ep: ready.set()}, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield reg
    finally:
        reg.stop()
        thread.join(10)
        assert not thread.is_alive()


def _updater(tmp_path: Path, keys: dict, registry, bundles: dict, model=None):
    from edge.model_slot import ModelSlot
    from edge.station_model import open_bundle
    from edge.updater import Updater, UpdaterConfig

    if model is None:
        model = open_bundle(bundles["v1"]["bundle"], bundles["keys"], backend="ort")
    cfg = UpdaterConfig(
        registry=registry.endpoint.replace("0.0.0.0", "127.0.0.1"),
        registry_key=keys["registry"] / "registry.key",
        curve_dir=keys["station"],
        signing_key=bundles["keys"],
        state_dir=tmp_path / "state",
        tags=("class=ring", "line=1"),
        backend="ort",
        request_timeout_s=5.0,
    )
    events: list[tuple[str, dict]] = []
    return Updater(
        cfg, "st-1", ModelSlot(model), epoch=1, events=lambda k, d: events.append((k, dict(d)))
    ), events


def _publish(registry, bundle: dict, key: Path | None = None) -> None:
    from deploy.bundle_store import publish

    publish(registry.engine, bundle["tar"], registry.cfg.store, key or registry.cfg.signing_key, "test")


def _rollout(registry, bundle_id: str) -> str:
    from deploy.rollout import RolloutSpec, create_rollout

    spec = RolloutSpec(
        bundle_id, "class=ring", canary=1, wave_size=1, soak_s=0.0, min_results=0, install_timeout_s=30.0
    )
    return create_rollout(registry.engine, spec, "test")


def _rollout_state(registry, rollout_id: str, want: set[str], timeout_s: float = 10.0) -> dict:
    from deploy.rollout import rollout_status

    deadline = time.monotonic() + timeout_s
    while True:
        with registry.engine.connect() as conn:
            status = rollout_status(conn, rollout_id)[0]
        if status["state"] in want or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def test_update_swap_rollback_refusals_and_restart(
    tmp_path: Path, keys: dict, registry, deploy_bundles: dict
) -> None:
    from deploy.rollout import manual_rollback
    from deploy.tables import stations
    from edge.update_lock import lock, unlock
    from edge.update_state import load_state
    from edge.updater import startup_bundle

    b = deploy_bundles
    updater, events = _updater(tmp_path, keys, registry, b)
    updater.checkin_once()  # enrolment
    with registry.engine.connect() as conn:
        row = conn.execute(sa.select(stations)).one()
    assert (row.station_id, row.active_bundle_id) == ("st-1", b["v1"]["bundle_id"])

    _runtime_threshold(registry, updater)

    # a good update: downloaded, verified, golden-replayed, swapped; the rollout finishes
    _publish(registry, b["v11"])
    rid = _rollout(registry, b["v11"]["bundle_id"])
    time.sleep(0.2)  # the engine assigns the canary on its next tick
    updater.checkin_once()
    assert updater.slot.current().model.manifest.bundle_id == b["v11"]["bundle_id"]
    assert {"download_ms", "verify_ms", "golden_ms", "swap_ms", "total_ms"} <= set(updater.last_timings_ms)
    assert _rollout_state(registry, rid, {"done"})["state"] == "done"
    state = load_state(tmp_path / "state")
    assert (state.active.bundle_id, state.previous.bundle_id) == (b["v11"]["bundle_id"], b["v1"]["bundle_id"])
    assert startup_bundle(tmp_path / "state") == Path(state.active.path)  # a restart loads v1.1
    assert ("bundle_installed",) == tuple(k for k, _ in events if k.startswith("bundle_"))

    # golden samples that cannot be met: refused at the canary, reason recorded, nothing swapped
    _publish(registry, b["golden"])
    rid = _rollout(registry, b["golden"]["bundle_id"])
    time.sleep(0.2)
    updater.checkin_once()
    status = _rollout_state(registry, rid, {"aborted"})
    assert status["state"] == "aborted" and "[golden]" in status["reason"], status
    assert updater.slot.current().model.manifest.bundle_id == b["v11"]["bundle_id"]
    assert not (tmp_path / "state" / "staging" / b["golden"]["bundle_id"]).exists()

    # signed by another key (a registry that trusted it): the station refuses it before unpacking
    _publish(registry, b["wrongsig"], key=b["other_keys"])
    rid = _rollout(registry, b["wrongsig"]["bundle_id"])
    time.sleep(0.2)
    updater.checkin_once()
    status = _rollout_state(registry, rid, {"aborted"})
    assert status["state"] == "aborted" and "[signature]" in status["reason"], status
    assert not (tmp_path / "state" / "staging" / b["wrongsig"]["bundle_id"]).exists()

    # a lock defers the rollback; unlocking lets it through (no download: the previous bundle is kept)
    lock(tmp_path / "state", "lot 42")
    out = manual_rollback(registry.engine, "st-1", "test", "operator says so")
    assert [x["note"] for x in out] == ["rolling back"], out
    reply = updater.checkin_once()
    assert reply.bundle is not None and reply.bundle.bundle_id == b["v1"]["bundle_id"], reply
    assert updater.slot.current().model.manifest.bundle_id == b["v11"]["bundle_id"]
    unlock(tmp_path / "state")
    updater.checkin_once()
    assert updater.slot.current().model.manifest.bundle_id == b["v1"]["bundle_id"]
    assert "download_ms" not in updater.last_timings_ms
    _assert_audited(registry)
    updater.client.close()


def _runtime_threshold(registry, updater) -> None:
    """A runtime threshold: versioned, applied between frames, carried in results as threshold_version."""
    from deploy.fleet import set_policy

    version = set_policy(registry.engine, "class=ring", "test", None, 7.25, 3, "night shift")
    updater.checkin_once()
    state = updater.slot.current()
    assert (state.threshold, state.threshold_version, state.policy.map_every_n_ok) == (7.25, version, 3)


def _assert_audited(registry) -> None:
    from deploy.audit import read_audit

    with registry.engine.connect() as conn:
        actions = [r["action"] for r in read_audit(conn)]
    for action in (
        "enroll",
        "publish",
        "rollout_create",
        "update_installed",
        "update_failed",
        "rollout_abort",
        "lock",
        "update_deferred",
        "rollback",
        "update_rolled_back",
        "set_policy",
    ):
        assert action in actions, (action, actions)


def test_download_resumes_after_a_cut(tmp_path: Path, deploy_bundles: dict) -> None:
    from deploy.bundle_store import chunk_digests
    from edge.bundle_fetch import download_bundle
    from protocol.deploy_messages import BundleOffer

    tar = deploy_bundles["v11"]["tar"]
    data = tar.read_bytes()
    chunk = 256 * 1024
    digest, chunks = chunk_digests(tar, chunk)
    offer = BundleOffer(
        bundle_id="b" * 32,
        version="1.1.0",
        size_bytes=len(data),
        sha256=digest,
        chunk_bytes=chunk,
        chunk_sha256=tuple(chunks),
    )
    fetched: list[int] = []

    def fetch(i: int) -> bytes:
        fetched.append(i)
        return data[i * chunk : (i + 1) * chunk]

    downloads = tmp_path / "dl"
    downloads.mkdir()
    # a cut mid-chunk 3, after chunk 2 was written with a flipped byte
    part = bytearray(data[: 3 * chunk + 100])
    part[2 * chunk + 5] ^= 0xFF
    (downloads / f"{offer.bundle_id}.tar.part").write_bytes(bytes(part))
    path, resumed = download_bundle(offer, downloads, fetch)
    assert resumed == 2 and fetched[0] == 2  # chunks 0-1 kept, the bad chunk 2 fetched again
    assert path.read_bytes() == data

    bad = {"n": 0}

    def corrupt(i: int) -> bytes:
        bad["n"] += 1
        return b"x" * min(chunk, len(data) - i * chunk)

    from edge.bundle_fetch import DownloadError

    with pytest.raises(DownloadError, match="does not match its sha256"):
        download_bundle(msgspec.structs.replace(offer, bundle_id="c" * 32), downloads, corrupt)
    assert bad["n"] == 3  # three tries, then give up


def test_registry_survives_bad_messages(keys: dict, registry) -> None:
    import zmq

    from protocol.curve import load_keypair, load_public_key
    from protocol.deploy_messages import CheckIn, CheckInReply, ChunkRequest, station_accepts
    from protocol.frames import decode, encode
    from protocol.messages import ErrorReply

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    load_keypair(keys["station"]).apply_client(sock, load_public_key(keys["registry"] / "registry.key"))
    sock.connect(registry.endpoint)
    try:

        def ask(frames: list[bytes]) -> object:
            sock.send_multipart(frames)
            assert sock.poll(10_000), "the registry stopped answering"
            return decode(sock.recv_multipart(), station_accepts)[0]

        assert ask([b"\xc1garbage"]).code == "bad_message"
        assert ask([b"\x82\xa1v\x07\xa4type\xa7checkin"]).code == "unsupported_version"
        refused = ask(encode(ChunkRequest(station_id="st-1", bundle_id="f" * 32, index=0)))
        assert isinstance(refused, ErrorReply) and "unknown bundle" in refused.reason
        reply = ask(encode(CheckIn(station_id="st-1", epoch=1, ts=time.time())))
        assert isinstance(reply, CheckInReply)  # still serving
    finally:
        sock.close(0)
