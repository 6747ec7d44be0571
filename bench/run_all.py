"""Run every benchmark, print their tables and rewrite BENCHMARKS.md from bench/results/*.json.

    python bench/run_all.py            # all benchmarks
    python bench/run_all.py --only attack app
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import _util

BENCHES = ["attack", "train", "fastpaths", "sgld", "landscape", "app", "sgld_page", "attack_lab", "umap",
           "training_live"]


def to_markdown() -> str:
    out = ["# Benchmarks", "", "Latest figures written by `python bench/run_all.py` (each benchmark runs the project's path "
           "and its reference side by side in one process). Raw JSON: `bench/results/`.", ""]
    for name in BENCHES:
        f = _util.RESULTS / f"{name}.json"
        if not f.exists():
            continue
        d = json.loads(f.read_text())
        env = d.get("environment", {})
        out += [f"## {name}", "", f"{env.get('device')}, {env.get('threads')} threads, torch {env.get('torch')}, "
                f"{env.get('date')}", ""]
        rows = d.get("rows", [])
        if rows:
            cols = list(dict.fromkeys(k for r in rows for k in r))
            out.append("| " + " | ".join(cols) + " |")
            out.append("|" + "---|" * len(cols))
            for r in rows:
                out.append("| " + " | ".join(_util._fmt(r.get(c)) for c in cols) + " |")
        for k, v in d.items():
            if k not in ("benchmark", "environment", "rows"):
                out.append(f"\n{k}: {json.dumps(v)}")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=BENCHES)
    args = ap.parse_args()
    failed = []
    for name in args.only:
        script = _util.REPO / "bench" / f"bench_{name}.py"
        if not script.exists():
            print(f"(no {script.name})")
            continue
        print(f"\n=== {script.name}")
        r = subprocess.run([sys.executable, str(script)], cwd=script.parent)
        if r.returncode:
            failed.append(name)
    (_util.REPO / "BENCHMARKS.md").write_text(to_markdown())
    print("\nBENCHMARKS.md updated" + (f"; failed: {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
