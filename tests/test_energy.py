"""Numerical identities of core.energy (paper Sec. 3, Eq. 2-6, Prop. 1, Cor. 1) on random logits.

References are computed independently in float64 (max-shifted log-sum-exp, explicit softmax, the
textbook KL), never with the function under test. Tolerances: 1e-5 relative to the logits'
magnitude for float32 (cancellation in E(x, y) - E(x) loses that much, no more), 1e-10 for float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core import energy as en
from core.errors import InputError

SEEDS = (0, 1, 2)
SHAPES = ((1, 2), (7, 2), (16, 10), (33, 100))   # (N, K), K = 2 and K = 100 included
SCALES = (1.0, 30.0, 1e3)                        # logit magnitude; 1e3 overflows a naive exp
DTYPES = (torch.float32, torch.float64)
BETAS = (0.0, 0.5, 1.0, 6.0)


def _logits(seed: int, n: int, k: int, scale: float, dtype: torch.dtype, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g, dtype=torch.float64) * scale + offset).to(dtype)


def _pair(seed, n, k, scale, dtype):
    """Natural logits and a perturbed ('adversarial') version of them."""
    ln = _logits(seed, n, k, scale, dtype)
    la = (ln.double() + _logits(seed + 1000, n, k, scale * 0.5, torch.float64) + 3.0).to(dtype)
    return ln, la


def _labels(seed, n, k):
    g = torch.Generator().manual_seed(seed + 7)
    return torch.randint(0, k, (n,), generator=g)


def _tol(dtype, *tensors) -> float:
    mag = max([1.0] + [float(t.double().abs().max()) for t in tensors])
    return (1e-5 if dtype == torch.float32 else 1e-10) * mag



# ---- float64 references written out by hand ---------------------------------------------------
def ref_lse(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    m = z.max(dim=1, keepdim=True).values
    return (m + (z - m).exp().sum(dim=1, keepdim=True).log()).squeeze(1)


def ref_log_softmax(z):
    return z.double() - ref_lse(z).unsqueeze(1)


def ref_kl(ln, la):
    lp, lq = ref_log_softmax(ln), ref_log_softmax(la)
    return (lp.exp() * (lp - lq)).sum(dim=1)


def assert_close(got, want, tol, what=""):
    got, want = got.double(), want.double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = float((got - want).abs().max()) if got.numel() else 0.0
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


def cases():
    """Every (seed, N, K) of the grid; the tests loop over it (one pytest item per dtype and scale)."""
    return [(seed, n, k) for seed in SEEDS for n, k in SHAPES]


scales = pytest.mark.parametrize("scale", SCALES)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])


# ---- Eq. 2: the two energies -------------------------------------------------------------------
@scales
@dtypes
def test_marginal_and_joint_energies(scale, dtype):
    for seed, n, k in cases():
        z = _logits(seed, n, k, scale, dtype)
        y = _labels(seed, n, k)
        e = en.marginal_energy(z)
        assert e.shape == (n,) and e.dtype == dtype
        assert_close(e, -ref_lse(z), _tol(dtype, z), "E(x)")
        ey = en.joint_energy(z, y)
        assert ey.shape == (n,)
        assert torch.equal(ey, -z[torch.arange(n), y])
        eall = en.joint_energies(z)
        assert eall.shape == (n, k) and torch.equal(eall, -z)
        # logsumexp >= max: E(x) <= E(x, k) for every k, and E(x) >= min_k E(x, k) - log K
        slack = _tol(dtype, z)
        assert (e.unsqueeze(1) <= eall + slack).all()
        assert (e >= eall.min(dim=1).values - math.log(k) - slack).all()


@dtypes
def test_marginal_energy_shift_equivariance(dtype):
    """Adding c to every logit lowers E(x) by exactly c and leaves p(y|x) unchanged."""
    z = _logits(3, 12, 10, 5.0, dtype)
    for c in (-50.0, 0.25, 700.0):
        assert_close(en.marginal_energy(z + c), en.marginal_energy(z) - c, _tol(dtype, z + c), f"shift {c}")
        y = _labels(3, 12, 10)
        assert_close(en.cross_entropy_from_energies(z + c, y), en.cross_entropy_from_energies(z, y),
                     _tol(dtype, z + c), f"CE shift {c}")


# ---- Eq. 3: CE = E(x, y) - E(x) -----------------------------------------------------------------
@scales
@dtypes
def test_cross_entropy_from_energies_matches_torch(scale, dtype):
    for seed, n, k in cases():
        z = _logits(seed, n, k, scale, dtype)
        y = _labels(seed, n, k)
        ce = en.cross_entropy_from_energies(z, y)
        want = F.cross_entropy(z.double(), y, reduction="none")
        assert_close(ce, want, _tol(dtype, z), "CE from energies vs F.cross_entropy")
        assert_close(ce, F.cross_entropy(z, y, reduction="none"), _tol(dtype, z), "same dtype")
        assert (ce >= -_tol(dtype, z)).all(), "cross-entropy is never negative"


def test_cross_entropy_from_energies_gradient_matches_torch():
    z = _logits(4, 9, 10, 3.0, torch.float64).requires_grad_(True)
    y = _labels(4, 9, 10)
    (g1,) = torch.autograd.grad(en.cross_entropy_from_energies(z, y).sum(), z)
    (g2,) = torch.autograd.grad(F.cross_entropy(z, y, reduction="sum"), z)
    assert torch.allclose(g1, g2, atol=1e-12)
    # d E(x) / d f = -softmax(f)
    (g3,) = torch.autograd.grad(en.marginal_energy(z).sum(), z)
    assert torch.allclose(g3, -torch.softmax(z.detach(), dim=1), atol=1e-12)


# ---- Prop. 1: KL = conditional + marginal ------------------------------------------------------
@scales
@dtypes
def test_kl_decomposition_equals_direct_kl(scale, dtype):
    for seed, n, k in cases():
        ln, la = _pair(seed, n, k, scale, dtype)
        cond, marg = en.kl_decomposition(ln, la)
        assert cond.shape == (n,) and marg.shape == (n,)
        want = ref_kl(ln, la)
        tol = _tol(dtype, ln, la)
        assert_close(cond + marg, want, tol, "conditional + marginal vs direct KL")
        assert_close(en.kl_from_energies(ln, la), want, tol, "kl_from_energies vs direct KL")
        # the two terms are what Prop. 1 says they are
        assert_close(marg, -ref_lse(ln) + ref_lse(la), tol, "marginal term = E(x) - E(x*)")
        p = ref_log_softmax(ln).exp()
        assert_close(cond, (p * (ln.double() - la.double())).sum(dim=1), tol, "conditional term")
        assert (cond + marg >= -tol).all(), "KL is never negative"


@dtypes
def test_kl_of_identical_and_shifted_logits_is_zero(dtype):
    z = _logits(5, 8, 10, 4.0, dtype)
    tol = _tol(dtype, z + 9.0)
    assert_close(en.kl_from_energies(z, z), torch.zeros(8), tol, "KL(p || p)")
    cond, marg = en.kl_decomposition(z, z + 9.0)
    # a uniform shift moves all energy into the marginal term, and the two terms cancel
    assert_close(marg, torch.full((8,), 9.0), tol, "marginal term of a +9 shift")
    assert_close(cond, torch.full((8,), -9.0), tol, "conditional term of a +9 shift")


# ---- Cor. 1: TRADES with energies ---------------------------------------------------------------
@scales
@dtypes
def test_trades_from_energies_matches_ce_plus_beta_kl(scale, dtype):
    for (seed, n, k), beta in ((c, b) for c in cases() for b in BETAS):
        ln, la = _pair(seed, n, k, scale, dtype)
        y = _labels(seed, n, k)
        got = en.trades_objective_from_energies(ln, la, y, beta)
        usual = en.trades_objective(ln, la, y, beta)
        want = F.cross_entropy(ln.double(), y, reduction="none") + beta * ref_kl(ln, la)
        tol = _tol(dtype, ln, la) * (1 + beta)
        assert got.shape == (n,)
        assert_close(got, usual, tol, f"Cor. 1 vs trades_objective, beta={beta}")
        assert_close(usual, want, tol, f"trades_objective vs CE + beta KL (float64), beta={beta}")


def test_trades_with_beta_zero_is_cross_entropy():
    ln, la = _pair(6, 10, 10, 2.0, torch.float64)
    y = _labels(6, 10, 10)
    assert_close(en.trades_objective_from_energies(ln, la, y, 0.0), en.cross_entropy_from_energies(ln, y), 1e-10)


@pytest.mark.parametrize("beta", BETAS)
def test_trades_from_energies_is_invariant_to_logit_shifts(beta):
    """CE and KL ignore uniform logit shifts, so the energy terms of Eq. 6 must cancel exactly."""
    ln, la = _pair(6, 10, 10, 2.0, torch.float64)
    y = _labels(6, 10, 10)
    base = en.trades_objective_from_energies(ln, la, y, beta)
    for c_nat, c_adv in ((5.0, 0.0), (0.0, -7.0), (3.0, 11.0)):
        shifted = en.trades_objective_from_energies(ln + c_nat, la + c_adv, y, beta)
        assert_close(shifted, base, 1e-9, f"shift ({c_nat}, {c_adv}), beta={beta}")


# ---- energy drift ------------------------------------------------------------------------------
def test_energy_drift_sign_convention():
    z = _logits(7, 6, 10, 3.0, torch.float64)
    y = _labels(7, 6, 10)
    e_nat = en.marginal_energy(z)
    # adversarial logits uniformly higher by c: E(x*) = E(x) - c, so Delta E = E(x) - E(x*) = +c > 0
    e_low = en.marginal_energy(z + 2.5)
    assert_close(en.energy_drift(e_nat, e_low), torch.full((6,), 2.5), 1e-12)
    assert (en.energy_drift(e_nat, e_low) > 0).all(), "lower adversarial energy means positive drift"
    e_high = en.marginal_energy(z - 1.5)
    assert (en.energy_drift(e_nat, e_high) < 0).all(), "higher adversarial energy means negative drift"
    # same convention for the joint energy
    ey, ey_adv = en.joint_energy(z, y), en.joint_energy(z + 4.0, y)
    assert_close(en.energy_drift(ey, ey_adv), torch.full((6,), 4.0), 1e-12)
    # antisymmetric, zero on itself
    assert torch.equal(en.energy_drift(e_nat, e_nat), torch.zeros(6, dtype=torch.float64))
    assert torch.equal(en.energy_drift(e_low, e_nat), -en.energy_drift(e_nat, e_low))


# ---- WEAT weight ---------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scale", SCALES)
def test_weat_weight_formula_and_range(seed, scale):
    z = _logits(seed, 64, 10, scale, torch.float32, offset=scale * 0.3)
    w = en.weat_weight(z)
    e = -ref_lse(z)
    want = 1.0 / torch.log1p(torch.exp(-e.abs())).add(e.abs())  # softplus(a) = a + log(1 + e^-a), a >= 0
    assert w.shape == (64,)
    assert_close(w, want, 1e-5 * float(want.max()), "1 / softplus(|E|)")
    assert (w > 0).all() and (w <= 1 / math.log(2) + 1e-6).all()


def test_weat_weight_is_detached_and_maximal_at_zero_energy():
    z = _logits(8, 5, 10, 3.0, torch.float32).requires_grad_(True)
    w = en.weat_weight(z)
    assert not w.requires_grad and w.grad_fn is None
    # log_softmax logits have logsumexp 0, i.e. E(x) = 0: the maximal weight 1 / ln 2
    z0 = torch.log_softmax(_logits(9, 5, 10, 3.0, torch.float64), dim=1)
    w0 = en.weat_weight(z0)
    assert torch.allclose(w0, torch.full((5,), 1 / math.log(2), dtype=torch.float64), atol=1e-12)
    # moving E away from 0 in either direction lowers the weight, symmetrically and monotonically
    prev = w0
    for c in (0.1, 1.0, 5.0, 50.0, 1e4):
        up, down = en.weat_weight(z0 + c), en.weat_weight(z0 - c)
        assert torch.allclose(up, down, rtol=1e-9)
        assert (up < prev).all() and (up > 0).all()
        prev = up


# ---- reduced precision -----------------------------------------------------------------------------
@pytest.mark.parametrize("half", (torch.bfloat16, torch.float16), ids=["bf16", "fp16"])
def test_half_precision_logits_are_computed_in_float32(half):
    z = _logits(10, 16, 10, 8.0, torch.float32).to(half)
    za = (z.float() + _logits(11, 16, 10, 2.0, torch.float32)).to(half)
    y = _labels(10, 16, 10)
    zf, zaf = z.float(), za.float()   # exact: every bf16/fp16 value is a float32 value
    pairs = [
        (en.marginal_energy(z), en.marginal_energy(zf)),
        (en.joint_energy(z, y), en.joint_energy(zf, y)),
        (en.cross_entropy_from_energies(z, y), en.cross_entropy_from_energies(zf, y)),
        (en.kl_from_energies(z, za), en.kl_from_energies(zf, zaf)),
        (en.trades_objective_from_energies(z, za, y, 6.0), en.trades_objective_from_energies(zf, zaf, y, 6.0)),
        (en.trades_objective(z, za, y, 6.0), en.trades_objective(zf, zaf, y, 6.0)),
        (en.weat_weight(z), en.weat_weight(zf)),
    ]
    for got, want in pairs:
        assert got.dtype == torch.float32
        assert torch.equal(got, want)
    assert en.joint_energies(z).dtype == torch.float32
    # the float32 computation is accurate, unlike a bf16 logsumexp would be
    assert_close(en.cross_entropy_from_energies(z, y), F.cross_entropy(zf.double(), y, reduction="none"),
                 _tol(torch.float32, zf), "CE from half logits")


def test_large_logits_do_not_overflow():
    z = torch.tensor([[1e4, 0.0, -1e4], [8e4, 8e4, 8e4]], dtype=torch.float32)
    e = en.marginal_energy(z)
    assert torch.isfinite(e).all()
    assert torch.allclose(e, torch.tensor([-1e4, -8e4 - math.log(3)]), rtol=1e-6)
    ce = en.cross_entropy_from_energies(z, torch.tensor([2, 1]))
    # E(x, y) - E(x) cancels at |f| = 8e4 where a float32 ulp is 2^-7: accurate relative to |f|
    assert torch.allclose(ce, torch.tensor([2e4, math.log(3)]), rtol=1e-6, atol=1e-6 * 8e4)


# ---- bad input ---------------------------------------------------------------------------------------
BAD_LOGITS = [torch.zeros(5), torch.zeros(2, 3, 4), torch.zeros(()), torch.zeros(4, 0)]


@pytest.mark.parametrize("bad", BAD_LOGITS, ids=lambda t: f"shape{tuple(t.shape)}")
def test_bad_logit_shapes_raise_input_error(bad):
    good = torch.zeros(4, 3)
    y = torch.zeros(4, dtype=torch.long)
    calls = [
        lambda: en.marginal_energy(bad),
        lambda: en.joint_energy(bad, y),
        lambda: en.joint_energies(bad),
        lambda: en.cross_entropy_from_energies(bad, y),
        lambda: en.kl_decomposition(bad, good),
        lambda: en.kl_from_energies(good, bad),
        lambda: en.trades_objective_from_energies(bad, good, y, 1.0),
        lambda: en.trades_objective(good, bad, y, 1.0),
        lambda: en.weat_weight(bad),
    ]
    for call in calls:
        with pytest.raises(InputError, match="shape"):
            call()


def test_mismatched_pairs_and_labels_raise_input_error():
    ln = torch.zeros(8, 10)
    y = torch.zeros(8, dtype=torch.long)
    # (1, K) against (N, K) would silently broadcast: it must be refused
    for la in (torch.zeros(1, 10), torch.zeros(8, 9), torch.zeros(7, 10)):
        for fn in (en.kl_decomposition, en.kl_from_energies):
            with pytest.raises(InputError, match="differ in shape"):
                fn(ln, la)
        for fn in (en.trades_objective_from_energies, en.trades_objective):
            with pytest.raises(InputError, match="differ in shape"):
                fn(ln, la, y, 6.0)
    with pytest.raises(InputError, match="labels"):
        en.joint_energy(ln, torch.zeros(7, dtype=torch.long))
    for bad_y in (torch.full((8,), 10), torch.full((8,), -1)):
        with pytest.raises(InputError, match=r"\[0, 9\]"):
            en.cross_entropy_from_energies(ln, bad_y)
        with pytest.raises(InputError, match=r"\[0, 9\]"):
            en.trades_objective(ln, ln, bad_y, 1.0)
