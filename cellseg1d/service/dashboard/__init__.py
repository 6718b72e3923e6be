"""The read-only web dashboard: overview, images with outline thumbnails, experiments and adapters, failures.

``cellseg1d dashboard`` serves it on its own; the daemon serves it with
``[dashboard] address`` through :func:`start_dashboard`. Pages are rendered
on the server (Starlette + Jinja2, inline SVG charts, no JavaScript) from
read-only catalog queries (``queries``); thumbnails are made on demand and
cached in the state dir (``overlay``); tokens and path checks are in
``security``.
"""

from cellseg1d.service.dashboard.server import DashboardHandle, serve_dashboard, start_dashboard

__all__ = ["DashboardHandle", "serve_dashboard", "start_dashboard"]
