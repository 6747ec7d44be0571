"""Every training objective against a hand-written reference (plain Python / NumPy, float64).

The references below are written from the formulas (paper Table 1c, TRADES, MART, MAIL, the WEAT
loss as described in docs) with explicit per-sample loops; they never call the torch functions
used by ``core.losses``. Gradients are checked against closed-form derivatives, which also pins
down what is treated as a constant (WEAT and MAIL weights) and what is not (both KL branches,
MART's 1 - p_y(x)).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.errors import InputError
from core.losses import METHODS, LossConfig, method_config, outer_loss
from core.train import TrainConfig

# fixed logits: B = 5 samples, K = 4 classes; rows of very different scale so that the energies
# (and hence WEAT weights) differ a lot, including a positive-energy row (all logits very negative)
LN = np.array([[2.0, -1.0, 0.5, 0.0],
               [0.1, 0.2, -0.3, 3.0],
               [-6.0, -5.5, -7.0, -6.2],
               [8.0, 1.0, -2.0, 0.5],
               [0.0, 0.0, 0.0, 0.0]])
LA = np.array([[0.5, 1.5, 0.2, -0.4],
               [1.0, 0.0, -0.1, 1.2],
               [-5.0, -6.5, -4.0, -6.0],
               [3.0, 2.5, -1.0, 0.0],
               [1.0, -0.5, 0.3, -1.0]])
Y = [0, 3, 2, 0, 1]
B, K = LN.shape


# ------------------------------------------------------------------------------------------------
# plain-python references
def softmax(row):
    m = max(row)
    ex = [math.exp(v - m) for v in row]
    s = sum(ex)
    return [e / s for e in ex]


def energy(row):  # E(x) = -log sum_k exp f_k
    m = max(row)
    return -(m + math.log(sum(math.exp(v - m) for v in row)))


def ce(row, y):
    return -math.log(softmax(row)[y])


def kl(row_nat, row_adv):  # KL(p_nat || p_adv)
    pn, pa = softmax(row_nat), softmax(row_adv)
    return sum(pn[k] * (math.log(pn[k]) - math.log(pa[k])) for k in range(len(pn)))


def bce(row_adv, y):  # MART: -log p_y(x*) - log(1 - max_{k != y} p_k(x*))
    pa = softmax(row_adv)
    other = max(pa[k] for k in range(len(pa)) if k != y)
    return -math.log(pa[y]) - math.log(1.0 - other)


def weat_w(row):
    return 1.0 / math.log(1.0 + math.exp(abs(energy(row))))


def prob_margin(row, y):
    p = softmax(row)
    return p[y] - max(p[k] for k in range(len(p)) if k != y)


def sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def reference(method: str, beta: float = 6.0, *, norm: str = "batch", gamma: float = 10.0, bias: float = -0.5,
              uniform: bool = False) -> float:
    ln, la = LN.tolist(), LA.tolist()
    if method == "plain":
        return sum(ce(ln[i], Y[i]) for i in range(B)) / B
    if method == "sat":
        return sum(ce(la[i], Y[i]) for i in range(B)) / B
    if method == "trades":
        return sum(ce(ln[i], Y[i]) + beta * kl(ln[i], la[i]) for i in range(B)) / B
    if method == "trades-adv":  # ablation: CE(x*) + beta KL, no weights
        return sum(ce(la[i], Y[i]) + beta * kl(ln[i], la[i]) for i in range(B)) / B
    if method == "mart":
        return sum(bce(la[i], Y[i]) + beta * kl(ln[i], la[i]) * (1 - softmax(ln[i])[Y[i]]) for i in range(B)) / B
    if method == "mail-trades":
        if uniform:
            w = [1.0] * B
        else:
            s = [sigmoid(-gamma * (prob_margin(la[i], Y[i]) - bias)) for i in range(B)]
            w = [si * B / sum(s) for si in s]
        return sum(w[i] * (ce(ln[i], Y[i]) + beta * kl(ln[i], la[i])) for i in range(B)) / B
    if method in ("weat-nat", "weat-adv", "sat-energy"):
        w = [weat_w(ln[i]) for i in range(B)]
        src = ln if method == "weat-nat" else la
        b = 0.0 if method == "sat-energy" else beta
        denom = sum(w) if norm == "sum" else B
        return sum(w[i] * (ce(src[i], Y[i]) + b * kl(ln[i], la[i])) for i in range(B)) / denom
    raise KeyError(method)


def tensors(requires_grad: bool = False):
    ln = torch.tensor(LN, dtype=torch.float32, requires_grad=requires_grad)
    la = torch.tensor(LA, dtype=torch.float32, requires_grad=requires_grad)
    return ln, la, torch.tensor(Y)


def loss_of(cfg: LossConfig, **kw):
    ln, la, y = tensors()
    return outer_loss(cfg, ln, la, y, **kw)


# ------------------------------------------------------------------------------------------------
def test_reference_helpers_are_sane():
    # a KL of identical distributions is 0, CE of uniform logits is log K, w(E=0) = 1/ln 2
    assert kl(LN[0].tolist(), LN[0].tolist()) == pytest.approx(0.0, abs=1e-15)
    assert ce([0.0] * 4, 2) == pytest.approx(math.log(4))
    assert 1 / math.log(2) == pytest.approx(weat_w([-math.log(4)] * 4))
    # the fixtures really have spread-out energies (one positive), otherwise WEAT tests would be weak
    es = [energy(r) for r in LN.tolist()]
    assert max(es) > 0 > min(es) and max(es) - min(es) > 5


@pytest.mark.parametrize("method", ["plain", "sat", "trades", "mart", "mail-trades", "weat-nat", "weat-adv"])
def test_each_method_matches_hand_reference(method):
    lt = loss_of(method_config(method))
    assert float(lt.loss) == pytest.approx(reference(method), rel=1e-5, abs=1e-6)
    assert lt.terms["loss"] == pytest.approx(float(lt.loss))


def test_beta_is_honoured():
    for method in ("trades", "mart", "weat-adv"):
        for beta in (0.0, 1.0, 7.5):
            lt = loss_of(method_config(method, beta=beta))
            assert float(lt.loss) == pytest.approx(reference(method, beta), rel=1e-5, abs=1e-6), (method, beta)


def test_weat_weights_and_energy_outputs():
    lt = loss_of(method_config("weat-adv"))
    want = [weat_w(r) for r in LN.tolist()]
    np.testing.assert_allclose(lt.weights.numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(lt.energy_nat.numpy(), [energy(r) for r in LN.tolist()], rtol=1e-5, atol=1e-6)
    assert max(want) <= 1 / math.log(2) + 1e-9
    # weights come from the natural logits: changing the adversarial logits leaves them alone
    ln, la, y = tensors()
    lt2 = outer_loss(method_config("weat-adv"), ln, la * 3 - 1, y)
    np.testing.assert_allclose(lt2.weights.numpy(), want, rtol=1e-5)


@pytest.mark.parametrize("method", ["weat-nat", "weat-adv"])
def test_weat_sum_normalisation(method):
    lt = loss_of(method_config(method, weight_norm="sum"))
    assert float(lt.loss) == pytest.approx(reference(method, norm="sum"), rel=1e-5)
    # '/B' and '/sum w' really differ on these logits (sum w != B)
    assert abs(reference(method, norm="sum") - reference(method)) > 0.1


def test_weat_weight_source_override():
    # weight_logits='eval' passes other logits for the weights: they, not the natural ones, set w
    ln, la, y = tensors()
    src = torch.tensor(LA, dtype=torch.float32)
    lt = outer_loss(method_config("weat-nat", weight_logits="eval"), ln, la, y, weight_source_logits=src)
    np.testing.assert_allclose(lt.weights.numpy(), [weat_w(r) for r in LA.tolist()], rtol=1e-5)


def test_mail_weights_normalised_to_mean_one_and_uniform_in_burn_in():
    cfg = method_config("mail-trades")
    lt = loss_of(cfg)
    assert float(lt.weights.mean()) == pytest.approx(1.0, rel=1e-6)
    assert float(lt.weights.max() - lt.weights.min()) > 0.1  # not trivially uniform
    # burn-in: epoch < burn_in gives uniform weights, i.e. plain TRADES
    cfg_b = method_config("mail-trades", burn_in=3)
    for epoch, uniform in ((0, True), (2, True), (3, False), (10, False)):
        lt = loss_of(cfg_b, epoch=epoch)
        assert float(lt.loss) == pytest.approx(reference("mail-trades", uniform=uniform), rel=1e-5), epoch
    assert reference("mail-trades", uniform=True) == pytest.approx(reference("trades"))
    # gamma and bias are used
    cfg_g = method_config("mail-trades")
    cfg_g.mail_gamma, cfg_g.mail_bias = 3.0, 0.2
    assert float(loss_of(cfg_g).loss) == pytest.approx(reference("mail-trades", gamma=3.0, bias=0.2), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# gradients: closed forms, written per sample
def _grad_rows(fn):
    """fn(i) -> (d/d ln_i, d/d la_i) as lists; returns two B x K arrays."""
    gn, ga = np.zeros((B, K)), np.zeros((B, K))
    for i in range(B):
        gn[i], ga[i] = fn(i)
    return gn, ga


def _kl_grads(i):
    """d KL(p_nat||p_adv) / d ln_i and / d la_i."""
    pn, pa = softmax(LN[i].tolist()), softmax(LA[i].tolist())
    k_i = kl(LN[i].tolist(), LA[i].tolist())
    d_ln = [pn[k] * (math.log(pn[k]) - math.log(pa[k]) - k_i) for k in range(K)]
    d_la = [pa[k] - pn[k] for k in range(K)]
    return np.array(d_ln), np.array(d_la)


def _ce_grad(row, y):
    p = softmax(row)
    return np.array([p[k] - (1.0 if k == y else 0.0) for k in range(len(p))])


def _autograd(cfg, **kw):
    ln, la, y = tensors(requires_grad=True)
    outer_loss(cfg, ln, la, y, **kw).loss.backward()
    return ln.grad.double().numpy(), la.grad.double().numpy()


def test_trades_kl_gradient_flows_through_both_branches():
    beta = 6.0

    def rows(i):
        dkn, dka = _kl_grads(i)
        return (_ce_grad(LN[i].tolist(), Y[i]) + beta * dkn) / B, beta * dka / B

    want_n, want_a = _grad_rows(rows)
    got_n, got_a = _autograd(method_config("trades"))
    np.testing.assert_allclose(got_n, want_n, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got_a, want_a, rtol=1e-4, atol=1e-6)
    # the natural branch of KL is not detached: its contribution is present and substantial
    assert np.abs(got_n - _grad_rows(lambda i: (_ce_grad(LN[i].tolist(), Y[i]) / B, 0 * LN[i]))[0]).max() > 1e-2


@pytest.mark.parametrize("method,norm", [("weat-nat", "batch"), ("weat-adv", "batch"),
                                         ("weat-nat", "sum"), ("weat-adv", "sum")])
def test_weat_gradient_treats_weight_as_constant(method, norm):
    beta = 6.0
    w = [weat_w(r) for r in LN.tolist()]
    denom = sum(w) if norm == "sum" else B

    def rows(i):
        dkn, dka = _kl_grads(i)
        if method == "weat-nat":
            return w[i] * (_ce_grad(LN[i].tolist(), Y[i]) + beta * dkn) / denom, w[i] * beta * dka / denom
        return w[i] * beta * dkn / denom, w[i] * (_ce_grad(LA[i].tolist(), Y[i]) + beta * dka) / denom

    want_n, want_a = _grad_rows(rows)
    got_n, got_a = _autograd(method_config(method, weight_norm=norm))
    np.testing.assert_allclose(got_n, want_n, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got_a, want_a, rtol=1e-4, atol=1e-6)

    # had w (or the sum-normaliser) been differentiated, the natural gradient would differ: measure by
    # finite differences of the full expression with w recomputed, and check that it is far from ours
    def full(ln_np):
        ww = [weat_w(r) for r in ln_np.tolist()]
        dd = sum(ww) if norm == "sum" else B
        src = ln_np if method == "weat-nat" else LA
        return sum(ww[i] * (ce(src[i].tolist(), Y[i]) + beta * kl(ln_np[i].tolist(), LA[i].tolist()))
                   for i in range(B)) / dd

    h = 1e-6
    fd = np.zeros((B, K))
    for i in range(B):
        for k in range(K):
            up, dn = LN.copy(), LN.copy()
            up[i, k] += h
            dn[i, k] -= h
            fd[i, k] = (full(up) - full(dn)) / (2 * h)
    assert np.abs(fd - want_n).max() > 1e-3


def test_mail_gradient_treats_weight_as_constant():
    beta, gamma, bias = 6.0, 10.0, -0.5
    s = [sigmoid(-gamma * (prob_margin(LA[i].tolist(), Y[i]) - bias)) for i in range(B)]
    w = [si * B / sum(s) for si in s]

    def rows(i):
        dkn, dka = _kl_grads(i)
        return w[i] * (_ce_grad(LN[i].tolist(), Y[i]) + beta * dkn) / B, w[i] * beta * dka / B

    want_n, want_a = _grad_rows(rows)
    got_n, got_a = _autograd(method_config("mail-trades"))
    np.testing.assert_allclose(got_n, want_n, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got_a, want_a, rtol=1e-4, atol=1e-6)


def test_mart_gradient_includes_the_weight_term():
    """MART's objective is differentiated through (1 - p_y(x)) as well (Wang et al., 2020)."""
    beta = 6.0

    def rows(i):
        pn, pa = softmax(LN[i].tolist()), softmax(LA[i].tolist())
        y = Y[i]
        k_i = kl(LN[i].tolist(), LA[i].tolist())
        dkn, dka = _kl_grads(i)
        w = 1 - pn[y]
        dw = np.array([-pn[y] * ((1.0 if k == y else 0.0) - pn[k]) for k in range(K)])
        m = max((k for k in range(K) if k != y), key=lambda k: pa[k])
        d_bce = _ce_grad(LA[i].tolist(), y) + np.array(
            [pa[m] * ((1.0 if k == m else 0.0) - pa[k]) / (1 - pa[m]) for k in range(K)])
        return beta * (w * dkn + k_i * dw) / B, (d_bce + beta * w * dka) / B

    want_n, want_a = _grad_rows(rows)
    got_n, got_a = _autograd(method_config("mart"))
    np.testing.assert_allclose(got_n, want_n, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got_a, want_a, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# the method table and the ablation switches (Table 1c)
def test_method_table():
    want = {
        "plain": ("none", "nat", 0.0, "none"),
        "sat": ("ce", "adv", 0.0, "none"),
        "trades": ("kl", "nat", 6.0, "none"),
        "mart": ("ce", "bce-adv", 6.0, "mart"),
        "mail-trades": ("kl", "nat", 6.0, "pm"),
        "weat-nat": ("kl", "nat", 6.0, "energy"),
        "weat-adv": ("kl", "adv", 6.0, "energy"),
    }
    assert set(METHODS) == set(want)
    for m, (inner, outer, beta, weighting) in want.items():
        c = method_config(m)
        assert (c.inner, c.outer, c.beta, c.weighting) == (inner, outer, beta, weighting), m
        assert (c.weight_norm, c.weight_logits) == ("batch", "train")  # the official WEAT defaults
    assert method_config("WEAT_ADV") == method_config("weat-adv")
    # method_config returns a fresh object: mutating it does not change the table
    c = method_config("trades")
    c.beta = 1.0
    assert METHODS["trades"].beta == 6.0 and method_config("trades").beta == 6.0


def test_ablation_switches_give_documented_combinations():
    # TRADES with CE on x*: CE(x*) + beta KL, unweighted
    c = method_config("trades", outer="adv")
    assert (c.inner, c.outer, c.beta, c.weighting) == ("kl", "adv", 6.0, "none")
    assert float(loss_of(c).loss) == pytest.approx(reference("trades-adv"), rel=1e-5)
    # WEAT-ADV without weighting is exactly that same objective
    c = method_config("weat-adv", weighting="none")
    assert float(loss_of(c).loss) == pytest.approx(reference("trades-adv"), rel=1e-5)
    # WEAT-NAT without weighting is TRADES
    assert float(loss_of(method_config("weat-nat", weighting="none")).loss) == pytest.approx(reference("trades"), rel=1e-5)
    # MART with CE instead of BCE (Table 1c row 2): CE(x*) + beta * w-KL
    c = method_config("mart", outer="adv")
    want = sum(ce(LA[i].tolist(), Y[i]) + 6 * kl(LN[i].tolist(), LA[i].tolist()) * (1 - softmax(LN[i].tolist())[Y[i]])
               for i in range(B)) / B
    assert float(loss_of(c).loss) == pytest.approx(want, rel=1e-5)
    # MART with KL as inner loss: only the attack changes
    c = method_config("mart", inner="kl")
    assert c.inner == "kl" and float(loss_of(c).loss) == pytest.approx(reference("mart"), rel=1e-5)
    # SAT with energy weights: sum_i w_i CE(x*_i) / B
    c = method_config("sat", weighting="energy")
    assert float(loss_of(c).loss) == pytest.approx(reference("sat-energy"), rel=1e-5)
    # TRADES with beta 0 is plain CE on x (the attack is then wasted, but legal)
    assert float(loss_of(method_config("trades", beta=0)).loss) == pytest.approx(reference("plain"), rel=1e-5)
    # None means "keep the method's value"
    assert method_config("weat-adv", beta=None, inner=None, outer=None, weighting=None) == method_config("weat-adv")


def test_train_config_passes_ablation_overrides():
    tc = TrainConfig(method="weat-nat", beta=3.0, inner="ce", outer="adv", weighting="none", weight_norm="sum",
                     weight_logits="eval", burn_in=2)
    c = tc.loss_config()
    assert (c.inner, c.outer, c.beta, c.weighting, c.weight_norm, c.weight_logits, c.burn_in) == \
        ("ce", "adv", 3.0, "none", "sum", "eval", 2)


@pytest.mark.parametrize("kwargs,msg", [
    ({"method": "awp"}, "unknown training method"),
    ({"method": "trades", "beta": -1.0}, "beta must be >= 0"),
    ({"method": "trades", "beta": float("nan")}, "beta must be >= 0"),
    ({"method": "plain", "outer": "adv"}, "adversarial outer loss needs an inner attack"),
    ({"method": "sat", "inner": "none"}, "adversarial outer loss needs an inner attack"),
    ({"method": "mart", "inner": "none"}, "adversarial outer loss needs an inner attack"),
    ({"method": "trades", "inner": "none"}, "KL term needs an inner attack"),
    ({"method": "plain", "beta": 6.0}, "KL term needs an inner attack"),
    ({"method": "sat", "inner": "cw"}, "inner loss must be one of"),
    ({"method": "sat", "outer": "bce"}, "outer loss must be one of"),
    ({"method": "sat", "weighting": "gair"}, "weighting must be one of"),
    ({"method": "weat-adv", "weight_norm": "mean"}, "weight_norm must be"),
    ({"method": "weat-adv", "weight_logits": "test"}, "weight_logits must be"),
])
def test_method_config_validation(kwargs, msg):
    kw = dict(kwargs)
    with pytest.raises(InputError, match=msg):
        method_config(kw.pop("method"), **kw)


def test_bf16_logits_are_upcast():
    ln, la, y = tensors()
    lt = outer_loss(method_config("weat-adv"), ln.bfloat16(), la.bfloat16(), y)
    assert lt.loss.dtype == torch.float32
    # bf16 rounding of the logits only: close to the fp32 reference
    assert float(lt.loss) == pytest.approx(reference("weat-adv"), rel=2e-2)
