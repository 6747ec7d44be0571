"""Sweeps: a base training config plus a grid, expanded into ordinary jobs that share a sweep id.

A sweep file (YAML or JSON; ``examples/table1a_cifar10.yaml`` reproduces Table 1a's CIFAR-10 rows)::

    name: table1a-cifar10
    base:                      # TrainConfig fields shared by every run (core.train)
      dataset: cifar10
      arch: resnet18
      epochs: 100
    grid:                      # every combination of these lists is one run (any TrainConfig field)
      method: [sat, trades, mail-trades, weat-nat, weat-adv]
      seed: [0, 1, 2, 3, 4]
    evaluate:                  # after training, each run's checkpoint is evaluated (core.evaluation)
      n: 10000                 #   natural / PGD-20 / AutoAttack on the first n test images
      checkpoint: best         #   best | last;   evaluate: false skips it
    backend:                   # where the runs go (core.jobs schedulers): local (default) or slurm
      name: local
    nproc: 1                   # processes per run (DDP through torchrun inside the job when > 1)

Every run is a job of kind ``train`` in the usual registry (the Training studio shows it with Fig. 3),
whose runner :func:`run_cell` trains and then evaluates into the same folder (``result.json``); its
job.json carries ``sweep: {id, cell, evaluate, nproc}``. The sweep itself is a small file
``<runs>/sweeps/<sweep id>.json`` (spec, backend, the job id of every cell).

:func:`status` gives the progress grid and :func:`table` the Table-1 view: the evaluation records of the
finished runs grouped by :func:`core.evaluation.results_table` (mean ± std over seeds), exportable as CSV
and Markdown. The file format, its limits and the grid expansion live in :mod:`core.sweep_spec` (re-exported here).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from . import jobs
from .errors import EnergyLensError, InputError, JobError
from .evaluation import results_table
from .evaluation import run_job as eval_job
from .paths import REPO_ROOT
from .rundir import RunDir
from .storage import atomic_write_text
from .sweep_spec import _SAFE, EVAL_SWEEP_DEFAULTS, MAX_CELLS, SweepSpec, _refuse_setup, expand, load_spec, parse_spec
from .train import run_job as train_job

__all__ = ["SweepSpec", "load_spec", "parse_spec", "expand", "submit_sweep", "list_sweeps", "load_sweep", "status",
           "table", "stop_sweep", "run_cell", "EVAL_SWEEP_DEFAULTS", "MAX_CELLS"]

SWEEPS_DIR = "sweeps"


# ============================================================================================
# The sweep file in the runs folder
# ============================================================================================
def _root(runs_dir) -> Path:
    return jobs.runs_dir(runs_dir)


def _sweep_path(root: Path, sweep_id: str) -> Path:
    if not isinstance(sweep_id, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", sweep_id):
        raise InputError(f"invalid sweep id {sweep_id!r}")
    return root / SWEEPS_DIR / f"{sweep_id}.json"


def _write_sweep(root: Path, rec: dict) -> None:
    path = _sweep_path(root, rec["id"])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        jobs.atomic_json(path, rec)
    except OSError as e:
        raise JobError(f"cannot write the sweep file {path}: {e.strerror or e}") from e


def load_sweep(sweep_id: str, runs_dir=None) -> dict:
    """The stored sweep record (spec, backend, cells with their job ids)."""
    root = _root(runs_dir)
    path = _sweep_path(root, sweep_id)
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise JobError(f"unknown sweep '{sweep_id}' (no {path})") from e
    except (OSError, json.JSONDecodeError) as e:
        raise JobError(f"cannot read the sweep file {path}: {e}") from e
    if not isinstance(rec, dict) or not isinstance(rec.get("cells"), list):
        raise JobError(f"the sweep file {path} is damaged (no list of cells)")
    return rec


def list_sweeps(runs_dir=None) -> list[dict]:
    """Every stored sweep, newest first (damaged files are left out)."""
    folder = _root(runs_dir) / SWEEPS_DIR
    out = []
    for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("cells"), list) and rec.get("id") == p.stem:
            out.append(rec)
    return sorted(out, key=lambda r: -float(r.get("created") or 0))


def _job_name(spec: SweepSpec, cell: dict) -> str:
    return f"{spec.name} · " + " · ".join(f"{k} {v}" if k == "seed" else str(v) for k, v in cell.items())


def _stop_marker(root: Path, sweep_id: str) -> Path:
    p = _sweep_path(root, sweep_id)
    return p.with_name(p.stem + ".stop")


class _SubmissionStopped(Exception):
    """stop_sweep asked, while the sweep was being submitted, that no further run be submitted."""


class _Recorder(list):
    """The job ids a backend appends while it submits: each one is written into the sweep file at once (so that
    ``sweep stop`` finds it), then the stop marker is checked (so that stop prevents further submission)."""

    def __init__(self, root: Path, rec: dict):
        super().__init__()
        self.root, self.rec = root, rec

    def append(self, job_id) -> None:
        super().append(job_id)
        self.rec["cells"][len(self) - 1]["job_id"] = job_id
        _write_sweep(self.root, self.rec)
        if _stop_marker(self.root, self.rec["id"]).exists():
            raise _SubmissionStopped()


def submit_sweep(spec: SweepSpec | dict | str, runs_dir=None, *, backend: str | dict | None = None,
                 allow_setup: bool = True) -> dict:
    """Expand ``spec`` and submit every run to its backend; returns the stored sweep record.

    Each job id is written into the sweep file as soon as the job exists; :func:`stop_sweep` during the submission
    stops the jobs submitted so far and no further one is submitted. A backend that fails (sbatch missing, an
    unwritable folder, ...) leaves its rows failed with the reason, and raises JobError.
    ``allow_setup=False`` refuses a Slurm ``setup`` (arbitrary shell lines), as :func:`parse_spec` does."""
    if not isinstance(spec, SweepSpec):
        spec = parse_spec(spec, allow_setup=allow_setup)
    if backend is not None:
        b = {"name": backend} if isinstance(backend, str) else dict(backend)
        if b.get("name") == spec.backend.get("name"):
            b = {**spec.backend, **b}
        spec.backend = jobs.check_backend(b)
    if not allow_setup:
        _refuse_setup(spec.backend)
    root = _root(runs_dir)
    runs = expand(spec)
    sweep_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{_SAFE.sub('-', spec.name).strip('-')[:40] or 'sweep'}-" \
               f"{secrets.token_hex(3)}"
    rec = {"format": 1, "id": sweep_id, "name": spec.name, "created": time.time(), "spec": spec.to_dict(),
           "backend": spec.backend, "axes": spec.axes,
           "cells": [{"cell": r["cell"], "job_id": None} for r in runs]}
    _write_sweep(root, rec)  # before any job exists: a job never points at a sweep that is not on disk
    be = jobs.get_backend(spec.backend)
    jobs_in = [{"config": r["config"], "name": _job_name(spec, r["cell"]),
                "sweep": {"id": sweep_id, "cell": r["cell"], "evaluate": spec.evaluate, "nproc": spec.nproc}}
               for r in runs]
    ids = _Recorder(root, rec)
    try:
        be.submit(jobs_in, root, sweep_id, ids)
    except _SubmissionStopped:
        rec["stopped"] = f"stopped during its submission after {len(ids)} of {len(runs)} runs"
        _stop_jobs(root, list(ids))
    except EnergyLensError as e:
        _fail_rows(root, list(ids), str(e))
        raise
    except Exception as e:  # noqa: BLE001 - a backend's OSError / RuntimeError: the rows say why, no traceback
        msg = f"submitting the sweep failed: {type(e).__name__}: {str(e).strip()[:500]}"
        _fail_rows(root, list(ids), msg)
        raise JobError(msg) from e
    finally:  # record what was submitted, even when the backend failed half-way
        for c, jid in zip(rec["cells"], ids):
            c["job_id"] = jid
        with contextlib.suppress(JobError):
            _write_sweep(root, rec)
    return rec


def _fail_rows(root: Path, ids: list[str], reason: str) -> None:
    """Rows a failed submission left queued become failed with ``reason`` (rows already run or failed stay)."""
    for jid in ids:
        with contextlib.suppress(EnergyLensError, OSError):
            jobs.store.mark(root, jid, "failed", "could not be submitted", error=reason, only_if=("queued",))


def _stop_jobs(root: Path, ids: list[str]) -> int:
    n = 0
    for jid in ids:
        try:
            if jobs.peek_job(jid, root).active:
                jobs.stop_job(jid, root, grace=5.0)
                n += 1
        except EnergyLensError:
            continue
    return n


# ============================================================================================
# Inside a job: train, then evaluate
# ============================================================================================
def _job_spec(run_dir: Path) -> dict:
    try:
        return jobs.read_job_file(Path(run_dir))
    except JobError:
        return {}


def run_cell(config: dict, run_dir, report: Callable[[float, str], None]) -> dict:
    """Job runner of a sweep run: train into ``run_dir`` (``nproc`` > 1: torchrun), then evaluate its best (or
    last) checkpoint with core.evaluation (result.json). Resumable: training continues from state.pt, the
    evaluation skips its finished chunks."""
    run_dir = Path(run_dir)
    if jobs.is_external_slot(config.get("device")):  # core.jobs hands 'auto' runs their slot: on a cluster node, 'auto'
        config = {**config, "device": "auto"}          # (the allocation's GPU, else the CPU)
    info = _job_spec(run_dir).get("sweep") or {}
    ev = info.get("evaluate")
    nproc = int(info.get("nproc") or 1)
    share = 0.8 if ev else 1.0

    def train_report(f: float, msg: str = "") -> None:
        report(share * float(f or 0.0), msg)

    if nproc > 1:
        record = _train_torchrun(config, run_dir, nproc, train_report)
    else:
        record = train_job(config, run_dir, train_report)
    out = {"train": {k: record.get(k) for k in ("epoch", "nat_acc", "pgd_acc", "dE_mean") if k in (record or {})}}
    if not ev:
        return out
    run = RunDir(run_dir)
    ckpt = run.last if ev.get("checkpoint") == "last" else run.best
    if not ckpt.is_file():
        ckpt = run.last
    if not ckpt.is_file():
        raise JobError(f"training left no checkpoint in {run_dir} to evaluate")

    ecfg = {k: v for k, v in ev.items() if k != "checkpoint"}
    ecfg["model"] = {"source": "local", "name": config.get("name") or run_dir.name, "path": str(ckpt)}
    ecfg.setdefault("device", config.get("device") or "auto")

    def eval_report(f: float, msg: str = "") -> None:
        report(share + (1 - share) * float(f or 0.0), f"evaluating: {msg}")

    res = eval_job(ecfg, run_dir, eval_report)
    out["eval"] = {k: res.get(k) for k in ("natural_acc", "pgd_acc", "aa_acc", "n")}
    return out


def _train_torchrun(config: dict, run_dir: Path, nproc: int, report) -> dict:
    """``torchrun --standalone --nproc_per_node N -m core.train`` into ``run_dir``; progress from progress.json."""
    cfg = {k: v for k, v in config.items() if k != "out_dir"}
    cfg["out_dir"] = str(run_dir)
    cfg_path = run_dir / "torchrun-config.json"
    jobs.atomic_json(cfg_path, cfg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "core.train", "--config", str(cfg_path)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    print(f"[energylens] DDP: {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=env, start_new_session=True)
    try:
        while proc.poll() is None:
            time.sleep(1.0)
            p = RunDir(run_dir).read_progress()
            if p is not None:
                report(float(p.get("fraction") or 0.0), f"epoch {p.get('epoch')}/{p.get('epochs')} ({nproc} processes)")
            if jobs.stop_requested():
                break
    finally:
        if proc.poll() is None:
            with _suppress():
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with _suppress():
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if proc.returncode != 0:
        raise JobError(f"torchrun with {nproc} processes exited with status {proc.returncode} (see the log)")
    recs = RunDir(run_dir).read_metrics()
    return recs[-1] if recs else {}


def _suppress():
    return contextlib.suppress(OSError)


# ============================================================================================
# Progress grid and Table 1
# ============================================================================================
def _read_result(run_dir: Path) -> dict | None:
    r = RunDir(run_dir).read_result()
    return r if r is not None and r.get("natural_acc") is not None else None


def status(sweep_id: str, runs_dir=None) -> dict:
    """The sweep's progress: ``{"sweep": record, "cells": [...], "counts": {status: n}, "grid": {...}}``.

    Each cell: its axis values, job id, status, progress, message and (once evaluated) the accuracies.
    ``grid`` lays the cells out for display: one row per combination of the axes other than ``seed``, one
    column per seed (or a single column when the grid has no seed axis)."""
    root = _root(runs_dir)
    rec = load_sweep(sweep_id, root)
    try:
        jobs.refresh(root)
    except EnergyLensError:
        pass
    cells, counts = [], {}
    for c in rec["cells"]:
        jid = c.get("job_id")
        row = {**c["cell"], "job_id": jid, "status": "not submitted", "progress": 0.0, "message": "", "natural": None,
               "pgd": None, "aa": None}
        if jid:
            try:
                info = jobs.peek_job(jid, root)
                row.update(status=info.status, progress=float(info.progress or 0.0), message=info.message or "")
                if info.status == "failed" and info.error:
                    row["message"] = info.error.splitlines()[0]
            except EnergyLensError:
                row.update(status="missing", message="the job is no longer in the registry (deleted?)")
            res = _read_result(root / jid) if row["status"] == "done" else None
            if res is not None:
                row.update(natural=res.get("natural_acc"), pgd=res.get("pgd_acc"), aa=res.get("aa_acc"))
        counts[row["status"]] = counts.get(row["status"], 0) + 1
        cells.append(row)
    axes = rec.get("axes") or (list(rec["cells"][0]["cell"]) if rec["cells"] else [])
    row_axes = [a for a in axes if a != "seed"]
    seeds = sorted({c.get("seed") for c in cells if "seed" in c}, key=lambda s: (str(type(s)), s)) \
        if "seed" in axes else [None]
    grid_rows = []
    index: dict[tuple, dict] = {}
    for c in cells:
        key = tuple(json.dumps(c.get(a), default=str) for a in row_axes)
        if key not in index:
            index[key] = {"axes": {a: c.get(a) for a in row_axes}, "cells": {}}
            grid_rows.append(index[key])
        index[key]["cells"][c.get("seed") if "seed" in axes else None] = c
    return {"sweep": rec, "cells": cells, "counts": counts,
            "grid": {"row_axes": row_axes, "seeds": seeds, "rows": grid_rows}}


def table(sweep_id: str, runs_dir=None):
    """The Table-1 view of a sweep: :func:`core.evaluation.results_table` over the evaluation records of its
    finished runs (grouped by configuration except the seed: mean ± std over seeds). ``.to_csv()`` and
    ``.to_markdown()`` export it."""
    root = _root(runs_dir)
    rec = load_sweep(sweep_id, root)
    records = []
    for c in rec["cells"]:
        jid = c.get("job_id")
        if not jid:
            continue
        r = _read_result(root / jid)
        if r is not None:
            records.append(r)
    return results_table(records)


def stop_sweep(sweep_id: str, runs_dir=None) -> int:
    """Stop every queued or running job of the sweep; returns how many were stopped. A sweep still being submitted
    submits no further run (a stop marker, checked after each job is created, written before the jobs are read)."""
    root = _root(runs_dir)
    load_sweep(sweep_id, root)  # an unknown id is refused before any marker is written
    marker = _stop_marker(root, sweep_id)
    try:
        atomic_write_text(marker, f"{time.time()}\n")
    except OSError as e:
        raise JobError(f"cannot write the stop marker {marker}: {e}") from e
    rec = load_sweep(sweep_id, root)
    return _stop_jobs(root, [c.get("job_id") for c in rec["cells"] if c.get("job_id")])

