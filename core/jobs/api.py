"""The public API of the job system: submit, list, get, stop, resume, delete, duplicate, read.

Every function takes an optional ``runs_dir`` (default: env ``ENERGYLENS_RUNS``, else ``<repo>/runs``).
Reads start with :func:`refresh`, which reconciles the registry with reality: rows of this machine's job
processes through core.jobs.reconcile, rows of an external scheduler through that scheduler
(core.jobs.scheduler); stop and resume hand external rows to their scheduler the same way.

Runners are named by import strings ``"package.module:function"`` in :data:`KINDS` and imported only
inside the job process (core.jobs.child). ``ENERGYLENS_EXTRA_KINDS`` (a JSON object ``{kind: target}``) adds
or overrides kinds; a target may also be a file path ``"/path/to/file.py:function"``. The target is recorded
in ``job.json`` at submission, so a queued job always runs the runner it was submitted with.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import secrets
import shutil
import signal
import time
from pathlib import Path

from ..errors import EnergyLensError, JobError
from ..rundir import RunDir
from . import files, process, reconcile, store
from .files import clean_text, job_dir
from .reconcile import max_jobs_per_device
from .scheduler import external_slots, is_external_slot, scheduler_for_slot
from .store import JobInfo, registry_notice

__all__ = ["KINDS", "JobInfo", "available_kinds", "submit", "list_jobs", "get_job", "peek_job", "refresh",
           "stop_job", "resume_job", "delete_job", "duplicate_job", "read_metrics", "read_log_tail", "job_dir",
           "max_jobs_per_device", "registry_notice", "clean_text", "is_external_slot", "resolve_device", "new_job_id",
           "CHECKS", "check_config"]

KINDS: dict[str, str] = {
    "train": "core.train:run_job",
    "eval": "core.evaluation:run_job",
    "landscape": "core.analysis:run_landscape_job",
    "sgld": "core.sampling:run_job",
    "subset": "core.analysis:run_subset_job",
}

# Each kind's config check, named like its runner (loaded by name: the job system imports nothing above it). submit()
# runs it before anything is queued, so a bad config is refused at once with the check's message, from the CLI as
# from the pages, instead of failing later in the job process.
CHECKS: dict[str, str] = {
    "train": "core.train:check_job_config",
    "eval": "core.evaluation:check_job_config",
    "sgld": "core.sampling:check_job_config",
}

ENV_EXTRA_KINDS = "ENERGYLENS_EXTRA_KINDS"
STOP_GRACE_S = 10.0          # SIGTERM -> SIGKILL delay of stop_job


# ============================================================================================
# Configuration helpers
# ============================================================================================
def available_kinds() -> dict[str, str]:
    """:data:`KINDS` merged with the JSON object in env ``ENERGYLENS_EXTRA_KINDS``."""
    kinds = dict(KINDS)
    extra = os.environ.get(ENV_EXTRA_KINDS, "").strip()
    if extra:
        try:
            more = json.loads(extra)
        except json.JSONDecodeError as e:
            raise JobError(f"{ENV_EXTRA_KINDS} is not valid JSON: {e}") from e
        if not isinstance(more, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in more.items()):
            raise JobError(f'{ENV_EXTRA_KINDS} must be a JSON object {{"kind": "module:function"}}')
        kinds.update(more)
    return kinds


def check_config(kind: str, config: dict) -> None:
    """Run the kind's config check (:data:`CHECKS`); JobError with its message when the config is refused."""
    module, _, name = CHECKS[kind].partition(":")
    try:
        getattr(importlib.import_module(module), name)(config)
    except EnergyLensError as e:
        raise JobError(f"{kind} config refused: {e}") from e


def resolve_device(device: str | None, config: dict) -> str:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a slot name 'cpu' or 'cuda:N' (an external slot such as 'slurm' is
    kept: its scheduler runs the job)."""
    d = str(device or "auto").strip().lower()
    if is_external_slot(d):
        return d
    if d == "auto":
        cd = config.get("device")
        if isinstance(cd, str) and cd.strip().lower() not in ("", "auto"):
            d = cd.strip().lower()
    if d == "auto":
        return "cuda:0" if process.cuda_count() > 0 else "cpu"
    if d == "cpu":
        return "cpu"
    m = re.fullmatch(r"cuda(?::(\d+))?", d)
    if not m:
        raise JobError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got '{device}'")
    idx = int(m.group(1) or 0)
    n = process.cuda_count()
    if n == 0:
        raise JobError(f"device '{d}' was requested but no GPU is available: use 'cpu' or 'auto'")
    if idx >= n:
        raise JobError(f"device '{d}' does not exist: this machine has {n} GPU(s) (cuda:0..cuda:{n - 1})")
    return f"cuda:{idx}"


# ============================================================================================
# Reconcile
# ============================================================================================
def refresh(runs_dir: str | os.PathLike | None = None) -> None:
    """Reconcile the registry with reality and start queued jobs whose device slot is free.

    A job marked running whose process is gone (killed, crashed, a zombie, or a pid now used by a
    different process) becomes 'failed' with the last log lines as its error. Cheap when there is
    nothing to do: one read query and a /proc lookup per running job. Rows of an external scheduler are
    reconciled by it (throttled; never from inside a job process).
    """
    root = files.runs_dir(runs_dir)
    process.reap_children()
    with store.connect(root) as conn:
        if conn is None:
            return
        if reconcile.work_pending(conn):
            reconcile.reconcile_and_launch(conn, root)
        external = [s for s in external_slots() if store.has_active_on_slot(conn, s)]
    if external and not os.environ.get("ENERGYLENS_JOB_ID"):
        for slot in external:  # rows of an external scheduler: ask it
            scheduler_for_slot(slot).reconcile(root)


# ============================================================================================
# Submit
# ============================================================================================
def _prepare_runs_dir(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise JobError(f"cannot create the runs folder {root}: {e.strerror or e}. Choose a writable folder "
                       f"(env {files.ENV_RUNS}).") from e
    if not root.is_dir():
        raise JobError(f"the runs folder {root} is not a folder")
    if not os.access(root, os.W_OK | os.X_OK):
        raise JobError(f"the runs folder {root} is not writable: fix its permissions or choose another folder "
                       f"(env {files.ENV_RUNS}).")
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = None
    if free is not None and free < files.MIN_FREE_BYTES:
        raise JobError(f"the disk holding the runs folder {root} is full ({free / 2**20:.1f} MiB free): "
                       "delete old runs or choose another folder.")


def new_job_id(kind: str) -> str:
    """A fresh job id (its folder's name): ``<YYYYmmdd-HHMMSS>-<kind>-<8 random hex digits>``."""
    safe_kind = re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "job"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{safe_kind}-{secrets.token_hex(4)}"


def _new_job_folder(root: Path, kind: str) -> tuple[str, Path]:
    """Create a fresh, uniquely named job folder (mkdir without exist_ok, retried on a collision)."""
    for _ in range(64):
        job_id = new_job_id(kind)
        folder = root / job_id
        try:
            folder.mkdir(exist_ok=False)
        except FileExistsError:
            continue
        except OSError as e:
            raise JobError(f"cannot create a job folder in {root}: {e.strerror or e}") from e
        return job_id, folder
    raise JobError(f"could not find a free job folder name in {root}")


def submit(kind: str, config: dict, *, name: str | None = None, device: str = "auto",
           runs_dir: str | os.PathLike | None = None, start: bool = True, target: str | None = None,
           extra: dict | None = None) -> JobInfo:
    """Create a job folder and registry row (status 'queued') and, if ``start``, launch it when its slot is free.

    ``device`` picks the slot ('auto' uses ``config['device']`` when that names a device, else
    cuda:0 when available, else cpu). With ``start=False`` the job only waits in the queue; the next
    :func:`refresh` or a finishing job starts it. Raises JobError for an unknown kind, a config that is
    not a JSON object, or a runs folder that is not writable or on a full disk.

    ``target`` replaces the kind's runner for this job (e.g. core.sweep's, which trains then evaluates) and
    ``extra`` adds fields to its job.json (read by that runner), both written before the job can start.
    """
    kinds = available_kinds()
    if kind not in kinds:
        raise JobError(f"unknown job kind '{kind}': choose one of {', '.join(sorted(kinds))}")
    if not isinstance(config, dict):
        raise JobError(f"a job config must be a dict (a JSON object), got {type(config).__name__}")
    try:
        config = json.loads(json.dumps(config, default=files.json_default))
    except (TypeError, ValueError) as e:
        raise JobError(f"the job config cannot be stored as JSON: {e}") from e
    if target is None and kind in CHECKS and kinds[kind] == KINDS.get(kind):   # the check of the built-in runner
        check_config(kind, config)
    slot = resolve_device(device, config)
    root = files.runs_dir(runs_dir)
    _prepare_runs_dir(root)
    now = time.time()
    label = (name if name is not None else config.get("name")) or ""
    label = clean_text(label, 200).strip() or f"{kind} {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}"
    with store.connect(root, create=True) as conn:
        job_id, folder = _new_job_folder(root, kind)
        try:
            files.write_job_file(folder, {**(extra or {}), "format": 1, "id": job_id, "kind": kind,
                                          "target": target or kinds[kind], "name": label, "device": slot,
                                          "created": now, "config": config})
            try:
                (folder / files.LOG_FILE).touch()
            except OSError as e:
                raise JobError(f"cannot create {folder / files.LOG_FILE}: {e.strerror or e}") from e
            files.write_state(folder, status="queued", created=now)
            with store.transaction(conn):
                store.insert_queued(conn, job_id, kind, label, slot, now, config)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
    if start:
        refresh(root)
    return store.get(root, job_id)


# ============================================================================================
# Read
# ============================================================================================
def list_jobs(runs_dir: str | os.PathLike | None = None, kind: str | None = None) -> list[JobInfo]:
    """All jobs, newest first (after :func:`refresh`); ``kind`` filters."""
    root = files.runs_dir(runs_dir)
    refresh(root)
    with store.connect(root) as conn:
        if conn is None:
            return []
        rows = store.list_rows(conn, kind)
    return [store.row_to_info(r, root) for r in rows]


def get_job(job_id: str, runs_dir: str | os.PathLike | None = None) -> JobInfo:
    """One job (after :func:`refresh`); JobError when unknown."""
    root = files.runs_dir(runs_dir)
    job_dir(job_id, root)
    refresh(root)
    return store.get(root, job_id)


def peek_job(job_id: str, runs_dir: str | os.PathLike | None = None) -> JobInfo:
    """One job as the registry has it, without :func:`refresh` (for a loop over many jobs after one refresh,
    or a read that must start nothing); JobError when unknown."""
    return store.get(files.runs_dir(runs_dir), job_id)


def read_metrics(job_id: str, runs_dir: str | os.PathLike | None = None) -> list[dict]:
    """The records of ``<run_dir>/metrics.jsonl`` (a torn last line is skipped); [] before the first."""
    folder = job_dir(job_id, runs_dir)
    if not folder.is_dir():
        raise JobError(f"unknown job '{job_id}': {folder} does not exist")
    return RunDir(folder).read_metrics()


def read_log_tail(job_id: str, n: int = 50, runs_dir: str | os.PathLike | None = None) -> str:
    """The last ``n`` lines of the job's log (progress-bar redraws collapsed to their last state)."""
    folder = job_dir(job_id, runs_dir)
    if not folder.is_dir():
        raise JobError(f"unknown job '{job_id}': {folder} does not exist")
    return "\n".join(files.log_tail_lines(folder, int(n)))


# ============================================================================================
# Control
# ============================================================================================
def stop_job(job_id: str, runs_dir: str | os.PathLike | None = None, *, grace: float | None = None) -> JobInfo:
    """Stop a job: a queued one leaves the queue; a running one gets SIGTERM on its process group
    (the runner unwinds through :class:`core.jobs.JobStopped`), then SIGKILL after ``grace`` seconds
    (default :data:`STOP_GRACE_S`). The status becomes 'stopped'. Finished jobs are returned unchanged.
    A row of an external scheduler is stopped by that scheduler.
    """
    root = files.runs_dir(runs_dir)
    grace = STOP_GRACE_S if grace is None else max(0.0, float(grace))
    refresh(root)
    row = store.row(root, job_id)
    if row is not None and is_external_slot(row["device"]) and row["status"] in ("queued", "running"):
        # queued or running in the external scheduler: cancel it there
        return scheduler_for_slot(row["device"]).stop(root, job_id, grace=grace)
    for _ in range(3):
        with store.connect(root) as conn:
            row = store.fetch(conn, job_id) if conn is not None else None
            if row is None:
                raise JobError(f"unknown job '{job_id}' in {root}")
            if row["status"] == "queued":
                with store.transaction(conn):
                    now = time.time()
                    stopped = store.stop_queued(conn, job_id, now)
                if stopped:
                    files.write_state(root / job_id, status="stopped", finished=now,
                                      message="stopped before it started")
                    return store.get(root, job_id)
                continue  # it was started meanwhile: stop the running process instead
            if row["status"] != "running":
                return store.row_to_info(row, root)
            pid, pstart = row["pid"], row["proc_start"]
        if process.process_matches(pid, pstart):
            process.signal_group(pid, signal.SIGTERM)
            if not process.wait_gone(pid, pstart, grace):
                process.signal_group(pid, signal.SIGKILL)
                process.wait_gone(pid, pstart, 10.0)
        with store.connect(root) as conn:
            with store.transaction(conn):
                now = time.time()
                stopped = store.stop_running(conn, job_id, pid, now)
        if stopped:
            files.write_state(root / job_id, status="stopped", pid=pid, finished=now, message="stopped by user")
        refresh(root)  # the slot is free: start what waits for it
        return store.get(root, job_id)
    raise JobError(f"could not stop job '{job_id}': its state kept changing; try again")


def resume_job(job_id: str, runs_dir: str | os.PathLike | None = None) -> JobInfo:
    """Re-queue a stopped or failed job in the same folder with ``config['resume'] = True`` (a row of an
    external scheduler is submitted to it again)."""
    root = files.runs_dir(runs_dir)
    refresh(root)
    info = store.get(root, job_id)
    if info.status not in ("stopped", "failed"):
        raise JobError(f"job '{job_id}' is {info.status}: only stopped or failed jobs can be resumed")
    folder = root / job_id
    if not folder.is_dir():
        raise JobError(f"the folder of job '{job_id}' ({folder}) no longer exists: it cannot be resumed")
    config = {**info.config, "resume": True}
    try:
        spec = files.read_job_file(folder)
    except JobError:  # rebuild a lost job.json from the registry
        spec = {"format": 1, "id": job_id, "kind": info.kind, "target": available_kinds().get(info.kind),
                "name": info.name, "device": info.device, "created": info.created}
    spec["config"] = config
    files.write_job_file(folder, spec)
    with store.connect(root) as conn:
        with store.transaction(conn):
            requeued = store.requeue(conn, job_id, config, "queued (resume)", only_if=("stopped", "failed"))
    if not requeued:
        raise JobError(f"job '{job_id}' changed state while being resumed; try again")
    files.write_state(folder, status="queued", pid=None, proc_start=None, finished=None, error=None, result=None,
                      message="queued (resume)")
    if is_external_slot(info.device):
        # the local queue never runs it: submit it to its scheduler again
        return scheduler_for_slot(info.device).resubmit(root, job_id)
    refresh(root)
    return store.get(root, job_id)


def delete_job(job_id: str, runs_dir: str | os.PathLike | None = None) -> None:
    """Remove a job's registry row and folder. Refuses (JobError) while the job is running."""
    root = files.runs_dir(runs_dir)
    folder = job_dir(job_id, root)
    refresh(root)
    with store.connect(root) as conn:
        row = store.fetch(conn, job_id) if conn is not None else None
        if row is None:
            raise JobError(f"unknown job '{job_id}' in {root}")
        if row["status"] == "running":
            raise JobError(f"job '{job_id}' is running: stop it before deleting it")
        # refuse before anything is removed (nothing half-done): a folder that is a link, or leads outside root
        if folder.is_symlink() or (folder.exists() and folder.resolve().parent != root):
            target = os.readlink(folder) if folder.is_symlink() else folder.resolve()
            raise JobError(f"refusing to delete job '{job_id}': its folder {folder} is "
                           f"{'a symbolic link to ' if folder.is_symlink() else 'outside '}{target}"
                           f"{'' if folder.is_symlink() else f' (not inside {root})'}. Nothing was deleted; remove "
                           "the link or folder yourself if you mean to")
        with store.transaction(conn):
            deleted = store.delete_row(conn, job_id)
    if not deleted:
        raise JobError(f"job '{job_id}' started meanwhile: stop it before deleting it")
    if folder.exists():
        try:
            shutil.rmtree(folder)
        except OSError as e:
            raise JobError(f"job '{job_id}' was removed from the registry but its folder {folder} could not be "
                           f"deleted: {e.strerror or e}") from e


def duplicate_job(job_id: str, changes: dict, runs_dir: str | os.PathLike | None = None,
                  name: str | None = None) -> JobInfo:
    """Submit a new job of the same kind and device with ``config`` updated by ``changes``.

    A ``resume`` flag set by :func:`resume_job` is not copied unless ``changes`` sets it.
    """
    root = files.runs_dir(runs_dir)
    if not isinstance(changes, dict):
        raise JobError(f"changes must be a dict, got {type(changes).__name__}")
    info = store.get(root, job_id)
    config = dict(info.config)
    if "resume" not in changes:
        config.pop("resume", None)
    config.update(changes)
    if name is None:
        name = f"{info.name} (copy)"
    # a copy of a run that a scheduler ran (a sweep on Slurm) is an ordinary local job
    return submit(info.kind, config, name=name, device="auto" if is_external_slot(info.device) else info.device,
                  runs_dir=root)
