"""Issue 13, bad input at the registry (`m3dm deploy serve`): the decoder's refusals, and life after a cut.

The collector's side is in test_attacks.py. Here a station with an allowed key sends the registry messages
under libzmq's MAXMSGSIZE but over the decoder's limits (a blob, the header, the frame count), and
malformed ones; each must be answered with a typed ErrorReply, and a check-in afterwards still answered.
Then a frame over MAXMSGSIZE: libzmq cuts that connection, and a new one is served as before.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
from reliability import servers
from reliability.figures import record

from protocol.curve import generate_keypair, load_keypair, load_public_key
from protocol.deploy_messages import CheckIn, CheckInReply
from protocol.frames import DEFAULT_LIMITS, decode, encode
from protocol.messages import ErrorReply

pytestmark = pytest.mark.integration


class Station:
    """A plain CURVE DEALER with the station's key: one request, one reply."""

    def __init__(self, ctx: zmq.Context, endpoint: str, keys: Path, server_key: Path) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        load_keypair(keys).apply_client(self.sock, load_public_key(server_key))
        self.sock.connect(endpoint)

    def ask(self, frames: list, timeout_s: float = 10.0) -> Any:
        self.sock.send_multipart(frames, copy=True)
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        return decode(self.sock.recv_multipart(), CheckInReply | ErrorReply)[0]

    def close(self) -> None:
        self.sock.close(0)


def _check_in(**changes: Any) -> CheckIn:
    return msgspec.structs.replace(CheckIn(station_id="st-1", epoch=1, ts=time.time()), **changes)


def test_registry_decoder_refuses_oversized_and_malformed_messages_and_keeps_serving(
    tmp_path: Path,
) -> None:
    from trainer.bundle import keygen

    keys = tmp_path / "keys"
    allow = keys / "allow"
    allow.mkdir(parents=True)
    registry_public, _ = generate_keypair(keys / "registry", "registry")
    station_public, _ = generate_keypair(keys / "st-1", "st-1")
    (allow / station_public.name).write_bytes(station_public.read_bytes())
    keygen(keys / "signing")
    hostile = {
        "blob over 8 MiB": encode(_check_in(), [b"\0" * (DEFAULT_LIMITS.max_blob_bytes + 1024)]),
        "header over 64 KiB": encode(_check_in(tags=("x" * (DEFAULT_LIMITS.max_header_bytes + 1024),))),
        "9 frames": [*encode(_check_in()), *([b"x"] * DEFAULT_LIMITS.max_frames)],
        "not msgpack": [b"\xc1\xff garbage"],
        "unknown version": [msgspec.msgpack.encode({"type": "checkin", "v": 99})],
        "unknown type": [msgspec.msgpack.encode({"type": "shell", "v": 1, "cmd": "rm -rf /"})],
        "check-in with a wrong field type": [
            msgspec.msgpack.encode({"type": "checkin", "v": 1, "station_id": 7, "epoch": "x", "ts": 0})
        ],
    }
    server = servers.registry(tmp_path, keys / "registry", allow, keys / "signing" / "bundle_signing.pub")
    ctx = zmq.Context()
    codes: dict[str, str] = {}
    try:
        station = Station(ctx, server.endpoint, keys / "st-1", registry_public)
        try:
            assert isinstance(station.ask(encode(_check_in())), CheckInReply)
            for name, frames in hostile.items():
                reply = station.ask(frames)
                codes[name] = reply.code if isinstance(reply, ErrorReply) else repr(reply)
            after_bad = station.ask(encode(_check_in()))
            # over MAXMSGSIZE: the registry's libzmq drops the connection, nothing reaches the decoder
            station.sock.send_multipart([b"\0" * (DEFAULT_LIMITS.max_total_bytes + 1024 * 1024)])
            cut_answer = station.sock.poll(2000)
        finally:
            station.close()
        fresh = Station(ctx, server.endpoint, keys / "st-1", registry_public)
        try:
            after_cut = fresh.ask(encode(_check_in()))
        finally:
            fresh.close()
        assert server.alive(), server.log.read_text()[-2000:]
    finally:
        ctx.term()
        server.stop()
    assert codes == {
        "blob over 8 MiB": "too_large",
        "header over 64 KiB": "too_large",
        "9 frames": "too_large",
        "not msgpack": "bad_message",
        "unknown version": "unsupported_version",
        "unknown type": "bad_message",
        "check-in with a wrong field type": "bad_message",
    }
    assert isinstance(after_bad, CheckInReply), "the registry must go on answering after refusals"
    assert not cut_answer, "a frame over MAXMSGSIZE must not be answered"
    assert isinstance(after_cut, CheckInReply), "a new connection is served after the cut one"
    assert "Traceback" not in server.log.read_text(errors="replace")
    record("registry_decoder_refusals", **codes, checkin_after_refusals="answered", after_cut="answered")
