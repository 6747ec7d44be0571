"""The local queue: reconcile the rows of this machine's job processes and launch queued jobs.

Each job holds a *device slot* (``cpu`` or ``cuda:N``). At most ``ENERGYLENS_MAX_JOBS_PER_DEVICE`` jobs
(default 1) run per slot; the others wait in the queue, first submitted first started. A row marked running
whose process is gone gets the outcome its job process left in job-state.json (when the registry could not
be written, e.g. on a full disk), else 'failed' with the last log lines. Rows of an external scheduler's slot
(core.jobs.scheduler) are left alone: their processes live on other machines.

(Kept apart from core.jobs.process, which store's registry rebuild needs for process identity, so that
process -> store -> reconcile imports in one direction.)
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections import Counter
from pathlib import Path

from ..errors import JobError
from . import files, process, store
from .scheduler import is_external_slot

__all__ = ["ENV_MAX_JOBS", "max_jobs_per_device", "work_pending", "reconcile_and_launch"]

ENV_MAX_JOBS = "ENERGYLENS_MAX_JOBS_PER_DEVICE"


def max_jobs_per_device() -> int:
    """How many jobs may run at once on one device slot (env ENERGYLENS_MAX_JOBS_PER_DEVICE, default 1)."""
    raw = os.environ.get(ENV_MAX_JOBS, "").strip()
    try:
        return max(1, int(raw)) if raw else 1
    except ValueError:
        return 1


def crash_message(pid: int | None, run_dir: Path) -> str:
    """The error of a job whose process (``pid``) ended without recording an outcome: why, and the log's tail."""
    lines = files.log_tail_lines(run_dir, files.ERROR_LOG_LINES)
    tail = "\n".join(lines) or "(the log is empty)"
    logged = files.logged_disk_full(lines)
    full = files.disk_full_text(run_dir.parent)
    if logged:  # the disk filled up: that is the cause, not "killed (out of memory ...)"
        why = "; ".join(x for x in (full, f"its log says: {logged[:300]}") if x)
        return (f"the job process (pid {pid}) ended without reporting a result because the disk was full ({why}). "
                "Free some space, then resume the job.\n\nLast log lines:\n" + tail)
    if full:
        return (f"the job process (pid {pid}) ended without reporting a result while {full}: most likely it could "
                "not write (free some space, then resume the job); otherwise it was killed (out of memory, by hand, "
                f"or the machine restarted) or it crashed.\n\nLast log lines:\n{tail}")
    return (f"the job process (pid {pid}) ended without reporting a result: it was killed (out of memory, "
            f"by hand, or the machine restarted) or it crashed.\n\nLast log lines:\n{tail}")


def dead_job_outcome(r: sqlite3.Row, root: Path) -> tuple[str, str | None, str | None, str]:
    """(status, error, result JSON, message) for a 'running' row whose process is gone: the outcome the job
    process recorded in its job-state.json when the registry could not be written (a full disk), else a crash."""
    folder = root / r["id"]
    state = files.read_state(folder)
    if state is not None and state.get("status") in files.FINISHED and state.get("pid") == r["pid"]:
        res = state.get("result")
        return (state["status"], state.get("error"), None if res is None else files.dumps(res),
                str(state.get("message") or state["status"]))
    return "failed", crash_message(r["pid"], folder), None, "the job process disappeared"


def reconcile_and_launch(conn: sqlite3.Connection, root: Path) -> None:
    """In one transaction: fail dead 'running' rows, then start queued jobs whose slot has room."""
    with store.transaction(conn):
        now = time.time()
        busy: Counter[str] = Counter()
        for r in store.rows_with_status(conn, "running"):
            if is_external_slot(r["device"]):
                continue  # its process lives on another machine: its scheduler reconciles it
            if process.process_matches(r["pid"], r["proc_start"]):
                busy[r["device"]] += 1
            else:
                status, error, result, message = dead_job_outcome(r, root)
                store.record_outcome(conn, r["id"], status, now, error, result, message)
                files.release_ballast(root / r["id"])  # the reserve of a process that was killed
                if status == "failed":
                    files.write_state(root / r["id"], status="failed", finished=now, error=error, message=message)
        cap = max_jobs_per_device()
        for r in store.rows_with_status(conn, "queued"):
            if busy[r["device"]] >= cap or is_external_slot(r["device"]):
                continue
            try:
                pid, pstart = process.launch(root, r["id"], r["kind"], r["device"])
            except JobError as e:
                store.mark_not_started(conn, r["id"], now, str(e))
                continue
            store.mark_launched(conn, r["id"], pid, pstart, now)
            files.write_state(root / r["id"], status="running", pid=pid, proc_start=pstart, started=now, finished=None,
                              error=None, result=None, message="starting")
            busy[r["device"]] += 1


def work_pending(conn: sqlite3.Connection) -> bool:
    """Cheap read-only check: is there a dead 'running' row or a queued job with a free slot?"""
    rows = [r for r in store.active_rows(conn) if not is_external_slot(r["device"])]
    if not rows:
        return False
    busy: Counter[str] = Counter()
    for r in rows:
        if r["status"] == "running":
            if not process.process_matches(r["pid"], r["proc_start"]):
                return True
            busy[r["device"]] += 1
    cap = max_jobs_per_device()
    return any(r["status"] == "queued" and busy[r["device"]] < cap for r in rows)

