"""`StationConfig`: everything `m3dm edge run` needs, from station.toml, overridden by flags.

Loaded with `protocol.config.load_config(StationConfig, path, overrides)`: unknown keys are refused by
name. The `[uplink]` table holds the delivery settings (`edge.uplink.UplinkConfig`); the outbox bounds
sit in `[outbox]` (`edge.outbox.OutboxLimits`). See deploy/config/station.toml for a commented example.

Without `collector`, results are neither stored nor sent: decisions only reach the sinks (a bench or a
commissioning run). With it, every result goes into the durable outbox (`outbox`, default
`./station-outbox.sqlite`) before it is sent, and `--once` waits until all of them are acked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.errors import ConfigError
from edge.outbox import OutboxLimits
from edge.updater_config import UpdaterConfig
from edge.uplink import UplinkConfig

__all__ = ["StationConfig"]


@dataclass(frozen=True)
class StationConfig:
    station_id: str
    bundle: Path
    source: str
    key: Path | None = None  # bundle signing public key (file or folder); required (see insecure_no_verify)
    backend: str = "auto"  # auto | ort | trt
    precision: str | None = None  # None: the bundle's own graphs; "fp32": an int8 bundle's fp32 graphs
    variant: str | None = None  # None: the bundle's own decision variant (manifest thresholds.variant)
    collector: str | None = None  # tcp://HOST:PORT; None = sinks only, nothing stored or sent
    curve_dir: Path | None = None  # this station's CURVE keypair folder (m3dm keys gen)
    collector_key: Path | None = None  # the collector's public key file or folder
    outbox: Path = Path("station-outbox.sqlite")
    sinks: tuple[str, ...] = ("stdout:",)
    max_fps: float = 0.0  # 0 = as fast as the source gives frames
    queue_size: int = 4  # frames waiting for preprocessing
    backpressure: str = "drop_oldest"  # drop_oldest | block
    map_every_n_ok: int = 10  # attach the anomaly map to 1 in n OK results (0 = never)
    thumbnail_px: int = 128  # NOK thumbnail's longest side (0 = none)
    sink_queue: int = 256
    metrics_port: int | None = None  # None = no /metrics endpoint; 0 = OS-chosen
    metrics_addr: str = "0.0.0.0"
    drain_timeout_s: float = 60.0  # --once: how long to wait for the last acks
    engine_cache_dir: Path | None = None
    log_level: str = "INFO"
    uplink: UplinkConfig = field(default_factory=UplinkConfig)
    outbox_limits: OutboxLimits = field(default_factory=OutboxLimits)
    updater: UpdaterConfig | None = None  # [updater]: check in with a registry, take bundle updates
    # Without a signing key the station refuses to start. This (flag --insecure-no-verify) is the only way
    # to score an unverified bundle: a lab bench, never a line. It logs one loud line at start.
    insecure_no_verify: bool = False

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "ort", "trt"):
            raise ConfigError(f"backend must be auto, ort or trt, not {self.backend!r}")
        if self.precision not in (None, "fp32"):
            raise ConfigError(f"precision must be fp32 (or absent: the bundle's own), not {self.precision!r}")
        if self.backpressure not in ("drop_oldest", "block"):
            raise ConfigError(f"backpressure must be drop_oldest or block, not {self.backpressure!r}")
        if self.queue_size < 1 or self.sink_queue < 1:
            raise ConfigError("queue_size and sink_queue must be >= 1")
        if self.max_fps < 0 or self.map_every_n_ok < 0 or self.thumbnail_px < 0:
            raise ConfigError("max_fps, map_every_n_ok and thumbnail_px must be >= 0")
        if not self.station_id or "/" in self.station_id or "#" in self.station_id or "+" in self.station_id:
            raise ConfigError(f"station_id must be non-empty without '/', '#', '+': {self.station_id!r}")
        upd = self.updater
        if upd is not None and None in (upd.curve_dir or self.curve_dir, upd.signing_key or self.key):
            raise ConfigError("[updater] needs a CURVE keypair (curve_dir) and a bundle signing key (key)")
        if self.collector is not None and (self.curve_dir is None or self.collector_key is None):
            raise ConfigError("a collector needs curve_dir (own keypair) and collector_key (its public key)")
        if self.bundle_key is None and not self.insecure_no_verify:
            raise ConfigError(
                "no bundle signing key: a station never scores an unverified bundle. Give key (--key "
                "PUB, the bundle_signing.pub file or its folder); only on a lab bench, --insecure-no-verify "
                "scores without verification"
            )

    @property
    def bundle_key(self) -> Path | None:
        """The key the start-up bundle is verified with: `key`, else the updater's `signing_key`."""
        if self.key is not None:
            return self.key
        return self.updater.signing_key if self.updater is not None else None
