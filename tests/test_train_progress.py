"""Batch progress within the epoch: the trainer's batch counter, ETA and batch-level loss log (core.train_progress)."""

from __future__ import annotations

import pytest

from core.train import TrainConfig, train
from core.rundir import RunDir
from core.train_progress import TrainClock, format_eta, progress_message

TINY = dict(dataset="digits", arch="smallcnn", batch_size=32, train_limit=256, attack_steps=1, eval_samples=32,
            eval_steps=1, probe_size=16, lr=0.05, device="cpu")


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_eta_counts_the_batches_and_evaluations_left():
    fc = FakeClock()
    c = TrainClock(epochs=3, batches=10, batch_size=100, attack_steps=8, eval_samples=100, eval_steps=9,
                   probe_size=0, clock=fc)
    assert c.eta(1, 0) is None                      # nothing measured yet: no promise
    for _ in range(4):                              # 4 batches of 2 s
        c.start_batch()
        fc.t += 2.0
        c.end_batch()
    assert c.seconds_per_batch == pytest.approx(2.0)
    # before any evaluation: estimated from the work ratio 100*(9+1) / (100*(8+2)) = 1 batch
    assert not c.eval_measured and c.eval_seconds == pytest.approx(2.0)
    assert c.eta(1, 4) == pytest.approx(6 * 2 + 2 + 2 * (10 * 2 + 2))
    c.start_eval()
    fc.t += 5.0
    assert c.eta_after_eval(1) == pytest.approx(0 + 2 * (20 + 2))   # the estimate is spent: never negative
    c.end_eval()
    assert c.eval_measured and c.eval_seconds == pytest.approx(5.0)
    assert c.eta(2, 10) == pytest.approx(5 + 1 * (20 + 5))


def test_reports_are_throttled_but_first_and_last_batch_always_report():
    fc = FakeClock()
    c = TrainClock(epochs=1, batches=50, batch_size=8, attack_steps=1, eval_samples=8, eval_steps=1, probe_size=8,
                   interval_s=1.0, clock=fc)
    due = []
    for b in range(1, 51):
        fc.t += 0.25
        due.append(c.report_due(b))
    assert due[0] and due[-1]
    assert 10 <= sum(due) <= 15                      # 12.5 s of batches at one report per second (+ the last)


def test_format_and_message():
    assert format_eta(125) == "2m05s" and format_eta(3 * 3600 + 120) == "3h02m" and format_eta(None) == "–"
    m = progress_message(1, 6, 7, 11, 130, estimated=True)
    assert m == "epoch 1/6 · batch 7/11 · ETA ~2m10s"
    assert "evaluating" in progress_message(1, 6, eta_s=10, phase="evaluate")


def test_training_reports_batches_with_eta_before_the_first_epoch_ends(tmp_path):
    out = tmp_path / "run"
    seen = []
    train(TrainConfig(**TINY, epochs=2, out_dir=str(out)), progress=lambda p: seen.append(dict(p)))
    first_epoch_end = next(i for i, p in enumerate(seen) if "metrics" in p)
    batch_reports = [p for p in seen[:first_epoch_end] if p.get("batch") is not None and "evaluating" not in p["message"]]
    assert batch_reports and batch_reports[0]["batch"] == 1 and batch_reports[-1]["batch"] == 8   # 256 / 32
    assert all(p["eta_s"] is not None and p["eta_s"] > 0 for p in batch_reports)
    assert all(p["message"].startswith("epoch 1/2 · batch ") and "ETA ~" in p["message"] for p in batch_reports)
    # the ETA falls as batches are done
    assert batch_reports[-1]["eta_s"] < batch_reports[0]["eta_s"] * 1.5
    # second epoch: the evaluation time is measured, the ETA no longer says "about"
    later = [p for p in seen[first_epoch_end:] if p.get("batch") and "message" in p and "batch " in p["message"]]
    assert later and all("ETA ~" not in p["message"] for p in later)
    logged = RunDir(out).read_batches()
    assert [r["epoch"] for r in logged].count(1) >= 2 and logged[0]["step"] == 1 and logged[-1]["step"] == 16
    assert all(r["loss"] > 0 for r in logged)
    final = RunDir(out).read_progress()
    assert final["phase"] == "done" and final["fraction"] == 1.0


def test_read_batches_reads_only_the_tail_of_a_long_log(tmp_path):
    import json

    lines = [json.dumps({"epoch": 1 + i // 100, "batch": 1 + i % 100, "batches": 100, "step": i + 1, "loss": 1.0})
             for i in range(20_000)]
    (tmp_path / "batches.jsonl").write_text("\n".join(lines) + "\n{\"torn")
    got = RunDir(tmp_path).read_batches(max_bytes=50_000)
    assert 100 < len(got) < 1000 and got[-1]["step"] == 20_000
    assert [r["step"] for r in got] == list(range(got[0]["step"], 20_001))     # whole records, in order
    assert RunDir(tmp_path / "nowhere").read_batches() == []


def test_a_resumed_run_drops_the_batches_of_the_interrupted_epoch(tmp_path):
    from core.train import TrainingStopped

    out = tmp_path / "run"
    cfg = dict(TINY, epochs=2, out_dir=str(out))
    seen = {"n": 0}

    def stop_in_epoch_2():
        if (out / "metrics.jsonl").exists():
            seen["n"] += 1
        return seen["n"] >= 3

    with pytest.raises(TrainingStopped):
        train(TrainConfig(**cfg), should_stop=stop_in_epoch_2)
    assert any(r["epoch"] == 2 for r in RunDir(out).read_batches())              # it had started epoch 2
    train(TrainConfig(**cfg, resume=True))
    steps = [r["step"] for r in RunDir(out).read_batches()]
    assert steps == sorted(set(steps)) and steps[-1] == 16               # epoch 2 once, not twice
