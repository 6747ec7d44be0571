"""The Training studio's sweep section (dashboard/sweep_panel.py) under Streamlit's AppTest: it renders, checks
and submits a tiny sweep, shows its progress grid and, once the runs finish, its Table 1 with the downloads."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import pytest
from test_training_page import no_crash, open_page  # the Training studio opened from Home, and its crash check

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TINY = """name: page-sweep
base:
  dataset: digits
  arch: smallcnn
  epochs: 1
  batch_size: 64
  train_limit: 256
  eval_samples: 64
  probe_size: 40
  attack_steps: 2
  eval_steps: 2
  threads: 1
  device: cpu
grid:
  method: [sat, trades]
  seed: [0]
evaluate:
  n: 32
  pgd_steps: 2
  aa_version: custom
  aa_attacks: [apgd-ce]
  batch_size: 32
  chunk_size: 32
"""


@pytest.fixture
def runs(runs_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("ENERGYLENS_CIFAR10_SUBSET", str(tmp_path / "no-subset.npz"))
    return runs_dir




def test_sweep_section_renders_and_checks_the_form(runs):
    at = open_page()
    assert any(s.value == "Sweeps (Table 1 in one go)" for s in at.subheader)
    at.multiselect(key="sw_methods").set_value(["sat", "trades", "weat-adv"])
    at.text_input(key="sw_seeds").set_value("0-4")
    at.button(key="sw_check").click().run()
    no_crash(at)
    assert any("The sweep is valid: 15 runs on the local backend." in s.value for s in at.success)
    assert not (runs / "sweeps").exists()        # checking submits nothing
    at.text_input(key="sw_seeds").set_value("0, x").run()
    at.button(key="sw_check").click().run()
    no_crash(at)
    assert any("seeds must be integers or ranges" in e.value for e in at.error)


def test_bad_sweep_file_shows_the_reason(runs):
    at = open_page()
    at.radio(key="sw_mode").set_value("as a sweep file (YAML or JSON)").run()
    at.text_area(key="sw_text").set_value("grid:\n  methd: [sat]\n").run()
    at.button(key="sw_submit").click().run()
    no_crash(at)
    assert any("unknown training option 'methd' in 'grid' (did you mean 'method'?)" in e.value for e in at.error)
    assert not (runs / "sweeps").exists()


@pytest.mark.slow
def test_submit_a_tiny_sweep_and_read_its_table_1(runs):
    from core import sweep

    at = open_page()
    at.radio(key="sw_mode").set_value("as a sweep file (YAML or JSON)").run()
    at.text_area(key="sw_text").set_value(TINY).run()
    at.button(key="sw_submit").click().run()
    no_crash(at)
    assert any("Submitted sweep **page\\-sweep**" in s.value and "2 runs on the local backend" in s.value
               for s in at.success), [s.value for s in at.success]
    (rec,) = sweep.list_sweeps(runs)
    grid = at.dataframe[0].value
    assert list(grid["method"]) == ["sat", "trades"] and "seed 0" in grid.columns
    t0 = time.time()
    while any(c["status"] in ("queued", "running") for c in sweep.status(rec["id"], runs)["cells"]):
        assert time.time() - t0 < 1200, "the sweep did not finish"
        time.sleep(1.0)
    at = open_page()
    no_crash(at)
    assert at.selectbox(key="sw_view").value == rec["id"]
    grid = at.dataframe[0].value
    cells = list(grid["seed 0"])
    assert all(c.startswith("✔ nat ") and " · AA " in c for c in cells), cells
    status = sweep.status(rec["id"], runs)
    by_method = {c["method"]: c for c in status["cells"]}
    for m, cell in zip(grid["method"], cells):
        assert cell == f"✔ nat {100 * by_method[m]['natural']:.1f} · AA {100 * by_method[m]['aa']:.1f}"
    table = at.dataframe[1].value
    assert sorted(table["method"]) == ["SAT", "TRADES"] and list(table["runs"]) == [1, 1]
    downloads = at.get("download_button")
    assert {d.proto.label for d in downloads} >= {"Download CSV", "Download Markdown"}
    rows = list(csv.DictReader(io.StringIO(sweep.table(rec["id"], runs).to_csv())))
    for r in rows:
        shown = table[table["method"] == r["method"]].iloc[0]
        assert shown["natural"] == r["natural"] and shown["aa"] == r["aa"]
    job_ids = [c["job_id"] for c in status["cells"]]
    for jid in job_ids:  # ordinary training jobs: the Runs list shows them too
        assert json.loads((runs / jid / "job.json").read_text())["kind"] == "train"


# ============================================================================================ issue 24 (round 3)
def _check_file(at, text: str):
    at.radio(key="sw_mode").set_value("as a sweep file (YAML or JSON)").run()
    at.text_area(key="sw_text").set_value(text).run()
    at.button(key="sw_check").click().run()
    no_crash(at)
    return at


def test_setup_shell_lines_need_the_tick_and_the_box_says_they_are_shell(runs):
    text = "grid:\n  seed: [0]\nbackend:\n  name: slurm\n  setup: ['module load cuda']\n"
    at = _check_file(open_page(), text)
    assert any("run as shell commands on the cluster nodes" in e.value for e in at.error), [e.value for e in at.error]
    assert any("arbitrary shell" in c.value for c in at.caption)
    at.checkbox(key="sw_allow_setup").check().run()
    at.button(key="sw_check").click().run()
    no_crash(at)
    assert any("The sweep is valid: 1 runs on the slurm backend." in s.value for s in at.success)


@pytest.mark.parametrize("text, needle", [
    ("base:\n  a0: &a0 lol\n" + "".join(f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10))
     + "grid:\n  seed: [0, *a9]\n", "YAML aliases"),
    ("grid:\n  seed: [0]\nevaluate:\n  n: [5]\n", "evaluate.n must be an integer, got [5]"),
    ("grid:\n  seed: [0]\nevaluate:\n  pgd_steps: abc\n", "evaluate.pgd_steps must be an integer, got 'abc'"),
    ("grid:\n  seed: [0]\nbackend:\n  name: slurm\n  extra: {\"a\\nb\": 1}\n", "is not an sbatch option name"),
])
def test_hostile_sweep_files_get_one_line_answers(runs, text, needle):
    at = _check_file(open_page(), text)
    errs = [e.value for e in at.error]
    assert any(needle in e and "\n" not in e for e in errs), errs
    assert not (runs / "sweeps").exists()
