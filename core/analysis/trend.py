"""Fig. 4's trend across models, as a test that can fail: does the drift |ΔE(x)| shrink as robustness grows?

A Pearson correlation over a handful of models is dominated by the one non-robust model (its |ΔE| is 30-100x the
others'): four models give -0.998 whatever the robust ones do. The verdict therefore rests on the **rank**
correlation (Spearman) between robust accuracy and mean |ΔE(x)|, with two kinds of uncertainty:

* **across models** -- an exact two-sided permutation p-value: every ordering of the models (all n! of them for
  n <= ``EXACT_MAX`` models, else ``N_PERMUTATIONS`` random ones, a fixed seed) and the share whose Spearman is at
  least as far from 0 as the observed one. Four models can never reach p < 0.05 (the smallest attainable p is
  2/4! = 0.083): four points are not enough to establish a rank trend.
* **across images** -- a 95 % bootstrap interval of Spearman: the images behind every model's robust accuracy and
  mean |ΔE(x)| resampled (jointly when the models saw the same images), ``N_BOOT`` times, a fixed seed.

**Rule.** 'shrinks' when p < ``ALPHA`` and the whole interval lies below 0; 'grows' when p < ``ALPHA`` and it lies
above 0; otherwise 'undecided' -- "not enough models to tell" (always so with fewer than ``MIN_MODELS`` models).

The robust models alone (:func:`core.claims.model_kind`: training method, zoo entry, else measured robustness) get
their own line: their order by robust accuracy, Spearman among them, and whether their robust accuracies can be
told apart at all -- every neighbouring pair must differ by more than 1.96 standard errors (SE = sqrt(p(1-p)/n)
from the image count); otherwise their order is not significant.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

import numpy as np

from ..claims import model_kind
from .samples import Correlation, _rank, correlation

__all__ = ["ALPHA", "MIN_MODELS", "EXACT_MAX", "N_PERMUTATIONS", "N_BOOT", "TREND_RULE", "spearman",
           "permutation_p_value", "bootstrap_spearman", "rank_trend", "robust_order", "robustness_trend"]

ALPHA = 0.05
MIN_MODELS = 4          # below this the page says "not enough models to tell" without testing
EXACT_MAX = 8           # up to 8 models (40,320 orderings) the permutation p-value is exact
N_PERMUTATIONS = 20000  # random orderings beyond EXACT_MAX models
N_BOOT = 1000
TREND_RULE = ("Trend rule: Spearman rank correlation of robust accuracy with mean |ΔE(x)| across models; 'shrinks' "
              f"when its exact permutation p-value (all orderings of the models) is below {ALPHA:g} and its 95% "
              "bootstrap interval over the images lies below 0, 'grows' when the interval lies above 0 with "
              f"p < {ALPHA:g}, else not enough models to tell (always with fewer than {MIN_MODELS} models; four "
              "models can never reach p < 0.05). Pearson is shown for reference only: one non-robust model "
              "dominates it.")
KEYS = ("dE_abs_mean", "dE_std", "dEy_abs_mean")


def spearman(a, b) -> float:
    """Spearman's rank correlation (ties averaged); NaN when degenerate."""
    return correlation(a, b).spearman


def _rank_rows(m: np.ndarray) -> np.ndarray:
    """Average ranks (0-based, ties averaged) along the last axis of a (B, n) array; O(B n^2), n = models."""
    less = (m[:, :, None] > m[:, None, :]).sum(axis=2)
    equal = (m[:, :, None] == m[:, None, :]).sum(axis=2)
    return less + (equal - 1) / 2.0


def _pearson_rows(ra: np.ndarray, rb: np.ndarray) -> np.ndarray:
    """Pearson per row of two (B, n) arrays (NaN where a row has no spread)."""
    ra = ra - ra.mean(axis=1, keepdims=True)
    rb = rb - rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(axis=1) / np.where(den > 0, den, 1.0), np.nan)


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman per row of two (B, n) arrays."""
    return _pearson_rows(_rank_rows(np.asarray(a, float)), _rank_rows(np.asarray(b, float)))


def permutation_p_value(a, b, *, exact_max: int = EXACT_MAX, n_perm: int = N_PERMUTATIONS, seed: int = 0) -> float:
    """Two-sided p-value of Spearman(a, b) under random pairing: the share of orderings of ``b`` whose |Spearman|
    is at least the observed one (all n! orderings for n <= ``exact_max``, else ``n_perm`` random ones with the
    observed ordering counted, (1 + hits) / (1 + n_perm)). NaN with fewer than 3 points or no spread."""
    a, b = np.asarray(a, float).reshape(-1), np.asarray(b, float).reshape(-1)
    n = len(a)
    rho = spearman(a, b)
    if n < 3 or not np.isfinite(rho):
        return float("nan")
    ra, rb = _rank(a), _rank(b)
    if n <= exact_max:
        perms = np.array(list(itertools.permutations(range(n))), dtype=np.int64)
        rhos = _pearson_rows(np.broadcast_to(ra, perms.shape), rb[perms])  # permuted ranks are ranks
        return float(np.mean(np.abs(rhos) >= abs(rho) - 1e-12))
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((int(n_perm), n)), axis=1)
    rhos = _pearson_rows(np.broadcast_to(ra, perms.shape), rb[perms])
    return float((1 + np.sum(np.abs(rhos) >= abs(rho) - 1e-12)) / (1 + int(n_perm)))


def _per_image(results) -> tuple[list[np.ndarray], list[dict[str, np.ndarray]]]:
    """Per model: correct-under-attack (0/1) per image and the per-image quantities behind each key."""
    correct, vals = [], []
    for r in results:
        dm = np.asarray(r.delta_marginal, float)
        dj = np.asarray(r.delta_joint, float)
        correct.append((np.asarray(r.pred_adv) == np.asarray(r.labels)).astype(float))
        vals.append({"dm": dm, "dj": dj})
    return correct, vals


def _key_stat(key: str, v: dict[str, np.ndarray], idx: np.ndarray) -> np.ndarray:
    """The key's model-level statistic on resampled images ``idx`` (B, n) -> (B,)."""
    if key == "dE_abs_mean":
        return np.abs(v["dm"][idx]).mean(axis=1)
    if key == "dEy_abs_mean":
        return np.abs(v["dj"][idx]).mean(axis=1)
    return v["dm"][idx].std(axis=1)


def bootstrap_spearman(results, key: str = "dE_abs_mean", *, n_boot: int = N_BOOT, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of Spearman(robust accuracy, ``key``) over bootstrap resamples of the images.

    The models' images are resampled jointly when they all hold the same labels (the landscape attacks every model
    on the same images), else each model's independently. Replicates without spread (all robust accuracies tied)
    are dropped; NaN when fewer than 3 models or no replicate is usable."""
    results = list(results)
    if len(results) < 3 or any(r.n == 0 for r in results):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    correct, vals = _per_image(results)
    same = len({r.n for r in results}) == 1 and all(np.array_equal(results[0].labels, r.labels) for r in results)
    shared = rng.integers(0, results[0].n, size=(n_boot, results[0].n)) if same else None
    acc = np.empty((n_boot, len(results)))
    stat = np.empty((n_boot, len(results)))
    for j, r in enumerate(results):
        idx = shared if same else rng.integers(0, r.n, size=(n_boot, r.n))
        acc[:, j] = correct[j][idx].mean(axis=1)
        stat[:, j] = _key_stat(key, vals[j], idx)
    rhos = _spearman_rows(acc, stat)
    rhos = rhos[np.isfinite(rhos)]
    if not len(rhos):
        return float("nan"), float("nan")
    q = (1 - level) / 2
    lo, hi = np.quantile(rhos, [q, 1 - q])
    return float(lo), float(hi)


def rank_trend(rob, stat, results=None, key: str = "dE_abs_mean", *, seed: int = 0,
               n_boot: int = N_BOOT) -> dict[str, Any]:
    """Pearson, Spearman, its permutation p-value and bootstrap interval, and the rule's outcome for one key."""
    rob, stat = np.asarray(rob, float), np.asarray(stat, float)
    n = len(rob)
    c = correlation(rob, stat) if n >= 3 else Correlation(float("nan"), float("nan"), n)
    p = permutation_p_value(rob, stat, seed=seed) if n >= 3 else float("nan")
    lo, hi = bootstrap_spearman(results, key, n_boot=n_boot, seed=seed) if results is not None else (np.nan, np.nan)
    outcome = "undecided"
    if n >= MIN_MODELS and np.isfinite(p) and p < ALPHA:
        # the image-level interval must agree (when there is one)
        if c.spearman < 0 and not (np.isfinite(hi) and hi >= 0):
            outcome = "shrinks"
        elif c.spearman > 0 and not (np.isfinite(lo) and lo <= 0):
            outcome = "grows"
    return {"pearson": c.pearson, "spearman": c.spearman, "p_value": p, "ci": [lo, hi], "outcome": outcome}


def _se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n > 0 else float("nan")


def robust_order(results, rows: Sequence[dict]) -> dict[str, Any]:
    """The robust models alone: their order by robust accuracy (with SE from the image counts), Spearman of robust
    accuracy with mean |ΔE(x)| among them, and whether their robust accuracies can be told apart (every pair of
    neighbours more than 1.96 combined SE apart)."""
    robust = []
    for r, row in zip(results, rows):
        kind, _ = model_kind(getattr(r, "method", None), getattr(r, "source", None), getattr(r, "name", None),
                             row["robust_acc"])
        if kind == "robust":
            robust.append({"model": row["model"], "robust_acc": row["robust_acc"], "n": row["n"],
                           "se": _se(row["robust_acc"], row["n"]), "dE_abs_mean": row["dE_abs_mean"]})
    robust.sort(key=lambda m: m["robust_acc"])
    out: dict[str, Any] = {"models": robust, "n": len(robust), "spearman": float("nan"), "separated": False,
                           "max_gap_se": float("nan")}
    if len(robust) >= 2:
        acc = np.array([m["robust_acc"] for m in robust])
        out["spearman"] = spearman(acc, [m["dE_abs_mean"] for m in robust])
        gaps = [(b["robust_acc"] - a["robust_acc"]) / math.hypot(a["se"], b["se"]) if math.hypot(a["se"], b["se"]) > 0
                else float("inf") for a, b in zip(robust, robust[1:])]
        out["max_gap_se"] = float(max(gaps))
        out["min_gap_se"] = float(min(gaps))
        out["separated"] = bool(min(gaps) > 1.96)
    out["text"] = _robust_text(out)
    return out


def _robust_text(o: dict) -> str:
    ms = o["models"]
    if len(ms) < 2:
        return "Fewer than two robust models in the comparison: there is no order among robust models to read."
    accs = ", ".join(f"{m['model']} {m['robust_acc']:.1%} ± {m['se']:.1%}" for m in ms)
    s = o["spearman"]
    direction = ("mean |ΔE(x)| shrinks as robust accuracy grows, as in Fig. 4" if s < 0 else
                 "mean |ΔE(x)| grows with robust accuracy, the reverse of Fig. 4" if s > 0 else
                 "mean |ΔE(x)| shows no order")
    text = f"Among the {len(ms)} robust models, {direction} (Spearman {s:+.2f}; robust accuracy ± SE: {accs}). "
    if o["separated"]:
        return text + "Their robust accuracies are more than 1.96 SE apart, so this order is measured."
    return text + (f"Not significant: neighbouring robust accuracies lie within {o['min_gap_se']:.1f} SE of each "
                   "other, so these images cannot tell the models' robustness apart (attack more images).")


def robustness_trend(results, *, seed: int = 0, n_boot: int = N_BOOT) -> dict[str, Any]:
    """Across models: does |ΔE(x)| (mean, spread) shrink as robust accuracy grows? (module docstring)

    Returns ``n_models``; per key ('dE_abs_mean', 'dE_std', 'dEy_abs_mean') Pearson, Spearman, the permutation
    p-value, the bootstrap interval and the outcome; ``verdict`` (the outcome for mean |ΔE(x)|: 'shrinks' |
    'grows' | 'undecided'), ``text`` (the sentence the page prints), ``robust`` (:func:`robust_order`) and
    ``rule``."""
    results = list(results)
    rows = [r.summary() for r in results]
    rob = np.array([r["robust_acc"] for r in rows], float)
    out: dict[str, Any] = {"n_models": len(rows), "rule": TREND_RULE}
    for key in KEYS:
        out[key] = rank_trend(rob, [r[key] for r in rows], results, key, seed=seed, n_boot=n_boot)
    out["verdict"] = out["dE_abs_mean"]["outcome"]
    out["robust"] = robust_order(results, rows)
    out["text"] = trend_text(out)
    return out


def trend_text(t: dict) -> str:
    """The page's sentence for a :func:`robustness_trend` result, computed from its numbers."""
    n = t["n_models"]
    if n < 3:
        return f"{n} model{'s' if n != 1 else ''}: not enough models to tell whether |ΔE(x)| shrinks with robustness."
    m = t["dE_abs_mean"]
    lo, hi = m["ci"]
    ci = f", 95% interval over the images {lo:+.2f} to {hi:+.2f}" if np.isfinite(lo) else ""
    nums = (f"Spearman(robust accuracy, mean |ΔE(x)|) = {m['spearman']:+.2f} over {n} models (permutation "
            f"p = {m['p_value']:.2g}{ci}; Pearson {m['pearson']:+.2f}, dominated by the least robust model)")
    if t["verdict"] == "shrinks":
        return f"{nums}: mean |ΔE(x)| shrinks as robustness grows, as in Fig. 4."
    if t["verdict"] == "grows":
        return f"{nums}: mean |ΔE(x)| grows with robustness, the reverse of Fig. 4."
    if n < MIN_MODELS:
        why = f"fewer than {MIN_MODELS} models"
    elif not (np.isfinite(m["p_value"]) and m["p_value"] < ALPHA):
        why = (f"p ≥ {ALPHA:g}" + ("; no ordering of 4 models can reach p < 0.05" if n == 4 else ""))
    else:
        why = "the interval over the images includes 0"
    return f"{nums}: not enough models to tell ({why})."
