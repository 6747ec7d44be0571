"""Run every benchmark, print one table of ratios (project / reference, min and median over interleaved repeats)
and rewrite BENCHMARKS.md from bench/results/*.json.

    python bench/run_all.py            # all benchmarks
    python bench/run_all.py --only attack epoch
    python bench/run_all.py --report   # no benchmark: the table and BENCHMARKS.md from the results there are

Every benchmark runs the project's path and its reference side by side in one process; rows with ``ratio_min`` /
``ratio_median`` (time(ours) / time(reference): < 1 means ours is faster) go into the one table, each with the
reference named and its median time beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import _util

BENCHES = ["epoch", "attack", "train", "fastpaths", "sgld", "landscape", "app", "sgld_page", "attack_lab", "umap",
           "training_live"]


GPU_NOTE = ("No GPU was lent to the sessions that made these figures: the GPU rows (bf16 autocast + channels-last "
            "training step vs fp32, model FLOP utilisation of ResNet-18 at batch 512; `bench/bench_train.py` (c)) are "
            "not measured. Their code paths run on the CPU in the tests (channels-last training, the amp flag, the "
            "folded view's channels-last weights).")


def _results() -> dict[str, dict]:
    out = {}
    for name in BENCHES:
        f = _util.RESULTS / f"{name}.json"
        if f.exists():
            out[name] = json.loads(f.read_text())
    return out


def ratio_rows(results: dict[str, dict]) -> list[dict]:
    """Every result row with a ratio, as one table: benchmark, what, model, reference (+ its median time),
    ratio min / median, repeats, target."""
    rows = []
    for name, d in results.items():
        for r in d.get("rows", []):
            if r.get("ratio_median") is None and "skipped" not in str(r.get("note", "")):
                continue
            ref = r.get("reference") or ""
            if r.get("reference_median_s") is not None:
                ref += f" ({r['reference_median_s']:.3g} s median)"
            rows.append({"benchmark": name, "what": r.get("what"), "model": r.get("model"), "images": r.get("images"),
                         "reference": ref, "ratio_min": r.get("ratio_min"), "ratio_median": r.get("ratio_median"),
                         "repeats": r.get("repeats"), "target": r.get("target"), "note": r.get("note") or None})
    return rows


def _md_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    cols = [c for c in dict.fromkeys(k for r in rows for k in r) if any(r.get(c) is not None for r in rows)]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_util._fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return out


def to_markdown(previous: str | None = None) -> str:
    results = _results()
    out = ["# Benchmarks", "", "Written by `python bench/run_all.py` (each benchmark runs the project's path and its "
           "reference side by side in one process). Raw JSON: `bench/results/`.", "",
           "## Ratios (project / reference)", "",
           "time(ours) / time(reference): < 1 means ours is faster; min and median over interleaved repeats or "
           "back-to-back pairs on the machine named in each benchmark's section (a loaded 2-core CPU: the medians "
           "are the figures to read).", ""]
    out += _md_table(ratio_rows(results))
    out += ["", f"**GPU**: {GPU_NOTE}", ""]
    missing = [n for n in BENCHES if n not in results]
    if missing:
        out += [f"Not rerun for these figures: {', '.join(missing)}; their last sections are kept at the end of this "
                f"file, marked as such (and their history is in git).", ""]
    for name in BENCHES:
        if name not in results:
            continue
        d = results[name]
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
    kept = previous_sections(previous if previous is not None else _read_benchmarks_md())
    for head, body in kept.items():
        name = head.split()[0] if head else ""
        if name in results or head.startswith("Ratios"):
            continue
        out += [f"## {head}", "", "*(Not rerun with the figures above: kept from the previous BENCHMARKS.md.)*",
                body.strip("\n"), ""]
    return "\n".join(out)


def _read_benchmarks_md() -> str:
    f = _util.REPO / "BENCHMARKS.md"
    return f.read_text() if f.exists() else ""


def previous_sections(text: str) -> dict[str, str]:
    """The ``## `` sections of an earlier BENCHMARKS.md, heading -> body (a kept section's marker line removed), so
    that a run of some benchmarks does not drop the others' last figures."""
    sections: dict[str, str] = {}
    head, body = None, []
    for line in text.splitlines():
        if line.startswith("## "):
            if head is not None:
                sections[head] = "\n".join(body)
            head, body = line[3:].strip(), []
        elif head is not None and not line.startswith("*(Not rerun with the figures above"):
            body.append(line)
    if head is not None:
        sections[head] = "\n".join(body)
    return sections


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=BENCHES)
    ap.add_argument("--report", action="store_true", help="run nothing: print the table, rewrite BENCHMARKS.md")
    args = ap.parse_args()
    failed = []
    for name in ([] if args.report else args.only):
        script = _util.REPO / "bench" / f"bench_{name}.py"
        if not script.exists():
            print(f"(no {script.name})")
            continue
        print(f"\n=== {script.name}")
        r = subprocess.run([sys.executable, str(script)], cwd=script.parent)
        if r.returncode:
            failed.append(name)
    _util.print_table("Ratios (time(ours) / time(reference); < 1 means ours is faster)", ratio_rows(_results()))
    print(f"\nGPU: {GPU_NOTE}")
    (_util.REPO / "BENCHMARKS.md").write_text(to_markdown())
    print("\nBENCHMARKS.md updated" + (f"; failed: {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
