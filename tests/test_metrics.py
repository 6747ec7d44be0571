"""IS / FID / KID against closed-form values, and the feature extractors (offline)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from core import metrics as M
from core.errors import InputError


def _rot(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


# ------------------------------------------------------------------------------------------- FID
def test_fid_closed_form_diagonal():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_fid_closed_form_commuting_rotated():
    """Σ1 = Q diag(a) Qᵀ and Σ2 = Q diag(b) Qᵀ commute: FID = |Δμ|² + Σ(√a − √b)²."""
    rng = np.random.default_rng(1)
    d = 8
    q = _rot(d, 2)
    a, b = rng.uniform(0.05, 2, d), rng.uniform(0.05, 2, d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_identical_is_zero_and_1d():
    s = np.array([[2.0, 0.3], [0.3, 1.0]])
    assert M.frechet_distance([1, 2], s, [1, 2], s) == pytest.approx(0.0, abs=1e-10)
    # 1-D: (μ1 − μ2)² + (σ1 − σ2)²
    assert M.frechet_distance([0.0], [[4.0]], [1.0], [[1.0]]) == pytest.approx(1.0 + 1.0)


def test_fid_non_commuting_matches_scipy_sqrtm():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(3)
    d = 5
    a1, a2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a1 @ a1.T + 0.1 * np.eye(d), a2 @ a2.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(sqrtm(s1 @ s2)))
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(float(ref), rel=1e-8)


def test_fid_singular_covariances_are_finite():
    # rank-deficient covariances (fewer samples than dimensions) must not produce NaN
    s1 = np.zeros((4, 4))
    s1[0, 0] = 1.0
    s2 = np.zeros((4, 4))
    s2[1, 1] = 4.0
    # commuting diagonals: Σ(√a − √b)² = 1 + 4
    assert M.frechet_distance(np.zeros(4), s1, np.zeros(4), s2) == pytest.approx(5.0)


def test_fid_large_samples_close_to_closed_form():
    rng = np.random.default_rng(4)
    d, n = 4, 40_000
    q = _rot(d, 5)
    a, b = np.array([1.0, 0.5, 2.0, 0.2]), np.array([0.3, 1.5, 1.0, 0.8])
    mu1, mu2 = np.zeros(d), np.array([0.5, -0.5, 0.0, 1.0])
    x = rng.normal(size=(n, d)) * np.sqrt(a) @ q.T + mu1
    y = rng.normal(size=(n, d)) * np.sqrt(b) @ q.T + mu2
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    got = M.fid_from_features(x, y)
    assert got == pytest.approx(expected, rel=0.03)


def test_feature_statistics_unbiased():
    f = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    mu, cov = M.feature_statistics(f)
    np.testing.assert_allclose(mu, f.mean(0))
    np.testing.assert_allclose(cov, np.cov(f, rowvar=False))


# ------------------------------------------------------------------------------------------- KID
def _mmd2_bruteforce(x, y, degree=3, coef0=1.0):
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + coef0) ** degree  # noqa: E731
    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return sxx + syy - 2 * sxy


def test_mmd_matches_bruteforce_definition():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(7, 3)), rng.normal(1.0, 1.0, size=(9, 3))
    assert M.polynomial_mmd2_unbiased(x, y) == pytest.approx(_mmd2_bruteforce(x, y), rel=1e-10)


def test_mmd_linear_kernel_closed_form():
    """With k(a,b) = a·b/d the unbiased MMD² has expectation |μx − μy|²/d."""
    rng = np.random.default_rng(7)
    d = 3
    mux, muy = np.array([0.0, 1.0, -1.0]), np.array([1.0, 1.0, 1.0])
    vals = [M.polynomial_mmd2_unbiased(rng.normal(mux, 1.0, (400, d)), rng.normal(muy, 2.0, (400, d)),
                                       degree=1, coef0=0.0) for _ in range(40)]
    assert np.mean(vals) == pytest.approx(((mux - muy) ** 2).sum() / d, rel=0.03)


def test_kid_same_distribution_near_zero_shifted_positive():
    rng = np.random.default_rng(8)
    d = 16
    a, b = rng.normal(size=(3000, d)), rng.normal(size=(3000, d))
    c = rng.normal(0.5, 1.0, size=(3000, d))
    same, same_std, m = M.kid(a, b, subset_size=500, n_subsets=50, seed=0)
    shifted, shifted_std, _ = M.kid(a, c, subset_size=500, n_subsets=50, seed=0)
    assert m == 500
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 0.05 and shifted > 10 * abs(same)


def test_kid_subset_capped_by_sample_count_and_validation():
    rng = np.random.default_rng(9)
    _, _, m = M.kid(rng.normal(size=(30, 4)), rng.normal(size=(20, 4)), subset_size=1000, n_subsets=3)
    assert m == 20
    with pytest.raises(InputError):
        M.kid(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(InputError):
        M.polynomial_mmd2_unbiased(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(InputError):
        M.kid(np.full((5, 2), np.nan), np.zeros((5, 2)))


def test_against_torchmetrics_when_installed():
    tm_fid = pytest.importorskip("torchmetrics.image.fid")
    tm_kid = pytest.importorskip("torchmetrics.image.kid")
    rng = np.random.default_rng(10)
    x, y = rng.normal(size=(300, 6)), rng.normal(0.3, 1.2, size=(250, 6))
    mu1, s1 = M.feature_statistics(x)
    mu2, s2 = M.feature_statistics(y)
    ref = float(tm_fid._compute_fid(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2))))
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)
    ref_mmd = float(tm_kid.poly_mmd(torch.from_numpy(x[:200]), torch.from_numpy(y[:200])))
    assert M.polynomial_mmd2_unbiased(x[:200], y[:200]) == pytest.approx(ref_mmd, rel=1e-6)


# -------------------------------------------------------------------------------------------- IS
def test_inception_score_constant_predictions_is_one():
    p = np.tile([0.2, 0.5, 0.3], (100, 1))
    mean, std = M.inception_score(p, splits=5)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    one_class = np.zeros((50, 10))
    one_class[:, 3] = 1.0
    assert M.inception_score(one_class, 1)[0] == pytest.approx(1.0)


@pytest.mark.parametrize("k", [2, 10, 100])
def test_inception_score_confident_uniform_is_k(k):
    p = np.eye(k)[np.arange(10 * k) % k]   # one-hot, every class equally often
    mean, std = M.inception_score(p, splits=1)
    assert mean == pytest.approx(k, rel=1e-12) and std == 0.0
    # unshuffled splits of k consecutive samples each hold every class once
    assert M.inception_score(p, splits=10, seed=None)[0] == pytest.approx(k, rel=1e-12)


def test_inception_score_shuffles_class_ordered_samples():
    """Samples sorted by class (as a generator writes them) must not give one class per split."""
    k = 10
    p = np.eye(k)[np.repeat(np.arange(k), 100)]
    assert M.inception_score(p, splits=10, seed=None)[0] == pytest.approx(1.0)   # the pitfall
    mean, _ = M.inception_score(p, splits=10)
    assert mean > 0.8 * k


def test_inception_score_mixture_closed_form():
    p = np.array([[1.0, 0.0]] * 50 + [[0.5, 0.5]] * 50)
    py = np.array([0.75, 0.25])
    kl1 = math.log(1 / py[0])
    kl2 = 0.5 * math.log(0.5 / py[0]) + 0.5 * math.log(0.5 / py[1])
    assert M.inception_score(p, 1)[0] == pytest.approx(math.exp((kl1 + kl2) / 2), rel=1e-12)


def test_inception_score_from_logits_and_validation():
    lg = np.full((24, 4), -50.0)
    lg[np.arange(24), np.arange(24) % 4] = 50.0
    assert M.inception_score_from_logits(lg, 1)[0] == pytest.approx(4.0, rel=1e-9)
    with pytest.raises(InputError):
        M.inception_score(np.array([[0.5, 0.6]]))


# ---------------------------------------------------------------------------- feature extractors
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.body(x))


def test_classifier_extractor_penultimate_and_label():
    net = _Net()
    ext = M.ClassifierFeatures(net, "toy")
    f, lg = ext.extract(torch.rand(10, 3, 8, 8), batch_size=4)
    assert ext.label == "classifier:toy" and "16-d" in ext.layer
    assert f.shape == (10, 16) and lg.shape == (10, 5)
    assert (f >= 0).all()  # after the ReLU
    # uint8 input is accepted and scaled
    f2, _ = ext.extract((torch.rand(3, 3, 8, 8) * 255).to(torch.uint8))
    assert f2.shape == (3, 16)


def test_choose_extractor_falls_back_offline(monkeypatch, tmp_path):
    monkeypatch.setenv(M.INCEPTION_ENV, str(tmp_path / "missing.pth"))
    monkeypatch.setattr(M, "INCEPTION_DIR", tmp_path / "inception")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    ok, why = M.inception_status()
    assert not ok and M.INCEPTION_ENV in why
    ext = M.choose_extractor("auto", _Net(), "toy")
    assert ext.label == "classifier:toy" and ext.notes and "Inception" in ext.notes[0]
    with pytest.raises(InputError, match="Inception"):
        M.choose_extractor("inception", _Net(), "toy")
    with pytest.raises(InputError):
        M.choose_extractor("bogus", _Net(), "toy")


def test_generation_metrics_labelled_and_sane():
    net = _Net()
    ext = M.ClassifierFeatures(net, "toy")
    g = torch.Generator().manual_seed(0)
    real = torch.rand(120, 3, 8, 8, generator=g)
    same = torch.rand(120, 3, 8, 8, generator=g)
    other = (torch.rand(120, 3, 8, 8, generator=g) * 0.3 + 0.7)
    r_same = M.generation_metrics(same, real, ext, kid_subset_size=100, kid_subsets=20, is_splits=2)
    r_other = M.generation_metrics(other, real, ext, kid_subset_size=100, kid_subsets=20, is_splits=2,
                                   fake_labels=np.zeros(120, int))
    for r in (r_same, r_other):
        assert r["features"] == "classifier:toy"
        assert 1.0 <= r["IS"] <= 5.0 + 1e-9
        assert r["LPIPS"] is None
    assert r_other["FID"] > r_same["FID"] and r_other["KID"] > r_same["KID"]
    assert r_other["label_agreement"] is not None and 0 <= r_other["label_agreement"] <= 1


def test_every_fid_comes_with_its_real_vs_real_floor():
    """FID_floor: the FID of m = min(n_fake, n_real // 2) real images against the other real images (disjoint)."""
    rng = np.random.default_rng(0)
    fr = rng.normal(size=(400, 6))
    floor, m = M.real_fid_floor(fr, 150, seed=3)
    perm = np.random.default_rng(3).permutation(400)
    assert m == 150 and floor == pytest.approx(M.fid_from_features(fr[perm[150:]], fr[perm[:150]]))
    assert M.real_fid_floor(fr, 1000)[1] == 200                       # at most half of the real images
    assert M.real_fid_floor(fr[:3], 10) == (None, 1)
    ext = M.ClassifierFeatures(_Net(), "toy")
    g = torch.Generator().manual_seed(0)
    real = torch.rand(200, 3, 8, 8, generator=g)
    fake = torch.rand(40, 3, 8, 8, generator=g) * 0.1 + 0.9
    r = M.generation_metrics(fake, real, ext, kid_subset_size=30, kid_subsets=5, is_splits=2, seed=1)
    f_real, _ = ext.extract(real)
    assert r["FID_floor_n"] == 40 and r["FID_floor"] == pytest.approx(M.real_fid_floor(f_real, 40, seed=1)[0])
    assert r["FID"] > r["FID_floor"]              # shifted images score above what real images of that size do



def test_generation_metrics_equal_torchmetrics_with_the_project_extractor_as_its_feature_module():
    """Issue 26 item 6: FID and KID are torchmetrics'. Handing the project's extractor to torchmetrics'
    FrechetInceptionDistance / KernelInceptionDistance as their ``feature`` module and feeding them the images gives
    generation_metrics' numbers (which extract the features once and feed torchmetrics those)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    ext = M.ClassifierFeatures(_Net(), "toy")

    class Features(nn.Module):          # images -> the extractor's features, as torchmetrics wants a feature network
        num_features = 16

        def forward(self, x):
            return ext.fn(x)[0].double()

    g = torch.Generator().manual_seed(0)
    real = torch.rand(60, 3, 8, 8, generator=g)
    fake = torch.rand(60, 3, 8, 8, generator=g) * 0.5 + 0.4
    # one subset holding every image: KID does not depend on which subsets torchmetrics' global generator draws
    r = M.generation_metrics(fake, real, ext, kid_subset_size=60, kid_subsets=1, is_splits=2)
    fid = FrechetInceptionDistance(feature=Features())
    kid = KernelInceptionDistance(feature=Features(), subsets=1, subset_size=60)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    assert r["FID"] > 0.01 and r["FID"] == pytest.approx(float(fid.compute()), rel=1e-6)
    assert r["KID"] > 0 and r["KID"] == pytest.approx(float(kid.compute()[0]), rel=1e-6)


def test_the_metrics_import_torchmetrics_only_when_they_compute():
    """torchmetrics.image imports torchvision, torch-fidelity and scipy (about 10 s): the SGLD page and the job
    runner import core.metrics without paying for it."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, core.metrics, core.sampling; print('torchmetrics' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def _cand(name, dataset, method, source="bundled", shape=(3, 32, 32), path=None):
    from core.models import ModelMeta
    from core.models.registry import ModelRef

    meta = ModelMeta(arch="smallcnn", num_classes=10, dataset=dataset, method=method, input_shape=list(shape),
                     name=name)
    return ModelRef(source, name, path or f"/models/{name}.safetensors"), meta, None


def test_independent_classifier_is_never_the_generating_model_and_matches_its_data():
    gen_ref, gen_meta, _ = _cand("cifar-sat", "cifar10", "sat")
    pool = [(gen_ref, gen_meta, None), _cand("digits-plain", "digits", "plain"),
            _cand("cifar-trades", "cifar10", "trades"), _cand("demo-plain", "cifar10-demo", "plain"),
            _cand("mine-plain", "cifar10", "plain", source="local"),
            _cand("big-plain", "cifar10", "plain", shape=(3, 64, 64)), _cand("c100-plain", "cifar100", "plain"),
            (_cand("broken", "cifar10", "plain")[0], None, "unreadable")]
    pick = lambda cands: (M.independent_classifier(gen_meta, gen_ref.path, cands) or (None, None))[1]  # noqa: E731
    assert pick(pool).name == "mine-plain"         # same dataset, plain (bundled ones only break ties)
    assert pick([c for c in pool if c[1] is None or c[1].name != "mine-plain"]).name == "cifar-trades"
    assert pick([c for c in pool if c[1] is None or c[1].dataset != "cifar10"]).name == "demo-plain"
    # only the generating model itself, other datasets, shapes or unreadable files: none
    assert pick([c for c in pool if c[1] is None or c[1].name in ("cifar-sat", "digits-plain", "big-plain",
                                                                    "c100-plain")]) is None
    # a zoo model (no path) is recognised by its name
    assert M.independent_classifier(gen_meta, None, [(gen_ref, gen_meta, None)]) is None


def test_lpips_reports_reason_when_weights_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    val, why = M.lpips_to_real(torch.rand(2, 3, 8, 8), [0, 0], torch.rand(2, 3, 8, 8), [0, 0])
    assert val is None and why


@pytest.mark.slow
def test_inception_path_with_local_weights(monkeypatch, tmp_path):
    """The torch-fidelity Inception is wired correctly when a weights file is present (random
    weights here: nothing is downloaded)."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    # build an Inception with random weights without touching the network
    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    torch.manual_seed(0)
    net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / M.INCEPTION_FILENAME
    torch.save(net.state_dict(), weights)
    monkeypatch.undo()
    monkeypatch.setenv(M.INCEPTION_ENV, str(weights))
    M.clear_inception_cache()
    ok, why = M.inception_status()
    assert ok, why
    ext = M.choose_extractor("auto", _Net(), "toy")
    assert ext.label == "inception-v3"
    f, lg = ext.extract(torch.rand(2, 1, 16, 16))   # grey images are replicated to RGB
    assert f.shape == (2, 2048) and lg.shape == (2, 1008)
    M.clear_inception_cache()


def test_inception_refuses_pickled_code(monkeypatch, tmp_path):
    pytest.importorskip("torch_fidelity")
    bad = tmp_path / "evil.pth"
    torch.save({"obj": _Net()}, bad)   # a pickled module, not plain tensors
    monkeypatch.setenv(M.INCEPTION_ENV, str(bad))
    M.clear_inception_cache()
    from core.errors import EnergyLensError

    with pytest.raises(EnergyLensError):
        M.load_inception()
