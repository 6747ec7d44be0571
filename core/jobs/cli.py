"""The command line of the job system (``python -m core.jobs``, see core/jobs/__main__.py)::

    python -m core.jobs submit train --config cfg.json [--name N] [--device D]
    python -m core.jobs list | show ID | log ID | stop ID | resume ID | delete ID
    python -m core.jobs sweep FILE.yaml [--backend local|slurm] | sweep list | status ID | table ID  (core.sweep)
    python -m core.jobs run RUN_DIR      (internal: the job process)

The ``sweep`` commands are core.sweep's: :func:`main` hands them to the ``sweep_cli`` it is given (__main__.py
passes core.sweep_cli.cli), so that nothing in core.jobs imports core.sweep.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

from ..errors import EnergyLensError, JobError
from . import api, child, files
from .store import JobInfo

__all__ = ["build_parser", "main"]


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
        rows.append((files.clean_text(j.id), files.clean_text(j.status), f"{j.progress:.0%}",
                     files.clean_text(j.device), _fmt_time(j.created), files.clean_text(j.name, 30),
                     files.clean_text(msg or "", 60)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core.jobs", description="Manage EnergyLens background jobs.")
    p.add_argument("--runs-dir", default=None, help=f"runs folder (default: env {files.ENV_RUNS} or <repo>/runs)")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("submit", help="submit a job")
    s.add_argument("kind", help="job kind: " + ", ".join(api.KINDS))
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


def main(argv: list[str] | None = None, *, sweep_cli: Callable[..., int] | None = None) -> int:
    """Run one command; returns the exit status (2 with 'error: ...' on stderr for an EnergyLensError).
    ``sweep_cli(args, runs_dir=...)`` runs the ``sweep`` commands (core.sweep_cli.cli; see __main__.py)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)  # 'sweep' hands its own options (--help, --backend ...) to core.sweep
    if rest and args.cmd != "sweep":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    rd = args.runs_dir
    try:
        if args.cmd == "run":
            return child.run_in_this_process(args.run_dir)
        if args.cmd == "sweep":
            if sweep_cli is None:
                raise JobError("the sweep commands are core.sweep's: run them as python -m core.jobs sweep ...")
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
            info = api.submit(args.kind, config, name=args.name, device=args.device, runs_dir=rd,
                              start=not args.no_start)
            print(f"{info.id}  {info.status}  {info.run_dir}")
        elif args.cmd == "list":
            jobs = api.list_jobs(rd, kind=args.kind)
            notice = api.registry_notice(rd)
            if notice:
                print(f"warning: {notice}", file=sys.stderr)
            if args.json:
                print(json.dumps([j.to_dict() for j in jobs], indent=2, default=files.json_default))
            else:
                _print_table(jobs)
        elif args.cmd == "show":
            print(json.dumps(api.get_job(args.id, rd).to_dict(), indent=2, default=files.json_default))
        elif args.cmd == "log":
            print(api.read_log_tail(args.id, args.n, rd))
        elif args.cmd == "stop":
            info = api.stop_job(args.id, rd, grace=args.grace)
            print(f"{info.id}  {info.status}")
        elif args.cmd == "resume":
            info = api.resume_job(args.id, rd)
            print(f"{info.id}  {info.status}")
        elif args.cmd == "delete":
            api.delete_job(args.id, rd)
            print(f"deleted {args.id}")
    except EnergyLensError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
