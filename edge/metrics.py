"""Station metrics: Prometheus series for `/metrics`, and in-process latency percentiles for reports.

Each station owns a `CollectorRegistry` (not the global one), so tests and benchmarks can run several
stations in one process. Series (all prefixed `m3dm_station_`):
  frames_total{decision}              results by OK / NOK / ERROR (shadow results not counted)
  stage_latency_seconds{stage}        histogram per stage: capture, preprocess, features, score, decide
  e2e_latency_seconds                 histogram capture -> decision (queue waits included)
  fps                                 results per second over the last few seconds
  queue_depth{queue}                  items waiting between stages
  dropped_total{where}                frames dropped by backpressure ("capture") or sinks ("sink:NAME")
  outbox_depth                        results stored but not yet acked (from the uplink, when there is one)
  outbox_dropped_total{decision}      results the full outbox dropped (policy OK < ERROR < NOK), by decision;
                                      all-time, from the outbox file (they survive restarts)
  outbox_dropped_disk_full_total      of those, dropped for lack of disk space
  outbox_dead_letters_total           results the collector refused as malformed (kept aside, never resent)
  model                               info: bundle id/version, class, preset, backend, variant
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import CounterMetricFamily

__all__ = ["STAGES", "LatencyWindow", "OutboxDropCollector", "StationMetrics"]

STAGES = ("capture", "preprocess", "features", "score", "decide")
_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)


class LatencyWindow:
    """The last `size` values (ms) of one series, for p50/p95/p99 without Prometheus' bucket rounding."""

    def __init__(self, size: int = 10_000) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, value_ms: float) -> None:
        with self._lock:
            self._values.append(value_ms)

    def percentiles(self, qs: tuple[float, ...] = (50, 95, 99)) -> dict[str, float]:
        with self._lock:
            values = np.fromiter(self._values, dtype=np.float64)
        if values.size == 0:
            return {f"p{q:g}": float("nan") for q in qs}
        return {f"p{q:g}": float(np.percentile(values, q)) for q in qs}

    def mean(self) -> float:
        with self._lock:
            return float(np.mean(self._values)) if self._values else float("nan")

    def __len__(self) -> int:
        return len(self._values)


class OutboxDropCollector:
    """The outbox's drop counters as Prometheus counters, read at each scrape.

    The outbox keeps them in its file (they survive restarts), so they are exported from there rather
    than mirrored into prometheus-client Counters that would restart at 0 while the file says otherwise.
    `counts` returns `edge.outbox.Outbox.drop_counts()`: dropped_ok / dropped_error / dropped_nok (every
    policy drop, whatever made the outbox full), dropped_disk_full (of those, for lack of disk space) and
    dead_letters.
    """

    DECISIONS = ("OK", "NOK", "ERROR")

    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self._counts = counts

    def _families(self, counts: Mapping[str, int]) -> list[CounterMetricFamily]:
        by_decision = CounterMetricFamily(
            "m3dm_station_outbox_dropped",
            "Results dropped by the full outbox (policy OK < ERROR < NOK), by decision",
            labels=["decision"],
        )
        for decision in self.DECISIONS:
            by_decision.add_metric([decision], counts.get(f"dropped_{decision.lower()}", 0))
        disk_full = CounterMetricFamily(
            "m3dm_station_outbox_dropped_disk_full",
            "Of the outbox drops, those for lack of disk space",
            value=counts.get("dropped_disk_full", 0),
        )
        dead = CounterMetricFamily(
            "m3dm_station_outbox_dead_letters",
            "Results the collector refused as malformed (kept aside, never resent)",
            value=counts.get("dead_letters", 0),
        )
        return [by_decision, disk_full, dead]

    def describe(self) -> list[CounterMetricFamily]:
        return self._families({})  # names only: registering must not read the outbox

    def collect(self) -> list[CounterMetricFamily]:
        return self._families(self._counts())


class StationMetrics:
    """Every number the station reports, in one place."""

    def __init__(self, station_id: str) -> None:
        self.station_id = station_id
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.frames = Counter("m3dm_station_frames", "Results by decision", ["decision"], registry=r)
        self.stage_latency = Histogram(
            "m3dm_station_stage_latency_seconds",
            "Per-stage latency",
            ["stage"],
            buckets=_BUCKETS_S,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "m3dm_station_e2e_latency_seconds", "Capture to decision", buckets=_BUCKETS_S, registry=r
        )
        self.fps_gauge = Gauge("m3dm_station_fps", "Results per second (last 5 s)", registry=r)
        self.queue_depth = Gauge("m3dm_station_queue_depth", "Items waiting per queue", ["queue"], registry=r)
        self.dropped = Counter("m3dm_station_dropped", "Dropped frames / decisions", ["where"], registry=r)
        self.outbox_depth = Gauge("m3dm_station_outbox_depth", "Stored, not yet acked results", registry=r)
        self.model_info = Info("m3dm_station_model", "Active bundle and backend", registry=r)
        self.windows = {stage: LatencyWindow() for stage in (*STAGES, "total")}
        self._done_ts: deque[float] = deque(maxlen=512)
        self._lock = threading.Lock()
        self.fps_gauge.set_function(self.fps)
        self.counts = {"OK": 0, "NOK": 0, "ERROR": 0}
        self.drops: dict[str, int] = {}

    def set_model(self, summary: dict, variant: str) -> None:
        self.model_info.info(
            {
                "station_id": self.station_id,
                "bundle_id": str(summary.get("bundle_id", "")),
                "bundle_version": str(summary.get("version", "")),
                "class_name": str(summary.get("class", "")),
                "preset": str(summary.get("preset", "")),
                "backend": str(summary.get("backend", "")),
                "variant": variant,
            }
        )

    def watch_queue(self, name: str, depth: Callable[[], int]) -> None:
        self.queue_depth.labels(queue=name).set_function(depth)

    def watch_outbox(
        self, depth: Callable[[], int], drop_counts: Callable[[], Mapping[str, int]] | None = None
    ) -> None:
        """Export the outbox's depth and, given `drop_counts` (`Outbox.drop_counts`), its drop counters."""
        self.outbox_depth.set_function(depth)
        if drop_counts is not None:
            self.registry.register(OutboxDropCollector(drop_counts))

    def drop(self, where: str, n: int = 1) -> None:
        self.dropped.labels(where=where).inc(n)
        with self._lock:
            self.drops[where] = self.drops.get(where, 0) + n

    def record(self, decision: str, latency_ms: dict[str, float]) -> None:
        """One finished (non-shadow) result."""
        self.frames.labels(decision=decision).inc()
        for stage, ms in latency_ms.items():
            if stage in self.windows:
                self.windows[stage].add(ms)
            if stage in STAGES:
                self.stage_latency.labels(stage=stage).observe(ms / 1e3)
        if "total" in latency_ms:
            self.e2e_latency.observe(latency_ms["total"] / 1e3)
        with self._lock:
            self.counts[decision] = self.counts.get(decision, 0) + 1
            self._done_ts.append(time.monotonic())

    def fps(self, horizon_s: float = 5.0) -> float:
        with self._lock:
            now = time.monotonic()
            recent = [t for t in self._done_ts if now - t <= horizon_s]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-9)

    def summary(self) -> dict:
        """Counts, drops and latency percentiles (ms) so far: the `--once` report and the benchmark's."""
        with self._lock:
            counts, drops = dict(self.counts), dict(self.drops)
        stages = {s: round(self.windows[s].mean(), 3) for s in STAGES if len(self.windows[s])}
        total = {k: round(v, 3) for k, v in self.windows["total"].percentiles().items()}
        return {"counts": counts, "dropped": drops, "stage_mean_ms": stages, "total_ms": total}

    def serve(self, port: int, addr: str = "127.0.0.1") -> tuple[object, int]:
        """Start the /metrics HTTP endpoint (port 0 = OS-chosen); returns (server, bound port)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server, server.server_address[1]
