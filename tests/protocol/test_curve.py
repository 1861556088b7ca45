"""CURVE with the ZAP allow-list: unknown keys never get in; a key removed from the folder stops working for
new connections without restarting the server. Real sockets on 127.0.0.1."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import zmq

from protocol.curve import (
    AllowListAuthenticator,
    fingerprint,
    generate_keypair,
    load_keypair,
    load_public_key,
)
from protocol.frames import decode, encode
from protocol.messages import Heartbeat


@pytest.fixture()
def server(tmp_path: Path):
    """A CURVE ROUTER with an allow-list folder; yields (ctx, endpoint, server_public, allow_dir, router)."""
    generate_keypair(tmp_path / "srv", "collector")
    allow = tmp_path / "allow"
    allow.mkdir()
    ctx = zmq.Context()
    auth = AllowListAuthenticator(ctx, allow, poll_s=0.1).start()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    keys = load_keypair(tmp_path / "srv")
    keys.apply_server(router)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        yield ctx, f"tcp://127.0.0.1:{port}", keys.public, allow, router
    finally:
        router.close(linger=0)
        auth.stop()
        ctx.term()


def _client(ctx, tmp_path: Path, name: str, endpoint: str, server_public: bytes):
    keys = load_keypair(tmp_path / name) if (tmp_path / name).exists() else None
    if keys is None:
        generate_keypair(tmp_path / name, name)
        keys = load_keypair(tmp_path / name)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    keys.apply_client(sock, server_public)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    sock.connect(endpoint)
    return sock, monitor


def _handshake(monitor, timeout_s: float = 5.0) -> int:
    from zmq.utils.monitor import recv_monitor_message

    assert monitor.poll(int(timeout_s * 1000)), "no handshake outcome"
    return recv_monitor_message(monitor)["event"]


def _delivered(sock, router, ts: float) -> bool:
    try:
        sock.send_multipart(encode(Heartbeat(sender="c", epoch=1, ts=ts)), zmq.NOBLOCK)
    except zmq.Again:
        return False  # no authenticated connection to queue it on
    if not router.poll(500):
        return False
    return decode(router.recv_multipart()[1:], Heartbeat)[0].ts == ts


def test_unknown_key_is_refused_known_key_gets_in(server, tmp_path: Path) -> None:
    ctx, endpoint, server_public, allow, router = server
    generate_keypair(tmp_path / "good", "good")
    (allow / "good.key").write_bytes((tmp_path / "good" / "good.key").read_bytes())
    time.sleep(0.3)  # the watcher re-reads the folder

    stranger, s_mon = _client(ctx, tmp_path, "stranger", endpoint, server_public)
    good, g_mon = _client(ctx, tmp_path, "good", endpoint, server_public)
    try:
        assert _handshake(s_mon) == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        assert _handshake(g_mon) == zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert not _delivered(stranger, router, 1.0), "a message from an unknown key must never arrive"
        assert _delivered(good, router, 2.0)
    finally:
        for sock in (stranger, s_mon, good, g_mon):
            sock.close(linger=0)


def test_a_revoked_key_stops_new_connections_without_restart(server, tmp_path: Path) -> None:
    ctx, endpoint, server_public, allow, router = server
    generate_keypair(tmp_path / "st", "st")
    (allow / "st.key").write_bytes((tmp_path / "st" / "st.key").read_bytes())
    time.sleep(0.3)
    first, f_mon = _client(ctx, tmp_path, "st", endpoint, server_public)
    try:
        assert _handshake(f_mon) == zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert _delivered(first, router, 1.0)
    finally:
        first.close(linger=0)
        f_mon.close(linger=0)

    (allow / "st.key").unlink()  # revoke: the same server process, no restart
    time.sleep(0.5)  # > the watcher's poll interval (0.1 s)
    again, a_mon = _client(ctx, tmp_path, "st", endpoint, server_public)
    try:
        assert _handshake(a_mon) == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        assert not _delivered(again, router, 2.0)
    finally:
        again.close(linger=0)
        a_mon.close(linger=0)


def test_fingerprint_is_stable_and_short(tmp_path: Path) -> None:
    public, _ = generate_keypair(tmp_path, "x")
    key = load_public_key(public)
    assert fingerprint(key) == fingerprint(load_public_key(tmp_path)) and len(fingerprint(key)) == 16
    with pytest.raises(FileExistsError, match="refusing to overwrite a secret key"):
        generate_keypair(tmp_path, "x")  # never overwrite a secret key
