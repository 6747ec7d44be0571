"""Faults during long work: running out of memory (attacks, training steps) and running out of disk
(training checkpoints). The user is told what happened, work continues where it safely can, and what
was saved before stays loadable."""

from __future__ import annotations

import copy
import errno
import sys
import time
from pathlib import Path

import pytest
from apptest_helpers import open_page
import torch

import core.storage as storage
import core.train as train_mod
import core.training.loop as loop_mod
from core.attacks import ATTACKS, AttackSpec, run_attack
from core.runtime import is_oom_error
from core.errors import InputError
from core.losses import method_config
from core.models import load_checkpoint
from core.storage import StorageError
from core.train import TrainConfig, TrainingStopped, train, train_step

REPO = Path(__file__).resolve().parents[1]
OOM_TEXT = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)"


def _oom_above(limit: int, counter: list | None = None):
    """A forward wrapper that raises CUDA's out-of-memory error for batches larger than ``limit``."""
    def wrap(forward):
        def f(x, *a, **k):
            if x.shape[0] > limit:
                if counter is not None:
                    counter.append(int(x.shape[0]))
                raise RuntimeError(OOM_TEXT)
            return forward(x, *a, **k)
        return f
    return wrap


def test_the_simulated_error_is_recognised_as_oom():
    assert is_oom_error(RuntimeError(OOM_TEXT))
    assert not is_oom_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


# =============================================================================================
# Attack out of memory
# =============================================================================================
def test_run_attack_halves_the_batch_and_says_so(tiny_linear_model):
    model = tiny_linear_model
    seen: list[int] = []
    model.forward = _oom_above(5, seen)(model.forward)
    x = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(12) % 10
    res = run_attack(model, x, y, AttackSpec("pgd", steps=2, batch_size=12), num_classes=10)
    assert res.x_adv.shape == x.shape
    assert res.notes == ["out of memory: retrying with batch size 6", "out of memory: retrying with batch size 3"]
    # at 3 the attack fits; its one forward of natural + final images (6) does not, and falls back to two forwards
    # of 3 instead of halving the batch again (core.attacks.gradient._natural_and_final)
    assert seen[:2] == [12, 6] and set(seen[2:]) <= {6}
    assert res.trace.n_samples == 12, "every image is attacked despite the retries"


def test_run_attack_out_of_memory_at_batch_one_is_a_clear_error(tiny_linear_model):
    model = tiny_linear_model
    model.forward = _oom_above(0)(model.forward)
    with pytest.raises(InputError, match="out of memory even with batch size 1"):
        run_attack(model, torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), AttackSpec("pgd", steps=1))


def test_attack_lab_shows_the_out_of_memory_note(runs_dir, monkeypatch):
    pytest.importorskip("streamlit")
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    real = ATTACKS["pgd"].fn
    calls: list[int] = []

    def pgd_with_small_memory(model, x, *a, **k):
        calls.append(int(x.shape[0]))
        if x.shape[0] > 8:
            raise RuntimeError(OOM_TEXT)
        return real(model, x, *a, **k)

    monkeypatch.setattr(ATTACKS["pgd"], "fn", pgd_with_small_memory)
    st.cache_data.clear()
    at = AppTest.from_file(str(REPO / "dashboard" / "Home.py"), default_timeout=120)
    at.run()
    open_page(at, "attack")
    at.number_input(key="atk_n").set_value(16)
    at.button[0].click().run()
    t0 = time.time()
    while "atk_result" not in at.session_state or not at.session_state["atk_task"].done:
        assert time.time() - t0 < 120, "attack did not finish"
        time.sleep(0.3)
        at.run()
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    warnings = [w.value for w in at.warning]
    assert "out of memory: retrying with batch size 8" in warnings, warnings
    assert calls[:2] == [16, 8], calls
    assert any(m.label == "Robust accuracy" for m in at.metric), "the result is shown after the retry"


# =============================================================================================
# Training-step out of memory: micro-batches with gradient accumulation
# =============================================================================================
def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 10))


@pytest.mark.parametrize("method", ["plain", "sat", "mart"])
def test_micro_batches_give_the_full_batch_gradient(method):
    """No BatchNorm, deterministic attack: accumulated micro-batches (5 + 5 + 2) = one full batch.

    (TRADES is left out: its KL attack started exactly at x follows the sign of rounding noise, which
    differs between batch sizes even without micro-batching.)"""
    g = torch.Generator().manual_seed(1)
    xb, yb = torch.rand(12, 3, 8, 8, generator=g), torch.randint(0, 10, (12,), generator=g)
    spec = AttackSpec("pgd", eps=8 / 255, step_size=2 / 255, steps=2, random_start=False)
    lcfg = method_config(method)
    results = []
    for micro in (None, 5):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        model.train()
        lt = train_step(model, opt, lcfg, xb, yb, spec, micro_batch=micro)
        results.append((copy.deepcopy(model.state_dict()), lt))
    (full, lt_full), (acc, lt_acc) = results
    assert not all(torch.equal(full[k], _mlp().state_dict()[k]) for k in full), "the step changed the weights"
    for k in full:
        torch.testing.assert_close(acc[k], full[k], rtol=1e-5, atol=1e-6)
    assert lt_acc.terms["loss"] == pytest.approx(lt_full.terms["loss"], rel=1e-5)
    assert lt_acc.terms["ce"] == pytest.approx(lt_full.terms["ce"], rel=1e-5)


def test_oom_safe_step_halves_until_it_fits(capsys):
    model = _mlp()
    tried: list[int] = []
    model.forward = _oom_above(3, tried)(model.forward)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    oom: dict = {}
    xb, yb = torch.rand(12, 3, 8, 8), torch.randint(0, 10, (12,))
    spec = AttackSpec("pgd", eps=8 / 255, step_size=2 / 255, steps=1)
    train_mod.oom_safe_step(model, opt, method_config("sat"), xb, yb, spec, oom, where=" at epoch 1, batch 1")
    assert oom == {"micro_batch": 3}
    assert tried == [12, 6], tried
    err = capsys.readouterr().err
    assert "out of memory at epoch 1, batch 1 with 12 samples per forward pass" in err
    assert "micro-batches of 6" in err and "micro-batches of 3" in err
    tried.clear()
    train_mod.oom_safe_step(model, opt, method_config("sat"), xb, yb, spec, oom)
    assert tried == [], "the reduced micro-batch size is remembered"


def test_oom_even_at_one_sample_stops_training_clearly():
    model = _mlp()
    model.forward = _oom_above(0)(model.forward)
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TrainingStopped, match="out of memory at epoch 3, batch 7 even with micro-batches of 1"):
        train_mod.oom_safe_step(model, opt, method_config("plain"), torch.rand(4, 3, 8, 8),
                                torch.zeros(4, dtype=torch.long), AttackSpec("pgd"), {},
                                 where=" at epoch 3, batch 7")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "no half-applied step"


def test_other_errors_are_not_mistaken_for_oom():
    model = _mlp()

    def broken(x):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x10 and 192x16)")

    model.forward = broken
    oom: dict = {}
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        train_mod.oom_safe_step(model, torch.optim.SGD(model.parameters(), lr=0.1), method_config("plain"),
                                torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), AttackSpec("pgd"), oom)
    assert oom == {}


def _tiny_cfg(out: Path, **kw) -> TrainConfig:
    base = dict(method="sat", dataset="digits", arch="smallcnn", out_dir=str(out), train_limit=32, batch_size=16,
                epochs=2, attack_steps=1, eval_steps=1, eval_samples=16, probe_size=8, augment=False,
                schedule="constant", device="cpu", seed=0)
    return TrainConfig(**{**base, **kw})


def test_training_survives_oom_with_micro_batches(tmp_path, monkeypatch, capsys):
    limit = 4
    real_build = loop_mod.build_model

    def build_with_small_memory(arch, num_classes, **kw):
        m = real_build(arch, num_classes, **kw)
        m.forward = _oom_above(limit)(m.forward)
        return m

    monkeypatch.setattr(loop_mod, "build_model", build_with_small_memory)
    out = tmp_path / "run"
    rec = train(_tiny_cfg(out))
    assert rec["epoch"] == 2, "training completed"
    assert rec["oom_microbatch"] == limit
    lines = [r for r in storage.read_jsonl(out / "metrics.jsonl")]
    assert [r.get("oom_microbatch") for r in lines] == [limit, limit]
    err = capsys.readouterr().err
    retries = [ln for ln in err.splitlines() if "retrying the batch as micro-batches" in ln]
    assert len(retries) == 2, retries  # 16 -> 8 -> 4 once, then remembered
    assert "at epoch 1, batch 1 with 16 samples per forward pass" in retries[0]
    assert load_checkpoint(out / "last.safetensors").meta.epoch == 2


# =============================================================================================
# Disk full / folder unwritable while training
# =============================================================================================
def _fail_second_last_checkpoint(monkeypatch, how: str) -> list:
    hits: list[str] = []
    if how == "atomic_write":
        real = storage.atomic_write

        def atomic_write(path, writer, mode="wb", **kw):
            if Path(path).name == "last.safetensors":
                hits.append(str(path))
                if len(hits) == 2:
                    raise StorageError(f"could not write {path}: No space left on device")
            return real(path, writer, mode, **kw)

        monkeypatch.setattr(storage, "atomic_write", atomic_write)
    else:  # the real atomic_write, with the final rename failing like a full disk
        real_replace = storage.os.replace

        def replace(src, dst, *a, **k):
            if Path(dst).name == "last.safetensors":
                hits.append(str(dst))
                if len(hits) == 2:
                    raise OSError(errno.ENOSPC, "No space left on device")
            return real_replace(src, dst, *a, **k)

        monkeypatch.setattr(storage.os, "replace", replace)
    return hits


@pytest.mark.parametrize("how", ["atomic_write", "os.replace"])
def test_full_disk_during_training_keeps_the_previous_checkpoint(tmp_path, monkeypatch, how):
    out = tmp_path / "run"
    cfg = _tiny_cfg(out)
    hits = _fail_second_last_checkpoint(monkeypatch, how)
    with pytest.raises(StorageError) as info:
        train(cfg)
    monkeypatch.undo()
    msg = str(info.value)
    assert str(out / "last.safetensors") in msg and "No space left on device" in msg, msg
    assert len(hits) == 2
    lm = load_checkpoint(out / "last.safetensors")
    assert lm.meta.epoch == 1, "the epoch-1 checkpoint is intact and loads"
    assert not list(out.glob(".*.tmp")), "no temp files left behind"
    if how == "atomic_write":
        return
    # the run can be resumed once there is space again
    rec = train(_tiny_cfg(out, resume=True))
    assert rec["epoch"] == 2
    assert [r["epoch"] for r in storage.read_jsonl(out / "metrics.jsonl")] == [1, 2]


def test_unwritable_run_folder_stops_the_cli_with_one_line(tmp_path, monkeypatch, capsys):
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(storage.tempfile, "mkstemp", denied)
    out = tmp_path / "run"
    rc = train_mod.main(["--out-dir", str(out), "--train-limit", "32", "--batch-size", "16", "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"error: cannot write to folder {out}" in err and "Permission denied" in err, err
    assert "Traceback" not in err


def test_run_folder_below_a_file_is_a_storage_error(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(StorageError, match="afile"):
        train(_tiny_cfg(tmp_path / "afile" / "run"))


# =============================================================================================
# Cancel during an attack (issue 14, F4): honoured at the next step, the images so far kept
# =============================================================================================
class _StopAfter:
    """should_stop() that says True from its (k+1)-th question on, counting the questions."""

    def __init__(self, k: int):
        self.k, self.asked = k, 0

    def __call__(self) -> bool:
        self.asked += 1
        return self.asked > self.k


def _steps_of(res) -> int:
    return int(res.trace.steps[-1])


def test_cancel_is_asked_before_every_pgd_step_and_keeps_the_partial_attack(tiny_linear_model):
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 10
    spec = AttackSpec("pgd", eps=8 / 255, steps=3000, batch_size=256)
    stop = _StopAfter(1 + 7)  # the check before the batch, then 7 steps
    res = run_attack(tiny_linear_model, x, y, spec, should_stop=stop)
    assert res.partial and stop.asked == 9, "asked once per step, stopped at the first True"
    assert res.x_adv.shape == x.shape and _steps_of(res) == 7 and res.trace.n_samples == 8
    assert res.notes == ["cancelled at step 7 of 3000: showing the 8 images of the first batch as attacked so far "
                         "(7 steps)"]
    assert float((res.x_adv - x).abs().max()) <= 8 / 255 + 1e-6, "the partial result is a valid attack point"
    # it is exactly where an uncancelled 7-step run with the same step size gets to
    full = run_attack(tiny_linear_model, x, y, AttackSpec("pgd", eps=8 / 255, steps=7, step_size=spec.alpha))
    assert torch.allclose(res.x_adv, full.x_adv, atol=1e-6)
    assert res.trace.meta.get("partial") is True


def test_cancel_between_batches_keeps_the_finished_batches(tiny_linear_model):
    x = torch.rand(10, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(10) % 10
    done: list[float] = []

    def stop():
        return len(done) >= 1  # after the first batch reported progress

    res = run_attack(tiny_linear_model, x, y, AttackSpec("pgd", steps=5, batch_size=4), should_stop=stop,
                     progress=lambda f, m: done.append(f))
    assert res.partial and res.x_adv.shape[0] == 4 and res.trace.n_samples == 4 and _steps_of(res) == 5
    assert res.notes == ["cancelled: showing the 4 of 10 images whose attack had finished"]


def test_cancel_of_an_autoattack_component_stops_within_one_model_evaluation(tiny_linear_model):
    from core.errors import Cancelled

    calls = []
    real = tiny_linear_model.forward
    tiny_linear_model.forward = lambda x: (calls.append(1), real(x))[1]
    stop = _StopAfter(1 + 5)  # the check before the batch, then 5 model evaluations inside APGD
    with pytest.raises(Cancelled, match="APGD-CE does not expose its intermediate images"):
        run_attack(tiny_linear_model, torch.rand(4, 3, 8, 8), torch.arange(4), AttackSpec("apgd-ce", steps=500),
                   should_stop=stop, fold_bn=False)
    evaluations = len(calls)
    assert stop.asked == 7 and evaluations <= 7, (stop.asked, evaluations)  # probe + 5 (+ the one refused)


def test_cancel_arrives_within_one_step_on_a_real_model():
    """The issue's case: 3,000 PGD steps ran on for 898 s after Cancel. Now the next step sees it. The Cancel
    button's event is set while step k runs (from inside the attack, after it was let into step k), and no further
    step may start: "promptly" is counted in steps, so a loaded machine gives the same answer as a fast one."""
    import threading

    from core.models import build_model

    class _CancelDuringStep:
        """should_stop() over a Cancel event that is set right after it let the attack into step ``k``."""

        def __init__(self, k: int):
            self.k, self.answers, self.event = k, [], threading.Event()

        def __call__(self) -> bool:
            answer = self.event.is_set()
            self.answers.append(answer)
            if len(self.answers) == 1 + self.k:  # the check before the batch, then one before each of steps 1..k
                self.event.set()                 # Cancel is pressed while step k runs
            return answer

    torch.manual_seed(0)
    model = build_model("smallcnn", 10).eval()
    x, y = torch.rand(64, 3, 32, 32), torch.randint(0, 10, (64,))
    k = 3
    stop = _CancelDuringStep(k)
    spec = AttackSpec("pgd", steps=3000)
    res = run_attack(model, x, y, spec, should_stop=stop)
    # asked once more after the request, said True, and stopped there: step k finished, step k + 1 never began
    assert stop.answers == [False] * (1 + k) + [True], stop.answers
    assert res.partial and _steps_of(res) == k and res.trace.n_samples == 64
    assert res.x_adv.shape == x.shape
    assert float((res.x_adv - x).abs().max()) <= spec.eps + 1e-6, "the partial result is a valid attack point"
    assert res.notes and res.notes[0].startswith(f"cancelled at step {k} of 3000"), res.notes


def test_attack_lab_cancel_keeps_the_images_so_far(runs_dir, monkeypatch, wait_until):
    """Cancel on the Attack Lab stops the attack at its next step and shows the images so far. Counted in the
    attack's own questions to ``task.cancelled`` (one before each step), not in seconds."""
    pytest.importorskip("streamlit")
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    st.cache_data.clear()
    at = AppTest.from_file(str(REPO / "dashboard" / "Home.py"), default_timeout=120)
    at.run()
    open_page(at, "attack")
    common = sys.modules["common"]  # the pages' dashboard/common.py, as the app imported it
    answers: list[bool] = []
    real_cancelled = common.Task.cancelled

    def counted(task) -> bool:  # the attack's should_stop: record every answer it gets
        answer = real_cancelled(task)
        answers.append(answer)
        return answer

    monkeypatch.setattr(common.Task, "cancelled", counted)
    at.number_input(key="atk_n").set_value(16)
    at.number_input(key="atk_steps").set_value(5000)
    at.button[0].click().run()
    task = at.session_state["atk_task"]
    # the attack is stepping: asked before the batch and before at least one step
    wait_until(lambda: len(answers) >= 2 or task.done, what="the attack's first step")
    assert not task.done, "5000 steps take far longer than one"
    at.button(key="atk_task-cancel").click().run()  # the Cancel button of the progress panel
    wait_until(lambda: task.done, what="the cancelled attack to return", detail=lambda: f"{len(answers)} questions")
    # the first question after Cancel was answered True and was the last one: no step began after the request
    assert answers.count(True) == 1 and answers[-1] is True, answers[-5:]
    steps = len(answers) - 2  # minus the check before the batch and the final True
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    warnings = " | ".join(w.value for w in at.warning)
    assert f"cancelled at step {steps} of 5000" in warnings, (steps, warnings)
    assert any(m.label == "Robust accuracy" for m in at.metric), "the partial result is shown"


# =============================================================================================
# Non-finite logits (issue 14, F7)
# =============================================================================================
class _NaNModel(torch.nn.Module):
    """A broken classifier: NaN logits everywhere (e.g. NaN weights), or only away from the natural images."""

    def __init__(self, only_perturbed: bool = False):
        super().__init__()
        self.lin = torch.nn.Linear(3 * 8 * 8, 10)
        self.only_perturbed = only_perturbed

    def forward(self, x):
        z = self.lin(x.flatten(1))
        if not self.only_perturbed:
            return z * float("nan")
        off_grid = (x * 255 - (x * 255).round()).abs().flatten(1).amax(1) > 1e-3  # attacked pixels leave the grid
        return torch.where(off_grid[:, None], torch.full_like(z, float("inf")), z)


def test_nan_logits_are_refused_by_attacks_and_evaluation():
    from core.evaluation import evaluate
    from core.models import LoadedModel, ModelMeta

    x = torch.randint(0, 256, (6, 3, 8, 8)).float() / 255
    y = torch.arange(6) % 10
    with pytest.raises(InputError, match="NaN or infinite logits"):
        run_attack(_NaNModel(), x, y, AttackSpec("pgd", steps=2))
    with pytest.raises(InputError, match="NaN or infinite logits for 6 of 6 natural images"):
        run_attack(_NaNModel(), x, y, AttackSpec("pgd", steps=2), num_classes=10)  # no probe forward
    lm = LoadedModel(_NaNModel(), ModelMeta("smallcnn", 10, "digits"))
    with pytest.raises(InputError, match="NaN or infinite logits for 6 of 6 images"):
        evaluate(lm, x, y, {"n": 6, "autoattack": False, "pgd_steps": 2}, model_sha="x")


def test_logits_that_become_infinite_during_the_attack_are_named():
    from core.evaluation import evaluate
    from core.models import LoadedModel, ModelMeta

    x = torch.randint(0, 256, (6, 3, 8, 8)).float() / 255
    y = torch.arange(6) % 10
    model = _NaNModel(only_perturbed=True)
    res = run_attack(model, x, y, AttackSpec("pgd", steps=2))
    assert any("logits became NaN or infinite during the attack for 6 of 6 images (first at step" in n
               for n in res.notes), res.notes
    lm = LoadedModel(model, ModelMeta("smallcnn", 10, "digits"))
    out = evaluate(lm, x, y, {"n": 6, "autoattack": False, "pgd_steps": 2}, model_sha="x")
    assert out["pgd_acc"] == 0.0, "a point with infinite logits is not counted as robust (argmax means nothing)"
    assert any("NaN or infinite" in n for n in out["notes"])


# =============================================================================================
# Out of memory in SGLD and in evaluation (issue 14, F9): halved and retried, and said
# =============================================================================================
def test_sgld_out_of_memory_processes_fewer_chains_at_a_time_with_the_same_result():
    import core.sampling as sampling

    model = _mlp()   # no BatchNorm: the sampler calls the model itself (no folded copy), so its forward can fail
    kw = dict(init="random", image_shape=(3, 8, 8), num_classes=10, seed=3)
    ref = sampling.SGLDSampler(model, [0, 1], 4, **kw).step(3)
    real = model.forward
    seen: list[int] = []

    def small_memory(x):
        seen.append(len(x))
        if len(x) > 2:
            raise RuntimeError(OOM_TEXT)
        return real(x)

    model.forward = small_memory
    s = sampling.SGLDSampler(model, [0, 1], 4, **kw)
    msgs: list[str] = []
    out = s.step(3, progress=lambda f, m: msgs.append(m))
    assert torch.allclose(out.images, ref.images, atol=1e-5), "chains are independent: same numbers"
    assert s.notes == ["out of memory: computing the energies 4 chains at a time (same results, slower)",
                       "out of memory: computing the energies 2 chains at a time (same results, slower)"]
    assert seen[:3] == [8, 4, 2]
    model.forward = _oom_above(0)(real)
    with pytest.raises(InputError, match="out of memory even with one SGLD chain at a time"):
        sampling.SGLDSampler(model, [0, 1], 4, **kw)


def test_evaluation_out_of_memory_halves_the_batch_and_says_so(monkeypatch):
    import core.evaluation as ev
    from core.models import LoadedModel, ModelMeta, build_model

    torch.manual_seed(0)
    net = build_model("smallcnn", 10).eval()
    x, y = torch.rand(12, 3, 32, 32), torch.arange(12) % 10
    cfg = {"n": 12, "autoattack": True, "aa_version": "custom", "aa_attacks": ["apgd-ce"], "pgd_steps": 2,
           "batch_size": 12, "chunk_size": 12}
    ref = ev.evaluate(LoadedModel(net, ModelMeta("smallcnn", 10, "digits")), x, y, cfg, model_sha="x")
    forward = net.forward
    net.forward = _oom_above(3)(forward)
    msgs: list[str] = []
    out = ev.evaluate(LoadedModel(net, ModelMeta("smallcnn", 10, "digits")), x, y, cfg, model_sha="x",
                      progress=lambda f, m: msgs.append(m))
    assert (out["natural_acc"], out["pgd_acc"]) == (ref["natural_acc"], ref["pgd_acc"])
    notes = " | ".join(out["notes"])
    for what in ("the natural forward pass", "AutoAttack"):
        assert f"out of memory during {what}: retrying with batch size 3" in notes, notes
    assert any("out of memory during" in m for m in msgs), "the progress line says so while it runs"
    net.forward = _oom_above(0)(forward)
    with pytest.raises(InputError, match="out of memory during the natural forward pass even with batch size 1"):
        ev.evaluate(LoadedModel(net, ModelMeta("smallcnn", 10, "digits")), x, y, cfg, model_sha="x")
