"""Kill -9 a real training job at random points, resume it, and get the uninterrupted result back.

Reference: one uninterrupted 'train' job (core.train.run_job on the embedded digits, smallcnn, tiny
settings). Each trial trains the same config in its own job folder, SIGKILLs the job's process
group at a seeded random moment (one more trial stops it with stop_job, i.e. SIGTERM), resumes it
with core.jobs.resume_job and checks that

* the registry says done and state.pt / best.safetensors / last.safetensors load;
* metrics.jsonl holds exactly one record per epoch 1..E, in order;
* at most the epoch in progress was lost: the records and probe snapshots of the epochs completed
  before the kill (per state.pt) are untouched, and the resumed run started at the next epoch;
* final metrics and weights equal the uninterrupted run's (randomness derives from (seed, epoch)).

The reference and the trials run side by side (one thread each, so results do not depend on it)
to keep the wall time of the file down on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import torch

from core import jobs
from core.models import load_checkpoint
from core.tensorio import safe_torch_load

EPOCHS = 3
CFG = dict(method="sat", dataset="digits", arch="smallcnn", epochs=EPOCHS, batch_size=32, train_limit=256, lr=0.05,
           attack_steps=2, eval_steps=2, eval_samples=64, probe_size=32, seed=0, device="cpu",
           measure_every=1)  # every epoch's accuracy is compared (auto would choose the period from timings)
TIMING_KEYS = {"train_time", "probe_time", "eval_time", "eval_time_estimate"}
JOB_TIMEOUT = 240.0
SUMMARY: list[str] = []
GRACEFUL = 3  # trials 0-2 are SIGKILLed; trial 3 is stopped with stop_job (SIGTERM) instead


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("MKL_NUM_THREADS", "1")
        mp.setenv("ENERGYLENS_MAX_JOBS_PER_DEVICE", "1")
        mp.delenv("ENERGYLENS_EXTRA_KINDS", raising=False)
        root = tmp_path_factory.mktemp("train-runs")
        yield root
        for info in jobs.list_jobs(root):  # never leave a training process behind
            if info.status == "running":
                jobs.stop_job(info.id, root, grace=2)
    if SUMMARY:
        print("\nkill-and-resume trials:\n  " + "\n  ".join(SUMMARY))


def _row(root: Path, job_id: str) -> dict:
    conn = sqlite3.connect(root / "registry.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        return dict(conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
    finally:
        conn.close()


def _wait_finished(root: Path, job_id: str, timeout: float = JOB_TIMEOUT) -> jobs.JobInfo:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = jobs.get_job(job_id, root)
        if info.status in jobs.FINISHED:
            return info
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish within {timeout} s:\n{jobs.read_log_tail(job_id, 30, root)}")


def _kill_and_resume(root: Path, info: jobs.JobInfo, trial: int) -> dict:
    """Interrupt the job at a seeded random point (SIGKILL; stop_job for the graceful trial), record what
    survived, resume it and wait for it to finish."""
    rng = random.Random(20250 + trial)
    # kill once training reached a random fraction (trial 0 inside epoch 1, then later and later),
    # plus a random extra delay so the kill lands anywhere: mid-batch, mid-evaluation, mid-write
    # (progress lags by up to REPORT_INTERVAL_S; targets stop short of the end so the job is still running)
    target = [rng.uniform(0.02, 0.25), rng.uniform(0.35, 0.6), rng.uniform(0.62, 0.72), rng.uniform(0.3, 0.7)][trial]
    extra = rng.uniform(0.0, 0.4)
    folder = Path(info.run_dir)
    t0 = time.monotonic()
    while True:
        row = _row(root, info.id)
        assert row["status"] == "running", f"the job finished before it could be killed: {row['status']}"
        if row["progress"] >= target:
            break
        assert time.monotonic() - t0 < JOB_TIMEOUT, "the job made no progress"
        time.sleep(0.02)
    time.sleep(extra)
    row = _row(root, info.id)
    assert row["status"] == "running", "the job finished before it could be killed"
    try:  # where the trainer was, for the record
        p = json.loads((folder / "progress.json").read_text())
        where = f"epoch {p.get('epoch')} {p.get('phase')}"
        where += f" batch {p['batch']}" if p.get("phase") == "train" else ""
    except (OSError, ValueError):
        where = "before training started"
    if trial == GRACEFUL:  # a stop request: SIGTERM, the trainer unwinds through JobStopped
        out = {"stopped": jobs.stop_job(info.id, root, grace=30)}
    else:
        os.killpg(row["pid"], signal.SIGKILL)
        out = {}
    out.update({"killed_at": time.monotonic() - t0, "progress": row["progress"], "where": where})
    out["failed"] = _wait_finished(root, info.id)  # a generous bound on a hang, as for every wait here
    # what survived the crash
    out["k"] = int(safe_torch_load(folder / "state.pt")["epoch"]) if (folder / "state.pt").exists() else 0
    out["before"] = jobs.read_metrics(info.id, root)
    probe = folder / "probe"
    out["probe_before"] = {p.name: p.stat().st_mtime_ns for p in probe.glob("*.npz")} if probe.is_dir() else {}
    out["resumed"] = jobs.resume_job(info.id, root)
    out["done"] = _wait_finished(root, info.id)
    return out


@pytest.fixture(scope="module")
def experiment(runs):
    """Run the reference and the four interrupt-and-resume trials side by side (5 job processes)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENERGYLENS_MAX_JOBS_PER_DEVICE", "5")  # concurrency does not change results: 1 thread each
        t0 = time.monotonic()
        ref = jobs.submit("train", CFG, name="A (uninterrupted)", device="cpu", runs_dir=runs)
        trials = {t: jobs.submit("train", CFG, name=f"B{t}", device="cpu", runs_dir=runs) for t in range(4)}
        outcome: dict[int, dict] = {}

        def work(t: int) -> None:
            try:
                outcome[t] = _kill_and_resume(runs, trials[t], t)
            except BaseException as e:  # noqa: BLE001 - re-raised by the trial's test
                outcome[t] = {"error": e}

        threads = [threading.Thread(target=work, args=(t,)) for t in trials]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        ref_done = _wait_finished(runs, ref.id)
        SUMMARY.append(f"reference + 4 trials ran concurrently in {time.monotonic() - t0:.1f} s wall")
    for t, info in trials.items():
        outcome[t]["info"] = info
    return ref_done, outcome


def _state_dicts_close(a: dict, b: dict, what: str) -> float:
    assert a.keys() == b.keys(), what
    worst = 0.0
    for k in a:
        ta, tb = a[k], b[k]
        assert ta.shape == tb.shape and ta.dtype == tb.dtype, f"{what}: {k}"
        if ta.is_floating_point():
            assert torch.allclose(ta, tb, rtol=1e-5, atol=1e-6), f"{what}: {k} differs"
            worst = max(worst, float((ta - tb).abs().max()) if ta.numel() else 0.0)
        else:
            assert torch.equal(ta, tb), f"{what}: {k} differs"
    return worst


def _assert_same_metrics(ref: list[dict], got: list[dict]) -> None:
    assert len(ref) == len(got)
    for ra, rb in zip(ref, got):
        assert ra.keys() == rb.keys()
        for k in ra:
            if k not in TIMING_KEYS:
                assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-7), f"epoch {ra['epoch']}: {k}"


@pytest.mark.slow
def test_uninterrupted_training_job(runs, experiment):
    done, _ = experiment
    assert done.status == "done", done.error
    folder = Path(done.run_dir)
    assert done.progress == 1.0 and done.result["epoch"] == EPOCHS
    assert [r["epoch"] for r in jobs.read_metrics(done.id, runs)] == list(range(1, EPOCHS + 1))
    assert safe_torch_load(folder / "state.pt")["epoch"] == EPOCHS
    for name in ("last.safetensors", "best.safetensors"):
        assert load_checkpoint(folder / name).meta.arch == "smallcnn"
    assert sorted(p.name for p in (folder / "probe").glob("*.npz")) == [f"epoch_{e:04d}.npz" for e in
                                                                        range(1, EPOCHS + 1)]


@pytest.mark.slow
@pytest.mark.parametrize("trial", [0, 1, 2, GRACEFUL], ids=["kill0", "kill1", "kill2", "stop"])
def test_sigkill_then_resume_reproduces_the_uninterrupted_run(runs, experiment, trial):
    ref, outcome = experiment
    o = outcome[trial]
    if "error" in o:
        raise o["error"]
    info, k, before, probe_before = o["info"], o["k"], o["before"], o["probe_before"]
    folder = Path(info.run_dir)
    failed, resumed, done = o["failed"], o["resumed"], o["done"]
    if trial == GRACEFUL:
        assert o["stopped"].status == failed.status == "stopped" and failed.error is None
        assert "stopped" in jobs.read_log_tail(info.id, 100, runs)
    else:
        assert failed.status == "failed" and "ended without reporting a result" in failed.error
    assert [r["epoch"] for r in before] in (list(range(1, k + 1)), list(range(1, k + 2)))
    assert resumed.config["resume"] is True and resumed.run_dir == info.run_dir
    assert done.status == "done", done.error
    assert done.progress == 1.0

    # one record per epoch, in order; the completed epochs were kept, not recomputed
    metrics = jobs.read_metrics(info.id, runs)
    assert [r["epoch"] for r in metrics] == list(range(1, EPOCHS + 1))
    assert metrics[:k] == before[:k]  # verbatim, timings included
    for e in range(1, k + 1):
        assert (folder / "probe" / f"epoch_{e:04d}.npz").stat().st_mtime_ns == probe_before[f"epoch_{e:04d}.npz"]
    log = (folder / "log.txt").read_text(errors="replace")
    second_launch = log.rsplit("launching train job", 1)[1]
    first_epoch = re.search(rf"epoch (\d+)/{EPOCHS}", second_launch)
    if first_epoch:  # tqdm progress bars in the log show where the resumed run started
        assert int(first_epoch.group(1)) == k + 1

    # the result equals the uninterrupted run
    ref_dir = Path(ref.run_dir)
    _assert_same_metrics(jobs.read_metrics(ref.id, runs), metrics)
    worst = 0.0
    for name in ("last.safetensors", "best.safetensors"):
        a, b = load_checkpoint(ref_dir / name), load_checkpoint(folder / name)
        assert a.meta.epoch == b.meta.epoch and a.meta.metrics == pytest.approx(b.meta.metrics, rel=1e-6)
        worst = max(worst, _state_dicts_close(a.model.state_dict(), b.model.state_dict(), name))
    sa, sb = safe_torch_load(ref_dir / "state.pt"), safe_torch_load(folder / "state.pt")
    assert sa["epoch"] == sb["epoch"] == EPOCHS and sa["best"] == pytest.approx(sb["best"])
    worst = max(worst, _state_dicts_close(sa["model"], sb["model"], "state.pt model"))
    assert sa["scheduler"]["last_epoch"] == sb["scheduler"]["last_epoch"]
    for (ka, va), (kb, vb) in zip(sorted(sa["optimizer"]["state"].items()), sorted(sb["optimizer"]["state"].items())):
        assert ka == kb and torch.allclose(va["momentum_buffer"], vb["momentum_buffer"], rtol=1e-5, atol=1e-6)
    lost = f"epoch {k + 1} (in progress)" if len(before) == k else f"epoch {k + 1} (record written, state.pt not yet)"
    how = "stop_job" if trial == GRACEFUL else "SIGKILL"
    SUMMARY.append(f"trial {trial}: {how} after {o['killed_at']:.1f} s (progress {o['progress']:.2f}, last "
                   f"progress.json: {o['where']}); "
                   f"state.pt had {k} epoch(s); redone: {lost}; max |w_B - w_A| = {worst:.2e}")
