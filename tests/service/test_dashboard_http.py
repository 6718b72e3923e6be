"""The dashboard over real HTTP: pages on a catalog of really processed images, thumbnails, errors, security.

A real server (uvicorn on 127.0.0.1, a free port) answers real requests
(urllib); the catalog holds images that went through the real pipeline
(tests/service/dashboard_catalog.py).
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import delete, func, select

from cellseg1d.catalog import Catalog, Image, Job, Result, utcnow
from cellseg1d.catalog.report import catalog_counts, status_report
from cellseg1d.config import build_config
from cellseg1d.errors import ConfigError
from cellseg1d.service.dashboard import start_dashboard
from cellseg1d.service.dashboard.overlay import OUTLINE
from cellseg1d.service.dashboard.queries import ImageFilter, images_page
from cellseg1d.service.dashboard.security import contained, resolve_token
from cellseg1d.testing import write_synthetic_image
from tests.service.dashboard_catalog import DashboardCatalog, build_catalog, image_id, lowest_size

TOKEN = "s3cret-token-0123456789"


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # noqa: ANN002, ANN003
        return None


def get(base: str, path: str, method: str = "GET", headers: dict[str, str] | None = None) -> Answer:
    """A real HTTP request; redirects are not followed."""
    request = urllib.request.Request(base + path, method=method, headers=headers or {})
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=30) as response:
            return Answer(response.status, {k.lower(): v for k, v in response.headers.items()}, response.read())
    except urllib.error.HTTPError as err:
        return Answer(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())


def raw_get(base: str, target: str) -> Answer:
    """A request line sent as is (no client-side normalisation of ``..`` or percent escapes)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    return Answer(status, headers, body)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DashboardCatalog]:
    built = build_catalog(tmp_path_factory.mktemp("dashboard"))
    yield built
    built.catalog.close()


@pytest.fixture(scope="module")
def server(data: DashboardCatalog) -> Iterator[str]:
    handle = start_dashboard(data.config, data.catalog, address="127.0.0.1:0")
    yield handle.address
    handle.stop()


def _png(body: bytes) -> np.ndarray:
    return np.asarray(PILImage.open(io.BytesIO(body)).convert("RGB"))


def test_overview_shows_the_numbers_of_status_and_metrics(server: str, data: DashboardCatalog) -> None:
    page = get(server, "/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    counts = catalog_counts(data.catalog)
    shown = dict(re.findall(r'data-state="(\w+)">(\d+)<', page.text))
    assert {k: int(v) for k, v in shown.items()} == counts["jobs"]
    assert counts["jobs"] == {"held": 0, "queued": 0, "running": 0, "failed": 1, "quarantined": 2, "done": 5}
    assert "healthy" in page.text and "hela@v2" in page.text and str(data.acquisition) in page.text
    assert page.text.count('class="bar"') == 12 + 24  # the two throughput charts
    report = json.loads(get(server, "/api/status").body)
    expected = json.loads(json.dumps(status_report(data.catalog), default=str))
    for key in ("jobs", "queue_depth", "images_processed", "bad_inputs", "quarantined", "objects_found"):
        assert report[key] == expected[key], key
    assert report["last_hour"]["images"] == 5


def test_images_are_filtered_and_paged(server: str, data: DashboardCatalog) -> None:
    def rows(query: str) -> list[str]:
        page = get(server, "/images" + query)
        assert page.status == 200
        return re.findall(r'<a href="/images/(\d+)">', page.text)

    assert len(rows("")) == 8
    assert len(rows("?status=done")) == 5
    assert len(rows("?status=failed")) == 2  # quarantined and rejected
    assert len(rows("?experiment=hela")) == 2
    assert len(rows("?path=plate-01")) == 2
    assert len(rows("?path=%25")) == 0  # LIKE wildcards are text
    assert len(rows(f"?root={data.acquisition}&status=queued")) == 1  # waiting for its retry
    assert get(server, "/images?status=nonsense").status == 400
    first, second = (images_page(data.catalog, ImageFilter(), page, per_page=3) for page in (1, 2))
    assert first["total"] == 8 and first["pages"] == 3
    assert not {r["id"] for r in first["rows"]} & {r["id"] for r in second["rows"]}
    assert [r["id"] for r in first["rows"]] == sorted((r["id"] for r in first["rows"]), reverse=True)
    page = get(server, "/images?status=done&page=1")
    assert 'id="next"' not in page.text  # one page only


def test_one_image_shows_result_provenance_and_overlay(server: str, data: DashboardCatalog) -> None:
    ident = image_id(data, "hela-02.ome.zarr")
    page = get(server, f"/images/{ident}")
    assert page.status == 200
    path = next(p for p in data.ids if p.endswith("hela-02.ome.zarr"))
    assert f'id="objects">{data.objects[path]}<' in page.text
    assert 'id="segmenter">classical<' in page.text and "hela@v2" in page.text
    assert "pipeline_version" in page.text and "Timings" in page.text
    assert f"/images/{ident}/overlay.png" in page.text

    before = sorted(p.relative_to(data.acquisition) for p in data.acquisition.rglob("*"))
    png = get(server, f"/images/{ident}/overlay.png")
    assert png.status == 200 and png.headers["content-type"] == "image/png"
    assert "x-cellseg1d-overlay-error" not in png.headers
    pixels = _png(png.body)
    assert pixels.shape[:2] == lowest_size(data, "hela-02.ome.zarr")
    outline = np.all(pixels == OUTLINE, axis=2)
    assert 0.01 < outline.mean() < 0.5  # outlines drawn, the image still visible
    cache = data.config.state_dir / "dashboard-cache"
    assert len(list(cache.glob("*.png"))) >= 1
    assert get(server, f"/images/{ident}/overlay.png").body == png.body  # from the cache
    after = sorted(p.relative_to(data.acquisition) for p in data.acquisition.rglob("*"))
    assert before == after  # nothing written into the acquisition folder
    assert get(server, "/images/999999").status == 404


def test_unreadable_image_gives_an_error_tile_not_a_traceback(server: str, data: DashboardCatalog) -> None:
    ident = image_id(data, "gone.ome.zarr")
    tile = get(server, f"/images/{ident}/overlay.png")
    assert tile.status == 200 and tile.headers["content-type"] == "image/png"
    assert "cannot read the image" in tile.headers["x-cellseg1d-overlay-error"]
    assert _png(tile.body).shape[:2] == (256, 256)
    page = get(server, f"/images/{ident}")
    assert page.status == 200 and "Traceback" not in page.text
    no_result = get(server, f"/images/{image_id(data, 'broken.ome.zarr')}/overlay.png")
    assert "no result" in no_result.headers["x-cellseg1d-overlay-error"]


def test_failed_page_lists_errors_with_the_commands(server: str, data: DashboardCatalog) -> None:
    page = get(server, "/failed")
    assert page.status == 200
    assert f'cellseg1d quarantine --release {data.quarantined_job} --reason' in page.text
    assert f"cellseg1d retry --now {data.failed_job}" in page.text
    assert "rejected" in page.text and "no OME-NGFF image metadata" in page.text
    assert "&lt;b&gt;bad&lt;/b&gt;" in page.text and "<b>bad</b>" not in page.text  # errors are escaped
    assert "2 quarantined" in page.text and "1 waiting for a retry" in page.text


def test_experiments_page_plots_objects_per_version(server: str, data: DashboardCatalog) -> None:
    page = get(server, "/experiments")
    assert page.status == 200
    assert "hela@v1" in page.text and "hela@v2" in page.text
    assert page.text.count('class="dot"') == 5  # one per result
    means = re.findall(r'data-mean="([\d.]+)"', page.text)
    assert len(means) == 3  # hela@v1, hela@v2, classical on nuclei


def test_nothing_outside_the_roots_is_served(server: str, data: DashboardCatalog, tmp_path: Path) -> None:
    for target in ("/static/../catalog/db.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py",
                   "/static/..%2F..%2Fconfig.py", "/static/%252e%252e%252fapp.py", "/static/style.css%00.png",
                   "/static/templates", "/../../etc/passwd", "/images/..%2f..%2fetc%2fpasswd",
                   "/static/%2fetc%2fpasswd", "/static/.%2e/.%2e/config.py"):
        answer = raw_get(server, target)
        assert answer.status in (400, 404), (target, answer.status)
        assert b"import" not in answer.body and b"root:" not in answer.body, target
    assert raw_get(server, "/static/style.css").status == 200

    # An image outside the watched folder (catalog rows pointing at it), and a link inside the root to it.
    outside = write_synthetic_image(tmp_path / "outside", "2d", name="secret.ome.zarr", size=64)
    link = data.acquisition / "link.ome.zarr"
    link.symlink_to(outside.path)
    try:
        ids = []
        with data.catalog.session() as s:
            for path in (outside.path, link):
                image = Image(path=str(path), root=str(data.acquisition), container=str(path), status="done",
                              first_seen=utcnow(), updated_at=utcnow())
                s.add(image)
                s.flush()
                job = Job(image_id=image.id, run_key=f"x:{path.name}", state="done", created_at=utcnow())
                s.add(job)
                s.flush()
                s.add(Result(job_id=job.id, image_id=image.id, labels_path=str(path / "labels" / "x"),
                             object_count=1, planes=1, segmenter="classical", cellseg1d_version="0",
                             pipeline_version="0", exports={}, created_at=utcnow()))
                ids.append(image.id)
        for ident in ids:
            tile = get(server, f"/images/{ident}/overlay.png")
            assert "outside the watched folders" in tile.headers["x-cellseg1d-overlay-error"]
    finally:
        link.unlink()
        with data.catalog.session() as s:  # (jobs and results go with them: ON DELETE CASCADE)
            s.execute(delete(Image).where(Image.id.in_(ids)))
    roots = [data.acquisition]
    assert contained(data.acquisition / "hela-01.ome.zarr", roots) is not None
    for bad in (str(data.acquisition / ".." / "state"), "relative/path", str(data.acquisition) + "\x00", ""):
        assert contained(bad, roots) is None, bad


def test_the_dashboard_changes_nothing(server: str, data: DashboardCatalog) -> None:
    def snapshot() -> tuple:
        with data.catalog.session() as s:
            return (s.scalar(select(func.count()).select_from(Job)), s.scalar(select(func.max(Image.updated_at))),
                    tuple(s.execute(select(Job.id, Job.state, Job.attempts)).all()))

    before = snapshot()
    for path in ("/", "/images", "/experiments", "/failed", f"/images/{image_id(data, 'hela-01.ome.zarr')}"):
        assert get(server, path).status == 200
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            assert get(server, path, method=method).status == 405, (method, path)
    assert snapshot() == before
    page = get(server, "/")
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "script-src" not in page.headers["content-security-policy"]  # default-src 'none': no scripts
    assert "<script" not in page.text


def test_a_token_is_needed_when_set_and_beyond_loopback(data: DashboardCatalog, monkeypatch) -> None:
    config = data.config.model_copy(update={"dashboard": data.config.dashboard.model_copy(update={"token": TOKEN})})
    handle = start_dashboard(config, data.catalog, address="127.0.0.1:0")
    try:
        base = handle.address
        assert get(base, "/").status == 401 and "Token needed" in get(base, "/").text
        assert get(base, "/images/1/overlay.png").status == 401
        assert get(base, "/", headers={"Authorization": "Bearer wrong-token-0123456789"}).status == 401
        assert get(base, "/", headers={"Authorization": f"Bearer {TOKEN}"}).status == 200
        assert get(base, "/?token=wrong").status == 401
        redirect = get(base, f"/images?status=done&token={TOKEN}")
        assert redirect.status == 303 and redirect.headers["location"] == "/images?status=done"
        cookie = redirect.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        assert get(base, "/images", headers={"Cookie": cookie.split(";")[0]}).status == 200
    finally:
        handle.stop()
    # beyond loopback: refused without a token; the environment may give it
    monkeypatch.delenv("CELLSEG1D_DASHBOARD_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="needs a token"):
        resolve_token(data.config, "0.0.0.0")
    with pytest.raises(ConfigError, match="needs a token"):
        start_dashboard(data.config, data.catalog, address="0.0.0.0:0")
    assert resolve_token(data.config, "0.0.0.0", {"CELLSEG1D_DASHBOARD_TOKEN": TOKEN}) == TOKEN
    assert resolve_token(data.config, "::1") is None and resolve_token(data.config, "localhost") is None
    with pytest.raises(ConfigError, match="at least 16"):
        resolve_token(data.config, "0.0.0.0", {"CELLSEG1D_DASHBOARD_TOKEN": "short"})


def test_dashboard_settings_are_checked() -> None:
    assert build_config({"dashboard": {"address": "8080"}}).dashboard.host_port == ("127.0.0.1", 8080)
    assert build_config({}).dashboard.host_port is None
    assert build_config({"dashboard": {"address": "[::]:8080"}}).dashboard.host_port == ("::", 8080)
    with pytest.raises(ConfigError, match="dashboard.address"):
        build_config({"dashboard": {"address": "host:port"}})
    with pytest.raises(ConfigError, match="dashboard.token"):
        build_config({"dashboard": {"token": "short"}})
    from cellseg1d.config import apply_env_overrides

    data = apply_env_overrides({}, {"CELLSEG1D_DASHBOARD_TOKEN": TOKEN, "CELLSEG1D_DASHBOARD__ADDRESS": "9000"})
    assert data == {"dashboard": {"address": 9000}} or data == {"dashboard": {"address": "9000"}}


def test_health_and_catalog_errors_are_shown_without_a_traceback(data: DashboardCatalog, tmp_path: Path) -> None:
    handle = start_dashboard(data.config, data.catalog, address="127.0.0.1:0",
                             health=lambda: (False, {"reason": "scheduler loop has not run for 45 s"}))
    try:
        page = get(handle.address, "/")
        assert page.status == 200 and "unhealthy" in page.text and "scheduler loop has not run" in page.text
    finally:
        handle.stop()
    empty = Catalog(f"sqlite:///{tmp_path / 'empty.sqlite'}")  # no tables: every query fails
    handle = start_dashboard(data.config, empty, address="127.0.0.1:0")
    try:
        for path in ("/", "/images", "/failed", "/experiments", "/images/1"):
            page = get(handle.address, path)
            assert page.status == 500, path
            assert "Traceback" not in page.text and "sqlite3" not in page.text and "the cellseg1d log" in page.text
        assert get(handle.address, "/images/1/overlay.png").status == 500
    finally:
        handle.stop()
        empty.close()


def test_a_port_in_use_is_a_clear_error(data: DashboardCatalog) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match="dashboard.address: cannot listen on 127.0.0.1"):
            start_dashboard(data.config, data.catalog, address=f"127.0.0.1:{port}")


def test_an_ipv6_loopback_address_works(data: DashboardCatalog) -> None:
    if not socket.has_ipv6 or os.environ.get("CELLSEG1D_NO_IPV6"):
        pytest.skip("no IPv6")
    try:
        handle = start_dashboard(data.config, data.catalog, address="[::1]:0")
    except ConfigError as err:
        pytest.skip(f"IPv6 loopback not available: {err}")
    try:
        assert handle.address.startswith("http://[::1]:")
        host, port = handle.address.removeprefix("http://[::1]:"), None
        assert host.isdigit()
    finally:
        handle.stop()
