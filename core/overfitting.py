"""Robust overfitting of one training run, read from its per-epoch records (paper Sec. 3.2, Fig. 3).

:func:`summarize` turns ``metrics.jsonl`` records into the numbers a student should look at: where robust test
accuracy peaked and where it ended (with the standard error of that drop on the held-out images), how far the
training probe's robust accuracy climbed above the test images' (memorisation), and where the ΔE(x) detector of
:mod:`core.phase` places phase 3 — judged from ΔE(x) alone, never from the test accuracy. :func:`sentence` says it
in one line. Everything is computed from the records; nothing here knows which run it is looking at.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from . import phase
from .data import DATASETS
from .data.demo import DEMO_DATASET, TRAIN_SIZE as DEMO_TRAIN_SIZE

__all__ = ["Overfitting", "summarize", "sentence", "recipe", "finite_number", "SIGNIFICANT_SE"]

SIGNIFICANT_SE = 2.0     # a drop of robust test accuracy counts as robust overfitting beyond 2 standard errors


@dataclass
class Overfitting:
    method: str
    epochs: int
    n_test: int                    # held-out images behind each robust accuracy
    peak_epoch: int
    peak_acc: float                # robust (PGD) test accuracy at its peak, in [0, 1]
    end_acc: float                 # ... at the last epoch
    drop: float                    # peak - end, in [0, 1]
    drop_se: float                 # its standard error (two binomial proportions on n_test images)
    train_rob_end: float | None    # robust accuracy on the training probe at the last epoch
    train_nat_end: float | None
    gap_end: float | None          # train_rob_end - end_acc: how much the robust fit is memorised
    phase1_end: float | None
    phase3_start: float | None     # from ΔE(x) alone (core.phase.detect_phases)
    dE_end: float | None
    dE_plateau: float | None       # ΔE(x) at the end of the plateau (the phase-3 kink, else the run's median)

    @property
    def significant(self) -> bool:
        """The robust test accuracy fell by more than :data:`SIGNIFICANT_SE` standard errors."""
        return self.drop_se > 0 and self.drop > SIGNIFICANT_SE * self.drop_se

    @property
    def phase3_lag(self) -> float | None:
        """Epochs from the robust-accuracy peak to the start of phase 3 (negative: phase 3 starts first)."""
        return None if self.phase3_start is None else self.phase3_start - self.peak_epoch

    def to_dict(self) -> dict:
        return {**asdict(self), "significant": self.significant, "phase3_lag": self.phase3_lag}


def finite_number(rec: dict, key: str) -> float | None:
    """``rec[key]`` as a finite float, else None (missing, text, NaN, infinite)."""
    try:
        v = float(rec.get(key))
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def summarize(records: Sequence[dict], method: str | None = None, n_test: int | None = None,
              key: str = "dE_mean") -> Overfitting | None:
    """The robust-overfitting summary of a run, or None when no epoch has a robust test accuracy yet.

    ``n_test`` is the number of held-out images (the run's ``eval_samples``; default 500, the demo test split)."""
    recs = [r for r in records if isinstance(r, dict) and finite_number(r, "pgd_acc") is not None and finite_number(r, "epoch")]
    if not recs:
        return None
    n = int(n_test or 500)
    peak = phase.robust_peak([r["epoch"] for r in recs], [r["pgd_acc"] for r in recs])
    assert peak is not None
    peak_epoch, peak_acc, end_acc = peak
    se = math.sqrt(peak_acc * (1 - peak_acc) / n + end_acc * (1 - end_acc) / n)
    last = recs[-1]
    train_rob, train_nat = finite_number(last, "probe_adv_acc"), finite_number(last, "probe_nat_acc")
    ep, de = phase.metric_series(records, key)
    ok = np.isfinite(de)
    res = phase.detect_phases(de[ok], ep[ok]) if ok.sum() >= 3 else None
    p3 = res.phase3_start if res is not None else None
    plateau = None
    if ok.any():
        if p3 is not None:
            before = de[ok][ep[ok] <= p3]
            plateau = float(before[-1]) if len(before) else None
        else:
            plateau = float(np.median(de[ok]))
    return Overfitting(
        method=str(method or "?"), epochs=int(last["epoch"]), n_test=n, peak_epoch=int(peak_epoch),
        peak_acc=float(peak_acc), end_acc=float(end_acc), drop=float(peak_acc - end_acc), drop_se=float(se),
        train_rob_end=train_rob, train_nat_end=train_nat,
        gap_end=None if train_rob is None else float(train_rob - end_acc),
        phase1_end=None if res is None else res.phase1_end, phase3_start=p3,
        dE_end=float(de[ok][-1]) if ok.any() else None, dE_plateau=plateau)


def sentence(o: Overfitting) -> str:
    """One line a student can read under the Fig. 3 plot, computed from the summary."""
    pts = 100 * o.drop
    head = (f"{o.method.upper()}: robust test accuracy peaked at {100 * o.peak_acc:.1f}% in epoch {o.peak_epoch} and "
            f"ended at {100 * o.end_acc:.1f}% after {o.epochs} epochs")
    if o.significant:
        head += f" — {pts:.1f} points lower ({pts / (100 * o.drop_se):.1f} standard errors): robust overfitting"
    elif pts > 0:
        head += f" ({pts:.1f} points lower, within {SIGNIFICANT_SE:g} standard errors: no clear robust overfitting)"
    else:
        head += " (its best)"
    if o.phase3_start is not None:
        lag = o.phase3_lag or 0.0
        when = (f"{abs(lag):.0f} epochs after the peak" if lag > 0.5 else
                f"{abs(lag):.0f} epochs before the peak" if lag < -0.5 else "at the peak")
        p3 = (f"; ΔE(x) on the training data enters phase 3 at epoch {o.phase3_start:.0f} ({when}), falling from "
              f"{o.dE_plateau:+.3f} to {o.dE_end:+.3f}")
    else:
        flat = f" (ends at {o.dE_end:+.3f})" if o.dE_end is not None else ""
        p3 = f"; ΔE(x) shows no phase 3{flat}"
    gap = ""
    if o.train_rob_end is not None and o.gap_end is not None:
        gap = (f"; on the training probe robust accuracy reaches {100 * o.train_rob_end:.1f}%, "
               f"{100 * o.gap_end:.0f} points above the test images")
    return head + p3 + gap + "."


def recipe(config: dict) -> str:
    """The training data of a run in a few words, from its config: how many images, augmented or not."""
    tpc, lim, ds = config.get("train_per_class"), config.get("train_limit"), config.get("dataset")
    classes = DATASETS[ds].num_classes if ds in DATASETS else None
    if tpc and classes:
        n = f"{int(tpc) * classes:,} ({int(tpc)} per class)"
    elif lim:
        n = f"the first {int(lim):,}"
    elif ds == DEMO_DATASET:
        n = f"{DEMO_TRAIN_SIZE:,}"
    else:
        n = "all"
    return f"{n}, {'augmented' if config.get('augment', True) else 'no augmentation'}"
