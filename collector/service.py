"""`m3dm collector serve`: the store, the ingest loop, the HTTP app, and periodic upkeep in one process.

Upkeep (one thread, its own database connections): stations-online gauge every second, bundle manifests
re-scanned for drift references and drift re-evaluated every `drift_interval_s`, retention every
`retention_interval_s`. An upkeep failure is logged and retried next round; it never stops ingest.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

from collector.config import CollectorConfig
from collector.drift import DriftConfig, evaluate_drift, load_references
from collector.http import HttpServer, create_app
from collector.ingest import IngestService
from collector.metrics import CollectorMetrics
from collector.store import Retention, Store
from protocol.curve import load_keypair

__all__ = ["CollectorService"]

log = logging.getLogger("m3dm.collector")


def _split_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--http must be HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


class CollectorService:
    def __init__(self, cfg: CollectorConfig) -> None:
        if cfg.curve_dir is None or cfg.allow is None:
            raise ValueError(
                "the collector needs --curve-dir (its keypair) and --allow (station keys folder)"
            )
        if not Path(cfg.allow).is_dir():
            raise ValueError(f"--allow {cfg.allow}: not a folder")
        self.cfg = cfg
        self.keypair = load_keypair(cfg.curve_dir)
        self.metrics = CollectorMetrics()
        self.store = Store.open(cfg.db, offline_after_s=cfg.offline_after_s)
        self.retention = Retention(cfg.ok_max_age_s, cfg.nok_max_age_s, cfg.max_rows, cfg.event_max_age_s)
        self.drift = DriftConfig(cfg.drift_window, cfg.drift_min_n, cfg.drift_psi_max, cfg.drift_ks_max)
        self.ingest: IngestService | None = None
        self.http: HttpServer | None = None
        self._stop = threading.Event()
        self._upkeep = threading.Thread(target=self._upkeep_loop, name="upkeep", daemon=True)
        self._manifests_seen: dict[Path, int] = {}

    def start(self) -> CollectorService:
        cfg = self.cfg
        self.ingest = IngestService(
            self.store,
            cfg.bind,
            self.keypair,
            cfg.allow,
            self.metrics,
            cfg.max_batch,
            cfg.max_delay_ms,
            cfg.rcvhwm,
        ).start()
        if cfg.http:
            host, port = _split_host_port(cfg.http)
            self.http = HttpServer(create_app(self.store, self.metrics), host, port).start()
        self._upkeep.start()
        if cfg.ready_file is not None:
            ready = {"zmq": self.ingest.endpoint, "http_port": self.http.port if self.http else None}
            ready["pid"] = os.getpid()
            tmp = Path(cfg.ready_file).with_suffix(".tmp")
            tmp.write_text(json.dumps(ready))
            tmp.replace(cfg.ready_file)  # atomic: a reader never sees half a file
        http = f"http://{self.http.host}:{self.http.port}" if self.http else "off"
        log.info(
            "collector serving: zmq %s, http %s, db %s", self.ingest.endpoint, http, self.store.engine.url
        )
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._upkeep.is_alive():
            self._upkeep.join(timeout=10)
        if self.ingest is not None:
            self.ingest.stop()
        if self.http is not None:
            self.http.stop()
        self.store.close()

    def run_forever(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop cleanly (pending batch committed and acked)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        self.start()
        try:
            while not self._stop.wait(0.5):
                pass
        finally:
            self.stop()

    def _upkeep_loop(self) -> None:
        due = {"drift": 0.0, "retention": 0.0}
        while not self._stop.wait(1.0):
            now = time.time()
            self._guard("stations", self._count_stations)
            if now >= due["drift"]:
                due["drift"] = now + self.cfg.drift_interval_s
                self._guard("drift", self._drift_round)
            if now >= due["retention"]:
                due["retention"] = now + self.cfg.retention_interval_s
                self._guard("retention", self._retention_round)

    def _guard(self, what: str, fn) -> None:
        try:
            fn()
        except Exception as err:  # upkeep must never take the service down
            log.error("collector upkeep %s failed (retrying next round): %s", what, err)

    def _count_stations(self) -> None:
        stations = self.store.stations()
        self.metrics.stations_known.set(len(stations))
        self.metrics.stations_online.set(sum(1 for s in stations if s["online"]))

    def _drift_round(self) -> None:
        if self.cfg.bundles is not None and Path(self.cfg.bundles).is_dir():
            load_references(self.store, Path(self.cfg.bundles), self._manifests_seen)
        evaluate_drift(self.store, self.drift, self.metrics)

    def _retention_round(self) -> None:
        deleted = self.store.apply_retention(self.retention)
        if any(deleted.values()):
            log.info("retention deleted %s", deleted)
