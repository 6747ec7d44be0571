"""The slurm backend (core.jobs.slurm) through submitit's local executor, and on a real single-node Slurm when one
can be started here.

The local executor runs the very code a Slurm node runs (core.jobs.slurm.NodeTask unpickled by submitit in a
separate process, the job process it starts, the registry rows it writes); only sbatch/squeue are replaced by
subprocesses of this machine. Each test trains a tiny digits model for real.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from core import jobs, sweep
from test_sweep import TINY_EVAL  # the smallest evaluation a sweep cell can run

REPO = Path(__file__).resolve().parents[1]
TINY_BASE = {"dataset": "digits", "arch": "smallcnn", "epochs": 1, "batch_size": 64, "train_limit": 256,
             "eval_samples": 64, "probe_size": 40, "attack_steps": 2, "eval_steps": 2, "threads": 1}
LOCAL_SLURM = {"name": "slurm", "cluster": "local", "gpus_per_job": 0, "time": 10}

pytestmark = pytest.mark.slow


@pytest.fixture
def runs(runs_dir, monkeypatch):
    d = runs_dir
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.chdir(REPO)  # submitit's tasks start in this folder and import this checkout's core
    yield d
    # leave nothing running: stop what is still active, then wait for (or end) submitit's controllers
    try:
        for j in jobs.list_jobs(d):
            if j.active:
                jobs.stop_job(j.id, d, grace=5)
    except Exception:  # noqa: BLE001 - best effort clean-up
        pass
    for f in d.glob("*/backend.json"):
        pid = int(json.loads(f.read_text()).get("scheduler_id") or 0)
        t0 = time.time()
        while pid and not gone(pid) and time.time() - t0 < 20:
            time.sleep(0.2)
        if pid and not gone(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def wait_for(pred, timeout: float, what: str, every: float = 0.5):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def only_job(rec: dict) -> str:
    assert len(rec["cells"]) == 1 and rec["cells"][0]["job_id"]
    return rec["cells"][0]["job_id"]


def final(job_id: str, runs, timeout: float = 900.0):
    def done():
        info = jobs.get_job(job_id, runs)
        return info if not info.active else None

    try:
        return wait_for(done, timeout, f"job {job_id} to finish")
    except AssertionError:
        raise AssertionError(jobs.read_log_tail(job_id, 40, runs)) from None


def gone(pid) -> bool:
    """The process has exited (a zombie not yet reaped by its parent counts as gone)."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2:].split()[0] in ("Z", "X")


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rfind(")") + 2:].split()[1])


def test_slurm_backend_runs_a_sweep_through_submitit_and_registers_it(runs):
    spec = sweep.parse_spec({"name": "sub", "base": TINY_BASE, "grid": {"method": ["sat"], "seed": [0]},
                             "evaluate": TINY_EVAL, "backend": LOCAL_SLURM})
    rec = sweep.submit_sweep(spec, runs)
    jid = only_job(rec)
    first = jobs.get_job(jid, runs)
    assert first.device == "slurm" and first.kind == "train"       # an ordinary row of the same registry
    info = final(jid, runs)
    assert info.status == "done", info.error
    assert info.result["eval"]["n"] == 32 and info.result["train"]["epoch"] == 1
    folder = runs / jid
    bk = json.loads((folder / "backend.json").read_text())
    assert bk["cluster"] == "local" and bk["scheduler_id"] and bk["host"]
    sub = Path(bk["folder"])
    # submitit saw its task complete (the row is done a moment before the task returns)
    wait_for(lambda: (sub / f"{bk['scheduler_id']}_0_result.pkl").is_file(), 60, "submitit's result file")
    log = (folder / "log.txt").read_text()
    assert f"task {bk['scheduler_id']} on" in log and f"job {jid} done" in log
    assert (folder / "result.json").is_file() and (folder / "best.safetensors").is_file()
    s = sweep.status(rec["id"], runs)
    assert s["counts"] == {"done": 1} and s["cells"][0]["aa"] is not None
    assert len(sweep.table(rec["id"], runs)) == 1


def test_a_preempted_run_is_requeued_and_resumes_from_its_last_epoch(runs):
    """SIGUSR2 is what Slurm (submitit's --signal) sends before a time limit or on preemption: the task stops its
    job process, queues the row with resume, and submitit requeues it; the next attempt continues training."""
    base = {**TINY_BASE, "epochs": 6, "train_limit": 512}
    spec = sweep.parse_spec({"name": "pre", "base": base, "grid": {"seed": [0]}, "evaluate": False,
                             "backend": LOCAL_SLURM})
    jid = only_job(sweep.submit_sweep(spec, runs))
    folder = runs / jid
    probe1 = folder / "probe" / "epoch_0001.npz"
    wait_for(lambda: (folder / "state.pt").is_file() and probe1.is_file(), 600, "the first epoch", every=0.2)
    mtime = probe1.stat().st_mtime_ns
    info = jobs.get_job(jid, runs)
    assert info.status == "running"
    task = _ppid(info.pid)                         # the submitit task that started the job process
    os.kill(task, signal.SIGUSR2)
    info = final(jid, runs)
    assert info.status == "done", info.error
    log = (folder / "log.txt").read_text()
    assert "(attempt 1)" in log and "(attempt 2)" in log, log[-2000:]
    assert f"job {jid} stopped" in log              # the first attempt's job process was stopped ...
    epochs = [json.loads(ln)["epoch"] for ln in (folder / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4, 5, 6]
    assert probe1.stat().st_mtime_ns == mtime       # ... and the second resumed (epoch 1 was not trained again)
    assert json.loads((folder / "job.json").read_text())["config"]["resume"] is True


def test_stop_and_resume_reach_the_scheduler(runs):
    base = {**TINY_BASE, "epochs": 40, "train_limit": 512}
    spec = sweep.parse_spec({"name": "stop", "base": base, "grid": {"seed": [0]}, "evaluate": False,
                             "backend": LOCAL_SLURM})
    jid = only_job(sweep.submit_sweep(spec, runs))
    folder = runs / jid
    wait_for(lambda: (folder / "state.pt").is_file(), 600, "the first epoch", every=0.2)
    info = jobs.get_job(jid, runs)
    child = info.pid
    bk = json.loads((folder / "backend.json").read_text())
    stopped = jobs.stop_job(jid, runs, grace=10)
    assert stopped.status == "stopped"
    wait_for(lambda: gone(child), 120, "the job process to end")
    wait_for(lambda: gone(bk["scheduler_id"]), 120, "submitit's controller to end")
    done_epochs = len((folder / "metrics.jsonl").read_text().splitlines())
    assert done_epochs < 40  # the stop interrupted the run (counted in epochs, not timed in seconds)
    # resume: submitted again (a new submitit job), continues from state.pt; shorten it by editing nothing but
    # waiting a little, then stop again to keep the test short -- what matters is that it ran again
    resumed = jobs.resume_job(jid, runs)
    assert resumed.status == "queued" and "submitted as submitit local job" in resumed.message
    bk2 = json.loads((folder / "backend.json").read_text())
    assert bk2["scheduler_id"] != bk["scheduler_id"]
    wait_for(lambda: len((folder / "metrics.jsonl").read_text().splitlines()) > done_epochs, 600,
             "the resumed run's next epoch")
    epochs = [json.loads(ln)["epoch"] for ln in (folder / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, len(epochs) + 1))   # continued, not restarted
    assert jobs.stop_job(jid, runs, grace=10).status == "stopped"


def test_a_task_that_dies_without_recording_is_marked_failed(runs, monkeypatch):
    """A node that vanishes (here: every process of the task SIGKILLed) leaves the row 'running'; asking the
    scheduler finds the task gone and marks the row failed with the reason and the log tail."""
    from core.jobs import slurm
    from core.jobs.slurm import SlurmScheduler

    # only the forced check below asks the scheduler: the throttled one that reading a row triggers (every
    # RECONCILE_EVERY_S s) would otherwise win the race whenever this machine is slow
    monkeypatch.setattr(slurm, "RECONCILE_EVERY_S", float("inf"))

    base = {**TINY_BASE, "epochs": 40, "train_limit": 512}
    spec = sweep.parse_spec({"name": "dies", "base": base, "grid": {"seed": [0]}, "evaluate": False,
                             "backend": LOCAL_SLURM})
    jid = only_job(sweep.submit_sweep(spec, runs))
    folder = runs / jid
    wait_for(lambda: jobs.get_job(jid, runs).status == "running" and (folder / "state.pt").is_file(), 600,
             "the run to start")
    info = jobs.get_job(jid, runs)
    bk = json.loads((folder / "backend.json").read_text())
    task = _ppid(info.pid)
    for pid in (int(bk["scheduler_id"]), task):
        os.kill(pid, signal.SIGKILL)
    os.killpg(info.pid, signal.SIGKILL)
    wait_for(lambda: gone(bk["scheduler_id"]) and gone(task) and gone(info.pid), 30, "the task's processes to die")
    assert jobs.get_job(jid, runs).status == "running"  # nothing recorded the end
    # the local queue leaves external rows alone, so only the scheduler check can tell
    assert SlurmScheduler.reconcile(runs, force=True) == 1
    info = jobs.get_job(jid, runs)
    assert info.status == "failed"
    assert "ended with state FINISHED without recording a result" in info.error and "Last log lines" in info.error


# ============================================================================================ real Slurm
def _start_single_node_slurm(tmp: Path, started: list) -> str | None:
    """Configure and start munged + slurmctld + slurmd with one node on localhost (what this starts is appended to
    ``started`` for the clean-up); None when Slurm answers, else why it could not be started."""
    missing = [t for t in ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scontrol") if not shutil.which(t)]
    if missing:
        return (f"Slurm is not installed here ({', '.join(missing)} not on PATH; Debian: apt-get install slurmctld "
                "slurmd slurm-client munge)")
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd/munged needs root here"
    if subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode == 0:
        return "a slurmctld already runs on this machine: not touching it"
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip() or "localhost"
    conf = tmp / "slurm.conf"
    for d in ("state", "spool", "log"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    ncpu = os.cpu_count() or 1
    conf.write_text(f"""ClusterName=energylens-test
SlurmctldHost={host}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
ReturnToService=2
StateSaveLocation={tmp / 'state'}
SlurmdSpoolDir={tmp / 'spool'}
SlurmctldPidFile={tmp / 'slurmctld.pid'}
SlurmdPidFile={tmp / 'slurmd.pid'}
SlurmctldLogFile={tmp / 'log' / 'slurmctld.log'}
SlurmdLogFile={tmp / 'log' / 'slurmd.log'}
SlurmUser=root
NodeName={host} CPUs={ncpu} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    os.environ["SLURM_CONF"] = str(conf)
    key = Path("/etc/munge/munge.key")
    try:
        if not key.exists():
            subprocess.run(["mungekey", "--create"], check=True, capture_output=True, timeout=30)
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            Path("/run/munge").mkdir(parents=True, exist_ok=True)   # its socket folder (no systemd here)
            with contextlib.suppress(KeyError, OSError):
                import pwd

                u = pwd.getpwnam("munge")
                os.chown("/run/munge", u.pw_uid, u.pw_gid)
            subprocess.run(["munged", "--force", "--pid-file", str(tmp / "munged.pid")], check=True,
                           capture_output=True, timeout=30)
            started.append(("munged", tmp / "munged.pid"))
        subprocess.run(["slurmctld"], check=True, capture_output=True, timeout=30)
        started.append(("slurm", conf))
        subprocess.run(["slurmd"], check=True, capture_output=True, timeout=30)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        err = getattr(e, "stderr", b"") or b""
        return f"could not start munged/slurmctld/slurmd: {e} {err.decode(errors='replace')[:300]}"
    t0 = time.time()
    r = None
    while time.time() - t0 < 30:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip() in ("idle", "mixed"):
            return None
        time.sleep(1)
    return f"slurmd did not register with slurmctld within 30 s (sinfo: {r.stdout.strip() or r.stderr.strip()})"


def _stop_slurm(started: list) -> None:
    for what, path in reversed(started):
        if what == "slurm":   # let the jobs end, then slurmctld and slurmd
            env = {**os.environ, "SLURM_CONF": str(path)}
            t0 = time.time()
            while time.time() - t0 < 120:
                q = subprocess.run(["squeue", "-h"], capture_output=True, text=True, env=env)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(1)
            subprocess.run(["scontrol", "shutdown"], capture_output=True, timeout=60, env=env)
            for pidfile in (path.parent / "slurmd.pid", path.parent / "slurmctld.pid"):
                with contextlib.suppress(OSError, ValueError):
                    pid = int(pidfile.read_text().strip())
                    t0 = time.time()
                    while not gone(pid) and time.time() - t0 < 30:
                        time.sleep(0.5)
                    if not gone(pid):
                        os.kill(pid, signal.SIGKILL)
        elif what == "munged":
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(Path(path).read_text().strip()), signal.SIGTERM)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    started: list = []
    old = os.environ.get("SLURM_CONF")
    why = _start_single_node_slurm(tmp_path_factory.mktemp("slurm"), started)
    try:
        if why:
            print(f"SKIPPED real Slurm tests: {why}")
            pytest.skip(why)
        yield
    finally:
        _stop_slurm(started)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


def test_real_single_node_slurm(slurm, runs):
    spec = sweep.parse_spec({"name": "real", "base": TINY_BASE, "grid": {"seed": [0, 1]}, "evaluate": TINY_EVAL,
                             "backend": {"name": "slurm", "partition": "debug", "gpus_per_job": 0, "cpus_per_job": 1,
                                         "time": 10}})
    rec = sweep.submit_sweep(spec, runs)
    array = set()
    for c in rec["cells"]:
        info = final(c["job_id"], runs, timeout=600)
        assert info.status == "done", info.error
        bk = json.loads((runs / c["job_id"] / "backend.json").read_text())
        array.add(bk["scheduler_id"].split("_")[0])
        assert f"task {bk['scheduler_id']} on" in (runs / c["job_id"] / "log.txt").read_text()
    assert len(array) == 1            # one array job for the sweep
    assert len(sweep.table(rec["id"], runs)) == 1


def test_real_slurm_preemption_requeues_and_resumes(slurm, runs):
    """submitit's own preemption drill on a real Slurm: SIGTERM then SIGUSR2 to the job (scancel --signal);
    submitit checkpoints, 'scontrol requeue's it, and the requeued job resumes from the last finished epoch."""
    import submitit

    base = {**TINY_BASE, "epochs": 6}
    spec = sweep.parse_spec({"name": "real-pre", "base": base, "grid": {"seed": [0]}, "evaluate": False,
                             "backend": {"name": "slurm", "partition": "debug", "gpus_per_job": 0, "cpus_per_job": 1,
                                         "time": 10}})
    jid = only_job(sweep.submit_sweep(spec, runs))
    folder = runs / jid
    probe1 = folder / "probe" / "epoch_0001.npz"
    wait_for(lambda: (folder / "state.pt").is_file() and probe1.is_file(), 600, "the first epoch", every=0.2)
    mtime = probe1.stat().st_mtime_ns
    bk = json.loads((folder / "backend.json").read_text())
    submitit.SlurmJob(bk["folder"], bk["scheduler_id"])._interrupt()
    # Slurm's SIGTERM reaches the job process before submitit's USR2, so the row may read 'stopped' for a moment
    # before the task queues it again; Slurm then holds the requeued job for about two minutes
    wait_for(lambda: "(attempt 2)" in (folder / "log.txt").read_text(), 900, "the requeued attempt")
    info = final(jid, runs, timeout=900)
    assert info.status == "done", info.error
    log = (folder / "log.txt").read_text()
    assert "(attempt 1)" in log and "(attempt 2)" in log, log[-2000:]
    epochs = [json.loads(ln)["epoch"] for ln in (folder / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4, 5, 6]
    assert probe1.stat().st_mtime_ns == mtime
    # the row said done before the task returned: let Slurm see the job end too
    wait_for(lambda: not subprocess.run(["squeue", "-h", "-j", bk["scheduler_id"]], capture_output=True,
                                        text=True).stdout.strip(), 120, "the Slurm job to leave the queue")
