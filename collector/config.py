"""The collector's configuration: one frozen dataclass, from `collector.toml` and then the command's flags.

See `deploy/config/collector.toml` for a commented example. Durations are seconds; None disables a cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["CollectorConfig"]


@dataclass(frozen=True)
class CollectorConfig:
    bind: str = "tcp://*:5601"  # ZeroMQ ROUTER endpoint the stations connect to
    db: str = "sqlite:///fleet.db"  # sqlite:///PATH or postgresql+psycopg://USER:PASS@HOST:PORT/DB
    http: str = "127.0.0.1:8600"  # HOST:PORT of /metrics, the JSON API and the dashboard; "" disables
    curve_dir: Path | None = None  # the collector's own CURVE keypair (folder with one *.key_secret)
    allow: Path | None = None  # folder of allowed station public keys (*.key), re-read when it changes
    bundles: Path | None = None  # folder scanned for bundle manifests (drift reference quantiles)
    # group commit: one transaction per `max_batch` messages or per `max_delay_ms`, whichever comes first
    max_batch: int = 500
    max_delay_ms: float = 5.0
    rcvhwm: int = 20_000  # messages queued in the ROUTER before stations are pushed back
    offline_after_s: float = 15.0  # a station is offline once nothing has arrived for this long
    # retention, applied every `retention_interval_s`: NOK and ERROR rows are kept longer than OK rows
    ok_max_age_s: float | None = 7 * 86400.0
    nok_max_age_s: float | None = 90 * 86400.0
    max_rows: int | None = None
    event_max_age_s: float | None = 90 * 86400.0
    retention_interval_s: float = 300.0
    # drift: each station's newest `drift_window` OK scores against its bundle's validation quantiles
    drift_window: int = 500
    drift_min_n: int = 200
    drift_psi_max: float = 0.25
    drift_ks_max: float | None = None
    drift_interval_s: float = 10.0
    ready_file: Path | None = None  # written (JSON: zmq endpoint, http port) once the service listens

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_delay_ms <= 0:
            raise ValueError("max_batch must be >= 1 and max_delay_ms > 0")
        if self.drift_window < self.drift_min_n or self.drift_min_n < 10:
            raise ValueError("need 10 <= drift_min_n <= drift_window")
        if self.drift_psi_max <= 0:
            raise ValueError("drift_psi_max must be > 0")
