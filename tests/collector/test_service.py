"""`m3dm collector serve` as a real process behind CURVE: acks after commit, allow-list, bad input, HTTP."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from collector_procs import M3DM, Client, Collector, make_keys
from conftest import make_message

from collector.store import Store
from protocol.frames import encode
from protocol.messages import Ack, Blob, ErrorReply, Heartbeat, StationEvent

STATIONS = ["good", "stranger", "revoked", "noisy"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    work = tmp_path_factory.mktemp("collector-serve")
    keys = make_keys(work / "keys", STATIONS, allowed=["good", "revoked", "noisy"])
    db_url = f"sqlite:///{work / 'fleet.db'}"
    collector = Collector(work, db_url, keys).start()
    clients: list[Client] = []

    def client(name: str) -> Client:
        c = Client(collector.endpoint, keys[name], keys["collector"])
        clients.append(c)
        return c

    try:
        yield {"collector": collector, "keys": keys, "db": db_url, "client": client, "work": work}
    finally:
        for c in clients:
            c.close()
        collector.stop()


def _cli(*args: str):
    """The collector's Typer app in this process (same code as the `m3dm collector` command)."""
    from typer.testing import CliRunner

    from collector.cli import app

    return CliRunner().invoke(app, list(args))


def _get(served: dict, path: str) -> bytes:
    with urllib.request.urlopen(served["collector"].http + path, timeout=5) as response:
        return response.read()


def _metrics(served: dict) -> str:
    return _get(served, "/metrics").decode()


def _get_json(served: dict, path: str):
    return json.loads(_get(served, path))


def test_allowed_station_gets_acks_only_for_stored_results(served: dict) -> None:
    c = served["client"]("good")
    for seq in (1, 2, 3, 5):
        c.send(*make_message(seq, station="good", decision="NOK" if seq == 2 else "OK", with_map=seq == 2))
    event = StationEvent(station_id="good", epoch=1, event_id="f" * 32, ts=time.time(), kind="bundle_loaded")
    c.send(event)
    c.send(Heartbeat(sender="good", epoch=1, ts=time.time(), fps=9.0, bundle_version="1.0.0"))
    replies = c.recv_until(lambda r: isinstance(r, Ack) and r.event_ids == ("f" * 32,))
    acks = [r for r in replies if isinstance(r, Ack)]
    assert any(isinstance(r, Heartbeat) and r.sender == "collector" for r in replies)
    assert max(a.upto_seq for a in acks) == 3  # 4 is missing: 5 is acked on its own, not cumulatively
    assert 5 in {s for a in acks for s in a.seqs}
    # an ack means committed: the rows are in the database the moment the ack arrives
    store = Store.open(served["db"])
    assert store.identities("good") == [("good", 1, s) for s in (1, 2, 3, 5)]
    (nok,) = store.recent_nok(station="good")
    assert store.blob(nok["map_key"])[0] == "image/png"
    # the missing seq arrives: the cumulative ack jumps over the out-of-order one; a resend is acked again
    c.send(*make_message(4, station="good"))
    c.recv_until(lambda r: isinstance(r, Ack) and r.upto_seq == 5)
    c.send(*make_message(2, station="good"))
    c.recv_until(lambda r: isinstance(r, Ack) and r.upto_seq == 5 and r.seqs == ())
    assert store.count(station="good") == 5
    store.close()


def test_unknown_key_gets_nothing(served: dict) -> None:
    c = served["client"]("stranger")
    c.send(*make_message(1, station="stranger"))
    assert c.recv(timeout_s=1.5) is None
    assert Store.open(served["db"]).count(station="stranger") == 0


def _bad(client: Client, frames: list, code: str) -> ErrorReply:
    client.send_frames(frames)
    (reply,) = [
        r for r in client.recv_until(lambda r: isinstance(r, ErrorReply)) if isinstance(r, ErrorReply)
    ]
    assert reply.code == code, reply
    return reply


def test_bad_messages_are_refused_counted_and_the_service_keeps_serving(served: dict) -> None:
    c = served["client"]("noisy")
    msg, blobs = make_message(1, station="noisy", with_map=True)
    _bad(c, [b"\xc1not msgpack"], "bad_message")
    _bad(c, [msgspec.msgpack.encode({"type": "result", "v": 99})], "unsupported_version")
    _bad(c, encode(Ack(epoch=1, upto_seq=1)), "bad_message")  # a collector does not take acks
    _bad(c, [encode(msg)[0]], "bad_message")  # the map's frame is missing
    corrupt = msgspec.structs.replace(msg.anomaly_map, blob=Blob(frame=1, codec="u8-zlib", size_bytes=5))
    _bad(c, encode(msgspec.structs.replace(msg, anomaly_map=corrupt), [b"12345"]), "bad_message")
    big = b"\0" * (9 * 1024 * 1024)  # above the 8 MiB blob limit, below the socket's 16 MiB cap
    big_map = msgspec.structs.replace(
        msg.anomaly_map, blob=Blob(frame=1, codec="u8-zlib", size_bytes=len(big))
    )
    _bad(c, encode(msgspec.structs.replace(msg, anomaly_map=big_map), [big]), "too_large")
    # above MAXMSGSIZE: libzmq drops the connection before the message exists; no reply is possible
    huge = served["client"]("noisy")
    huge.send_frames([encode(msg)[0], b"\0" * (17 * 1024 * 1024)])
    assert huge.recv(timeout_s=1.0) is None
    # still serving, to the same peer as to others
    c.send(msg, blobs)
    c.recv_until(lambda r: isinstance(r, Ack) and r.upto_seq == 1)
    text = _metrics(served)
    assert 'm3dm_collector_rejected_total{reason="bad_message"} 4.0' in text
    assert 'm3dm_collector_rejected_total{reason="unsupported_version"} 1.0' in text
    assert 'm3dm_collector_rejected_total{reason="too_large"} 1.0' in text
    assert served["collector"].proc.poll() is None


def _ensure_good_results(c: Client) -> None:
    """good's five results, 4 arriving last, whether or not the ack test stored them first (resends of
    stored rows are acknowledged and not stored again), so this test passes alone and in any order."""
    for seq in (1, 2, 3, 5):
        c.send(*make_message(seq, station="good", decision="NOK" if seq == 2 else "OK", with_map=seq == 2))
    c.recv_until(lambda r: isinstance(r, Ack) and r.upto_seq >= 3)
    c.send(*make_message(4, station="good"))
    c.recv_until(lambda r: isinstance(r, Ack) and r.upto_seq == 5)


def test_http_api_and_query_cli(served: dict) -> None:
    c = served["client"]("good")
    _ensure_good_results(c)
    c.send(Heartbeat(sender="good", epoch=1, ts=time.time(), fps=9.0, bundle_version="1.0.0"))
    c.recv_until(lambda r: isinstance(r, Heartbeat))
    stations = {s["station_id"]: s for s in _get_json(served, "/api/stations")}
    assert stations["good"]["online"] and stations["good"]["fps"] == 9.0
    rows = _get_json(served, "/api/results?station=good&since=1h&limit=3")
    assert rows[0]["seq"] == 4 and len(rows) == 3  # newest first: 4 arrived last
    stats = _get_json(served, "/api/stats?station=good")
    assert stats["stations"][0]["count"] == 5
    assert "m3dm_collector_stations_online" in _metrics(served)
    # no --bundles: no reference, so no stream can be in alarm (states appear once upkeep evaluated them)
    assert all(d["state"] == "unknown" for d in _get_json(served, "/api/drift"))
    with pytest.raises(urllib.error.HTTPError, match="HTTP Error 400") as err:
        _get(served, "/api/results?limit=zero")
    err.value.close()
    assert err.value.code == 400
    out = subprocess.run(
        [
            M3DM,
            "collector",
            "query",
            "--db",
            served["db"],
            "--station",
            "good",
            "--decision",
            "NOK",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    (row,) = json.loads(out.stdout)
    assert (row["station_id"], row["epoch"], row["seq"], row["decision"]) == ("good", 1, 2, "NOK")
    for field in ("frame_id", "image_score", "bank_scores", "bundle_version", "error_reason", "error_file"):
        assert field in row
    out = _cli("stats", "--db", served["db"], "--since", "1h", "--json")
    assert out.exit_code == 0, out.stderr
    good = next(s for s in json.loads(out.stdout)["stations"] if s["station_id"] == "good")
    assert good["count"] == 5 and good["nok_rate"] == pytest.approx(0.2)


def test_revoked_key_is_refused_without_a_restart(served: dict) -> None:
    c = served["client"]("revoked")
    c.send(*make_message(1, station="revoked"))
    c.recv_until(lambda r: isinstance(r, Ack) and r.upto_seq == 1)
    pid = served["collector"].proc.pid
    (Path(served["keys"]["allow"]) / "revoked.key").unlink()
    time.sleep(1.5)  # the allow-list folder is polled every 0.5 s
    c.send(*make_message(2, station="revoked"))
    replies = c.recv_until(lambda r: isinstance(r, ErrorReply))
    assert replies[-1].code == "not_allowed"
    assert not any(isinstance(r, Ack) and r.upto_seq >= 2 for r in replies)
    fresh = served["client"]("revoked")  # a new connection with that key fails the CURVE handshake
    fresh.send(*make_message(3, station="revoked"))
    assert fresh.recv(timeout_s=1.5) is None
    assert Store.open(served["db"]).identities("revoked") == [("revoked", 1, 1)]
    assert served["collector"].proc.pid == pid and served["collector"].proc.poll() is None


def test_two_collectors_on_one_postgresql_share_idempotency_and_ack_state(
    pg_url: str, tmp_path: Path
) -> None:
    keys = make_keys(tmp_path / "keys", ["line"], allowed=["line"])
    first = Collector(tmp_path / "a", pg_url, keys)
    second = Collector(tmp_path / "b", pg_url, keys)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    clients = []
    try:
        first.start()
        second.start()
        to_first = Client(first.endpoint, keys["line"], keys["collector"])
        to_second = Client(second.endpoint, keys["line"], keys["collector"])
        clients += [to_first, to_second]
        for seq in (1, 2, 3):
            to_first.send(*make_message(seq, station="line"))
        to_first.recv_until(lambda r: isinstance(r, Ack) and r.upto_seq == 3)
        # the station fails over: resends 3, then goes on with 4 and 5, to the other collector
        for seq in (3, 4, 5):
            to_second.send(*make_message(seq, station="line"))
        # the second collector knows 1..3 are stored from the database, so its cumulative ack covers them
        to_second.recv_until(lambda r: isinstance(r, Ack) and r.upto_seq == 5)
    finally:
        for c in clients:
            c.close()
        first.stop()
        second.stop()
    store = Store.open(pg_url)
    assert store.identities() == [("line", 1, s) for s in range(1, 6)]
    store.close()


def test_serve_refuses_bad_configuration_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "collector.toml"
    bad.write_text('bind = "tcp://127.0.0.1:0"\nmax_batchh = 5\n')
    out = _cli("serve", "--config", str(bad))
    assert out.exit_code == 1 and "unknown key(s) ['max_batchh']" in out.stderr
    out = _cli("serve", "--db", f"sqlite:///{tmp_path / 'x.db'}", "--http", "")
    assert out.exit_code == 1 and "--curve-dir" in out.stderr
    out = _cli("query", "--db", f"sqlite:///{tmp_path / 'none.db'}")
    assert out.exit_code == 1 and "no database at" in out.stderr
    assert not (tmp_path / "none.db").exists()
    out = _cli("query", "--db", f"sqlite:///{tmp_path / 'none.db'}", "--since", "yesterday")
    assert out.exit_code == 2
