"""The runs folder and the files of a job folder (no SQL, no processes).

Under the runs folder (``<repo>/runs``; env ``ENERGYLENS_RUNS`` or the ``runs_dir=`` argument)::

    <job id>/job.json        kind, runner, name, device and config (written atomically)
    <job id>/job-state.json  status, pid, error and result, mirrored from the registry row (atomically)
    <job id>/log.txt         stdout + stderr of the job process (appended on every launch)
    <job id>/.job-state.reserve   room kept free to record the outcome on a full disk

Everything here is plain files and stdlib only: the CLI and a job process never import torch through it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from ..errors import JobError
from ..paths import DEFAULT_RUNS_DIR, ENV_RUNS, REPO_ROOT
from ..paths import runs_dir as configured_runs_dir
from ..storage import atomic_write_json, dumps, json_default, remove_stale_temp_files

__all__ = ["REPO_ROOT", "RUNS_DIR", "ENV_RUNS", "STATUSES", "FINISHED", "JOB_FILE", "STATE_FILE", "LOG_FILE",
           "runs_dir", "job_dir", "job_folders", "clean_text", "json_default", "dumps", "atomic_json", "read_state",
           "write_state", "make_ballast", "release_ballast", "remove_stale_temp_files", "write_job_file",
           "read_job_file", "log_tail_lines", "free_bytes", "disk_full_text"]

RUNS_DIR = DEFAULT_RUNS_DIR

STATUSES = ("queued", "running", "done", "failed", "stopped")
FINISHED = ("done", "failed", "stopped")

JOB_FILE = "job.json"
STATE_FILE = "job-state.json"
LOG_FILE = "log.txt"
BALLAST_FILE = ".job-state.reserve"  # room kept free so that the outcome can be recorded on a full disk
BALLAST_BYTES = 256 * 1024
ERROR_LOG_LINES = 20         # log lines attached to the error of a failed job
MIN_FREE_BYTES = 16 * 2**20  # refuse to submit when less than this is free on the runs disk

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# ANSI escape sequences (CSI, OSC, two-byte) and other terminal control characters, incl. bidi overrides
_ANSI_RE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?|\x9b[0-?]*[ -/]*[@-~]")
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")
_DISK_FULL_MARKERS = ("no space left on device", "disk is full", "database or disk is full", "errno 28",
                      "disk quota exceeded")


# ============================================================================================
# Paths
# ============================================================================================
def runs_dir(runs_dir: str | os.PathLike | None = None) -> Path:
    """The runs folder, resolved: ``runs_dir`` when given, else env ``ENERGYLENS_RUNS``, else ``<repo>/runs``."""
    return configured_runs_dir(runs_dir).resolve()


def job_dir(job_id: str, runs_dir: str | os.PathLike | None = None) -> Path:
    """The folder of a job (it may not exist). Rejects ids that are not plain folder names."""
    if not isinstance(job_id, str) or not ID_RE.match(job_id) or job_id in (".", ".."):
        raise JobError(f"invalid job id {job_id!r}")
    return _runs_dir(runs_dir) / job_id


_runs_dir = runs_dir  # job_dir's parameter shadows the function's name


def job_folders(root: Path) -> list[Path]:
    """Folders of ``root`` that hold a job.json (plain folders only: symbolic links are left out)."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    out = []
    for e in entries:
        try:
            if ID_RE.match(e.name) and e.is_dir(follow_symlinks=False) and os.path.isfile(os.path.join(e.path, JOB_FILE)):
                out.append(Path(e.path))
        except OSError:
            continue
    return sorted(out)


# ============================================================================================
# Text and JSON
# ============================================================================================
def clean_text(text: Any, limit: int | None = None) -> str:
    """``text`` safe to print on a terminal or show in the UI: ANSI escape sequences and other control
    characters (also bidirectional overrides) removed, line breaks and tabs as spaces, cut at ``limit``."""
    out = _ANSI_RE.sub("", str(text))
    out = out.replace("\r\n", " ").replace("\n", " ").replace("\r", " ").replace("\t", " ")
    out = _CONTROL_RE.sub("", out)
    if limit is not None and len(out) > limit:
        out = out[:max(0, limit - 1)] + "…"
    return out


def atomic_json(path: Path, obj: Any) -> None:
    """Write JSON atomically into an existing folder (:func:`core.storage.atomic_write_json`); OSError
    (:class:`~core.storage.StorageError`) on failure, the temp file removed."""
    atomic_write_json(path, obj, parents=False)


# ============================================================================================
# job-state.json, the disk-full reserve, stale temp files
# ============================================================================================
def read_state(folder: Path) -> dict | None:
    """``<folder>/job-state.json``, or None when missing, unreadable or without a known status."""
    try:
        d = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("status") in STATUSES else None


def write_state(folder: Path, **fields: Any) -> bool:
    """Merge ``fields`` into ``<folder>/job-state.json`` (the registry row's copy used to rebuild the registry).

    Never raises: a failed write is retried once after releasing the disk-full reserve; returns success."""
    path = folder / STATE_FILE
    for attempt in range(2):
        try:
            state = read_state(folder) or {}
            state.update(fields, updated=time.time())
            atomic_json(path, state)
            return True
        except OSError:
            if attempt == 0 and release_ballast(folder):
                continue
            return False
        except Exception:  # noqa: BLE001 - e.g. a result that cannot be stored as JSON
            return False
    return False


def make_ballast(folder: Path) -> None:
    """Reserve a little disk space in the job folder (released to record the outcome when the disk is full)."""
    path = folder / BALLAST_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError:
        return
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, BALLAST_BYTES)  # really allocated (a sparse file would free nothing)
        else:  # pragma: no cover - macOS
            os.write(fd, b"\0" * BALLAST_BYTES)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(path)
    finally:
        os.close(fd)


def release_ballast(folder: Path) -> bool:
    """Delete the disk-full reserve of a job folder; True when there was one."""
    try:
        os.unlink(folder / BALLAST_FILE)
        return True
    except OSError:
        return False


# ============================================================================================
# job.json
# ============================================================================================
def write_job_file(folder: Path, spec: dict) -> None:
    """Write ``job.json`` atomically (temp file, fsync, rename), like core.storage.atomic_write_json.

    """
    path = folder / JOB_FILE
    try:
        atomic_write_json(path, spec, parents=False)
    except OSError as e:
        raise JobError(f"cannot write {path}: {e.strerror or e} (is the disk full or the folder read-only?)") from e


def read_job_file(folder: Path) -> dict:
    """``<folder>/job.json`` as a dict; JobError when missing, unreadable or not a JSON object."""
    try:
        spec = json.loads((folder / JOB_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise JobError(f"{folder / JOB_FILE} is missing") from e
    except (OSError, json.JSONDecodeError) as e:
        raise JobError(f"cannot read {folder / JOB_FILE}: {e}") from e
    if not isinstance(spec, dict):
        raise JobError(f"{folder / JOB_FILE} does not hold a JSON object")
    return spec


# ============================================================================================
# log.txt and the disk
# ============================================================================================
def log_tail_lines(run_dir: Path, n: int) -> list[str]:
    """The last ``n`` lines of ``log.txt`` as a terminal shows them (carriage-return redraws collapsed)."""
    path = run_dir / LOG_FILE
    if n <= 0:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            want = max(65536, n * 1024)
            start = max(0, size - want)
            f.seek(start)
            data = f.read()
    except OSError:
        return []
    text = data.decode("utf-8", "replace")
    lines = text.split("\n")
    if start > 0 and lines:
        lines = lines[1:]  # the first line was cut
    out = []
    for line in lines:
        parts = [p for p in line.split("\r") if p.strip()]
        if parts:
            out.append(parts[-1].rstrip())
    return out[-n:]


def logged_disk_full(lines: list[str]) -> str | None:
    """The last of ``lines`` that says the disk was full (ENOSPC, quota), stripped; None when none does."""
    return next((ln.strip() for ln in reversed(lines) if any(m in ln.lower() for m in _DISK_FULL_MARKERS)), None)


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the disk holding ``folder`` (None when it cannot be asked)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def disk_full_text(folder: Path) -> str | None:
    """'the disk holding X is full (N KiB free)' when it is (nearly) full, else None."""
    free = free_bytes(folder)
    if free is None or free >= MIN_FREE_BYTES:
        return None
    return f"the disk holding {folder} is full ({free / 1024:.0f} KiB free)"
