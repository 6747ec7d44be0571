"""core.overfitting: the robust-overfitting summary of a run, computed from its per-epoch records."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core import overfitting as O


def _records(pgd, de, probe_adv=None):
    out = []
    for i, (a, d) in enumerate(zip(pgd, de)):
        r = {"epoch": i + 1, "pgd_acc": a, "dE_mean": d, "rob_err": 1 - a}
        if probe_adv is not None:
            r["probe_adv_acc"] = probe_adv[i]
            r["probe_nat_acc"] = min(1.0, probe_adv[i] + 0.2)
        out.append(r)
    return out


def _sat_like(n=40, seed=0):
    """Robust accuracy that rises, plateaus and falls from epoch 20; ΔE(x) flat, then falling steeply from 20."""
    rng = np.random.default_rng(seed)
    e = np.arange(1, n + 1)
    pgd = np.where(e < 8, 0.10 + 0.02 * e, 0.25) - np.where(e > 20, 0.005 * (e - 20), 0) + rng.normal(0, 0.004, n)
    de = np.where(e > 20, -0.05 * (e - 20), 0.0) - 0.05 + rng.normal(0, 0.01, n)
    adv = np.minimum(0.3 + 0.02 * e, 0.95)
    return _records(pgd.tolist(), de.tolist(), adv.tolist())


def test_summary_reads_the_peak_the_drop_and_phase_3_from_the_records():
    recs = _sat_like()
    o = O.summarize(recs, "sat", 500)
    pgd = [r["pgd_acc"] for r in recs]
    k = int(np.argmax(pgd))
    assert o.peak_epoch == k + 1 and o.peak_acc == pytest.approx(pgd[k]) and o.end_acc == pytest.approx(pgd[-1])
    assert o.drop == pytest.approx(pgd[k] - pgd[-1])
    # two binomial proportions on 500 images
    se = math.sqrt(pgd[k] * (1 - pgd[k]) / 500 + pgd[-1] * (1 - pgd[-1]) / 500)
    assert o.drop_se == pytest.approx(se) and o.significant == (o.drop > 2 * se)
    assert o.significant
    assert o.phase3_start is not None and 18 <= o.phase3_start <= 23      # the fall starts at epoch 20
    assert o.train_rob_end == pytest.approx(recs[-1]["probe_adv_acc"])
    assert o.gap_end == pytest.approx(recs[-1]["probe_adv_acc"] - pgd[-1])
    assert o.dE_end == pytest.approx(recs[-1]["dE_mean"]) and o.dE_plateau > o.dE_end
    s = O.sentence(o)
    for text in (f"{100 * o.peak_acc:.1f}%", f"epoch {o.peak_epoch}", f"{100 * o.end_acc:.1f}%",
                 f"{100 * o.drop:.1f} points", "robust overfitting", f"phase 3 at epoch {o.phase3_start:.0f}",
                 f"{100 * o.train_rob_end:.1f}%"):
        assert text in s, (text, s)


def test_a_flat_run_is_not_called_overfitting():
    rng = np.random.default_rng(1)
    n = 40
    pgd = (0.27 + rng.normal(0, 0.004, n)).tolist()
    de = (0.005 + rng.normal(0, 0.004, n)).tolist()
    o = O.summarize(_records(pgd, de), "trades", 500)
    assert not o.significant and o.phase3_start is None
    s = O.sentence(o)
    assert "no clear robust overfitting" in s or "(its best)" in s
    assert "shows no phase 3" in s


def test_summary_skips_broken_records_and_needs_a_robust_accuracy():
    assert O.summarize([], "sat") is None
    assert O.summarize([{"epoch": 1, "pgd_acc": "n/a"}, {"epoch": 2, "pgd_acc": float("nan")}]) is None
    recs = _records([0.1, 0.2, 0.15], [0.0, float("nan"), -0.1]) + ["junk"]
    o = O.summarize(recs, "sat", 100)
    assert o.epochs == 3 and o.peak_epoch == 2 and o.train_rob_end is None and o.gap_end is None
    assert "training probe" not in O.sentence(o)


def test_recipe_says_how_many_images_and_whether_augmented():
    assert O.recipe({"dataset": "cifar10-demo", "train_per_class": 200, "augment": False}) == \
        "2,000 (200 per class), no augmentation"
    assert O.recipe({"dataset": "cifar10-demo"}) == "4,585, augmented"
    assert O.recipe({"dataset": "digits", "train_limit": 300, "augment": True}) == "the first 300, augmented"
