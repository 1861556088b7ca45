"""A tiny collector endpoint for the station-side delivery tests: ROUTER + CURVE + allow-list + SQLite.

    python tests/reliability/ack_server.py --bind tcp://127.0.0.1:0 --db PATH --curve-dir D --allow D \
        --endpoint-file F [--refuse-frame FRAME_ID]

It stores each result by (station_id, epoch, seq) (INSERT OR IGNORE, so a resent result is stored once and
counted in `duplicates`), commits, and only then acks: `Ack(epoch, upto_seq=contiguous high-water mark,
seqs=stored seqs above it)`. Heartbeats are answered with a heartbeat. `--refuse-frame` answers an
`ErrorReply(bad_message)` for that frame id (the dead-letter test). It writes the endpoint it bound
(OS-chosen port) to `--endpoint-file` once it is ready, and stops on SIGTERM.

This is a test fixture on purpose: the real service is `m3dm collector serve`.
"""

from __future__ import annotations

import argparse
import signal
import sqlite3
import sys
import time
from pathlib import Path

import zmq

from protocol.curve import AllowListAuthenticator, load_keypair
from protocol.frames import DEFAULT_LIMITS, ProtocolError, decode, encode
from protocol.messages import Ack, ErrorReply, Heartbeat, InspectionResult, StationEvent

ACCEPT = InspectionResult | Heartbeat | StationEvent

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    station_id TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
    frame_id TEXT NOT NULL, decision TEXT NOT NULL, capture_ts REAL NOT NULL, nblobs INTEGER NOT NULL,
    PRIMARY KEY (station_id, epoch, seq)
);
CREATE TABLE IF NOT EXISTS events (event_id TEXT PRIMARY KEY, station_id TEXT NOT NULL, kind TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS heartbeats (station_id TEXT PRIMARY KEY, ts REAL, outbox_depth INTEGER,
    dropped INTEGER);
"""


class Store:
    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(str(path), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self.high: dict[tuple[str, int], int] = {}

    def store_batch(
        self, results: list[InspectionResult], blob_counts: list[int], events: list[StationEvent]
    ):
        dup = 0
        self.db.execute("BEGIN IMMEDIATE")
        for r, n in zip(results, blob_counts, strict=True):
            cur = self.db.execute(
                "INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?, ?, ?)",
                (r.station_id, r.epoch, r.seq, r.frame_id, r.decision, r.capture_ts, n),
            )
            dup += cur.rowcount == 0
        for e in events:
            self.db.execute(
                "INSERT OR IGNORE INTO events VALUES (?, ?, ?)", (e.event_id, e.station_id, e.kind)
            )
        self.db.execute(
            "INSERT INTO counters VALUES ('duplicates', ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
            (dup, dup),
        )
        self.db.execute("COMMIT")

    def upto(self, station: str, epoch: int) -> int:
        """Highest seq s with 1..s all stored for (station, epoch)."""
        high = self.high.get((station, epoch), 0)
        for (seq,) in self.db.execute(
            "SELECT seq FROM results WHERE station_id=? AND epoch=? AND seq>? ORDER BY seq",
            (station, epoch, high),
        ):
            if seq != high + 1:
                break
            high = seq
        self.high[(station, epoch)] = high
        return high


def serve(args: argparse.Namespace) -> None:
    ctx = zmq.Context()
    auth = AllowListAuthenticator(ctx, Path(args.allow), poll_s=0.2).start()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, DEFAULT_LIMITS.max_total_bytes)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
    load_keypair(Path(args.curve_dir)).apply_server(sock)
    sock.bind(args.bind)
    store = Store(Path(args.db))
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    tmp = Path(args.endpoint_file + ".tmp")
    tmp.write_text(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    tmp.rename(args.endpoint_file)
    try:
        while not stop["now"]:
            if sock.poll(100):
                handle_batch(sock, store, args.refuse_frame)
    finally:
        sock.close(linger=0)
        auth.stop()
        ctx.term()


def handle_batch(sock: zmq.Socket, store: Store, refuse: str | None) -> None:
    """Everything waiting, in one transaction; then the acks (only after the commit)."""
    results: list[tuple[bytes, InspectionResult]] = []
    blob_counts: list[int] = []
    events: list[tuple[bytes, StationEvent]] = []
    replies: list[tuple[bytes, object]] = []
    for _ in range(512):
        try:
            peer, *frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            break
        try:
            msg, blobs = decode(frames, ACCEPT)
        except ProtocolError as err:
            replies.append((peer, ErrorReply(code=err.code, reason=err.reason)))
            continue
        if isinstance(msg, InspectionResult):
            if refuse is not None and msg.frame_id == refuse:
                replies.append(
                    (
                        peer,
                        ErrorReply(
                            code="bad_message", reason="refused by test", ref_epoch=msg.epoch, ref_seq=msg.seq
                        ),
                    )
                )
                continue
            results.append((peer, msg))
            blob_counts.append(len(blobs))
        elif isinstance(msg, StationEvent):
            events.append((peer, msg))
        else:
            replies.append((peer, Heartbeat(sender="ack-server", epoch=0, ts=time.time())))
            store.db.execute(
                "INSERT OR REPLACE INTO heartbeats VALUES (?, ?, ?, ?)",
                (msg.sender, msg.ts, msg.outbox_depth, msg.dropped),
            )
    if results or events:
        store.store_batch([r for _, r in results], blob_counts, [e for _, e in events])
    replies += ack_replies(store, results, events)
    for peer, reply in replies:
        try:
            sock.send_multipart([peer, *encode(reply)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the peer went away; it resends and gets its ack next time


def ack_replies(
    store: Store, results: list[tuple[bytes, InspectionResult]], events: list[tuple[bytes, StationEvent]]
) -> list[tuple[bytes, Ack]]:
    """One Ack per (peer, epoch) stored in this batch, carrying the peer's stored event ids."""
    replies = []
    acks: dict[tuple[bytes, str, int], list[int]] = {}
    for peer, r in results:
        acks.setdefault((peer, r.station_id, r.epoch), []).append(r.seq)
    event_ids: dict[bytes, list[StationEvent]] = {}
    for peer, e in events:
        event_ids.setdefault(peer, []).append(e)
    for (peer, station, epoch), seqs in acks.items():
        upto = store.upto(station, epoch)
        ids = tuple(e.event_id for e in event_ids.pop(peer, []))
        above = tuple(s for s in seqs if s > upto)
        replies.append((peer, Ack(epoch=epoch, upto_seq=upto, seqs=above, event_ids=ids)))
    for peer, evs in event_ids.items():
        replies.append((peer, Ack(epoch=evs[0].epoch, upto_seq=0, event_ids=tuple(e.event_id for e in evs))))
    return replies


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="tcp://127.0.0.1:0")
    parser.add_argument("--db", required=True)
    parser.add_argument("--curve-dir", required=True)
    parser.add_argument("--allow", required=True)
    parser.add_argument("--endpoint-file", required=True)
    parser.add_argument("--refuse-frame", default=None)
    serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
