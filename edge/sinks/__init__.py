"""Decision sinks: where a station's OK / NOK / ERROR goes to drive the line (reject gate, PLC, HMI).

One small interface, `DecisionSink.send(Decision)` + `close()`, chosen by a URI:
  stdout:                               one JSON line per decision on standard output
  mqtt://HOST[:PORT][?topic=T&qos=1&client_id=C]
                                        MQTT publisher (paho-mqtt 2.x); topic default m3dm/<station>/decision

Every sink runs behind `QueuedSink`: its own thread and a bounded queue, so a slow, hung or absent sink
never stalls scoring. When the queue is full the decision is dropped, counted
(m3dm_station_dropped_total{where="sink:NAME"}) and logged (at most once per 10 s per sink).

Plug-ins (OPC UA, digital I/O, fieldbus): a package declares an entry point in the group `m3dm.sinks`,
named by the URI scheme, pointing at `factory(uri: str, station_id: str) -> DecisionSink`:

    [project.entry-points."m3dm.sinks"]
    opcua = "m3dm_opcua:open_sink"      # e.g. an OPC 40100 (machine vision) server's result variables
    dio = "m3dm_gpio:open_sink"         # e.g. pulse a reject-gate output on NOK

and `m3dm edge run --sink 'opcua://plc:4840?ns=2'`. `send` is called from the sink's own thread, one
decision at a time; it may block (a fieldbus write) but should time out on its own. Shadow results
(a candidate bundle being evaluated) never reach a sink: they must not drive the gate.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Protocol, runtime_checkable

import msgspec

from core.errors import ConfigError

__all__ = ["ENTRY_POINT_GROUP", "Decision", "DecisionSink", "QueuedSink", "open_sink"]

log = logging.getLogger("m3dm.edge.sinks")

ENTRY_POINT_GROUP = "m3dm.sinks"


class Decision(msgspec.Struct, frozen=True):
    """What the line needs to act on one part (JSON payload of the MQTT and stdout sinks)."""

    station_id: str
    frame_id: str
    decision: str  # OK | NOK | ERROR
    image_score: float | None
    threshold: float | None
    capture_ts: float
    decision_ts: float
    bundle_version: str
    error_reason: str | None = None


_json = msgspec.json.Encoder()


def to_json(decision: Decision) -> bytes:
    return _json.encode(decision)


@runtime_checkable
class DecisionSink(Protocol):
    name: str

    def send(self, decision: Decision) -> None: ...

    def close(self) -> None: ...


class QueuedSink:
    """Runs `inner.send` on its own thread behind a bounded queue; drops (counted) instead of blocking."""

    def __init__(
        self, inner: DecisionSink, maxsize: int = 256, on_drop: Callable[[str], None] | None = None
    ) -> None:
        self.inner, self.name = inner, inner.name
        self._q: queue.Queue[Decision | None] = queue.Queue(maxsize)
        self._on_drop = on_drop
        self.dropped = 0
        self.failed = 0
        self._last_warn = 0.0
        self._thread = threading.Thread(target=self._run, name=f"m3dm-sink-{self.name}", daemon=True)
        self._thread.start()

    def send(self, decision: Decision) -> None:
        try:
            self._q.put_nowait(decision)
        except queue.Full:
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop(f"sink:{self.name}")
            now = time.monotonic()
            if now - self._last_warn > 10.0:
                self._last_warn = now
                log.warning("sink %s is behind: dropped %d decision(s) so far", self.name, self.dropped)

    def _run(self) -> None:
        while (decision := self._q.get()) is not None:
            try:
                self.inner.send(decision)
            except Exception as err:  # a failing sink is logged and counted, never fatal
                self.failed += 1
                log.error("sink %s failed on frame %s: %s", self.name, decision.frame_id, err)

    def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what is queued (up to timeout_s), then close the inner sink."""
        try:
            self._q.put(None, timeout=timeout_s)
        except queue.Full:
            pass
        self._thread.join(timeout_s)
        self.inner.close()

    def depth(self) -> int:
        return self._q.qsize()


class StdoutSink:
    """One JSON line per decision; flushes each line so a supervising process sees it at once."""

    name = "stdout"

    def __init__(self, write: Callable[[str], object] | None = None) -> None:
        import sys

        self._write = write or (lambda line: (sys.stdout.write(line), sys.stdout.flush()))

    def send(self, decision: Decision) -> None:
        self._write(to_json(decision).decode() + "\n")

    def close(self) -> None:
        pass


def _plugin(scheme: str) -> Callable[[str, str], DecisionSink] | None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == scheme:
            return ep.load()
    return None


def open_sink(uri: str, station_id: str) -> DecisionSink:
    """The (unqueued) sink a URI names: stdout:, mqtt://..., or an `m3dm.sinks` entry point."""
    scheme = uri.split(":", 1)[0].lower()
    if scheme == "stdout":
        return StdoutSink()
    if scheme == "mqtt":
        from edge.sinks.mqtt import MqttSink

        return MqttSink.from_uri(uri, station_id)
    factory = _plugin(scheme)
    if factory is None:
        known = sorted({"stdout", "mqtt", *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})
        raise ConfigError(f"sink {uri!r}: unknown scheme {scheme!r}; known: {', '.join(known)}")
    return factory(uri, station_id)
