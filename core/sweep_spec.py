"""The sweep file: its format, its limits and its expansion into runs (one TrainConfig per grid cell).

:func:`parse_spec` / :func:`load_spec` read a sweep file (YAML or JSON; see core.sweep for the format) into a
:class:`SweepSpec`, refusing anything a hostile or mistyped file could do: YAML aliases that expand beyond
``MAX_NODES`` values, more than ``MAX_CELLS`` runs, strings over ``MAX_STRING`` characters, unknown keys, values of
the wrong type, a backend ``setup`` (arbitrary shell) that the caller did not allow. :func:`expand` gives one
config per cell. Nothing here submits or runs anything (core.sweep does).
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import jobs
from .cli import FRACTION, parse_fraction
from .data import dataset_spec
from .errors import EnergyLensError, InputError
from .evaluation import EVAL_DEFAULTS, resolve_config
from .train import TrainConfig

__all__ = ["SweepSpec", "load_spec", "parse_spec", "expand", "EVAL_SWEEP_DEFAULTS", "MAX_CELLS"]

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
