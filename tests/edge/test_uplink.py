"""The uplink against a real CURVE ROUTER process (tests/reliability/ack_server.py): delivery and acks,
heartbeats, the in-flight window, dead letters for refused results, and an unknown key that loses nothing."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from reliability.harness import AckServer, Keys, make_keys

from edge.outbox import Outbox
from edge.uplink import Uplink, UplinkConfig
from protocol.frames import quantise_map

FAST = UplinkConfig(heartbeat_s=0.2, dead_after=5, ack_timeout_s=2.0)


def result(i: int) -> tuple[dict, list[bytes]]:
    nok = i % 5 == 0
    f = {
        "frame_id": f"f{i:05d}",
        "capture_ts": 1.0 + i,
        "decision_ts": 2.0 + i,
        "bundle_id": "b",
        "bundle_version": "1",
        "variant": "rgb+point+fusion",
        "decision": "NOK" if nok else "OK",
        "image_score": 3.0 if nok else 0.5,
        "threshold": 2.0,
    }
    blobs = []
    if nok:
        meta, payload = quantise_map(np.random.default_rng(i).random((32, 32), dtype=np.float32), frame=1)
        f["anomaly_map"] = meta
        blobs.append(payload)
    return f, blobs


def open_uplink(tmp_path: Path, keys: Keys, station_keys: Path, endpoint: str, config=FAST) -> Uplink:
    outbox = Outbox(tmp_path / "ob.db", "st-u")
    return Uplink.from_paths(outbox, endpoint, station_keys, keys.collector_public, config).start()


def close(uplink: Uplink) -> None:
    uplink.close()
    uplink.outbox.close()


@pytest.fixture()
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys")


def test_results_are_acked_deleted_and_heartbeats_reach_the_collector(tmp_path: Path, keys: Keys) -> None:
    station_keys = keys.station("st-u")
    with AckServer(tmp_path, keys) as server:
        uplink = open_uplink(tmp_path, keys, station_keys, server.endpoint)
        try:
            uplink.set_status(fps=7.5, bundle_id="b", bundle_version="1")
            keys_sent = [uplink.submit(*result(i)) for i in range(50)]
            assert [s for _, s in keys_sent] == list(range(1, 51))
            uplink.event("bundle_loaded", {"path": "x"})
            assert uplink.drain(timeout_s=20)
            time.sleep(0.5)  # at least one more heartbeat
            stats = uplink.stats()
        finally:
            close(uplink)
        rows = server.rows()
        beats = server.heartbeats()
        events = server.events()
    assert [(r[2], r[3]) for r in rows] == [(i + 1, f"f{i:05d}") for i in range(50)]
    assert sum(r[6] for r in rows) == 10, "every NOK arrived with its map frame"
    assert stats.acked == 50 and stats.outbox_depth == 0 and stats.in_flight == 0 and stats.resent == 0
    assert stats.connected and stats.last_ack_age_s is not None
    assert beats and beats[0][0] == "st-u" and beats[0][2] == 0
    assert [e[2] for e in events] == ["bundle_loaded"]


def test_window_bounds_what_is_in_flight_while_the_collector_is_frozen(tmp_path: Path, keys: Keys) -> None:
    station_keys = keys.station("st-u")
    config = UplinkConfig(window=8, heartbeat_s=0.2, dead_after=50, ack_timeout_s=30)
    with AckServer(tmp_path, keys) as server:
        uplink = open_uplink(tmp_path, keys, station_keys, server.endpoint, config)
        try:
            uplink.submit(*result(1))
            assert uplink.drain(timeout_s=20)
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                for i in range(2, 60):
                    uplink.submit(*result(i))
                time.sleep(0.5)
                frozen = uplink.stats()
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
            assert uplink.drain(timeout_s=20)
        finally:
            close(uplink)
        rows = server.rows()
    assert frozen.in_flight == 8 and frozen.outbox_depth == 58
    assert [r[2] for r in rows] == list(range(1, 60))


def test_a_result_refused_as_bad_message_is_dead_lettered_not_resent(tmp_path: Path, keys: Keys) -> None:
    station_keys = keys.station("st-u")
    with AckServer(tmp_path, keys, refuse_frame="f00005") as server:
        uplink = open_uplink(tmp_path, keys, station_keys, server.endpoint)
        try:
            for i in range(20):
                uplink.submit(*result(i))
            assert uplink.drain(timeout_s=20), "a refused result must not block the drain forever"
            stats = uplink.stats()
        finally:
            close(uplink)
        rows = server.rows()
    assert len(rows) == 19 and "f00005" not in {r[3] for r in rows}
    assert stats.dead_letters == 1 and stats.dropped == 1 and stats.errors_received >= 1


def test_unknown_key_delivers_nothing_and_loses_nothing_until_allowed(tmp_path: Path, keys: Keys) -> None:
    station_keys = keys.station("st-u", allowed=False)
    with AckServer(tmp_path, keys) as server:
        uplink = open_uplink(tmp_path, keys, station_keys, server.endpoint)
        try:
            for i in range(10):
                uplink.submit(*result(i))
            assert not uplink.drain(timeout_s=1.5)
            refused = uplink.stats()
            assert server.rows() == []
            # The operator adds the key: the same station process gets through on its next connection.
            (keys.allow_dir / "st-u.key").write_bytes((station_keys / "st-u.key").read_bytes())
            assert uplink.drain(timeout_s=20)
        finally:
            close(uplink)
        rows = server.rows()
    assert refused.outbox_depth == 10 and not refused.connected and refused.acked == 0
    assert [r[2] for r in rows] == list(range(1, 11))
