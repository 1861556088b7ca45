"""Dashboard routes over HTTP on a real Store (SQLite): the page, partials, images, and 404 for bad keys."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from dashboard_samples import (
    BUNDLE_NEW,
    VARIANT,
    fleet_history,
    http_get,
    inspection,
    ring_point,
    serve_in_thread,
    station_events,
    store_results,
)
from PIL import Image

from collector.dashboard.histogram_svg import render_histogram_svg
from collector.http import create_app
from collector.schema import blobs, inspections, metadata
from collector.store import Store

DRIFT_ALARM = {
    "station_id": "press-02",
    "bundle_id": BUNDLE_NEW[0],
    "variant": VARIANT,
    "bundle_version": BUNDLE_NEW[1],
    "state": "alarm",
    "psi": 0.41,
    "ks": 0.3,
    "n": 500,
    "reason": "PSI above 0.25",
}


def _empty_pg(url: str) -> str:
    """The session's PostgreSQL database (tests/collector/conftest.py), emptied for this module."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        names = ", ".join(table.name for table in metadata.sorted_tables)
        conn.execute(sa.text(f"TRUNCATE {names} RESTART IDENTITY"))
    engine.dispose()
    return url


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Store]]:
    """The collector's HTTP app on a real Store, once on SQLite and once on PostgreSQL (same queries)."""
    if request.param == "sqlite":
        url = f"sqlite:///{Path(tmp_path_factory.mktemp('dash')) / 'fleet.db'}"
    else:
        url = _empty_pg(request.getfixturevalue("pg_database"))
    store = Store.open(url)
    try:
        store_results(store, fleet_history(), fps=7.5)
        store.insert_batch(events=station_events())
        # a NOK without images and one whose stored map is corrupt: both must give 404, not 500
        store_results(store, [inspection("press-03", 1, "NOK", 3.1, 2.0, None, with_images=False)])
        store_results(store, [inspection("press-03", 2, "NOK", 3.2, 2.0, ring_point(1.0))])
        with store.engine.begin() as conn:
            key = conn.execute(
                sa.select(inspections.c.map_key).where(
                    inspections.c.station_id == "press-03", inspections.c.seq == 2
                )
            ).scalar_one()
            conn.execute(sa.update(blobs).where(blobs.c.key == key).values(data=b"\x89PNG\r\n\x1a\n broken"))
        store.set_drift_state(DRIFT_ALARM)
        # the collector's own HTTP app: the dashboard plugs in through collector.dashboard.routes(store)
        with serve_in_thread(create_app(store)) as url:
            yield url, store
    finally:
        store.close()


def _id_of(store: Store, station: str, seq: int) -> int:
    with store.engine.connect() as conn:
        query = sa.select(inspections.c.id).where(
            inspections.c.station_id == station, inspections.c.seq == seq
        )
        return int(conn.execute(query).scalar_one())


def test_index_shows_fleet_feed_and_histograms(served: tuple[str, Store]) -> None:
    url, store = served
    status, ctype, body = http_get(url + "/")
    page = body.decode()
    assert status == 200 and ctype.startswith("text/html")
    for station in ("press-01", "press-02", "press-03"):
        assert f'data-station="{station}"' in page
    # press-02 drifts: its row is listed first and shows the alarm with its statistic
    rows = re.findall(r'<tr class="station-row" data-station="([^"]+)"', page)
    assert rows[0] == "press-02"
    assert "drift-alarm" in page and "PSI 0.410" in page
    assert "7.5" in page  # heartbeat fps
    assert page.count('class="nok-card"') == min(12, store.count(decision="NOK"))
    assert "/dashboard/static/dashboard.js" in page and "http" not in re.sub(
        r"http://127\.0\.0\.1:\d+", "", page
    )


def test_events_panel_lists_newest_first_with_tones(served: tuple[str, Store]) -> None:
    url, _ = served
    _, _, body = http_get(url + "/dashboard/partials/events")
    html = body.decode()
    kinds = re.findall(r'<span class="badge ev-(\w+)">([^<]+)</span>', html)
    assert kinds == [
        ("neutral", "source_ended"),
        ("bad", "update_failed"),
        ("good", "bundle_loaded"),
        ("good", "bundle_loaded"),
    ]
    assert "reason=signature mismatch" in html


def test_dashboard_sits_next_to_the_api(served: tuple[str, Store]) -> None:
    url, _ = served
    status, ctype, _ = http_get(url + "/api/stations")
    assert status == 200 and ctype.startswith("application/json")


def test_partials_and_static_files(served: tuple[str, Store]) -> None:
    url, _ = served
    for name in ("summary", "fleet", "nok", "histograms", "events"):
        status, ctype, body = http_get(f"{url}/dashboard/partials/{name}")
        assert status == 200 and ctype.startswith("text/html"), name
        assert b"<html" not in body, "a partial is a fragment"
    _, _, hist = http_get(url + "/dashboard/partials/histograms")
    assert hist.count(b"<svg") == 3 and b'class="thr"' in hist
    for name, ctype_start in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        status, ctype, _ = http_get(f"{url}/dashboard/static/{name}")
        assert status == 200 and ctype.startswith(ctype_start)


def test_overlay_and_thumbnail_images(served: tuple[str, Store]) -> None:
    url, store = served
    key = _id_of(store, "press-01", 61)
    status, ctype, png = http_get(f"{url}/dashboard/overlay/{key}.png")
    assert status == 200 and ctype == "image/png"
    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG" and min(img.size) >= 160
        pixels = np.asarray(img.convert("RGB")).astype(int)
    # the heat is on the dent: the most colourful (red-minus-blue) pixel lies near it
    hot = np.unravel_index(np.argmax(pixels[..., 0] - pixels[..., 2]), pixels.shape[:2])
    dent = np.array(ring_point(0.9)) * np.array(pixels.shape[:2])
    assert np.hypot(*(np.array(hot) - dent)) < 0.08 * pixels.shape[0]
    status, ctype, jpeg = http_get(f"{url}/dashboard/thumb/{key}.jpg")
    assert status == 200 and ctype == "image/jpeg" and jpeg[:3] == b"\xff\xd8\xff"


@pytest.mark.parametrize(
    "path",
    [
        "/dashboard/overlay/abc.png",
        "/dashboard/overlay/-1.png",
        "/dashboard/overlay/0.png",
        "/dashboard/overlay/999999.png",
        "/dashboard/overlay/99999999999999999999999.png",
        "/dashboard/overlay/1.jpg",
        "/dashboard/thumb/%00.jpg",
        "/dashboard/thumb/999999.jpg",
        "/dashboard/static/../queries.py",
    ],
)
def test_bad_keys_are_404(served: tuple[str, Store], path: str) -> None:
    url, _ = served
    assert http_get(url + path)[0] == 404


def test_missing_and_corrupt_images_are_404(served: tuple[str, Store]) -> None:
    url, store = served
    no_images, corrupt = _id_of(store, "press-03", 1), _id_of(store, "press-03", 2)
    assert http_get(f"{url}/dashboard/overlay/{no_images}.png")[0] == 404
    assert http_get(f"{url}/dashboard/thumb/{no_images}.jpg")[0] == 404
    assert http_get(f"{url}/dashboard/overlay/{corrupt}.png")[0] == 404
    assert http_get(f"{url}/dashboard/thumb/{corrupt}.jpg")[0] == 200  # its thumbnail is fine
    # the feed shows placeholders for the missing images instead of broken <img> tags
    _, _, feed = http_get(url + "/dashboard/partials/nok")
    assert b"no thumbnail" in feed and b"no map" in feed


def test_histogram_svg_stacks_nok_on_ok_and_draws_threshold() -> None:
    svg = render_histogram_svg([0.0, 1.0, 2.0, 3.0], [5, 2, 0], [0, 1, 3], 2.0, "st<1>")
    assert svg.count('class="bar ok"') == 2 and svg.count('class="bar nok"') == 2
    assert "threshold 2" in svg and "st&lt;1&gt;" in svg and "<1>" not in svg
    assert "no scores yet" in render_histogram_svg([0.0, 1.0], [0], [0], None)
    with pytest.raises(ValueError):
        render_histogram_svg([0.0, 1.0], [1, 2], [0, 0], None)
