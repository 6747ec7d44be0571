"""Job processes on this machine: launch, identity, signals, reaping.

A job runs as ``python -m core.jobs run <run_dir>`` in its own session (it outlives the dashboard that
started it). A process is identified by its pid *and* its start time from ``/proc/<pid>/stat``, so that a
recycled pid is never taken for the job; without /proc (macOS) only its existence is checked.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..errors import JobError
from ..paths import REPO_ROOT
from . import files

__all__ = ["HAS_PROC", "launch", "reap_children", "read_proc_stat", "proc_start_time", "process_matches",
           "job_processes", "signal_group", "wait_gone", "cuda_count", "job_env"]

HAS_PROC = os.path.isdir("/proc/self")

_children: dict[int, subprocess.Popen] = {}
_children_lock = threading.Lock()


def reap_children() -> None:
    """Collect exit statuses of job processes this process launched (no zombies are left behind)."""
    with _children_lock:
        for pid, proc in list(_children.items()):
            try:
                done = proc.poll() is not None
            except Exception:  # noqa: BLE001 - a stand-in object without a real process
                done = True
            if done:
                del _children[pid]


def read_proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) from /proc, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    fields = data[data.rfind(")") + 2:].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def proc_start_time(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (None without /proc or when it is gone)."""
    st = read_proc_stat(pid) if HAS_PROC else None
    return st[1] if st else None


def process_matches(pid: int | None, proc_start: int | None) -> bool:
    """True when ``pid`` is alive, not a zombie, and (when known) the very process that was launched."""
    if not pid or pid <= 0:
        return False
    with _children_lock:
        proc = _children.get(pid)
    if proc is not None:
        try:
            if proc.poll() is not None:
                with _children_lock:
                    _children.pop(pid, None)
                return False
        except Exception:  # noqa: BLE001
            pass
    if HAS_PROC:
        st = read_proc_stat(pid)
        if st is None:
            return False
        state, start = st
        if state in ("Z", "X", "x"):
            return False
        return proc_start is None or start == proc_start
    try:  # no /proc (macOS...): existence only
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def job_processes() -> dict[str, tuple[int, int | None]]:
    """Live ``python -m core.jobs run <folder>`` processes: resolved folder -> (pid, start time), from /proc."""
    found: dict[str, tuple[int, int | None]] = {}
    if not HAS_PROC:
        return found
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        args = [a.decode("utf-8", "replace") for a in args if a]
        for i in range(len(args) - 3):
            if args[i] == "-m" and args[i + 1] == "core.jobs" and args[i + 2] == "run":
                st = read_proc_stat(pid)
                if st is not None and st[0] not in ("Z", "X", "x"):
                    with contextlib.suppress(OSError):
                        found[str(Path(args[i + 3]).resolve())] = (pid, st[1])
                break
    return found


def job_env(job_id: str, device: str) -> dict[str, str]:
    """The environment of a job process: this one's, unbuffered, with the job's id and slot and this checkout
    first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["ENERGYLENS_JOB_ID"] = job_id
    env["ENERGYLENS_JOB_DEVICE"] = device
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def launch(root: Path, job_id: str, kind: str, device: str) -> tuple[int, int | None]:
    """Start ``python -m core.jobs run <run_dir>`` for a claimed row; returns (pid, start time)."""
    run_dir = root / job_id
    if not (run_dir / files.JOB_FILE).is_file():
        raise JobError(f"the job folder {run_dir} or its {files.JOB_FILE} is missing")
    if not sys.executable:
        raise JobError("cannot find the Python interpreter (sys.executable is empty) to start the job")
    env = job_env(job_id, device)
    cmd = [sys.executable, "-m", "core.jobs", "run", str(run_dir)]
    try:
        log = open(run_dir / files.LOG_FILE, "ab")
    except OSError as e:
        raise JobError(f"cannot open the log file in {run_dir}: {e.strerror or e}") from e
    try:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"=== {stamp} launching {kind} job {job_id} on {device} ===\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    except OSError as e:
        raise JobError(f"could not start the job process: {e.strerror or e}") from e
    finally:
        log.close()
    with _children_lock:
        _children[proc.pid] = proc
    return proc.pid, proc_start_time(proc.pid)


def signal_group(pid: int, sig: int) -> None:
    """Send ``sig`` to the job process ``pid`` and, when it leads its own process group, to all of that group."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    try:
        if pgid == pid:  # the job leads its own session/group: reach its children too
            os.killpg(pgid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as e:
        raise JobError(f"not allowed to signal the job process {pid} (it belongs to another user)") from e


def wait_gone(pid: int, proc_start: int | None, timeout: float) -> bool:
    """Wait up to ``timeout`` s for the process to end; True when it did."""
    deadline = time.monotonic() + timeout
    while process_matches(pid, proc_start):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def cuda_count() -> int:
    """How many CUDA GPUs this machine has (0 without torch or CUDA)."""
    try:
        import torch  # lazy: torch takes seconds to import; only resolving an 'auto' or 'cuda' device needs it
    except ImportError:  # pragma: no cover - torch is a hard dependency of the engine
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
