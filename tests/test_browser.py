"""A real browser (Playwright driving Debian's chromium) opens the app, runs an attack on the
Attack Lab and saves a screenshot to test-artifacts/attack_lab.png."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (bash scripts/test.sh installs it)")
    pytest.importorskip("playwright.sync_api")
    port = _free_port()
    env = {**os.environ, "STREAMLIT_SERVER_HEADLESS": "true", "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "dashboard/Home.py", "--server.port", str(port),
         "--server.address", "127.0.0.1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    try:
        while time.time() - t0 < 60:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.3)
        else:
            pytest.fail("the Streamlit server did not become healthy within 60 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_attack_lab_in_real_browser(app_url):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(app_url, wait_until="domcontentloaded")
        page.get_by_text("Look at adversarially robust image classifiers").wait_for(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "home.png"))
        page.get_by_role("link", name="Attack Lab").first.click()
        page.get_by_role("button", name="Run attack").wait_for(timeout=60_000)
        # before any attack the page previews the natural energies of the images it will attack
        page.get_by_text("Natural energies of the chosen test images").first.wait_for(timeout=60_000)
        page.get_by_role("button", name="Run attack").click()
        page.get_by_text("Robust accuracy").wait_for(timeout=90_000)
        page.get_by_text("Energy drift: natural → adversarial").first.wait_for(timeout=30_000)  # Fig. 1 drawn
        time.sleep(1.0)  # let plotly finish drawing before the screenshot
        page.screenshot(path=str(ARTIFACTS / "attack_lab.png"), full_page=True)
        body = page.inner_text("body")
        page_charts = page.locator(".js-plotly-plot").count()
        browser.close()
    assert "Traceback" not in body
    assert "Unexpected error" not in body
    assert "Natural accuracy" in body and "Robust accuracy" in body
    assert page_charts >= 3, f"expected the Fig. 1, Fig. 1a and Fig. 2 charts, found {page_charts}"
    assert not errors, f"JavaScript errors in the page: {errors}"
    assert (ARTIFACTS / "attack_lab.png").stat().st_size > 10_000
