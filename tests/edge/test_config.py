"""StationConfig: the commented example parses, flags override it, bad values are refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError
from edge.config import StationConfig
from protocol.config import ConfigFileError, load_config

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
        StationConfig(station_id="s", bundle=Path("b"), source="x", backpressure="drop_newest")
    with pytest.raises(ConfigError, match="collector needs curve_dir"):
        StationConfig(station_id="s", bundle=Path("b"), source="x", collector="tcp://collector.invalid:1")
    with pytest.raises(ConfigError, match="station_id"):
        StationConfig(station_id="a/b", bundle=Path("b"), source="x")
