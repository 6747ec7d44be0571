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
    <job id>/...             whatever the runner writes

The registry can be rebuilt from the job folders: when ``registry.sqlite`` is missing (deleted, or
moved away as the corrupt-registry message advises) while job folders exist, the next access
rebuilds it from every ``job.json`` + ``job-state.json``, a job whose process still runs (its pid and
start time, or a ``core.jobs run <folder>`` process found in /proc) as running, so that it stays
visible, stoppable and counted against its device slot. Jobs that were queued come back stopped
(resume them to run them): a rebuild never starts anything. :func:`registry_notice` says that it
happened (the dashboard and ``list`` show it for a day).

Who writes what: the job process updates its own row (status, pid, progress, message, result,
error); the dashboard or the CLI only submit, stop, resume, delete, and *reconcile*
(:func:`refresh`): a row marked running whose process is gone is marked failed with the last log
lines, and queued jobs whose device slot is free are started. A job process that finishes starts the
next queued job itself, so a queue drains without any daemon.

Scheduling: each job holds a *device slot* (``cpu`` or ``cuda:N``; ``auto`` resolves to ``cuda:0``
when a GPU is available, else ``cpu``). At most ``ENERGYLENS_MAX_JOBS_PER_DEVICE`` jobs (default 1)
run per slot; the others wait in the queue, first submitted first started.

Runners are named by import strings ``"package.module:function"`` in :data:`KINDS` and imported
only inside the job process. ``ENERGYLENS_EXTRA_KINDS`` (a JSON object ``{kind: target}``) adds or
overrides kinds; a target may also be a file path ``"/path/to/file.py:function"``. The target is
recorded in ``job.json`` at submission, so a queued job always runs the runner it was submitted with.

Command line (same config JSON as the dashboard)::

    python -m core.jobs submit train --config cfg.json [--name N] [--device D]
    python -m core.jobs list | show ID | log ID | stop ID | resume ID | delete ID
    python -m core.jobs sweep FILE.yaml [--backend local|slurm] | sweep list | status ID | table ID  (core.sweep)

External schedulers: a row whose device slot is ``slurm`` (see :func:`is_external_slot`) is run by a
scheduler on other machines (core.backends submits it and its node writes the row); the local queue never
launches it or judges it by a local pid, and :func:`stop_job` / :func:`resume_job` hand it to core.backends.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import EnergyLensError, JobError

__all__ = ["RUNS_DIR", "KINDS", "STATUSES", "JobInfo", "JobStopped", "available_kinds", "submit", "list_jobs",
           "get_job", "refresh", "stop_job", "resume_job", "delete_job", "duplicate_job", "read_metrics",
           "read_log_tail", "job_dir", "max_jobs_per_device", "stop_requested", "registry_notice", "clean_text",
           "remove_stale_temp_files", "is_external_slot", "main"]

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNS_DIR = REPO_ROOT / "runs"

KINDS: dict[str, str] = {
    "train": "core.train:run_job",
    "eval": "core.evaluation:run_job",
    "landscape": "core.analysis:run_landscape_job",
    "sgld": "core.sampling:run_job",
    "subset": "core.analysis:run_subset_job",
}

STATUSES = ("queued", "running", "done", "failed", "stopped")
FINISHED = ("done", "failed", "stopped")

ENV_RUNS = "ENERGYLENS_RUNS"
ENV_EXTRA_KINDS = "ENERGYLENS_EXTRA_KINDS"
ENV_MAX_JOBS = "ENERGYLENS_MAX_JOBS_PER_DEVICE"
EXTERNAL_SLOTS = ("slurm",)   # device slots of rows that an external scheduler runs (core.backends)

REGISTRY_NAME = "registry.sqlite"
JOB_FILE = "job.json"
STATE_FILE = "job-state.json"
LOG_FILE = "log.txt"
BALLAST_FILE = ".job-state.reserve"  # room kept free so that the outcome can be recorded on a full disk
BALLAST_BYTES = 256 * 1024
NOTICE_S = 24 * 3600          # how long registry_notice() reports a rebuild

STOP_GRACE_S = 10.0          # SIGTERM -> SIGKILL delay of stop_job
REPORT_INTERVAL_S = 0.5      # at most ~2 progress writes per second per job
BUSY_TIMEOUT_S = 30.0        # how long a registry write waits for the lock
ERROR_LOG_LINES = 20         # log lines attached to the error of a failed job
MIN_FREE_BYTES = 16 * 2**20  # refuse to submit when less than this is free on the runs disk

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    pid INTEGER,
    proc_start INTEGER,
    device TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    progress REAL NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',
    config TEXT NOT NULL,
    error TEXT,
    result TEXT,
    updated REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, device, created);
CREATE TABLE IF NOT EXISTS notices (key TEXT PRIMARY KEY, message TEXT NOT NULL, created REAL NOT NULL);
"""
_TEMP_RE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # tempfile.mkstemp(prefix=".<name>.", suffix=".tmp")
# ANSI escape sequences (CSI, OSC, two-byte) and other terminal control characters, incl. bidi overrides
_ANSI_RE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?|\x9b[0-?]*[ -/]*[@-~]")
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")


# ============================================================================================
# Public data type
# ============================================================================================
@dataclass
class JobInfo:
    """A snapshot of one registry row (plain data; safe to cache or show)."""

    id: str
    kind: str
    name: str
    status: str                 # queued | running | done | failed | stopped
    pid: int | None
    device: str                 # the device slot: 'cpu' or 'cuda:N'
    created: float              # UNIX times
    started: float | None
    finished: float | None
    progress: float             # 0..1
    message: str
    run_dir: str
    config: dict
    error: str | None
    result: dict | None

    @property
    def active(self) -> bool:
        """True while the job is queued or running."""
        return self.status in ("queued", "running")

    @property
    def duration(self) -> float | None:
        """Seconds since the (last) start, up to the end when finished; None while queued (a resumed job
        waiting for its slot keeps its previous start time, which must not count as running time)."""
        if self.started is None or self.status == "queued":
            return None
        return (self.finished or time.time()) - self.started

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class JobStopped(BaseException):
    """Raised inside a job process when it receives SIGTERM (a stop request).

    It derives from BaseException, like KeyboardInterrupt, so that a runner's ``except Exception``
    does not swallow it; ``finally`` blocks and context managers still run while it unwinds.
    """


# ============================================================================================
# Configuration helpers
# ============================================================================================
def _runs_dir(runs_dir: str | os.PathLike | None) -> Path:
    if runs_dir is None:
        runs_dir = os.environ.get(ENV_RUNS) or RUNS_DIR
    return Path(runs_dir).expanduser().resolve()


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


def max_jobs_per_device() -> int:
    """How many jobs may run at once on one device slot (env ENERGYLENS_MAX_JOBS_PER_DEVICE, default 1)."""
    raw = os.environ.get(ENV_MAX_JOBS, "").strip()
    try:
        return max(1, int(raw)) if raw else 1
    except ValueError:
        return 1


def job_dir(job_id: str, runs_dir: str | os.PathLike | None = None) -> Path:
    """The folder of a job (it may not exist). Rejects ids that are not plain folder names."""
    if not isinstance(job_id, str) or not _ID_RE.match(job_id) or job_id in (".", ".."):
        raise JobError(f"invalid job id {job_id!r}")
    return _runs_dir(runs_dir) / job_id


def is_external_slot(device: str | None) -> bool:
    """True for the device slot of a row that an external scheduler runs ('slurm'): not the local queue's."""
    return str(device or "").split(":")[0] in EXTERNAL_SLOTS


def _resolve_device(device: str | None, config: dict) -> str:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a slot name 'cpu' or 'cuda:N' ('slurm' is kept: core.backends)."""
    d = str(device or "auto").strip().lower()
    if is_external_slot(d):
        return d
    if d == "auto":
        cd = config.get("device")
        if isinstance(cd, str) and cd.strip().lower() not in ("", "auto"):
            d = cd.strip().lower()
    if d == "auto":
        return "cuda:0" if _cuda_count() > 0 else "cpu"
    if d == "cpu":
        return "cpu"
    m = re.fullmatch(r"cuda(?::(\d+))?", d)
    if not m:
        raise JobError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got '{device}'")
    idx = int(m.group(1) or 0)
    n = _cuda_count()
    if n == 0:
        raise JobError(f"device '{d}' was requested but no GPU is available: use 'cpu' or 'auto'")
    if idx >= n:
        raise JobError(f"device '{d}' does not exist: this machine has {n} GPU(s) (cuda:0..cuda:{n - 1})")
    return f"cuda:{idx}"


def _cuda_count() -> int:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency of the engine
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=_json_default, sort_keys=True)


def clean_text(text: Any, limit: int | None = None) -> str:
    """``text`` safe to print on a terminal or show in the UI: ANSI escape sequences and other control
    characters (also bidirectional overrides) removed, line breaks and tabs as spaces, cut at ``limit``."""
    out = _ANSI_RE.sub("", str(text))
    out = out.replace("\r\n", " ").replace("\n", " ").replace("\r", " ").replace("\t", " ")
    out = _CONTROL_RE.sub("", out)
    if limit is not None and len(out) > limit:
        out = out[:max(0, limit - 1)] + "…"
    return out


# ============================================================================================
# Job folders: the state file, stale temp files, the disk-full reserve
# ============================================================================================
def _atomic_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file, fsync, rename); OSError on failure (the temp file is removed)."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default).encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_state(folder: Path) -> dict | None:
    try:
        d = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("status") in STATUSES else None


def _write_state(folder: Path, **fields: Any) -> bool:
    """Merge ``fields`` into ``<folder>/job-state.json`` (the registry row's copy used to rebuild the registry).

    Never raises: a failed write is retried once after releasing the disk-full reserve; returns success."""
    path = folder / STATE_FILE
    for attempt in range(2):
        try:
            state = _read_state(folder) or {}
            state.update(fields, updated=time.time())
            _atomic_json(path, state)
            return True
        except OSError:
            if attempt == 0 and _release_ballast(folder):
                continue
            return False
        except Exception:  # noqa: BLE001 - e.g. a result that cannot be stored as JSON
            return False
    return False


def _make_ballast(folder: Path) -> None:
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


def _release_ballast(folder: Path) -> bool:
    try:
        os.unlink(folder / BALLAST_FILE)
        return True
    except OSError:
        return False


def remove_stale_temp_files(folder: str | os.PathLike) -> list[str]:
    """Delete the temp files of interrupted atomic writes (``.<name>.<8 random chars>.tmp``) in a run folder and
    its subfolders (symbolic links are not followed). Only call it while no other process writes there (a job
    process does it when it starts, before its runner). Returns the removed paths relative to ``folder``."""
    folder = Path(folder)
    removed = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for fn in filenames:
            if _TEMP_RE.match(fn):
                p = Path(dirpath) / fn
                try:
                    if p.is_symlink() or not p.is_file():
                        continue
                    p.unlink()
                    removed.append(str(p.relative_to(folder)))
                except OSError:
                    pass
    return removed


# ============================================================================================
# Registry (SQLite)
# ============================================================================================
_init_lock = threading.Lock()


@contextlib.contextmanager
def _connect(root: Path, create: bool = False) -> Iterator[sqlite3.Connection | None]:
    """A short-lived connection to ``<root>/registry.sqlite``; yields None when absent and not ``create``.

    A missing registry is rebuilt from the job folders first (see the module doc) when there are any, and
    whenever ``create`` is set: a registry file always appears complete, never empty while jobs exist."""
    path = root / REGISTRY_NAME
    if not path.exists():
        if not create and not _job_folders(root):
            yield None
            return
        _rebuild_registry(root)
    try:
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
    except sqlite3.Error as e:
        raise JobError(f"cannot open the job registry {path}: {e}. Check that the folder {root} is writable.") from e
    try:
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        _init_schema(conn, path)
        yield conn
    except sqlite3.DatabaseError as e:
        raise JobError(_db_error_message(e, path)) from e
    finally:
        conn.close()


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _disk_full_text(folder: Path) -> str | None:
    """'the disk holding X is full (N KiB free)' when it is (nearly) full, else None."""
    free = _free_bytes(folder)
    if free is None or free >= MIN_FREE_BYTES:
        return None
    return f"the disk holding {folder} is full ({free / 1024:.0f} KiB free)"


def _db_error_message(e: sqlite3.Error, path: Path) -> str:
    msg = str(e)
    low = msg.lower()
    full = _disk_full_text(path.parent) if ("disk i/o" in low or "full" in low or "unable to open" in low) else None
    if full:  # SQLite reports a full disk as "disk I/O error" when it cannot even create its -shm/-wal files
        return (f"{full}: the job registry {path} cannot be read or updated ({msg}). Free some space (delete old runs"
                " or other files); job folders and their results are kept")
    if "readonly" in low or "unable to open" in low or "disk i/o" in low:
        return f"the job registry {path} cannot be written ({msg}): check that {path.parent} is writable"
    if "full" in low:
        return f"the disk holding {path.parent} is full: the job registry {path} cannot be updated"
    if "not a database" in low or "malformed" in low:
        return (f"the job registry {path} is corrupt ({msg}); move it away and the registry is rebuilt from the "
                "job folders (they are kept)")
    if "locked" in low or "busy" in low:
        return f"the job registry {path} stayed locked for {BUSY_TIMEOUT_S:.0f} s ({msg}); try again"
    return f"job registry error in {path}: {msg}"


def _init_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Per connection: NORMAL sync (safe with WAL); create the table and switch to WAL the first time.

    Checked on every connection (one tiny read) rather than cached, so that a registry deleted and
    re-created while a process runs gets its schema again.
    """
    conn.execute("PRAGMA synchronous = NORMAL")
    if conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ('jobs', 'notices')"
                    ).fetchone()[0] == 2:
        return
    with _init_lock:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError:  # e.g. a file system without shared memory: keep the default journal
            pass
        conn.executescript(_SCHEMA)  # each CREATE ... IF NOT EXISTS is atomic on its own


def _job_folders(root: Path) -> list[Path]:
    """Folders of ``root`` that hold a job.json (plain folders only: symbolic links are left out)."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    out = []
    for e in entries:
        try:
            if _ID_RE.match(e.name) and e.is_dir(follow_symlinks=False) and os.path.isfile(os.path.join(e.path, JOB_FILE)):
                out.append(Path(e.path))
        except OSError:
            continue
    return sorted(out)


def _job_processes() -> dict[str, tuple[int, int | None]]:
    """Live ``python -m core.jobs run <folder>`` processes: resolved folder -> (pid, start time), from /proc."""
    found: dict[str, tuple[int, int | None]] = {}
    if not _HAS_PROC:
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
                st = _read_proc_stat(pid)
                if st is not None and st[0] not in ("Z", "X", "x"):
                    with contextlib.suppress(OSError):
                        found[str(Path(args[i + 3]).resolve())] = (pid, st[1])
                break
    return found


def _rebuilt_row(folder: Path, procs: dict[str, tuple[int, int | None]], now: float) -> tuple | None:
    """The registry row of one job folder: its job.json, its job-state.json and whether its process runs."""
    try:
        spec = _read_job_file(folder)
    except JobError:
        return None
    state = _read_state(folder) or {}
    job_id = folder.name
    kind = str(spec.get("kind") or "unknown")
    name = clean_text(spec.get("name") or kind, 200)
    device = str(spec.get("device") or "cpu")
    created = float(spec.get("created") or now)
    config = spec.get("config") if isinstance(spec.get("config"), dict) else {}
    status = state.get("status")
    pid, pstart = state.get("pid"), state.get("proc_start")
    live = status == "running" and isinstance(pid, int) and _process_matches(pid, pstart)
    if not live and status in (None, "queued", "running"):
        hit = procs.get(str(folder.resolve()))
        if hit is not None:
            (pid, pstart), live = hit, True
    error, message = state.get("error"), str(state.get("message") or "")
    if live:
        status, message = "running", "running (the registry was rebuilt)"
    elif status == "queued" or status is None:
        # never start anything from a rebuild: the user resumes what should still run
        status = "stopped"
        message = ("was queued when the registry was lost: resume it to run it" if state.get("status") == "queued"
                   else "status unknown (rebuilt from the job folder, which has no job-state.json): resume it if needed")
    # status 'running' with a dead process is left as it is: refresh() then marks it failed with the right cause
    return (job_id, kind, name, status, pid if status == "running" else state.get("pid"),
            pstart if status == "running" else state.get("proc_start"), device, created, state.get("started"),
            state.get("finished"), float(state.get("progress") or (1.0 if status == "done" else 0.0)), message,
            _dumps(config), error, None if state.get("result") is None else _dumps(state.get("result")), now)


def _rebuild_registry(root: Path) -> None:
    """Create ``<root>/registry.sqlite`` from the job folders, published atomically (no reader ever sees it
    half-built); under a lock file so that concurrent processes rebuild it once."""
    import fcntl

    path = root / REGISTRY_NAME
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / ".registry.lock", "a+b")
    except OSError as e:
        full = _disk_full_text(root)
        raise JobError(f"the job registry {path} is missing and cannot be created: {full or (e.strerror or e)}"
                       ) from e
    with lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if path.exists():
            return  # another process rebuilt it meanwhile
        folders = _job_folders(root)
        now = time.time()
        procs = _job_processes() if folders else {}
        rows = [r for r in (_rebuilt_row(f, procs, now) for f in folders) if r is not None]
        tmp = root / f".{REGISTRY_NAME}.{_random_suffix()}.rebuild"
        try:
            conn = sqlite3.connect(str(tmp), isolation_level=None)
            try:
                conn.executescript(_SCHEMA)
                with _tx(conn):
                    conn.executemany("INSERT OR IGNORE INTO jobs (id, kind, name, status, pid, proc_start, device, "
                                     "created, started, finished, progress, message, config, error, result, updated) "
                                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
                    if rows:
                        running = sum(r[3] == "running" for r in rows)
                        conn.execute("INSERT OR REPLACE INTO notices (key, message, created) VALUES ('rebuilt', ?, ?)",
                                     (f"The job registry {path} was missing and was rebuilt on "
                                      f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))} from the "
                                      f"{len(rows)} job folders in {root} ({running} still running). Statuses come "
                                      "from each folder's job-state.json and the running processes; jobs that "
                                      "were queued are stopped (resume them).", now))
                conn.execute("PRAGMA journal_mode = WAL")
            finally:
                conn.close()
            # stale WAL files of a deleted registry would be replayed into the new one
            for suffix in ("-wal", "-shm", "-journal"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{path}{suffix}")
            os.link(tmp, path)  # fails if a registry appeared meanwhile: never replace one
        except FileExistsError:
            pass
        except (OSError, sqlite3.Error) as e:
            full = _disk_full_text(root)
            raise JobError(f"the job registry {path} is missing and could not be rebuilt from the job folders: "
                           f"{full or e}") from e
        finally:
            for suffix in ("", "-wal", "-shm", "-journal"):
                with contextlib.suppress(OSError):
                    os.unlink(f"{tmp}{suffix}")
    if rows:
        print(f"[energylens] warning: the job registry {path} was missing: rebuilt from {len(rows)} job folders",
              file=sys.stderr, flush=True)


def registry_notice(runs_dir: str | os.PathLike | None = None) -> str | None:
    """A warning to show when the registry was rebuilt from the job folders in the last day, else None."""
    root = _runs_dir(runs_dir)
    if not (root / REGISTRY_NAME).exists():
        return None
    with _connect(root) as conn:
        if conn is None:
            return None
        row = conn.execute("SELECT message, created FROM notices WHERE key = 'rebuilt'").fetchone()
    if row is None or time.time() - float(row["created"]) > NOTICE_S:
        return None
    return str(row["message"])


@contextlib.contextmanager
def _tx(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction that takes the write lock up front (BEGIN IMMEDIATE)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _row_to_info(row: sqlite3.Row, root: Path) -> JobInfo:
    def load(text: str | None, default: Any) -> Any:
        if text is None:
            return default
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return default

    return JobInfo(id=row["id"], kind=row["kind"], name=row["name"], status=row["status"], pid=row["pid"],
                   device=row["device"], created=row["created"], started=row["started"], finished=row["finished"],
                   progress=float(row["progress"] or 0.0), message=row["message"] or "",
                   run_dir=str(root / row["id"]), config=load(row["config"], {}), error=row["error"],
                   result=load(row["result"], None))


def _fetch(conn: sqlite3.Connection, job_id: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()


def _get(root: Path, job_id: str) -> JobInfo:
    job_dir(job_id, root)  # validates the id
    with _connect(root) as conn:
        row = _fetch(conn, job_id) if conn is not None else None
    if row is None:
        raise JobError(f"unknown job '{job_id}' in {root}")
    return _row_to_info(row, root)


# ============================================================================================
# Processes
# ============================================================================================
_children: dict[int, subprocess.Popen] = {}
_children_lock = threading.Lock()


def _reap_children() -> None:
    """Collect exit statuses of job processes this process launched (no zombies are left behind)."""
    with _children_lock:
        for pid, proc in list(_children.items()):
            try:
                done = proc.poll() is not None
            except Exception:  # noqa: BLE001 - a stand-in object without a real process
                done = True
            if done:
                del _children[pid]


def _read_proc_stat(pid: int) -> tuple[str, int] | None:
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


_HAS_PROC = os.path.isdir("/proc/self")


def _proc_start_time(pid: int) -> int | None:
    st = _read_proc_stat(pid) if _HAS_PROC else None
    return st[1] if st else None


def _process_matches(pid: int | None, proc_start: int | None) -> bool:
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
    if _HAS_PROC:
        st = _read_proc_stat(pid)
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


def _launch(root: Path, row: sqlite3.Row) -> tuple[int, int | None]:
    """Start ``python -m core.jobs run <run_dir>`` for a claimed row; returns (pid, start time)."""
    run_dir = root / row["id"]
    if not (run_dir / JOB_FILE).is_file():
        raise JobError(f"the job folder {run_dir} or its {JOB_FILE} is missing")
    if not sys.executable:
        raise JobError("cannot find the Python interpreter (sys.executable is empty) to start the job")
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["ENERGYLENS_JOB_ID"] = row["id"]
    env["ENERGYLENS_JOB_DEVICE"] = row["device"]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "core.jobs", "run", str(run_dir)]
    try:
        log = open(run_dir / LOG_FILE, "ab")
    except OSError as e:
        raise JobError(f"cannot open the log file in {run_dir}: {e.strerror or e}") from e
    try:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"=== {stamp} launching {row['kind']} job {row['id']} on {row['device']} ===\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    except OSError as e:
        raise JobError(f"could not start the job process: {e.strerror or e}") from e
    finally:
        log.close()
    with _children_lock:
        _children[proc.pid] = proc
    return proc.pid, _proc_start_time(proc.pid)


def _log_tail_lines(run_dir: Path, n: int) -> list[str]:
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


_DISK_FULL_MARKERS = ("no space left on device", "disk is full", "database or disk is full", "errno 28",
                      "disk quota exceeded")


def _crash_message(pid: int | None, run_dir: Path) -> str:
    lines = _log_tail_lines(run_dir, ERROR_LOG_LINES)
    tail = "\n".join(lines) or "(the log is empty)"
    logged = next((ln.strip() for ln in reversed(lines) if any(m in ln.lower() for m in _DISK_FULL_MARKERS)), None)
    full = _disk_full_text(run_dir.parent)
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


def _dead_job_outcome(r: sqlite3.Row, root: Path) -> tuple[str, str | None, str | None, str]:
    """(status, error, result JSON, message) for a 'running' row whose process is gone: the outcome the job
    process recorded in its job-state.json when the registry could not be written (a full disk), else a crash."""
    folder = root / r["id"]
    state = _read_state(folder)
    if state is not None and state.get("status") in FINISHED and state.get("pid") == r["pid"]:
        res = state.get("result")
        return (state["status"], state.get("error"), None if res is None else _dumps(res),
                str(state.get("message") or state["status"]))
    return "failed", _crash_message(r["pid"], folder), None, "the job process disappeared"


def _reconcile_and_launch(conn: sqlite3.Connection, root: Path) -> None:
    """In one transaction: fail dead 'running' rows, then start queued jobs whose slot has room."""
    with _tx(conn):
        now = time.time()
        busy: Counter[str] = Counter()
        for r in conn.execute("SELECT * FROM jobs WHERE status = 'running'").fetchall():
            if is_external_slot(r["device"]):
                continue  # its process lives on another machine: core.backends reconciles it
            if _process_matches(r["pid"], r["proc_start"]):
                busy[r["device"]] += 1
            else:
                status, error, result, message = _dead_job_outcome(r, root)
                conn.execute("UPDATE jobs SET status = ?, finished = ?, updated = ?, error = ?, result = ?, "
                             "message = ?, progress = CASE WHEN ? = 'done' THEN 1.0 ELSE progress END WHERE id = ?",
                             (status, now, now, error, result, message, status, r["id"]))
                _release_ballast(root / r["id"])  # the reserve of a process that was killed
                if status == "failed":
                    _write_state(root / r["id"], status="failed", finished=now, error=error, message=message)
        cap = max_jobs_per_device()
        for r in conn.execute("SELECT * FROM jobs WHERE status = 'queued' ORDER BY created, id").fetchall():
            if busy[r["device"]] >= cap or is_external_slot(r["device"]):
                continue
            try:
                pid, pstart = _launch(root, r)
            except JobError as e:
                conn.execute("UPDATE jobs SET status = 'failed', finished = ?, updated = ?, error = ?, "
                             "message = 'could not start' WHERE id = ?", (now, now, str(e), r["id"]))
                continue
            conn.execute("UPDATE jobs SET status = 'running', pid = ?, proc_start = ?, started = ?, finished = NULL, "
                         "error = NULL, result = NULL, message = 'starting', updated = ? WHERE id = ?",
                         (pid, pstart, now, now, r["id"]))
            _write_state(root / r["id"], status="running", pid=pid, proc_start=pstart, started=now, finished=None,
                         error=None, result=None, message="starting")
            busy[r["device"]] += 1


def _work_pending(conn: sqlite3.Connection) -> bool:
    """Cheap read-only check: is there a dead 'running' row or a queued job with a free slot?"""
    rows = conn.execute("SELECT status, pid, proc_start, device FROM jobs "
                        "WHERE status IN ('queued', 'running')").fetchall()
    rows = [r for r in rows if not is_external_slot(r["device"])]
    if not rows:
        return False
    busy: Counter[str] = Counter()
    for r in rows:
        if r["status"] == "running":
            if not _process_matches(r["pid"], r["proc_start"]):
                return True
            busy[r["device"]] += 1
    cap = max_jobs_per_device()
    return any(r["status"] == "queued" and busy[r["device"]] < cap for r in rows)


# ============================================================================================
# Public API
# ============================================================================================
def refresh(runs_dir: str | os.PathLike | None = None) -> None:
    """Reconcile the registry with reality and start queued jobs whose device slot is free.

    A job marked running whose process is gone (killed, crashed, a zombie, or a pid now used by a
    different process) becomes 'failed' with the last log lines as its error. Cheap when there is
    nothing to do: one read query and a /proc lookup per running job.
    """
    root = _runs_dir(runs_dir)
    _reap_children()
    with _connect(root) as conn:
        if conn is None:
            return
        if _work_pending(conn):
            _reconcile_and_launch(conn, root)
        external = conn.execute("SELECT 1 FROM jobs WHERE device LIKE 'slurm%' AND status IN ('queued', 'running') "
                                "LIMIT 1").fetchone() is not None
    if external and not os.environ.get("ENERGYLENS_JOB_ID"):
        from .backends import reconcile_external  # rows of an external scheduler: ask it (throttled)

        reconcile_external(root)


def _prepare_runs_dir(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise JobError(f"cannot create the runs folder {root}: {e.strerror or e}. Choose a writable folder "
                       f"(env {ENV_RUNS}).") from e
    if not root.is_dir():
        raise JobError(f"the runs folder {root} is not a folder")
    if not os.access(root, os.W_OK | os.X_OK):
        raise JobError(f"the runs folder {root} is not writable: fix its permissions or choose another folder "
                       f"(env {ENV_RUNS}).")
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = None
    if free is not None and free < MIN_FREE_BYTES:
        raise JobError(f"the disk holding the runs folder {root} is full ({free / 2**20:.1f} MiB free): "
                       "delete old runs or choose another folder.")


def _random_suffix() -> str:
    return secrets.token_hex(4)


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _new_job_folder(root: Path, kind: str) -> tuple[str, Path]:
    """Create a fresh, uniquely named job folder (mkdir without exist_ok, retried on a collision)."""
    safe_kind = re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "job"
    for _ in range(64):
        job_id = f"{_timestamp()}-{safe_kind}-{_random_suffix()}"
        folder = root / job_id
        try:
            folder.mkdir(exist_ok=False)
        except FileExistsError:
            continue
        except OSError as e:
            raise JobError(f"cannot create a job folder in {root}: {e.strerror or e}") from e
        return job_id, folder
    raise JobError(f"could not find a free job folder name in {root}")


def _write_job_file(folder: Path, spec: dict) -> None:
    """Write ``job.json`` atomically (temp file, fsync, rename), like core.storage.atomic_write_json.

    Kept local so that submitting from the CLI or a job process does not have to import torch
    (core.storage does), which costs seconds on a busy machine.
    """
    path = folder / JOB_FILE
    text = json.dumps(spec, indent=2, sort_keys=True, default=_json_default).encode("utf-8")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{JOB_FILE}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise JobError(f"cannot write {path}: {e.strerror or e} (is the disk full or the folder read-only?)") from e


def _read_job_file(folder: Path) -> dict:
    try:
        spec = json.loads((folder / JOB_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise JobError(f"{folder / JOB_FILE} is missing") from e
    except (OSError, json.JSONDecodeError) as e:
        raise JobError(f"cannot read {folder / JOB_FILE}: {e}") from e
    if not isinstance(spec, dict):
        raise JobError(f"{folder / JOB_FILE} does not hold a JSON object")
    return spec


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
        config = json.loads(json.dumps(config, default=_json_default))
    except (TypeError, ValueError) as e:
        raise JobError(f"the job config cannot be stored as JSON: {e}") from e
    slot = _resolve_device(device, config)
    root = _runs_dir(runs_dir)
    _prepare_runs_dir(root)
    now = time.time()
    label = (name if name is not None else config.get("name")) or ""
    label = clean_text(label, 200).strip() or f"{kind} {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}"
    with _connect(root, create=True) as conn:
        job_id, folder = _new_job_folder(root, kind)
        try:
            _write_job_file(folder, {**(extra or {}), "format": 1, "id": job_id, "kind": kind,
                                     "target": target or kinds[kind], "name": label, "device": slot, "created": now,
                                     "config": config})
            try:
                (folder / LOG_FILE).touch()
            except OSError as e:
                raise JobError(f"cannot create {folder / LOG_FILE}: {e.strerror or e}") from e
            _write_state(folder, status="queued", created=now)
            with _tx(conn):
                conn.execute("INSERT INTO jobs (id, kind, name, status, device, created, progress, message, config, "
                             "updated) VALUES (?, ?, ?, 'queued', ?, ?, 0, 'queued', ?, ?)",
                             (job_id, kind, label, slot, now, _dumps(config), now))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
    if start:
        refresh(root)
    return _get(root, job_id)


def list_jobs(runs_dir: str | os.PathLike | None = None, kind: str | None = None) -> list[JobInfo]:
    """All jobs, newest first (after :func:`refresh`); ``kind`` filters."""
    root = _runs_dir(runs_dir)
    refresh(root)
    with _connect(root) as conn:
        if conn is None:
            return []
        if kind is None:
            rows = conn.execute("SELECT * FROM jobs ORDER BY created DESC, id DESC").fetchall()
        else:
            rows = conn.execute("SELECT * FROM jobs WHERE kind = ? ORDER BY created DESC, id DESC", (kind,)).fetchall()
    return [_row_to_info(r, root) for r in rows]


def get_job(job_id: str, runs_dir: str | os.PathLike | None = None) -> JobInfo:
    """One job (after :func:`refresh`); JobError when unknown."""
    root = _runs_dir(runs_dir)
    job_dir(job_id, root)
    refresh(root)
    return _get(root, job_id)


def _signal_group(pid: int, sig: int) -> None:
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


def _wait_gone(pid: int, proc_start: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _process_matches(pid, proc_start):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def stop_job(job_id: str, runs_dir: str | os.PathLike | None = None, *, grace: float | None = None) -> JobInfo:
    """Stop a job: a queued one leaves the queue; a running one gets SIGTERM on its process group
    (the runner unwinds through :class:`JobStopped`), then SIGKILL after ``grace`` seconds
    (default :data:`STOP_GRACE_S`). The status becomes 'stopped'. Finished jobs are returned unchanged.
    """
    root = _runs_dir(runs_dir)
    grace = STOP_GRACE_S if grace is None else max(0.0, float(grace))
    refresh(root)
    with _connect(root) as conn:
        row = _fetch(conn, job_id) if conn is not None else None
    if row is not None and is_external_slot(row["device"]) and row["status"] in ("queued", "running"):
        from .backends import stop_external  # queued or running in the external scheduler: cancel it there

        return stop_external(root, job_id, grace=grace)
    for _ in range(3):
        with _connect(root) as conn:
            row = _fetch(conn, job_id) if conn is not None else None
            if row is None:
                raise JobError(f"unknown job '{job_id}' in {root}")
            if row["status"] == "queued":
                with _tx(conn):
                    now = time.time()
                    cur = conn.execute("UPDATE jobs SET status = 'stopped', finished = ?, updated = ?, "
                                       "message = 'stopped before it started' WHERE id = ? AND status = 'queued'",
                                       (now, now, job_id))
                if cur.rowcount:
                    _write_state(root / job_id, status="stopped", finished=now, message="stopped before it started")
                    return _get(root, job_id)
                continue  # it was started meanwhile: stop the running process instead
            if row["status"] != "running":
                return _row_to_info(row, root)
            pid, pstart = row["pid"], row["proc_start"]
        if _process_matches(pid, pstart):
            _signal_group(pid, signal.SIGTERM)
            if not _wait_gone(pid, pstart, grace):
                _signal_group(pid, signal.SIGKILL)
                _wait_gone(pid, pstart, 10.0)
        with _connect(root) as conn:
            with _tx(conn):
                now = time.time()
                cur = conn.execute("UPDATE jobs SET status = 'stopped', finished = ?, updated = ?, "
                                   "message = 'stopped by user' WHERE id = ? AND status = 'running' AND pid IS ?",
                                   (now, now, job_id, pid))
        if cur.rowcount:
            _write_state(root / job_id, status="stopped", pid=pid, finished=now, message="stopped by user")
        refresh(root)  # the slot is free: start what waits for it
        return _get(root, job_id)
    raise JobError(f"could not stop job '{job_id}': its state kept changing; try again")


def resume_job(job_id: str, runs_dir: str | os.PathLike | None = None) -> JobInfo:
    """Re-queue a stopped or failed job in the same folder with ``config['resume'] = True``."""
    root = _runs_dir(runs_dir)
    refresh(root)
    info = _get(root, job_id)
    if info.status not in ("stopped", "failed"):
        raise JobError(f"job '{job_id}' is {info.status}: only stopped or failed jobs can be resumed")
    folder = root / job_id
    if not folder.is_dir():
        raise JobError(f"the folder of job '{job_id}' ({folder}) no longer exists: it cannot be resumed")
    config = {**info.config, "resume": True}
    try:
        spec = _read_job_file(folder)
    except JobError:  # rebuild a lost job.json from the registry
        spec = {"format": 1, "id": job_id, "kind": info.kind, "target": available_kinds().get(info.kind),
                "name": info.name, "device": info.device, "created": info.created}
    spec["config"] = config
    _write_job_file(folder, spec)
    with _connect(root) as conn:
        with _tx(conn):
            now = time.time()
            cur = conn.execute("UPDATE jobs SET status = 'queued', config = ?, pid = NULL, proc_start = NULL, "
                               "finished = NULL, error = NULL, result = NULL, message = 'queued (resume)', "
                               "updated = ? WHERE id = ? AND status IN ('stopped', 'failed')",
                               (_dumps(config), now, job_id))
    if not cur.rowcount:
        raise JobError(f"job '{job_id}' changed state while being resumed; try again")
    _write_state(folder, status="queued", pid=None, proc_start=None, finished=None, error=None, result=None,
                 message="queued (resume)")
    if is_external_slot(info.device):
        from .backends import resubmit_external  # the local queue never runs it: submit it to its scheduler again

        return resubmit_external(root, job_id)
    refresh(root)
    return _get(root, job_id)


def delete_job(job_id: str, runs_dir: str | os.PathLike | None = None) -> None:
    """Remove a job's registry row and folder. Refuses (JobError) while the job is running."""
    root = _runs_dir(runs_dir)
    folder = job_dir(job_id, root)
    refresh(root)
    with _connect(root) as conn:
        row = _fetch(conn, job_id) if conn is not None else None
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
        with _tx(conn):
            cur = conn.execute("DELETE FROM jobs WHERE id = ? AND status != 'running'", (job_id,))
    if not cur.rowcount:
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
    root = _runs_dir(runs_dir)
    if not isinstance(changes, dict):
        raise JobError(f"changes must be a dict, got {type(changes).__name__}")
    info = _get(root, job_id)
    config = dict(info.config)
    if "resume" not in changes:
        config.pop("resume", None)
    config.update(changes)
    if name is None:
        name = f"{info.name} (copy)"
    # a copy of a run that a scheduler ran (a sweep on Slurm) is an ordinary local job
    return submit(info.kind, config, name=name, device="auto" if is_external_slot(info.device) else info.device,
                  runs_dir=root)


def read_metrics(job_id: str, runs_dir: str | os.PathLike | None = None) -> list[dict]:
    """The records of ``<run_dir>/metrics.jsonl`` (a torn last line is skipped); [] before the first."""
    from .storage import read_jsonl

    folder = job_dir(job_id, runs_dir)
    if not folder.is_dir():
        raise JobError(f"unknown job '{job_id}': {folder} does not exist")
    return read_jsonl(folder / "metrics.jsonl")


def read_log_tail(job_id: str, n: int = 50, runs_dir: str | os.PathLike | None = None) -> str:
    """The last ``n`` lines of the job's log (progress-bar redraws collapsed to their last state)."""
    folder = job_dir(job_id, runs_dir)
    if not folder.is_dir():
        raise JobError(f"unknown job '{job_id}': {folder} does not exist")
    return "\n".join(_log_tail_lines(folder, int(n)))


# ============================================================================================
# Inside the job process
# ============================================================================================
class _ChildState:
    armed = False            # raise JobStopped on SIGTERM (only while the runner runs)
    term_requested = False


_child = _ChildState()


def _on_term(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    _child.term_requested = True
    if _child.armed:
        _child.armed = False  # raise once; later signals only record the request
        raise JobStopped(f"stopped by signal {signum}")


def stop_requested() -> bool:
    """For runners that prefer to poll: True once a stop was requested for this job process."""
    return _child.term_requested


class _Reporter:
    """The ``report(fraction, message)`` callable handed to runners: throttled registry writes.

    At most one write per :data:`REPORT_INTERVAL_S`; a report that arrives too early is kept and
    written by a background flusher, so the last state always reaches the registry.
    """

    def __init__(self, root: Path, job_id: str, pid: int):
        self.root, self.job_id, self.pid = root, job_id, pid
        self._lock = threading.Lock()
        self._pending: tuple[float | None, str] | None = None
        self._last = -math.inf
        self._warned = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="energylens-report", daemon=True)
        self._thread.start()

    def __call__(self, fraction: float | None = None, message: str = "") -> None:
        try:
            f = float(fraction) if fraction is not None else None
        except (TypeError, ValueError):
            f = None
        if f is not None:
            f = min(1.0, max(0.0, f)) if math.isfinite(f) else None
        with self._lock:
            self._pending = (f, str(message)[:1000])
            due = time.monotonic() - self._last >= REPORT_INTERVAL_S
        if due:
            self.flush()

    def flush(self, force: bool = False) -> None:
        with self._lock:
            if self._pending is None or (not force and time.monotonic() - self._last < REPORT_INTERVAL_S):
                return
            fraction, message = self._pending
            self._pending = None
            self._last = time.monotonic()
        self._write(fraction, message)

    def _write(self, fraction: float | None, message: str) -> None:
        try:
            with _connect(self.root) as conn:
                if conn is None:
                    return
                with _tx(conn):
                    conn.execute("UPDATE jobs SET progress = COALESCE(?, progress), message = ?, updated = ? "
                                 "WHERE id = ? AND pid = ? AND status = 'running'",
                                 (fraction, message, time.time(), self.job_id, self.pid))
        except (sqlite3.Error, JobError) as e:
            if not self._warned:
                self._warned = True
                print(f"[energylens] warning: could not record progress: {e}", file=sys.stderr, flush=True)

    def _loop(self) -> None:
        while not self._stop.wait(REPORT_INTERVAL_S / 2):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush(force=True)


def _load_runner(target: str) -> Callable[..., Any]:
    """Import ``'package.module:function'`` or ``'/path/to/file.py:function'``."""
    if not isinstance(target, str) or ":" not in target:
        raise JobError(f"invalid runner '{target}': expected 'module:function'")
    mod_name, _, attr = target.rpartition(":")
    try:
        if mod_name.endswith(".py") or os.sep in mod_name:
            path = Path(mod_name)
            spec = importlib.util.spec_from_file_location(f"_energylens_runner_{path.stem}", path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ImportError as e:
        raise JobError(f"the runner {target} could not be imported: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise JobError(f"the runner {target} does not exist ({mod_name} has no function {attr})")
    return fn


def _finish(root: Path, job_id: str, pid: int, status: str, *, result: Any = None, error: str | None = None,
            message: str = "") -> None:
    """Record the outcome: first in the job's job-state.json (which survives a registry that cannot be written,
    e.g. on a full disk: refresh() adopts it later), then in the registry row."""
    now = time.time()
    _write_state(root / job_id, status=status, pid=pid, finished=now, result=result, error=error, message=message)
    with _connect(root) as conn:
        if conn is None:
            return
        with _tx(conn):
            conn.execute("UPDATE jobs SET status = ?, finished = ?, updated = ?, result = ?, error = ?, message = ?, "
                         "progress = CASE WHEN ? = 'done' THEN 1.0 ELSE progress END "
                         "WHERE id = ? AND pid = ? AND status = 'running'",
                         (status, now, now, None if result is None else _dumps(result), error, message, status,
                          job_id, pid))


def _warn(text: str, prefix: str = "warning: ") -> None:
    """A line on stderr (the job's log) that never raises: writing the log fails too when the disk is full."""
    try:
        print(f"[energylens] {prefix}{text}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _run_in_this_process(run_dir: str | os.PathLike) -> int:
    """Body of ``python -m core.jobs run <run_dir>``: claim the row, run the runner, record the outcome."""
    signal.signal(signal.SIGTERM, _on_term)
    folder = Path(run_dir).resolve()
    root, job_id = folder.parent, folder.name
    me = os.getpid()
    # claim the row (the launcher normally marked it running with our pid already)
    with _connect(root) as conn:
        if conn is None:
            raise JobError(f"no job registry in {root}")
        with _tx(conn):
            row = _fetch(conn, job_id)
            if row is None:
                raise JobError(f"job '{job_id}' is not in the registry {root / REGISTRY_NAME}")
            other = row["pid"] not in (None, me) and row["status"] == "running" \
                and _process_matches(row["pid"], row["proc_start"])
            if row["status"] not in ("queued", "running") or other:
                print(f"[energylens] job {job_id} is {row['status']} (pid {row['pid']}): not running it again",
                      file=sys.stderr)
                return 0
            now = time.time()
            conn.execute("UPDATE jobs SET status = 'running', pid = ?, proc_start = ?, started = COALESCE(started, ?), "
                         "finished = NULL, message = 'starting', updated = ? WHERE id = ?",
                         (me, _proc_start_time(me), now, now, job_id))
    kind, slot = row["kind"], row["device"]
    _write_state(folder, status="running", pid=me, proc_start=_proc_start_time(me), started=row["started"] or now,
                 finished=None, error=None, result=None, message="starting")
    print(f"[energylens] {time.strftime('%Y-%m-%d %H:%M:%S')} job {job_id} ({kind}) pid {me} on {slot}",
          file=sys.stderr, flush=True)
    # only this process writes into the folder now: temp files of atomic writes interrupted by an earlier
    # process of this job (SIGKILL, a crash) are garbage (a WRN's state.pt temp file is hundreds of MB)
    stale = remove_stale_temp_files(folder)
    if stale:
        print(f"[energylens] removed {len(stale)} stale temp file(s) of interrupted writes: {', '.join(stale[:5])}"
              + (" ..." if len(stale) > 5 else ""), file=sys.stderr, flush=True)
    _make_ballast(folder)
    reporter: _Reporter | None = None
    status, result, error, message = "failed", None, None, ""
    try:
        _child.armed = True
        if _child.term_requested:
            raise JobStopped("stopped before the runner started")
        spec = _read_job_file(folder)
        config = dict(spec.get("config") or {})
        if config.get("device") == "auto":
            config["device"] = slot  # the runner uses the slot the scheduler gave it
        target = spec.get("target") or available_kinds().get(kind)
        if not target:
            raise JobError(f"unknown job kind '{kind}'")
        runner = _load_runner(target)
        reporter = _Reporter(root, job_id, me)
        result = runner(config, folder, reporter)
        _child.armed = False
        if result is not None and not isinstance(result, dict):
            result = {"value": result}
        status, message = "done", "finished"
    except (JobStopped, KeyboardInterrupt):
        _child.armed = False
        status, message = "stopped", "stopped by user"
        _warn(f"job {job_id} stopped", prefix="")
    except EnergyLensError as e:
        _child.armed = False
        status, error, message = "failed", str(e), "failed"
        with contextlib.suppress(OSError, ValueError):  # the log cannot be written when the disk is full
            traceback.print_exc()
            print(f"error: {e}", file=sys.stderr, flush=True)
    except BaseException as e:  # noqa: BLE001 - any crash of the runner is recorded, never lost
        _child.armed = False
        status, message, error = "failed", "failed", f"{type(e).__name__}: {e}"
        with contextlib.suppress(OSError, ValueError):
            traceback.print_exc()
            sys.stderr.flush()
        tail = "\n".join(_log_tail_lines(folder, ERROR_LOG_LINES))
        error = f"{error}\n\nLast log lines:\n{tail}"
    finally:
        _child.armed = False
        if reporter is not None:
            try:
                reporter.close()
            except Exception:  # noqa: BLE001
                pass
        try:
            try:
                _finish(root, job_id, me, status, result=result, error=error, message=message)
            except Exception as e:  # noqa: BLE001 - e.g. a full disk: the outcome is in job-state.json if it fits
                if _release_ballast(folder):  # the reserved space may be enough for the registry's few pages
                    try:
                        _finish(root, job_id, me, status, result=result, error=error, message=message)
                        e = None
                    except Exception as e2:  # noqa: BLE001
                        e = e2
                if e is not None:
                    _warn(f"could not record the outcome ({status}) in the job registry: {e}")
        finally:
            _release_ballast(folder)
            try:  # hand the device slot to the next queued job (no daemon needed)
                refresh(root)
            except Exception as e:  # noqa: BLE001
                _warn(f"could not start queued jobs: {e}")
    _warn(f"{time.strftime('%Y-%m-%d %H:%M:%S')} job {job_id} {status}", prefix="")
    return 0 if status in ("done", "stopped") else 1


# ============================================================================================
# Command line
# ============================================================================================
def _fmt_time(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _print_table(jobs: list[JobInfo]) -> None:
    if not jobs:
        print("no jobs")
        return
    rows = [("ID", "STATUS", "PROGRESS", "DEVICE", "CREATED", "NAME", "MESSAGE")]
    for j in jobs:
        msg = (j.error or "").splitlines()[0] if j.status == "failed" and j.error else j.message
        # names and messages may hold terminal escape sequences (a name is free text): never print them raw
        rows.append((clean_text(j.id), clean_text(j.status), f"{j.progress:.0%}", clean_text(j.device),
                     _fmt_time(j.created), clean_text(j.name, 30), clean_text(msg or "", 60)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core.jobs", description="Manage EnergyLens background jobs.")
    p.add_argument("--runs-dir", default=None, help=f"runs folder (default: env {ENV_RUNS} or <repo>/runs)")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("submit", help="submit a job")
    s.add_argument("kind", help="job kind: " + ", ".join(KINDS))
    s.add_argument("--config", required=True, help="JSON file with the job config (as the dashboard writes it)")
    s.add_argument("--name", default=None)
    s.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    s.add_argument("--no-start", action="store_true", help="only queue it")
    ls = sub.add_parser("list", help="list jobs, newest first")
    ls.add_argument("--kind", default=None)
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    for cmd, hlp in (("show", "print one job as JSON"), ("stop", "stop a job"),
                     ("resume", "resume a stopped/failed job"), ("delete", "delete a job and its folder")):
        c = sub.add_parser(cmd, help=hlp)
        c.add_argument("id")
        if cmd == "stop":
            c.add_argument("--grace", type=float, default=None, help="seconds between SIGTERM and SIGKILL")
    lg = sub.add_parser("log", help="print the end of a job's log")
    lg.add_argument("id")
    lg.add_argument("-n", type=int, default=50)
    sw = sub.add_parser("sweep", help="sweeps: submit FILE.yaml|json, or list | status ID | table ID | stop ID "
                        "(python -m core.jobs sweep --help)", add_help=False)
    sw.add_argument("sweep_args", nargs=argparse.REMAINDER)
    r = sub.add_parser("run", help="(internal) run the job in RUN_DIR in this process")
    r.add_argument("run_dir")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)  # 'sweep' hands its own options (--help, --backend ...) to core.sweep
    if rest and args.cmd != "sweep":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    rd = args.runs_dir
    try:
        if args.cmd == "run":
            return _run_in_this_process(args.run_dir)
        if args.cmd == "sweep":
            from .sweep import cli as sweep_cli  # the sweep commands live in core.sweep

            raw = list(sys.argv[1:] if argv is None else argv)  # everything after 'sweep', in its order
            i = 0
            while i < len(raw) and raw[i] != "sweep":
                i += 2 if raw[i] == "--runs-dir" else 1
            return sweep_cli(raw[i + 1:], runs_dir=rd)
        if args.cmd == "submit":
            try:
                config = json.loads(Path(args.config).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise JobError(f"cannot read config file {args.config}: {e}") from e
            if not isinstance(config, dict):
                raise JobError(f"config file {args.config} must hold a JSON object")
            info = submit(args.kind, config, name=args.name, device=args.device, runs_dir=rd, start=not args.no_start)
            print(f"{info.id}  {info.status}  {info.run_dir}")
        elif args.cmd == "list":
            jobs = list_jobs(rd, kind=args.kind)
            notice = registry_notice(rd)
            if notice:
                print(f"warning: {notice}", file=sys.stderr)
            if args.json:
                print(json.dumps([j.to_dict() for j in jobs], indent=2, default=_json_default))
            else:
                _print_table(jobs)
        elif args.cmd == "show":
            print(json.dumps(get_job(args.id, rd).to_dict(), indent=2, default=_json_default))
        elif args.cmd == "log":
            print(read_log_tail(args.id, args.n, rd))
        elif args.cmd == "stop":
            info = stop_job(args.id, rd, grace=args.grace)
            print(f"{info.id}  {info.status}")
        elif args.cmd == "resume":
            info = resume_job(args.id, rd)
            print(f"{info.id}  {info.status}")
        elif args.cmd == "delete":
            delete_job(args.id, rd)
            print(f"deleted {args.id}")
    except EnergyLensError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # Run through the canonical module so runners that import core.jobs share its state and classes.
    from core.jobs import main as _main

    sys.exit(_main())
