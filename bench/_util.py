"""Shared helpers for the benchmarks: timing, environment record, result files."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"


def median_time(fn: Callable[[], object], reps: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(cands: dict[str, Callable[[], object]], reps: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median wall time per candidate, repetitions interleaved round-robin so that every candidate
    sees the same machine conditions (fair side-by-side comparison on a shared machine)."""
    for _ in range(warmup):
        for fn in cands.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(reps):
        for k, fn in cands.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def paired_ratio(a: Callable[[], object], b: Callable[[], object], pairs: int = 21) -> dict[str, float]:
    """Median and quartiles of time(a) / time(b) over back-to-back pairs (order alternating).

    For small differences (an overhead of a few %) on a shared machine whose speed drifts by more than
    that between repetitions: each ratio compares two runs a second apart, so the drift cancels.
    """
    a(), b()
    q1, med, q3 = statistics.quantiles(paired_ratios(a, b, pairs), n=4)
    return {"median": med, "q25": q1, "q75": q3}


def paired_ratios(a: Callable[[], object], b: Callable[[], object], pairs: int) -> list[float]:
    """time(a) / time(b) of each back-to-back pair, the order alternating (no warm-up: the caller's)."""
    ratios = []
    for i in range(pairs):
        t = {}
        for name, fn in ((("a", a), ("b", b)) if i % 2 == 0 else (("b", b), ("a", a))):
            t0 = time.perf_counter()
            fn()
            t[name] = time.perf_counter() - t0
        ratios.append(t["a"] / t["b"])
    return ratios


def bench_parser(reps: int, doc: str | None = None):
    """argparse with the options every benchmark shares: --reps and --device (CUDA when present)."""
    import argparse

    import torch

    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap


def environment() -> dict:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    return {"device": dev, "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write_result(name: str, rows: list[dict], extra: dict | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "environment": environment(), "rows": rows, **(extra or {})}, indent=2))
    return path


def print_table(title: str, rows: list[dict]) -> None:
    if not rows:
        return
    cols = list(rows[0].keys())
    width = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    print(f"\n{title}")
    print("  ".join(c.ljust(width[c]) for c in cols))
    print("  ".join("-" * width[c] for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(width[c]) for c in cols))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
