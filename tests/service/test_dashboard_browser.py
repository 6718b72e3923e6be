"""The dashboard in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``).

Each page of a dashboard on a catalog of really processed images is loaded
and checked for what a person would see: the overlay image decodes and has
the size of the image's lowest level, tables hold their rows, the charts
render with their bars and dots. One screenshot per page is written to
``tests/artifacts/dashboard/`` for a person to look at. ``.ci/run`` installs
Chromium when it is missing; without it these tests are skipped.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from cellseg1d.service.dashboard import start_dashboard
from tests.helpers import REPO
from tests.service.dashboard_catalog import DashboardCatalog, build_catalog, image_id, lowest_size

ARTIFACTS = REPO / "tests" / "artifacts" / "dashboard"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="headless Chromium is not installed (Debian: apt-get install chromium chromium-driver; .ci/run does it)",
)


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, DashboardCatalog]]:
    data = build_catalog(tmp_path_factory.mktemp("browser"))
    handle = start_dashboard(data.config, data.catalog, address="127.0.0.1:0")
    yield handle.address, data
    handle.stop()
    data.catalog.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def _open(driver, url: str, name: str) -> None:  # noqa: ANN001
    driver.get(url)
    assert "Traceback" not in driver.page_source
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(max(700, int(height) + 20), 3000))
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def _rows(driver, table_id: str) -> list[list[str]]:  # noqa: ANN001
    from selenium.webdriver.common.by import By

    return [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in driver.find_elements(By.CSS_SELECTOR, f"#{table_id} tbody tr")]


def test_overview_in_a_browser(browser, dashboard) -> None:  # noqa: ANN001
    from selenium.webdriver.common.by import By

    base, _ = dashboard
    _open(browser, base + "/", "overview")
    assert browser.title.startswith("Overview")
    assert browser.find_element(By.CSS_SELECTOR, "#health .value").text == "healthy"
    states = {td.get_attribute("data-state"): td.text for td in browser.find_elements(By.CSS_SELECTOR,
                                                                                           "#job-states td[data-state]")}
    assert states == {"held": "0", "queued": "0", "running": "0", "failed": "1", "quarantined": "2", "done": "5"}
    for chart, n_bars in (("#chart-hour", 12), ("#chart-day", 24)):
        svg = browser.find_element(By.CSS_SELECTOR, f"{chart} svg")
        assert svg.size["width"] > 300 and svg.size["height"] > 100  # rendered, not an empty box
        bars = svg.find_elements(By.CSS_SELECTOR, "rect.bar")
        assert len(bars) == n_bars
        assert sum(int(b.get_attribute("data-count")) for b in bars) == 5
        assert max(b.size["height"] for b in bars) > 50  # the tallest bar is drawn
    assert any("hela@v2" in " ".join(r) for r in _rows(browser, "adapters"))
    assert len(_rows(browser, "last-errors")) == 3


def test_images_page_in_a_browser(browser, dashboard) -> None:  # noqa: ANN001
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    base, _ = dashboard
    _open(browser, base + "/images", "images")
    rows = [r for r in _rows(browser, "images") if len(r) == 7]
    assert len(rows) == 8
    assert browser.find_element(By.ID, "count").text.startswith("8 image(s)")
    Select(browser.find_element(By.NAME, "status")).select_by_value("done")  # the form, as a person uses it
    browser.find_element(By.CSS_SELECTOR, "form.filters button").click()
    from selenium.webdriver.support.ui import WebDriverWait

    def done_rows(driver) -> int:  # noqa: ANN001 - the filtered page, once it has loaded
        return len([r for r in _rows(driver, "images") if len(r) == 7]) if "status=done" in driver.current_url else -1

    try:
        from selenium.common.exceptions import StaleElementReferenceException

        WebDriverWait(browser, 15, ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda d: done_rows(d) == 5)
    except Exception:  # noqa: BLE001 - report what the page shows instead
        assert done_rows(browser) == 5, browser.current_url


def test_image_page_overlay_decodes_at_the_image_size(browser, dashboard) -> None:  # noqa: ANN001
    from selenium.webdriver.common.by import By

    base, data = dashboard
    _open(browser, f"{base}/images/{image_id(data, 'hela-01.ome.zarr')}", "image")
    img = browser.find_element(By.ID, "overlay")
    complete, width, height = browser.execute_script(
        "const i = arguments[0]; return [i.complete, i.naturalWidth, i.naturalHeight];", img)
    assert complete and (height, width) == lowest_size(data, "hela-01.ome.zarr")
    decoded = browser.execute_script("return arguments[0].decode().then(() => true, () => false);", img)
    assert decoded is True
    assert browser.find_element(By.ID, "segmenter").text == "classical"
    assert int(browser.find_element(By.ID, "objects").text) > 10
    assert len(_rows(browser, "runs")) == 1

    _open(browser, f"{base}/images/{image_id(data, 'gone.ome.zarr')}", "image-unreadable")
    img = browser.find_element(By.ID, "overlay")
    width = browser.execute_script("return arguments[0].naturalWidth;", img)
    assert width == 256  # the error tile, shown as an image


def test_experiments_page_in_a_browser(browser, dashboard) -> None:  # noqa: ANN001
    from selenium.webdriver.common.by import By

    base, _ = dashboard
    _open(browser, base + "/experiments", "experiments")
    svg = browser.find_element(By.CSS_SELECTOR, "#objects-plot svg")
    assert svg.size["width"] > 300
    assert len(svg.find_elements(By.CSS_SELECTOR, "circle.dot")) == 5
    assert len(svg.find_elements(By.CSS_SELECTOR, "line.mean")) == 3
    versions = [r[1] for r in _rows(browser, "versions")]
    assert set(versions) == {"hela@v1", "hela@v2", "classical"}
    assert len(_rows(browser, "adapter-versions")) == 2


def test_failed_page_in_a_browser(browser, dashboard) -> None:  # noqa: ANN001
    base, data = dashboard
    _open(browser, base + "/failed", "failed")
    rows = _rows(browser, "failures")
    assert len(rows) == 3
    commands = [r[-1] for r in rows]
    assert f"cellseg1d retry --now {data.failed_job}" in commands
    assert any(c.startswith(f"cellseg1d quarantine --release {data.quarantined_job}") for c in commands)
    assert any("<b>bad</b>" in r[5] for r in rows)  # shown as text, not markup
