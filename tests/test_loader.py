"""Batch prefetching (core.data.loader) and the trainer's speed settings (loader threads, torch.compile
with its eager fallback, CPU threads): none of them may change what is trained."""

from __future__ import annotations

import threading

import pytest
import torch

import core.train as train_mod
from core.data.loader import prefetch_batches
from core.errors import InputError
from core.train import TrainConfig, train


def _data(n=50):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=g), torch.arange(n) % 7


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_prefetched_batches_are_the_plain_loops_in_order(workers):
    x, y = _data()
    batches = [torch.randperm(50, generator=torch.Generator().manual_seed(i))[:8] for i in range(9)]
    got = list(prefetch_batches(x, y, batches, "cpu", workers=workers, depth=3))
    assert len(got) == 9
    for idx, (xb, yb) in zip(batches, got):
        assert torch.equal(xb, x[idx]) and torch.equal(yb, y[idx])


def test_stopping_early_or_a_failing_gather_leaves_no_loader_thread():
    x, y = _data()
    before = {t.name for t in threading.enumerate()}
    gen = prefetch_batches(x, y, [torch.arange(4)] * 20, "cpu", workers=2, depth=4)
    next(gen)
    gen.close()
    bad = [torch.arange(4), torch.tensor([999])]  # out of range: the gather fails in a worker
    with pytest.raises(IndexError):
        list(prefetch_batches(x, y, bad, "cpu", workers=2))
    leftover = {t.name for t in threading.enumerate() if t.name.startswith("energylens-loader")} - before
    assert not leftover


TINY = dict(dataset="digits", arch="smallcnn", batch_size=64, train_limit=256, attack_steps=1, eval_samples=32,
            eval_steps=1, probe_size=16, lr=0.05, epochs=2, method="trades")


def _weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "last.safetensors"))


def test_loader_threads_do_not_change_the_trained_weights(tmp_path):
    a = tmp_path / "inline"
    b = tmp_path / "threads"
    train(TrainConfig(**TINY, loader_workers=0, out_dir=str(a)))
    train(TrainConfig(**TINY, loader_workers=3, out_dir=str(b)))
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_compile_failure_falls_back_to_eager_with_the_same_result(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}

    def broken_compile(model, *a, **kw):
        def fn(x):
            calls["n"] += 1
            raise RuntimeError("no C++ compiler found")
        return fn

    monkeypatch.setattr(torch, "compile", broken_compile)
    rec = train(TrainConfig(**TINY, compile=True, out_dir=str(tmp_path / "c")))
    assert calls["n"] == 1, "after the first failure the compiled path is not tried again"
    assert rec["compile"].startswith("torch.compile failed (RuntimeError: no C++ compiler found)")
    assert "continued eagerly" in capsys.readouterr().err
    train(TrainConfig(**TINY, out_dir=str(tmp_path / "e")))
    wc, we = _weights(tmp_path / "c"), _weights(tmp_path / "e")
    assert all(torch.equal(wc[k], we[k]) for k in wc)


def test_compiled_forward_is_used_for_the_training_forwards(tmp_path, monkeypatch):
    seen = {"n": 0}

    def counting_compile(model, *a, **kw):
        def fn(x):
            seen["n"] += 1
            assert model.training, "the compiled forward is for train-mode forwards only"
            return model(x)
        return fn

    monkeypatch.setattr(torch, "compile", counting_compile)
    rec = train(TrainConfig(**TINY, compile=True, out_dir=str(tmp_path / "c")))
    # TRADES: natural and adversarial forwards, 4 batches x 2 epochs
    assert seen["n"] == 2 * 4 * 2 and rec["compile"] == "torch.compile on"
    # checkpoints hold the module's own keys (no '_orig_mod.' prefix from a compiled wrapper)
    assert all(not k.startswith("_orig_mod") for k in _weights(tmp_path / "c"))


def test_threads_setting_and_validation(tmp_path):
    old = torch.get_num_threads()
    try:
        train(TrainConfig(**{**TINY, "epochs": 1}, threads=1, out_dir=str(tmp_path / "t")))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)
    for kw, msg in (({"threads": 0}, "threads must be an integer"), ({"loader_workers": -1}, "loader workers must"),
                    ({"loader_workers": 1.5}, "loader workers must")):
        with pytest.raises(InputError, match=msg):
            TrainConfig(**kw).validate()
    assert train_mod.build_parser().parse_args(["--compile", "--loader-workers", "0", "--threads", "2"]).compile


def test_real_torch_compile_trains_like_eager(tmp_path):
    """The real compiler (inductor; ~30 s on a 2-core CPU). Where it cannot run, the fallback must kick in."""
    cfg = {**TINY, "epochs": 1}
    rc = train(TrainConfig(**cfg, compile=True, out_dir=str(tmp_path / "c")))
    re_ = train(TrainConfig(**cfg, out_dir=str(tmp_path / "e")))
    assert rc["compile"] == "torch.compile on" or "continued eagerly" in rc["compile"]
    wc, we = _weights(tmp_path / "c"), _weights(tmp_path / "e")
    assert all(torch.isfinite(wc[k].float()).all() for k in wc)
    # the same training up to kernel rounding
    assert abs(rc["train_loss"] - re_["train_loss"]) <= 1e-3 * abs(re_["train_loss"]) + 1e-4
    worst = max(float((wc[k].float() - we[k].float()).abs().max()) for k in wc if wc[k].is_floating_point())
    assert worst < 1e-3, worst
