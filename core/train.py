"""Adversarial training with energy probing: ``python -m core.train --method sat ...`` (or ``python -m core train``).

Per epoch it writes one JSON line to ``<out>/metrics.jsonl`` with natural and PGD accuracy on
held-out data, Delta E(x) = E(x) - E(x*) and Delta E(x, y) on a fixed probe set of *training*
samples (mean and quantiles; the full vectors go to ``<out>/probe/epoch_XXXX.npz`` for the arrow
plots of Fig. 1 b-d), WEAT weight statistics, loss terms, learning rate and time. Checkpoints:
``last.safetensors`` / ``best.safetensors`` (model + metadata, best = highest PGD accuracy) and
``state.pt`` (optimizer, scheduler, epoch) for ``--resume``. All writes are atomic.

Randomness is derived from (seed, epoch), so a run resumed from an epoch boundary reproduces an
uninterrupted run exactly on the same device.

Multi-process: ``torchrun --nproc_per_node N -m core.train ...`` splits every batch's samples over
the processes and averages gradients with an all-reduce (gloo on CPU, nccl on GPU); rank 0 evaluates
and writes.

The work is done in :mod:`core.training` (config, data, step, measure, loop); this module is the command line
and the job runner, and keeps the public names importable from ``core.train``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable

from .cli import ArgumentParser, error_exit, parse_fraction
from .errors import EnergyLensError, InputError
from .train_progress import format_eta
from .training.config import (MAX_EVAL_SAMPLES, MAX_PROBE_SIZE, PROBE_MAX, PROBE_PER_CLASS_MIN, PROBE_SHARE, SCHEDULES,
                              WIDTH_ARCHS, TrainConfig, field_choices)
from .training.data import load_splits, make_scheduler
from .training.loop import train
from .training.measure import auto_probe_size, evaluate, probe_energies
from .training.step import CompiledForward, TrainingStopped, oom_safe_step, train_step

__all__ = ["TrainConfig", "train", "train_step", "oom_safe_step", "main", "TrainingStopped", "SCHEDULES",
           "WIDTH_ARCHS", "MAX_EVAL_SAMPLES", "MAX_PROBE_SIZE", "PROBE_SHARE", "PROBE_MAX", "PROBE_PER_CLASS_MIN",
           "load_splits", "make_scheduler", "evaluate", "auto_probe_size", "probe_energies", "CompiledForward",
           "build_parser", "config_from_args", "check_job_config", "run_job"]


def build_parser(prog: str = "python -m core.train") -> argparse.ArgumentParser:
    """The training command line, built from TrainConfig's field metadata: every option has its help text, its
    default and (method, dataset, arch, schedule, inner, outer, weighting, ...) its choices from the registries;
    budgets and steps take fractions like ``8/255``."""
    p = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="JSON file with TrainConfig fields (command-line flags override it)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"].replace("%", "%%")
        choices = field_choices(f)
        if choices:
            help_text += f" (one of: {', '.join(choices)})"
        default = getattr(TrainConfig, f.name, None)  # None: the help text says what an unset option means
        if default is not None:
            help_text += f" [default: {default}]"
        if str(f.type).startswith("bool"):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        if f.metadata.get("fraction"):
            def typ(v, _what=f.name.replace("_", " ")):
                return parse_fraction(v, _what)
            typ.__name__ = "number or fraction"
        elif "float" in str(f.type):
            typ = float
        elif "int" in str(f.type):
            typ = int
        else:
            typ = str
        strict = choices and f.name != "dataset" and f.name != "arch"  # npz:<path>; architectures registered later
        p.add_argument(flag, dest=f.name, type=typ, default=None, help=help_text,
                       metavar=None if strict else f.name.upper(), choices=choices if strict else None)
    return p


def config_from_args(argv: list[str] | None = None, prog: str = "python -m core.train") -> TrainConfig:
    args = build_parser(prog).parse_args(argv)
    base: dict = {}
    if args.config:
        try:
            base = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"cannot read config file {args.config}: {e}") from e
    if not isinstance(base, dict):
        raise InputError(f"config file {args.config} must hold a JSON object of training options")
    over = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    return TrainConfig.from_dict({**base, **over})


def main(argv: list[str] | None = None, prog: str = "python -m core.train") -> int:
    """``python -m core train`` / ``python -m core.train``: a bad setting ends with one line ``error: <message>`` on
    stderr, exit status 2."""
    try:
        cfg = config_from_args(argv, prog)
        rec = train(cfg)
    except EnergyLensError as e:
        return error_exit(e)
    if rec:
        print(json.dumps({k: rec.get(k) for k in ("epoch", "nat_acc", "pgd_acc", "dE_mean", "dEy_mean")}))
    return 0


def check_job_config(config: dict) -> None:
    """core.jobs' check of a training job's config before it is queued (InputError naming the field)."""
    TrainConfig.from_dict({k: v for k, v in config.items() if k != "out_dir"}).validate()


def run_job(config: dict, run_dir, report: Callable[[float, str], None]) -> dict:
    """Entry point for background jobs (core.jobs): train into ``run_dir``.

    ``config`` holds TrainConfig fields; ``out_dir`` is forced to the job folder and ``resume``
    is honoured so a stopped or crashed job continues from its last completed epoch.
    """
    cfg = TrainConfig.from_dict({**{k: v for k, v in config.items() if k != "out_dir"}, "out_dir": str(run_dir)})

    def prog(p: dict) -> None:
        msg = p.get("message") or f"epoch {p.get('epoch')}/{cfg.epochs}"
        if "metrics" in p:
            m = p["metrics"]
            acc = (f"nat {m['nat_acc']:.1%}, PGD {m['pgd_acc']:.1%}, " if "pgd_acc" in m
                   else "no test evaluation this epoch, ")   # measure_every > 1: between two evaluations
            msg = f"epoch {p.get('epoch')}/{cfg.epochs} done — {acc}ΔE(x) {m['dE_mean']:+.3f}"
            if p.get("eta_s") is not None and p.get("epoch", 0) < cfg.epochs:
                msg += f" · ETA {format_eta(p['eta_s'])}"
        report(float(p.get("fraction", 0.0)), msg)

    return train(cfg, progress=prog)

if __name__ == "__main__":
    sys.exit(main())
