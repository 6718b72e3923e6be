"""The dashboard's routes (Starlette, server-rendered Jinja2 templates, no JavaScript).

Every route is a GET; nothing here changes the catalog or any file outside
the thumbnail cache. Pages: ``/`` (overview), ``/images`` (filtered, paged),
``/images/{id}`` (one image), ``/images/{id}/overlay.png`` (thumbnail with
outlines), ``/experiments`` (adapters, assignments, objects per image per
version), ``/failed`` (failed and quarantined jobs with the commands that
act on them), ``/api/status`` (``cellseg1d status --json``'s report).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from cellseg1d import __version__
from cellseg1d.catalog import Catalog
from cellseg1d.config import Config
from cellseg1d.service.dashboard import charts, queries
from cellseg1d.service.dashboard.overlay import OverlayError, cached_overlay, error_tile
from cellseg1d.service.dashboard.security import COOKIE, allowed_roots, contained, token_matches
from cellseg1d.service.telemetry import HealthCallback, Telemetry

log = logging.getLogger(__name__)
PACKAGE = Path(str(resources.files("cellseg1d.service.dashboard")))
STATIC = PACKAGE / "static"
#: Static file names: plain names only, no folders.
STATIC_NAME = re.compile(r"^[A-Za-z0-9_-]+\.(css|svg|png|ico)$")
STATIC_TYPES = {"css": "text/css; charset=utf-8", "svg": "image/svg+xml", "png": "image/png",
                "ico": "image/x-icon"}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; img-src 'self' data:; style-src 'self'; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
}


@dataclass
class DashboardState:
    """What the routes need: the config, the catalog, where thumbnails are cached, the health check."""

    config: Config
    catalog: Catalog
    health: HealthCallback | None = None
    token: str | None = None
    roots: list[Path] = field(default_factory=list)
    cache_dir: Path = Path()
    telemetry: Telemetry | None = None


def _when(value: Any) -> str:
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return "" if value is None else str(value)


def _seconds(value: Any) -> str:
    return "" if value is None else f"{float(value):.2f}"


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(str(PACKAGE / "templates")),
                      autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)
    env.filters["when"] = _when
    env.filters["seconds"] = _seconds
    env.filters["pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True, default=str)
    env.globals["version"] = __version__
    return env


def _page(request: Request) -> int:
    try:
        return max(1, min(int(request.query_params.get("page", "1")), 10**6))
    except ValueError:
        return 1


class TokenGate:
    """ASGI middleware: with a token set, every request needs it (Bearer header, cookie, or ``?token=`` once)."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.token is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        given = request.query_params.get("token")
        if given is not None and token_matches(given, self.token):
            rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
            response: Response = RedirectResponse(target, status_code=303)
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict", path="/")
            await response(scope, receive, send)
            return
        auth = request.headers.get("authorization", "")
        bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        if token_matches(bearer, self.token) or token_matches(request.cookies.get(COOKIE), self.token):
            await self.app(scope, receive, send)
            return
        response = HTMLResponse(
            "<!doctype html><title>cellseg1d dashboard: token needed</title><h1>Token needed</h1>"
            "<p>This dashboard needs its access token: open it once as <code>...?token=TOKEN</code> "
            "(dashboard.token in the config, or CELLSEG1D_DASHBOARD_TOKEN), or send "
            "<code>Authorization: Bearer TOKEN</code>.</p>", status_code=401,
            headers={"WWW-Authenticate": "Bearer", **SECURITY_HEADERS, "Cache-Control": "no-store"})
        await response(scope, receive, send)


class SecurityHeaders:
    """ASGI middleware adding :data:`SECURITY_HEADERS` (and ``no-store`` for pages) to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def wrapped(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                for key, value in SECURITY_HEADERS.items():
                    if key.lower().encode() not in names:
                        headers.append((key.lower().encode(), value.encode()))
                if b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, wrapped)


def build_app(state: DashboardState) -> ASGIApp:
    """The dashboard as an ASGI application."""
    env = _environment()

    def render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        html = env.get_template(name).render(request=request, nav=name.split(".")[0], **context)
        return HTMLResponse(html, status_code=status_code)

    def health() -> dict[str, Any]:
        assert state.telemetry is not None
        ok, body = state.telemetry.health_status()
        return {"ok": ok, **body}

    def overview(request: Request) -> Response:
        data = queries.overview(state.catalog)
        return render(request, "overview.html", data=data, report=data["report"], health=health(),
                      roots=[str(r.path) for r in state.config.watch.roots],
                      hour_chart=charts.bar_chart(data["hour_bins"], "images done per 5 minutes, last hour"),
                      day_chart=charts.bar_chart(data["day_bins"], "images done per hour, last day"))

    def images(request: Request) -> Response:
        q = request.query_params
        flt = queries.ImageFilter(status=q.get("status") or None, experiment=q.get("experiment") or None,
                                  root=q.get("root") or None, path=(q.get("path") or "").strip() or None)
        if flt.status and flt.status not in queries.IMAGE_STATUSES:
            raise HTTPException(400, f"unknown status {flt.status!r}")
        data = queries.images_page(state.catalog, flt, _page(request))
        kept = {k: v for k, v in (("status", flt.status), ("experiment", flt.experiment), ("root", flt.root),
                                  ("path", flt.path)) if v}
        return render(request, "images.html", data=data, flt=flt, choices=queries.filter_choices(state.catalog),
                      query=lambda page: "?" + urlencode({**kept, "page": page}))

    def image(request: Request) -> Response:
        detail = queries.image_detail(state.catalog, int(request.path_params["image_id"]))
        if detail is None:
            raise HTTPException(404, "no such image in the catalog")
        shown = detail["shown"]
        readable = contained(detail["path"], state.roots) is not None
        return render(request, "image.html", image=detail, shown=shown, readable=readable)

    def overlay(request: Request) -> Response:
        image_id = int(request.path_params["image_id"])
        found = queries.result_paths(state.catalog, image_id)
        headers = {"Cache-Control": "private, max-age=300"}
        if found is None:
            return _tile("no result for this image yet", headers)
        image_path, result_id, labels_path, channels = found
        image_real, labels_real = contained(image_path, state.roots), contained(labels_path, state.roots)
        if image_real is None or labels_real is None:
            return _tile("the image or its labels lie outside the watched folders of this dashboard's config",
                         headers)
        try:
            png = cached_overlay(state.cache_dir, image_real, labels_real, result_id,
                                 channels or list(state.config.segmentation.channels))
        except OverlayError as err:
            return _tile(str(err), headers)
        return Response(png, media_type="image/png", headers=headers)

    def experiments(request: Request) -> Response:
        data = queries.experiments_view(state.catalog)
        return render(request, "experiments.html", data=data,
                      plot=charts.dot_plot(data["groups"], "objects per image, per experiment and adapter version"))

    def failed(request: Request) -> Response:
        return render(request, "failed.html", data=queries.failures_page(state.catalog, _page(request)))

    def api_status(request: Request) -> Response:
        from cellseg1d.catalog.report import status_report

        return Response(json.dumps(status_report(state.catalog), default=str), media_type="application/json")

    def static(request: Request) -> Response:
        name = request.path_params["name"]
        if not STATIC_NAME.match(name):
            raise HTTPException(404)
        path = STATIC / name
        if contained(path, [STATIC.resolve()]) is None or not path.is_file():
            raise HTTPException(404)
        return Response(path.read_bytes(), media_type=STATIC_TYPES[name.rsplit(".", 1)[1]],
                        headers={"Cache-Control": "public, max-age=3600"})

    async def not_found(request: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 404)
        detail = getattr(exc, "detail", "") or "not found"
        return render(request, "error.html", status_code=code, code=code, message=detail)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("dashboard: error answering %s: %s", request.url.path, exc, exc_info=exc)
        return render(request, "error.html", status_code=500, code=500,
                      message="the dashboard could not answer this page (the catalog may be unreachable); "
                              "the cellseg1d log has the details")

    routes = [
        Route("/", overview), Route("/images", images), Route("/images/{image_id:int}", image),
        Route("/images/{image_id:int}/overlay.png", overlay), Route("/experiments", experiments),
        Route("/failed", failed), Route("/api/status", api_status), Route("/static/{name}", static),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found, Exception: server_error})
    return SecurityHeaders(TokenGate(app, state.token))


def _tile(message: str, headers: dict[str, str]) -> Response:
    return Response(error_tile(message), media_type="image/png",
                    headers={**headers, "X-Cellseg1d-Overlay-Error": message.encode("ascii", "replace").decode()})


def make_state(config: Config, catalog: Catalog, token: str | None,
               health: Callable[[], tuple[bool, dict[str, Any]]] | None = None) -> DashboardState:
    """The routes' state for ``config`` (allowed roots, cache dir under the state dir)."""
    return DashboardState(config=config, catalog=catalog, health=health, token=token, roots=allowed_roots(config),
                          cache_dir=config.state_dir / "dashboard-cache",
                          telemetry=Telemetry(catalog, health=health))
