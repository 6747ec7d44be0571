"""The sweep commands: ``python -m core sweep ...`` (also ``python -m core.jobs sweep`` and ``python -m core.sweep_cli``).

``sweep FILE.yaml`` is short for ``sweep submit FILE.yaml``; ``list``, ``status ID``, ``table ID``, ``stop ID``.
The sweeps themselves (expansion, submission, status, Table 1) are :mod:`core.sweep`'s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import jobs
from .errors import EnergyLensError
from .storage import atomic_write_text
from .sweep import list_sweeps, status, stop_sweep, submit_sweep, table
from .sweep_spec import _label, expand, load_spec

__all__ = ["cli", "ACTIONS"]

ACTIONS = ("submit", "list", "status", "table", "stop")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core.jobs sweep",
                                description="Sweeps: a base config plus a grid, run as ordinary jobs sharing a sweep id.",
                                epilog="python -m core.jobs sweep FILE.yaml is short for 'sweep submit FILE.yaml'.")
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("submit", help="expand a sweep file (YAML or JSON) and submit its runs")
    s.add_argument("file")
    s.add_argument("--backend", choices=jobs.backend_names(), default=None, help="override the file's backend")
    s.add_argument("--partition", default=None, help="slurm: partition")
    s.add_argument("--gpus-per-job", type=int, default=None, help="slurm: GPUs per run")
    s.add_argument("--time", default=None, help="slurm: time limit per run (minutes or HH:MM:SS)")
    s.add_argument("--dry-run", action="store_true", help="only list the runs")
    sub.add_parser("list", help="list the sweeps")
    st = sub.add_parser("status", help="progress grid of a sweep")
    st.add_argument("id")
    st.add_argument("--json", action="store_true")
    t = sub.add_parser("table", help="Table-1 view (mean ± std over seeds) of a sweep's finished runs")
    t.add_argument("id")
    t.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    t.add_argument("-o", "--output", default=None, help="write to this file instead of stdout")
    sp = sub.add_parser("stop", help="stop every queued or running job of a sweep")
    sp.add_argument("id")
    return p


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def cli(argv: list[str], runs_dir=None) -> int:
    argv = list(argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    if first is not None and first not in ACTIONS:   # 'sweep FILE ...' is 'sweep submit FILE ...'
        argv = ["submit"] + argv
    args = _parser().parse_args(argv)
    try:
        if args.action == "submit":
            spec = load_spec(args.file)
            over = {}
            if args.backend:
                over["name"] = args.backend
            for k, v in (("partition", args.partition), ("gpus_per_job", args.gpus_per_job), ("time", args.time)):
                if v is not None:
                    over[k] = v
            if over:
                same = over.get("name", spec.backend["name"]) == spec.backend["name"]
                spec.backend = jobs.check_backend({**(spec.backend if same else {}), **over})
            runs = expand(spec)
            if args.dry_run:
                for r in runs:
                    print(_label(r["cell"]))
                print(f"{len(runs)} runs, backend {spec.backend['name']}")
                return 0
            rec = submit_sweep(spec, runs_dir)
            print(f"{rec['id']}  {len(rec['cells'])} runs  backend {rec['backend']['name']}")
        elif args.action == "list":
            sweeps = list_sweeps(runs_dir)
            if not sweeps:
                print("no sweeps")
            for r in sweeps:
                print(f"{r['id']}  {len(r['cells'])} runs  backend {r.get('backend', {}).get('name', '?')}  "
                      f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(r.get('created') or 0))}")
        elif args.action == "status":
            s = status(args.id, runs_dir)
            if args.json:
                print(json.dumps({"cells": s["cells"], "counts": s["counts"]}, indent=2, default=str))
                return 0
            for c in s["cells"]:
                ax = " ".join(f"{k}={c[k]}" for k in s["sweep"].get("axes", []))
                print(f"{jobs.clean_text(c['job_id'] or '-')}  {c['status']:<8} {c['progress']:>4.0%}  {ax}  "
                      f"nat {_pct(c['natural'])} pgd {_pct(c['pgd'])} aa {_pct(c['aa'])}  "
                      f"{jobs.clean_text(c['message'], 60)}")
            print(", ".join(f"{v} {k}" for k, v in sorted(s["counts"].items())))
        elif args.action == "table":
            t = table(args.id, runs_dir)
            text = t.to_csv() if args.format == "csv" else t.to_markdown()
            if args.output:
                atomic_write_text(Path(args.output), text)
                print(f"wrote {len(t)} rows to {args.output}")
            else:
                print(text, end="")
        elif args.action == "stop":
            print(f"stopped {stop_sweep(args.id, runs_dir)} jobs")
    except EnergyLensError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
