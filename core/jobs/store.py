"""The job registry: ``<runs>/registry.sqlite``, one row per job. The only module of core.jobs with SQL.

WAL mode, every write in a ``BEGIN IMMEDIATE`` transaction, short-lived connections. Other modules read rows
with :func:`fetch` / :func:`get` / the ``rows_*`` queries and write them through the small named functions
below, either inside a transaction they hold (those taking ``conn``) or on their own (those taking ``root``,
which also mirror the change into the job's ``job-state.json``).

The registry can be rebuilt from the job folders: when ``registry.sqlite`` is missing (deleted, or moved
away as the corrupt-registry message advises) while job folders exist, the next :func:`connect` rebuilds it
from every ``job.json`` + ``job-state.json``, a job whose process still runs (its pid and start time, or a
``core.jobs run <folder>`` process found in /proc) as running, so that it stays visible, stoppable and
counted against its device slot. Jobs that were queued come back stopped (resume them to run them): a
rebuild never starts anything. :func:`registry_notice` says that it happened (for a day).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import secrets
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import JobError
from . import files, process

__all__ = ["JobInfo", "REGISTRY_NAME", "connect", "transaction", "init_schema", "fetch", "row", "get",
           "row_to_info", "rebuild_registry", "registry_notice", "rows_with_status", "active_rows", "list_rows",
           "has_active_on_slot", "active_rows_on_slot", "insert_queued", "record_outcome", "mark_not_started",
           "mark_launched", "claim", "stop_queued", "stop_running", "requeue", "delete_row", "report_progress",
           "record_finish", "set_message", "mark", "requeue_row"]

REGISTRY_NAME = "registry.sqlite"
BUSY_TIMEOUT_S = 30.0        # how long a registry write waits for the lock
NOTICE_S = 24 * 3600          # how long registry_notice() reports a rebuild

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


# ============================================================================================
# Connections and transactions
# ============================================================================================
_init_lock = threading.Lock()


@contextlib.contextmanager
def connect(root: Path, create: bool = False) -> Iterator[sqlite3.Connection | None]:
    """A short-lived connection to ``<root>/registry.sqlite``; yields None when absent and not ``create``.

    A missing registry is rebuilt from the job folders first (see the module doc) when there are any, and
    whenever ``create`` is set: a registry file always appears complete, never empty while jobs exist."""
    path = root / REGISTRY_NAME
    if not path.exists():
        if not create and not files.job_folders(root):
            yield None
            return
        rebuild_registry(root)
    try:
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
    except sqlite3.Error as e:
        raise JobError(f"cannot open the job registry {path}: {e}. Check that the folder {root} is writable.") from e
    try:
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        init_schema(conn, path)
        yield conn
    except sqlite3.DatabaseError as e:
        raise JobError(_db_error_message(e, path)) from e
    finally:
        conn.close()


def _db_error_message(e: sqlite3.Error, path: Path) -> str:
    msg = str(e)
    low = msg.lower()
    full = files.disk_full_text(path.parent) if ("disk i/o" in low or "full" in low or "unable to open" in low) \
        else None
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


def init_schema(conn: sqlite3.Connection, path: Path) -> None:
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


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction that takes the write lock up front (BEGIN IMMEDIATE)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


# ============================================================================================
# Reading rows
# ============================================================================================
def row_to_info(row: sqlite3.Row, root: Path) -> JobInfo:
    """The :class:`JobInfo` of a registry row."""
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


def fetch(conn: sqlite3.Connection, job_id: str) -> sqlite3.Row | None:
    """The row of ``job_id`` (None when there is none)."""
    return conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()


def row(root: Path, job_id: str) -> sqlite3.Row | None:
    """The row of ``job_id`` read on its own connection (None when there is none or no registry)."""
    with connect(root) as conn:
        return fetch(conn, job_id) if conn is not None else None


def get(root: Path, job_id: str) -> JobInfo:
    """The job as the registry has it (no reconciling); JobError when the id is invalid or unknown."""
    files.job_dir(job_id, root)  # validates the id
    r = row(root, job_id)
    if r is None:
        raise JobError(f"unknown job '{job_id}' in {root}")
    return row_to_info(r, root)


def rows_with_status(conn: sqlite3.Connection, status: str) -> list[sqlite3.Row]:
    """Every row with ``status``, first submitted first."""
    return conn.execute("SELECT * FROM jobs WHERE status = ? ORDER BY created, id", (status,)).fetchall()


def active_rows(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """Status, pid, start time and device of every queued or running row (a cheap read)."""
    return conn.execute("SELECT status, pid, proc_start, device FROM jobs WHERE status IN ('queued', 'running')"
                        ).fetchall()


def list_rows(conn: sqlite3.Connection, kind: str | None = None) -> list[sqlite3.Row]:
    """Every row (of ``kind``), newest first."""
    if kind is None:
        return conn.execute("SELECT * FROM jobs ORDER BY created DESC, id DESC").fetchall()
    return conn.execute("SELECT * FROM jobs WHERE kind = ? ORDER BY created DESC, id DESC", (kind,)).fetchall()


def has_active_on_slot(conn: sqlite3.Connection, slot: str) -> bool:
    """Is a row whose device slot starts with ``slot`` (e.g. 'slurm') queued or running?"""
    return conn.execute("SELECT 1 FROM jobs WHERE device LIKE ? AND status IN ('queued', 'running') LIMIT 1",
                        (f"{slot}%",)).fetchone() is not None


def active_rows_on_slot(root: Path, slot: str) -> list[sqlite3.Row]:
    """The queued or running rows whose device slot starts with ``slot`` ([] without a registry)."""
    with connect(root) as conn:
        if conn is None:
            return []
        return conn.execute("SELECT * FROM jobs WHERE device LIKE ? AND status IN ('queued', 'running')",
                            (f"{slot}%",)).fetchall()


# ============================================================================================
# Writes inside the caller's transaction (conn)
# ============================================================================================
def insert_queued(conn: sqlite3.Connection, job_id: str, kind: str, name: str, device: str, created: float,
                  config: dict) -> None:
    """A new row, status 'queued'."""
    conn.execute("INSERT INTO jobs (id, kind, name, status, device, created, progress, message, config, "
                 "updated) VALUES (?, ?, ?, 'queued', ?, ?, 0, 'queued', ?, ?)",
                 (job_id, kind, name, device, created, files.dumps(config), created))


def record_outcome(conn: sqlite3.Connection, job_id: str, status: str, now: float, error: str | None,
                   result: str | None, message: str) -> None:
    """The outcome of a job whose process is gone (``result``: JSON text or None)."""
    conn.execute("UPDATE jobs SET status = ?, finished = ?, updated = ?, error = ?, result = ?, "
                 "message = ?, progress = CASE WHEN ? = 'done' THEN 1.0 ELSE progress END WHERE id = ?",
                 (status, now, now, error, result, message, status, job_id))


def mark_not_started(conn: sqlite3.Connection, job_id: str, now: float, error: str) -> None:
    """A queued job whose process could not be started: failed."""
    conn.execute("UPDATE jobs SET status = 'failed', finished = ?, updated = ?, error = ?, "
                 "message = 'could not start' WHERE id = ?", (now, now, error, job_id))


def mark_launched(conn: sqlite3.Connection, job_id: str, pid: int, proc_start: int | None, now: float) -> None:
    """A queued job whose process was just started: running with that pid."""
    conn.execute("UPDATE jobs SET status = 'running', pid = ?, proc_start = ?, started = ?, finished = NULL, "
                 "error = NULL, result = NULL, message = 'starting', updated = ? WHERE id = ?",
                 (pid, proc_start, now, now, job_id))


def claim(conn: sqlite3.Connection, job_id: str, pid: int, proc_start: int | None, now: float) -> None:
    """The job process takes its row: running with its own pid (the start time is kept on a relaunch)."""
    conn.execute("UPDATE jobs SET status = 'running', pid = ?, proc_start = ?, started = COALESCE(started, ?), "
                 "finished = NULL, message = 'starting', updated = ? WHERE id = ?",
                 (pid, proc_start, now, now, job_id))


def stop_queued(conn: sqlite3.Connection, job_id: str, now: float) -> bool:
    """A still-queued row leaves the queue (stopped); False when it was no longer queued."""
    cur = conn.execute("UPDATE jobs SET status = 'stopped', finished = ?, updated = ?, "
                       "message = 'stopped before it started' WHERE id = ? AND status = 'queued'",
                       (now, now, job_id))
    return bool(cur.rowcount)


def stop_running(conn: sqlite3.Connection, job_id: str, pid: int | None, now: float) -> bool:
    """A row still running with ``pid`` becomes stopped; False when it changed meanwhile."""
    cur = conn.execute("UPDATE jobs SET status = 'stopped', finished = ?, updated = ?, "
                       "message = 'stopped by user' WHERE id = ? AND status = 'running' AND pid IS ?",
                       (now, now, job_id, pid))
    return bool(cur.rowcount)


def requeue(conn: sqlite3.Connection, job_id: str, config: dict, message: str,
            only_if: tuple[str, ...] | None = None) -> bool:
    """Queue a row again with ``config`` (pid, end, error and result cleared): when its status is in ``only_if``,
    or, with None, whenever it is not done. False when the row was not in such a state."""
    now = time.time()
    if only_if is None:
        where, args = "status != 'done'", ()
    else:
        where, args = f"status IN ({','.join('?' * len(only_if))})", tuple(only_if)
    cur = conn.execute("UPDATE jobs SET status = 'queued', config = ?, pid = NULL, proc_start = NULL, "
                       f"finished = NULL, error = NULL, result = NULL, message = ?, updated = ? WHERE id = ? AND {where}",
                       (files.dumps(config), message, now, job_id, *args))
    return bool(cur.rowcount)


def delete_row(conn: sqlite3.Connection, job_id: str) -> bool:
    """Remove a row that is not running; False when there was none (or it runs)."""
    cur = conn.execute("DELETE FROM jobs WHERE id = ? AND status != 'running'", (job_id,))
    return bool(cur.rowcount)


# ============================================================================================
# Writes on their own connection (root)
# ============================================================================================
def report_progress(root: Path, job_id: str, pid: int, fraction: float | None, message: str) -> None:
    """The job process ``pid`` reports progress on its running row (``fraction`` None keeps the old one)."""
    with connect(root) as conn:
        if conn is None:
            return
        with transaction(conn):
            conn.execute("UPDATE jobs SET progress = COALESCE(?, progress), message = ?, updated = ? "
                         "WHERE id = ? AND pid = ? AND status = 'running'",
                         (fraction, message, time.time(), job_id, pid))


def record_finish(root: Path, job_id: str, pid: int, status: str, now: float, result: Any, error: str | None,
                  message: str) -> None:
    """The job process ``pid`` records its outcome on its row, if that is still running with its pid (the
    caller writes job-state.json first)."""
    with connect(root) as conn:
        if conn is None:
            return
        with transaction(conn):
            conn.execute("UPDATE jobs SET status = ?, finished = ?, updated = ?, result = ?, error = ?, message = ?, "
                         "progress = CASE WHEN ? = 'done' THEN 1.0 ELSE progress END "
                         "WHERE id = ? AND pid = ? AND status = 'running'",
                         (status, now, now, None if result is None else files.dumps(result), error, message, status,
                          job_id, pid))


def set_message(root: Path, job_id: str, message: str) -> None:
    """The message of a queued or running row (and its job-state.json)."""
    with connect(root) as conn:
        if conn is None:
            return
        with transaction(conn):
            conn.execute("UPDATE jobs SET message = ?, updated = ? WHERE id = ? AND status IN ('queued', 'running')",
                         (message, time.time(), job_id))
    files.write_state(root / job_id, message=message)


def mark(root: Path, job_id: str, status: str, message: str, error: str | None = None,
         only_if: tuple = ("queued", "running")) -> bool:
    """Set a finished status on a row still in ``only_if`` (and its job-state.json); True when it changed."""
    now = time.time()
    with connect(root) as conn:
        if conn is None:
            return False
        with transaction(conn):
            q = ",".join("?" * len(only_if))
            cur = conn.execute(f"UPDATE jobs SET status = ?, finished = ?, updated = ?, message = ?, error = ? "
                               f"WHERE id = ? AND status IN ({q})", (status, now, now, message, error, job_id, *only_if))
    if cur.rowcount:
        files.write_state(root / job_id, status=status, finished=now, message=message, error=error)
    return bool(cur.rowcount)


def requeue_row(root: Path, job_id: str, message: str) -> None:
    """Queue a row that is not done again with ``resume`` (job.json, the row, job-state.json): the next run of
    the job resumes (an external scheduler's task after preemption or a time-out)."""
    folder = root / job_id
    spec = files.read_job_file(folder)
    config = {**(spec.get("config") or {}), "resume": True}
    spec["config"] = config
    files.write_job_file(folder, spec)
    with connect(root) as conn:
        with transaction(conn):
            requeue(conn, job_id, config, message)
    files.write_state(folder, status="queued", pid=None, proc_start=None, finished=None, error=None, result=None,
                      message=message)


# ============================================================================================
# Rebuilding a lost registry from the job folders
# ============================================================================================
def _rebuilt_row(folder: Path, procs: dict[str, tuple[int, int | None]], now: float) -> tuple | None:
    """The registry row of one job folder: its job.json, its job-state.json and whether its process runs."""
    try:
        spec = files.read_job_file(folder)
    except JobError:
        return None
    state = files.read_state(folder) or {}
    job_id = folder.name
    kind = str(spec.get("kind") or "unknown")
    name = files.clean_text(spec.get("name") or kind, 200)
    device = str(spec.get("device") or "cpu")
    created = float(spec.get("created") or now)
    config = spec.get("config") if isinstance(spec.get("config"), dict) else {}
    status = state.get("status")
    pid, pstart = state.get("pid"), state.get("proc_start")
    live = status == "running" and isinstance(pid, int) and process.process_matches(pid, pstart)
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
            files.dumps(config), error, None if state.get("result") is None else files.dumps(state.get("result")), now)


def rebuild_registry(root: Path) -> None:
    """Create ``<root>/registry.sqlite`` from the job folders, published atomically (no reader ever sees it
    half-built); under a lock file so that concurrent processes rebuild it once."""
    path = root / REGISTRY_NAME
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / ".registry.lock", "a+b")
    except OSError as e:
        full = files.disk_full_text(root)
        raise JobError(f"the job registry {path} is missing and cannot be created: {full or (e.strerror or e)}"
                       ) from e
    with lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if path.exists():
            return  # another process rebuilt it meanwhile
        folders = files.job_folders(root)
        now = time.time()
        procs = process.job_processes() if folders else {}
        rows = [r for r in (_rebuilt_row(f, procs, now) for f in folders) if r is not None]
        tmp = root / f".{REGISTRY_NAME}.{secrets.token_hex(4)}.rebuild"
        try:
            conn = sqlite3.connect(str(tmp), isolation_level=None)
            try:
                conn.executescript(_SCHEMA)
                with transaction(conn):
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
            full = files.disk_full_text(root)
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
    root = files.runs_dir(runs_dir)
    if not (root / REGISTRY_NAME).exists():
        return None
    with connect(root) as conn:
        if conn is None:
            return None
        r = conn.execute("SELECT message, created FROM notices WHERE key = 'rebuilt'").fetchone()
    if r is None or time.time() - float(r["created"]) > NOTICE_S:
        return None
    return str(r["message"])
