"""The ``slurm`` backend of sweeps: a Slurm cluster through ``submitit``.

One array job per sweep (``array_parallelism`` tasks at a time), ``partition``, ``gpus_per_job``, ``time``
(minutes or ``[D-]HH:MM:SS``) and the other sbatch settings below. A run that is preempted or reaches its time
limit is requeued and resumes from its last checkpoint (the job's ``resume``: ``state.pt`` of the last
finished epoch); a run with ``nproc`` > 1 trains with ``torchrun`` inside its allocation. ``cluster: local``
runs the same code through submitit's local executor (subprocesses on this machine): for trying a sweep file
and for the tests.

It writes the same registry (``<runs>/registry.sqlite``) and job folders as the local queue, so status, logs
and stop work the same from the pages and the CLI. The runs folder must be on a filesystem that the login
node and every compute node share (set ``ENERGYLENS_RUNS`` or ``--runs-dir``), and the nodes must see the
same EnergyLens checkout and Python environment (submitit starts the interpreter that submitted).

A Slurm row's device slot is ``slurm``: the local queue never launches it; its node writes its status (the
job process claims the row as any job process does), and :meth:`SlurmScheduler.reconcile` asks Slurm
(``squeue`` / ``sacct``) about rows whose task ended without recording an outcome (node failure, a cancelled
pending job, ...). Everything about the scheduler side of a row is in ``<run>/backend.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import EnergyLensError, InputError, JobError
from ..paths import REPO_ROOT
from . import api, files, process, store
from .scheduler import RUNNER, Scheduler, check_backend, register
from .store import JobInfo

__all__ = ["SlurmScheduler", "NodeTask", "parse_time_minutes", "slurm_available", "BACKEND_FILE", "TERMINAL"]

BACKEND_FILE = "backend.json"
RECONCILE_EVERY_S = 10.0
_EXTRA_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "FINISHED", "INTERRUPTED"}


# ============================================================================================
# Settings
# ============================================================================================
def parse_time_minutes(value: Any) -> int:
    """A Slurm time limit as whole minutes: 90, '90', '01:30:00', '1-00:00:00', '30:00' (MM:SS)."""
    if isinstance(value, bool):
        raise InputError(f"time must be minutes or [D-]HH:MM:SS, got {value!r}")
    if isinstance(value, (int, float)):
        minutes = float(value)
    else:
        s = str(value).strip()
        m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
        if not m:
            raise InputError(f"time must be minutes or [D-]HH:MM:SS (e.g. 240 or '04:00:00'), got {value!r}")
        days, a, b, c = (int(x) if x else None for x in m.groups())
        if b is None:              # 'M' or 'D-H'
            minutes = (days or 0) * 1440 + (a * 60 if days is not None else a)
        elif c is None:            # 'MM:SS' (Slurm) or 'D-HH:MM'
            minutes = (days or 0) * 1440 + (a * 60 + b if days is not None else a + b / 60)
        else:                      # 'HH:MM:SS'
            minutes = (days or 0) * 1440 + a * 60 + b + c / 60
    if not minutes >= 1:
        raise InputError(f"time limit must be at least 1 minute, got {value!r}")
    return int(round(minutes))


def slurm_available() -> str | None:
    """None when sbatch and squeue work here, else the reason."""
    for tool in ("sbatch", "squeue"):
        if not shutil.which(tool):
            return f"'{tool}' is not on PATH: this machine is not a Slurm login node"
    try:
        r = subprocess.run(["squeue", "-h", "-o", "%i", "-u", str(os.getuid())], capture_output=True, text=True,
                           timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"squeue failed: {e}"
    if r.returncode != 0:
        return f"squeue failed: {(r.stderr or r.stdout).strip()[:300]}"
    return None


# ============================================================================================
# The scheduler
# ============================================================================================
@register
class SlurmScheduler(Scheduler):
    """Slurm through submitit: the rows are created here, the work runs in :class:`NodeTask` on the nodes."""

    name = "slurm"
    keys = frozenset({"name", "cluster", "partition", "gpus_per_job", "cpus_per_job", "mem_gb", "time",
                      "array_parallelism", "folder", "max_requeues", "account", "qos", "constraint", "setup", "extra",
                      "job_name"})
    slot = "slurm"

    @classmethod
    def check(cls, params: dict) -> dict:
        b = params
        out: dict[str, Any] = {"name": "slurm", "cluster": str(b.get("cluster") or "slurm")}
        if out["cluster"] not in ("slurm", "local"):
            raise InputError(f"slurm backend cluster must be 'slurm' (a real cluster) or 'local' (submitit's local "
                             f"executor, for tests), got '{out['cluster']}'")

        def integer(k, default, lo, hi):
            v = b.get(k, default)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise InputError(f"slurm backend {k} must be an integer in [{lo}, {hi}], got {v!r}")
            return v

        out["gpus_per_job"] = integer("gpus_per_job", 1, 0, 64)
        out["cpus_per_job"] = integer("cpus_per_job", 8, 1, 512)
        out["array_parallelism"] = integer("array_parallelism", 64, 1, 10_000)
        out["max_requeues"] = integer("max_requeues", 3, 0, 100)
        if b.get("mem_gb") is not None:
            out["mem_gb"] = integer("mem_gb", None, 1, 100_000)
        out["time"] = parse_time_minutes(b.get("time", 240))
        for k in ("partition", "account", "qos", "constraint", "folder", "job_name"):
            v = b.get(k)
            if v is not None:
                if not isinstance(v, str) or not v.strip() or any(c in v for c in "\n\r\0"):
                    raise InputError(f"slurm backend {k} must be a non-empty one-line string, got {v!r}")
                out[k] = v.strip()
        setup = b.get("setup") or []
        if isinstance(setup, str):
            setup = [setup]
        if not isinstance(setup, list) or not all(isinstance(x, str) for x in setup):
            raise InputError("slurm backend setup must be a list of shell lines run before each task (e.g. 'module "
                             "load cuda')")
        out["setup"] = list(setup)
        extra = b.get("extra") or {}
        if not isinstance(extra, dict):
            raise InputError("slurm backend extra must be a mapping of further sbatch options, e.g. {exclusive: true}")
        for k, v in extra.items():  # each becomes a '#SBATCH --key=value' line: one line, nothing else
            if not isinstance(k, str) or not _EXTRA_KEY.fullmatch(k):
                raise InputError(f"slurm backend extra: {str(k)[:80]!r} is not an sbatch option name (letters, "
                                 "digits, '-' and '_')")
            if isinstance(v, bool) or v is None:
                continue
            if isinstance(v, (int, float)):
                continue
            if not isinstance(v, str) or len(v) > 1000 or any(ord(c) < 32 or ord(c) == 127 for c in v):
                raise InputError(f"slurm backend extra {k} must be true, a number or a one-line string without "
                                 f"control characters, got {str(v)[:80]!r}")
        out["extra"] = dict(extra)
        return out

    def executor(self, root: Path, sweep_id: str, array: bool = True):
        """submitit's executor for these settings (a SlurmExecutor, or a LocalExecutor for ``cluster: local``)
        and the folder of its logs and pickles."""
        try:
            import submitit  # lazy: only the slurm backend needs submitit, and it costs an import elsewhere
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise JobError("the slurm backend needs the submitit package (pip install submitit)") from e
        p = self.params
        folder = Path(p.get("folder") or (root / "sweeps" / sweep_id / "submitit")).expanduser()
        # the nodes import this checkout's core (the same path on the shared filesystem)
        setup = [f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"] \
            + list(p.get("setup") or [])
        if p["cluster"] == "local":
            # no setup lines here: with them the local executor runs a shell whose pid is not the controller's
            # (stop could not reach it); its tasks start in this process's folder and environment instead
            ex = submitit.LocalExecutor(folder=str(folder), max_num_timeout=p["max_requeues"])
            ex.update_parameters(timeout_min=p["time"], gpus_per_node=p["gpus_per_job"],
                                 **({"signal_delay_s": int(p["extra"]["signal_delay_s"])}
                                    if "signal_delay_s" in p["extra"] else {}))
            return ex, folder
        ex = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=p["max_requeues"])
        kw: dict[str, Any] = {"time": p["time"], "gpus_per_node": p["gpus_per_job"] or None, "ntasks_per_node": 1,
                              "cpus_per_task": p["cpus_per_job"], "setup": setup, "signal_delay_s": 120,
                              "job_name": p.get("job_name") or f"energylens-{sweep_id}"[:60]}
        if array:
            kw["array_parallelism"] = p["array_parallelism"]
        for k in ("partition", "account", "qos", "constraint"):
            if p.get(k):
                kw[k] = p[k]
        if p.get("mem_gb"):
            kw["mem"] = f"{p['mem_gb']}G"
        extra = {k: v for k, v in p["extra"].items() if k != "signal_delay_s"}
        if extra:
            kw["additional_parameters"] = extra
        ex.update_parameters(**{k: v for k, v in kw.items() if v is not None})
        return ex, folder

    def submit(self, runs: list[dict], root: Path, sweep_id: str, ids: list[str]) -> list[str]:
        if self.params["cluster"] == "slurm":
            why = slurm_available()
            if why:
                raise JobError(f"cannot submit to Slurm: {why}. Run this on a login node of the cluster, or use the "
                               "local backend")
        new: list[str] = []
        for r in runs:
            info = api.submit("train", r["config"], name=r["name"], device=self.slot, runs_dir=root, start=False,
                              target=RUNNER, extra={"sweep": r["sweep"], "backend": self.params})
            new.append(info.id)
            ids.append(info.id)
        try:
            ex, folder = self.executor(root, sweep_id)  # inside: an unwritable folder fails the rows, not the page
            with ex.batch():  # one array job on Slurm
                tasks = [ex.submit(NodeTask(str(root), jid)) for jid in new]
        except Exception as e:  # noqa: BLE001 - sbatch errors come as RuntimeError / FailedJobError / OSError
            msg = f"submitting to {'Slurm' if self.params['cluster'] == 'slurm' else 'submitit (local)'} failed: " \
                  f"{str(e).strip()[:500]}"
            for jid in new:
                store.mark(root, jid, "failed", "could not be submitted", error=msg)
            raise JobError(msg) from e
        for jid, t in zip(new, tasks):
            _record_submission(root, jid, self.params, folder, t)
        return ids

    # ---------------------------------------------------------------- rows whose slot is 'slurm'
    @classmethod
    def stop(cls, root: Path, job_id: str, grace: float = 10.0) -> JobInfo:
        """Stop a Slurm-backed row: cancel its task (scancel, or the local executor's controller), stop its job
        process when it runs on this machine, wait for it to record 'stopped', else mark it stopped."""
        root = Path(root)
        folder = root / job_id
        bk = _read_backend_file(folder)
        row = store.row(root, job_id)
        if row is None:
            raise JobError(f"unknown job '{job_id}' in {root}")
        if row["status"] == "queued" and not bk.get("scheduler_id"):  # not (yet) handed to the scheduler
            store.mark(root, job_id, "stopped", "stopped by user before it was submitted to the scheduler")
            return store.get(root, job_id)
        here = bk.get("host") == socket.gethostname()
        if row["status"] == "running" and here and _local_alive(row["pid"], row["proc_start"]):
            process.signal_group(int(row["pid"]), signal.SIGTERM)  # the job process unwinds and records 'stopped'
        err = _cancel_scheduler(bk)
        deadline = time.monotonic() + max(1.0, float(grace)) + 5.0
        while time.monotonic() < deadline:
            r = store.row(root, job_id)
            if r is None or r["status"] not in ("queued", "running"):
                break
            time.sleep(0.2)
        r = store.row(root, job_id)
        if r is not None and r["status"] == "running" and here and _local_alive(r["pid"], r["proc_start"]):
            process.signal_group(int(r["pid"]), signal.SIGKILL)
        msg = "stopped by user" + (f" ({err})" if err else " (cancelled in the scheduler)")
        store.mark(root, job_id, "stopped", msg)
        if err:
            store.set_message(root, job_id, msg)
        return store.get(root, job_id)

    @classmethod
    def resubmit(cls, root: Path, job_id: str) -> JobInfo:
        """Submit a resumed Slurm-backed row again (core.jobs.resume_job queued it with ``resume``)."""
        root = Path(root)
        spec = files.read_job_file(root / job_id)
        params = check_backend(spec.get("backend") or {"name": "slurm"})
        sweep_id = (spec.get("sweep") or {}).get("id") or "resumed"
        be = cls(params)
        if params["cluster"] == "slurm":
            why = slurm_available()
            if why:
                store.mark(root, job_id, "failed", "could not be submitted", error=f"cannot submit to Slurm: {why}")
                raise JobError(f"cannot submit to Slurm: {why}")
        try:
            ex, folder = be.executor(root, sweep_id, array=False)
            task = ex.submit(NodeTask(str(root), job_id))
        except Exception as e:  # noqa: BLE001
            msg = f"resubmitting failed: {str(e).strip()[:500]}"
            store.mark(root, job_id, "failed", "could not be submitted", error=msg)
            raise JobError(msg) from e
        _record_submission(root, job_id, params, folder, task)
        return store.get(root, job_id)

    @classmethod
    def reconcile(cls, root: Path, force: bool = False) -> int:
        """Rows of Slurm still queued/running whose task ended without recording an outcome become failed
        (stopped when cancelled), with the scheduler's state and the log tail. Throttled (every
        :data:`RECONCILE_EVERY_S` s per runs folder) unless ``force``. Returns how many rows changed."""
        root = Path(root)
        key = str(root)
        with _reconcile_lock:
            now = time.monotonic()
            if not force and now - _last_reconcile.get(key, -1e9) < RECONCILE_EVERY_S:
                return 0
            _last_reconcile[key] = now
        try:
            rows = store.active_rows_on_slot(root, cls.slot)
        except EnergyLensError:
            return 0
        changed = 0
        for r in rows:
            folder = root / r["id"]
            bk = _read_backend_file(folder)
            if not bk.get("scheduler_id"):
                continue  # being submitted right now
            here = bk.get("host") == socket.gethostname()
            if r["status"] == "running" and here and _local_alive(r["pid"], r["proc_start"]):
                continue
            state = _scheduler_state(bk)
            base = state.split("+")[0]
            if base not in TERMINAL:
                continue
            time.sleep(0.5)  # the job process may be recording its outcome right now
            cur = store.row(root, r["id"])
            if cur is None or cur["status"] not in ("queued", "running"):
                continue
            tail = "\n".join(files.log_tail_lines(folder, 20)) or "(the log is empty)"
            logs = bk.get("folder")
            where = f"Slurm job {bk.get('scheduler_id')}" if bk.get("cluster") != "local" else \
                f"submitit local job {bk.get('scheduler_id')}"
            if base == "CANCELLED":
                changed += store.mark(root, r["id"], "stopped", f"cancelled in the scheduler ({where})")
            else:
                changed += store.mark(root, r["id"], "failed", f"the {where} ended ({state})",
                                      error=f"the {where} ended with state {state} without recording a result (node "
                                            f"failure, out of memory, time limit without requeue, or a crash before "
                                            f"the run started). submitit's logs: {logs}. Resume the run to submit it "
                                            f"again.\n\nLast log lines:\n{tail}")
        return changed


_last_reconcile: dict[str, float] = {}
_reconcile_lock = threading.Lock()


# ============================================================================================
# backend.json
# ============================================================================================
def _record_submission(root: Path, job_id: str, params: dict, folder: Path, task) -> None:
    sid = str(task.job_id)
    info = {"backend": "slurm", "cluster": params["cluster"], "scheduler_id": sid, "folder": str(folder),
            "submitted": time.time(), "params": params}
    if params["cluster"] == "local":  # the controller process of submitit's local executor
        with contextlib.suppress(ValueError):
            info["controller_start"] = process.proc_start_time(int(sid))
    with contextlib.suppress(OSError):
        files.atomic_json(root / job_id / BACKEND_FILE, info)
    where = f"Slurm job {sid}" if params["cluster"] == "slurm" else f"submitit local job {sid}"
    store.set_message(root, job_id, f"submitted as {where}: waiting for its allocation")


def _read_backend_file(folder: Path) -> dict:
    try:
        d = json.loads((folder / BACKEND_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return d if isinstance(d, dict) else {}


def _update_backend_file(folder: Path, **fields) -> None:
    d = _read_backend_file(folder)
    d.update(fields)
    with contextlib.suppress(OSError):
        files.atomic_json(folder / BACKEND_FILE, d)


# ============================================================================================
# On the node
# ============================================================================================
class NodeTask:
    """What submitit runs in the allocation: ``python -m core.jobs run <run folder>`` (which claims the row,
    runs :func:`core.sweep.run_cell` and records the outcome), its output appended to the run's log.txt.

    On preemption or time-out submitit calls :meth:`checkpoint`: the job process is stopped (it leaves its
    last finished epoch in state.pt), the row is queued again with ``resume`` and the same task is
    requeued, so the next allocation continues where this one stopped."""

    STOP_WAIT_S = 60.0

    def __init__(self, root: str, job_id: str, attempt: int = 0):
        self.root, self.job_id, self.attempt = str(root), str(job_id), int(attempt)
        self._proc: subprocess.Popen | None = None

    def __getstate__(self):
        return {"root": self.root, "job_id": self.job_id, "attempt": self.attempt}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._proc = None

    def __repr__(self) -> str:
        return f"NodeTask({self.job_id!r}, attempt {self.attempt})"

    def __call__(self) -> dict:
        root, folder = Path(self.root), Path(self.root) / self.job_id
        row = store.row(root, self.job_id)
        if row is None:
            raise JobError(f"job {self.job_id} is not in the registry {root}: was it deleted?")
        restarted = self.attempt > 0 or int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
        if row["status"] == "done":
            return {"job_id": self.job_id, "status": "done", "note": "already done"}
        if row["status"] != "queued":
            if not restarted:  # stopped by the user while it waited for its allocation
                return {"job_id": self.job_id, "status": row["status"], "note": "not run"}
            store.requeue_row(root, self.job_id, "requeued after preemption or a time limit: resumes from its last "
                                                 "checkpoint")
        sched_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID") or "?"
        if os.environ.get("SLURM_ARRAY_JOB_ID"):
            sched_id = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '?')}"
        _update_backend_file(folder, host=socket.gethostname(), started=time.time(), attempt=self.attempt,
                             task_id=sched_id, restarts=int(os.environ.get("SLURM_RESTART_COUNT") or 0))
        env = process.job_env(self.job_id, SlurmScheduler.slot)
        cmd = [sys.executable, "-m", "core.jobs", "run", str(folder)]
        with open(folder / files.LOG_FILE, "ab") as log:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} task {sched_id} on {socket.gethostname()} "
                      f"(attempt {self.attempt + 1}) running job {self.job_id} ===\n".encode())
            log.flush()
            self._proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=env, stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        try:
            # poll, not Popen.wait(): submitit's signal handler (checkpoint) runs in this thread and must be able to
            # reap the job process, which it could not while an outer wait() held Popen's wait lock
            while self._proc.poll() is None:
                time.sleep(0.5)
            rc = self._proc.returncode
        finally:
            self._terminate()  # a task that is killed or interrupted takes its job process with it
        row = store.row(root, self.job_id)
        return {"job_id": self.job_id, "status": row["status"] if row is not None else "?", "returncode": rc}

    def _terminate(self) -> None:
        p = self._proc
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(OSError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=self.STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on preemption / time-out: stop the job process, queue the row with resume."""
        import submitit  # lazy: only the slurm backend needs submitit (here: inside a task, which has it loaded)

        msg = "preempted or out of time: requeued, resumes from its last checkpoint"
        # queued first, so that the row never reads 'stopped' in between (the job process's own 'stopped' only
        # updates a row that is still running); state.pt holds the last finished epoch
        store.requeue_row(Path(self.root), self.job_id, msg)
        self._terminate()
        store.requeue_row(Path(self.root), self.job_id, msg)  # its job-state.json too, which the job process rewrote
        return submitit.helpers.DelayedSubmission(NodeTask(self.root, self.job_id, self.attempt + 1))


# ============================================================================================
# The scheduler side of a row
# ============================================================================================
def _local_alive(pid: int | None, start: int | None) -> bool:
    return bool(pid) and process.process_matches(int(pid), start)


def _cancel_scheduler(bk: dict) -> str | None:
    """Cancel the scheduler's job of a row; returns an error text or None."""
    sid = bk.get("scheduler_id")
    if not sid:
        return None
    if bk.get("cluster") == "local":
        try:
            pid = int(sid)
        except ValueError:
            return None
        if _local_alive(pid, bk.get("controller_start")):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGINT)  # submitit's controller stops its tasks on SIGINT
        return None
    if not shutil.which("scancel"):
        return "scancel is not on PATH (not a Slurm login node?): cancel the Slurm job by hand"
    try:
        r = subprocess.run(["scancel", str(sid)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scancel {sid} failed: {e}"
    return None if r.returncode == 0 else f"scancel {sid} failed: {(r.stderr or r.stdout).strip()[:300]}"


def _scheduler_state(bk: dict) -> str:
    """The scheduler's state of a row's task: RUNNING / PENDING / a terminal state / UNKNOWN."""
    sid = bk.get("scheduler_id")
    if not sid:
        return "UNKNOWN"
    if bk.get("cluster") == "local":
        try:
            return "RUNNING" if _local_alive(int(sid), bk.get("controller_start")) else "FINISHED"
        except ValueError:
            return "UNKNOWN"
    try:
        r = subprocess.run(["squeue", "-h", "-j", str(sid), "-o", "%T"], capture_output=True, text=True, timeout=20)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.split()[0].strip().upper()
        r = subprocess.run(["sacct", "-n", "-P", "-X", "-j", str(sid), "-o", "State"], capture_output=True, text=True,
                           timeout=20)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.split()[0].split(" ")[0].strip().upper()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "UNKNOWN"
