"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright (no browser download).

`m3dm collector serve` runs as a real process on SQLite; stations send over CURVE-encrypted ZeroMQ. With the
page open, a fresh NOK result is sent through the collector's ingest endpoint;
the test waits until the auto-refresh shows its card with thumbnail and heatmap actually decoded
(naturalWidth > 0) and the new station's row, then saves a screenshot to test-artifacts/dashboard.png.
Nothing may be fetched from anywhere but 127.0.0.1, and the page must log no script errors.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from collector_procs import Client, Collector, make_keys
from dashboard_samples import (
    BUNDLE_NEW,
    BUNDLE_OLD,
    VARIANT,
    fleet_history,
    history_score,
    http_get,
    inspection,
    ring_point,
    score_quantiles,
    station_bundle,
    station_events,
)

from collector.store import Store
from protocol.messages import Ack, Heartbeat, InspectionResult

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("M3DM_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
WAIT_MS = 15_000
WAIT_S = WAIT_MS / 1000
IMAGE_DECODED_JS = (
    "(sel) => { const i = document.querySelector(sel); return !!i && i.complete && i.naturalWidth > 0; }"
)


def _wait_for_drift_alarm(url: str, station: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        states = json.loads(http_get(url + "/api/drift")[2])
        if any(d["station_id"] == station and d["state"] == "alarm" for d in states):
            return
        time.sleep(0.2)
    raise AssertionError(f"the collector raised no drift alarm for {station}: {states}")


def _require_chromium() -> None:
    if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK):
        return
    message = f"Chromium not found at {CHROMIUM} (.ci/install puts Debian's chromium there)"
    if os.environ.get("CI"):
        pytest.fail(message)  # in CI a missing browser is a broken install, never a skip
    pytest.skip(message)


STATIONS = ("press-01", "press-02", "press-03")
COLLECTOR_TOML = """
drift_window = 200
drift_min_n = 40
drift_interval_s = 1.0
"""


def _send_and_wait(client: Client, items: list, last_seq: int, epoch: int = 1) -> None:
    """Send messages (results with their blobs, events, heartbeats); wait for the ack covering `last_seq`."""
    for msg, blobs in items:
        client.send(msg, blobs)
    client.recv_until(lambda r: isinstance(r, Ack) and r.epoch == epoch and r.upto_seq >= last_seq, WAIT_S)


def _heartbeat(station: str, bundle: tuple[str, str], fps: float) -> tuple[Heartbeat, list[bytes]]:
    beat = Heartbeat(
        sender=station, epoch=1, ts=time.time(), bundle_id=bundle[0], bundle_version=bundle[1], fps=fps
    )
    return beat, []


@pytest.fixture
def collector_serve(tmp_path: Path) -> Iterator[dict]:
    """`m3dm collector serve` as a real process; two stations have sent a few minutes of history over CURVE.

    The drift references are set so that press-01's scores match its bundle's validation normals and
    press-02's do not: the service itself computes PSI and raises press-02's alarm.
    """
    keys = make_keys(tmp_path / "keys", list(STATIONS), allowed=list(STATIONS))
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    store = Store.open(db_url)
    try:
        store.set_drift_reference(*BUNDLE_OLD[:1], VARIANT, score_quantiles(*history_score(0)), 2.0, "test")
        store.set_drift_reference(*BUNDLE_NEW[:1], VARIANT, score_quantiles(0.8, 0.2), 2.3, "test")
    finally:
        store.close()
    (tmp_path / "collector.toml").write_text(COLLECTOR_TOML)
    collector = Collector(tmp_path, db_url, keys)
    clients: dict[str, Client] = {}
    try:
        collector.start(extra=("--config", str(tmp_path / "collector.toml")))
        clients = {name: Client(collector.endpoint, keys[name], keys["collector"]) for name in STATIONS}
        # 200 OK scores per station: enough that sampling noise alone keeps PSI well under its bound
        history = fleet_history(STATIONS[:2], n_ok=200)
        events = station_events(STATIONS[:2])
        for s_index, name in enumerate(STATIONS[:2]):
            mine = [item for item in history if item[0].station_id == name]
            mine += [(e, []) for e in events if e.station_id == name]
            mine.append(_heartbeat(name, station_bundle(s_index), 7.5))
            _send_and_wait(
                clients[name], mine, max(m.seq for m, _ in mine if isinstance(m, InspectionResult))
            )
        yield {"url": collector.http, "clients": clients, "collector": collector}
    finally:
        for client in clients.values():
            client.close()
        collector.stop()


def test_fresh_nok_appears_with_its_heatmap(collector_serve: dict) -> None:
    _require_chromium()
    from playwright.sync_api import sync_playwright

    url, clients = collector_serve["url"], collector_serve["clients"]
    _wait_for_drift_alarm(url, "press-02")
    foreign: list[str] = []
    script_errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=30_000)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.route(
                "**/*",
                lambda route: (
                    route.continue_()
                    if route.request.url.startswith(url)
                    else (foreign.append(route.request.url), route.abort())
                ),
            )
            page.on("pageerror", lambda err: script_errors.append(str(err)))
            page.on("console", lambda msg: script_errors.append(msg.text) if msg.type == "error" else None)
            page.goto(url + "/", wait_until="load", timeout=WAIT_MS)
            page.wait_for_selector('tr.station-row[data-station="press-01"]', timeout=WAIT_MS)
            assert page.locator('tr.station-row[data-station="press-03"]').count() == 0

            # ingest through the collector's ZeroMQ endpoint while the page is open: only the page's own
            # auto-refresh can bring this card in
            fresh, blobs = inspection(
                "press-03", 1, "NOK", 3.4, 2.0, ring_point(2.4), decision_ts=time.time()
            )
            _send_and_wait(clients["press-03"], [_heartbeat("press-03", BUNDLE_OLD, 4.0), (fresh, blobs)], 1)
            card = page.locator(".nok-card", has_text=fresh.frame_id)
            card.wait_for(state="visible", timeout=WAIT_MS)
            key = card.get_attribute("data-key")
            for kind in ("overlay", "thumb"):
                # loaded and decoded, not just present: a broken image has naturalWidth 0
                page.wait_for_function(
                    IMAGE_DECODED_JS, arg=f'.nok-card[data-key="{key}"] img.{kind}', timeout=WAIT_MS
                )
            row = page.locator('tr.station-row[data-station="press-03"]')
            row.wait_for(state="visible", timeout=WAIT_MS)
            assert "online" in row.inner_text()
            # drift as the service computed it: press-02 left its bundle's normal scores, press-01 did not
            assert page.locator('tr[data-station="press-02"] .badge.drift-alarm').count() == 1
            assert page.locator('tr[data-station="press-01"] .badge.drift-ok').count() == 1
            assert page.locator(".nok-card").first.get_attribute("data-key") == key  # newest first
            # histograms are recomputed every few seconds (DashboardSettings.histogram_ttl_s), then refreshed
            page.locator('#histograms .hist-card[data-station="press-03"] rect.bar.nok').wait_for(
                timeout=WAIT_MS
            )
            assert page.locator("#histograms svg.hist").count() == 3

            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=False)
        finally:
            browser.close()
    assert foreign == [], f"the page tried to load from outside the collector: {foreign}"
    assert script_errors == [], script_errors
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
