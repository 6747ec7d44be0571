"""A real browser follows the guided tour's first three steps (Eq. 2-3 preview, PGD on the plain model, plain vs SAT
side by side) and reloads the page: the last result is still there."""

from __future__ import annotations

import time

import pytest
from test_browser import ARTIFACTS, _launch, app_url  # noqa: F401  (the module-scoped server fixture)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_tour_first_three_steps_in_a_real_browser(app_url):  # noqa: F811
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = _launch(p)
        page = browser.new_page(viewport={"width": 1500, "height": 2000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(app_url, wait_until="domcontentloaded")
        page.get_by_text("Start here: a guided tour").wait_for(timeout=60_000)
        # step 1: the Attack Lab opens on the plain CIFAR-10 demo model with the natural energies of its images
        page.get_by_role("button", name="Open step 1", exact=True).click()
        try:
            page.get_by_text("Tour, step 1 of 7").first.wait_for(timeout=60_000)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "tour_failure.png"), full_page=True)
            raise
        page.get_by_text("Natural energies of the chosen test images").first.wait_for(timeout=60_000)
        assert "cifar10-demo-plain" in page.inner_text("body")
        # step 2: PGD runs by itself; the claim line is computed from the trace
        page.get_by_role("button", name="Next step").click()
        page.get_by_text("Tour, step 2 of 7").first.wait_for(timeout=60_000)
        try:
            page.get_by_text("PGD (cross-entropy) lowered E(x) for").first.wait_for(timeout=90_000)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "tour_failure.png"), full_page=True)
            raise
        page.get_by_text("Energy drift: natural → adversarial").first.wait_for(timeout=30_000)
        # step 3: the same images and attack on the plain and the SAT model, side by side
        page.get_by_role("button", name="Next step").click()
        page.get_by_text("Tour, step 3 of 7").first.wait_for(timeout=60_000)
        page.get_by_text("Energy drift — cifar10-demo-sat").first.wait_for(timeout=120_000)
        page.get_by_text("Energy drift — cifar10-demo-plain").first.wait_for(timeout=30_000)
        time.sleep(1.0)
        page.screenshot(path=str(ARTIFACTS / "tour_step3.png"), full_page=True)
        body = page.inner_text("body")
        assert "?s=" in page.url, "the session id is kept in the URL"
        # a reload finds the same result
        page.reload(wait_until="domcontentloaded")
        page.get_by_text("Energy drift — cifar10-demo-sat").first.wait_for(timeout=90_000)
        browser.close()
    assert "Traceback" not in body and "Unexpected error" not in body
    assert body.count("lowered E(x) for") >= 2, "one claim line per model"
    assert not errors, f"JavaScript errors in the page: {errors}"
