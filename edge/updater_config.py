"""`UpdaterConfig`: the `[updater]` table of station.toml (kept apart so loading a config stays light)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["UpdaterConfig"]


@dataclass(frozen=True)
class UpdaterConfig:
    """The `[updater]` table of station.toml.

    registry: the registry's ROUTER endpoint; registry_key: its CURVE public key file;
    state_dir: bundles kept, downloads, staging, active.json, updates.lock;
    curve_dir: this station's CURVE keypair; signing_key: the trusted bundle signing public key (both
    default to the station's own settings). An updater never installs an unverified bundle.
    """

    registry: str
    registry_key: Path
    state_dir: Path
    curve_dir: Path | None = None  # None: the station's own `curve_dir`
    signing_key: Path | None = None  # None: the station's bundle `key`
    tags: tuple[str, ...] = ()
    checkin_s: float = 5.0
    request_timeout_s: float = 5.0
    backend: str = "auto"
    precision: str | None = None  # the station's StationConfig.precision (filled in at start)

    def __post_init__(self) -> None:
        if self.checkin_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("updater checkin_s and request_timeout_s must be > 0")
