"""A symmetric-log axis for plotly (which has none): :func:`symlog`, its inverse and tick positions / labels
that never overlap. Used by the analysis figures (Fig. 4 drifts span several orders of magnitude around 0)."""

from __future__ import annotations

import math

import numpy as np

from core.errors import InputError

__all__ = ["symlog", "symlog_inverse", "symlog_ticks"]


def symlog(v, c: float = 1.0) -> np.ndarray:
    """sign(v) * log10(1 + |v| / c): linear near 0 (|v| << c), logarithmic beyond; odd, monotone."""
    if not c > 0:
        raise InputError(f"the symlog constant must be > 0, got {c}")
    v = np.asarray(v, dtype=np.float64)
    return np.sign(v) * np.log10(1.0 + np.abs(v) / c)


def symlog_inverse(t, c: float = 1.0) -> np.ndarray:
    """Inverse of :func:`symlog`."""
    if not c > 0:
        raise InputError(f"the symlog constant must be > 0, got {c}")
    t = np.asarray(t, dtype=np.float64)
    return np.sign(t) * c * (np.power(10.0, np.abs(t)) - 1.0)


def _fmt_tick(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if 1e-3 <= a < 1e5:
        return f"{v:g}"
    return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-").replace("e+", "e")


def symlog_ticks(lo: float, hi: float, c: float = 1.0, max_ticks: int = 11) -> tuple[list[float], list[str]]:
    """Tick positions (in symlog units) and labels (original units) covering [lo, hi].

    Candidates are 0 and +-m·10^k (m = 1, 5, 2, in that order of preference, down to c/10); a candidate is
    kept only when it lies at least 1/max_ticks of the axis span (in symlog units) from every kept tick, so
    labels never overlap (e.g. ±0.1 next to 0 on a ±1 linear range). At most ``max_ticks`` ticks.
    """
    lo, hi = float(min(lo, hi)), float(max(lo, hi))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0], ["0"]
    amax = max(abs(lo), abs(hi), c)
    kmin = math.floor(math.log10(c)) - 1
    kmax = math.ceil(math.log10(amax))
    tol = 1e-9 * amax
    cands: list[float] = [0.0]
    for m in (1, 5, 2):
        for k in sorted(range(kmin, kmax + 1), key=lambda k: -abs(k - math.log10(c))):
            v = round(m * 10.0 ** k, 12)
            if v >= c / 10:
                cands += [v, -v]
    cands = [v for v in cands if lo - tol <= v <= hi + tol]
    t_lo, t_hi = float(symlog(lo, c)), float(symlog(hi, c))
    span = max(t_hi - t_lo, 1e-12)
    gap = span / max(max_ticks, 1)
    while True:
        kept: list[float] = []
        for v in cands:
            t = float(symlog(v, c))
            if all(abs(t - float(symlog(u, c))) >= gap for u in kept):
                kept.append(v)
        if len(kept) <= max_ticks:
            break
        gap *= 1.25
    out = sorted(kept) or [lo, hi]
    return [float(symlog(v, c)) for v in out], [_fmt_tick(v) for v in out]
