"""Fig. 4's trend verdict (core.analysis.trend): a rank test that can fail, on synthetic LandscapeResults."""

import itertools
import math

import numpy as np
import pytest

from core import analysis as A
from core.analysis import trend as T


def fake(name, rob, dE, n=400, method="sat", noise=0.0, seed=0):
    """A model whose robust accuracy is ``rob`` and whose |ΔE(x)| is ``dE`` (± ``noise``) on n images."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(n, int)
    pred_adv = np.where(np.arange(n) < round(rob * n), 0, 1)
    mag = np.abs(dE + noise * rng.standard_normal(n))
    e_nat = rng.standard_normal(n)
    return A.LandscapeResult(name, e_nat=e_nat, e_adv=e_nat - mag, ej_nat=e_nat, ej_adv=e_nat + mag, pred_nat=lab,
                             pred_adv=pred_adv, labels=lab, method=method)


def test_permutation_p_value_is_exact_for_small_n():
    # a perfect order of n points: 2 of the n! orderings reach |rho| = 1
    for n in (3, 4, 5, 6):
        assert T.permutation_p_value(range(n), range(n)) == pytest.approx(2 / math.factorial(n))
    # by brute force on a mixed order: the share of orderings with |rho| >= observed
    a, b = [0.1, 0.5, 0.2, 0.9, 0.4], [3.0, 1.0, 2.0, 0.5, 4.0]
    rho = T.spearman(a, b)
    hits = sum(abs(T.spearman(a, [b[i] for i in p])) >= abs(rho) - 1e-12 for p in itertools.permutations(range(5)))
    assert T.permutation_p_value(a, b) == pytest.approx(hits / 120)
    # beyond EXACT_MAX: random orderings, a perfect order of 10 is never matched by chance
    assert T.permutation_p_value(range(10), range(10)) == pytest.approx(1 / (1 + T.N_PERMUTATIONS), rel=0.5)
    assert math.isnan(T.permutation_p_value([1, 2], [2, 1]))


def test_one_dominant_plain_model_is_not_a_trend():
    # the case: plain at 0% robust accuracy with a huge drift; the three robust models in reversed order
    res = [fake("plain", 0.0, 10.0, method="plain"), fake("sat", 0.266, 0.10), fake("trades", 0.272, 0.20),
           fake("weat", 0.278, 0.30)]
    t = A.robustness_trend(res)
    m = t["dE_abs_mean"]
    assert m["pearson"] < -0.9                        # what the old page reported
    assert m["spearman"] == pytest.approx(-0.2)
    assert m["p_value"] > T.ALPHA
    assert t["verdict"] != "shrinks" and "not enough models to tell" in t["text"]
    r = t["robust"]
    assert [x["model"] for x in r["models"]] == ["sat", "trades", "weat"] and r["n"] == 3
    assert r["spearman"] == pytest.approx(1.0)        # reversed among the robust models...
    assert not r["separated"] and "Not significant" in r["text"] and "reverse" in r["text"]  # ...within 1 SE
    assert r["min_gap_se"] < 1.0


def test_clean_monotone_six_models_shrink():
    robs = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    res = [fake(f"m{i}", r, 6.0 - i, method="plain" if i == 0 else "sat", noise=0.3, seed=i)
           for i, r in enumerate(robs)]
    t = A.robustness_trend(res)
    m = t["dE_abs_mean"]
    assert m["spearman"] == pytest.approx(-1.0)
    assert m["p_value"] == pytest.approx(2 / 720)
    assert m["ci"][1] < 0
    assert t["verdict"] == "shrinks" and "shrinks as robustness grows" in t["text"]
    # the robust models alone: 10 points of robust accuracy apart on 400 images are > 1.96 SE
    assert t["robust"]["separated"] and t["robust"]["spearman"] == pytest.approx(-1.0)
    # the same six models in the opposite order: grows
    rev = [fake(f"m{i}", r, 1.0 + i, noise=0.3, seed=i) for i, r in enumerate(robs)]
    assert A.robustness_trend(rev)["verdict"] == "grows"


def test_image_noise_can_veto_a_significant_rank():
    # a perfect model order (p < 0.05), but the drifts differ by 0.01 while each model's images spread over 0..10:
    # resampling the images scrambles the order, so the interval includes 0 and the verdict stays open
    robs = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    base = np.linspace(0.0, 10.0, 40)
    res = []
    for i, r in enumerate(robs):
        m = fake(f"m{i}", r, 1.0, n=40)
        mag = np.random.default_rng(i).permutation(base) - 0.01 * i + 0.1
        m.e_adv = m.e_nat - mag
        res.append(m)
    t = A.robustness_trend(res)
    m = t["dE_abs_mean"]
    assert m["spearman"] == pytest.approx(-1.0) and m["p_value"] < T.ALPHA
    assert m["ci"][0] < 0 < m["ci"][1]
    assert t["verdict"] == "undecided" and "interval over the images includes 0" in t["text"]


def test_three_models_are_not_enough():
    res = [fake("a", 0.1, 10.0, method="plain"), fake("b", 0.4, 3.0), fake("c", 0.7, 0.5)]
    t = A.robustness_trend(res)
    assert t["dE_abs_mean"]["spearman"] == pytest.approx(-1.0)
    assert t["verdict"] == "undecided"
    assert "not enough models to tell" in t["text"] and f"fewer than {T.MIN_MODELS} models" in t["text"]
    assert "not enough models" in A.robustness_trend(res[:2])["text"]
