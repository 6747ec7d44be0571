"""Dashboard speed and memory through a real browser (Playwright + Debian chromium):

* cold start: `streamlit run dashboard/Home.py` launched -> Home's text visible in the browser;
* opening the Attack Lab: link clicked -> page rendered with its preview chart;
* the Attack Lab default action: press "Run attack" -> accuracies and the Fig. 1 chart visible;
* peak RSS of the server process with the bundled model loaded (after the attack).

    python bench/bench_app.py [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import _util

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one_run(p) -> dict:
    port = _port()
    env = {**os.environ, "STREAMLIT_SERVER_HEADLESS": "true"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard/Home.py", "--server.port", str(port),
                             "--server.address", "127.0.0.1"], cwd=_util.REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=1)
                break
            except OSError:
                if time.perf_counter() - t0 > 120:
                    raise RuntimeError("server did not start")
                time.sleep(0.05)
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page()
        page.goto(url)
        page.get_by_text("Look at adversarially robust image classifiers").wait_for(timeout=120_000)
        first_page = time.perf_counter() - t0
        t_nav = time.perf_counter()
        page.get_by_role("link", name="Attack Lab").first.click()
        page.get_by_role("button", name="Run attack").wait_for(timeout=120_000)
        # the page is rendered once its preview chart (natural energies of the chosen images) is drawn;
        # a user reads the form before pressing the button
        page.locator(".js-plotly-plot").first.wait_for(timeout=120_000)
        attack_page = time.perf_counter() - t_nav
        t1 = time.perf_counter()
        page.get_by_role("button", name="Run attack").click()
        page.get_by_text("Robust accuracy").wait_for(timeout=120_000)
        page.get_by_text("Energy drift: natural → adversarial").first.wait_for(timeout=60_000)  # Fig. 1 chart drawn
        attack = time.perf_counter() - t1
        rss = _peak_rss_mb(proc.pid)
        browser.close()
        return {"first_page_s": first_page, "attack_lab_page_s": attack_page, "attack_action_s": attack,
                "server_peak_rss_mb": rss}
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if not os.path.exists(CHROMIUM):
        print("skipped: Debian chromium not installed")
        return
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        runs = [one_run(p) for _ in range(args.reps)]
    rows = [{"measure": k, "median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs),
             "max": max(r[k] for r in runs), "target": {"first_page_s": "< 5 s", "attack_action_s": "< 2 s"}.get(k, "")}
            for k in runs[0]]
    _util.print_table(f"Dashboard through a real browser ({args.reps} cold starts)", rows)
    print("written", _util.write_result("app", rows))


if __name__ == "__main__":
    main()
