"""The ingest loop: a CURVE ROUTER that decodes strictly, group-commits, and acks only after the commit.

One thread owns the socket. It drains whatever has arrived (up to `max_batch` messages), and commits when
the batch is full or its first message is `max_delay_ms` old, whichever comes first. Acks are built from
what `Store.insert_batch` reports as stored *after* the transaction committed: a station deletes a result
from its outbox only once it is durably in the database. A database error acks nothing (the stations
resend); a bad message is counted, logged and answered with an ErrorReply; nothing stops the loop.

Peers are identified by their CURVE key (ZAP puts it in each message's "User-Id" property): a peer whose
key was removed from the allow folder after it connected gets `not_allowed` for every message.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import zmq

from collector.metrics import CollectorMetrics
from collector.records import ResultRecord, result_record
from collector.store import HeartbeatIn, Store
from protocol.curve import AllowListAuthenticator, KeyPair, fingerprint
from protocol.frames import DEFAULT_LIMITS, Limits, ProtocolError, decode, encode
from protocol.messages import Ack, ErrorReply, Heartbeat, InspectionResult, StationEvent

__all__ = ["IngestService"]

log = logging.getLogger("m3dm.collector.ingest")

Incoming = InspectionResult | Heartbeat | StationEvent
_COLLECTOR_ID = "collector"


@dataclass
class _PeerBatch:
    seqs: dict[tuple[str, int], set[int]] = field(default_factory=lambda: defaultdict(set))
    events: dict[tuple[str, int], list[str]] = field(default_factory=lambda: defaultdict(list))


@dataclass
class _Batch:
    results: list[ResultRecord] = field(default_factory=list)
    events: list[StationEvent] = field(default_factory=list)
    heartbeats: list[HeartbeatIn] = field(default_factory=list)
    peers: dict[bytes, _PeerBatch] = field(default_factory=lambda: defaultdict(_PeerBatch))
    started: float = 0.0
    size: int = 0


class IngestService:
    """The ROUTER endpoint. `start()` binds and runs the loop in a thread; `endpoint` is the bound address."""

    def __init__(
        self,
        store: Store,
        bind: str,
        keypair: KeyPair,
        allow_dir: Any,
        metrics: CollectorMetrics | None = None,
        max_batch: int = 500,
        max_delay_ms: float = 5.0,
        rcvhwm: int = 20_000,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.store = store
        self.metrics = metrics or CollectorMetrics()
        self.max_batch = max_batch
        self.max_delay_s = max_delay_ms / 1000.0
        self.limits = limits
        self.epoch = int(time.time())
        self._ctx = zmq.Context()
        self._auth = AllowListAuthenticator(self._ctx, allow_dir).start()
        self._sock = self._ctx.socket(zmq.ROUTER)
        keypair.apply_server(self._sock)
        # libzmq drops (and disconnects) a peer sending a frame above this before buffering it
        self._sock.setsockopt(zmq.MAXMSGSIZE, limits.max_total_bytes)
        self._sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self._sock.setsockopt(zmq.SNDHWM, rcvhwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(bind)
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)
        self._allowed_z85: set[str] = set()
        self._allowed_at = 0.0

    def start(self) -> IngestService:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._auth.stop()
        self._sock.close(0)
        self._ctx.term()

    # ---------------------------------------------------------------------------------------------- the loop
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        batch = _Batch()
        log.info("ingest listening on %s (collector epoch %d)", self.endpoint, self.epoch)
        while not self._stop.is_set():
            timeout_ms = 100.0
            if batch.size:
                timeout_ms = max(0.0, (batch.started + self.max_delay_s - time.monotonic()) * 1000.0)
            if poller.poll(timeout_ms):
                self._drain(batch)
            if batch.size and (
                batch.size >= self.max_batch or time.monotonic() >= batch.started + self.max_delay_s
            ):
                self._flush(batch)
                batch = _Batch()
        if batch.size:
            self._flush(batch)

    def _drain(self, batch: _Batch) -> None:
        while batch.size < self.max_batch:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self._handle(frames, batch)
            except Exception:  # the loop must survive anything one message can do
                log.exception("ingest: unexpected error handling a message; dropped")
                self.metrics.rejected.labels("internal").inc()

    def _allowed(self) -> set[str]:
        now = time.monotonic()
        if now - self._allowed_at > 0.2:
            self._allowed_z85 = {k.decode() for k in self._auth.allowed()}
            self._allowed_at = now
        return self._allowed_z85

    def _handle(self, frames: list[zmq.Frame], batch: _Batch) -> None:
        peer = frames[0].bytes
        user_id = frames[0].get("User-Id") or ""
        if user_id not in self._allowed():
            self._reject(
                peer, ProtocolError("not_allowed", "this station's key is not (or no longer) allowed")
            )
            return
        try:
            msg, blobs = decode(frames[1:], Incoming, self.limits)
            record = result_record(msg, blobs) if isinstance(msg, InspectionResult) else None
        except ProtocolError as err:
            self._reject(peer, err, fp=fingerprint(user_id.encode()))
            return
        if not batch.size:
            batch.started = time.monotonic()
        batch.size += 1
        if record is not None:
            batch.results.append(record)
            batch.peers[peer].seqs[(msg.station_id, msg.epoch)].add(msg.seq)
        elif isinstance(msg, StationEvent):
            batch.events.append(msg)
            batch.peers[peer].events[(msg.station_id, msg.epoch)].append(msg.event_id)
        else:
            self.metrics.heartbeats.inc()
            batch.heartbeats.append(HeartbeatIn(msg, fingerprint(user_id.encode()), time.time()))
            reply = Heartbeat(sender=_COLLECTOR_ID, epoch=self.epoch, ts=time.time())
            self._send(peer, reply)

    def _reject(self, peer: bytes, err: ProtocolError, fp: str = "") -> None:
        self.metrics.rejected.labels(err.code).inc()
        log.warning("ingest: refused a message from peer key %s: %s: %s", fp or "?", err.code, err.reason)
        self._send(peer, ErrorReply(code=err.code, reason=err.reason[:500]))

    def _send(self, peer: bytes, message: Any) -> None:
        try:
            self._sock.send_multipart([peer, *encode(message)], zmq.NOBLOCK)
        except zmq.ZMQError as err:  # peer gone or its pipe full: it resends what stays unacked
            log.debug("ingest: reply to a peer dropped: %s", err)

    def _flush(self, batch: _Batch) -> None:
        t0 = time.perf_counter()
        try:
            outcome = self.store.insert_batch(batch.results, batch.events, batch.heartbeats)
        except Exception as err:  # database down or locked: ack nothing, the stations resend
            self.metrics.commit_failures.inc()
            log.error("ingest: commit of %d message(s) failed, nothing acked: %s", batch.size, err)
            time.sleep(0.05)
            return
        self.metrics.commit_seconds.observe(time.perf_counter() - t0)
        self.metrics.batch_size.observe(batch.size)
        self.metrics.results.inc(outcome.inserted)
        self.metrics.duplicates.inc(len(batch.results) - outcome.inserted)
        self.metrics.events.inc(outcome.events_inserted)
        for peer, sent in batch.peers.items():
            for key in sorted(set(sent.seqs) | set(sent.events)):
                upto = outcome.upto.get(key, self.store.acked_upto(*key))
                seqs = tuple(sorted(s for s in sent.seqs.get(key, ()) if s > upto))
                event_ids = tuple(e for e in sent.events.get(key, ()) if e in outcome.event_ids)
                self._send(peer, Ack(epoch=key[1], upto_seq=upto, seqs=seqs, event_ids=event_ids))
