"""Background jobs: long work runs in its own OS process, writes to disk, and the dashboard polls.

A *job* is one call of a *runner* ``run_job(config, run_dir, report) -> dict | None`` in a fresh
Python process started as ``python -m core.jobs run <run_dir>``. ``report(fraction, message)``
publishes progress; whatever the runner writes into ``run_dir`` (metrics, checkpoints, plots) stays
there. The process is launched in its own session, so it outlives the dashboard that started it, and
it can be stopped (SIGTERM to its process group, SIGKILL after a grace period) and resumed.

On disk, under the runs folder (``<repo>/runs``; override with env ``ENERGYLENS_RUNS`` or the
``runs_dir=`` argument of every function)::

    registry.sqlite          one row per job (WAL mode; every write in a transaction)
    <job id>/job.json        kind, runner, name, device and config (written atomically)
    <job id>/job-state.json  status, pid, error and result, mirrored from the registry row (atomically)
    <job id>/log.txt         stdout + stderr of the job process (appended on every launch)
    <job id>/backend.json    the external scheduler's side of a row (Slurm)
    <job id>/...             whatever the runner writes

Who writes what: the job process updates its own row (status, pid, progress, message, result,
error); the dashboard or the CLI only submit, stop, resume, delete, and *reconcile*
(:func:`refresh`): a row marked running whose process is gone is marked failed with the last log
lines, and queued jobs whose device slot is free are started. A job process that finishes starts the
next queued job itself, so a queue drains without any daemon.

The modules, each importing only those above it::

    files       the runs folder and a job folder's files (job.json, job-state.json, log.txt, temp files)
    process     job processes on this machine: launch, pid identity, signals, reaping
    store       the registry (the only SQL): rows, transactions, named writes, rebuild from the job folders
    scheduler   the Scheduler interface of sweep backends and their registry (SCHEDULERS)
    reconcile   the local queue: dead processes -> outcome, launch of queued jobs
    api         submit / list_jobs / get_job / stop_job / resume_job / ... (re-exported here)
    local       the 'local' scheduler (this machine's queue)
    slurm       the 'slurm' scheduler (submitit), NodeTask, stop / resubmit / reconcile of Slurm rows
    child       inside the job process: claim, run the runner, record the outcome
    cli         the command line; __main__ wires in core.sweep's sweep commands

A new scheduler: one module with a :class:`Scheduler` subclass decorated with ``@register`` (see
core.jobs.scheduler), and its name in the ``from . import local, slurm`` line below.
"""

from __future__ import annotations

from . import api, child, cli, files, process, reconcile, scheduler, store  # noqa: F401 - core.jobs.<module>
from . import local, slurm  # noqa: F401 - the schedulers: importing a module registers it in SCHEDULERS
from .api import (KINDS, available_kinds, delete_job, duplicate_job, get_job, list_jobs, peek_job, read_log_tail,
                  read_metrics, refresh, resume_job, stop_job, submit)
from .child import REPORT_INTERVAL_S, JobStopped, stop_requested
from .files import (FINISHED, REPO_ROOT, RUNS_DIR, STATUSES, atomic_json, clean_text, job_dir, read_job_file,
                    remove_stale_temp_files, runs_dir)
from .reconcile import max_jobs_per_device
from .scheduler import SCHEDULERS, Scheduler, backend_names, check_backend, get_backend, is_external_slot, register
from .store import JobInfo, registry_notice

__all__ = ["RUNS_DIR", "REPO_ROOT", "KINDS", "STATUSES", "FINISHED", "REPORT_INTERVAL_S", "JobInfo", "JobStopped",
           "available_kinds", "submit", "list_jobs", "get_job", "peek_job", "refresh", "stop_job", "resume_job",
           "delete_job", "duplicate_job", "read_metrics", "read_log_tail", "job_dir", "runs_dir", "atomic_json", "read_job_file",
           "max_jobs_per_device", "stop_requested", "registry_notice", "clean_text", "remove_stale_temp_files",
           "is_external_slot", "Scheduler", "SCHEDULERS", "register", "backend_names", "check_backend",
           "get_backend"]
