"""The trainer: input validation, the NaN guard, the CLI and its files, config-file parity, resume,
and — the point of it all — that adversarial training really buys robustness on small data."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import core.train as train_mod
import core.training.step as step_mod
from core.data import load_dataset
from core.errors import InputError
from core.models import load_checkpoint, read_metadata
from core.train import TrainConfig, TrainingStopped, config_from_args, evaluate, load_splits, main, train

REPO = Path(__file__).resolve().parents[1]

# a tiny but complete run: 4 batches per epoch on the embedded digits
# measure_every=1: these tests read every epoch's held-out accuracy (the default evaluates every k epochs, k chosen
# from measured times: tests/test_measure_every.py)
TINY = dict(dataset="digits", arch="smallcnn", batch_size=64, train_limit=256, attack_steps=1, eval_samples=32,
            eval_steps=1, probe_size=16, lr=0.05, measure_every=1)

METRIC_KEYS = {"epoch", "lr", "nat_acc", "pgd_acc", "nat_err", "rob_err", "train_time", "probe_time",
               "train_ce", "train_kl", "train_loss", "E_nat_mean", "E_adv_mean", "probe_nat_acc", "probe_adv_acc",
               *(f"{p}_{s}" for p in ("dE", "dEy") for s in ("mean", "std", "q10", "q25", "q50", "q75", "q90"))}
PROBE_KEYS = {"e_nat", "e_adv", "ej_nat", "ej_adv", "correct_nat", "correct_adv", "labels", "indices", "w_probe"}


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core.train", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------
# validation
@pytest.mark.parametrize("kwargs,msg", [
    ({"eps": -0.01}, "epsilon must lie in"),
    ({"eps": float("nan")}, "epsilon must lie in"),
    ({"beta": -1.0, "method": "trades"}, "beta must be >= 0"),
    ({"lr": -0.1}, "lr must be a finite number >= 0"),
    ({"lr": float("inf")}, "lr must be a finite number >= 0"),
    ({"lr": 0.0}, "learning rate must be > 0"),
    ({"epochs": 0}, "epochs must be a positive integer"),
    ({"epochs": 2.5}, "epochs must be a positive integer"),
    ({"batch_size": 0}, "batch size must be a positive integer"),
    ({"step_size": 0.0}, "step size must be > 0"),
    ({"schedule": "exp"}, "schedule must be one of"),
    ({"method": "nope"}, "unknown training method"),
    ({"device": "tpu"}, "device must be"),
])
def test_validate_rejects_bad_values(kwargs, msg):
    with pytest.raises(InputError, match=msg):
        TrainConfig(**kwargs).validate()


def test_validate_batch_larger_than_dataset(tmp_path):
    with pytest.raises(InputError, match="batch size 2000 is larger than the training set \\(1438 images\\)"):
        TrainConfig(batch_size=2000).validate(n_train=1438)
    TrainConfig(batch_size=1438).validate(n_train=1438)  # equal is fine
    # through train(): rejected before anything is written
    out = tmp_path / "run"
    with pytest.raises(InputError, match="larger than the training set"):
        train(TrainConfig(**{**TINY, "batch_size": 300}, epochs=1, out_dir=str(out)))
    assert not (out / "config.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_validate_cuda_without_gpu(tmp_path):
    with pytest.raises(InputError, match="CUDA was requested but no GPU is available"):
        TrainConfig(device="cuda").validate()
    with pytest.raises(InputError, match="no GPU"):
        TrainConfig(device="cuda:1").validate()
    TrainConfig(device="cpu").validate()
    TrainConfig(device="auto").validate()


def test_unknown_option_in_config_file(tmp_path, capsys):
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({"method": "sat", "epochz": 3, "learning_rate": 0.1}))
    with pytest.raises(InputError, match="unknown training option\\(s\\): epochz, learning_rate"):
        config_from_args(["--config", str(cfg_file)])
    # the CLI turns it into a one-line error and exit status 2, no traceback
    assert main(["--config", str(cfg_file), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown training option(s): epochz") and "Traceback" not in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="cannot read config file"):
        config_from_args(["--config", str(bad)])


def test_config_file_and_flags_agree(tmp_path):
    flags = ["--method", "weat-adv", "--epochs", "3", "--batch-size", "32", "--lr", "0.02", "--eps", "0.05",
             "--beta", "4.5", "--no-augment", "--weight-norm", "sum", "--train-limit", "100", "--out-dir", "x"]
    from_flags = config_from_args(flags)
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"method": "weat-adv", "epochs": 3, "batch_size": 32, "lr": 0.02, "eps": 0.05,
                             "beta": 4.5, "augment": False, "weight_norm": "sum", "train_limit": 100, "out_dir": "x"}))
    from_file = config_from_args(["--config", str(f)])
    assert from_file == from_flags
    assert from_flags.augment is False and from_flags.eps == 0.05 and from_flags.train_limit == 100
    # flags override the file; unspecified flags keep the file's value
    over = config_from_args(["--config", str(f), "--epochs", "7", "--augment"])
    assert over.epochs == 7 and over.augment is True and over.beta == 4.5
    # a config.json written by a run is itself a valid --config file
    g = tmp_path / "written.json"
    g.write_text(json.dumps(from_flags.to_dict()))
    assert config_from_args(["--config", str(g)]) == from_flags


# ------------------------------------------------------------------------------------------------
# the default probe set: sized to the training set so that probing stays a small share of the epoch
@pytest.mark.parametrize("n_train,k,expected", [
    (50_000, 10, 256),    # CIFAR-10: capped
    (4_000, 10, 120),     # 3%
    (1_946, 10, 58),      # the bench/bench_train.py overhead set
    (500, 10, 40),        # floor of 4 per class
    (100_000, 200, 256),  # Tiny-ImageNet: the cap beats the per-class floor
    (30, 10, 30),         # never more than the training set
])
def test_auto_probe_size(n_train, k, expected):
    assert train_mod.auto_probe_size(n_train, k) == expected


def test_default_probe_size_is_resolved_and_recorded(tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(**{**TINY, "probe_size": None, "train_limit": 1_000}, method="plain", epochs=1, out_dir=str(out))
    rec = train(cfg)
    n_train = len(load_splits(cfg)[0])
    expected = train_mod.auto_probe_size(n_train, 10)
    assert expected == 40 and rec["probe_size"] == expected
    with np.load(out / "probe" / "epoch_0001.npz") as z:
        assert len(z["indices"]) == expected and len(np.unique(z["indices"])) == expected
        assert np.bincount(z["labels"], minlength=10).min() == 4  # class-balanced
    assert read_metadata(out / "last.safetensors").hparams["probe_size"] == expected
    with pytest.raises(InputError, match="probe size must be a positive integer"):
        TrainConfig(probe_size=0).validate()


# ------------------------------------------------------------------------------------------------
# NaN guard
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real = step_mod.outer_loss

    def nan_in_epoch_2(cfg, ln, la, y, *, epoch=0, **kw):
        lt = real(cfg, ln, la, y, epoch=epoch, **kw)
        if epoch == 1:
            lt.loss = lt.loss * float("nan")
        return lt

    monkeypatch.setattr(step_mod, "outer_loss", nan_in_epoch_2)
    out = tmp_path / "run"
    cfg = TrainConfig(**{**TINY, "method": "plain"}, epochs=3, out_dir=str(out))
    with pytest.raises(TrainingStopped, match="loss became nan at epoch 2, batch 1.*smaller learning rate"):
        train(cfg)
    meta = read_metadata(out / "last.safetensors")
    assert meta.epoch == 1
    assert [r["epoch"] for r in _lines(out / "metrics.jsonl")] == [1]
    loaded = load_checkpoint(out / "last.safetensors")
    assert all(torch.isfinite(t).all() for t in loaded.model.state_dict().values() if t.is_floating_point())
    st = torch.load(out / "state.pt", weights_only=True)
    assert st["epoch"] == 1
    sd = loaded.model.state_dict()
    assert all(torch.equal(sd[k], st["model"][k]) for k in sd)
    # it is the model the epoch-1 metrics were measured on
    ds = load_dataset("digits", "test")
    ev = evaluate(loaded.model, ds.images(torch.arange(32)), ds.labels(torch.arange(32)), 0.0, 0.0, 1)
    assert ev["nat_acc"] == pytest.approx(_lines(out / "metrics.jsonl")[0]["nat_acc"])


def test_exploding_learning_rate_stops_without_bad_checkpoints(tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(**{**TINY, "method": "plain", "lr": 1e12, "schedule": "constant"}, epochs=3, out_dir=str(out))
    with pytest.raises(TrainingStopped, match="smaller learning rate"):
        train(cfg)
    for name in ("last.safetensors", "best.safetensors"):
        if (out / name).exists():  # whatever was written is finite
            assert all(torch.isfinite(t).all() for t in _weights(out / name).values() if t.is_floating_point())


# ------------------------------------------------------------------------------------------------
# the CLI and what it writes
CLI_ARGS = ["--method", "sat", "--dataset", "digits", "--epochs", "2", "--batch-size", "64", "--train-limit", "256",
            "--attack-steps", "2", "--eval-samples", "48", "--eval-steps", "2", "--probe-size", "20", "--lr", "0.05",
            "--name", "cli-sat", "--measure-every", "1"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    p = _cli(*CLI_ARGS, "--out-dir", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p


def test_cli_writes_config_metrics_probes_checkpoints(cli_run):
    out, p = cli_run
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(summary) == {"epoch", "nat_acc", "pgd_acc", "dE_mean", "dEy_mean"} and summary["epoch"] == 2

    cfg = json.loads((out / "config.json").read_text())
    assert cfg == {**TrainConfig().to_dict(), **config_from_args(CLI_ARGS + ["--out-dir", str(out)]).to_dict()}

    recs = _lines(out / "metrics.jsonl")
    assert [r["epoch"] for r in recs] == [1, 2]
    for r in recs:
        assert METRIC_KEYS <= set(r), METRIC_KEYS - set(r)
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in r.values())
        assert 0 <= r["pgd_acc"] <= r["nat_acc"] <= 1
        assert r["nat_err"] == pytest.approx(1 - r["nat_acc"]) and r["rob_err"] == pytest.approx(1 - r["pgd_acc"])
        assert r["dE_q10"] <= r["dE_q50"] <= r["dE_q90"]
        assert r["train_ce"] > 0 and r["train_kl"] == 0.0  # SAT has no KL term
    assert summary["pgd_acc"] == recs[-1]["pgd_acc"] and summary["dE_mean"] == recs[-1]["dE_mean"]

    for e, r in zip((1, 2), recs):
        with np.load(out / "probe" / f"epoch_{e:04d}.npz") as z:
            assert set(z.files) == PROBE_KEYS
            assert all(len(z[k]) == 20 for k in PROBE_KEYS)
            # the logged statistics are those of the saved vectors
            assert r["dE_mean"] == pytest.approx(float(np.mean(z["e_nat"] - z["e_adv"])), rel=1e-5, abs=1e-6)
            assert r["dEy_mean"] == pytest.approx(float(np.mean(z["ej_nat"] - z["ej_adv"])), rel=1e-5, abs=1e-6)
            assert r["probe_adv_acc"] == pytest.approx(float(z["correct_adv"].mean()))
            # probe indices are a fixed set of training samples, with their labels
            ds = load_dataset("digits", "train")
            assert np.array_equal(ds.y[torch.as_tensor(z["indices"])].numpy(), z["labels"])
            w = 1 / np.log1p(np.exp(np.abs(z["e_nat"].astype(np.float64))))
            np.testing.assert_allclose(z["w_probe"], w, rtol=1e-4)

    last, best = read_metadata(out / "last.safetensors"), read_metadata(out / "best.safetensors")
    assert (last.arch, last.dataset, last.method, last.num_classes, last.epoch, last.name) == \
        ("smallcnn", "digits", "sat", 10, 2, "cli-sat")
    assert last.hparams["eps"] == pytest.approx(16 / 255) and last.hparams["loss"]["outer"] == "adv"
    assert last.metrics["pgd_acc"] == recs[-1]["pgd_acc"] and last.metrics["dE_mean"] == recs[-1]["dE_mean"]
    best_epoch = max(recs, key=lambda r: r["pgd_acc"])["epoch"]  # first epoch with the highest PGD accuracy
    assert best.epoch == best_epoch and best.metrics["pgd_acc"] == max(r["pgd_acc"] for r in recs)
    m = load_checkpoint(out / "last.safetensors").model
    assert not m.training
    assert not (out / "rank1").exists() and (out / "state.pt").exists()


def test_cli_config_file_gives_the_same_run(cli_run, tmp_path):
    out, _ = cli_run
    cfg = json.loads((out / "config.json").read_text())
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({**cfg, "out_dir": str(tmp_path / "from-file")}))
    p = _cli("--config", str(cfg_file))
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = _weights(out / "last.safetensors"), _weights(tmp_path / "from-file" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = _lines(out / "metrics.jsonl"), _lines(tmp_path / "from-file" / "metrics.jsonl")
    assert [r["dE_mean"] for r in ra] == [r["dE_mean"] for r in rb]


def test_cli_bad_input_exits_2_with_message(tmp_path):
    p = _cli("--method", "sat", "--eps", "-1", "--out-dir", str(tmp_path / "o"), timeout=120)
    assert p.returncode == 2 and "error: epsilon must lie in [0, 1]" in p.stderr and "Traceback" not in p.stderr


# ------------------------------------------------------------------------------------------------
# resume
def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    base = dict(**{**TINY, "method": "trades", "attack_steps": 2}, epochs=3)
    ref = tmp_path / "ref"
    train(TrainConfig(**base, out_dir=str(ref)))

    run = tmp_path / "run"
    calls = {"n": 0}

    def stop_mid_epoch_2() -> bool:  # 4 batches per epoch: the 6th call is in epoch 2
        calls["n"] += 1
        return calls["n"] == 6

    with pytest.raises(TrainingStopped, match="stopped on request"):
        train(TrainConfig(**base, out_dir=str(run)), should_stop=stop_mid_epoch_2)
    assert torch.load(run / "state.pt", weights_only=True)["epoch"] == 1
    assert [r["epoch"] for r in _lines(run / "metrics.jsonl")] == [1]

    rec = train(TrainConfig(**base, out_dir=str(run), resume=True))
    assert rec["epoch"] == 3
    a, b = _weights(ref / "last.safetensors"), _weights(run / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed run must reproduce the uninterrupted one"
    ra, rb = _lines(ref / "metrics.jsonl"), _lines(run / "metrics.jsonl")
    assert [r["epoch"] for r in rb] == [1, 2, 3]
    for x, y in zip(ra, rb):
        for k in ("nat_acc", "pgd_acc", "dE_mean", "dEy_mean", "train_loss", "lr"):
            assert x[k] == y[k], (k, x["epoch"])
    # resuming a finished run does nothing and keeps its files
    assert train(TrainConfig(**base, out_dir=str(run), resume=True)) == {}
    assert len(_lines(run / "metrics.jsonl")) == 3


# ------------------------------------------------------------------------------------------------
# adversarial training works
ROBUST = dict(dataset="digits", arch="smallcnn", epochs=4, batch_size=64, train_limit=768, lr=0.1,
              attack_steps=2, step_size=8 / 255, eval_samples=64, eval_steps=2, probe_size=32, seed=0)


def _robustness(tmp_path, method: str, **kw) -> dict:
    out = tmp_path / method
    rec = train(TrainConfig(**{**ROBUST, **kw}, method=method, out_dir=str(out)))
    model = load_checkpoint(out / "last.safetensors").model
    cfg = TrainConfig(**{**ROBUST, **kw}, method=method)
    _, val = load_splits(cfg)
    n = min(200, len(val))
    eps = cfg.resolved_eps()
    ev = evaluate(model, val.images(torch.arange(n)), val.labels(torch.arange(n)), eps, eps / 4, 10)
    return {**ev, "dE_mean": rec["dE_mean"], "dEy_mean": rec["dEy_mean"]}


def test_adversarial_training_improves_robustness_on_digits(tmp_path):
    """Same data, model, epochs and optimiser; held-out PGD-10 at eps 16/255 (digits test split)."""
    res = {m: _robustness(tmp_path, m) for m in ("plain", "sat", "trades")}
    print("\n[digits robustness] " + json.dumps({m: {k: round(v, 4) for k, v in r.items()} for m, r in res.items()}))
    plain, sat, trades = res["plain"], res["sat"], res["trades"]
    assert plain["nat_acc"] > 0.8                      # the budget suffices to learn the task
    assert sat["nat_acc"] > 0.6 and trades["nat_acc"] > 0.6
    assert sat["pgd_acc"] > plain["pgd_acc"] + 0.20    # far above the plain model
    assert trades["pgd_acc"] > plain["pgd_acc"] + 0.15
    assert plain["pgd_acc"] < 0.5 * plain["nat_acc"]   # the attack is real: it breaks the plain model


@pytest.mark.slow
def test_adversarial_training_improves_robustness_on_real_cifar(tmp_path, cifar_subset):
    x, y = cifar_subset
    n = 1600
    path = tmp_path / "cifar.npz"
    np.savez(path, x=x[:n], y=y[:n])
    kw = dict(dataset=f"npz:{path}", eps=8 / 255, step_size=4 / 255, val_fraction=0.125, epochs=3, train_limit=None)
    res = {m: _robustness(tmp_path, m, **kw) for m in ("plain", "sat")}
    print("\n[cifar robustness] " + json.dumps({m: {k: round(v, 4) for k, v in r.items()} for m, r in res.items()}))
    assert res["plain"]["nat_acc"] > 0.2 and res["sat"]["nat_acc"] > 0.2   # both learned something (chance 0.1)
    assert res["sat"]["pgd_acc"] > res["plain"]["pgd_acc"] + 0.05


# ------------------------------------------------------------------------------------------------ Fig. 3 recipe
def test_train_per_class_takes_the_first_images_of_each_class():
    full, _ = load_splits(TrainConfig(dataset="digits"))
    sub, _ = load_splits(TrainConfig(dataset="digits", train_per_class=7))
    assert len(sub) == 70 and np.bincount(sub.y.numpy(), minlength=10).tolist() == [7] * 10
    for c in range(10):                                     # the first 7 of class c, in the dataset's order
        assert torch.equal(sub.x[sub.y == c], full.x[full.class_indices(c)[:7]])


@pytest.mark.parametrize("kwargs, msg", [
    ({"train_per_class": 0}, "train per class"), ({"train_per_class": 2.5}, "train per class"),
    ({"width": 0}, "width"), ({"width": 16, "arch": "resnet18"}, "width applies to"),
])
def test_fig3_options_are_validated(kwargs, msg):
    with pytest.raises(InputError, match=msg):
        TrainConfig(dataset="digits", **kwargs).validate()


def test_width_reaches_the_model_and_its_checkpoint(tmp_path):
    cfg = TrainConfig(dataset="digits", arch="demonet", width=8, train_per_class=13, epochs=1, batch_size=64,
                      attack_steps=1, eval_samples=32, eval_steps=1, out_dir=str(tmp_path / "run"), augment=False)
    train(cfg)
    lm = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert lm.meta.arch_kwargs == {"width": 8}
    assert lm.model.features[0].out_channels == 8          # DemoNet's first conv has `width` channels
    n_params = sum(p.numel() for p in lm.model.parameters())
    from core.models import build_model
    assert n_params == sum(p.numel() for p in build_model("demonet", 10, width=8).parameters())


def test_gpu_fast_path_flags_run_on_a_cpu(tmp_path):
    """The GPU rows' code paths (channels-last, bf16 autocast) stay exercised where no GPU is lent: channels-last
    training on a CPU reaches the same weights up to float rounding, and the autocast flag is a no-op off CUDA."""
    runs = {}
    for name, kw in (("plain", {}), ("cl", {"channels_last": True}), ("amp", {"amp": True})):
        out = tmp_path / name
        train(TrainConfig(**TINY, epochs=1, out_dir=str(out), **kw))
        runs[name] = _weights(out / "last.safetensors")
    assert all(torch.equal(runs["plain"][k], runs["amp"][k]) for k in runs["plain"])
    for k, v in runs["plain"].items():
        torch.testing.assert_close(runs["cl"][k].contiguous(), v, rtol=1e-3, atol=1e-3, msg=k)
