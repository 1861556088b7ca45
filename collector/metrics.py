"""Prometheus metrics of one collector process, on their own registry (so services can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["CollectorMetrics"]


class CollectorMetrics:
    """Ingest rate (rate() of results_total), commit latency, rejected messages, stations, drift alarms."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.results = Counter("m3dm_collector_results", "Results stored (new rows)", registry=r)
        self.duplicates = Counter("m3dm_collector_duplicates", "Resent results already stored", registry=r)
        self.events = Counter("m3dm_collector_events", "Station events stored (new)", registry=r)
        self.heartbeats = Counter("m3dm_collector_heartbeats", "Heartbeats received", registry=r)
        self.rejected = Counter(
            "m3dm_collector_rejected", "Messages refused, by reason", ["reason"], registry=r
        )
        self.commit_seconds = Histogram(
            "m3dm_collector_commit_seconds",
            "Group-commit transaction time",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.batch_size = Histogram(
            "m3dm_collector_batch_messages",
            "Messages per group commit",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
            registry=r,
        )
        self.commit_failures = Counter("m3dm_collector_commit_failures", "Failed transactions", registry=r)
        self.stations_online = Gauge("m3dm_collector_stations_online", "Stations heard recently", registry=r)
        self.stations_known = Gauge("m3dm_collector_stations_known", "Stations ever seen", registry=r)
        self.drift_alarms = Gauge(
            "m3dm_collector_drift_alarms", "Station streams in drift alarm now", registry=r
        )
        self.drift_psi = Gauge(
            "m3dm_collector_drift_psi",
            "PSI of a station's OK scores vs its bundle",
            ["station_id"],
            registry=r,
        )
