"""bench/run_all.py's report: one ratio table from the results there are, and the last figures of every benchmark
that was not rerun kept, marked as such (a partial run must not drop them)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run_all(monkeypatch, results: Path):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("run_all_under_test", REPO / "bench" / "run_all.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod._util, "RESULTS", results)
    return mod


OLD = """# Benchmarks

## Ratios (project / reference)

| old table |

## attack

old attack figures

## app

Issue 27: hand-written app figures

### a sub-section
| action | app s |

## Issue 17: responsiveness

older figures
"""


def test_a_partial_run_keeps_the_other_benchmarks_last_figures(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    (results / "attack.json").write_text(json.dumps({
        "benchmark": "attack", "environment": {"device": "CPU", "threads": 2, "torch": "x", "date": "d"},
        "rows": [{"what": "PGD-10 + trace vs torchattacks", "model": "resnet18", "reference": "torchattacks",
                  "reference_median_s": 2.0, "ratio_min": 0.7, "ratio_median": 0.8, "repeats": 5}]}))
    mod = _run_all(monkeypatch, results)
    md = mod.to_markdown(previous=OLD)
    rows = [ln for ln in md.splitlines() if ln.startswith("| attack |")]
    assert len(rows) == 1 and "0.8" in rows[0] and "torchattacks (2 s median)" in rows[0]
    assert "old attack figures" not in md and "| old table |" not in md      # rerun: replaced
    for kept in ("Issue 27: hand-written app figures", "### a sub-section", "older figures"):
        assert md.count(kept) == 1, kept                                      # not rerun: kept once
    assert md.count("Not rerun with the figures above") == 2
    # writing the report again from its own output keeps each section once (the marker is not repeated)
    again = mod.to_markdown(previous=md)
    assert again.count("Issue 27: hand-written app figures") == 1 and again.count("Not rerun with the figures") == 2
