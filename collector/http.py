"""The collector's HTTP side: Prometheus `/metrics` and a JSON API over `Store`, as a Starlette app.

`create_app(store, metrics)` builds the app. The dashboard (`collector/dashboard/`) plugs in by defining
`routes(store) -> list[starlette.routing.BaseRoute]` in `collector/dashboard/__init__.py`: create_app
appends them (pages, static files) after the API routes, so the dashboard needs no change here.

JSON API (all GET, all read-only):
  /api/stations                      Store.stations()
  /api/results?station=&since=&decision=&bundle=&limit=    Store.query(); since: "1h" / "30m" / Unix seconds
  /api/stats?since=&station=         Store.stats()
  /api/drift                         Store.drift_states()
  /api/nok?limit=&station=           Store.recent_nok()
  /api/histogram?station=&bins=&since=   Store.score_histogram()
  /api/blob/{key:path}               the stored PNG / JPEG bytes
  /healthz                           "ok" when the database answers
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from collector.metrics import CollectorMetrics
from collector.store import Store
from collector.timespec import parse_since

__all__ = ["HttpServer", "create_app"]

log = logging.getLogger("m3dm.collector.http")
_MAX_LIMIT = 10_000


class _BadRequestError(Exception):
    pass


def _int_arg(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _BadRequestError(f"{name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise _BadRequestError(f"{name} must lie in [{lo}, {hi}], got {value}")
    return value


def _since_arg(request: Request) -> float | None:
    raw = request.query_params.get("since")
    try:
        return None if raw is None else parse_since(raw)
    except ValueError as err:
        raise _BadRequestError(str(err)) from None


def _api(fn: Any) -> Any:
    async def endpoint(request: Request) -> Response:
        try:
            # store calls block: run them on the thread pool, not on the event loop
            return JSONResponse(await run_in_threadpool(fn, request))
        except _BadRequestError as err:
            return JSONResponse({"error": str(err)}, status_code=400)

    return endpoint


def create_app(
    store: Store, metrics: CollectorMetrics | None = None, extra_routes: Sequence[BaseRoute] = ()
) -> Starlette:
    """The Starlette app: API routes, `/metrics` (if `metrics`), `extra_routes`, then the dashboard's."""
    app_metrics = metrics or CollectorMetrics()

    def results(request: Request) -> Any:
        q = request.query_params
        limit = _int_arg(request, "limit", 100, 1, _MAX_LIMIT)
        return store.query(q.get("station"), _since_arg(request), q.get("decision"), q.get("bundle"), limit)

    def stats(request: Request) -> Any:
        return store.stats(_since_arg(request), request.query_params.get("station"))

    def nok(request: Request) -> Any:
        return store.recent_nok(_int_arg(request, "limit", 20, 1, 1000), request.query_params.get("station"))

    def histogram(request: Request) -> Any:
        station = request.query_params.get("station")
        if not station:
            raise _BadRequestError("station is required")
        return store.score_histogram(station, _int_arg(request, "bins", 30, 1, 500), _since_arg(request))

    async def blob(request: Request) -> Response:
        found = await run_in_threadpool(store.blob, request.path_params["key"])
        if found is None:
            return PlainTextResponse("no such blob", status_code=404)
        return Response(found[1], media_type=found[0], headers={"Cache-Control": "max-age=3600"})

    async def metrics_endpoint(_request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(app_metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(_request: Request) -> Response:
        await run_in_threadpool(store.count)
        return PlainTextResponse("ok")

    routes: list[BaseRoute] = [
        Route("/api/stations", _api(lambda _r: store.stations())),
        Route("/api/results", _api(results)),
        Route("/api/stats", _api(stats)),
        Route("/api/drift", _api(lambda _r: store.drift_states())),
        Route("/api/nok", _api(nok)),
        Route("/api/histogram", _api(histogram)),
        Route("/api/blob/{key:path}", blob),
        Route("/metrics", metrics_endpoint),
        Route("/healthz", healthz),
        *extra_routes,
        *_dashboard_routes(store),
    ]
    app = Starlette(routes=routes)
    app.state.store = store
    app.state.metrics = app_metrics
    return app


def _dashboard_routes(store: Store) -> list[BaseRoute]:
    try:
        import collector.dashboard as dashboard
    except ModuleNotFoundError as err:
        if err.name != "collector.dashboard":
            raise  # the dashboard exists but one of its imports is missing: that must not pass silently
        return []
    make = getattr(dashboard, "routes", None)
    return list(make(store)) if make is not None else []


class HttpServer:
    """uvicorn serving `app` in a daemon thread of this process; `port` is the bound port (0 -> OS-chosen)."""

    def __init__(self, app: Starlette, host: str, port: int) -> None:
        import uvicorn

        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="http", daemon=True)
        self.host = host
        self.port = port

    def start(self, timeout_s: float = 10.0) -> HttpServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"HTTP server did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        sockets = [s for server in self._server.servers for s in server.sockets]
        if sockets:
            self.port = sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
