"""Robust-overfitting detector: the three phases of adversarial training (paper Sec. 3.2, Fig. 3).

During SAT the gap ΔE(x) = E(x) − E(x*) between the natural and adversarial marginal energies of
*training* samples goes through three phases: an initial transient (phase 1), a plateau where the
energies stay comparable (phase 2), and a steep, sustained fall (phase 3) that coincides with the
rise of the robust test error, i.e. robust overfitting. TRADES keeps ΔE(x) almost flat.

:func:`detect_phases` locates the two boundaries from the per-epoch ΔE(x) series alone.

The rule (and why)
------------------
1. **Clean-up without lag.** Non-finite values are dropped (their epochs are skipped, not
   interpolated). Isolated spikes are replaced by a Hampel filter (:func:`despike`), which leaves
   ordinary noise and kinks untouched. Optional extra smoothing is a *forward-backward* (zero-phase)
   EMA: a one-sided EMA — what the dashboard slider shows — delays every change by about
   ``weight / (1 - weight)`` epochs and would bias the detected epoch late.
2. **Piecewise-linear change points.** The three phases are, to first order, three straight
   pieces: transient, plateau, fall. We fit continuous piecewise-linear curves by least squares
   with an exhaustive (coarse-to-fine) search over the breakpoints, restricted to observed epochs:
   ``M1`` with one kink (phase 1 | rest) and ``M2`` with two kinks (phase 1 | plateau | fall).
   A least-squares change point is unbiased under noise (no smoothing window to tune), uses every
   epoch of evidence, and gives slopes that are directly interpretable. The last piece may also
   bend (an extra ``relu(t − kink)²`` term) when that pays for its parameter under BIC and the
   bend is decelerating (a collapse that then levels off, as in Fig. 3); an accelerating fall keeps
   a straight last piece, because its onset is ill-defined and a bent fit would slide it early —
   its kink then marks where the fall becomes distinguishable from the plateau (a few epochs after
   the mathematical onset of a gradual curve, exact for a sharp one). When phase 1 is too weak to
   need its own kink, the one-kink model read as plateau | fall is tried as well.
3. **Acceptance of phase 3** (all must hold):
   a. the last piece falls: its mean slope ``s3 < 0`` (``direction='down'``: ΔE = E(x) − E(x*)
      decreasing, the paper's convention);
   b. it is *steep* relative to the plateau: ``|s3| >= steep_ratio * |s2|`` — a slow steady drift
      is a plateau, not an overfitting phase;
   c. it is *sustained*: at least ``min_phase3`` epochs after the kink lie more than 1 σ below the
      plateau level (median of its last ``min_plateau`` epochs), and the extra drop beyond the
      plateau trend by the last epoch is at least ``noise_mult`` σ. σ is the residual standard
      deviation of the fit, floored by a robust estimate (MAD of first and second differences,
      see :func:`_robust_noise`), so a fit that chases the noise cannot shrink it;
   d. the kink is statistically real: the F statistic of the fit against the same fit without the
      phase-3 kink exceeds ``f_min``. The default (10) is deliberately far above the nominal 1 %
      point because the kink is chosen by search (multiple testing).
   Scale-free by construction: every threshold is relative to the series' own noise or slopes, so
   it works for ΔE ranges of 0.01 (digits) and 0.5 (CIFAR-10) alike. On synthetic curves (see
   tests/test_phase.py) sharp falls are located exactly at noise/fall ratios up to 1:12, and
   no false alarm occurred on ~2,000 flat or slowly drifting noisy (TRADES-like) curves.
4. **Phase 1 end** is the first kink of the accepted model (``M2`` when phase 3 is found, else
   ``M1``), reported only when it is a real *initial transient*: (a) early -- phase 1 lasts no longer
   than the plateau after it; (b) large -- the initial piece, extrapolated to the first epoch,
   differs from the plateau line by at least ``noise_mult`` σ; (c) significant -- the F statistic of
   the fit against the same fit without that kink is at least ``f_min``. Otherwise it is None (no
   distinct initial transient). Without (a) and (c), a kink the search placed in the last few noisy
   epochs passed (b) because its slope error is multiplied by the long first segment: flat noise
   reported "phase 1 ends at epoch 51" of 60.

``confidence`` is ``z² / (z² + noise_mult²)`` with ``z`` the phase-3 drop in units of σ: 0.5 at the
acceptance threshold, → 1 for a drop far above the noise, 0 when nothing is detected.

Everything is numpy; nothing here imports streamlit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np

from .errors import InputError

__all__ = ["PhaseResult", "detect_phases", "detect_from_metrics", "smooth", "despike", "zero_phase_smooth",
           "metric_series", "robust_peak"]

MAX_POINTS = 400          # longer series are bin-averaged to this many points before the search
MAX_CANDIDATES = 60       # coarse breakpoint grid per breakpoint, refined locally afterwards


@dataclass
class PhaseResult:
    """Phase boundaries in epoch units (the ``epochs`` given, or 1..n)."""

    phase1_end: float | None          # last epoch of the initial transient (None: no distinct phase 1)
    phase3_start: float | None        # epoch where the steep sustained fall starts (None: no overfitting)
    confidence: float                 # 0..1, see module docstring
    explanation: str
    slopes: tuple[float, ...] = ()    # per-piece slopes of the accepted fit (ΔE per epoch)
    noise: float = float("nan")       # σ used in the tests
    drop: float = float("nan")        # extra phase-3 drop beyond the plateau trend
    f_stat: float = float("nan")      # F statistic of the phase-3 kink
    fit_epochs: list[float] = field(default_factory=list)   # x of the fitted piecewise-linear curve
    fit_values: list[float] = field(default_factory=list)   # its values (for plotting)
    n_used: int = 0

    @property
    def overfitting(self) -> bool:
        return self.phase3_start is not None

    def to_dict(self) -> dict:
        return asdict(self)


# -------------------------------------------------------------------------------------- smoothing
def smooth(values: Iterable[float], weight: float) -> np.ndarray:
    """TensorBoard's debiased exponential moving average.

    ``out[t] = ema[t] / (1 - weight**k)`` with ``ema[t] = weight * ema[t-1] + (1 - weight) * v[t]``
    and ``k`` the number of finite values seen so far, so the first points are not pulled towards
    zero. Non-finite values are passed through unchanged and do not update the average.
    ``weight`` in [0, 1): 0 returns the input.
    """
    v = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float).ravel()
    w = float(weight)
    if not math.isfinite(w) or not 0.0 <= w < 1.0:
        raise InputError(f"smoothing weight must lie in [0, 1), got {weight}")
    if w == 0.0 or v.size == 0:
        return v.copy()
    out = np.empty_like(v)
    last, k = 0.0, 0
    for i, x in enumerate(v):
        if not math.isfinite(x):
            out[i] = x
            continue
        last = last * w + (1.0 - w) * x
        k += 1
        out[i] = last / (1.0 - w ** k)
    return out


def despike(v: np.ndarray, half_width: int = 2, n_sigmas: float = 4.0) -> np.ndarray:
    """Hampel filter: replace isolated outliers, leave everything else untouched.

    An interior value further than ``n_sigmas`` robust σ from the median of a *symmetric* window
    around it (radius ``half_width``, shrunk near the ends) is replaced by that median; the two end
    values are compared with the linear extrapolation of their two inner neighbours instead (and a
    wider tolerance, √6 ≈ 2.45 times, for the extrapolation's own noise). Symmetric medians of a
    straight or kinked line equal the centre value, so slopes and kinks stay where they are, and
    ordinary noise stays independent (its level is then estimated correctly), unlike a plain
    running median.
    """
    v = np.asarray(v, dtype=float)
    n = v.size
    if n < 5:
        return v.copy()
    sigma = max(_robust_noise(v), 1e-12 * float(np.max(np.abs(v))))
    if not sigma > 0:
        return v.copy()
    out = v.copy()
    for i in range(1, n - 1):
        r = min(half_width, i, n - 1 - i)
        med = float(np.median(v[i - r:i + r + 1]))
        if abs(v[i] - med) > n_sigmas * sigma:
            out[i] = med
    for i, (a, b) in ((0, (1, 2)), (n - 1, (n - 2, n - 3))):
        pred = 2 * out[a] - out[b]
        if abs(v[i] - pred) > n_sigmas * sigma * math.sqrt(6.0):
            out[i] = pred
    return out


def zero_phase_smooth(v: np.ndarray, weight: float) -> np.ndarray:
    """Average of a forward and a backward debiased EMA: smoothing without lag."""
    v = np.asarray(v, dtype=float)
    if weight <= 0 or v.size < 3:
        return v.copy()
    return 0.5 * (smooth(v, weight) + smooth(v[::-1], weight)[::-1])


# -------------------------------------------------------------------------------------- fitting
def _hinge_design(x: np.ndarray, knots: np.ndarray, quad: bool = False) -> np.ndarray:
    """Design matrices for continuous piecewise-linear fits.

    ``knots``: (P, K) breakpoints -> (P, n, 2 + K [+ 1]) with columns 1, x, relu(x - knot_k) and,
    with ``quad``, relu(x - last knot)² (a last piece that may bend: accelerating or saturating).
    """
    P, K = knots.shape
    n = x.size
    X = np.empty((P, n, 2 + K + (1 if quad and K else 0)))
    X[:, :, 0] = 1.0
    X[:, :, 1] = x[None, :]
    for k in range(K):
        X[:, :, 2 + k] = np.maximum(x[None, :] - knots[:, k:k + 1], 0.0)
    if quad and K:
        X[:, :, 2 + K] = X[:, :, 1 + K] ** 2
    return X


def _batch_fit(x: np.ndarray, y: np.ndarray, knots: np.ndarray, quad: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares fits for every row of ``knots``: (RSS (P,), coefficients (P, 2 + K [+ 1]))."""
    X = _hinge_design(x, knots, quad)
    XtX = np.einsum("pni,pnj->pij", X, X)
    Xty = np.einsum("pni,n->pi", X, y)
    # tiny ridge: keeps degenerate knot placements solvable without changing proper fits
    XtX = XtX + 1e-10 * np.eye(X.shape[2])[None]
    coef = np.linalg.solve(XtX, Xty[..., None])[..., 0]
    resid = y[None, :] - np.einsum("pni,pi->pn", X, coef)
    return (resid ** 2).sum(axis=1), coef


def _candidate_grid(lo: int, hi: int) -> np.ndarray:
    """Indices lo..hi (inclusive), thinned to at most MAX_CANDIDATES."""
    if hi < lo:
        return np.zeros(0, dtype=int)
    idx = np.arange(lo, hi + 1)
    if idx.size > MAX_CANDIDATES:
        idx = np.unique(np.linspace(lo, hi, MAX_CANDIDATES).round().astype(int))
    return idx


def _best_one_kink(x, y, min_first: int, min_rest: int, quad: bool = False):
    n = x.size
    cand = np.arange(min_first, n - min_rest)
    if cand.size == 0:
        return None
    rss, coef = _batch_fit(x, y, x[cand][:, None], quad)
    j = int(np.argmin(rss))
    return {"i1": int(cand[j]), "rss": float(rss[j]), "coef": coef[j]}


def _best_two_kinks(x, y, min_first: int, min_plateau: int, min_last: int, quad: bool = False):
    """Exhaustive (coarse-to-fine) search of two kinks i1 < i3 with the segment length limits."""
    n = x.size
    lo1, hi1 = min_first, n - 1 - min_last - min_plateau
    if hi1 < lo1:
        return None

    def pairs_from(c1: np.ndarray, c3: np.ndarray) -> np.ndarray:
        a, b = np.meshgrid(c1, c3, indexing="ij")
        a, b = a.ravel(), b.ravel()
        ok = (b - a >= min_plateau) & (b <= n - 1 - min_last) & (a >= lo1)
        return np.stack([a[ok], b[ok]], axis=1)

    c1 = _candidate_grid(lo1, hi1)
    c3 = _candidate_grid(lo1 + min_plateau, n - 1 - min_last)
    pairs = pairs_from(c1, c3)
    if pairs.size == 0:
        return None
    rss, coef = _batch_fit(x, y, x[pairs].astype(float), quad)
    j = int(np.argmin(rss))
    best = pairs[j]
    # local refinement when the grid was thinned
    step = max(1, int(math.ceil((n - 1) / MAX_CANDIDATES)))
    if step > 1:
        r1 = np.arange(max(lo1, best[0] - step), min(hi1, best[0] + step) + 1)
        r3 = np.arange(max(lo1 + min_plateau, best[1] - step), min(n - 1 - min_last, best[1] + step) + 1)
        p2 = pairs_from(r1, r3)
        if p2.size:
            rss2, coef2 = _batch_fit(x, y, x[p2].astype(float), quad)
            k = int(np.argmin(rss2))
            if rss2[k] <= rss[j]:
                return {"i1": int(p2[k][0]), "i3": int(p2[k][1]), "rss": float(rss2[k]), "coef": coef2[k]}
    return {"i1": int(best[0]), "i3": int(best[1]), "rss": float(rss[j]), "coef": coef[j]}


def _eval_hinge(x: np.ndarray, knots: Sequence[float], coef: np.ndarray, quad: bool = False) -> np.ndarray:
    return _hinge_design(x, np.asarray([knots], dtype=float), quad)[0] @ coef


def _robust_noise(y: np.ndarray) -> float:
    """Robust noise σ: the larger of the MAD estimates from first and second differences.

    For white noise of std σ, first differences have std σ·√2 and second differences σ·√6. Second
    differences are blind to slopes and kinks; first differences are steadier on short series. The
    larger one is a conservative floor (it can only make a detection harder).
    """
    out = 0.0
    for order, factor in ((1, math.sqrt(2.0)), (2, math.sqrt(6.0))):
        d = np.diff(y, n=order)
        if d.size >= 3:
            out = max(out, float(1.4826 * np.median(np.abs(d - np.median(d))) / factor))
    return out


def _bin_average(x: np.ndarray, y: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    edges = np.linspace(0, x.size, m + 1).round().astype(int)
    xs = np.array([x[a:b].mean() for a, b in zip(edges[:-1], edges[1:]) if b > a])
    ys = np.array([y[a:b].mean() for a, b in zip(edges[:-1], edges[1:]) if b > a])
    return xs, ys


# -------------------------------------------------------------------------------------- detector
def detect_phases(values: Iterable[float], epochs: Iterable[float] | None = None, *, smoothing: float = 0.0,
                  despike_values: bool = True, min_phase1: int = 1, min_plateau: int = 3, min_phase3: int = 3,
                  steep_ratio: float = 2.0, noise_mult: float = 4.0, f_min: float = 10.0,
                  direction: str = "down", curved: bool = True) -> PhaseResult:
    """Find the end of phase 1 and the start of phase 3 in a per-epoch ΔE(x) series of training data.

    ``values``: ΔE(x) per epoch (NaN/inf allowed: skipped). ``epochs``: their epoch numbers
    (default 1..n). ``smoothing``: weight of the zero-phase EMA applied before fitting (0 = none).
    ``direction``: 'down' (ΔE = E(x) − E(x*) falls, the paper's convention) or 'up'.
    ``despike_values``: Hampel-filter isolated outliers first. ``curved``: allow a decelerating
    bend of the last piece. ``min_*``: fewest epochs per phase; ``steep_ratio``, ``noise_mult``,
    ``f_min``: the acceptance thresholds. See the module docstring for the rule.
    Never raises on data (short, constant or non-finite series give a result with an
    explanation); raises InputError only for invalid arguments.
    """
    v = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float).ravel()
    x = np.arange(1, v.size + 1, dtype=float) if epochs is None else \
        np.asarray(list(epochs) if not isinstance(epochs, np.ndarray) else epochs, dtype=float).ravel()
    if x.size != v.size:
        raise InputError(f"values and epochs differ in length ({v.size} vs {x.size})")
    if direction not in ("down", "up"):
        raise InputError("direction must be 'down' or 'up'")
    for name, val, lo in (("min_phase1", min_phase1, 1), ("min_plateau", min_plateau, 1), ("min_phase3", min_phase3, 2)):
        if int(val) != val or val < lo:
            raise InputError(f"{name} must be an integer >= {lo}, got {val}")
    if not (steep_ratio >= 1 and noise_mult > 0 and f_min >= 0):
        raise InputError("steep_ratio must be >= 1, noise_mult > 0 and f_min >= 0")

    ok = np.isfinite(v) & np.isfinite(x)
    n_bad = int((~ok).sum())
    x, y = x[ok], v[ok]
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    note_bad = f" ({n_bad} non-finite value(s) skipped)" if n_bad else ""
    n = x.size
    min_n = min_phase1 + min_plateau + min_phase3 + 1
    if n < min_n:
        return PhaseResult(None, None, 0.0, f"Too few epochs to tell phases apart: {n} usable value(s), need at "
                           f"least {min_n}{note_bad}.", n_used=n)
    if float(np.ptp(y)) <= 1e-12 * max(float(np.max(np.abs(y))), 1e-300):
        return PhaseResult(None, None, 0.0, f"ΔE(x) is constant over all {n} epochs: no phases to tell apart.{note_bad}",
                           slopes=(0.0,), noise=0.0, fit_epochs=[float(x[0]), float(x[-1])],
                           fit_values=[float(y[0]), float(y[-1])], n_used=n)
    sign = 1.0 if direction == "down" else -1.0
    y = sign * y
    if despike_values:
        y = despike(y)
    if smoothing:
        y = zero_phase_smooth(y, smoothing)
    if n > MAX_POINTS:
        x, y = _bin_average(x, y, MAX_POINTS)
        n = x.size

    scale = float(np.max(np.abs(y))) if y.size else 0.0
    sigma_floor = max(_robust_noise(y), 1e-9 * max(scale, 1e-12))

    m1 = _best_one_kink(x, y, min_phase1, min_plateau)
    fam = {False: (m1, _best_two_kinks(x, y, min_phase1, min_plateau, min_phase3))}
    if curved:
        fam[True] = (_best_one_kink(x, y, min_phase1, min_phase3, True),
                     _best_two_kinks(x, y, min_phase1, min_plateau, min_phase3, True))

    def bic(m, n_par):
        return n * math.log(max(m["rss"], 1e-300) / n) + n_par * math.log(n) if m is not None else float("inf")

    # Straight or bent phase 3: the bend must pay for its extra parameter (BIC), and only a
    # decelerating bend is allowed. An accelerating fall has no well-defined onset (a bent fit slides
    # its kink early, where the curve is still flat), so it keeps the straight kink, which marks where
    # the fall becomes distinguishable from the plateau.
    use_q = False
    if curved:
        two = fam[False][1] is not None
        lin_m, q_m = (fam[False][1], fam[True][1]) if two else (fam[False][0], fam[True][0])
        n_par = 6 if two else 4
        use_q = q_m is not None and q_m["coef"][-1] > 0 and bic(q_m, n_par + 1) < bic(lin_m, n_par)
    m1c, m2 = fam[use_q]
    curved = use_q

    def fit_curve(knots, coef, quad=False):
        xs = np.asarray(knots, float)
        if quad:   # sample the bent last piece
            xs = np.concatenate([xs, np.linspace(knots[-1], x[-1], 12)[1:-1]])
        xs = np.concatenate([[x[0]], xs, [x[-1]]])
        return xs.tolist(), (sign * _eval_hinge(xs, knots, coef, quad)).tolist()

    def phase1_check(t1: float, s1: float, s2: float, sigma: float, rss: float, later: list[float], quad: bool,
                     dof: int) -> bool:
        """Is the first kink ``t1`` a real initial transient? It must be (a) early: no longer than the plateau
        that follows it (up to the phase-3 kink, else the last epoch) -- a transient, not most of training;
        (b) large: the first piece, extrapolated back to the first epoch, differs from the plateau line by
        ``noise_mult`` σ; (c) significant: the F statistic of the fit against the same fit without that kink is at
        least ``f_min`` (a kink chosen by search in pure noise or in a straight drift does not pass)."""
        plateau_end = later[0] if later else float(x[-1])
        if not (t1 - x[0]) <= (plateau_end - t1):
            return False
        if abs(s1 - s2) * (t1 - x[0]) < noise_mult * sigma:
            return False
        base = np.asarray([later], float) if later else np.zeros((1, 0))
        rss0 = float(_batch_fit(x, y, base, quad and bool(later))[0][0])
        return ((rss0 - rss) / 2.0) / max(rss / max(dof, 1), 1e-300) >= f_min

    def assess(knots: list[float], i3: int, coef: np.ndarray, rss: float) -> dict:
        """Tests of the last kink ``knots[-1]`` (index ``i3``) as the start of phase 3."""
        k = len(knots)
        lin = coef[:2 + k]
        slopes = np.cumsum(lin[1:])                       # slope of each piece (phase 3: at its start)
        s2 = float(slopes[-2])
        t3 = knots[-1]
        span = float(x[-1] - t3)
        dev = lin[-1] * span + (coef[-1] * span ** 2 if curved else 0.0)   # end value vs plateau trend
        drop = -dev
        s3 = s2 + dev / span                              # mean slope of phase 3
        extra = 1 if curved else 0
        dof = max(n - 2 - 2 * k - extra, 1)               # line + (slope, position) per kink + bend
        sigma = max(math.sqrt(rss / dof), sigma_floor)
        base = np.asarray([knots[:-1]], float) if k > 1 else np.zeros((1, 0))
        rss0 = float(_batch_fit(x, y, base)[0][0])        # same earlier kinks, no phase 3
        f_stat = ((rss0 - rss) / (2.0 + extra)) / max(rss / dof, 1e-300)
        z = drop / sigma
        # epochs of phase 3 clearly (> 1 robust σ) below the plateau level (median of its last epochs)
        level = float(np.median(y[max(0, i3 - min_plateau + 1):i3 + 1]))
        below = int(np.sum(y[i3 + 1:] < level - sigma_floor))
        conds = {
            "falls": s3 < 0,
            "steep": s3 < s2 and abs(s3) >= steep_ratio * abs(s2),
            "sustained": z >= noise_mult and below >= min_phase3,
            "significant": f_stat >= f_min,
        }
        return {"knots": knots, "i3": i3, "coef": coef, "rss": rss, "slopes": np.append(slopes[:-1], s3), "sigma": sigma,
                "drop": drop, "z": z, "f": f_stat, "conds": conds, "ok": all(conds.values())}

    cands = []
    if m2 is not None:
        cands.append(assess([float(x[m2["i1"]]), float(x[m2["i3"]])], m2["i3"], m2["coef"], m2["rss"]))
    if m1c is not None and (n - 1 - m1c["i1"]) >= min_phase3:
        # the single kink read as plateau | fall (runs whose phase 1 is too weak to need a kink)
        cands.append(assess([float(x[m1c["i1"]])], m1c["i1"], m1c["coef"], m1c["rss"]))
    good = [c for c in cands if c["ok"]]
    if good:
        c = good[0]
        knots, slopes, sigma, z, drop = c["knots"], c["slopes"], c["sigma"], c["z"], c["drop"]
        t3 = knots[-1]
        s2, s3 = slopes[-2], slopes[-1]
        p1 = None
        if len(knots) == 2 and phase1_check(knots[0], slopes[0], slopes[1], sigma, float(c["rss"]), [knots[1]],
                                            curved, n - 2 - 4 - (1 if curved else 0)):
            p1 = knots[0]
        conf = float(z * z / (z * z + noise_mult ** 2)) if math.isfinite(z) else 1.0
        fx, fy = fit_curve(knots, c["coef"], curved)
        word = "falls" if sign > 0 else "rises"
        zs = f"{z:.1f}σ" if z < 1000 else "> 1000σ"
        fs = f"{c['f']:.1f}" if c["f"] < 1e6 else "> 10⁶"
        expl = (f"Robust overfitting: ΔE(x) {word} steeply from epoch {t3:g} on "
                f"({sign * s3:+.3g}/epoch vs {sign * s2:+.3g}/epoch on the plateau; extra change "
                f"{-sign * drop:+.3g} = {zs} over {n - 1 - c['i3']} epochs, F = {fs})"
                + (f"; phase 1 ends at epoch {p1:g}" if p1 is not None else "; no distinct phase 1")
                + f".{note_bad}")
        return PhaseResult(p1, t3, conf, expl, slopes=tuple(float(sign * q) for q in slopes), noise=sigma,
                           drop=float(-sign * drop), f_stat=float(c["f"]), fit_epochs=fx, fit_values=fy, n_used=n)

    reasons: list[str] = []
    if cands:
        c = cands[0]
        why = {"falls": "the last piece does not fall",
               "steep": f"it is not {steep_ratio:g}× steeper than the plateau",
               "sustained": f"its extra drop is {c['z']:.1f}σ (needs {noise_mult:g}σ) or lasts < {min_phase3} epochs",
               "significant": f"its kink is not significant (F = {c['f']:.1f} < {f_min:g})"}
        reasons = [why[k] for k, good_ in c["conds"].items() if not good_][:1]   # the first failed test

    # ---- no phase 3: the one-kink model gives the phase-1 boundary
    if m1 is None:
        return PhaseResult(None, None, 0.0, "No steep sustained fall of ΔE(x) (no robust overfitting detected)."
                           + note_bad, n_used=n)
    coef = m1["coef"]
    t1 = float(x[m1["i1"]])
    s1, s2 = coef[1], coef[1] + coef[2]
    sigma = max(math.sqrt(m1["rss"] / max(n - 4, 1)), sigma_floor)
    p1 = t1 if phase1_check(t1, s1, s2, sigma, float(m1["rss"]), [], False, n - 4) else None
    fx, fy = fit_curve([t1], coef)
    expl = ("No robust overfitting detected: ΔE(x) shows no steep sustained fall after a plateau"
            + (f" ({'; '.join(reasons)})" if reasons else "")
            + (f". Phase 1 ends at epoch {p1:g}" if p1 is not None else ". No distinct phase 1")
            + f".{note_bad}")
    return PhaseResult(p1, None, 0.0, expl, slopes=(float(sign * s1), float(sign * s2)), noise=sigma,
                       fit_epochs=fx, fit_values=fy, n_used=n)


def detect_from_metrics(records: Sequence[dict], key: str = "dE_mean", **kwargs) -> PhaseResult:
    """:func:`detect_phases` on a list of metrics.jsonl records (``epoch`` and ``key`` per line).

    Records without the key (or with a non-numeric value) count as missing epochs.
    """
    epochs, vals = metric_series(records, key)
    return detect_phases(vals, epochs, **kwargs)


# -------------------------------------------------------------------------------------- run folders
def metric_series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of one metrics.jsonl key; missing or non-numeric values become NaN."""
    ep, val = [], []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            continue
        try:
            e = float(r.get("epoch", i + 1))
        except (TypeError, ValueError):
            e = float(i + 1)
        v = r.get(key)
        try:
            v = float(v) if v is not None else float("nan")
        except (TypeError, ValueError):
            v = float("nan")
        ep.append(e)
        val.append(v)
    return np.asarray(ep, dtype=float), np.asarray(val, dtype=float)


def robust_peak(epochs, pgd_acc) -> tuple[int, float, float] | None:
    """``(epoch of the highest robust test accuracy, that accuracy, the accuracy at the last epoch)``, or ``None``
    when the run has no finite robust accuracy yet. The gap between the last two is the robust overfitting the
    paper's Fig. 3 shows (Rice et al., 2020)."""
    ep = np.asarray(epochs, float)
    acc = np.asarray(pgd_acc, float)
    ok = np.isfinite(acc) & np.isfinite(ep)
    if not ok.any():
        return None
    ep, acc = ep[ok], acc[ok]
    k = int(np.argmax(acc))
    return int(ep[k]), float(acc[k]), float(acc[-1])
