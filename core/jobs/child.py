"""Inside the job process: ``python -m core.jobs run <run_dir>`` claims its row, runs the runner, records the
outcome, and hands its device slot to the next queued job (so a queue drains without any daemon).

A *runner* ``run_job(config, run_dir, report) -> dict | None`` is named in job.json (``"module:function"`` or
``"/path/to/file.py:function"``) and imported here only. ``report(fraction, message)`` publishes progress
(throttled). SIGTERM raises :class:`JobStopped` in the runner; runners that prefer to poll call
:func:`stop_requested`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
import signal
import sqlite3
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from ..errors import EnergyLensError, JobError
from . import api, files, process, store

__all__ = ["JobStopped", "stop_requested", "Reporter", "REPORT_INTERVAL_S", "load_runner", "run_in_this_process"]

REPORT_INTERVAL_S = 0.5      # at most ~2 progress writes per second per job


class JobStopped(BaseException):
    """Raised inside a job process when it receives SIGTERM (a stop request).

    It derives from BaseException, like KeyboardInterrupt, so that a runner's ``except Exception``
    does not swallow it; ``finally`` blocks and context managers still run while it unwinds.
    """


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


class Reporter:
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
        """Write the pending report now if the interval has passed (``force``: in any case)."""
        with self._lock:
            if self._pending is None or (not force and time.monotonic() - self._last < REPORT_INTERVAL_S):
                return
            fraction, message = self._pending
            self._pending = None
            self._last = time.monotonic()
        self.write(fraction, message)

    def write(self, fraction: float | None, message: str) -> None:
        """One registry write of progress and message (a failure is warned about once, never raised)."""
        try:
            store.report_progress(self.root, self.job_id, self.pid, fraction, message)
        except (sqlite3.Error, JobError) as e:
            if not self._warned:
                self._warned = True
                print(f"[energylens] warning: could not record progress: {e}", file=sys.stderr, flush=True)

    def _loop(self) -> None:
        while not self._stop.wait(REPORT_INTERVAL_S / 2):
            self.flush()

    def close(self) -> None:
        """Stop the background flusher and write the last report."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush(force=True)


def load_runner(target: str) -> Callable[..., Any]:
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
    files.write_state(root / job_id, status=status, pid=pid, finished=now, result=result, error=error,
                      message=message)
    store.record_finish(root, job_id, pid, status, now, result, error, message)


def _warn(text: str, prefix: str = "warning: ") -> None:
    """A line on stderr (the job's log) that never raises: writing the log fails too when the disk is full."""
    try:
        print(f"[energylens] {prefix}{text}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def run_in_this_process(run_dir: str | os.PathLike) -> int:
    """Body of ``python -m core.jobs run <run_dir>``: claim the row, run the runner, record the outcome."""
    signal.signal(signal.SIGTERM, _on_term)
    folder = Path(run_dir).resolve()
    root, job_id = folder.parent, folder.name
    me = os.getpid()
    # claim the row (the launcher normally marked it running with our pid already)
    with store.connect(root) as conn:
        if conn is None:
            raise JobError(f"no job registry in {root}")
        with store.transaction(conn):
            row = store.fetch(conn, job_id)
            if row is None:
                raise JobError(f"job '{job_id}' is not in the registry {root / store.REGISTRY_NAME}")
            other = row["pid"] not in (None, me) and row["status"] == "running" \
                and process.process_matches(row["pid"], row["proc_start"])
            if row["status"] not in ("queued", "running") or other:
                print(f"[energylens] job {job_id} is {row['status']} (pid {row['pid']}): not running it again",
                      file=sys.stderr)
                return 0
            now = time.time()
            store.claim(conn, job_id, me, process.proc_start_time(me), now)
    kind, slot = row["kind"], row["device"]
    files.write_state(folder, status="running", pid=me, proc_start=process.proc_start_time(me),
                      started=row["started"] or now, finished=None, error=None, result=None, message="starting")
    print(f"[energylens] {time.strftime('%Y-%m-%d %H:%M:%S')} job {job_id} ({kind}) pid {me} on {slot}",
          file=sys.stderr, flush=True)
    # only this process writes into the folder now: temp files of atomic writes interrupted by an earlier
    # process of this job (SIGKILL, a crash) are garbage (a WRN's state.pt temp file is hundreds of MB)
    stale = files.remove_stale_temp_files(folder)
    if stale:
        print(f"[energylens] removed {len(stale)} stale temp file(s) of interrupted writes: {', '.join(stale[:5])}"
              + (" ..." if len(stale) > 5 else ""), file=sys.stderr, flush=True)
    files.make_ballast(folder)
    reporter: Reporter | None = None
    status, result, error, message = "failed", None, None, ""
    try:
        _child.armed = True
        if _child.term_requested:
            raise JobStopped("stopped before the runner started")
        spec = files.read_job_file(folder)
        config = dict(spec.get("config") or {})
        if config.get("device") == "auto":
            config["device"] = slot  # the runner uses the slot the scheduler gave it
        target = spec.get("target") or api.available_kinds().get(kind)
        if not target:
            raise JobError(f"unknown job kind '{kind}'")
        runner = load_runner(target)
        reporter = Reporter(root, job_id, me)
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
        tail = "\n".join(files.log_tail_lines(folder, files.ERROR_LOG_LINES))
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
                if files.release_ballast(folder):  # the reserved space may be enough for the registry's few pages
                    try:
                        _finish(root, job_id, me, status, result=result, error=error, message=message)
                        e = None
                    except Exception as e2:  # noqa: BLE001
                        e = e2
                if e is not None:
                    _warn(f"could not record the outcome ({status}) in the job registry: {e}")
        finally:
            files.release_ballast(folder)
            try:  # hand the device slot to the next queued job (no daemon needed)
                api.refresh(root)
            except Exception as e:  # noqa: BLE001
                _warn(f"could not start queued jobs: {e}")
    _warn(f"{time.strftime('%Y-%m-%d %H:%M:%S')} job {job_id} {status}", prefix="")
    return 0 if status in ("done", "stopped") else 1
