"""core.drift: TraceRecorder -> EnergyTrace, its derived quantities and its exports."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
import torch

from core.drift import EnergyTrace, TraceRecorder
from core.energy import joint_energy, marginal_energy
from core.errors import InputError

K = 10


def _record(n=12, steps=5, targeted=False, with_loss=True, seed=0, dtype=torch.float32, step_ids=None):
    """Record ``steps + 1`` random logit tensors; returns (trace, list of logits, labels, targets, losses)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, (n,), generator=g)
    targets = (labels + torch.randint(1, K, (n,), generator=g)) % K if targeted else None
    rec = TraceRecorder(labels, targets, meta={"attack": {"name": "test"}})
    logits, losses = [], []
    step_ids = list(range(steps + 1)) if step_ids is None else step_ids
    for s in step_ids:
        lg = (torch.randn(n, K, generator=g) * 3 - s).to(dtype)
        loss = torch.rand(n, generator=g) if with_loss else None
        rec.record(s, lg, loss)
        logits.append(lg)
        losses.append(loss)
    return rec.finish(), logits, labels, targets, losses


def test_shapes_and_raw_arrays_match_the_recorded_logits():
    tr, logits, labels, _, losses = _record(n=12, steps=5)
    assert tr.n_samples == 12 and tr.n_steps == 5
    for a in (tr.marginal, tr.joint, tr.pred, tr.loss):
        assert a.shape == (6, 12)
    assert tr.labels.shape == (12,) and tr.steps.shape == (6,)
    assert tr.targets is None and tr.joint_target is None
    assert tr.marginal.dtype == np.float32 and tr.pred.dtype == np.int64 and tr.steps.dtype == np.int64
    np.testing.assert_array_equal(tr.steps, np.arange(6))
    np.testing.assert_array_equal(tr.labels, labels.numpy())
    for s, lg in enumerate(logits):
        np.testing.assert_allclose(tr.marginal[s], marginal_energy(lg).numpy(), rtol=1e-6)
        np.testing.assert_allclose(tr.joint[s], joint_energy(lg, labels).numpy(), rtol=1e-6)
        np.testing.assert_array_equal(tr.pred[s], lg.argmax(dim=1).numpy())
        np.testing.assert_allclose(tr.loss[s], losses[s].numpy(), rtol=1e-6)
    assert tr.meta["attack"]["name"] == "test"


def test_missing_loss_is_nan_and_targets_are_recorded():
    tr, logits, labels, targets, _ = _record(n=7, steps=3, targeted=True, with_loss=False)
    assert np.isnan(tr.loss).all() and tr.loss.shape == (4, 7)
    np.testing.assert_array_equal(tr.targets, targets.numpy())
    assert (tr.targets != tr.labels).all()
    assert tr.joint_target.shape == (4, 7)
    for s, lg in enumerate(logits):
        np.testing.assert_allclose(tr.joint_target[s], joint_energy(lg, targets).numpy(), rtol=1e-6)


def test_half_precision_logits_are_recorded_as_float32():
    tr, logits, labels, _, _ = _record(n=6, steps=2, dtype=torch.bfloat16)
    assert tr.marginal.dtype == np.float32
    np.testing.assert_allclose(tr.marginal[1], marginal_energy(logits[1].float()).numpy(), rtol=1e-6)


def test_recorder_accepts_logits_that_require_grad():
    labels = torch.tensor([0, 1])
    rec = TraceRecorder(labels)
    w = torch.randn(2, K, requires_grad=True)
    rec.record(0, w * 2, (w ** 2).sum(dim=1))
    tr = rec.finish()
    assert tr.marginal.shape == (1, 2) and tr.n_steps == 0
    np.testing.assert_allclose(tr.marginal[0], marginal_energy((w * 2).detach()).numpy(), rtol=1e-6)


def test_finish_without_steps_raises():
    with pytest.raises(InputError, match="no step"):
        TraceRecorder(torch.tensor([1, 2])).finish()


def test_natural_final_and_deltas_are_consistent_with_raw_arrays():
    tr, *_ = _record(n=9, steps=4)
    nat, fin = tr.natural(), tr.final()
    for key, arr in (("marginal", tr.marginal), ("joint", tr.joint), ("pred", tr.pred)):
        np.testing.assert_array_equal(nat[key], arr[0])
        np.testing.assert_array_equal(fin[key], arr[-1])
    # paper convention: Delta E = E(x) - E(x*), natural minus final
    np.testing.assert_array_equal(tr.delta_marginal(), tr.marginal[0] - tr.marginal[-1])
    np.testing.assert_array_equal(tr.delta_joint(), tr.joint[0] - tr.joint[-1])
    # the logits of later steps were shifted down by s, so their energies are higher: Delta E < 0
    assert (tr.delta_marginal() < 0).mean() > 0.5
    length = tr.drift_length()
    want = np.sqrt((tr.marginal[-1] - tr.marginal[0]) ** 2 + (tr.joint[-1] - tr.joint[0]) ** 2)
    np.testing.assert_allclose(length, want, rtol=1e-6)
    assert (length >= np.abs(tr.delta_marginal()) - 1e-6).all()


def _handmade(pred, labels, targets=None, steps=None):
    pred = np.asarray(pred, dtype=np.int64)
    s, n = pred.shape
    rng = np.random.default_rng(0)
    return EnergyTrace(
        marginal=rng.normal(size=(s, n)).astype(np.float32), joint=rng.normal(size=(s, n)).astype(np.float32),
        pred=pred, loss=np.full((s, n), np.nan, dtype=np.float32), labels=np.asarray(labels, dtype=np.int64),
        steps=np.arange(s) if steps is None else np.asarray(steps), targets=None if targets is None else np.asarray(targets),
        joint_target=None if targets is None else rng.normal(size=(s, n)).astype(np.float32),
    )


def test_accuracies_and_target_success():
    labels = [0, 1, 2, 3, 4]
    pred = [[0, 1, 2, 3, 9],      # natural: 4 / 5 correct
            [0, 5, 5, 3, 9],      # intermediate row must not matter
            [0, 7, 8, 9, 4]]      # final: 2 / 5 correct
    tr = _handmade(pred, labels, targets=[5, 7, 8, 0, 1])
    assert tr.natural_accuracy() == pytest.approx(0.8)
    assert tr.robust_accuracy() == pytest.approx(0.4)
    assert tr.target_success() == pytest.approx(0.4)   # samples 1 and 2 reached 7 and 8
    assert _handmade(pred, labels).target_success() is None
    empty = _handmade(np.zeros((2, 0)), [])
    assert math.isnan(empty.natural_accuracy()) and math.isnan(empty.robust_accuracy())


def test_step_statistics():
    tr, *_ = _record(n=20, steps=6)
    for which, arr in (("marginal", tr.marginal), ("joint", tr.joint)):
        st = tr.step_statistics(which)
        np.testing.assert_array_equal(st["step"], tr.steps)
        for key in ("mean", "std", "q25", "q75"):
            assert st[key].shape == (7,)
        np.testing.assert_allclose(st["mean"], arr.mean(axis=1), rtol=1e-6)
        np.testing.assert_allclose(st["std"], arr.std(axis=1), rtol=1e-5)
        for row in range(7):
            srt = np.sort(arr[row])
            # linear-interpolated quartiles of 20 values: 25 % sits at position 4.75, 75 % at 14.25
            np.testing.assert_allclose(st["q25"][row], srt[4] + 0.75 * (srt[5] - srt[4]), rtol=1e-5)
            np.testing.assert_allclose(st["q75"][row], srt[14] + 0.25 * (srt[15] - srt[14]), rtol=1e-5)
        assert (st["q25"] <= st["q75"]).all()
    with pytest.raises(InputError, match="unknown energy"):
        tr.step_statistics("pred")


def test_concat_joins_samples():
    a, *_ = _record(n=5, steps=3, targeted=True, seed=1)
    b, *_ = _record(n=8, steps=3, targeted=True, seed=2)
    c = a.concat(b)
    assert c.n_samples == 13 and c.n_steps == 3
    for key in ("marginal", "joint", "pred", "loss", "joint_target"):
        np.testing.assert_array_equal(getattr(c, key)[:, :5], getattr(a, key))
        np.testing.assert_array_equal(getattr(c, key)[:, 5:], getattr(b, key))
    np.testing.assert_array_equal(c.labels, np.concatenate([a.labels, b.labels]))
    np.testing.assert_array_equal(c.targets, np.concatenate([a.targets, b.targets]))
    np.testing.assert_array_equal(c.steps, a.steps)
    # derived quantities of the join are the sample-weighted ones of the parts
    assert c.robust_accuracy() == pytest.approx((5 * a.robust_accuracy() + 8 * b.robust_accuracy()) / 13)
    np.testing.assert_array_equal(c.delta_marginal(), np.concatenate([a.delta_marginal(), b.delta_marginal()]))
    # the join does not alias the first trace's meta
    c.meta["x"] = 1
    assert "x" not in a.meta
    d, *_ = _record(n=4, steps=2)
    with pytest.raises(InputError, match="different numbers of steps"):
        a.concat(d)


def test_csv_export_parses_back():
    tr, *_ = _record(n=6, steps=3, targeted=True, with_loss=True, step_ids=[0, 10, 20, 30])
    text = tr.to_csv()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 4 * 6
    assert set(rows[0]) == {"step", "sample", "label", "E_x", "E_xy", "pred", "loss", "target", "E_xt"}
    for r in rows:
        s_idx = [10 * i for i in range(4)].index(int(r["step"]))
        i = int(r["sample"])
        assert int(r["label"]) == tr.labels[i]
        assert int(r["target"]) == tr.targets[i]
        assert int(r["pred"]) == tr.pred[s_idx, i]
        # float32 values survive the text round trip exactly
        assert np.float32(float(r["E_x"])) == tr.marginal[s_idx, i]
        assert np.float32(float(r["E_xy"])) == tr.joint[s_idx, i]
        assert np.float32(float(r["E_xt"])) == tr.joint_target[s_idx, i]
        assert np.float32(float(r["loss"])) == tr.loss[s_idx, i]
    assert sorted({int(r["step"]) for r in rows}) == [0, 10, 20, 30]
    assert sorted((int(r["step"]), int(r["sample"])) for r in rows) == [(s, i) for s in (0, 10, 20, 30) for i in range(6)]


def test_csv_export_untargeted_with_nan_loss():
    tr, *_ = _record(n=3, steps=2, with_loss=False)
    rows = list(csv.DictReader(io.StringIO(tr.to_csv())))
    assert len(rows) == 9
    assert "target" not in rows[0] and "E_xt" not in rows[0]
    assert all(math.isnan(float(r["loss"])) for r in rows)


def test_npz_round_trip(tmp_path):
    for targeted in (False, True):
        tr, *_ = _record(n=7, steps=4, targeted=targeted)
        path = tmp_path / f"trace_{targeted}.npz"
        np.savez(path, **tr.to_npz_dict())
        with np.load(path, allow_pickle=False) as d:
            back = EnergyTrace.from_npz_dict(dict(d), meta={"k": 1})
        for key in ("marginal", "joint", "pred", "loss", "labels", "steps"):
            got, want = getattr(back, key), getattr(tr, key)
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
        if targeted:
            np.testing.assert_array_equal(back.targets, tr.targets)
            np.testing.assert_array_equal(back.joint_target, tr.joint_target)
        else:
            assert back.targets is None and back.joint_target is None
        assert back.meta == {"k": 1}
        assert back.robust_accuracy() == tr.robust_accuracy()
        assert back.to_csv() == tr.to_csv()


def test_perturbed_mask_survives_concat_and_npz_and_sets_the_delta_summary(tmp_path):
    a, *_ = _record(n=4, steps=2)
    b, *_ = _record(n=3, steps=2)
    a.perturbed = np.array([True, False, True, False])
    b.perturbed = np.array([False, True, True])
    c = a.concat(b)
    np.testing.assert_array_equal(c.perturbed, [True, False, True, False, False, True, True])
    np.savez(tmp_path / "t.npz", **c.to_npz_dict())
    with np.load(tmp_path / "t.npz", allow_pickle=False) as d:
        back = EnergyTrace.from_npz_dict(dict(d))
    np.testing.assert_array_equal(back.perturbed, c.perturbed)
    s = back.delta_summary()
    dm = back.delta_marginal().astype(np.float64)
    assert s["n"] == 7 and s["n_perturbed"] == 4
    assert s["dE_mean"] == pytest.approx(dm[c.perturbed].mean()) and s["dE_mean_all"] == pytest.approx(dm.mean())
    a.perturbed = None                       # not recorded (e.g. an SGLD chain): every image counts
    s = a.delta_summary()
    assert s["n_perturbed"] == 4 and s["dE_mean"] == pytest.approx(s["dE_mean_all"])
    a.perturbed = np.zeros(4, bool)
    assert np.isnan(a.delta_summary()["dE_mean"])


def test_natural_trace_matches_direct_energies_across_batches():
    from core.drift import natural_trace
    from core.models import build_model

    torch.manual_seed(0)
    model = build_model("smallcnn", 10)
    model.train()  # natural_trace must use eval mode and give the caller's mode back
    x, y = torch.rand(10, 3, 32, 32), torch.arange(10) % 10
    tr = natural_trace(model, x, y, batch_size=4)
    assert model.training
    with torch.no_grad():
        logits = model.eval()(x)
    assert tr.n_steps == 0 and tr.n_samples == 10
    np.testing.assert_allclose(tr.marginal[0], marginal_energy(logits).numpy(), atol=1e-5)
    np.testing.assert_allclose(tr.joint[0], joint_energy(logits, y).numpy(), atol=1e-5)
    assert (tr.pred[0] == logits.argmax(1).numpy()).all()
    with pytest.raises(InputError, match="3 labels for 10 images"):
        natural_trace(model, x, y[:3])
