"""StationConfig: the commented example parses, flags override it, bad values are refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError
from edge.config import StationConfig
from edge.updater_config import UpdaterConfig
from protocol.config import ConfigFileError, load_config

KEY = Path("bundle_signing.pub")  # never opened: StationConfig only checks that one is given
EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "config" / "station.toml"


def test_example_station_toml_parses_and_flags_override() -> None:
    cfg = load_config(
        StationConfig, EXAMPLE, {"station_id": "line9-cam2", "max_fps": 7.5, "sinks": ["stdout:"]}
    )
    assert cfg.station_id == "line9-cam2" and cfg.max_fps == 7.5 and cfg.sinks == ("stdout:",)
    assert cfg.bundle == Path("/var/lib/m3dm/bundles/active") and cfg.uplink.window == 256
    assert cfg.outbox_limits.max_rows == 200000 and cfg.backpressure == "drop_oldest"


def test_unknown_keys_and_bad_values_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "station.toml"
    bad.write_text('station_id = "s"\nbundle = "b"\nsource = "folder:x"\nqueue_sise = 3\n')
    with pytest.raises(ConfigFileError, match="queue_sise"):
        load_config(StationConfig, bad)
    with pytest.raises(ConfigError, match="backpressure"):
        StationConfig(station_id="s", bundle=Path("b"), source="x", key=KEY, backpressure="drop_newest")
    with pytest.raises(ConfigError, match="collector needs curve_dir"):
        StationConfig(
            station_id="s", bundle=Path("b"), source="x", key=KEY, collector="tcp://collector.invalid:1"
        )
    with pytest.raises(ConfigError, match="station_id"):
        StationConfig(station_id="a/b", bundle=Path("b"), source="x", key=KEY)


def test_no_signing_key_is_refused_unless_insecure_no_verify_is_explicit(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="never scores an unverified bundle.*--insecure-no-verify"):
        StationConfig(station_id="s", bundle=Path("b"), source="x")
    lab = StationConfig(station_id="s", bundle=Path("b"), source="x", insecure_no_verify=True)
    assert lab.bundle_key is None
    keyed = StationConfig(station_id="s", bundle=Path("b"), source="x", key=Path("k.pub"))
    assert keyed.bundle_key == Path("k.pub") and not keyed.insecure_no_verify
    # the updater's signing key verifies the start-up bundle too (it is the key the fleet trusts)
    upd = UpdaterConfig(
        "tcp://r.invalid:1", Path("r.key"), tmp_path, curve_dir=tmp_path, signing_key=Path("u")
    )
    assert StationConfig(station_id="s", bundle=Path("b"), source="x", updater=upd).bundle_key == Path("u")
    # a config file cannot drop the key by leaving it out either
    toml = tmp_path / "station.toml"
    toml.write_text('station_id = "s"\nbundle = "b"\nsource = "folder:x"\n')
    with pytest.raises(ConfigError, match="no bundle signing key"):
        load_config(StationConfig, toml)
