"""Reconciliation figures of the reliability tests, for RELIABILITY.md.

`record("station_sigkill", sent=..., stored=..., duplicated=...)` writes test-artifacts/reliability/NAME.json
(overwritten by each run) and prints the figures, so `pytest -rA` and `just reliability` show them too.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "test-artifacts" / "reliability"


def record(name: str, **figures: object) -> dict:
    payload = {"name": name, **figures, "recorded_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    payload["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"figures {name}: {json.dumps(figures, default=str)}")
    return payload
