"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright (no browser download).

The collector's HTTP app serves a real Store (SQLite). With the page open, a fresh NOK result is ingested;
the test waits until the auto-refresh shows its card with thumbnail and heatmap actually decoded
(naturalWidth > 0) and the new station's row, then saves a screenshot to test-artifacts/dashboard.png.
Nothing may be fetched from anywhere but 127.0.0.1, and the page must log no script errors.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dashboard_samples import (
    fleet_history,
    inspection,
    ring_point,
    serve_in_thread,
    station_events,
    store_results,
)

from collector.http import create_app
from collector.store import Store

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
IMAGE_DECODED_JS = (
    "(sel) => { const i = document.querySelector(sel); return !!i && i.complete && i.naturalWidth > 0; }"
)


def _require_chromium() -> None:
    if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK):
        return
    message = f"Chromium not found at {CHROMIUM} (.ci/install puts Debian's chromium there)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)  # in CI a missing browser is a broken install, never a skip
    pytest.skip(message)


@pytest.fixture
def collector_http(tmp_path: Path) -> Iterator[tuple[str, Store]]:
    store = Store.open(f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        store_results(store, fleet_history(("press-01", "press-02")), fps=7.5)
        store.insert_batch(events=station_events(("press-01", "press-02")))
        store.set_drift_state(
            {
                "station_id": "press-02",
                "bundle_id": "b" * 16,
                "variant": "rgb+point+fusion",
                "bundle_version": "1.0.0",
                "state": "alarm",
                "psi": 0.31,
                "ks": 0.22,
                "n": 120,
                "reason": "PSI 0.31 > 0.25",
            }
        )
        store.set_drift_state(
            {
                "station_id": "press-01",
                "bundle_id": "b" * 16,
                "variant": "rgb+point+fusion",
                "bundle_version": "1.0.0",
                "state": "ok",
                "psi": 0.04,
                "ks": 0.06,
                "n": 120,
                "reason": "",
            }
        )
        with serve_in_thread(create_app(store)) as url:
            yield url, store
    finally:
        store.close()


def test_fresh_nok_appears_with_its_heatmap(collector_http: tuple[str, Store]) -> None:
    _require_chromium()
    from playwright.sync_api import sync_playwright

    url, store = collector_http
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

            # ingest while the page is open: only the auto-refresh can bring this card in
            fresh, blobs = inspection(
                "press-03", 1, "NOK", 3.4, 2.0, ring_point(2.4), decision_ts=time.time()
            )
            store_results(store, [(fresh, blobs)], fps=4.0)
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
            assert "alarm" in page.locator('tr.station-row[data-station="press-02"]').inner_text()
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
