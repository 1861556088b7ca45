"""The station process: source -> pipeline (ModelSlot) -> uplink (outbox, collector) + decision sinks.

    station = Station.open(cfg)          # verifies and loads the bundle (BundleError: nothing scored)
    summary = station.run(once=True)     # until the source ends (once) or stop() / SIGTERM
    station.slot                          # ModelSlot: swap / set_shadow / set_policy (deploy hooks)

Every result goes to a `ResultSink` (the uplink when a collector is configured: durable outbox first,
identity (station_id, epoch, seq) assigned there); every non-shadow decision goes to each decision sink.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from edge.config import StationConfig
from edge.decision import ResultOptions
from edge.metrics import StationMetrics
from edge.model_slot import ModelSlot, Policy, SlotState
from edge.pipeline import Pipeline, PipelineConfig, Scored
from edge.sinks import Decision, QueuedSink, open_sink
from edge.sources import FrameSource, open_source
from protocol.messages import InspectionResult

__all__ = ["ResultSink", "Station", "StationLogFilter", "configure_logging"]

log = logging.getLogger("m3dm.edge.station")

LOG_FORMAT = (
    "%(asctime)s %(levelname)s station=%(station_id)s bundle=%(bundle_version)s %(name)s: %(message)s"
)


class StationLogFilter(logging.Filter):
    """Stamps every record with the station id and the ACTIVE bundle version (updated on swap)."""

    def __init__(self, station_id: str, bundle_version: str = "-") -> None:
        super().__init__()
        self.station_id, self.bundle_version = station_id, bundle_version

    def filter(self, record: logging.LogRecord) -> bool:
        record.station_id = self.station_id
        record.bundle_version = self.bundle_version
        return True


def configure_logging(station_id: str, level: str = "INFO") -> StationLogFilter:
    """One stderr handler on the root logger whose every line carries station id and bundle version."""
    filt = StationLogFilter(station_id)
    handler = logging.StreamHandler()
    handler.addFilter(filt)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # faiss announces every CPU-specific build it fails to find (ten lines); only its problems matter here.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    return filt


class ResultSink(Protocol):
    """Where full results go. `close` returns True when everything handed over was delivered."""

    def publish(self, result: InspectionResult, blobs: Sequence[bytes]) -> None: ...

    def close(self, timeout_s: float, drain: bool) -> bool: ...

    def depth(self) -> int: ...


class NoResultSink:
    """No collector configured: results are counted, not stored (decisions still reach the sinks)."""

    def __init__(self) -> None:
        self.count = 0

    def publish(self, result: InspectionResult, blobs: Sequence[bytes]) -> None:
        self.count += 1

    def close(self, timeout_s: float, drain: bool) -> bool:
        return True

    def depth(self) -> int:
        return 0


class UplinkResultSink:
    """Results into the durable outbox via `edge.uplink.Uplink` (which assigns epoch and seq)."""

    def __init__(self, uplink: Any) -> None:
        self.uplink = uplink
        self.refused = 0
        self.final_stats: Any = None

    def publish(self, result: InspectionResult, blobs: Sequence[bytes]) -> None:
        try:
            self.uplink.submit(result, blobs)
        except ValueError as err:  # the collector would refuse it: never let that stop the line
            self.refused += 1
            log.error("frame %s: result not stored: %s", result.frame_id, err)

    def close(self, timeout_s: float, drain: bool) -> bool:
        ok = self.uplink.drain(timeout_s) if drain else True
        if not ok:
            log.error(
                "%d result(s) still unacked after %.0f s; they stay in the outbox", self.depth(), timeout_s
            )
        self.final_stats = self.uplink.stats()  # the outbox is closed below; keep the last figures
        self.uplink.close()
        self.uplink.outbox.close()
        return ok

    def depth(self) -> int:
        return self.uplink.outbox.depth()


def open_uplink(cfg: StationConfig) -> Any:
    from edge.outbox import Outbox
    from edge.uplink import Uplink

    outbox = Outbox(cfg.outbox, cfg.station_id, cfg.outbox_limits)
    try:
        return Uplink.from_paths(outbox, cfg.collector, cfg.curve_dir, cfg.collector_key, cfg.uplink).start()
    except BaseException:
        outbox.close()
        raise


def decision_of(result: InspectionResult) -> Decision:
    return Decision(
        station_id=result.station_id,
        frame_id=result.frame_id,
        decision=result.decision,
        image_score=result.image_score,
        threshold=result.threshold,
        capture_ts=result.capture_ts,
        decision_ts=result.decision_ts,
        bundle_version=result.bundle_version,
        error_reason=result.error_reason,
    )


@dataclass
class Station:
    cfg: StationConfig
    slot: ModelSlot
    source: FrameSource
    metrics: StationMetrics
    results: ResultSink
    sinks: list[QueuedSink]
    log_filter: StationLogFilter | None = None
    uplink: Any = None

    @classmethod
    def open(
        cls,
        cfg: StationConfig,
        log_filter: StationLogFilter | None = None,
        model: Any = None,
        source: FrameSource | None = None,
    ) -> Station:
        """Load (verify) the bundle, open the source, sinks and uplink. Raises before any frame is scored."""
        if model is None:
            from edge.station_model import open_bundle
            from edge.updater import startup_bundle

            # with an updater, the bundle it last activated (active.json) wins over --bundle
            kept = startup_bundle(cfg.updater.state_dir) if cfg.updater is not None else None
            if cfg.bundle_key is None:  # StationConfig allows this only with insecure_no_verify
                log.error(
                    "INSECURE: bundle %s will be scored WITHOUT signature verification "
                    "(--insecure-no-verify): anyone who can write it controls every decision; lab use only",
                    kept or cfg.bundle,
                )
            model = open_bundle(
                kept or cfg.bundle,
                cfg.bundle_key,
                cfg.backend,
                engine_cache_dir=cfg.engine_cache_dir,
                precision=cfg.precision,
            )
        slot = ModelSlot(model, Policy(variant=cfg.variant, map_every_n_ok=cfg.map_every_n_ok))
        metrics = StationMetrics(cfg.station_id)
        source = source if source is not None else open_source(cfg.source)
        sinks = []
        try:
            for uri in cfg.sinks:
                sinks.append(QueuedSink(open_sink(uri, cfg.station_id), cfg.sink_queue, metrics.drop))
            uplink = open_uplink(cfg) if cfg.collector else None
        except BaseException:
            for sink in sinks:
                sink.close(1.0)
            raise
        if uplink is None:
            log.warning("no collector configured: results are neither stored nor sent, only decisions go out")
        results = UplinkResultSink(uplink) if uplink is not None else NoResultSink()
        station = cls(cfg, slot, source, metrics, results, sinks, log_filter, uplink)
        slot.add_listener(station._on_slot_change)
        station._on_slot_change(None, slot.current())
        if uplink is not None:
            metrics.watch_outbox(results.depth, uplink.outbox.drop_counts)
            uplink.event(
                "bundle_loaded", {"bundle_version": model.manifest.version, "backend": model.backend}
            )
        return station

    def _on_slot_change(self, old: SlotState | None, new: SlotState) -> None:
        model = new.model
        if self.log_filter is not None:
            self.log_filter.bundle_version = model.manifest.version
        self.metrics.set_model(model.summary, new.variant)
        if self.uplink is not None:
            self.uplink.set_status(bundle_id=model.manifest.bundle_id, bundle_version=model.manifest.version)
        if old is not None and old.model is not model:
            log.info("active bundle now %s v%s", model.manifest.bundle_id[:8], model.manifest.version)

    def emit(self, scored: Scored) -> None:
        """Pipeline callback (decide thread): the full result to the uplink, the decision to the line."""
        self.results.publish(scored.result, scored.blobs)
        if not scored.result.shadow:
            decision = decision_of(scored.result)
            for sink in self.sinks:
                sink.send(decision)

    def run(self, once: bool = False, stop: threading.Event | None = None) -> dict:
        """Score until the source ends or `stop` is set (SIGINT/SIGTERM set it in the main thread)."""
        stop = stop or threading.Event()
        restore = _install_signals(stop)
        result_opts = ResultOptions(self.cfg.station_id, self.cfg.thumbnail_px)
        pipe_cfg = PipelineConfig(self.cfg.queue_size, self.cfg.backpressure, self.cfg.max_fps)  # type: ignore[arg-type]
        pipeline = Pipeline(self.source, self.slot, self.emit, self.metrics, result_opts, pipe_cfg)
        started = time.monotonic()
        pipeline.start()
        from edge.updater import start_for_station

        updater = start_for_station(self)  # deploy: bundle updates swap into self.slot between frames
        try:
            while not pipeline.join(1.0):
                if self.uplink is not None:
                    self.uplink.set_status(fps=self.metrics.fps())
                if stop.is_set():
                    log.info("stopping: finishing the frames already captured")
                    pipeline.stop()
                    pipeline.join(30.0)
                    break
        finally:
            restore()
            if updater is not None:
                updater.stop()
            seconds = time.monotonic() - started
            delivered = self.close(drain=once and not stop.is_set())
        summary = {**self.metrics.summary(), "seconds": round(seconds, 3), "delivered": delivered}
        n = sum(summary["counts"].values())
        summary["fps"] = round(n / seconds, 3) if seconds > 0 else 0.0
        stats = getattr(self.results, "final_stats", None)
        if stats is not None:
            summary["uplink"] = {k: v for k, v in vars(stats).items() if k != "dropped_by_reason"}
        log.info("station done: %s", summary)
        return summary

    def close(self, drain: bool) -> bool:
        for sink in self.sinks:
            sink.close(5.0)
        return self.results.close(self.cfg.drain_timeout_s, drain)


def _install_signals(stop: threading.Event) -> Any:
    """SIGINT/SIGTERM set `stop` (main thread only); returns a function restoring the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in old:
        signal.signal(sig, lambda *_: stop.set())

    def restore() -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    return restore
