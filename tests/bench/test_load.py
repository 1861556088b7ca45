"""bench/load.py in reduced form: 2 stations x 5 fps x 3 s into `m3dm collector serve`, 0 lost, acks timed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "load.py"


@pytest.mark.integration
def test_load_bench_reconciles_exactly(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    cmd = [sys.executable, str(BENCH), "--stations", "2", "--fps", "5", "--seconds", "3", "--drain-s", "30"]
    cmd += ["--nok-every", "3", "--json-out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["reconciliation"] == {"sent": 30, "stored": 30, "lost": 0, "unexpected": 0, "duplicated": 0}
    assert report["all_drained"] and report["station_exit_codes"] == [0, 0]
    assert report["ack_ms"]["n"] == 30 and 0 < report["ack_ms"]["p50"] <= report["ack_ms"]["p99"]
    assert report["collector_rss_mb"]["max"] > 10  # psutil really sampled the collector process
    assert report["settings"]["collector"].startswith("m3dm collector serve")
