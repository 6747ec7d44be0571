"""Background jobs (core.jobs): real job processes running the tiny runners of jobs_fixtures.py."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import namedtuple
from pathlib import Path

import pytest
from conftest import wait_until

from core import jobs
from core.errors import JobError
from core.jobs import api, child, process, scheduler, store

FIXTURES = Path(__file__).resolve().parent / "jobs_fixtures.py"
TEST_KINDS = {k: f"{FIXTURES}:{k}" for k in ("quick", "sleepy", "failing", "user_error", "chatty", "stubborn")}


@pytest.fixture
def runs(runs_dir, monkeypatch):
    """The shared private runs folder (conftest.runs_dir); the test runners are registered through
    ENERGYLENS_EXTRA_KINDS."""
    root = runs_dir
    monkeypatch.setenv("ENERGYLENS_EXTRA_KINDS", json.dumps(TEST_KINDS))
    monkeypatch.setenv("ENERGYLENS_MAX_JOBS_PER_DEVICE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield root
    _kill_leftovers(root)


def _kill_leftovers(root: Path) -> None:
    db = root / "registry.sqlite"
    if not db.exists():
        return
    try:
        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT pid, proc_start FROM jobs WHERE status = 'running'").fetchall()
    except sqlite3.DatabaseError:
        return
    for pid, start in rows:
        if process.process_matches(pid, start):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
    process.reap_children()


# Generous: a timeout only bounds a hang (the condition either comes or never does), never a time the job must beat.
WAIT_S = 120.0
FOREVER = 10**7  # sleepy steps: a job that only ends when the test stops it


def go(info) -> None:
    """Release a job held at its gate (jobs_fixtures.wait_for_go)."""
    (Path(info.run_dir) / "go").touch()


def wait_for(pred, timeout=WAIT_S, interval=0.05, what="condition"):
    return wait_until(pred, timeout=timeout, what=what, every=interval)


def wait_status(job_id, root, statuses, timeout=WAIT_S):
    statuses = (statuses,) if isinstance(statuses, str) else statuses
    return wait_for(lambda: (j := jobs.get_job(job_id, root)).status in statuses and j, timeout,
                    what=f"job {job_id} to become {'/'.join(statuses)}")


def raw_row(root: Path, job_id: str) -> dict:
    """The registry row read with plain sqlite3 (no refresh, nothing started as a side effect)."""
    conn = sqlite3.connect(root / "registry.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    finally:
        conn.close()
    return dict(row) if row else {}


def marker(info) -> dict:
    p = Path(info.run_dir) / "marker.json"
    return json.loads(p.read_text()) if p.exists() else {}


def gone(pid: int) -> bool:
    process.reap_children()
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# --------------------------------------------------------------------------------------------
def test_submit_runs_to_done_with_progress_and_result(runs):
    info = jobs.submit("quick", {"steps": 4, "value": 3}, name="my quick job", device="cpu", runs_dir=runs)
    assert info.status in ("queued", "running") and info.kind == "quick" and info.device == "cpu"
    assert Path(info.run_dir) == runs / info.id and Path(info.run_dir).is_dir()
    spec = json.loads((runs / info.id / "job.json").read_text())
    assert spec["kind"] == "quick" and spec["name"] == "my quick job" and spec["config"] == {"steps": 4, "value": 3}
    assert spec["device"] == "cpu"
    done = wait_status(info.id, runs, ("done", "failed"))
    assert done.status == "done", done.error
    assert done.progress == 1.0
    assert done.result == {"answer": 42, "value": 3, "steps": 4}
    assert done.started and done.finished and done.created <= done.started <= done.finished
    assert done.error is None and done.pid == marker(done)["pid"]
    assert [r["epoch"] for r in jobs.read_metrics(info.id, runs)] == [1, 2, 3, 4]
    assert "quick runner done" in jobs.read_log_tail(info.id, 50, runs)
    assert [j.id for j in jobs.list_jobs(runs)] == [info.id]
    assert jobs.list_jobs(runs, kind="train") == []
    assert jobs.job_dir(info.id, runs) == runs / info.id


def test_failing_runner_records_error_and_log_tail(runs):
    a = jobs.submit("failing", {}, device="cpu", runs_dir=runs)
    b = jobs.submit("user_error", {}, device="cpu", runs_dir=runs)
    fa = wait_status(a.id, runs, ("done", "failed"))
    fb = wait_status(b.id, runs, ("done", "failed"))
    assert fa.status == "failed"
    assert "RuntimeError: boom: the runner crashed" in fa.error
    assert "Last log lines" in fa.error and "working on part 2" in fa.error
    assert "Traceback" in jobs.read_log_tail(a.id, 50, runs)
    assert fa.progress == pytest.approx(0.3) and fa.finished is not None
    assert fb.status == "failed"
    assert fb.error == "epsilon must lie in [0, 1], got 3"  # an EnergyLensError keeps its own message


def test_queued_job_starts_when_the_first_finishes(runs):
    first = jobs.submit("sleepy", {"steps": 6, "dt": 0.1, "gate": 1}, device="cpu", runs_dir=runs)
    second = jobs.submit("quick", {}, device="cpu", runs_dir=runs)
    assert second.status == "queued"  # one job per slot (the first is held at its gate until go())
    go(first)
    # only plain registry reads from here on: the finishing job must start the next one itself
    wait_for(lambda: raw_row(runs, second.id).get("status") == "done", what="the queued job to finish")
    r1, r2 = raw_row(runs, first.id), raw_row(runs, second.id)
    assert r1["status"] == "done"
    assert r2["started"] >= r1["finished"] - 1e-3
    m1, m2 = marker(jobs.peek_job(first.id, runs)), marker(jobs.peek_job(second.id, runs))
    assert m2["start"] >= m1["end"]  # never ran at the same time


def test_max_jobs_per_device_allows_parallel_jobs(runs, monkeypatch):
    monkeypatch.setenv("ENERGYLENS_MAX_JOBS_PER_DEVICE", "2")
    a = jobs.submit("sleepy", {"steps": FOREVER, "dt": 0.1}, device="cpu", runs_dir=runs)
    b = jobs.submit("sleepy", {"steps": FOREVER, "dt": 0.1}, device="cpu", runs_dir=runs)
    c = jobs.submit("quick", {}, device="cpu", runs_dir=runs)
    assert [jobs.get_job(j.id, runs).status for j in (a, b, c)] == ["running", "running", "queued"]
    for j in (a, b, c):
        jobs.stop_job(j.id, runs, grace=5)


def test_stop_terminates_the_process_group(runs):
    info = jobs.submit("sleepy", {"steps": FOREVER, "dt": 0.05}, device="cpu", runs_dir=runs)
    running = wait_for(lambda: (j := jobs.get_job(info.id, runs)).progress > 0 and j, what="progress")
    # a generous grace: stop_job returns as soon as the group is gone; SIGKILL would only come after WAIT_S
    stopped = jobs.stop_job(info.id, runs, grace=WAIT_S)
    assert stopped.status == "stopped" and stopped.finished is not None
    assert gone(running.pid)
    # unwound on SIGTERM, no SIGKILL needed: the runner's finally ran (JobStopped unwound it), which a SIGKILL
    # would never let happen
    assert "cleanup" in marker(stopped)
    assert "end" not in marker(stopped)
    assert jobs.stop_job(info.id, runs).status == "stopped"  # idempotent


def test_stop_escalates_to_sigkill(runs):
    # it ignores SIGTERM and would sleep for a day: only SIGKILL ends it, so returning at all means escalation
    info = jobs.submit("stubborn", {"seconds": 86400}, device="cpu", runs_dir=runs)
    running = wait_for(lambda: (j := jobs.get_job(info.id, runs)).progress > 0 and j, what="progress")
    t0 = time.monotonic()
    stopped = jobs.stop_job(info.id, runs, grace=0.5)
    assert stopped.status == "stopped"
    assert time.monotonic() - t0 > 0.4  # the grace was granted before SIGKILL (a slow machine only adds to this)
    assert gone(running.pid)


def test_stop_queued_job_never_runs(runs):
    a = jobs.submit("sleepy", {"steps": FOREVER, "dt": 0.05}, device="cpu", runs_dir=runs)
    b = jobs.submit("quick", {}, device="cpu", runs_dir=runs)
    assert jobs.stop_job(b.id, runs).status == "stopped"
    jobs.stop_job(a.id, runs, grace=WAIT_S)
    assert jobs.get_job(b.id, runs).status == "stopped" and not marker(jobs.get_job(b.id, runs))


def test_resume_continues_in_the_same_folder(runs):
    # held after step 3 until stopped: the stop lands mid-run however slow the machine is
    info = jobs.submit("sleepy", {"steps": 12, "dt": 0.1, "gate": 3}, device="cpu", runs_dir=runs)
    wait_for(lambda: jobs.get_job(info.id, runs).progress >= 0.25, what="progress")
    stopped = jobs.stop_job(info.id, runs, grace=WAIT_S)
    done_steps = json.loads((runs / info.id / "state.json").read_text())["step"]
    assert stopped.status == "stopped" and done_steps == 3
    with pytest.raises(JobError, match="only stopped or failed"):
        jobs.resume_job(jobs.submit("quick", {}, device="cpu", runs_dir=runs, start=False).id, runs)
    resumed = jobs.resume_job(info.id, runs)
    assert resumed.id == info.id and resumed.run_dir == info.run_dir
    assert resumed.config["resume"] is True and resumed.error is None
    assert json.loads((runs / info.id / "job.json").read_text())["config"]["resume"] is True
    done = wait_status(info.id, runs, ("done", "failed"))
    assert done.status == "done", done.error
    assert done.result == {"steps": 12, "first_step": done_steps}
    assert jobs.read_log_tail(info.id, 500, runs).count("launching sleepy job") == 2


def test_delete_refuses_while_running(runs):
    info = jobs.submit("sleepy", {"steps": FOREVER, "dt": 0.05}, device="cpu", runs_dir=runs)
    with pytest.raises(JobError, match="running"):
        jobs.delete_job(info.id, runs)
    assert Path(info.run_dir).is_dir()
    jobs.stop_job(info.id, runs, grace=WAIT_S)
    jobs.delete_job(info.id, runs)
    assert not Path(info.run_dir).exists()
    with pytest.raises(JobError, match="unknown job"):
        jobs.get_job(info.id, runs)
    with pytest.raises(JobError):
        jobs.delete_job("../etc", runs)


def test_duplicate_with_changes(runs):
    info = jobs.submit("quick", {"steps": 2, "value": 1}, name="base", device="cpu", runs_dir=runs)
    wait_status(info.id, runs, "done")
    with sqlite3.connect(runs / "registry.sqlite") as c:  # pretend it had been resumed once: the copy starts fresh
        c.execute("UPDATE jobs SET config = ? WHERE id = ?", (json.dumps({"steps": 2, "value": 1, "resume": True}),
                                                              info.id))
    dup = jobs.duplicate_job(info.id, {"value": 7}, runs, name="variant")
    assert dup.id != info.id and dup.run_dir != info.run_dir
    assert dup.config == {"steps": 2, "value": 7} and dup.name == "variant" and dup.kind == "quick"
    assert wait_status(dup.id, runs, "done").result["value"] == 7
    assert jobs.duplicate_job(info.id, {}, runs).name == "base (copy)"


def test_sigkilled_job_is_detected_as_failed(runs):
    info = jobs.submit("sleepy", {"steps": FOREVER, "dt": 0.05}, device="cpu", runs_dir=runs)
    running = wait_for(lambda: (j := jobs.get_job(info.id, runs)).progress > 0 and j, what="progress")
    os.killpg(running.pid, signal.SIGKILL)
    failed = wait_status(info.id, runs, "failed")
    assert "ended without reporting a result" in failed.error
    assert "Last log lines" in failed.error and "sleepy step" in failed.error
    assert failed.finished is not None and failed.status == "failed"


def test_refresh_detects_a_recycled_pid(runs):
    """A 'running' row whose pid now belongs to another process must not count as alive."""
    info = jobs.submit("quick", {}, device="cpu", runs_dir=runs, start=False)
    with sqlite3.connect(runs / "registry.sqlite") as c:
        c.execute("UPDATE jobs SET status = 'running', pid = ?, proc_start = 1 WHERE id = ?", (os.getpid(), info.id))
    jobs.refresh(runs)
    row = raw_row(runs, info.id)
    assert row["status"] == "failed" and "ended without reporting" in row["error"]


def _submit_many(root: str, extra: str, n: int, barrier, out) -> None:
    os.environ["ENERGYLENS_EXTRA_KINDS"] = extra
    barrier.wait()
    ids = [jobs.submit("quick", {"i": i}, device="cpu", runs_dir=root, start=False).id for i in range(n)]
    out.put(ids)


def test_concurrent_submits_never_share_a_folder(runs):
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(3), ctx.Queue()
    n = 12
    procs = [ctx.Process(target=_submit_many, args=(str(runs), json.dumps(TEST_KINDS), n, barrier, out))
             for _ in range(3)]
    for p in procs:
        p.start()
    ids = [i for _ in procs for i in out.get(timeout=WAIT_S)]
    for p in procs:
        p.join(timeout=WAIT_S)
        assert p.exitcode == 0
    assert len(ids) == len(set(ids)) == 3 * n
    for i in ids:
        assert json.loads((runs / i / "job.json").read_text())["id"] == i
    with sqlite3.connect(runs / "registry.sqlite") as c:
        assert c.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 3 * n


def test_an_external_scheduler_is_reached_through_the_registry(runs, monkeypatch):
    """A third backend is one Scheduler subclass in SCHEDULERS: its rows are never launched by the local queue, and
    refresh, stop and resume reach it through the interface."""
    calls = []

    class Elsewhere(scheduler.Scheduler):
        name, slot = "elsewhere", "elsewhere"

        @classmethod
        def check(cls, params):
            return {"name": "elsewhere"}

        def submit(self, runs_, root, sweep_id, ids):
            for r in runs_:
                ids.append(jobs.submit("quick", r["config"], name=r["name"], device=self.slot, runs_dir=root,
                                       start=False).id)
            return ids

        @classmethod
        def stop(cls, root, job_id, grace=10.0):
            calls.append(("stop", job_id))
            store.mark(root, job_id, "stopped", "cancelled elsewhere")
            return jobs.peek_job(job_id, root)

        @classmethod
        def resubmit(cls, root, job_id):
            calls.append(("resubmit", job_id))
            return jobs.peek_job(job_id, root)

        @classmethod
        def reconcile(cls, root, force=False):
            calls.append(("reconcile", str(root)))
            return 0

    monkeypatch.setitem(jobs.SCHEDULERS, "elsewhere", Elsewhere)
    assert "elsewhere" in jobs.backend_names() and jobs.is_external_slot("elsewhere")
    [jid] = jobs.get_backend({"name": "elsewhere"}).submit([{"config": {}, "name": "x", "sweep": {}}], runs, "s", [])
    info = jobs.get_job(jid, runs)
    assert (info.device, info.status, info.pid) == ("elsewhere", "queued", None), "the local queue never starts it"
    assert ("reconcile", str(runs)) in calls
    assert jobs.stop_job(jid, runs).message == "cancelled elsewhere" and ("stop", jid) in calls
    assert jobs.resume_job(jid, runs).status == "queued" and ("resubmit", jid) in calls
    assert json.loads((runs / jid / "job.json").read_text())["config"]["resume"] is True


def test_id_collision_is_retried(runs, monkeypatch):
    ids = iter(["20250101-000000-quick-dead"] * 3 + ["20250101-000000-quick-beef"])
    monkeypatch.setattr(api, "new_job_id", lambda kind: next(ids))
    a = jobs.submit("quick", {}, device="cpu", runs_dir=runs, start=False)
    b = jobs.submit("quick", {}, device="cpu", runs_dir=runs, start=False)
    assert a.id == "20250101-000000-quick-dead" and b.id == "20250101-000000-quick-beef"


def test_registry_is_consistent_while_a_job_writes(runs):
    # it reports on (at least 2,000 times and 2 s) until the readers have seen it running often enough
    info = jobs.submit("chatty", {"reports": 2000, "seconds": 2.0, "gate": True}, device="cpu", runs_dir=runs)
    seen, errors = [], []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                r = raw_row(runs, info.id)
                j = jobs.list_jobs(runs)[0]
                seen.append((r["progress"], r["updated"], r["status"], j.progress, j.status))
            except Exception as e:  # noqa: BLE001
                errors.append(e)
            time.sleep(0.005)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: sum(s[2] == "running" for s in seen) > 20 or not jobs.get_job(info.id, runs).active,
                 what="the readers to see the job running")
        go(info)
        done = wait_status(info.id, runs, ("done", "failed"))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert done.status == "done" and done.result["reports"] >= 2000 and done.progress == 1.0
    assert all(s[2] in jobs.STATUSES and s[4] in jobs.STATUSES for s in seen)
    assert all(0.0 <= s[0] <= 1.0 and 0.0 <= s[3] <= 1.0 for s in seen)
    running = [s for s in seen if s[2] == "running"]
    assert len(running) > 20
    # progress writes are throttled to ~2/s: a job running for t s shows only about 2 t distinct versions
    budget = (done.finished - done.started) / jobs.REPORT_INTERVAL_S + 5  # + launch, claim, first report
    assert len({s[1] for s in running}) <= budget


def test_reporter_throttles_writes(tmp_path, monkeypatch):
    writes = []
    monkeypatch.setattr(child.Reporter, "write", lambda self, f, m: writes.append((f, m)))
    rep = child.Reporter(tmp_path, "x", os.getpid())
    t0 = time.monotonic()
    for i in range(500):
        rep(i / 499, f"m{i}")
    elapsed = time.monotonic() - t0
    rep.close()
    # the first report at once, then at most one write per interval, and the final state on close
    assert 2 <= len(writes) <= 2 + elapsed / jobs.REPORT_INTERVAL_S + 1
    assert writes[-1] == (1.0, "m499")
    rep2 = child.Reporter(tmp_path, "x", os.getpid())
    writes.clear()
    rep2(float("nan"), "no number")
    rep2(5.0, "clamped")
    rep2.close()
    assert writes[0] == (None, "no number") and writes[-1] == (1.0, "clamped")


def test_unwritable_runs_dir_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ENERGYLENS_EXTRA_KINDS", json.dumps(TEST_KINDS))
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: chmod does not make the folder unwritable")
        with pytest.raises(JobError, match="not writable") as e:
            jobs.submit("quick", {}, device="cpu", runs_dir=ro)
        assert str(ro) in str(e.value)
    finally:
        ro.chmod(0o700)


def test_full_disk_and_bad_runs_dir_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ENERGYLENS_EXTRA_KINDS", json.dumps(TEST_KINDS))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(JobError, match="full") as e:
        jobs.submit("quick", {}, device="cpu", runs_dir=tmp_path / "runs")
    assert str(tmp_path / "runs") in str(e.value)
    monkeypatch.undo()
    monkeypatch.setenv("ENERGYLENS_EXTRA_KINDS", json.dumps(TEST_KINDS))
    nowhere = Path("/proc/energylens-cannot-exist/runs")  # mkdir fails here even for root
    with pytest.raises(JobError, match="cannot create the runs folder") as e:
        jobs.submit("quick", {}, device="cpu", runs_dir=nowhere)
    assert str(nowhere) in str(e.value)
    afile = tmp_path / "a-file"
    afile.write_text("x")
    with pytest.raises(JobError, match=str(afile)):
        jobs.submit("quick", {}, device="cpu", runs_dir=afile)


def test_bad_requests_are_job_errors(runs):
    with pytest.raises(JobError, match="unknown job kind"):
        jobs.submit("nope", {}, runs_dir=runs)
    with pytest.raises(JobError, match="dict"):
        jobs.submit("quick", ["not", "a", "dict"], runs_dir=runs)
    with pytest.raises(JobError, match="device"):
        jobs.submit("quick", {}, device="tpu", runs_dir=runs)
    for bad in ("../x", "a/b", "", ".."):
        with pytest.raises(JobError):
            jobs.get_job(bad, runs)
    with pytest.raises(JobError, match="unknown job"):
        jobs.read_metrics("20250101-000000-quick-0000", runs)
    assert jobs.list_jobs(runs) == []  # a missing runs folder is simply empty


def test_launch_uses_an_argument_list_never_a_shell(runs, monkeypatch):
    calls = []

    class FakePopen:
        pid = 2**22 + 7  # above Linux's pid_max: no such process

        def __init__(self, args, **kwargs):
            calls.append((args, kwargs))

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    info = jobs.submit("quick", {"name": "$(rm -rf /); echo"}, device="cpu", runs_dir=runs)
    assert len(calls) == 1
    args, kwargs = calls[0]
    assert isinstance(args, list) and all(isinstance(a, str) for a in args)
    assert args == [sys.executable, "-m", "core.jobs", "run", str(runs / info.id)]
    assert not kwargs.get("shell", False)
    assert kwargs["start_new_session"] is True
    assert kwargs["cwd"] == str(jobs.REPO_ROOT)
    assert kwargs["env"]["PYTHONUNBUFFERED"] == "1"
    assert info.name == "$(rm -rf /); echo"  # user text only ever lands in files, never on a command line


def _cli(runs: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ENERGYLENS_EXTRA_KINDS": json.dumps(TEST_KINDS)}
    return subprocess.run([sys.executable, "-m", "core.jobs", "--runs-dir", str(runs), *args], capture_output=True,
                          text=True, env=env, cwd=jobs.REPO_ROOT, timeout=WAIT_S)


def test_cli_parity(runs, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"steps": 2, "value": 5}))
    r = _cli(runs, "submit", "quick", "--config", str(cfg), "--name", "from cli", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.split()[0]
    done = wait_status(job_id, runs, "done")
    assert done.name == "from cli" and done.result["value"] == 5
    r = _cli(runs, "list")
    assert r.returncode == 0 and job_id in r.stdout and "done" in r.stdout
    assert json.loads(_cli(runs, "show", job_id).stdout)["status"] == "done"
    r = _cli(runs, "stop", "20250101-000000-quick-none")
    assert r.returncode == 2 and r.stderr.startswith("error: unknown job") and "Traceback" not in r.stderr
    r = _cli(runs, "submit", "quick", "--config", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "cannot read config file" in r.stderr
    assert _cli(runs, "delete", job_id).returncode == 0
    assert not (runs / job_id).exists()


def test_registry_recreated_or_corrupt(runs):
    a = jobs.submit("quick", {}, device="cpu", runs_dir=runs, start=False)
    for f in runs.glob("registry.sqlite*"):
        f.unlink()
    # rebuilt from the job folders (tests/test_bad_inputs.py has the running-job case); a rebuild never starts
    # anything, so the queued job comes back stopped, to be resumed
    [j] = jobs.list_jobs(runs)
    assert (j.id, j.status) == (a.id, "stopped") and "resume it" in j.message
    assert "rebuilt" in (jobs.registry_notice(runs) or "")
    b = jobs.submit("quick", {}, device="cpu", runs_dir=runs, start=False)
    assert [j.id for j in jobs.list_jobs(runs)] == [b.id, a.id]
    wait_status(b.id, runs, "done")
    for f in runs.glob("registry.sqlite*"):
        f.unlink()
    (runs / "registry.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(JobError, match="corrupt") as e:
        jobs.list_jobs(runs)
    assert str(runs / "registry.sqlite") in str(e.value)


def test_a_queued_job_has_no_running_time(runs):
    """Issue 13 item 10: a resumed job waiting for its slot keeps its old start time, but its running time
    does not count while it waits (it showed the time since its first start, growing while queued)."""
    b = jobs.submit("sleepy", {"steps": FOREVER, "dt": 0.1}, device="cpu", runs_dir=runs)
    wait_for(lambda: jobs.get_job(b.id, runs).progress > 0, what="progress")
    jobs.stop_job(b.id, runs, grace=WAIT_S)
    a = jobs.submit("sleepy", {"steps": FOREVER, "dt": 0.05}, device="cpu", runs_dir=runs)  # holds the only cpu slot
    wait_status(a.id, runs, ("running",))
    queued = jobs.resume_job(b.id, runs)
    jobs.refresh(runs)  # the scheduler looks again (a waiting job may not start; its running time must not grow)
    queued = jobs.get_job(b.id, runs)
    assert queued.status == "queued" and queued.started is not None
    assert queued.duration is None
    never = jobs.submit("quick", {}, device="cpu", runs_dir=runs)
    assert jobs.get_job(never.id, runs).status == "queued" and jobs.get_job(never.id, runs).duration is None
    assert jobs.get_job(a.id, runs).duration > 0
    for j in (never, queued, a):
        jobs.stop_job(j.id, runs, grace=5)


@pytest.mark.parametrize("kind, config, needle", [
    ("train", {"dataset": "digits", "epochs": -1}, "epochs must be a positive integer"),
    ("train", {"dataset": "digits", "bogus_option": 1}, "unknown training option"),
    ("sgld", {"classes": []}, "sgld config refused"),
])
def test_a_bad_config_is_refused_before_anything_is_queued(runs_dir, kind, config, needle):
    with pytest.raises(JobError, match=needle):
        jobs.submit(kind, config, runs_dir=runs_dir)
    assert jobs.list_jobs(runs_dir) == []
    # the command line says it in one line, exit code 2
    cfg = runs_dir.parent / "bad.json"
    cfg.write_text(json.dumps(config))
    out = subprocess.run([sys.executable, "-m", "core.jobs", "--runs-dir", str(runs_dir), "submit", kind, "--config",
                          str(cfg)], cwd=jobs.REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
