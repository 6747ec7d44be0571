"""Tiny job runners for tests/test_jobs.py (loaded by file path inside job processes).

Each follows the runner contract ``run(config, run_dir, report) -> dict | None`` and leaves a
``marker.json`` in its folder so tests can see what happened inside the job process. None of them
imports torch, so a job process starts in a fraction of a second.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from core.errors import InputError


def _marker(run_dir: Path, **kw) -> None:
    path = Path(run_dir) / "marker.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(kw)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def quick(config, run_dir, report):
    """Reports a few steps, writes metrics.jsonl and returns a result."""
    _marker(run_dir, pid=os.getpid(), start=time.time(), config=config)
    steps = int(config.get("steps", 3))
    with open(Path(run_dir) / "metrics.jsonl", "a") as f:
        for i in range(steps):
            f.write(json.dumps({"epoch": i + 1, "value": config.get("value", 0)}) + "\n")
            report((i + 1) / steps, f"step {i + 1}/{steps}")
    print("quick runner done", flush=True)
    _marker(run_dir, end=time.time())
    return {"answer": 42, "value": config.get("value", 0), "steps": steps}


def wait_for_go(run_dir) -> None:
    """Block until the test creates ``run_dir/go``: a job held at a known point, however fast or slow the machine."""
    while not (Path(run_dir) / "go").exists():
        time.sleep(0.01)


def sleepy(config, run_dir, report):
    """Sleeps ``steps`` x ``dt`` seconds, checkpointing the step; with resume=True it continues. With
    ``gate: k`` it holds after reporting step k until the test creates ``run_dir/go`` (or stops it there)."""
    run_dir = Path(run_dir)
    steps, dt = int(config.get("steps", 10)), float(config.get("dt", 0.1))
    gate = config.get("gate")
    state = run_dir / "state.json"
    first = json.loads(state.read_text())["step"] if config.get("resume") and state.exists() else 0
    _marker(run_dir, pid=os.getpid(), start=time.time(), first_step=first, resume=bool(config.get("resume")))
    try:
        for i in range(first, steps):
            print(f"sleepy step {i + 1}/{steps}", flush=True)
            time.sleep(dt)
            state.write_text(json.dumps({"step": i + 1}))
            report((i + 1) / steps, f"step {i + 1}/{steps}")
            if gate is not None and i + 1 == int(gate):
                wait_for_go(run_dir)
    finally:
        _marker(run_dir, cleanup=time.time())  # proves the runner unwinds on a stop request
    _marker(run_dir, end=time.time())
    return {"steps": steps, "first_step": first}


def failing(config, run_dir, report):
    """Prints some lines, then crashes with an unexpected exception."""
    for i in range(3):
        print(f"working on part {i}", flush=True)
    report(0.3, "about to fail")
    raise RuntimeError("boom: the runner crashed")


def user_error(config, run_dir, report):
    """Fails with a user-facing EnergyLensError."""
    raise InputError("epsilon must lie in [0, 1], got 3")


def chatty(config, run_dir, report):
    """Reports progress far more often than the registry accepts writes: at least ``reports`` times for at least
    ``seconds``, and with ``gate: true`` on until the test creates ``run_dir/go``."""
    n, t_end = int(config.get("reports", 2000)), time.time() + float(config.get("seconds", 2.0))
    go = Path(run_dir) / "go" if config.get("gate") else None
    i = 0
    while time.time() < t_end or i < n or (go is not None and not go.exists()):
        i += 1
        report(min(1.0, i / n), f"report {i}")
        time.sleep(0.001)
    return {"reports": i}


def stubborn(config, run_dir, report):
    """Ignores SIGTERM, so stopping it needs SIGKILL."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _marker(run_dir, pid=os.getpid(), start=time.time())
    report(0.1, "ignoring stop requests")
    time.sleep(float(config.get("seconds", 60)))
    return {}


def torn_write(config, run_dir, report):
    """First run: dies by SIGKILL in the middle of two atomic writes (their temp files stay behind).
    Resumed: records which temp files it finds, then finishes."""
    import tempfile

    run_dir = Path(run_dir)
    if not config.get("resume"):
        (run_dir / "probe").mkdir(exist_ok=True)
        for folder, name in ((run_dir, "state.pt"), (run_dir / "probe", "epoch_0001.npz")):
            fd, _ = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)  # as core.storage.atomic_write
            os.write(fd, b"\0" * 100_000)
            os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
    found = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*.tmp"))
    _marker(run_dir, temp_files_seen=found)
    return {"ok": True}


def disk_full_outcome(config, run_dir, report):
    """Fails with a disk-full error, and the registry cannot be written either (as on a full disk)."""
    from core.jobs import store
    from core.errors import EnergyLensError, JobError

    def full(*a, **k):
        raise JobError("the disk holding the runs folder is full: the job registry cannot be updated")

    store.connect = full  # this process only: its final registry write fails, its job-state.json does not
    raise EnergyLensError(f"could not write {Path(run_dir) / 'last.safetensors'}: No space left on device")


def disk_full_crash(config, run_dir, report):
    """Dies without recording anything after a write failed with ENOSPC (its log says so)."""
    print("OSError: [Errno 28] No space left on device: 'runs/x/state.pt'", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def fill_disk(config, run_dir, report):
    """Writes until the disk is really full, then fails as core.storage does (for a small tmpfs)."""
    import errno

    from core.errors import EnergyLensError

    path = Path(run_dir) / "big.bin"
    try:
        with open(path, "wb") as f:
            while True:
                f.write(b"\1" * 65536)
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise EnergyLensError(f"could not write {path}: {e.strerror}") from e
