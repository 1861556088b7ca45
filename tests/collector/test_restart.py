"""Done-when: stations keep sending while the collector is SIGKILLed twice and restarted; the database ends
with exactly the set of results the stations stored in their outboxes (0 lost, 0 duplicated).

The stations are real processes on the real delivery path (`edge.outbox` + `edge.uplink`, CURVE DEALER),
driven by `tests/reliability/station_driver.py`; the collector is `m3dm collector serve`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from collector_procs import Collector, make_keys

from collector.store import Store

DRIVER = Path(__file__).resolve().parents[1] / "reliability" / "station_driver.py"
STATIONS = ["line-a", "line-b"]
COUNT, RATE = 800, 250.0  # 3.2 s of sending per station


@pytest.mark.integration
def test_collector_sigkilled_twice_loses_and_duplicates_nothing(db_url: str, tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys", STATIONS, allowed=STATIONS)
    collector = Collector(tmp_path, db_url, keys).start()
    drivers: list[subprocess.Popen] = []
    try:
        for name in STATIONS:
            cmd = [
                sys.executable,
                str(DRIVER),
                "--outbox",
                str(tmp_path / f"{name}.outbox"),
                "--station-id",
                name,
            ]
            cmd += ["--collector", collector.endpoint, "--curve-dir", str(keys[name])]
            cmd += ["--collector-key", str(keys["collector"]), "--count", str(COUNT), "--rate", str(RATE)]
            cmd += ["--run", name, "--drain-s", "60", "--ack-timeout-s", "1.0"]
            with (tmp_path / f"{name}.jsonl").open("wb") as out, (tmp_path / f"{name}.log").open("wb") as err:
                drivers.append(subprocess.Popen(cmd, stdout=out, stderr=err))  # the child keeps its copies
        for _ in range(2):
            time.sleep(1.0)
            collector.kill()  # SIGKILL: whatever was in flight or uncommitted is gone from the collector
            time.sleep(0.5)  # the stations keep submitting into their outboxes meanwhile
            collector.start()
        for proc in drivers:
            assert proc.wait(timeout=90) == 0, "a station did not drain its outbox"
    finally:
        for proc in drivers:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        collector.stop()
    sent = set()
    for name in STATIONS:
        lines = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        sent |= {(name, r["epoch"], r["seq"]) for r in lines if "seq" in r}
        assert lines[-1]["drained"] is True
    store = Store.open(db_url)
    try:
        stored = store.identities()
        assert store.count() == len(stored)
    finally:
        store.close()
    assert len(sent) == COUNT * len(STATIONS)
    assert len(stored) == len(set(stored)), "duplicates stored"
    assert set(stored) == sent, f"lost {len(sent - set(stored))}, unexpected {len(set(stored) - sent)}"
    assert collector.starts == 3
    assert "Traceback" not in collector.log_text()
