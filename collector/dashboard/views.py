"""The dashboard's Starlette routes: the page, its auto-refreshed partials, and the part images.

    /                                      the dashboard (server-rendered; dashboard.js refreshes the blocks)
    /dashboard/partials/{summary,fleet,nok,histograms,events}   HTML fragments
    /dashboard/overlay/{id}.png            heatmap blended over the thumbnail of inspection `id`
    /dashboard/thumb/{id}.jpg              the RGB thumbnail of inspection `id`
    /dashboard/static/...                  CSS and JS shipped in this package (nothing from the internet)

Endpoints are plain functions, so Starlette runs their blocking database reads in its thread pool. Any key
that names no stored image, including a malformed one, answers 404, never 500.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from threading import Lock
from typing import Any

from markupsafe import Markup
from sqlalchemy.engine import Engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from collector.dashboard import queries
from collector.dashboard.histogram_svg import render_histogram_svg
from collector.dashboard.overlay import render_overlay_png, thumbnail_jpeg

__all__ = ["DashboardSettings", "create_dashboard_app", "dashboard_routes"]

log = logging.getLogger("m3dm.collector.dashboard")
_HERE = Path(__file__).parent
_IMAGE_CACHE = "public, max-age=86400, immutable"  # an inspection's images never change once stored


@dataclass(frozen=True)
class DashboardSettings:
    refresh_ms: int = 2000
    window_s: float = 3600.0  # NOK rate, p95 latency and histograms cover this much history
    online_after_s: float = 15.0  # a station not heard from for longer is offline
    nok_feed_size: int = 12
    events_shown: int = 8
    histogram_bins: int = 30
    fleet_ttl_s: float = 1.0  # fleet rows are recomputed at most this often, however many browsers poll
    histogram_ttl_s: float = 3.0


def _ago(seconds: float) -> str:
    if seconds < 1.5:
        return "just now"
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} d ago"


def _event_tone(kind: str) -> str:
    """Badge colour of an event kind: failures red, loads and successes green, the rest neutral."""
    lowered = kind.lower()
    if any(word in lowered for word in ("fail", "error", "reject", "rollback", "revoked", "alarm_raised")):
        return "bad"
    if any(word in lowered for word in ("loaded", "success", "promoted", "started", "applied", "cleared")):
        return "good"
    return "neutral"


def _window_label(window_s: float) -> str:
    return f"{window_s / 3600:g} h" if window_s >= 3600 else f"{window_s / 60:g} min"


class _OverlayCache:
    """A small LRU of rendered overlays: the feed shows the same few parts on every refresh."""

    def __init__(self, size: int = 128) -> None:
        self._items: OrderedDict[int, bytes] = OrderedDict()
        self._size = size
        self._lock = Lock()

    def get(self, key: int) -> bytes | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: int, png: bytes) -> None:
        with self._lock:
            self._items[key] = png
            while len(self._items) > self._size:
                self._items.popitem(last=False)


class _Ttl:
    """One value recomputed at most every `ttl_s` (callers in the same window share it)."""

    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        self._value: Any = None
        self._computed_ts = float("-inf")
        self._lock = Lock()

    def get(self, now: float, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if not 0.0 <= now - self._computed_ts < self._ttl_s:
                self._value = compute()
                self._computed_ts = now
            return self._value


class _Dashboard:
    def __init__(self, engine: Engine, settings: DashboardSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.templates = Jinja2Templates(directory=str(_HERE / "templates"))
        self.overlays = _OverlayCache()
        # Every open browser polls every refresh_ms: share one computation per time-to-live between them.
        # The summary and fleet partials need the same rows; hour-long histograms barely move in seconds.
        self._fleet = _Ttl(settings.fleet_ttl_s)
        self._hists = _Ttl(settings.histogram_ttl_s)

    def _fleet_rows(self, now: float) -> list[queries.StationRow]:
        s = self.settings
        return self._fleet.get(
            now, lambda: queries.fleet_rows(self.engine, s.window_s, s.online_after_s, now)
        )

    def _fleet_context(self, now: float) -> dict:
        rows = self._fleet_rows(now)
        stations = [dict(vars(r), last_seen_label=_ago(r.last_seen_s_ago)) for r in rows]
        summary = queries.fleet_summary(rows)
        return {
            "stations": stations,
            "summary": {
                "stations": summary.stations,
                "online": summary.online,
                "results_1h": summary.results,
                "nok_1h": summary.nok,
                "drift_alarms": summary.drift_alarms,
            },
        }

    def _nok_context(self, now: float) -> dict:
        items = queries.recent_nok(self.engine, self.settings.nok_feed_size)
        noks = [
            dict(vars(n), key=str(n.inspection_id), ago_label=_ago(max(0.0, now - n.decision_ts)))
            for n in items
        ]
        return {"noks": noks}

    def _histogram_context(self, now: float) -> dict:
        s = self.settings
        hists = self._hists.get(
            now, lambda: queries.score_histograms(self.engine, s.window_s, s.histogram_bins, now)
        )
        cards = [
            {
                "station_id": h.station_id,
                "total": h.total,
                "svg": Markup(
                    render_histogram_svg(h.edges, h.ok_counts, h.nok_counts, h.threshold, h.station_id)
                ),
            }
            for h in hists
        ]
        return {"histograms": cards}

    def _events_context(self, now: float) -> dict:
        items = queries.recent_events(self.engine, self.settings.events_shown)
        rows = [
            dict(
                vars(e),
                ago_label=_ago(max(0.0, now - e.ts)),
                tone=_event_tone(e.kind),
                detail_text=", ".join(f"{k}={v}" for k, v in sorted(e.detail.items())),
            )
            for e in items
        ]
        return {"events": rows}

    def _base_context(self, now: float) -> dict:
        return {
            "refresh_ms": self.settings.refresh_ms,
            "window_label": _window_label(self.settings.window_s),
            "now_label": time.strftime("%H:%M:%S", time.localtime(now)),
        }

    def _render(self, request: Request, name: str, context: dict) -> Response:
        response = self.templates.TemplateResponse(request, name, context)
        response.headers["Cache-Control"] = "no-store"
        return response

    def index(self, request: Request) -> Response:
        now = time.time()
        context = self._base_context(now)
        context |= self._fleet_context(now) | self._nok_context(now) | self._histogram_context(now)
        context |= self._events_context(now)
        return self._render(request, "index.html", context)

    def summary(self, request: Request) -> Response:
        now = time.time()
        return self._render(
            request, "partials/summary.html", self._base_context(now) | self._fleet_context(now)
        )

    def fleet(self, request: Request) -> Response:
        now = time.time()
        return self._render(
            request, "partials/fleet.html", self._base_context(now) | self._fleet_context(now)
        )

    def nok(self, request: Request) -> Response:
        now = time.time()
        return self._render(
            request, "partials/nok_feed.html", self._base_context(now) | self._nok_context(now)
        )

    def histograms(self, request: Request) -> Response:
        now = time.time()
        context = self._base_context(now) | self._histogram_context(now)
        return self._render(request, "partials/histograms.html", context)

    def events(self, request: Request) -> Response:
        now = time.time()
        return self._render(
            request, "partials/events.html", self._base_context(now) | self._events_context(now)
        )

    def _images(self, key: str, want_map: bool) -> queries.InspectionImages | None:
        if not key.isdigit() or len(key) > 19:
            return None
        try:
            return queries.inspection_images(self.engine, int(key), want_map)
        except ValueError as err:
            log.warning("dashboard image %s unreadable: %s", key, err)
            return None

    def overlay(self, request: Request) -> Response:
        key = request.path_params["key"]
        cached = self.overlays.get(int(key)) if key.isdigit() and len(key) <= 19 else None
        if cached is not None:
            return Response(cached, media_type="image/png", headers={"Cache-Control": _IMAGE_CACHE})
        images = self._images(key, want_map=True)
        if images is None or images.map_codes is None:
            return PlainTextResponse("no anomaly map for this key", status_code=404)
        try:
            png = render_overlay_png(images.map_codes, images.thumbnail)
        except ValueError as err:
            log.warning("dashboard overlay %s not rendered: %s", key, err)
            return PlainTextResponse("anomaly map or thumbnail unreadable", status_code=404)
        self.overlays.put(int(key), png)
        return Response(png, media_type="image/png", headers={"Cache-Control": _IMAGE_CACHE})

    def thumb(self, request: Request) -> Response:
        key = request.path_params["key"]
        images = self._images(key, want_map=False)
        if images is None or images.thumbnail is None:
            return PlainTextResponse("no thumbnail for this key", status_code=404)
        try:
            jpeg = thumbnail_jpeg(images.thumbnail)
        except ValueError as err:
            log.warning("dashboard thumbnail %s unreadable: %s", key, err)
            return PlainTextResponse("thumbnail unreadable", status_code=404)
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": _IMAGE_CACHE})


def dashboard_routes(engine: Engine, settings: DashboardSettings | None = None) -> list[BaseRoute]:
    """The dashboard's routes, for the collector's Starlette app (`collector.dashboard.routes(store)`)."""
    dash = _Dashboard(engine, settings or DashboardSettings())
    return [
        Route("/", dash.index, name="dashboard"),
        Route("/dashboard/partials/summary", dash.summary, name="dashboard-summary"),
        Route("/dashboard/partials/fleet", dash.fleet, name="dashboard-fleet"),
        Route("/dashboard/partials/nok", dash.nok, name="dashboard-nok"),
        Route("/dashboard/partials/histograms", dash.histograms, name="dashboard-histograms"),
        Route("/dashboard/partials/events", dash.events, name="dashboard-events"),
        Route("/dashboard/overlay/{key}.png", dash.overlay, name="dashboard-overlay"),
        Route("/dashboard/thumb/{key}.jpg", dash.thumb, name="dashboard-thumb"),
        Mount("/dashboard/static", StaticFiles(directory=str(_HERE / "static")), name="dashboard-static"),
    ]


def create_dashboard_app(engine: Engine, settings: DashboardSettings | None = None) -> Starlette:
    """The dashboard alone, for running it next to (or without) the ingest service."""
    return Starlette(routes=dashboard_routes(engine, settings))
