"""protocol/curve.py without sockets: key files, the allow folder and the authenticator's watcher.

test_curve.py proves the handshakes on real sockets; these pin what it does not reach (file modes, lookup
errors, unreadable allow-list entries, the watcher's reload-on-change and its log lines) in a second or so.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth

from protocol.curve import (
    AllowListAuthenticator,
    generate_keypair,
    load_keypair,
    load_public_key,
    read_allow_folder,
)


def test_a_keypair_goes_into_a_new_nested_folder_with_a_private_secret(tmp_path: Path) -> None:
    public, secret = generate_keypair(tmp_path / "a" / "b", "station-1")
    assert (public, secret) == (tmp_path / "a/b/station-1.key", tmp_path / "a/b/station-1.key_secret")
    assert secret.stat().st_mode & 0o777 == 0o600
    keys = load_keypair(secret)  # a file path, not only a folder
    assert keys.public == load_public_key(public) and len(keys.secret) == 40
    assert load_keypair(tmp_path / "a" / "b").secret == keys.secret


def test_a_folder_must_hold_exactly_one_key_of_the_kind_asked_for(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r": expected exactly one \*\.key_secret file, found 0"):
        load_keypair(tmp_path)
    generate_keypair(tmp_path, "one")
    generate_keypair(tmp_path, "two")
    with pytest.raises(FileNotFoundError, match=rf"^{tmp_path}: expected exactly one \*\.key file, found 2$"):
        load_public_key(tmp_path)


def test_a_public_key_file_is_not_a_keypair(tmp_path: Path) -> None:
    public, _ = generate_keypair(tmp_path, "x")
    with pytest.raises(ValueError, match=rf"^{public} holds no secret key$"):
        load_keypair(public)


def test_the_allow_folder_skips_unreadable_and_foreign_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys_dir, allow = tmp_path / "keys", tmp_path / "allow"
    allow.mkdir()
    expected = set()
    for name in ("b-station", "c-station"):
        public, _ = generate_keypair(keys_dir, name)
        (allow / f"{name}.key").write_bytes(public.read_bytes())
        expected.add(load_public_key(public))
    (allow / "a-broken.key").write_bytes(b"\xff\xfe not a certificate")  # sorts first: the loop must go on
    (allow / "d-notes.txt").write_text("not a key")
    with caplog.at_level(logging.WARNING, logger="m3dm.curve"):
        assert read_allow_folder(allow) == expected
    with pytest.raises(ValueError, match=".") as err:  # what pyzmq says about the broken file
        zmq.auth.load_certificate(str(allow / "a-broken.key"))
    [record] = caplog.records
    assert record.getMessage() == f"allow-list: skipping unreadable key {allow / 'a-broken.key'}: {err.value}"


def test_the_authenticator_reloads_only_when_the_folder_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    allow = tmp_path / "allow"
    allow.mkdir()
    public, _ = generate_keypair(tmp_path / "keys", "s1")
    (allow / "s1.key").write_bytes(public.read_bytes())
    ctx = zmq.Context()
    auth = AllowListAuthenticator(ctx, allow, poll_s=0.05)
    assert auth.allowed() == set() and AllowListAuthenticator(ctx, allow).poll_s == 0.5
    assert auth._auth.log is logging.getLogger("m3dm.zap")  # ZAP denials land in our logs
    try:
        with caplog.at_level(logging.INFO, logger="m3dm.curve"):
            auth.start()
            [watcher] = [t for t in threading.enumerate() if t.name == "allow-list"]
            assert watcher.daemon  # a stuck watcher never holds the process open
            time.sleep(0.3)  # six polls of an unchanged folder
            loads = [r.getMessage() for r in caplog.records if r.name == "m3dm.curve"]
            assert loads == [f"allow-list {allow}: 1 station key(s)"]
            allowed = auth.allowed()
            assert allowed == {load_public_key(public)}
            allowed.clear()  # a copy: the caller cannot change the authenticator's set
            assert auth.allowed() == {load_public_key(public)}
            (allow / "s1.key").unlink()
            deadline = time.monotonic() + 3
            while auth.allowed() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert auth.allowed() == set()
            assert [r.getMessage() for r in caplog.records][-1] == f"allow-list {allow}: 0 station key(s)"
    finally:
        auth.stop()
        ctx.term()
    assert not watcher.is_alive()
