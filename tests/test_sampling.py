"""SGLD sampler (Eq. 7), initialisations, class-statistics cache, reference energies, batch job."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from core import sampling as S
from core.data import ImageDataset, load_dataset
from core.errors import InputError

REPO = Path(__file__).resolve().parents[1]
SAT = REPO / "checkpoints" / "digits-sat.safetensors"
PLAIN = REPO / "checkpoints" / "digits-plain.safetensors"


# --------------------------------------------------------------------------------- helpers
class Linear(nn.Module):
    """logits = W·flatten(x) + b, so ∇ₓE(x, y) = −W_y exactly."""

    def __init__(self, d: int, k: int, seed: int = 0, scale: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(d, k)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(k, d, generator=g) * scale)
            self.lin.bias.copy_(torch.randn(k, generator=g))

    def forward(self, x):
        return self.lin(x.flatten(1))


def synthetic_dataset(n_per_class: int = 300, k: int = 3, shape=(1, 4, 4), seed: int = 0, rank: int = 3) -> ImageDataset:
    """Mid-grey images with a low-rank class structure (values stay far from 0 and 255)."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    xs, ys = [], []
    for c in range(k):
        mu = 100 + 20 * c + rng.uniform(-10, 10, d)
        a = rng.normal(size=(d, rank)) * np.array([8.0, 4.0, 2.0][:rank])
        x = mu + rng.normal(size=(n_per_class, rank)) @ a.T + rng.normal(size=(n_per_class, d)) * 0.5
        xs.append(np.clip(np.round(x), 0, 255).astype(np.uint8))
        ys.append(np.full(n_per_class, c))
    x = torch.from_numpy(np.concatenate(xs).reshape(-1, *shape))
    return ImageDataset("synthetic", "train", x, torch.from_numpy(np.concatenate(ys)), [f"c{i}" for i in range(k)])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("ENERGYLENS_CACHE", str(d))
    return d


@pytest.fixture(scope="module")
def robust_model(tmp_path_factory):
    """The bundled SAT model, or a quickly trained SAT smallcnn when it is not there yet
    ($ENERGYLENS_TEST_ROBUST_CKPT names another robust checkpoint to use instead)."""
    import os

    from core.models import load_checkpoint

    other = os.environ.get("ENERGYLENS_TEST_ROBUST_CKPT")
    if SAT.is_file() or other:
        return load_checkpoint(SAT if SAT.is_file() else other)
    from core.train import TrainConfig, train

    out = tmp_path_factory.mktemp("sat")
    train(TrainConfig(method="sat", dataset="digits", epochs=3, out_dir=str(out), eval_samples=64, probe_size=16,
                      eval_steps=3, attack_steps=5))
    return load_checkpoint(out / "last.safetensors")


@pytest.fixture(scope="module")
def digits_train():
    return load_dataset("digits", "train")


# ------------------------------------------------------------------------------ Eq. 7 exactly
def test_one_and_two_steps_match_eq7_exactly_without_noise(cache):
    torch.manual_seed(0)
    d, k = 3 * 4 * 4, 4
    model = Linear(d, k, scale=0.01)
    x0 = torch.rand(6, 3, 4, 4) * 0.5 + 0.25
    eta, zeta = 0.5, 0.7
    s = S.SGLDSampler(model, [1, 3], 3, init="random", eta=eta, zeta=zeta, gamma=0.0, image_shape=(3, 4, 4),
                      x0=x0)
    y = s.labels
    w = model.lin.weight.detach()[y].view(6, 3, 4, 4)      # ∇E(x, y) = −W_y
    v1 = -0.5 * eta * (-w)
    x1 = (x0 + v1).clamp(0, 1)
    out = s.step(1)
    torch.testing.assert_close(out.images, x1, rtol=0, atol=1e-6)
    v2 = zeta * v1 - 0.5 * eta * (-w)
    x2 = (x1 + v2).clamp(0, 1)
    torch.testing.assert_close(s.step(1).images, x2, rtol=0, atol=1e-6)
    # energies recorded for the current images
    lg = model(x2)
    np.testing.assert_allclose(s.trace.joint[-1], (-lg.gather(1, y[:, None]).squeeze(1)).detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(s.trace.joint_all[-1], (-lg).detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(s.trace.marginal[-1], (-torch.logsumexp(lg, 1)).detach().numpy(), atol=1e-5)
    assert s.trace.steps.tolist() == [0, 1, 2]


def test_noise_std_is_gamma():
    d = 3 * 16 * 16
    model = Linear(d, 2, scale=0.0)      # zero gradient: only the noise moves the chain
    x0 = torch.full((64, 3, 16, 16), 0.5)
    gamma = 0.02
    s = S.SGLDSampler(model, [0], 64, init="random", gamma=gamma, image_shape=(3, 16, 16), x0=x0)
    diff = (s.step(1).images - x0).flatten()
    assert float(diff.mean()) == pytest.approx(0.0, abs=5e-4)
    assert float(diff.std()) == pytest.approx(gamma, rel=0.02)


def test_box_and_bound_projections():
    torch.manual_seed(1)
    d = 3 * 8 * 8
    model = Linear(d, 3, scale=5.0)       # steep: huge steps hit every constraint
    x0 = torch.rand(8, 3, 8, 8)
    free = S.SGLDSampler(model, [0, 1], 4, init="random", eta=10, gamma=0.5, image_shape=(3, 8, 8), x0=x0)
    x = free.step(5).images
    assert x.min() >= 0 and x.max() <= 1
    r = 0.05
    linf = S.SGLDSampler(model, [0, 1], 4, init="random", eta=10, gamma=0.5, bound=("Linf", r), image_shape=(3, 8, 8),
                         x0=x0)
    x = linf.step(5).images
    assert float((x - x0).abs().max()) <= r + 1e-6 and x.min() >= 0 and x.max() <= 1
    r2 = 0.5
    l2 = S.SGLDSampler(model, [0, 1], 4, init="random", eta=10, gamma=0.5, bound=("L2", r2), image_shape=(3, 8, 8),
                       x0=x0)
    x = l2.step(5).images
    assert float((x - x0).flatten(1).norm(dim=1).max()) <= r2 + 1e-5
    # the perturbation is projected, not the image: the images keep their (much larger) norm
    assert float(x.flatten(1).norm(dim=1).min()) > 5 * r2


# ------------------------------------------------------------------------- initialisations
def test_class_stats_match_sklearn_pca(cache):
    from sklearn.decomposition import PCA

    ds = synthetic_dataset()
    st = S.ClassStats(ds)
    mo = st.get(1)
    x = ds.images(ds.class_indices(1)).flatten(1).double().numpy()
    pca = PCA().fit(x)
    r = 5
    np.testing.assert_allclose(mo.mean.numpy(), x.mean(0), atol=1e-6)
    np.testing.assert_allclose(mo.stds[:r].numpy(), np.sqrt(pca.explained_variance_[:r]), rtol=1e-4)
    # λ scaling: sklearn's singular values are √(n−1) × our per-component stds
    np.testing.assert_allclose(pca.singular_values_[:r], mo.stds[:r].numpy() * math.sqrt(mo.n - 1), rtol=1e-4)
    np.testing.assert_allclose(np.abs(mo.components[:r].numpy() @ pca.components_[:r].T), np.eye(r), atol=1e-4)
    assert S.sigma_from_official(0.005, 5000) == pytest.approx(0.005 * math.sqrt(4999))
    assert S.sigma_from_official(0.005, 5000) == pytest.approx(S.DEFAULT_PCA_SIGMA, abs=0.01)
    # retained variance includes the component that crosses the threshold
    cum = np.cumsum(pca.explained_variance_ratio_)
    for rv in (0.5, 0.8, 0.9, 0.95, 0.99):
        k = mo.n_components(rv)
        assert cum[k - 1] >= rv - 1e-6 and (k == 1 or cum[k - 2] < rv)
    assert mo.n_components(count=2) == 2 and mo.n_components(count=10_000) == mo.rank


def test_pca_init_mean_and_spread_scale_with_sigma(cache):
    ds = synthetic_dataset()
    st = S.ClassStats(ds)
    mo = st.get(2)
    model = Linear(16, 3)
    u1 = mo.components[0]
    spreads = {}
    for sigma in (0.5, 1.0):
        s = S.SGLDSampler(model, [2], 4000, init="pca", stats=st, pca_sigma=sigma, pca_variance=0.99, seed=3)
        x = s.x0.flatten(1).cpu()
        assert float((x.mean(0) - mo.mean).abs().max()) < 0.01          # ≈ class mean
        spreads[sigma] = float(((x - mo.mean) @ u1).std())
        assert spreads[sigma] == pytest.approx(sigma * float(mo.stds[0]), rel=0.05)
    assert spreads[1.0] / spreads[0.5] == pytest.approx(2.0, rel=0.05)
    s0 = S.SGLDSampler(model, [2], 5, init="pca", stats=st, pca_sigma=0.0)
    torch.testing.assert_close(s0.x0.flatten(1), mo.mean.expand(5, -1).clamp(0, 1))
    k = S.SGLDSampler(model, [2], 2, init="pca", stats=st, pca_components=2).pca_k
    assert k == {2: 2}


def test_gaussian_init_covariance_matches_class(cache):
    ds = synthetic_dataset(n_per_class=200)
    st = S.ClassStats(ds)
    model = Linear(16, 3)
    ridge = 1e-4
    s = S.SGLDSampler(model, [0], 10_000, init="gaussian", stats=st, gaussian_ridge=ridge, seed=1)
    x = s.x0.flatten(1).double().numpy()
    mo = st.get(0)
    emp = np.cov(x, rowvar=False)
    ref = mo.covariance().numpy() + ridge * np.eye(16)
    real = np.cov(ds.images(ds.class_indices(0)).flatten(1).double().numpy(), rowvar=False)
    np.testing.assert_allclose(ref - ridge * np.eye(16), real, atol=1e-8)     # the factor is exact
    assert np.abs(emp - ref).max() < 0.06 * np.abs(ref).max()
    np.testing.assert_allclose(x.mean(0), mo.mean.numpy(), atol=0.01)


def test_random_init_is_uniform():
    s = S.SGLDSampler(Linear(48, 2), [0, 1], 500, init="random", image_shape=(3, 4, 4))
    x = s.x0
    assert x.min() >= 0 and x.max() <= 1
    assert float(x.mean()) == pytest.approx(0.5, abs=0.01)
    assert float(x.std()) == pytest.approx(1 / math.sqrt(12), rel=0.02)


# --------------------------------------------------------------------------------- cache
def test_class_stats_cache_written_once_and_reused(cache):
    ds = synthetic_dataset()
    a = S.ClassStats(ds)
    m0 = a.get(0)
    a.get(0)
    assert a.computed == 1 and a.loaded == 0
    files = sorted(cache.glob("classstats-synthetic-900-*-c0.npz"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    with np.load(files[0], allow_pickle=False) as z:        # plain arrays, no pickle
        assert z["components"].shape[1] == 16
    b = S.ClassStats(ds)
    m1 = b.get(0)
    assert b.computed == 0 and b.loaded == 1 and files[0].stat().st_mtime_ns == mtime
    torch.testing.assert_close(m0.components, m1.components)
    torch.testing.assert_close(m0.mean, m1.mean)
    # changed content -> different key, recomputed
    x = ds.x.clone()
    x[0, 0, 0, 0] ^= 1
    c = S.ClassStats(ImageDataset("synthetic", "train", x, ds.y.clone(), ds.class_names))
    c.get(0)
    assert c.computed == 1 and c.fingerprint != a.fingerprint
    # a corrupt cache file is recomputed, not trusted
    files[0].write_bytes(b"garbage")
    d = S.ClassStats(ds)
    torch.testing.assert_close(d.get(0).mean, m0.mean)
    assert d.computed == 1


# --------------------------------------------------------------------------------- determinism
def test_same_seed_same_chain_regardless_of_chunking(cache):
    ds = synthetic_dataset()
    model = Linear(16, 3, scale=0.05)
    kw = dict(init="pca", stats=S.ClassStats(ds), eta=0.3, zeta=0.5, gamma=0.01, seed=7)
    a = S.SGLDSampler(model, [0, 2], 3, **kw)
    b = S.SGLDSampler(model, [0, 2], 3, **kw)
    xa = a.step(5).images
    b.step(3)
    xb = b.step(2).images
    assert torch.equal(xa, xb)
    np.testing.assert_array_equal(a.trace.joint_all, b.trace.joint_all)
    c = S.SGLDSampler(model, [0, 2], 3, **{**kw, "seed": 8})
    assert not torch.equal(c.step(5).images, xa)
    a.reset()
    assert a.steps_done == 0 and torch.equal(a.step(5).images, xa)


def test_set_params_validates_and_applies():
    s = S.SGLDSampler(Linear(16, 2), [0], 2, init="random", image_shape=(1, 4, 4))
    with pytest.raises(InputError):
        s.set_params(eta=-1)
    assert s.eta == S.DEFAULTS["eta"]
    s.set_params(eta=0.1, zeta=0.0, gamma=0.0)
    assert (s.eta, s.zeta, s.gamma) == (0.1, 0.0, 0.0)


def test_model_mode_and_grad_flags_restored():
    model = Linear(16, 2).train()
    before = [p.detach().clone() for p in model.parameters()]
    s = S.SGLDSampler(model, [0, 1], 2, init="random", image_shape=(1, 4, 4))
    s.step(3)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_trace_thinning_keeps_first_and_last():
    s = S.SGLDSampler(Linear(16, 2), [0], 1, init="random", image_shape=(1, 4, 4), trace_budget_bytes=1)
    s.step(100)
    tr = s.trace
    assert tr.n_rows <= 16 + 1 and tr.steps[0] == 0 and tr.steps[-1] == 100
    assert (np.diff(tr.steps) > 0).all()


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("kw,match", [
    ({"eta": 0}, "η"), ({"eta": -1}, "η"), ({"eta": float("nan")}, "η"), ({"zeta": 1.0}, "ζ"),
    ({"zeta": -0.1}, "ζ"), ({"gamma": -0.01}, "γ"), ({"init": "bogus"}, "initialisation"),
    ({"bound": ("L1", 1.0)}, "norm"), ({"bound": ("Linf", 0)}, "radius"), ({"n_per_class": 0}, "chains"),
    ({"pca_sigma": -1}, "σ"), ({"seed": -1}, "seed"),
])
def test_invalid_hyperparameters(kw, match):
    args = dict(init="random", image_shape=(1, 4, 4))
    args.update(kw)
    with pytest.raises(InputError, match=match):
        S.SGLDSampler(Linear(16, 3), [0], **args)


def test_invalid_steps_classes_and_missing_data():
    s = S.SGLDSampler(Linear(16, 3), [0], 1, init="random", image_shape=(1, 4, 4))
    for n in (0, -3, S.MAX_STEPS + 1, 2.5):
        with pytest.raises(InputError, match="steps"):
            s.step(n)
    with pytest.raises(InputError, match="class 3 does not exist"):
        S.SGLDSampler(Linear(16, 3), [0, 3], 1, init="random", image_shape=(1, 4, 4))
    with pytest.raises(InputError, match="at least one class"):
        S.SGLDSampler(Linear(16, 3), [], 1, init="random", image_shape=(1, 4, 4))
    for init in ("pca", "gaussian"):
        with pytest.raises(InputError, match="training images"):
            S.SGLDSampler(Linear(16, 3), [0], 1, init=init, image_shape=(1, 4, 4))
    with pytest.raises(InputError, match="no training images"):
        ds = synthetic_dataset(k=2)
        S.SGLDSampler(Linear(16, 3), [2], 1, init="pca", dataset=ds)
    with pytest.raises(InputError):
        S.ClassStats(ImageDataset("empty", "train", torch.zeros(0, 1, 4, 4, dtype=torch.uint8),
                                  torch.zeros(0, dtype=torch.long)))


class NaNAfter(nn.Module):
    """Finite logits for the first ``ok`` forward passes, NaN afterwards."""

    def __init__(self, ok: int):
        super().__init__()
        self.lin = nn.Linear(16, 2)
        self.calls, self.ok = 0, ok

    def forward(self, x):
        self.calls += 1
        out = self.lin(x.flatten(1))
        return out * float("nan") if self.calls > self.ok else out


def test_nan_stops_the_chain_and_keeps_the_last_finite_state():
    s = S.SGLDSampler(NaNAfter(3), [0], 2, init="random", image_shape=(1, 4, 4))  # probe is skipped? see below
    start = s.steps_done
    with pytest.raises(InputError, match="diverged"):
        s.step(10)
    assert s.steps_done >= start and torch.isfinite(s.images()).all()
    assert np.isfinite(s.trace.joint).all() and s.trace.steps[-1] == s.steps_done
    with pytest.raises(InputError, match="NaN"):
        S.SGLDSampler(NaNAfter(0), [0], 1, init="random", image_shape=(1, 4, 4), num_classes=2)


# ----------------------------------------------------------------- the robust model (Fig. 5e)
@pytest.mark.slow
def test_energy_falls_towards_reference_on_robust_model(robust_model, digits_train, cache):
    classes = [0, 3, 7]
    ref = S.reference_joint_energy(robust_model, digits_train, classes)
    assert set(ref) == set(classes) and all(math.isfinite(v) for v in ref.values())
    s = S.SGLDSampler(robust_model, classes, 6, init="random", eta=1.0, zeta=0.5, seed=0)
    s.step(25)
    tr = s.trace
    summ = tr.summary()
    e0, e1 = summ["target_mean"][0], summ["target_mean"][-1]
    ref_mean = float(np.mean([ref[c] for c in tr.labels]))
    assert e1 < e0                                   # the target energy E(x, y) falls
    gap = np.abs(summ["target_mean"] - ref_mean)
    assert gap.min() < 0.25 * gap[0]                 # ... and reaches the level Ē(x, y) of real images
    assert summ["others_mean"][-1] > summ["others_mean"][0]   # the other classes' energies rise
    assert summ["target_hit"][-1] >= summ["target_hit"][0]
    # PCA start: already near the class manifold, and E(x, y) still falls
    p = S.SGLDSampler(robust_model, classes, 6, init="pca", dataset=digits_train, seed=0)
    p.step(20)
    ps = p.trace.summary()
    assert ps["target_mean"][-1] < ps["target_mean"][0]


# --------------------------------------------------------------------------------- batch job
@pytest.mark.slow
def test_run_job_writes_samples_and_labelled_metrics(tmp_path, cache):
    if not PLAIN.is_file():
        pytest.skip("bundled digits-plain checkpoint missing")
    reports = []
    cfg = {"model": {"source": "bundled", "name": "digits-plain", "path": str(PLAIN)}, "classes": [1, 4],
           "n_per_class": 6, "init": "pca", "steps": 3, "batch_size": 8, "seed": 1, "device": "cpu",
           "metrics": {"features": "classifier", "kid_subset_size": 10, "kid_subsets": 5, "is_splits": 2}}
    res = S.run_job(cfg, tmp_path / "run", lambda f, m: reports.append(f))
    with np.load(tmp_path / "run" / "samples.npz", allow_pickle=False) as z:
        assert z["x"].shape == (12, 3, 32, 32) and z["x"].dtype == np.uint8
        assert sorted(z["y"].tolist()) == [1] * 6 + [4] * 6
        n_rows = z["curve_steps"].shape[0]
        assert z["curve_target"].shape == (n_rows,) and z["curve_steps"].tolist() == list(range(n_rows))
    ds = load_dataset(f"npz:{tmp_path / 'run' / 'samples.npz'}", "train")   # usable as a dataset
    assert len(ds) == 12
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # never the generating model's own features by default: another bundled digits classifier
    assert saved["metrics"]["features"].startswith("classifier:digits-")
    assert saved["metrics"]["features"] != "classifier:digits-plain"
    assert any("other than the generating model digits-plain" in n for n in saved["metrics"]["notes"])
    assert saved["metrics"]["FID"] >= 0 and 1 <= saved["metrics"]["IS"] <= 10
    assert saved["metrics"]["FID_floor"] >= 0 and saved["metrics"]["FID_floor_n"] == 12   # min(12 fakes, half of real)
    assert set(saved["energy"]["reference_E_xy"]) == {"1", "4"}
    assert saved["config"]["eta"] == S.DIGITS_DEFAULTS["eta"]                         # the digits defaults, recorded
    # the stopping rule (on by default): the run ends when every chain has reached its class's Ē(x, y)
    stop = saved["stop"]
    assert saved["config"]["stop_at_reference"] is True and stop["rule"] == "on" and stop["n_chains"] == 12
    assert stop["steps_run"] == n_rows - 1 <= 3
    assert stop["steps_run"] == 3 or stop["stopped"] == 12
    # within-class diversity next to FID, for the samples and the real images of the same classes
    assert saved["metrics"]["diversity"] == saved["diversity"]["samples"] > 0
    assert saved["metrics"]["diversity_real"] == saved["diversity"]["real"] > 0
    assert res["metrics"]["features"] == saved["metrics"]["features"]
    assert reports[-1] == 1.0 and all(b >= a - 1e-9 for a, b in zip(reports, reports[1:]))
    # the rule off: every chain runs all the steps
    S.run_job({**cfg, "stop_at_reference": False, "metrics": {"enabled": False}}, tmp_path / "run2", lambda f, m: None)
    off = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert off["stop"] == {"rule": "off", "stopped": 0, "n_chains": 12, "median_step": None, "steps_run": 3}
    with pytest.raises(InputError, match="stop_at_reference"):
        S.run_job({**cfg, "stop_at_reference": "yes"}, tmp_path / "bad", lambda f, m: None)
    with pytest.raises(InputError, match="unknown"):
        S.run_job({**cfg, "bogus": 1}, tmp_path / "bad", lambda f, m: None)
    with pytest.raises(InputError, match="η"):
        S.run_job({**cfg, "eta": 0}, tmp_path / "bad", lambda f, m: None)


# ------------------------------------------------------------------------- defaults per dataset family
def test_sgld_defaults_per_dataset_family():
    from core.models import ModelMeta

    for name in ("cifar10", "cifar100", "cifar10-demo", "svhn", "tinyimagenet", "npz:/data/mine.npz", "unknown", None):
        d = S.sgld_defaults(dataset=name)
        assert d["family"] == "cifar" and (d["eta"], d["zeta"], d["gamma"]) == (0.025, 0.8, 0.001), name
    d = S.sgld_defaults(dataset="digits")
    assert d["family"] == "digits" and (d["eta"], d["zeta"], d["gamma"]) == (1.0, 0.5, 0.001)
    meta = ModelMeta(arch="smallcnn", num_classes=3, dataset="cifar10", input_shape=[1, 4, 4])
    assert S.sgld_defaults(meta)["eta"] == 0.025
    # the sampler takes them from the model's dataset (a LoadedModel), or from its training images
    from core.models import LoadedModel

    s = S.SGLDSampler(LoadedModel(Linear(16, 3), meta), [0], 2, init="random")
    assert (s.eta, s.zeta, s.gamma) == (0.025, 0.8, 0.001)
    meta.dataset = "digits"
    s = S.SGLDSampler(LoadedModel(Linear(16, 3), meta), [0], 2, init="random", zeta=0.1)
    assert (s.eta, s.zeta) == (1.0, 0.1)                          # an explicit value wins
    ds = synthetic_dataset()
    ds.name = "digits"
    assert S.SGLDSampler(Linear(16, 3), [0], 2, init="pca", dataset=ds).eta == 1.0
    # a job config leaves them to the model (validated as the defaults), and refuses bad explicit ones
    cfg = S.SGLDJobConfig.from_dict({"model": {"source": "bundled", "name": "x"}}).validate()
    assert cfg.eta is None and cfg.zeta is None and cfg.gamma is None
    with pytest.raises(InputError, match="η"):
        S.SGLDJobConfig.from_dict({"model": {"source": "bundled", "name": "x"}, "eta": -1}).validate()


def test_passed_reference_finds_when_the_chain_went_below_the_real_data_level():
    joint = np.array([[3.0, 2.0], [1.5, 1.0], [0.5, 0.8], [-1.0, 0.2]], np.float32)     # (rows, chains)
    tr = S.SGLDTrace(steps=np.array([0, 5, 10, 15]), joint=joint, joint_all=np.zeros((4, 2, 2), np.float32),
                     marginal=np.zeros((4, 2), np.float32), labels=np.array([0, 1]))
    ref = {0: {"joint": 1.0, "marginal": 0.0}, 1: 0.5}                  # dicts as reference_energies gives, or floats
    np.testing.assert_allclose(tr.reference_gap(ref), [1.75, 0.5, -0.1, -1.15])
    out = tr.passed_reference(ref)
    assert out["step"] == 10 and out["gap"] == pytest.approx(-1.15) and out["below_now"]
    assert out["classes_below"] == 2 and out["n_classes"] == 2
    one = tr.passed_reference(ref, classes=[1])
    assert one["step"] == 15 and one["classes_below"] == 1 and one["n_classes"] == 1
    assert tr.passed_reference({0: -5.0, 1: -5.0})["step"] is None      # never below
    with pytest.raises(InputError, match="class 1"):
        tr.passed_reference({0: 1.0})


def _save_cifar_like(path, model, name, dataset, method):
    from core.models import ModelMeta, save_checkpoint

    save_checkpoint(path, model, ModelMeta(arch="smallcnn", arch_kwargs={"width": 16}, num_classes=10,
                                           dataset=dataset, method=method, name=name))


@pytest.mark.slow
def test_default_metrics_rank_gaussian_blobs_below_real_cifar_images(cifar_subset, cifar_plain_model, tmp_path,
                                                                    runs_dir, monkeypatch, cache):
    """The batch job's default features are an independent classifier of the same data, never the generating
    model, and with them Gaussian blobs (SGLD's 'gaussian' start, not moved: η tiny, γ = 0) score far worse
    than real images of the same number do (the real-vs-real floor that comes with every FID)."""
    from core import metrics as M
    from core.models import build_model

    xs, ys = cifar_subset
    data = tmp_path / "cifar2k.npz"
    np.savez(data, x=xs[:2000], y=ys[:2000])          # the fixture model's training images
    dataset = f"npz:{data}"
    runs = runs_dir
    (runs / "scorer").mkdir(parents=True)
    _save_cifar_like(runs / "scorer" / "best.safetensors", cifar_plain_model[0], "cifar-plain", dataset, "plain")
    torch.manual_seed(1)
    gen = tmp_path / "generator.safetensors"          # the generating model: another network of the same data
    _save_cifar_like(gen, build_model("smallcnn", 10, width=16).eval(), "generator", dataset, "untrained")
    monkeypatch.setattr(M, "inception_status", lambda: (False, "Inception weights not found; using a classifier"))
    # 1,000 blobs against the 2,000 real images: at 200 the real-vs-real floor itself varies by 2x between draws
    cfg = {"model": {"source": "local", "name": "generator", "path": str(gen)}, "n_per_class": 100, "init": "gaussian",
           "steps": 1, "eta": 1e-9, "gamma": 0.0, "batch_size": 500, "seed": 0, "device": "cpu",
           "metrics": {"kid_subset_size": 100, "kid_subsets": 5}}
    res = S.run_job(cfg, tmp_path / "job", lambda f, m: None)["metrics"]
    assert res["features"] == "classifier:cifar-plain", res["features"]
    assert res["n_fake"] == 1000 and res["FID_floor_n"] == 1000
    # (3.2-4.8x over draws with this scorer; the generator's own, untrained, features give about 1.1x)
    assert res["FID"] > 2 * res["FID_floor"], (res["FID"], res["FID_floor"])
    # no independent classifier of these data: no metrics rather than the generating model's own features
    (runs / "scorer" / "best.safetensors").unlink()
    out = S.run_job(cfg, tmp_path / "job2", lambda f, m: None)
    assert out["metrics"] is None and "no feature extractor independent of generator" in out["metrics_note"]


def test_run_job_scores_with_inception_when_its_weights_are_present(tmp_path, monkeypatch, cache):
    """'auto' takes Inception-v3 when its weights are there (a stand-in extractor here: nothing is downloaded)."""
    if not PLAIN.is_file():
        pytest.skip("bundled digits-plain checkpoint missing")
    from core import metrics as M

    def fake_inception(device="cpu"):
        def fn(x):
            f = torch.nn.functional.avg_pool2d(M.to_float01(x), 8).flatten(1)
            return f, torch.zeros(len(x), 1008)
        return M.InceptionFeatures(label="inception-v3", layer="pool3 (stand-in)", fn=fn)

    monkeypatch.setattr(M, "inception_status", lambda: (True, "Inception-v3 weights from a test file"))
    monkeypatch.setattr(M, "load_inception", fake_inception)
    cfg = {"model": {"source": "bundled", "name": "digits-plain", "path": str(PLAIN)}, "classes": [1, 4],
           "n_per_class": 6, "init": "pca", "steps": 2, "seed": 1, "device": "cpu",
           "metrics": {"kid_subset_size": 10, "kid_subsets": 5, "is_splits": 2}}
    m = S.run_job(cfg, tmp_path / "run", lambda f, m: None)["metrics"]
    assert m["features"] == "inception-v3" and m["FID_floor"] is not None and m["FID_floor_n"] == 12


# ------------------------------------------------------------------------- stopping at Ē(x, y) (issue 23)
class Ramp(nn.Module):
    """logits_k = w·sum(x) with w = 0.1 for every class: E(x, y) = −0.1·Σx, ∇ₓE = −0.1. Plain SGLD
    (ζ = γ = 0, η = 1) then raises every pixel by 0.05 a step, so E(x, y) falls by exactly 0.02 a step."""

    def forward(self, x):
        return 0.1 * x.flatten(1).sum(1, keepdim=True).expand(-1, 2)


def _ramp(stop=True, reference=None):
    x0 = torch.full((4, 1, 2, 2), 0.1)        # E0 = −0.04; the clamp at 1 is 18 steps away
    return S.SGLDSampler(Ramp(), [0, 1], 2, init="random", eta=1.0, zeta=0.0, gamma=0.0, image_shape=(1, 2, 2),
                         num_classes=2, x0=x0, reference=reference, stop_at_reference=stop)


def test_stopping_rule_stops_each_chain_where_it_reaches_its_class_level():
    # class 0 reaches Ē = −0.04 − 0.02·4.5 after 5 steps, class 1 reaches −0.04 − 0.02·9.5 after 10
    ref = {0: -0.04 - 0.02 * 4.5, 1: {"joint": -0.04 - 0.02 * 9.5, "marginal": 0.0}}
    s = _ramp(reference=ref)
    out = s.step(50)
    assert s.stopped_at.tolist() == [5, 5, 10, 10]
    assert out.steps_done == 10 and out.stopped_early           # every chain stopped: the run ends at step 10
    e = s.trace.joint
    np.testing.assert_allclose(e[:, 0], -0.04 - 0.02 * np.minimum(np.arange(11), 5), atol=1e-5)   # flat after 5
    np.testing.assert_allclose(e[:, 2], -0.04 - 0.02 * np.arange(11), atol=1e-5)
    np.testing.assert_allclose(s.images()[:2].numpy(), 0.1 + 0.05 * 5, atol=1e-6)   # frozen at step 5
    rep = s.stop_report()
    assert rep == {"rule": "on", "stopped": 4, "n_chains": 4, "median_step": 7.5, "first_step": 5, "last_step": 10}
    assert s.trace.meta["stopped_at"] == [5, 5, 10, 10] and s.trace.meta["sampler"]["stop_at_reference"] is True
    # the rule off, or no Ē known: the chains run every step asked for
    off = _ramp(stop=False, reference=ref)
    assert off.step(15).steps_done == 15 and off.stopped_at.tolist() == [-1] * 4
    assert off.stop_report()["rule"] == "off"
    blind = _ramp(reference=None)
    assert blind.step(12).steps_done == 12 and blind.stop_report()["rule"] == "on, no Ē(x, y) yet"
    blind.set_reference(ref)                                   # arriving late: chains already below stop now
    assert blind.stopped_at.tolist() == [12, 12, 12, 12]
    # a saved and restored sampler keeps the rule, its level and the chains' stops
    s2 = S.SGLDSampler.from_state(Ramp(), *s.state())
    assert s2.stopped_at.tolist() == [5, 5, 10, 10] and s2.stopping and s2.step(5).stopped_early
    with pytest.raises(InputError, match="class 1"):
        _ramp(reference={0: -1.0})


def test_stopping_rule_is_on_by_default_and_reset_clears_it():
    assert S.sgld_defaults(dataset="cifar10")["stop_at_reference"] is True
    s = S.SGLDSampler(Ramp(), [0, 1], 2, init="random", eta=1.0, zeta=0.0, gamma=0.0, image_shape=(1, 2, 2),
                      num_classes=2, x0=torch.full((4, 1, 2, 2), 0.1), reference={0: -0.1, 1: -0.1})
    assert s.stopping
    s.step(20)
    assert s.steps_done == 3 and s.stopped_at.tolist() == [3] * 4     # −0.04 − 0.02·3 = −0.1
    s.reset()
    assert s.stopped_at.tolist() == [-1] * 4 and s.steps_done == 0


def test_within_class_diversity_on_known_images():
    # class 0: three images at 0, 3 and 4 along one pixel -> pairs 3, 4, 1 -> mean 8/3; class 1: two equal images
    x = torch.zeros(5, 1, 1, 2)
    x[1, 0, 0, 0], x[2, 0, 0, 0] = 0.3, 0.4
    d = S.within_class_diversity(x * 10, [0, 0, 0, 1, 1])
    assert d["per_class"][0] == pytest.approx(8 / 3) and d["per_class"][1] == 0.0
    assert d["mean"] == pytest.approx(4 / 3) and d["n_pairs"] == 4
    # uint8 images are read as /255; a class with one image is left out
    u = torch.tensor([[[[0, 255]]], [[[255, 0]]], [[[7, 7]]]], dtype=torch.uint8)
    d = S.within_class_diversity(u, [2, 2, 5])
    assert d["per_class"] == {2: pytest.approx(math.sqrt(2))} and d["mean"] == pytest.approx(math.sqrt(2))
    assert math.isnan(S.within_class_diversity(u[:1], [0])["mean"])
    with pytest.raises(InputError, match="labels"):
        S.within_class_diversity(u, [0, 1])


def test_the_sgld_image_family_is_the_dataset_catalogue_s():
    """Defaults stated once (issue 26): each dataset's SGLD default set is its DatasetSpec.sgld_family."""
    from core.data import DATASETS, SGLD_FAMILIES
    from core.sampling import dataset_family, sgld_defaults
    from core.sampling.defaults import _FAMILY_DEFAULTS

    assert set(_FAMILY_DEFAULTS) == set(SGLD_FAMILIES)
    for name, spec in DATASETS.items():
        assert dataset_family(name) == spec.sgld_family
        assert sgld_defaults(dataset=name) == {**_FAMILY_DEFAULTS[spec.sgld_family], "family": spec.sgld_family,
                                               "dataset": name}
