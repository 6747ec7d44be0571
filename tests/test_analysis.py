"""core.analysis: the energy landscape (Fig. 4), sample statistics (Fig. 5 b-d), subset removal (Fig. 5a)
and embeddings. Runs on CPU with the bundled digits model (and perturbed copies of it)."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from core import analysis as A
from core.attacks import AttackSpec, run_attack
from core.errors import InputError
from core.models.checkpoint import LoadedModel, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
PLAIN = REPO / "checkpoints" / "digits-plain.safetensors"


# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain() -> LoadedModel:
    if not PLAIN.is_file():
        pytest.skip("bundled checkpoint digits-plain.safetensors is missing")
    return load_checkpoint(PLAIN)


def _perturbed_copy(lm: LoadedModel, path: Path, scale: float = 0.9, name: str = "digits-copy") -> LoadedModel:
    """Another model of the same family: same checkpoint with the last layer rescaled."""
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    state["linear.weight"] = state["linear.weight"] * scale
    meta = replace(lm.meta, name=name)
    save_checkpoint(path, state, meta)
    return load_checkpoint(path)


@pytest.fixture(scope="module")
def digits_test():
    from core.data import load_dataset

    return load_dataset("digits", "test")


@pytest.fixture
def small_batch(digits_test):
    idx = torch.arange(24)
    return digits_test.images(idx), digits_test.labels(idx)


SPEC = AttackSpec("pgd", eps=16 / 255, steps=3, seed=0)


# ---------------------------------------------------------------------------------------------
# Fig. 4: landscape
# ---------------------------------------------------------------------------------------------
def test_landscape_matches_run_attack_traces(plain, small_batch, tmp_path):
    other = _perturbed_copy(plain, tmp_path / "copy.safetensors")
    x, y = small_batch
    res = A.landscape([plain, other], x, y, SPEC, cache_dir=tmp_path / "cache")
    assert [r.name for r in res] == ["digits-plain", "digits-copy"]
    for lm, r in zip([plain, other], res):
        tr = run_attack(lm.model, x, y, SPEC).trace
        np.testing.assert_allclose(r.delta_marginal, tr.delta_marginal(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r.delta_joint, tr.delta_joint(), rtol=1e-5, atol=1e-5)
        assert r.natural_accuracy == pytest.approx(tr.natural_accuracy())
        assert r.robust_accuracy == pytest.approx(tr.robust_accuracy())
        # signed convention: Delta E = E(natural) - E(adversarial)
        np.testing.assert_allclose(r.delta_marginal, r.e_nat - r.e_adv)
        s = r.summary()
        assert s["n"] == 24 and s["dE_abs_mean"] >= abs(s["dE_mean"]) - 1e-9
    table = A.landscape_table(res)
    assert [t["robust_acc"] for t in table] == sorted(t["robust_acc"] for t in table)


def test_landscape_draws_n_images_from_the_split(plain, tmp_path):
    res = A.landscape([plain], n=20, seed=3, spec=SPEC, cache_dir=tmp_path)
    assert res[0].n == 20
    again = A.landscape([plain], n=20, seed=3, spec=SPEC, cache_dir=tmp_path)
    assert again[0].cached
    np.testing.assert_array_equal(res[0].labels, again[0].labels)


def test_landscape_cache_hit_then_miss_after_the_file_changes(plain, small_batch, tmp_path):
    x, y = small_batch
    path = tmp_path / "model.safetensors"
    m1 = _perturbed_copy(plain, path, scale=0.9)
    sha1 = A.model_sha256(m1)
    cache = tmp_path / "cache"
    first = A.landscape([m1], x, y, SPEC, cache_dir=cache)[0]
    assert not first.cached
    files = list(cache.glob("*.npz"))
    assert len(files) == 1
    with np.load(files[0], allow_pickle=False) as d:  # plain arrays, no pickle
        assert "e_nat" in d and "key" in d
    hit = A.landscape([m1], x, y, SPEC, cache_dir=cache)[0]
    assert hit.cached
    np.testing.assert_array_equal(hit.delta_marginal, first.delta_marginal)
    # a different attack, N or seed is a different entry
    assert not A.landscape([m1], x, y, replace(SPEC, steps=2), cache_dir=cache)[0].cached
    assert not A.landscape([m1], x[:20], y[:20], SPEC, cache_dir=cache)[0].cached
    # overwrite the file with other weights: same path, new content -> miss, new numbers
    m2 = _perturbed_copy(plain, path, scale=0.5)
    assert A.model_sha256(m2) != sha1
    miss = A.landscape([m2], x, y, SPEC, cache_dir=cache)[0]
    assert not miss.cached and miss.model_sha == A.model_sha256(m2)
    assert not np.allclose(miss.e_nat, first.e_nat)
    # the stale in-memory m1 (file changed under it) is not matched to the old entry either
    assert not A.landscape([m1], x, y, SPEC, cache_dir=cache)[0].cached
    # the same bytes written again (a new file, same content) hit again
    m3 = _perturbed_copy(plain, tmp_path / "again.safetensors", scale=0.5)
    assert A.landscape([m3], x, y, SPEC, cache_dir=cache)[0].cached
    # no cache at all
    assert not A.landscape([m1], x, y, SPEC, cache_dir=cache, use_cache=False)[0].cached


def test_model_hash_without_a_file(plain):
    lm = LoadedModel(model=plain.model, meta=plain.meta, path=None)
    h = A.model_sha256(lm)
    assert h.startswith("weights-") and h == A.model_sha256(lm)


def test_landscape_validation(plain, small_batch, tmp_path):
    x, y = small_batch
    with pytest.raises(InputError, match="no models selected"):
        A.landscape([], x, y, SPEC)
    other = _perturbed_copy(plain, tmp_path / "c.safetensors")
    other.meta.dataset = "svhn"
    with pytest.raises(InputError, match="different datasets"):
        A.landscape([plain, other], x, y, SPEC)
    other.meta.dataset = plain.meta.dataset
    other.meta.num_classes = 7
    with pytest.raises(InputError, match="different numbers of classes"):
        A.landscape([plain, other], x, y, SPEC)
    other.meta.num_classes = plain.meta.num_classes
    other.meta.input_shape = [3, 64, 64]
    with pytest.raises(InputError, match="different input shapes"):
        A.landscape([plain, other], x, y, SPEC)
    with pytest.raises(InputError, match="has only 359"):
        A.landscape([plain], n=10_000, spec=SPEC)
    with pytest.raises(InputError, match="expect images of shape"):
        A.landscape([plain], torch.rand(4, 3, 16, 16), torch.zeros(4, dtype=torch.long), SPEC)


def test_validate_landscape_request(plain):
    from core.models.registry import ModelRef

    ref = ModelRef("bundled", "digits-plain", str(PLAIN))
    metas = A.validate_landscape_request([ref, ref], 32)
    assert [m.dataset for m in metas] == ["digits", "digits"]
    with pytest.raises(InputError, match="no models selected"):
        A.validate_landscape_request([], 32)
    with pytest.raises(InputError, match="has only"):
        A.validate_landscape_request([ref], 100_000)


def test_run_landscape_job_writes_results(plain, tmp_path, monkeypatch):
    monkeypatch.setenv("ENERGYLENS_CACHE", str(tmp_path / "cache"))
    cfg = {"models": [{"source": "bundled", "name": "digits-plain", "path": str(PLAIN)}], "n": 16, "seed": 0,
           "attack": SPEC.to_dict(), "device": "cpu"}
    reports = []
    out = A.run_landscape_job(cfg, tmp_path, lambda f, m: reports.append((f, m)))
    assert Path(out["results_file"]).is_file() and out["table"][0]["n"] == 16
    res = A.load_landscape_results(tmp_path)
    assert len(res) == 1 and res[0].name == "digits-plain" and res[0].n == 16
    assert reports[-1][0] == 1.0
    with pytest.raises(InputError, match="no models selected"):
        A.run_landscape_job({"models": []}, tmp_path, lambda f, m: None)


def test_robustness_trend_signs():
    def fake(name, rob, spread):
        n = 100
        lab = np.zeros(n, int)
        pred_adv = np.where(np.arange(n) < rob * n, 0, 1)
        e = np.linspace(-spread, spread, n) + spread / 2
        return A.LandscapeResult(name, e_nat=e, e_adv=np.zeros(n), ej_nat=e, ej_adv=np.zeros(n), pred_nat=lab,
                                 pred_adv=pred_adv, labels=lab)

    res = [fake("a", 0.1, 10.0), fake("b", 0.4, 3.0), fake("c", 0.7, 0.5)]
    t = A.robustness_trend(res)
    assert t["dE_abs_mean"]["spearman"] == pytest.approx(-1.0)
    assert t["dE_std"]["spearman"] == pytest.approx(-1.0)


# ---------------------------------------------------------------------------------------------
# Fig. 5 b-d
# ---------------------------------------------------------------------------------------------
def test_probabilistic_margin_and_entropy_by_hand():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    logits = p.log() + 5.0  # softmax is shift invariant
    y = torch.tensor([0, 0, 2])
    pm = A.probabilistic_margin(logits, y)
    np.testing.assert_allclose(pm, [0.7 - 0.2, 0.1 - 0.6, 0.0], atol=1e-12)
    h = A.entropy(logits)
    np.testing.assert_allclose(h[2], np.log(3), atol=1e-12)
    np.testing.assert_allclose(h[0], -(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.1 * np.log(0.1)), atol=1e-12)
    s = A.sample_stats_from_logits(logits, y)
    np.testing.assert_allclose(s.p_y, [0.7, 0.1, 1 / 3], atol=1e-12)
    np.testing.assert_allclose(s.e_xy, -logits[torch.arange(3), y].numpy())
    np.testing.assert_allclose(s.e_x, -torch.logsumexp(logits, 1).numpy())
    np.testing.assert_array_equal(s.correct, [True, False, False])  # a 3-way tie predicts class 0


def test_correlations_by_hand():
    a = np.arange(10, dtype=float)
    c = A.correlation(a, 3 * a + 1)
    assert c.pearson == pytest.approx(1.0) and c.spearman == pytest.approx(1.0)
    c = A.correlation(a, np.exp(a))  # monotone, not linear
    assert c.spearman == pytest.approx(1.0) and c.pearson < 0.9
    assert A.correlation(a, -a).pearson == pytest.approx(-1.0)
    # ties are averaged: matches scipy
    from scipy import stats

    rng = np.random.default_rng(0)
    u, v = rng.integers(0, 4, 50).astype(float), rng.normal(size=50)
    c = A.correlation(u, v)
    assert c.spearman == pytest.approx(stats.spearmanr(u, v).statistic, abs=1e-12)
    assert c.pearson == pytest.approx(stats.pearsonr(u, v).statistic, abs=1e-12)
    assert np.isnan(A.correlation(np.ones(5), a[:5]).pearson)
    with pytest.raises(InputError):
        A.correlation(a, a[:3])


def test_margin_correlations_have_the_right_sign():
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(scale=3.0, size=(400, 5)))
    y = torch.from_numpy(rng.integers(0, 5, 400))
    s = A.sample_stats_from_logits(logits, y)
    corr = A.margin_correlations(s)
    # a larger true-class logit (lower E(x,y)) means a larger margin
    assert corr["E(x,y)"].pearson < -0.5 and corr["E(x,y)"].n == 400


def test_per_class_stats_by_hand():
    # class 0: two confident correct samples; class 1: two uniform samples; class 2: absent
    p = torch.tensor([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [1 / 3, 1 / 3, 1 / 3], [1 / 3, 1 / 3, 1 / 3]],
                     dtype=torch.float64)
    logits = p.log()
    logits[2:] += 2.0  # higher logits -> lower energy for class 1
    y = torch.tensor([0, 0, 1, 1])
    s = A.sample_stats_from_logits(logits, y)
    pcs = A.per_class_stats(s, ["a", "b", "c"])
    r0, r1, r2 = pcs.rows
    assert (r0["name"], r0["count"], r2["count"]) == ("a", 2, 0)
    assert r0["prob_error"] == pytest.approx(1 - (0.9 + 0.8) / 2)
    assert r1["prob_error"] == pytest.approx(2 / 3)
    assert r1["hard_error"] == pytest.approx(1.0)  # ties predict class 0
    assert r1["entropy"] == pytest.approx(np.log(3))
    assert r0["energy"] == pytest.approx(float(-torch.logsumexp(logits[:2], 1).mean()))
    assert r1["energy"] == pytest.approx(-2.0)
    assert np.isnan(r2["prob_error"])
    assert pcs.correlations["error~entropy"].n == 2
    assert pcs.correlations["error~entropy"].pearson == pytest.approx(1.0)


def test_sample_stats_on_a_model(plain, small_batch):
    x, y = small_batch
    s = A.sample_stats(plain.model, x, y)
    assert s.n == 24 and not s.adversarial
    logits = plain.model.eval()(x).detach()
    np.testing.assert_allclose(s.e_x, -torch.logsumexp(logits, 1).numpy(), rtol=1e-5, atol=1e-5)
    adv = A.sample_stats(plain.model, x, y, attack=SPEC)
    assert adv.adversarial and adv.pm.mean() < s.pm.mean()  # the attack lowers the margin


# ---------------------------------------------------------------------------------------------
# Fig. 5a: subsets
# ---------------------------------------------------------------------------------------------
def test_select_subsets_definitions():
    rng = np.random.default_rng(1)
    e = rng.normal(size=500)
    correct = rng.random(500) > 0.2
    sel = A.select_subsets(e, correct, 40, seed=0)
    idx = sel.indices
    assert set(idx) == set(A.SUBSETS)
    assert all(len(v) == 40 for v in idx.values())
    all_idx = np.concatenate(list(idx.values()))
    assert len(np.unique(all_idx)) == 120  # disjoint
    assert correct[idx["high-energy"]].all() and correct[idx["low-energy"]].all()
    assert not correct[idx["misclassified"]].any()
    cor_e = np.sort(e[correct])
    np.testing.assert_allclose(np.sort(e[idx["high-energy"]]), cor_e[-40:])
    np.testing.assert_allclose(np.sort(e[idx["low-energy"]]), cor_e[:40])
    assert sel.mean_energy["high-energy"] > sel.mean_energy_all > sel.mean_energy["low-energy"]
    # default size = the largest possible
    n_wrong = int((~correct).sum())
    assert A.select_subsets(e, correct).size == min(n_wrong, int(correct.sum()) // 2)
    # deterministic for a seed
    np.testing.assert_array_equal(A.select_subsets(e, correct, 40, seed=0).indices["misclassified"], idx["misclassified"])
    with pytest.raises(InputError, match="too large"):
        A.select_subsets(e, correct, n_wrong + 1)
    with pytest.raises(InputError, match="every training sample correctly"):
        A.select_subsets(e, np.ones(500, bool), 5)
    with pytest.raises(InputError, match="positive"):
        A.select_subsets(e, correct, 0)


def test_exclude_indices_file_in_load_splits(tmp_path):
    from core.train import TrainConfig, load_splits

    full, _ = load_splits(TrainConfig(dataset="digits"))
    drop = [0, 5, 17, len(full) - 1]
    f = tmp_path / "ex.json"
    f.write_text(json.dumps(drop))
    cut, _ = load_splits(TrainConfig(dataset="digits", exclude_indices_file=str(f)))
    assert len(cut) == len(full) - len(drop)
    keep = [i for i in range(len(full)) if i not in set(drop)]
    assert torch.equal(cut.x, full.x[keep]) and torch.equal(cut.y, full.y[keep])
    f.write_text(json.dumps({"indices": [1]}))
    assert len(load_splits(TrainConfig(dataset="digits", exclude_indices_file=str(f)))[0]) == len(full) - 1
    f.write_text(json.dumps([len(full)]))
    with pytest.raises(InputError, match="outside the training set"):
        load_splits(TrainConfig(dataset="digits", exclude_indices_file=str(f)))
    f.write_text("not json")
    with pytest.raises(InputError, match="cannot read"):
        load_splits(TrainConfig(dataset="digits", exclude_indices_file=str(f)))


def test_subset_selection_on_the_training_set(plain, tmp_path):
    base = A.base_train_config(plain, {"epochs": 1})
    assert base["dataset"] == "digits" and base["epochs"] == 1 and "out_dir" not in base
    sel = A.compute_subset_selection(plain, None, train_config=base)
    assert sel.n_train == 1438 and sel.size >= 1 and sel.n_misclassified >= sel.size
    files = A.write_subset_files(sel, tmp_path)
    assert json.loads(files["high-energy"].read_text()) == sel.indices["high-energy"].tolist()
    cfgs = A.subset_train_configs(files, base, include_baseline=True)
    assert set(cfgs) == {"high-energy", "low-energy", "misclassified", "none"}
    assert cfgs["none"]["exclude_indices_file"] is None
    from core.train import TrainConfig, load_splits

    cut, _ = load_splits(TrainConfig.from_dict(cfgs["misclassified"]))
    assert len(cut) == 1438 - sel.size
    with pytest.raises(InputError, match="unknown training option"):
        A.base_train_config(plain, {"epochz": 3})


def fake_train(config, run_dir, report):
    """Stand-in for core.train:run_job in the subset-job test (runs inside a job process)."""
    excl = config.get("exclude_indices_file")
    k = len(json.loads(Path(excl).read_text())) if excl else 0
    rob_err = {"none": 0.30}.get(config.get("name", "").rsplit("-", 1)[-1], 0.30 + k / 1000)
    with open(Path(run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 1, "rob_err": rob_err, "nat_err": 0.05}) + "\n")
    report(1.0, "done")
    return {"rob_err": rob_err}


@pytest.mark.slow
def test_run_subset_job_launches_one_training_job_per_subset(plain, runs_dir, monkeypatch):
    from core import jobs

    runs = runs_dir
    monkeypatch.setenv("ENERGYLENS_EXTRA_KINDS", json.dumps({"train": f"{Path(__file__).resolve()}:fake_train"}))
    run_dir = runs / "subset-test"
    run_dir.mkdir(parents=True)
    cfg = {"model": {"source": "bundled", "name": "digits-plain", "path": str(PLAIN)}, "size": 4,
           "train": {"epochs": 1}, "device": "cpu"}
    out = A.run_subset_job(cfg, run_dir, lambda f, m: None)
    assert set(out["jobs"]) == set(A.SUBSETS) and out["selection"]["size"] == 4
    assert (run_dir / "subset_experiment.json").is_file()
    for name, jid in out["jobs"].items():
        info = jobs.get_job(jid)
        assert info.kind == "train" and info.config["exclude_indices_file"].endswith(f"exclude_{name}.json")
    deadline = time.time() + 600  # bounds a hang only: three trainings queue on one CPU slot of a loaded machine
    rows = []
    while time.time() < deadline:
        rows = A.subset_comparison(out["jobs"])
        if all(r["status"] in ("done", "failed") for r in rows):
            break
        time.sleep(0.5)
    assert [r["status"] for r in rows] == ["done"] * 3, [jobs.read_log_tail(r["job"], 20) for r in rows]
    assert all(r["rob_err"] == pytest.approx(0.304) for r in rows)
    assert A.subset_comparison({"x": "no-such-job"})[0]["status"] == "missing"


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------
def test_extract_features_penultimate_and_logits(plain, small_batch, tiny_linear_model):
    x, _ = small_batch
    f = A.extract_features(plain.model, x)
    with torch.no_grad():
        want = plain.model.eval().features(x)
    assert f.shape == (24, 128) and f.dtype == np.float32
    np.testing.assert_allclose(f, want.numpy(), rtol=1e-5, atol=1e-5)
    lg = A.extract_features(plain.model, x, kind="logits", batch_size=10)
    np.testing.assert_allclose(lg, plain.model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    # a generic nn.Sequential: the input of its last Linear (after ReLU) has 32 features
    x8 = torch.rand(10, 3, 8, 8)
    f8 = A.extract_features(tiny_linear_model, x8)
    assert f8.shape == (10, 32) and (f8 >= 0).all()
    with pytest.raises(InputError, match="no nn.Linear"):
        A.extract_features(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()), x8)
    with pytest.raises(InputError, match="feature kind"):
        A.extract_features(plain.model, x, kind="nope")
    # hooks are removed afterwards
    assert all(not m._forward_hooks for m in plain.model.modules())


def test_stack_groups(small_batch):
    x, _ = small_batch
    allx, grp = A.stack_groups({"natural": x[:5], "adversarial": x[:3].numpy(), "generated": None})
    assert allx.shape[0] == 8 and list(grp) == ["natural"] * 5 + ["adversarial"] * 3
    with pytest.raises(InputError, match="different shapes"):
        A.stack_groups({"a": x[:2], "b": torch.rand(2, 3, 8, 8)})
    with pytest.raises(InputError, match="no images"):
        A.stack_groups({})


def test_pca_2d_of_2000_points_is_correct():
    # (its speed is a benchmark's question: a test must pass on a loaded machine exactly as on a fast one)
    rng = np.random.default_rng(0)
    base = rng.normal(size=(2000, 2)) * [5.0, 2.0]
    mix = np.linalg.qr(rng.normal(size=(128, 128)))[0][:2]
    feats = base @ mix + 0.01 * rng.normal(size=(2000, 128))
    z = A.pca_2d(feats)
    assert z.shape == (2000, 2)
    assert z[:, 0].var() > z[:, 1].var()
    from sklearn.decomposition import PCA

    ref = PCA(2).fit_transform(feats)
    for k in range(2):
        assert abs(np.corrcoef(z[:, k], ref[:, k])[0, 1]) > 0.9999
    assert np.array_equal(A.pca_2d(feats), z)  # deterministic signs
    wide = rng.normal(size=(50, 300))  # more dimensions than points
    assert A.pca_2d(wide).shape == (50, 2)
    with pytest.raises(InputError):
        A.pca_2d(np.ones((2, 4)))
    with pytest.raises(InputError):
        A.pca_2d(np.full((5, 3), np.nan))


@pytest.mark.slow
def test_umap_2d_small_set():
    rng = np.random.default_rng(0)
    feats = np.concatenate([rng.normal(0, 1, (60, 16)), rng.normal(8, 1, (60, 16))])
    secs = A.warm_umap()
    assert A.umap_state()["state"] == "warm" and secs >= 0
    assert A.warm_umap() == 0.0  # only once per process
    z = A.umap_2d(feats, seed=0)
    assert z.shape == (120, 2) and np.isfinite(z).all()
    # the two blobs stay apart
    gap = np.linalg.norm(z[:60].mean(0) - z[60:].mean(0))
    spread = max(z[:60].std(0).max(), z[60:].std(0).max())
    assert gap > 2 * spread
    with pytest.raises(InputError, match="at least 4"):
        A.umap_2d(feats[:3])


def test_umap_time_promise_comes_from_what_this_machine_measured(tmp_path, monkeypatch):
    """Issue 17: the page's UMAP promise is computed from n and the last measured warm-up and fit, not a fixed
    '~10-30 s'; before any measurement it uses the documented fallbacks."""
    monkeypatch.setenv("ENERGYLENS_CACHE", str(tmp_path / "cache"))
    e = A.umap_estimate(1000, state="cold")
    assert not e["measured"] and e["warmup_s"] == A.UMAP_WARMUP_FALLBACK_S
    assert e["fit_s"] == pytest.approx(A.UMAP_FIT_1000_FALLBACK_S)
    A.record_umap_timing(warmup_s=12.0)
    A.record_umap_timing(fit_n=500, fit_s=1.0)
    assert A.umap_timings() == {"warmup_s": 12.0, "fit_n": 500, "fit_s": 1.0}
    e = A.umap_estimate(2000, state="cold")
    assert e["measured"] and e["warmup_s"] == 12.0 and e["fit_s"] == pytest.approx(4 ** A.UMAP_FIT_EXPONENT)
    assert A.umap_estimate(500, state="warm")["seconds"] == pytest.approx(1.0)        # warm: the fit only
    (tmp_path / "cache" / "umap-timings.json").write_text("{broken")       # unreadable: back to the fallbacks
    assert A.umap_timings()["fit_s"] is None and not A.umap_estimate(10, state="warm")["measured"]


def test_a_warm_umap_fit_records_its_time(tmp_path, monkeypatch):
    monkeypatch.setenv("ENERGYLENS_CACHE", str(tmp_path / "cache"))
    A.warm_umap()
    feats = np.random.default_rng(0).normal(size=(120, 8)).astype(np.float32)
    A.umap_2d(feats, seed=0)
    t = A.umap_timings()
    assert t["fit_n"] == 120 and 0 < t["fit_s"] < 600
