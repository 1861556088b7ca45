"""`m3dm demo --quick` end to end: the whole local fleet, checked against the collector's database.

Runs the real command as a process (it starts the collector, registry and 3 stations itself), then
checks independently of the demo's own summary: every test scan is stored exactly once per station that
replayed it, with the decision and score that offline scoring of the same file through the same bundle
gives, and no process or port is left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _children_of(pid: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def test_quick_demo_stores_every_scan_once_with_the_offline_decision(tmp_path: Path) -> None:
    from collector.db import make_engine
    from collector.schema import inspections as t
    from core.mvtec3d import list_samples
    from trainer.demo_feeds import offline_decisions

    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, "-m", "m3dm", "demo", "--quick", "--out", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert _children_of(os.getpid()) == []  # nothing outlives the demo

    engine = make_engine(summary["db"])
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(t.c.station_id, t.c.frame_id, t.c.decision, t.c.image_score, t.c.bundle_version).where(
                t.c.shadow.is_(False)
            )
        ).all()
    parts = [r for r in rows if not r.frame_id.startswith("warmup/")]
    stations = summary["plan"]["stations"]
    keys = out / "keys"
    for class_name in set(stations.values()):
        bundle = Path(summary["bundles"][class_name]["v2"])
        offline = offline_decisions(bundle, keys, out / "data", class_name)
        refs = list_samples(out / "data", class_name, "test")
        mine = [r for r in parts if stations[r.station_id] == class_name]
        # Stations of one class share its scans: together they store each one exactly once.
        frame_keys = sorted(f"{r.station_id}:{r.frame_id}" for r in mine)
        assert len(frame_keys) == len(set(frame_keys)) == len(refs)
        by_frame = {f"{ref.defect_type}/{ref.rgb_path.stem}": offline[ref.rgb_path.resolve()] for ref in refs}
        for r in mine:
            assert r.bundle_version == "1.1.0"  # the rolled-out bundle scored the parts
            assert r.decision == by_frame[r.frame_id].decision, r
            assert r.image_score == pytest.approx(by_frame[r.frame_id].image_score, abs=1e-4)
    # The rollout went canary-first: station-1 alone in wave 0, station-2 in the next wave.
    ring = summary["rollouts"]["ring"]
    assert ring["state"] == "done"
    waves = {s["station_id"]: s["wave"] for s in ring["stations"]}
    assert waves["station-1"] < waves["station-2"]
    assert summary["all_agree"] is True
