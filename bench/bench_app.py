"""Every page's main action in the app (a real server driven by Chromium) next to the same work in a plain process.

For each action the click -> result-drawn time in the browser is measured, then the same core function is called
with the same inputs in this process (the server idles meanwhile), and the ratio app / engine is printed side by
side in one run (issue 27: the target is a ratio <= 1.5 everywhere). The server is started exactly as a user starts
it (`streamlit run dashboard/Home.py` from the repository root, so the project's .streamlit/config.toml applies;
the effective runner.postScriptGC is printed). Actions (default model cifar10-demo-plain, 64 test images):

* Attack Lab: PGD-10, APGD-T (10 iterations x 3 targets), FAB (10 iterations), Square (300 queries)
* SGLD studio: 8 chains (classes 1 and 7 x 4, the tour's step 7, robust SAT model, PCA start) x 100 steps
* Energy landscape: the bundled models of the default dataset, 128 test images, PGD-10
* Sample analysis: all test images of the demo pack, natural inputs
* Embedding explorer: 300 test images + their PGD-10 versions, penultimate features, PCA
* Evaluation: a background job (a separate process, as the page launches it), N = 200, PGD-20, AutoAttack off
* and, as before, the cold start (server launched -> Home drawn) and the server's peak RSS.

    python bench/bench_app.py [--only attack sgld ...] [--reps 1]

Writes bench/results/app.json. Seconds on a loaded machine compare only within one row (same minute).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager

import _util

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TIMEOUT_MS = 1_800_000
ACTIONS = ["attack", "sgld", "landscape", "analysis", "embeddings", "evaluation"]


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


def effective_post_script_gc() -> str:
    """runner.postScriptGC as a server started from the repository root resolves it."""
    code = "import streamlit.config as c; print(c.get_option('runner.postScriptGC'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=_util.REPO, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "?"


@contextmanager
def server(runs: str, extra: list[str] | None = None):
    port = _port()
    # a fresh runs folder and a fresh cache: the app computes what the engine column computes (no result the engine
    # column just wrote to the shared cache, e.g. a landscape, is read back instead)
    env = {**os.environ, "STREAMLIT_SERVER_HEADLESS": "true", "ENERGYLENS_RUNS": runs,
           "ENERGYLENS_CACHE": os.path.join(runs, "cache"),
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    log = open(os.path.join(runs, "server.log"), "wb")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard/Home.py", "--server.port", str(port),
                             "--server.address", "127.0.0.1", *(extra or [])], cwd=_util.REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - t0 > 300:
                    raise RuntimeError("server did not start; see " + log.name)
                time.sleep(0.1)
        yield url, proc, t0
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


# ------------------------------------------------------------------------------------------------ browser helpers
def nav(page, title: str) -> None:
    page.get_by_role("link", name=title).first.click()


def select(page, label: str, option: str) -> None:
    page.get_by_role("combobox", name=label, exact=True).first.click()
    page.get_by_role("option", name=option, exact=True).first.click()


def number(page, label: str, value) -> None:
    inp = page.get_by_label(label, exact=True).first
    inp.fill(str(value))
    inp.press("Tab")


def settle(page) -> None:
    """No script run in progress and no progress bar left (a task still polled)."""
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]') && "
                           "!document.querySelector('[data-testid=\"stProgress\"]')", timeout=TIMEOUT_MS)


def timed_click(page, button: str, done) -> float:
    """Seconds from clicking ``button`` to ``done(page)`` having waited for the result to be drawn."""
    page.wait_for_timeout(300)
    settle(page)
    t0 = time.perf_counter()
    page.get_by_role("button", name=button, exact=True).first.click()
    done(page)
    settle(page)
    return time.perf_counter() - t0


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def sandwich(fn, app) -> tuple[float, float]:
    """(app seconds, engine seconds): the engine's work runs just before and just after the app's action and its
    two times are averaged, so that a machine whose load drifts during the row affects both columns alike."""
    before = timed(fn)
    a = app()
    return a, (before + timed(fn)) / 2


# ------------------------------------------------------------------------------------------------ the actions
def attack_rows(page, env) -> list[dict]:
    import torch

    from core.attacks import AttackSpec, budget, interactive_batch_size, run_attack
    from core.claims import marginal_claim

    lm, ds = env.model("cifar10-demo-plain"), env.data("cifar10-demo", "test")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:64]   # the page's draw (seed 0)
    x, y = ds.images(idx), ds.labels(idx)
    nav(page, "Home")
    page.get_by_role("button", name="Open step 1").click()           # Attack Lab, PGD-10 on 64 images, nothing run
    page.get_by_role("button", name="Run attack").wait_for(timeout=TIMEOUT_MS)
    rows = []
    for name, label, steps in (("pgd", "PGD (cross-entropy)", 10), ("apgd-t", "APGD-T", 10), ("fab", "FAB", 10),
                               ("square", "Square", 300)):
        if name != "pgd":
            select(page, "Attack", label)
        head = re.compile("^" + re.escape(label) + ",")
        spec = AttackSpec(name=name, norm="Linf", eps=8 / 255, steps=steps, seed=0, target_class=0,
                          batch_size=interactive_batch_size(name),
                          extra={"targets": budget.INTERACTIVE_TARGETS} if name in budget.TARGETED else {})
        def work(spec=spec, label=label):   # the attack and what the page computes from it (claim, step curve)
            tr = run_attack(lm.model, x, y, spec).trace
            marginal_claim(tr, label=label, method=lm.meta.method, source=lm.meta.source, model_name=lm.meta.name)
            tr.step_statistics("marginal")
            tr.delta_summary()

        app, eng = sandwich(work, lambda: timed_click(
            page, "Run attack", lambda p: p.get_by_role("heading", name=head).first.wait_for(timeout=TIMEOUT_MS)))
        what = f"{steps} queries" if name == "square" else f"{steps} iterations"
        rows.append(env.row(f"Attack Lab: {label}, {what}, 64 images", app, eng))
    return rows


def sgld_rows(page, env) -> list[dict]:
    from core import sampling

    nav(page, "Home")
    page.get_by_role("button", name="Open step 7").click()   # SAT, classes 1 and 7 x 4 chains, PCA, Initialise
    page.get_by_text(re.compile("initialised in")).first.wait_for(timeout=TIMEOUT_MS)
    lm = env.model("cifar10-demo-sat")
    ds = env.data("cifar10-demo", "train", fallback="test")
    d = sampling.sgld_defaults(lm)
    smp = sampling.SGLDSampler(lm, [1, 7], 4, init="pca", eta=d["eta"], zeta=d["zeta"], gamma=d["gamma"], seed=0,
                               stats=sampling.ClassStats(ds), pca_sigma=sampling.DEFAULT_PCA_SIGMA, pca_variance=0.95,
                               gaussian_ridge=sampling.DEFAULTS["gaussian_ridge"])
    done = re.compile("run finished at step 100")
    app, eng = sandwich(lambda: smp.step(100), lambda: timed_click(
        page, "Run 100 steps", lambda p: p.get_by_text(done).first.wait_for(timeout=TIMEOUT_MS)))
    return [env.row("SGLD studio: 8 chains x 100 steps (SAT, PCA start)", app, eng)]


def landscape_rows(page, env) -> list[dict]:
    from core import analysis, evaluation
    from core.attacks import AttackSpec
    from core.models.registry import list_bundled, load_model_ref

    nav(page, "Energy landscape")
    page.get_by_role("button", name="Compute landscape").wait_for(timeout=TIMEOUT_MS)
    good = [(r, m) for r, m, _ in list_bundled() if m is not None]
    refs = [r for r, m in good if m.dataset == good[0][1].dataset][:4]     # the page's default choice

    def work():   # the page's task loads its models too
        models = [load_model_ref(r, device="cpu") for r in refs]
        eps = round(evaluation.default_eps(models[0].meta, "Linf") * 255, 2) / 255
        spec = AttackSpec("pgd", eps=eps, steps=10, seed=0, batch_size=128)
        analysis.landscape(models, None, None, spec, n=128, seed=0, split="test", names=[r.name for r in refs],
                           use_cache=False)

    app, eng = sandwich(work, lambda: timed_click(
        page, "Compute landscape",
        lambda p: p.get_by_role("button", name="Download table (CSV)").wait_for(timeout=TIMEOUT_MS)))
    return [env.row(f"Energy landscape: {len(refs)} models x 128 images, PGD-10", app, eng)]


def analysis_rows(page, env) -> list[dict]:
    from core import analysis
    from core.data import probe_indices

    nav(page, "Sample analysis")
    page.get_by_role("button", name="Analyse").wait_for(timeout=TIMEOUT_MS)
    select(page, "Data", "test")
    lm, ds = env.model("cifar10-demo-plain"), env.data("cifar10-demo", "test")

    def work():   # the statistics and what the page computes from them
        idx = probe_indices(ds, len(ds), seed=0)
        s = analysis.sample_stats(lm.model, ds.images(idx), ds.labels(idx), attack=None)
        analysis.margin_correlations(s)
        analysis.per_class_stats(s, lm.meta.class_names)

    app, eng = sandwich(work, lambda: timed_click(
        page, "Analyse", lambda p: p.get_by_text("Pearson(PM, E(x,y))").first.wait_for(timeout=TIMEOUT_MS)))
    return [env.row(f"Sample analysis: all {len(ds)} test images", app, eng)]


def embeddings_rows(page, env) -> list[dict]:
    import torch

    from core import analysis, evaluation
    from core.attacks import AttackSpec, run_attack
    from core.data import probe_indices

    nav(page, "Embedding explorer")
    page.get_by_role("button", name="Compute features").wait_for(timeout=TIMEOUT_MS)
    lm, ds = env.model("cifar10-demo-plain"), env.data("cifar10-demo", "test")

    def work():
        idx = probe_indices(ds, 300, seed=0)
        x, y = ds.images(idx), ds.labels(idx)
        xa = run_attack(lm.model, x, y, AttackSpec("pgd", eps=evaluation.default_eps(lm.meta, "Linf"), steps=10,
                                                   seed=0), record_trace=False).x_adv
        allx, _ = analysis.stack_groups({"natural": x, "adversarial": xa})
        feats = analysis.extract_features(lm.model, allx, kind="penultimate")
        analysis.sample_stats_from_logits(analysis.model_logits(lm.model, allx), torch.cat([y, y]))
        analysis.pca_2d(feats)

    done = re.compile("natural: 300 points")
    app, eng = sandwich(work, lambda: timed_click(
        page, "Compute features", lambda p: p.get_by_text(done).first.wait_for(timeout=TIMEOUT_MS)))
    return [env.row("Embedding explorer: 300 images + PGD-10, features + PCA", app, eng)]


def evaluation_rows(page, env) -> list[dict]:
    import dataclasses
    from pathlib import Path

    from core import evaluation
    from core.models.registry import list_bundled

    nav(page, "Evaluation")
    page.get_by_role("button", name="Launch evaluation job").wait_for(timeout=TIMEOUT_MS)
    select(page, "AutoAttack", "off")
    ref = next(r for r, m, _ in list_bundled() if r.name == "cifar10-demo-plain")
    cfg = {"model": dataclasses.asdict(ref), "n": 200, "norm": "Linf", "eps": 8 / 255, "pgd_steps": 20,
           "autoattack": False, "aa_version": "standard", "aa_attacks": None, "chunk_size": 100, "batch_size": 100,
           "seed": 0, "device": "cpu"}

    def work():   # what the job process runs (it loads the model itself)
        with tempfile.TemporaryDirectory() as d:
            evaluation.run_job(cfg, Path(d), lambda f, m="": None)

    app, eng = sandwich(work, lambda: timed_click(
        page, "Launch evaluation job",
        lambda p: p.get_by_role("button", name="Download CSV").wait_for(timeout=TIMEOUT_MS)))
    return [env.row("Evaluation: job, N = 200, PGD-20, AutoAttack off (a separate process in the app)", app, eng)]


class Env:
    """Models and datasets of the engine column, loaded once (their loading is not timed on either side: the app's
    pages have them cached before the click)."""

    def __init__(self):
        self._m, self._d = {}, {}

    def model(self, name):
        from core.models.registry import list_bundled, load_model_ref

        if name not in self._m:
            ref = next(r for r, m, _ in list_bundled() if r.name == name)
            self._m[name] = load_model_ref(ref, device="cpu")
        return self._m[name]

    def data(self, name, split, fallback=None):
        from core.data import load_dataset
        from core.errors import EnergyLensError

        key = (name, split)
        if key not in self._d:
            try:
                self._d[key] = load_dataset(name, split)
            except EnergyLensError:
                self._d[key] = load_dataset(name, fallback)
        return self._d[key]

    @staticmethod
    def row(action: str, app: float, engine: float) -> dict:
        r = {"action": action, "app_s": round(app, 2), "engine_s": round(engine, 2), "ratio": round(app / engine, 2)}
        print(f"  {action}: app {app:.2f} s, engine {engine:.2f} s, ratio {app / engine:.2f}", flush=True)
        return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=ACTIONS, choices=ACTIONS)
    ap.add_argument("--server-arg", action="append", default=[], help="extra `streamlit run` option (A/B runs)")
    args = ap.parse_args()
    if not os.path.exists(CHROMIUM):
        print("skipped: Debian chromium not installed")
        return
    from playwright.sync_api import sync_playwright

    gc_opt = effective_post_script_gc()
    print(f"runner.postScriptGC as the server resolves it: {gc_opt}; extra server options: {args.server_arg}")
    env = Env()
    rows: list[dict] = []
    runs = tempfile.mkdtemp(prefix="bench-app-")
    with server(runs, args.server_arg) as (url, proc, t0), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu",
                                          "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.goto(url)
        page.get_by_text("Look at adversarially robust image classifiers").wait_for(timeout=TIMEOUT_MS)
        first = time.perf_counter() - t0
        for name in args.only:
            try:
                rows += globals()[f"{name}_rows"](page, env)
            except Exception as e:  # noqa: BLE001 - one failed action must not lose the others' rows
                print(f"  {name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                page.screenshot(path=os.path.join(runs, f"{name}-failed.png"), full_page=True)
                rows.append({"action": f"{name}: failed ({type(e).__name__})", "app_s": None, "engine_s": None,
                             "ratio": None})
        rss = _peak_rss_mb(proc.pid)
        browser.close()
    if all(r["ratio"] is not None for r in rows):
        shutil.rmtree(runs, ignore_errors=True)
    else:
        print(f"server log and screenshots of the failed actions kept in {runs}")
    _util.print_table("Each page's main action: in the app (Chromium, click -> result drawn) vs the same work in a "
                      "plain process, one run", rows)
    print(f"cold start to Home drawn: {first:.1f} s; server peak RSS {rss:.0f} MB")
    print("written", _util.write_result("app", rows, {"post_script_gc": gc_opt, "server_args": args.server_arg,
                                                      "first_page_s": round(first, 2), "server_peak_rss_mb": round(rss)}))


if __name__ == "__main__":
    main()
