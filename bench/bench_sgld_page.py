"""SGLD studio, click -> result drawn, next to the same work done directly through core, in one run.

On the default model (the CIFAR-10 demo, else the first bundled model), with a fresh statistics cache:

* core, "before" (what Initialise (PCA) computed on the script thread before core.sgld_cache): per-class
  PCA statistics of all classes (cold), the real-image reference energies, the sampler's x0;
* core, disk-warm: the same after a restart (statistics from the .npz cache, energies from the JSON cache);
* UI: a headless session (Streamlit AppTest) opens the page and presses Initialise at once (the worst case:
  the background preparation has just started): seconds until the script answers (progress shown) and
  until the chains are drawn; then Step 10; then a second session in the same server process.

    OMP_NUM_THREADS=1 python bench/bench_sgld_page.py [--checkpoint PATH]

Writes bench/results/sgld_page.json. Seconds on a loaded machine are only comparable within one run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import _util  # noqa: F401  (puts the repo on sys.path)


def _ui(cache: str, runs: str) -> dict:
    from streamlit.testing.v1 import AppTest

    out = {}
    for session in ("first session (cold)", "second session (warm)"):
        at = AppTest.from_file(str(_util.REPO / "dashboard" / "Home.py"), default_timeout=600)
        at.run()
        t0 = time.perf_counter()
        at.switch_page("../pages/sgld.py").run()
        out[f"{session}: open page"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        at.button(key="sgld_btn_init").click().run()
        answered = time.perf_counter() - t0
        while "sgld_sampler" not in at.session_state:
            assert not at.exception, [e.message for e in at.exception]
            time.sleep(0.25)
            at.run()
        drawn = time.perf_counter() - t0
        out[f"{session}: Initialise (PCA), script answers"] = answered
        out[f"{session}: Initialise (PCA), chains drawn"] = drawn
        for _ in range(20):   # the background preparation may still hold the buttons for a moment
            if not at.button(key="sgld_btn_step10").disabled:
                break
            time.sleep(0.25)
            at.run()
        t0 = time.perf_counter()
        at.button(key="sgld_btn_step10").click().run()
        out[f"{session}: Step 10, drawn"] = time.perf_counter() - t0
        assert not at.exception, [e.message for e in at.exception]
    return out


def _core(checkpoint: str, cache: str) -> dict:
    from core import sampling, sgld_cache
    from core.data import load_dataset
    from core.models import load_checkpoint

    lm = load_checkpoint(checkpoint)
    try:
        ds = load_dataset(lm.meta.dataset, "train")
    except Exception:  # noqa: BLE001 - a fresh clone without the demo's training images
        ds = load_dataset(lm.meta.dataset, "test")
    d = sampling.sgld_defaults(lm)
    k = lm.meta.num_classes

    def sampler(stats):
        return sampling.SGLDSampler(lm, list(range(k)), 4, init="pca", eta=d["eta"], zeta=d["zeta"],
                                    gamma=d["gamma"], seed=0, stats=stats)

    out = {}
    t0 = time.perf_counter()
    st = sampling.ClassStats(ds, cache_dir=cache)
    st.prepare(st.available)
    t1 = time.perf_counter()
    sampling.reference_energies(lm, ds, None)
    t2 = time.perf_counter()
    s = sampler(st)
    t3 = time.perf_counter()
    out["core before: class statistics, cold"] = t1 - t0
    out["core before: reference energies"] = t2 - t1
    out["core before: sampler x0"] = t3 - t2
    out["core before: Initialise (PCA) total"] = t3 - t0
    sgld_cache.reference_energies_cached(lm, ds, cache_dir=cache)       # writes the JSON cache
    sgld_cache.clear_memory()                                           # a restart: only the disk remains
    t0 = time.perf_counter()
    st2 = sampling.ClassStats(ds, cache_dir=cache)
    st2.prepare(st2.available)
    sgld_cache.reference_energies_cached(lm, ds, cache_dir=cache)
    sampler(st2)
    out["core after restart: Initialise (PCA) from the disk caches"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    s.step(10)
    out["core: Step 10"] = time.perf_counter() - t0
    out["model"] = lm.meta.name
    out["chains"] = s.n_chains
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=str(_util.REPO / "checkpoints" / "cifar10-demo-plain.safetensors"))
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="bench-sgld-page-")
    os.environ["ENERGYLENS_CACHE"] = os.path.join(base, "ui-cache")
    os.environ["ENERGYLENS_RUNS"] = os.path.join(base, "runs")
    core = _core(args.checkpoint, os.path.join(base, "core-cache"))
    from core import sgld_cache

    sgld_cache.clear_memory()       # the UI starts as a fresh server would: nothing in memory, an empty disk cache
    ui = _ui(os.environ["ENERGYLENS_CACHE"], os.environ["ENERGYLENS_RUNS"])
    rows = [{"what": k, "seconds": v} for k, v in {**core, **ui}.items() if isinstance(v, float)]
    _util.print_table(f"SGLD studio on {core['model']} ({core['chains']} chains), UI vs core in one run", rows)
    print("written", _util.write_result("sgld_page", rows, {"model": core["model"], "chains": core["chains"]}))


if __name__ == "__main__":
    main()
