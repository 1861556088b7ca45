"""The station's /metrics endpoint exports the outbox's drop counters, by decision, read from the outbox."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from edge.metrics import StationMetrics
from edge.outbox import Outbox, OutboxLimits


def result_fields(i: int, decision: str) -> dict:
    return {
        "frame_id": f"f{i:03d}",
        "capture_ts": 1000.0 + i,
        "decision_ts": 1000.5 + i,
        "bundle_id": "b",
        "bundle_version": "1",
        "variant": "rgb+point+fusion",
        "decision": decision,
        "image_score": None if decision == "ERROR" else float(i),
    }


def scrape(metrics: StationMetrics) -> str:
    server, port = metrics.serve(0, "127.0.0.1")
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
        server.server_close()


def test_metrics_endpoint_serves_outbox_drops_by_decision_and_they_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "ob.db"
    with Outbox(path, "st", OutboxLimits(max_rows=2)) as ob:
        metrics = StationMetrics("st")
        metrics.watch_outbox(ob.depth, ob.drop_counts)
        before = scrape(metrics)
        # 2 rows kept: the three OK go first, then the older ERROR; both NOK stay.
        for i, decision in enumerate(["OK", "NOK", "OK", "ERROR", "OK", "NOK"]):
            ob.add_result(result_fields(i, decision))
        after = scrape(metrics)
        dead = ob.dead_letter(ob.epoch, 6, "bad_message", "refused by the test")
        after_dead = scrape(metrics)
    assert 'm3dm_station_outbox_dropped_total{decision="OK"} 0.0' in before
    assert 'm3dm_station_outbox_dropped_total{decision="OK"} 3.0' in after
    assert 'm3dm_station_outbox_dropped_total{decision="ERROR"} 1.0' in after
    assert 'm3dm_station_outbox_dropped_total{decision="NOK"} 0.0' in after
    assert "m3dm_station_outbox_dropped_disk_full_total 0.0" in after
    assert "m3dm_station_outbox_depth 2.0" in after
    assert dead and "m3dm_station_outbox_dead_letters_total 1.0" in after_dead
    assert "# TYPE m3dm_station_outbox_dropped_total counter" in after
    # a restarted station's counters start where the outbox file left them, not at 0
    with Outbox(path, "st", OutboxLimits(max_rows=2)) as ob:
        metrics = StationMetrics("st")
        metrics.watch_outbox(ob.depth, ob.drop_counts)
        restarted = scrape(metrics)
    assert 'm3dm_station_outbox_dropped_total{decision="OK"} 3.0' in restarted


def test_without_an_outbox_no_drop_series_is_exported() -> None:
    text = scrape(StationMetrics("st"))
    assert "m3dm_station_frames" in text and "m3dm_station_outbox_dropped" not in text
