"""A real browser (Playwright driving Debian's chromium) opens the app, runs an attack on the
Attack Lab and saves a screenshot to test-artifacts/attack_lab.png; makes a box selection on the
Embedding explorer and checks the selected images appear (recording the selection payload the
frontend sends, the shape the AppTests feed); and checks the pages never reach beyond localhost."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import json
import time
import urllib.parse
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


HEALTH_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (bash scripts/test.sh installs it)")
    pytest.importorskip("playwright.sync_api")
    port = _free_port()
    env = {**os.environ, "STREAMLIT_SERVER_HEADLESS": "true", "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
           "ENERGYLENS_UMAP_WARMUP": "0", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    # the server's output goes to a file (a pipe nobody reads can fill up and stall the server), and is shown
    # when the server does not come up
    log_path = tmp_path_factory.mktemp("streamlit") / "server.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "dashboard/Home.py", "--server.port", str(port),
         "--server.address", "127.0.0.1"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an HTTP proxy
    t0 = time.time()
    try:
        while time.time() - t0 < HEALTH_TIMEOUT_S:
            if proc.poll() is not None:
                break
            try:
                if direct.open(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        else:
            proc.poll()
        if proc.returncode is not None or time.time() - t0 >= HEALTH_TIMEOUT_S:
            log.flush()
            tail = log_path.read_text(errors="replace")[-3000:]
            state = f"exited with code {proc.returncode}" if proc.returncode is not None else "still running"
            pytest.fail(f"the Streamlit server did not become healthy within {HEALTH_TIMEOUT_S} s ({state}); "
                        f"its output:\n{tail}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _launch(p):
    return p.chromium.launch(executable_path=CHROMIUM, headless=True,
                             args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                   "--no-proxy-server"])


def test_attack_lab_in_real_browser(app_url):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = _launch(p)
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


def _selection_payload(frames: list) -> dict | None:
    """The JSON value of a plotly selection among the websocket frames the page sent (BackMsg protobufs
    carry a widget's JSON string verbatim)."""
    for f in frames:
        if not isinstance(f, (bytes, bytearray)):
            continue
        i = f.find(b'{"selection"')
        if i >= 0:
            obj, _ = json.JSONDecoder().raw_decode(f[i:].decode("utf-8", "replace"))
            return obj
    return None


def test_embedding_box_selection_in_real_browser(app_url):
    """Issue 13 item 5: a box selection on the Embedding explorer shows the selected images. The payload the
    frontend sends is saved to test-artifacts/embedding_selection.json; its customdata shape ({"0": i} in
    Streamlit 1.67) is the one tests/test_analysis_pages.py feeds to AppTest."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    sent: list = []
    with sync_playwright() as p:
        browser = _launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(payload)))
        page.goto(f"{app_url}/embeddings", wait_until="domcontentloaded")
        page.get_by_role("button", name="Compute features").wait_for(timeout=60_000)
        n = page.get_by_label("Natural images")
        n.fill("60")
        n.press("Tab")
        page.get_by_role("button", name="Compute features").click()
        page.get_by_text("Select points with the box or lasso tool").wait_for(timeout=120_000)
        chart = page.locator(".js-plotly-plot").first
        chart.hover()
        page.locator('.modebar-btn[data-val="select"]').first.click()  # plotly's box-select tool
        box = page.locator(".js-plotly-plot .nsewdrag").first.bounding_box()
        x0, y0 = box["x"] + 0.05 * box["width"], box["y"] + 0.05 * box["height"]
        x1, y1 = box["x"] + 0.95 * box["width"], box["y"] + 0.95 * box["height"]
        page.mouse.move(x0, y0)
        page.mouse.down()
        page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2, steps=5)
        page.mouse.move(x1, y1, steps=5)
        page.mouse.up()
        page.get_by_text("selected (showing up to 24)").wait_for(timeout=60_000)
        time.sleep(1.0)
        page.screenshot(path=str(ARTIFACTS / "embedding_selection.png"), full_page=True)
        body = page.inner_text("body")
        shown = page.locator('[data-testid="stImage"]').count()
        browser.close()
    payload = _selection_payload(sent)
    assert payload is not None, "no selection was sent to the server"
    (ARTIFACTS / "embedding_selection.json").write_text(json.dumps(payload, indent=1))
    pts = payload["selection"]["points"]
    assert pts and "box" in payload["selection"]
    cd = pts[0]["customdata"]
    # the shape the AppTest feeds: if a new Streamlit sends another one, update tests/test_analysis_pages.py
    assert isinstance(cd, dict) and set(cd) == {"0"}, cd
    assert "Traceback" not in body and "Unexpected error" not in body
    assert f"{len({p['customdata']['0'] for p in pts})} selected" in body
    assert shown == min(24, len(pts)), shown
    assert not errors, f"JavaScript errors in the page: {errors}"


def test_pages_make_no_requests_beyond_localhost(app_url):
    """Issue 13 item 10: the favicon (and everything else) is served by the app itself; an offline machine
    shows the same page."""
    from playwright.sync_api import sync_playwright

    requests: list[str] = []
    with sync_playwright() as p:
        browser = _launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.on("request", lambda r: requests.append(r.url))
        for path, text in (("", "Look at adversarially robust image classifiers"), ("models", "Small models trained by"),
                           ("training", "New training run"), ("attack_lab", "Natural energies of the chosen test images")):
            page.goto(f"{app_url}/{path}", wait_until="domcontentloaded")
            page.get_by_text(text).first.wait_for(timeout=90_000)
            time.sleep(1.5)
        icon = page.evaluate("() => [...document.querySelectorAll('link[rel~=icon]')].map(l => l.href)")
        browser.close()
    outside = sorted({u for u in requests if urllib.parse.urlsplit(u).scheme in ("http", "https", "ws", "wss")
                      and urllib.parse.urlsplit(u).hostname not in ("127.0.0.1", "localhost")})
    assert not outside, f"requests beyond localhost: {outside}"
    assert icon and all(u.startswith("data:image/") or urllib.parse.urlsplit(u).hostname in ("127.0.0.1", "localhost")
                        for u in icon), icon


def test_a_shared_link_opens_its_view_in_a_real_browser(app_url):
    """A link made by 'Link to this view' (dashboard/share.py), opened in a fresh browser: the page it names, with
    its model and attack settings; the address bar then keeps only the new session id, and the link the sidebar
    shows for this view holds the same settings and no session id."""
    from playwright.sync_api import sync_playwright

    query = {"page": "attack", "model": "digits-sat", "attack": "pgd", "eps": "4", "steps": "7", "n": "24"}
    with sync_playwright() as p:
        browser = _launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{app_url}/?{urllib.parse.urlencode(query)}", wait_until="domcontentloaded")
        page.get_by_role("button", name="Run attack").wait_for(timeout=90_000)
        page.get_by_text("Link to this view").first.click()
        page.get_by_text("?page=attack").first.wait_for(timeout=30_000)
        shown = [t for t in page.locator("code").all_inner_texts() if t.strip().startswith("?page=")]
        address = urllib.parse.parse_qs(urllib.parse.urlparse(page.url).query)
        sidebar = page.locator("section[data-testid='stSidebar']").inner_text()
        body = page.inner_text("body")
        browser.close()
    assert "Traceback" not in body and "Unexpected error" not in body
    assert not errors, f"JavaScript errors in the page: {errors}"
    assert "digits-sat" in sidebar, "the link's model is selected"
    assert set(address) <= {"s"}, f"the link's settings leave the address bar: {address}"
    assert shown, "the sidebar shows the link to this view"
    link = urllib.parse.parse_qs(shown[0].strip().lstrip("?"))
    assert "s" not in link, "the shared link holds no session id"
    for k, v in query.items():
        assert link.get(k) == [v], (k, link.get(k), v)
