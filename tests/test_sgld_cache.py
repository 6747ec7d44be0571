"""core.sgld_cache: reference energies and start statistics computed once per (model, dataset), shared by threads."""

from __future__ import annotations

import threading

import pytest
import torch

from core import sampling, sgld_cache
from core.data import load_dataset
from core.models import build_model


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("ENERGYLENS_CACHE", str(tmp_path / "cache"))
    sgld_cache.clear_memory()
    calls = []
    real = sgld_cache.reference_energies

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(sgld_cache, "reference_energies", counting)
    yield tmp_path / "cache", calls
    sgld_cache.clear_memory()


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model("smallcnn", 10).eval()


def _digits():
    return load_dataset("digits", "test")


def test_reference_energies_are_computed_once_then_read_from_memory_and_disk(fresh):
    cache, calls = fresh
    model, ds = _model(), _digits()
    want = sampling.reference_energies(model, ds, None)
    got = sgld_cache.reference_energies_cached(model, ds)
    assert got.keys() == want.keys()
    for c in want:
        assert got[c]["joint"] == pytest.approx(want[c]["joint"]) and got[c]["n"] == want[c]["n"]
    assert sgld_cache.reference_energies_cached(model, ds, [3, 1]) == {3: got[3], 1: got[1]}   # a lookup
    assert len(calls) == 1
    files = list(cache.glob("sgldref-*.json"))
    assert len(files) == 1
    sgld_cache.clear_memory()                                   # a restart: read back from disk, not recomputed
    again = sgld_cache.reference_energies_cached(model, ds)
    assert len(calls) == 1 and again[5]["joint"] == pytest.approx(got[5]["joint"])
    files[0].write_text("{not json")                            # a corrupt file is recomputed, never trusted
    sgld_cache.clear_memory()
    sgld_cache.reference_energies_cached(model, ds)
    assert len(calls) == 2
    other = _model(seed=1)                                      # other weights: another key
    assert sgld_cache.cache_key(other, ds) != sgld_cache.cache_key(model, ds)
    assert sgld_cache.reference_energies_cached(other, ds)[0]["joint"] != pytest.approx(got[0]["joint"])
    assert len(calls) == 3
    with pytest.raises(Exception, match="class 42"):
        sgld_cache.reference_energies_cached(model, ds, [42])


def test_concurrent_callers_share_one_computation(fresh):
    _, calls = fresh
    model, ds = _model(), _digits()
    out = [None] * 4
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, sgld_cache.reference_energies_cached(model, ds)))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(calls) == 1 and all(o == out[0] for o in out)


def test_warm_up_runs_once_per_model_and_dataset_and_prepares_everything(fresh):
    cache, calls = fresh
    model, ds = _model(), _digits()
    stats = sampling.ClassStats(ds)
    w = sgld_cache.warm_up(model, ds, stats)
    assert sgld_cache.warm_up(model, ds, stats) is w            # a second session shares the same handle
    seen = []
    assert w.wait(timeout=120, progress=lambda f, m: seen.append((f, m)))
    assert w.done and w.error is None and w.fraction == 1.0 and w.seconds > 0
    assert stats.computed == len(stats.available) == 10
    assert sgld_cache.reference_ready(model, ds) and len(calls) == 1
    assert len(list(cache.glob("classstats-*.npz"))) == 10
    assert all(0 <= f <= 1 for f, _ in seen)
    # the sampler now starts without computing anything
    s = sampling.SGLDSampler(model, [0, 1], 2, init="pca", seed=0, stats=stats)
    assert s.n_chains == 4 and stats.computed == 10


def test_warm_up_reports_a_failure_on_its_handle(fresh, monkeypatch):
    model, ds = _model(), _digits()

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(sgld_cache, "reference_energies", boom)
    w = sgld_cache.warm_up(model, ds, sampling.ClassStats(ds))
    assert w.wait(timeout=120)
    assert w.done and "disk on fire" in w.error
    assert sgld_cache.warm_up(model, ds) is w                   # not retried on every page rerun ...
    monkeypatch.setattr(sgld_cache, "RETRY_AFTER_S", 0.0)
    retry = sgld_cache.warm_up(model, ds)
    assert retry is not w                                       # ... but retried later, not cached
    assert retry.wait(timeout=120) and retry.error                # (still failing here)


def _poison(d: dict, how: str) -> str:
    import json

    cls = d["classes"]
    if how == "nan":
        cls["1"]["joint"] = float("nan")
    elif how == "1e308":
        cls["2"]["marginal"] = -1e308
    elif how == "negative count":
        cls["3"]["n"] = -5
    elif how == "other count":
        cls["3"]["n"] += 1
    elif how == "extra class":
        cls["10"] = dict(cls["0"])
    elif how == "missing class":
        del cls["1"]
    elif how == "marginal above joint":
        cls["4"]["marginal"] = cls["4"]["joint"] + 5.0
    elif how == "count of the wrong kind":
        cls["5"]["n"] = True
    elif how == "100k deep":
        return "[" * 100_000 + "]" * 100_000
    return json.dumps(d)


@pytest.mark.parametrize("how", ["nan", "1e308", "negative count", "other count", "extra class", "missing class",
                                 "marginal above joint", "count of the wrong kind", "100k deep"])
def test_a_poisoned_reference_file_is_recomputed_not_used(fresh, how):
    import json

    cache, calls = fresh
    model, ds = _model(), _digits()
    good = sgld_cache.reference_energies_cached(model, ds)
    (f,) = cache.glob("sgldref-*.json")
    f.write_text(_poison(json.loads(f.read_text()), how))
    sgld_cache.clear_memory()
    got = sgld_cache.reference_energies_cached(model, ds)      # never a RecursionError, never the poisoned values
    assert len(calls) == 2, "recomputed"
    assert got.keys() == good.keys()
    for c in good:
        assert got[c]["joint"] == pytest.approx(good[c]["joint"]) and got[c]["n"] == good[c]["n"]
    assert sgld_cache.reference_energies_cached(model, ds, [1])[1] == got[1]   # class 1 is there
    if how == "100k deep":  # the warm-up (which read it first) succeeds too
        f.write_text(_poison({"classes": {}}, how))
        sgld_cache.clear_memory()
        w = sgld_cache.warm_up(model, ds)
        assert w.wait(300) and w.error is None, w.error
