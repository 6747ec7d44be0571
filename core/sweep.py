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
and Markdown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import itertools
import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from . import jobs
from .cli import FRACTION, parse_fraction
from .data import dataset_spec
from .errors import EnergyLensError, InputError, JobError
from .evaluation import EVAL_DEFAULTS, resolve_config, results_table
from .evaluation import run_job as eval_job
from .paths import REPO_ROOT
from .rundir import RunDir
from .train import TrainConfig
from .train import run_job as train_job

__all__ = ["SweepSpec", "load_spec", "parse_spec", "expand", "submit_sweep", "list_sweeps", "load_sweep", "status",
           "table", "stop_sweep", "run_cell", "EVAL_SWEEP_DEFAULTS", "MAX_CELLS"]

SWEEPS_DIR = "sweeps"
MAX_CELLS = 2000                      # a grid larger than this is almost certainly a typo
TOP_KEYS = {"name", "base", "grid", "evaluate", "backend", "nproc", "device"}
MANAGED = {"out_dir", "resume", "name"}   # set by the sweep / the job system, never by the file
# the evaluation of each finished run (core.evaluation keys, plus which checkpoint to evaluate)
EVAL_SWEEP_DEFAULTS: dict[str, Any] = {**{k: EVAL_DEFAULTS[k] for k in ("n", "pgd_steps", "autoattack", "aa_version")},
                                       "checkpoint": "best"}
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
# bounds on what a sweep file may hold, checked before anything is printed, compared or stored (issue 24)
MAX_TEXT = 256 * 1024           # characters of a sweep file
MAX_NODES = 20_000              # values in the file once YAML aliases are expanded (a real sweep has < 200)
MAX_CHARS = 200_000             # characters of all its strings, aliases expanded
MAX_STRING = 4_096              # characters of one string
MAX_AXIS = MAX_CELLS            # values on one grid axis (more always exceeds MAX_CELLS runs)


# ============================================================================================
# The spec
# ============================================================================================
@dataclass
class SweepSpec:
    """A validated sweep file."""

    name: str
    base: dict
    grid: dict[str, list]
    evaluate: dict | None
    backend: dict
    nproc: int = 1
    device: str = "auto"
    raw: dict = field(default_factory=dict)

    @property
    def axes(self) -> list[str]:
        return list(self.grid)

    def to_dict(self) -> dict:
        return {"name": self.name, "base": self.base, "grid": self.grid, "evaluate": self.evaluate,
                "backend": self.backend, "nproc": self.nproc, "device": self.device}


def _train_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _unknown(key: str, known, what: str, where: str = "") -> InputError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return InputError(f"unknown {what} '{key}'{where}{hint}. Known: {', '.join(sorted(known))}")


def load_spec(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a sweep file (``.yaml`` / ``.yml`` / ``.json``); InputError says what is wrong."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"cannot read the sweep file {p}: {e.strerror or e}") from e
    return parse_spec(text, fmt="json" if p.suffix.lower() == ".json" else "yaml", source=str(p))


class _TooBig(Exception):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that stops composing as soon as the file has too many values or one list is too long, and
    counts aliases as the values they stand for (a "billion laughs" file is refused while it is read)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._nodes = 0
        self._sizes: dict[int, int] = {}   # id(node) -> its expanded size

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            anchor = self.peek_event().anchor
            node = self.anchors.get(anchor)
            self._nodes += self._sizes.get(id(node), 1) if node is not None else 1
        else:
            self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _TooBig(f"it holds more than {MAX_NODES:,} values (YAML aliases counted as what they expand to)")
        before = self._nodes
        node = super().compose_node(parent, index)
        if node is not None and getattr(node, "value", None) is not None and not isinstance(node, yaml.ScalarNode):
            self._sizes.setdefault(id(node), max(1, self._nodes - before + 1))
        return node

    def compose_sequence_node(self, anchor):
        start_event = self.get_event()
        tag = start_event.tag
        if tag is None or tag == "!":
            tag = self.resolve(yaml.SequenceNode, None, start_event.implicit)
        node = yaml.SequenceNode(tag, [], start_event.start_mark, None, flow_style=start_event.flow_style)
        if anchor is not None:
            self.anchors[anchor] = node
        index = 0
        while not self.check_event(yaml.SequenceEndEvent):
            if index >= MAX_AXIS:
                raise _TooBig(f"a list has more than {MAX_AXIS:,} values")
            node.value.append(self.compose_node(node, index))
            index += 1
        end_event = self.get_event()
        node.end_mark = end_event.end_mark
        return node


def _check_size(obj: Any) -> None:
    """Refuse (InputError) a loaded sweep whose expanded size exceeds the bounds; walks at most MAX_NODES values
    (shared or cyclic references are counted each time they are met, so this stops on any bomb)."""
    nodes, chars, stack = 0, 0, [(obj, 0)]
    while stack:
        x, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise InputError(f"the sweep holds more than {MAX_NODES:,} values once YAML aliases are expanded: a "
                             "sweep file is a few lines")
        if depth > 20:
            raise InputError("the sweep is nested more than 20 levels deep")
        if isinstance(x, dict):
            if len(x) > MAX_AXIS:
                raise InputError(f"a mapping of the sweep has more than {MAX_AXIS:,} keys")
            stack.extend((v, depth + 1) for kv in x.items() for v in kv)
        elif isinstance(x, (list, tuple)):
            if len(x) > MAX_AXIS:
                raise InputError(f"a list of the sweep has more than {MAX_AXIS:,} values (at most {MAX_CELLS:,} runs)")
            stack.extend((v, depth + 1) for v in x)
        elif isinstance(x, str):
            if len(x) > MAX_STRING:
                raise InputError(f"a text of the sweep is {len(x):,} characters long (at most {MAX_STRING:,})")
            chars += len(x)
            if chars > MAX_CHARS:
                raise InputError(f"the sweep's texts exceed {MAX_CHARS:,} characters once YAML aliases are expanded")
        elif isinstance(x, int) and not isinstance(x, bool) and x.bit_length() > 64:
            raise InputError("the sweep holds an integer with more than 64 bits")


def _load_text(text: str, fmt: str, source: str) -> Any:
    if not isinstance(text, str):
        raise InputError(f"{source} must be YAML or JSON text, got {type(text).__name__}")
    if len(text) > MAX_TEXT:
        raise InputError(f"{source} is {len(text):,} characters long (at most {MAX_TEXT:,}): a sweep file is a few "
                         "lines")
    try:
        if fmt == "json":
            return json.loads(text)
        loader = _BoundedLoader(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except _TooBig as e:
        raise InputError(f"{source} is refused: {e}") from None
    except RecursionError:
        raise InputError(f"{source} is nested too deeply") from None
    except Exception as e:  # noqa: BLE001 - yaml.YAMLError, json.JSONDecodeError
        raise InputError(f"{source} is not valid {fmt.upper()}: {str(e).strip().splitlines()[0][:300]}") from e


def parse_spec(text_or_dict: str | dict, fmt: str = "yaml", source: str = "the sweep", *,
               allow_setup: bool = True) -> SweepSpec:
    """Validate a sweep given as YAML / JSON text or as a dict.

    ``allow_setup=False`` (the dashboard, unless the user ticked that they mean it) refuses a Slurm backend's
    ``setup`` lines, which are arbitrary shell run on the cluster nodes."""
    raw = text_or_dict if isinstance(text_or_dict, dict) else _load_text(text_or_dict, fmt, source)
    _check_size(raw)
    if not isinstance(raw, dict):
        raise InputError(f"{source} must hold a mapping with 'base' and 'grid' (got {type(raw).__name__})")
    for k in raw:
        if k not in TOP_KEYS:
            raise _unknown(str(k), TOP_KEYS, "sweep key")
    fields = _train_fields()
    base = raw.get("base") or {}
    grid = raw.get("grid") or {}
    if not isinstance(base, dict):
        raise InputError("'base' must be a mapping of training options (TrainConfig fields)")
    if not isinstance(grid, dict) or not grid:
        raise InputError("'grid' must be a non-empty mapping {option: [values, ...]}, e.g. {method: [sat, trades], "
                         "seed: [0, 1, 2]}")
    for where, keys in ((" in 'base'", base), (" in 'grid'", grid)):
        for k in keys:
            if k in MANAGED:
                raise InputError(f"'{k}' cannot be set in a sweep: the sweep gives every run its own job folder and "
                                 "name")
            if k not in fields:
                raise _unknown(str(k), set(fields) - MANAGED, "training option", where)
    n = math.prod(len(v) if isinstance(v, list) else 1 for v in grid.values())  # before anything is built
    if n > MAX_CELLS:
        raise InputError(f"the grid expands to {n:,} runs (more than {MAX_CELLS:,}): check its lists")
    clean_grid: dict[str, list] = {}
    for k, v in grid.items():
        vals = v if isinstance(v, list) else [v]
        if not vals:
            raise InputError(f"grid '{k}' has no values: give a list with at least one")
        if len({json.dumps(x, sort_keys=True, default=str) for x in vals}) != len(vals):
            raise InputError(f"grid '{k}' lists a value twice: {_short(vals)}")
        if k in base:
            raise InputError(f"'{k}' is both in 'base' and in 'grid': keep it in one")
        clean_grid[str(k)] = list(vals)
    n = math.prod(len(v) for v in clean_grid.values())
    if n > MAX_CELLS:
        raise InputError(f"the grid expands to {n:,} runs (more than {MAX_CELLS:,}): check its lists")
    evaluate = raw.get("evaluate", {})
    if evaluate is True or evaluate is None:
        evaluate = {}
    if evaluate is not False:
        if not isinstance(evaluate, dict):
            raise InputError("'evaluate' must be a mapping (core.evaluation options, e.g. {n: 1000, autoattack: "
                             "true}) or false")
        evaluate = _check_eval(evaluate)
    else:
        evaluate = None
    backend = raw.get("backend") or {"name": "local"}
    if isinstance(backend, str):
        backend = {"name": backend}
    if not isinstance(backend, dict):
        names = ", ".join(f"'{n}'" for n in jobs.backend_names())
        raise InputError(f"'backend' must be {names} or a mapping {{name: slurm, partition: ..., ...}}")
    backend = jobs.check_backend(backend)
    if not allow_setup:
        _refuse_setup(backend)
    nproc = raw.get("nproc", 1)
    if isinstance(nproc, bool) or not isinstance(nproc, int) or not 1 <= nproc <= 64:
        raise InputError(f"nproc (processes per run, DDP through torchrun) must be an integer in [1, 64], got {nproc!r}")
    device = str(raw.get("device") or base.get("device") or "auto")
    name = str(raw.get("name") or "sweep").strip() or "sweep"
    spec = SweepSpec(name=name[:80], base=dict(base), grid=clean_grid, evaluate=evaluate, backend=backend,
                     nproc=nproc, device=device, raw=raw)
    expand(spec)  # every run's config is validated now, not when its job starts
    return spec


def _short(value: Any, n: int = 200) -> str:
    """A bounded repr for messages."""
    text = repr(value)
    return text if len(text) <= n else text[:n] + "…"


def _refuse_setup(backend: dict) -> None:
    if backend.get("setup"):
        raise InputError("backend 'setup' lines are run as shell commands on the cluster nodes: tick 'I mean to run "
                         "these shell lines' to submit them from the dashboard (or submit with the command line)")


# the kind of each evaluation option (None: also allowed to be null)
_EVAL_TYPES: dict[str, tuple[type, ...]] = {
    "n": (int,), "split": (str,), "norm": (str,), "eps": (int, float, type(None)), "pgd_steps": (int,),
    "pgd_step_size": (int, float, type(None)), "autoattack": (bool,), "aa_version": (str,),
    "aa_attacks": (list, type(None)), "chunk_size": (int,), "batch_size": (int,), "seed": (int,), "device": (str,),
    "checkpoint": (str,)}
_KIND_TEXT = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
              type(None): "null"}


def _check_eval(ev: dict) -> dict:
    known = set(EVAL_DEFAULTS) | {"checkpoint"}
    for k in ev:
        if k not in known:
            raise _unknown(str(k), known, "evaluation option", " in 'evaluate'")
    out = {**EVAL_SWEEP_DEFAULTS, **{k: _over_255("eps" if k in ("eps", "pgd_step_size") else k, v)
                                     for k, v in ev.items()}}
    for k, v in out.items():
        kinds = _EVAL_TYPES.get(k)
        if kinds is None:
            continue
        ok = isinstance(v, kinds) and not (isinstance(v, bool) and bool not in kinds)
        if ok and k == "aa_attacks" and v is not None:
            ok = all(isinstance(a, str) for a in v)
        if not ok:
            want = " or ".join(_KIND_TEXT[t] for t in kinds) + (" of attack names" if k == "aa_attacks" else "")
            raise InputError(f"evaluate.{k} must be {want}, got {_short(v)}")
    if out["checkpoint"] not in ("best", "last"):
        raise InputError(f"evaluate.checkpoint must be 'best' or 'last', got {out['checkpoint']!r}")

    try:
        resolve_config({k: v for k, v in out.items() if k != "checkpoint"})  # raises InputError with the reason
    except (TypeError, ValueError) as e:
        raise InputError(f"evaluate: {str(e)[:300]}") from e
    return out


def _label(cell: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in cell.items())


def expand(spec: SweepSpec) -> list[dict]:
    """The runs of a sweep, in grid order: ``[{"cell": {axis: value}, "config": TrainConfig dict}, ...]``.

    Every config goes through TrainConfig's own checks (without loading the dataset); a bad value raises
    InputError naming the run (``method=foo, seed=0: unknown training method 'foo' ...``)."""
    axes = list(spec.grid)
    out = []
    seen_datasets: dict[str, str | None] = {}
    for values in itertools.product(*(spec.grid[a] for a in axes)):
        cell = dict(zip(axes, values))
        cfg = {k: _over_255(k, v) for k, v in {**spec.base, **cell}.items()}
        cfg.setdefault("device", spec.device)
        try:
            tc = TrainConfig.from_dict(cfg)
            for k, f in _train_fields().items():  # YAML gives strings / numbers: check each field's kind
                _check_type(k, f, getattr(tc, k))
            tc.validate()
            ds = str(tc.dataset)
            if ds not in seen_datasets:
                try:
                    if not ds.startswith("npz:"):
                        dataset_spec(ds)
                    seen_datasets[ds] = None
                except EnergyLensError as e:
                    seen_datasets[ds] = str(e)
            if seen_datasets[ds]:
                raise InputError(seen_datasets[ds])
        except EnergyLensError as e:
            raise InputError(f"run {_label(cell)}: {e}") from e
        except (TypeError, ValueError) as e:
            raise InputError(f"run {_label(cell)}: {e}") from e
        out.append({"cell": cell, "config": {k: v for k, v in cfg.items()}})
    return out


def _check_type(name: str, f: dataclasses.Field, value: Any) -> None:
    t = str(f.type)
    if value is None:
        if "None" not in t:
            raise InputError(f"{name} must not be empty (null)")
        return
    if t.startswith("bool"):
        ok = isinstance(value, bool)
    elif t.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif t.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif t.startswith("str"):
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        kind = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}.get(
            t.split(" ")[0].split("|")[0], t)
        raise InputError(f"{name} must be {kind}, got {value!r}")


def _over_255(key: str, value: Any) -> Any:
    """'8/255' (as YAML files write budgets) -> 8 / 255 for the budget fields (core.cli.parse_fraction); anything
    else unchanged."""
    if key in ("eps", "step_size") and isinstance(value, str) and FRACTION.match(value):
        return parse_fraction(value, key)
    return value


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

