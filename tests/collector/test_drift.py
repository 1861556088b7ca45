"""Drift alarms: a shifted OK-score stream raises one (stored, queryable, exported), an unshifted one none."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from collector.drift import DriftConfig, drift_stats, evaluate_drift, load_references
from collector.metrics import CollectorMetrics
from collector.store import Store

THRESHOLD = 1.3
BUNDLE = "c" * 32
QUANTILES = np.quantile(np.random.default_rng(0).normal(1.0, 0.1, 20_000), np.linspace(0, 1, 21)).tolist()


def _ok_stream(rng: np.random.Generator, shift: float, n: int) -> np.ndarray:
    scores = rng.normal(1.0 + shift, 0.1, 4 * n)
    return scores[scores <= THRESHOLD][:n]  # only OK parts (score <= threshold) enter the window


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_statistics_separate_shifted_from_unshifted(seed: int) -> None:
    rng = np.random.default_rng(seed)
    same = drift_stats(_ok_stream(rng, 0.0, 500), QUANTILES, THRESHOLD)
    shifted = drift_stats(_ok_stream(rng, 0.15, 500), QUANTILES, THRESHOLD)
    assert same is not None and shifted is not None
    assert same.psi < 0.1 and same.ks < 0.08
    assert shifted.psi > 1.0 and shifted.ks > 0.3


def test_a_reference_with_no_mass_under_the_threshold_is_unusable() -> None:
    assert drift_stats([0.1, 0.2], QUANTILES, threshold=0.5) is None


def _feed(
    store: Store, station: str, scores: np.ndarray, record, start_seq: int = 1, later_s: float = 0
) -> None:
    now = time.time() + later_s
    rows = [
        record(
            start_seq + i,
            station=station,
            score=float(s),
            ts=now - len(scores) + i,
            bundle_id=BUNDLE,
            threshold=THRESHOLD,
        )
        for i, s in enumerate(scores)
    ]
    store.insert_batch(rows)


def test_shifted_station_raises_an_alarm_and_clears_it(store: Store, record, tmp_path) -> None:
    manifest = {
        "bundle_id": BUNDLE,
        "thresholds": {
            "variant": "rgb+point+fusion",
            "image_threshold": THRESHOLD,
            "score_quantiles": {"rgb+point+fusion": QUANTILES},
        },
    }
    (tmp_path / "b1").mkdir()
    (tmp_path / "b1" / "manifest.json").write_text(json.dumps(manifest))
    assert load_references(store, tmp_path) == 1
    rng = np.random.default_rng(7)
    _feed(store, "steady", _ok_stream(rng, 0.0, 300), record)
    _feed(store, "drifting", _ok_stream(rng, 0.15, 300), record)
    _feed(store, "young", _ok_stream(rng, 0.15, 50), record)
    _feed(
        store,
        "other-bundle",
        _ok_stream(rng, 0.15, 300),
        lambda *a, **k: record(*a, **{**k, "bundle_id": "d" * 32}),
    )
    metrics = CollectorMetrics()
    states = {s["station_id"]: s for s in evaluate_drift(store, DriftConfig(window=300, min_n=200), metrics)}
    assert states["steady"]["state"] == "ok"
    assert states["drifting"]["state"] == "alarm" and states["drifting"]["psi"] > 0.25
    assert states["young"]["state"] == "unknown" and "50 OK scores" in states["young"]["reason"]
    assert states["other-bundle"]["state"] == "unknown" and "no reference" in states["other-bundle"]["reason"]
    assert metrics.drift_alarms._value.get() == 1
    raised = [e for e in store.events(station="drifting") if e["kind"] == "drift_alarm_raised"]
    assert len(raised) == 1 and float(raised[0]["detail"]["psi"]) > 0.25
    assert not store.events(station="steady")
    assert {s["station_id"]: s["state"] for s in store.drift_states()}["drifting"] == "alarm"
    # queryable from the command line
    from typer.testing import CliRunner

    from collector.cli import app

    out = CliRunner().invoke(
        app, ["drift", "--db", store.engine.url.render_as_string(hide_password=False), "--json"]
    )
    assert out.exit_code == 0, out.stderr
    assert {d["station_id"]: d["state"] for d in json.loads(out.stdout)}["drifting"] == "alarm"
    # a second round changes nothing: no second event
    evaluate_drift(store, DriftConfig(window=300, min_n=200))
    assert len(store.events(station="drifting")) == 1
    # the station comes back to normal: the newest window is unshifted again, the alarm clears
    _feed(store, "drifting", _ok_stream(rng, 0.0, 300), record, start_seq=1000, later_s=400)
    later = {s["station_id"]: s for s in evaluate_drift(store, DriftConfig(window=300, min_n=200), metrics)}
    assert later["drifting"]["state"] == "ok"
    assert [e["kind"] for e in store.events(station="drifting")] == [
        "drift_alarm_cleared",
        "drift_alarm_raised",
    ]
    assert metrics.drift_alarms._value.get() == 0
