"""Measuring cheaply (issue 25): the held-out evaluation every k epochs and at the last, k chosen from the first
epoch's measured costs by default; the probe Delta E every epoch; the evaluation does not change the training."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from core.errors import InputError
from core.train import TrainConfig, train
from core.training.config import MEASURE_SHARE
from core.training.measure import auto_measure_every, estimate_eval_time, evaluate, measure_due, measurement_cost

TINY = dict(dataset="digits", arch="smallcnn", batch_size=64, train_limit=256, attack_steps=1, eval_samples=32,
            eval_steps=1, probe_size=16, lr=0.05, method="sat")
HELD_OUT = ("nat_acc", "pgd_acc", "nat_err", "rob_err")


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _share(train_s: float, eval_s: float, probe_s: float, k: int) -> float:
    m = eval_s / k + probe_s
    return m / (train_s + m)


@pytest.mark.parametrize("train_s,eval_s,probe_s", [
    (10.0, 1.0, 0.2), (10.0, 17.0, 0.4), (3.0, 5.1, 0.1), (1.0, 0.333, 0.0), (100.0, 340.0, 3.0), (2.0, 0.0, 0.0)])
def test_auto_period_is_the_smallest_that_keeps_measuring_within_its_share(train_s, eval_s, probe_s):
    k = auto_measure_every(train_s, eval_s, probe_s, epochs=1000)
    assert k >= 1
    assert _share(train_s, eval_s, probe_s, k) <= MEASURE_SHARE + 1e-12
    if k > 1:  # one epoch shorter would cost more than the share
        assert _share(train_s, eval_s, probe_s, k - 1) > MEASURE_SHARE


def test_auto_period_when_the_probe_alone_exceeds_the_share():
    # nothing but evaluating first and last keeps within the share: the period is the run's length
    assert auto_measure_every(1.0, 5.0, 1.0, epochs=12) == 12
    assert auto_measure_every(1.0, 50.0, 0.0, epochs=7) == 7  # capped at the number of epochs


@pytest.mark.parametrize("every,epochs,expected", [(1, 4, [1, 2, 3, 4]), (3, 8, [3, 6, 8]), (4, 8, [4, 8]),
                                                   (5, 3, [3]), (2, 1, [1])])
def test_measure_due_every_k_epochs_and_the_last(every, epochs, expected):
    assert [e for e in range(1, epochs + 1) if measure_due(e, epochs, every)] == expected
    # auto, not chosen yet (the first epoch): only when it is the last
    assert [e for e in range(1, epochs + 1) if measure_due(e, epochs, None)] == [epochs]


def test_the_evaluation_estimate_scales_the_probe_time_by_images_and_steps():
    assert estimate_eval_time(2.0, 40, 5, 500, 20) == pytest.approx(2.0 * 500 * 21 / (40 * 6))
    assert estimate_eval_time(1.0, 16, 1, 16, 1) == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_measure_every_is_validated(bad):
    with pytest.raises(InputError, match="measure every"):
        TrainConfig(**TINY, measure_every=bad).validate()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same 5-epoch run evaluated every epoch and every 2 epochs."""
    root = tmp_path_factory.mktemp("measure")
    out = {}
    for k in (1, 2):
        d = root / f"every{k}"
        train(TrainConfig(**TINY, epochs=5, measure_every=k, out_dir=str(d)))
        out[k] = d
    return out


def test_measure_every_k_evaluates_on_epochs_k_2k_and_the_last(pair):
    recs = _lines(pair[2] / "metrics.jsonl")
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4, 5]
    assert [r["epoch"] for r in recs if "pgd_acc" in r] == [2, 4, 5]
    for r in recs:
        evaluated = r["epoch"] in (2, 4, 5)
        assert all((k in r) == evaluated for k in HELD_OUT), r["epoch"]
        assert ("eval_time" in r) == evaluated
        assert r["measure_every"] == 2
        assert math.isfinite(r["dE_mean"]) and math.isfinite(r["dEy_mean"])  # the probe: every epoch
    assert (pair[2] / "best.safetensors").is_file()


def test_evaluating_less_often_changes_nothing_else(pair):
    """The evaluation leaves the training alone: same weights, same probe energies, same accuracies where both
    evaluated."""
    from safetensors.torch import load_file

    a, b = load_file(str(pair[1] / "last.safetensors")), load_file(str(pair[2] / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = _lines(pair[1] / "metrics.jsonl"), _lines(pair[2] / "metrics.jsonl")
    for x, y in zip(ra, rb):
        assert x["dE_mean"] == y["dE_mean"] and x["train_loss"] == y["train_loss"]
        if "pgd_acc" in y:
            assert (x["nat_acc"], x["pgd_acc"]) == (y["nat_acc"], y["pgd_acc"])


def test_auto_chooses_the_period_from_the_first_epoch_and_evaluates_every_k(tmp_path):
    out = tmp_path / "auto"
    train(TrainConfig(**TINY, epochs=4, out_dir=str(out)))
    recs = _lines(out / "metrics.jsonl")
    first = recs[0]
    k = first["measure_every"]
    # the first epoch does not evaluate (unless it is the last): its training and probe times choose k
    assert "pgd_acc" not in first and "eval_time" not in first
    assert first["eval_time_estimate"] == pytest.approx(
        estimate_eval_time(first["probe_time"], TINY["probe_size"], TINY["attack_steps"], TINY["eval_samples"],
                           TINY["eval_steps"]))
    assert k == auto_measure_every(first["train_time"], first["eval_time_estimate"], first["probe_time"], 4)
    assert all(r["measure_every"] == k for r in recs)
    assert "eval_time_estimate" not in recs[1]
    assert [r["epoch"] for r in recs if "pgd_acc" in r] == sorted({4, *(e for e in range(2, 5) if e % k == 0)})
    assert torch.load(out / "state.pt", weights_only=True)["measure_every"] == k


def test_a_one_epoch_run_evaluates_its_epoch(tmp_path):
    out = tmp_path / "one"
    rec = train(TrainConfig(**TINY, epochs=1, out_dir=str(out)))
    assert "pgd_acc" in rec and "eval_time" in rec and (out / "best.safetensors").is_file()


def test_evaluate_gives_the_same_with_the_class_count_passed():
    """``num_classes`` only skips run_attack's one-image forward: the accuracies are the same."""
    torch.manual_seed(0)
    from core.models import build_model

    model = build_model("smallcnn", 10).eval()
    x, y = torch.rand(24, 3, 32, 32), torch.randint(0, 10, (24,))
    assert evaluate(model, x, y, 8 / 255, 2 / 255, 2) == evaluate(model, x, y, 8 / 255, 2 / 255, 2, num_classes=10)


def test_measurement_cost_from_records():
    recs = [{"epoch": 1, "train_time": 10.0, "probe_time": 0.5, "eval_time_estimate": 9.0, "measure_every": 3},
            {"epoch": 2, "train_time": 12.0, "probe_time": 0.5, "measure_every": 3},
            {"epoch": 3, "train_time": 11.0, "probe_time": 8.5, "eval_time": 8.0, "measure_every": 3}]
    mc = measurement_cost(recs)
    assert mc["every"] == 3 and mc["train_s"] == pytest.approx(11.0) and mc["eval_s"] == pytest.approx(8.0)
    assert mc["probe_s"] == pytest.approx(0.5) and mc["eval_estimate_s"] == pytest.approx(9.0)
    assert mc["share"] == pytest.approx((8.0 / 3 + 0.5) / (11.0 + 8.0 / 3 + 0.5))
    assert measurement_cost([]) is None and measurement_cost([{"epoch": 1}]) is None


def test_fig3_joins_the_test_error_over_epochs_without_evaluation():
    import training_figures as tfig

    epochs = np.arange(1, 7, dtype=float)
    rob = np.array([np.nan, np.nan, 0.7, np.nan, np.nan, 0.6])
    f = tfig.phase_figure(epochs, {"ΔE(x)": (np.linspace(0, 1, 6), None)}, {"robust test error": rob})
    tr = next(t for t in f.data if t.name == "robust test error")
    assert tr.connectgaps and "markers" in tr.mode  # two evaluations are a visible line, not two lone gaps
