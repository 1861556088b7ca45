"""The collector's live dashboard: Starlette routes, Jinja2 templates, overlays rendered server-side.

`collector.http.create_app` mounts whatever `routes(store)` returns, so the dashboard plugs in without any
change to the HTTP module. The page is `/`; everything else lives under `/dashboard/` (see `views.py`; a
submodule named `routes` would shadow this hook once imported).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from collector.store import Store

__all__ = ["routes"]


def routes(store: Store) -> list[BaseRoute]:
    """The dashboard's routes over `store`'s database; a station is online as long as the store says."""
    from collector.dashboard.views import DashboardSettings, dashboard_routes

    return dashboard_routes(store.engine, DashboardSettings(online_after_s=store.offline_after_s))
