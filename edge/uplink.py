"""The station's link to the collector: results out of the durable outbox, over CURVE, until acked.

    uplink = Uplink.from_paths(outbox, "tcp://collector:5555", curve_dir, collector_key).start()
    epoch, seq = uplink.submit(fields_or_result, blobs)   # durable in the outbox when it returns
    uplink.event("bundle_loaded", {"path": ...})
    uplink.set_status(fps=12.5, bundle_id=..., bundle_version=...)
    uplink.drain(timeout_s=30)                            # --once: wait until every result is acked
    uplink.close()

A ZeroMQ DEALER (CURVE client; its keypair from `--curve-dir`, the collector's public key from
`--collector-key`) talks to the collector's ROUTER. The socket lives in the uplink's own I/O thread (ZeroMQ
sockets are not thread-safe); `submit` only writes to the outbox and wakes that thread.

Delivery (nothing lost, duplicates removed by the collector on (station_id, epoch, seq)):
- a sliding window of at most `window` unacked results in flight, sent in (epoch, seq) order;
- `Ack(epoch, upto_seq, seqs, event_ids)` deletes from the outbox (cumulative plus the listed extras);
- everything unacked is sent again, in order, after a (re)connection (the socket monitor reports each
  completed CURVE handshake), after `ack_timeout_s` without any ack while results are in flight, and after
  a restart (the outbox still holds them);
- heartbeats both ways: the station sends `Heartbeat` every `heartbeat_s` (fps, outbox depth, dropped,
  bundle); when nothing at all (ack, heartbeat, error) came from the collector for `dead_after`
  intervals, the collector is taken for gone: the socket is closed (linger 0) and a new one connects;
- `ErrorReply` is logged with its reason; a result refused as `bad_message` or `too_large` goes to the
  outbox's dead-letter table (counted) and is not resent.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from edge.outbox import Outbox, Pending
from protocol.curve import KeyPair, load_keypair, load_public_key
from protocol.frames import DEFAULT_LIMITS, Limits, ProtocolError, decode, encode
from protocol.messages import Ack, ErrorReply, Heartbeat, InspectionResult

__all__ = ["PERMANENT_ERRORS", "Uplink", "UplinkConfig", "UplinkStats"]

log = logging.getLogger("m3dm.uplink")

# ErrorReply codes that mean "this message will never be accepted": dead-letter it instead of resending.
PERMANENT_ERRORS = frozenset({"bad_message", "too_large"})
_REPLY_TYPES = Ack | Heartbeat | ErrorReply
_POLL_MS = 50


@dataclass(frozen=True)
class UplinkConfig:
    """Delivery settings (a `[uplink]` table in station.toml)."""

    window: int = 256  # results in flight without an ack
    heartbeat_s: float = 1.0
    dead_after: int = 5  # heartbeat intervals of silence from the collector before a reconnect
    ack_timeout_s: float = 5.0  # no ack for this long while results are in flight: send them again
    reconnect_ivl_ms: int = 200
    reconnect_ivl_max_ms: int = 2000
    limits: Limits = field(default=DEFAULT_LIMITS)


@dataclass(frozen=True)
class UplinkStats:
    """A snapshot for /metrics and logs."""

    outbox_depth: int
    outbox_bytes: int
    in_flight: int
    sent: int
    acked: int
    resent: int
    dropped: int  # results the collector will never get (policy drops + dead letters), all-time
    dropped_by_reason: dict[str, int]
    dead_letters: int
    reconnects: int
    errors_received: int
    connected: bool
    last_ack_age_s: float | None  # None: no ack yet since start


class Uplink:
    """Results and events from the outbox to the collector, resent until acked (see module doc)."""

    def __init__(
        self,
        outbox: Outbox,
        collector: str,
        keypair: KeyPair,
        collector_public: bytes,
        config: UplinkConfig = UplinkConfig(),
        context: zmq.Context | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.outbox = outbox
        self.collector = collector
        self.config = config
        self._keypair = keypair
        self._server_public = collector_public
        self._ctx = context or zmq.Context.instance()
        self._clock = clock
        self._status: dict[str, Any] = {"fps": 0.0, "bundle_id": "", "bundle_version": "", "health": {}}
        self._status_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, name=f"uplink-{outbox.station_id}", daemon=True)
        self._drained = threading.Condition()
        # I/O-thread state
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._in_flight: OrderedDict[tuple[int, int], float] = OrderedDict()
        self._events_in_flight: set[str] = set()
        self._cursor: tuple[int, int] | None = None  # last result key sent on this connection
        self._high: tuple[int, int] = (-1, -1)  # highest key ever sent by this process (resend counting)
        self._connected = False
        self._last_heard = time.monotonic()
        self._last_progress = time.monotonic()
        self._last_heartbeat = 0.0
        self._last_ack: float | None = None
        self._counts = {"sent": 0, "acked": 0, "resent": 0, "reconnects": 0, "errors": 0}
        # Results left from an earlier boot may have gone out already: sending them counts as a resend.
        self._high = outbox.newest_key() or (-1, -1)
        self._poller: zmq.Poller | None = None

    @classmethod
    def from_paths(
        cls,
        outbox: Outbox,
        collector: str,
        curve_dir: str | Path,
        collector_key: str | Path,
        config: UplinkConfig = UplinkConfig(),
        **kwargs: Any,
    ) -> Uplink:
        """Keys from files: own keypair from `curve_dir` (one *.key_secret), the collector's public key
        from a .key file or the folder `m3dm keys gen` wrote."""
        return cls(
            outbox,
            collector,
            load_keypair(Path(curve_dir)),
            load_public_key(Path(collector_key)),
            config,
            **kwargs,
        )

    # --- the station's side ----------------------------------------------------------------------------

    def start(self) -> Uplink:
        """Connect and start the I/O thread; returns self."""
        self._thread.start()
        return self

    def submit(
        self, result: InspectionResult | Mapping[str, Any], blobs: Sequence[bytes] = ()
    ) -> tuple[int, int]:
        """Store a result durably in the outbox (identity assigned there), queue it for sending.

        `result`: an InspectionResult (its station_id/epoch/seq are replaced) or a mapping of every other
        InspectionResult field; `blobs`: the frames its Blob references point at (1-based). Returns
        (epoch, seq). Raises ValueError for a result the collector would refuse (nothing stored). Never
        blocks on the network; when the outbox is full its drop policy applies.
        """
        key = self.outbox.add_result(result, blobs)
        self._wake()
        return key

    def event(self, kind: str, detail: Mapping[str, str] | None = None, event_id: str | None = None) -> str:
        """Store and queue a StationEvent (bundle id/version from `set_status`); returns its event_id."""
        with self._status_lock:
            bundle_id, bundle_version = self._status["bundle_id"], self._status["bundle_version"]
        event_id = self.outbox.add_event(kind, detail, bundle_id, bundle_version, event_id)
        self._wake()
        return event_id

    def set_status(
        self,
        fps: float | None = None,
        bundle_id: str | None = None,
        bundle_version: str | None = None,
        health: Mapping[str, float] | None = None,
    ) -> None:
        """What the next heartbeats report (only the given fields change)."""
        with self._status_lock:
            for name, value in (("fps", fps), ("bundle_id", bundle_id), ("bundle_version", bundle_version)):
                if value is not None:
                    self._status[name] = value
            if health is not None:
                self._status["health"] = dict(health)

    def drain(self, timeout_s: float) -> bool:
        """Wait until every result and event in the outbox is acked; False if `timeout_s` ran out."""
        deadline = time.monotonic() + timeout_s
        with self._drained:
            while self.outbox.depth() > 0 or self.outbox.event_depth() > 0:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._drained.wait(min(left, 0.1))
        return True

    def stats(self) -> UplinkStats:
        ob = self.outbox.stats()
        age = None if self._last_ack is None else max(time.monotonic() - self._last_ack, 0.0)
        return UplinkStats(
            outbox_depth=ob.depth,
            outbox_bytes=ob.stored_bytes,
            in_flight=len(self._in_flight),
            sent=self._counts["sent"],
            acked=self._counts["acked"],
            resent=self._counts["resent"],
            dropped=ob.dropped_total,
            dropped_by_reason=dict(ob.dropped),
            dead_letters=ob.dropped["dead_letters"],
            reconnects=self._counts["reconnects"],
            errors_received=self._counts["errors"],
            connected=self._connected,
            last_ack_age_s=age,
        )

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the I/O thread and close the socket (linger 0: unacked results stay in the outbox)."""
        self._stop.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> Uplink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (already woken) or closed (shutting down)

    # --- the I/O thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._connect()
            while not self._stop.is_set():
                self._step()
        except Exception:  # the thread must say why it died; drain() then returns False
            log.exception("uplink %s: I/O thread failed", self.outbox.station_id)
        finally:
            self._disconnect()

    def _step(self) -> None:
        ready = dict(self._poller.poll(_POLL_MS))
        if self._wake_r in ready:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
        if self._monitor in ready:
            self._on_monitor()
        if self._sock in ready:
            self._receive()
        self._fill_window()
        self._timers()

    def _connect(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on a connection whose CURVE handshake completed
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.limits.max_total_bytes)
        sock.setsockopt(zmq.SNDHWM, self.config.window + 64)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        sock.setsockopt(zmq.RECONNECT_IVL, self.config.reconnect_ivl_ms)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, self.config.reconnect_ivl_max_ms)
        self._keypair.apply_client(sock, self._server_public)
        self._monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        )
        sock.connect(self.collector)
        self._sock = sock
        self._poller = zmq.Poller()
        for pollable in (sock, self._monitor, self._wake_r):
            self._poller.register(pollable, zmq.POLLIN)
        self._connected = False
        self._last_heard = time.monotonic()
        self._rewind()

    def _disconnect(self) -> None:
        if self._sock is not None:
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._sock.close(linger=0)
            self._sock = None
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None
        self._connected = False

    def _reconnect(self, why: str) -> None:
        log.warning("uplink %s: %s; reconnecting to %s", self.outbox.station_id, why, self.collector)
        self._counts["reconnects"] += 1
        self._disconnect()
        self._connect()

    def _rewind(self) -> None:
        """Everything unacked goes out again, in order, from the oldest."""
        self._in_flight.clear()
        self._events_in_flight.clear()
        self._cursor = None
        self._last_progress = time.monotonic()

    def _on_monitor(self) -> None:
        while True:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                log.info("uplink %s: connected to %s (CURVE)", self.outbox.station_id, self.collector)
                self._connected = True
                self._last_heard = time.monotonic()
                self._rewind()
            elif kind == zmq.EVENT_DISCONNECTED:
                log.warning("uplink %s: disconnected from %s", self.outbox.station_id, self.collector)
                self._connected = False
                self._rewind()
            else:
                log.error(
                    "uplink %s: CURVE handshake with %s failed (is this station's key on the collector's "
                    "allow-list?)",
                    self.outbox.station_id,
                    self.collector,
                )

    def _send(self, frames: list[bytes]) -> bool:
        try:
            self._sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False  # not connected yet, or the high-water mark: try again on the next step
        return True

    def _fill_window(self) -> None:
        if not self._connected:
            return
        room = self.config.window - len(self._in_flight)
        if room > 0:
            for item in self.outbox.pending_results(after=self._cursor, limit=room):
                if not self._send(item.frames):
                    break
                self._sent_result(item)
        if len(self._events_in_flight) < 64:
            for item in self.outbox.pending_events(exclude=self._events_in_flight, limit=16):
                if not self._send(item.frames):
                    break
                if not self._in_flight and not self._events_in_flight:
                    self._last_progress = time.monotonic()  # the ack timer covers events too
                self._events_in_flight.add(item.event_id)

    def _sent_result(self, item: Pending) -> None:
        now = time.monotonic()
        if not self._in_flight and not self._events_in_flight:
            self._last_progress = now  # the ack timer starts with the first message in flight
        self._in_flight[item.key] = now
        self._cursor = item.key
        self._counts["sent"] += 1
        if item.key <= self._high:
            self._counts["resent"] += 1
        else:
            self._high = item.key

    def _receive(self) -> None:
        for _ in range(1000):
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                message, _ = decode(frames, _REPLY_TYPES, self.config.limits)
            except ProtocolError as err:
                log.warning("uplink %s: undecodable reply from collector: %s", self.outbox.station_id, err)
                continue
            self._last_heard = time.monotonic()
            if isinstance(message, Ack):
                self._on_ack(message)
            elif isinstance(message, ErrorReply):
                self._on_error(message)

    def _on_ack(self, ack: Ack) -> None:
        deleted = self.outbox.ack(ack.epoch, ack.upto_seq, ack.seqs, ack.event_ids)
        acked_keys = [k for k in self._in_flight if k[0] == ack.epoch and k[1] <= ack.upto_seq]
        acked_keys += [(ack.epoch, s) for s in ack.seqs if (ack.epoch, s) in self._in_flight]
        for key in acked_keys:
            self._in_flight.pop(key, None)
        self._events_in_flight.difference_update(ack.event_ids)
        self._counts["acked"] += deleted
        if self.outbox.depth() == 0 and self.outbox.event_depth() == 0:
            self._notify_drained()
        self._last_ack = time.monotonic()
        self._last_progress = self._last_ack

    def _notify_drained(self) -> None:
        with self._drained:
            self._drained.notify_all()

    def _on_error(self, reply: ErrorReply) -> None:
        self._counts["errors"] += 1
        log.error(
            "uplink %s: collector refused a message: %s: %s (epoch %s seq %s)",
            self.outbox.station_id,
            reply.code,
            reply.reason,
            reply.ref_epoch,
            reply.ref_seq,
        )
        if reply.code in PERMANENT_ERRORS and reply.ref_epoch is not None and reply.ref_seq is not None:
            self.outbox.dead_letter(reply.ref_epoch, reply.ref_seq, reply.code, reply.reason)
            self._in_flight.pop((reply.ref_epoch, reply.ref_seq), None)
            self._last_progress = time.monotonic()

    def _timers(self) -> None:
        now = time.monotonic()
        hb = self.config.heartbeat_s
        if now - self._last_heartbeat >= hb:
            self._last_heartbeat = now
            self._send_heartbeat()
        if now - self._last_heard > hb * self.config.dead_after:
            self._reconnect(f"nothing heard from the collector for {now - self._last_heard:.1f} s")
            return
        waiting = self._in_flight or self._events_in_flight
        if waiting and now - self._last_progress > self.config.ack_timeout_s:
            log.warning(
                "uplink %s: no ack for %.1f s with %d result(s) in flight; sending everything unacked again",
                self.outbox.station_id,
                now - self._last_progress,
                len(self._in_flight),
            )
            self._rewind()

    def _send_heartbeat(self) -> None:
        ob = self.outbox.stats()
        with self._status_lock:
            status = dict(self._status)
        beat = Heartbeat(
            sender=self.outbox.station_id,
            epoch=self.outbox.epoch,
            ts=self._clock(),
            bundle_id=status["bundle_id"],
            bundle_version=status["bundle_version"],
            fps=float(status["fps"]),
            outbox_depth=ob.depth,
            dropped=ob.dropped_total,
            health={**status["health"], "in_flight": float(len(self._in_flight))},
        )
        self._send([bytes(f) for f in encode(beat)])
