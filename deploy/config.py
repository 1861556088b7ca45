"""The registry's configuration: one TOML file (`deploy/config/registry.toml`), flags override."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["RegistryConfig"]


@dataclass(frozen=True)
class RegistryConfig:
    """Where the registry listens, keeps bundles and state, and whom it lets in.

    curve_dir: holds the registry's own CURVE keypair (exactly one `*.key_secret`).
    allow_dir: public keys of stations allowed to connect (re-read when it changes).
    signing_key: the trusted bundle signing public key (`bundle_signing.pub` or its folder); publish refuses
        bundles it does not verify.
    collector_db: the collector's database, for rollout health and shadow comparisons (default: `db`).
    """

    store: Path = Path("/var/lib/m3dm/bundles")
    db: str = "sqlite:////var/lib/m3dm/fleet.db"
    bind: str = "tcp://*:5560"
    curve_dir: Path = Path("/etc/m3dm/keys/registry")
    allow_dir: Path = Path("/etc/m3dm/keys/stations")
    signing_key: Path = Path("/etc/m3dm/keys/bundle_signing.pub")
    collector_db: str | None = None
    checkin_s: float = 5.0
    tick_s: float = 0.25
    ready_file: Path | None = None  # written (JSON: zmq endpoint, pid) once the socket is bound

    def __post_init__(self) -> None:
        if self.checkin_s <= 0 or self.tick_s <= 0:
            raise ValueError("checkin_s and tick_s must be > 0")
