"""UMAP's time promise against what it measures, in a fresh process (as a server start is).

A child process (fresh interpreter, ENERGYLENS_CACHE pointing at a new folder: nothing measured yet) times the
warm-up (import + a tiny fit: numba compiles, or loads its on-disk cache) and warm fits of n = 300, 1000 and 2000
64-d points, printing next to each the promise the page makes at that moment (core.analysis.umap_estimate) and
the promise it made before issue 17 (a fixed "~10-30 s" for the first run). Run it twice to see the numba
cache effect (the first run on a fresh install compiles).

    OMP_NUM_THREADS=1 python bench/bench_umap.py

Writes bench/results/umap.json. Seconds on a loaded machine compare only within one run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import _util

CHILD = r"""
import json, time, numpy as np
from core import analysis as A
rows = []
e = A.umap_estimate(300)
t0 = time.perf_counter(); A.warm_umap(); dt = time.perf_counter() - t0
rows.append({"what": "warm-up (import + tiny fit)", "n": None, "measured_s": dt, "promise_after_s": e["warmup_s"],
             "promise_before": "~10-30 s"})
rng = np.random.default_rng(0)
for n in (300, 1000, 2000, 1000):
    f = rng.normal(size=(n, 64)).astype(np.float32)
    e = A.umap_estimate(n)
    t0 = time.perf_counter(); A.umap_2d(f, seed=0); dt = time.perf_counter() - t0
    rows.append({"what": "fit after warm-up", "n": n, "measured_s": dt, "promise_after_s": e["fit_s"],
                 "promise_before": "none (after the warm-up)", "estimate_basis": "measured" if e["measured"] else "fallback"})
print("ROWS" + json.dumps(rows))
"""


def main() -> None:
    env = {**os.environ, "ENERGYLENS_CACHE": tempfile.mkdtemp(prefix="bench-umap-"), "PYTHONPATH": str(_util.REPO)}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=str(_util.REPO), capture_output=True, text=True,
                         timeout=1800)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("ROWS")), None)
    if line is None:
        raise SystemExit(f"child failed:\n{out.stderr[-3000:]}")
    rows = json.loads(line[4:])
    for r in rows:
        r["measured/promise"] = r["measured_s"] / r["promise_after_s"] if r["promise_after_s"] else None
    _util.print_table("UMAP in a fresh process: measured vs promised", rows)
    print("written", _util.write_result("umap", rows))


if __name__ == "__main__":
    main()
