"""Attacks, end to end: nothing untrusted gets in.

Bundles: a tampered, expired, downgraded, wrongly-signed or unsigned bundle never loads through the
station's loader (`edge.station_model.open_bundle`, directory and tar), and the station command exits
non-zero without scoring a frame. A path-traversal tar is refused before anything is written outside.
The unit-level checks of each verification step live in tests/edge/test_bundle.py; these drive the real
fleet bundle (tests/conftest.py `fleet_bundle`) through the paths a station takes.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
import time
import zlib
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
from reliability import servers
from reliability.figures import record
from reliability.servers import Server
from zmq.utils.monitor import recv_monitor_message

from edge.bundle import safe_extract
from edge.station_model import open_bundle
from protocol.curve import generate_keypair, load_keypair, load_public_key
from protocol.errors import (
    ArchiveError,
    BundleError,
    ExpiredError,
    HashMismatchError,
    RollbackError,
    SignatureError,
)
from protocol.frames import DEFAULT_LIMITS, decode, encode
from protocol.manifest import MANIFEST_NAME, SIGNATURE_NAME, canonical_json, manifest_from_json
from protocol.messages import Ack, Blob, ErrorReply, Heartbeat, InspectionResult, MapMeta
from trainer.bundle import _load_private_key, keygen

M3DM = servers.M3DM


def _copy(fleet_bundle: dict, dest: Path) -> Path:
    return Path(shutil.copytree(fleet_bundle["bundle"], dest))


def _resign(bundle_dir: Path, key_dir: Path, **changes: object) -> None:
    """Rewrite manifest.json with `changes` and sign it with the key in `key_dir` (a real signer's act)."""
    manifest = manifest_from_json((bundle_dir / MANIFEST_NAME).read_bytes())
    data = canonical_json(msgspec.structs.replace(manifest, **changes))
    (bundle_dir / MANIFEST_NAME).write_bytes(data)
    (bundle_dir / SIGNATURE_NAME).write_bytes(_load_private_key(key_dir).sign(data))


def _tar(bundle_dir: Path, extra: list[tuple[str, bytes]] = ()) -> Path:
    """The bundle as a transport tar (like `m3dm bundle build` writes), plus any `extra` members."""
    tar_path = bundle_dir.with_name(bundle_dir.name + ".tar")
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as archive:
        for path in sorted(p for p in bundle_dir.rglob("*") if p.is_file()):
            archive.add(path, arcname=path.relative_to(bundle_dir).as_posix())
        for name, data in extra:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return tar_path


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def hostile(fleet_bundle: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Bad variants of the fleet bundle: (dir, the error open_bundle must raise, station minimum counter)."""
    root = tmp_path_factory.mktemp("hostile")
    keys = fleet_bundle["keys"]
    keygen(root / "attacker_keys")
    variants: dict[str, tuple[Path, type[BundleError], int | None]] = {}

    bank = _copy(fleet_bundle, root / "tampered_bank")
    _flip_byte(next(p for p in sorted((bank / "banks").iterdir()) if p.is_file()))
    variants["tampered_bank"] = (bank, HashMismatchError, None)

    graph = _copy(fleet_bundle, root / "tampered_onnx")
    _flip_byte(next(p for p in sorted((graph / "onnx").iterdir()) if p.suffix == ".onnx"))
    variants["tampered_onnx"] = (graph, HashMismatchError, None)

    threshold = _copy(fleet_bundle, root / "tampered_threshold")
    raw = json.loads((threshold / MANIFEST_NAME).read_bytes())
    raw["thresholds"]["image_threshold"] = 1e6  # nothing would ever be NOK again
    (threshold / MANIFEST_NAME).write_bytes(json.dumps(raw, sort_keys=True, separators=(",", ":")).encode())
    variants["tampered_threshold"] = (threshold, SignatureError, None)

    expired = _copy(fleet_bundle, root / "expired")
    _resign(expired, keys, created_utc="2020-01-01T00:00:00Z", expires_utc="2021-01-01T00:00:00Z")
    variants["expired"] = (expired, ExpiredError, None)

    downgraded = _copy(fleet_bundle, root / "downgraded")
    _resign(downgraded, keys, anti_rollback_counter=0)
    variants["downgraded"] = (downgraded, RollbackError, 1)  # the station already ran counter 1

    wrong = _copy(fleet_bundle, root / "wrongly_signed")
    _resign(wrong, root / "attacker_keys", version="9.9.9")
    variants["wrongly_signed"] = (wrong, SignatureError, None)

    unsigned = _copy(fleet_bundle, root / "unsigned")
    (unsigned / SIGNATURE_NAME).unlink()
    variants["unsigned"] = (unsigned, SignatureError, None)

    planted = _copy(fleet_bundle, root / "planted_file")
    (planted / "onnx" / "extra.onnx").write_bytes(b"\x08\x07not listed in the manifest")
    variants["planted_file"] = (planted, HashMismatchError, None)
    return {"variants": variants, "trusted_key": keys / "bundle_signing.pub"}


# What each refusal must say: the right check, and why (a refusal for the wrong reason is a bug too).
REFUSAL = {
    "tampered_bank": r"^\[hashes\] banks/.*: sha256 .* != manifest",
    "tampered_onnx": r"^\[hashes\] onnx/.*\.onnx: sha256 .* != manifest",
    "tampered_threshold": r"^\[signature\] .*signature does not match manifest\.json",
    "expired": r"^\[expiry\] expired at 2021-01-01T00:00:00Z",
    "downgraded": r"^\[rollback\] anti_rollback_counter 0 < station minimum 1",
    "wrongly_signed": r"^\[signature\] .*signature does not match manifest\.json",
    "unsigned": r"^\[signature\] .*manifest\.sig is missing",
    "planted_file": r"^\[hashes\] onnx/extra\.onnx: file is not listed in the manifest",
}

VARIANTS = [
    "tampered_bank",
    "tampered_onnx",
    "tampered_threshold",
    "expired",
    "downgraded",
    "wrongly_signed",
    "unsigned",
    "planted_file",
]


def test_the_untouched_bundle_loads(fleet_bundle: dict) -> None:
    """Control: the same loader, key and minimum accept the real bundle, so the refusals mean something."""
    model = open_bundle(fleet_bundle["bundle"], fleet_bundle["keys"], backend="ort", min_counter=1)
    assert model.manifest.bundle_id == fleet_bundle["bundle_id"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("form", ["dir", "tar"])
def test_hostile_bundle_never_loads(hostile: dict, variant: str, form: str) -> None:
    bundle_dir, error, min_counter = hostile["variants"][variant]
    target = bundle_dir if form == "dir" else _tar(bundle_dir)
    with pytest.raises(error, match=REFUSAL[variant]):
        open_bundle(target, hostile["trusted_key"], backend="ort", min_counter=min_counter)


@pytest.mark.integration
@pytest.mark.parametrize("variant", ["tampered_bank", "tampered_threshold", "expired", "wrongly_signed"])
def test_station_command_exits_nonzero_without_scoring(
    hostile: dict, fleet_bundle: dict, variant: str, tmp_path: Path
) -> None:
    bundle_dir, error, _ = hostile["variants"][variant]
    scans = fleet_bundle["data"] / fleet_bundle["class_name"]
    cmd = [*M3DM, "edge", "run", "--bundle", str(bundle_dir), "--key", str(hostile["trusted_key"])]
    cmd += ["--station-id", "victim", "--source", f"folder:{scans}", "--once", "--sink", "stdout:"]
    cmd += ["--outbox", str(tmp_path / "outbox.sqlite"), "--backend", "ort"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=servers.env())
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"station not started: [{error.check}]" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not [line for line in done.stdout.splitlines() if line.startswith("{")], "a frame was scored"


@pytest.mark.parametrize(
    "name",
    ["../evil.onnx", "onnx/../../evil.onnx", "/tmp/m3dm-evil.onnx"],
)
def test_path_traversal_tar_is_refused_and_writes_nothing_outside(
    fleet_bundle: dict, tmp_path: Path, name: str
) -> None:
    bundle = _copy(fleet_bundle, tmp_path / "src" / "bundle")
    tar_path = _tar(bundle, [(name, b"payload that must never land")])
    dest = tmp_path / "extract" / "dest"
    with pytest.raises(ArchiveError, match="escape"):
        safe_extract(tar_path, dest)
    assert not dest.exists() and list((tmp_path / "extract").iterdir()) == []
    assert not (tmp_path / "extract" / "evil.onnx").exists() and not (tmp_path / "evil.onnx").exists()
    assert not Path("/tmp/m3dm-evil.onnx").exists()
    with pytest.raises(ArchiveError, match="would escape the destination"):  # the station loader: same path
        open_bundle(tar_path, fleet_bundle["keys"], backend="ort")


# ------------------------------------------------------------------------------------------------ CURVE
#
# The collector (`m3dm collector serve`) and the registry (`m3dm deploy serve`) run as real processes; the
# peers below are raw CURVE DEALER sockets, so each check watches the handshake itself (socket monitor)
# and what the server answers, not a client library's interpretation of it.


class Peer:
    """A CURVE DEALER with a socket monitor: what a station (or an attacker with a key) would open."""

    def __init__(self, ctx: zmq.Context, endpoint: str, keys_dir: Path, server_public: bytes) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        load_keypair(keys_dir).apply_client(self.sock, server_public)
        self.monitor = self.sock.get_monitor_socket()
        self.sock.connect(endpoint)

    def handshake(self, timeout_s: float = 5.0) -> str:
        """ "ok", "refused" (the server's ZAP said no) or "none" (nothing happened in time)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.monitor.poll(100):
                event = recv_monitor_message(self.monitor)["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    return "ok"
                if event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                    return "refused"
        return "none"

    def disconnected(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (
                self.monitor.poll(100)
                and recv_monitor_message(self.monitor)["event"] == zmq.EVENT_DISCONNECTED
            ):
                return True
        return False

    def send(self, frames: list) -> None:
        self.sock.send_multipart(frames, copy=True)

    def replies(self, timeout_s: float, until: Any = None) -> list[Any]:
        """Every decoded reply within `timeout_s` (stops early once `until(reply)` is true)."""
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.sock.poll(50):
                message, _ = decode(self.sock.recv_multipart(), Ack | ErrorReply | Heartbeat)
                out.append(message)
                if until is not None and until(message):
                    break
        return out

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)


def _result(station: str, seq: int, epoch: int = 1) -> InspectionResult:
    now = time.time()
    return InspectionResult(
        station_id=station,
        epoch=epoch,
        seq=seq,
        frame_id=f"{station}-{seq}",
        capture_ts=now,
        decision_ts=now,
        bundle_id="0" * 32,
        bundle_version="1.0.0",
        variant="rgb+point+fusion",
        decision="OK",
        image_score=0.1,
        threshold=1.0,
    )


def _with_map(result: InspectionResult, height: int, width: int, offset: float, scale: float) -> list:
    """`result` with an anomaly map whose header says height x width but whose payload is 4 valid codes."""
    payload = zlib.compress(bytes([0, 64, 128, 255]))
    meta = MapMeta(height, width, offset, scale, Blob(frame=1, codec="u8-zlib", size_bytes=len(payload)))
    return encode(msgspec.structs.replace(result, decision="NOK", anomaly_map=meta), [payload])


def _acked(seq: int) -> Any:
    return lambda m: isinstance(m, Ack) and (m.upto_seq >= seq or seq in m.seqs)


@pytest.fixture
def curve_keys(tmp_path: Path) -> dict[str, Path]:
    """Server keypairs (collector, registry), stations 'known' (allowed) and 'stranger' (never allowed)."""
    keys = tmp_path / "keys"
    allow = keys / "allow"
    allow.mkdir(parents=True)
    generate_keypair(keys / "collector", "collector")
    generate_keypair(keys / "registry", "registry")
    known, _ = generate_keypair(keys / "known", "known")
    shutil.copy(known, allow / known.name)
    generate_keypair(keys / "stranger", "stranger")
    keygen(keys / "signing")
    return {name: keys / name for name in ("collector", "registry", "known", "stranger", "allow", "signing")}


def _collector(tmp_path: Path, keys: dict[str, Path]) -> Server:
    return servers.collector(tmp_path, keys["collector"], keys["allow"])


def _registry(tmp_path: Path, keys: dict[str, Path]) -> Server:
    return servers.registry(tmp_path, keys["registry"], keys["allow"], keys["signing"] / "bundle_signing.pub")


SERVERS = {"collector": _collector, "registry": _registry}


@pytest.mark.integration
@pytest.mark.parametrize("role", sorted(SERVERS))
def test_unknown_key_is_refused_and_revocation_needs_no_restart(
    role: str, tmp_path: Path, curve_keys: dict[str, Path]
) -> None:
    server = SERVERS[role](tmp_path, curve_keys)
    ctx = zmq.Context()
    peers: list[Peer] = []
    try:
        server_public = load_public_key(curve_keys[role])

        def peer(name: str) -> Peer:
            peers.append(Peer(ctx, server.endpoint, curve_keys[name], server_public))
            return peers[-1]

        assert peer("stranger").handshake() == "refused", f"{role} let an unknown key in"
        assert peer("known").handshake() == "ok", f"{role} refused an allowed key"
        for revoked in curve_keys["allow"].glob("known*.key"):
            revoked.unlink()
        revoked_at = time.monotonic()
        deadline = revoked_at + 10
        outcome = "ok"
        while outcome == "ok" and time.monotonic() < deadline:  # the folder is polled, not watched
            time.sleep(0.3)
            outcome = peer("known").handshake()
        assert outcome == "refused", f"{role} still accepts a revoked key"
        assert server.alive(), f"{role} died: {server.log.read_text()[-2000:]}"
        record(
            f"curve_{role}",
            unknown_key="refused",
            revoked_refused_after_s=round(time.monotonic() - revoked_at, 1),
        )
    finally:
        for p in peers:
            p.close()
        ctx.term()
        server.stop()


@pytest.mark.integration
def test_collector_stops_taking_results_from_a_revoked_key_on_an_open_connection(
    tmp_path: Path, curve_keys: dict[str, Path]
) -> None:
    server = _collector(tmp_path, curve_keys)
    ctx = zmq.Context()
    peers: list[Peer] = []
    try:
        public = load_public_key(curve_keys["collector"])
        station = Peer(ctx, server.endpoint, curve_keys["known"], public)
        peers.append(station)
        assert station.handshake() == "ok"
        station.send(encode(_result("known", 1)))
        assert any(_acked(1)(m) for m in station.replies(10, until=_acked(1))), "control result not acked"
        for revoked in curve_keys["allow"].glob("known*.key"):
            revoked.unlink()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # revoked once a new connection with that key is refused
            probe = Peer(ctx, server.endpoint, curve_keys["known"], public)
            peers.append(probe)
            if probe.handshake() == "refused":
                break
            time.sleep(0.3)
        time.sleep(0.5)  # the ingest loop re-reads the allow-list at most every 0.2 s
        station.send(encode(_result("known", 2)))  # the same, already authenticated connection
        replies = station.replies(5, until=lambda m: isinstance(m, ErrorReply))
        assert [m.code for m in replies if isinstance(m, ErrorReply)] == ["not_allowed"]
        assert not any(_acked(2)(m) for m in replies)
        assert server.alive()
    finally:
        for p in peers:
            p.close()
        ctx.term()
        server.stop()
    assert servers.stored_identities(tmp_path) == {("known", 1, 1)}


@pytest.mark.integration
def test_registry_stops_answering_a_revoked_key_on_an_open_connection(
    tmp_path: Path, curve_keys: dict[str, Path]
) -> None:
    from protocol.deploy_messages import CheckIn, CheckInReply

    server = _registry(tmp_path, curve_keys)
    ctx = zmq.Context()
    station = None
    try:
        station = Peer(ctx, server.endpoint, curve_keys["known"], load_public_key(curve_keys["registry"]))
        assert station.handshake() == "ok"

        def check_in() -> Any:
            station.send(encode(CheckIn(station_id="known", epoch=1, ts=time.time())))
            if not station.sock.poll(10_000):
                return None
            return decode(station.sock.recv_multipart(), CheckInReply | ErrorReply)[0]

        assert isinstance(check_in(), CheckInReply)
        for revoked in curve_keys["allow"].glob("known*.key"):
            revoked.unlink()
        time.sleep(1.5)  # the allow-list watcher polls the folder every 0.5 s
        reply = check_in()  # the same, already authenticated connection
        assert isinstance(reply, ErrorReply) and reply.code == "not_allowed", reply
        assert server.alive()
    finally:
        if station is not None:
            station.close()
        ctx.term()
        server.stop()


@pytest.mark.integration
@pytest.mark.parametrize("role", sorted(SERVERS))
def test_a_frame_over_maxmsgsize_is_dropped_at_the_socket(
    role: str, tmp_path: Path, curve_keys: dict[str, Path]
) -> None:
    """17 MiB in one frame: libzmq on the server cuts the connection before buffering it (MAXMSGSIZE)."""
    server = SERVERS[role](tmp_path, curve_keys)
    ctx = zmq.Context()
    peer = None
    try:
        peer = Peer(ctx, server.endpoint, curve_keys["known"], load_public_key(curve_keys[role]))
        assert peer.handshake() == "ok"
        header = encode(_result("known", 1))[0]
        peer.send([header, b"\0" * (DEFAULT_LIMITS.max_total_bytes + 1024 * 1024)])
        assert peer.disconnected(10), f"{role} kept a connection that sent an oversized frame"
        assert server.alive(), f"{role} died: {server.log.read_text()[-2000:]}"
        if role == "collector":  # and it goes on serving: the reconnected peer's next result is stored
            assert peer.handshake() == "ok"
            peer.send(encode(_result("known", 1)))
            assert any(_acked(1)(m) for m in peer.replies(10, until=_acked(1)))
    finally:
        if peer is not None:
            peer.close()
        ctx.term()
        server.stop()
    if role == "collector":
        assert servers.stored_identities(tmp_path) == {("known", 1, 1)}


@pytest.mark.integration
def test_collector_decoder_refuses_oversized_and_malformed_messages_and_keeps_serving(
    tmp_path: Path, curve_keys: dict[str, Path]
) -> None:
    """Under MAXMSGSIZE but over the decoder's limits (blob, header, frame count), or not a message."""
    server = _collector(tmp_path, curve_keys)
    ctx = zmq.Context()
    peer = None
    big_header = msgspec.structs.replace(_result("known", 2), labels={"junk": "x" * (70 * 1024)})
    blob = Blob(frame=1, codec="jpeg", size_bytes=9 * 1024 * 1024)
    hostile = {
        "blob over 8 MiB": encode(
            msgspec.structs.replace(_result("known", 3), thumbnail=blob), [b"\0" * blob.size_bytes]
        ),
        "header over 64 KiB": encode(big_header),
        "9 frames": [*encode(_result("known", 4)), *([b"x"] * 8)],
        "not msgpack": [b"\xc1\xff garbage"],
        "unknown version": [msgspec.msgpack.encode({"type": "result", "v": 99})],
        "unknown type": [msgspec.msgpack.encode({"type": "shell", "v": 1, "cmd": "rm -rf /"})],
        "blob reference to a missing frame": encode(
            msgspec.structs.replace(_result("known", 5), thumbnail=Blob(frame=1, codec="jpeg", size_bytes=4))
        ),
        "map of -2 x -2 pixels": _with_map(_result("known", 6), -2, -2, 0.0, 1.0),
        "map with a NaN scale": _with_map(_result("known", 7), 2, 2, 0.0, float("nan")),
    }
    codes = {}
    try:
        peer = Peer(ctx, server.endpoint, curve_keys["known"], load_public_key(curve_keys["collector"]))
        assert peer.handshake() == "ok"
        for name, frames in hostile.items():
            peer.send(frames)
            replies = peer.replies(5, until=lambda m: isinstance(m, ErrorReply))
            codes[name] = [m.code for m in replies if isinstance(m, ErrorReply)]
        peer.send(encode(_result("known", 1)))
        acked = any(_acked(1)(m) for m in peer.replies(10, until=_acked(1)))
        assert server.alive()
    finally:
        if peer is not None:
            peer.close()
        ctx.term()
        server.stop()
    assert codes == {
        "blob over 8 MiB": ["too_large"],
        "header over 64 KiB": ["too_large"],
        "9 frames": ["too_large"],
        "not msgpack": ["bad_message"],
        "unknown version": ["unsupported_version"],
        "unknown type": ["bad_message"],
        "blob reference to a missing frame": ["bad_message"],
        "map of -2 x -2 pixels": ["bad_message"],
        "map with a NaN scale": ["bad_message"],
    }
    assert acked, "the collector must go on acking good results after refusing bad ones"
    assert servers.stored_identities(tmp_path) == {("known", 1, 1)}
    record("collector_decoder_refusals", **{name: c[0] for name, c in codes.items()}, stored_after=1)
