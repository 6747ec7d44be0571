"""Sweeps (core.sweep): spec validation, grid expansion, real local sweeps, the Table-1 aggregation and its export.

Every test points its runs folder at tmp_path; job processes are real (core.jobs) and train tiny digits models.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core import jobs, sweep
from core.errors import InputError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "table1a_cifar10.yaml"

# a digits run that trains and evaluates in a few seconds on a CPU
TINY_BASE = {"dataset": "digits", "arch": "smallcnn", "epochs": 1, "batch_size": 64, "train_limit": 256,
             "eval_samples": 64, "probe_size": 40, "attack_steps": 2, "eval_steps": 2, "threads": 1, "device": "cpu"}
TINY_EVAL = {"n": 32, "pgd_steps": 2, "aa_version": "custom", "aa_attacks": ["apgd-ce"], "batch_size": 32,
             "chunk_size": 32}


@pytest.fixture
def runs(runs_dir, monkeypatch):
    d = runs_dir
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    return d


def wait_sweep(sweep_id: str, runs_dir, timeout: float = 1200.0) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        s = sweep.status(sweep_id, runs_dir)
        if not any(c["status"] in ("queued", "running") for c in s["cells"]):
            return s
        time.sleep(1.0)
    s = sweep.status(sweep_id, runs_dir)
    logs = {c["job_id"]: jobs.read_log_tail(c["job_id"], 20, runs_dir) for c in s["cells"] if c["job_id"]}
    raise AssertionError(f"sweep {sweep_id} did not finish in {timeout:.0f} s: {s['counts']}\n{logs}")


# ============================================================================================ expansion
def test_grid_expands_to_the_product_in_order_and_keeps_the_base():
    spec = sweep.parse_spec({"name": "g", "base": {"epochs": 3, "lr": 0.05},
                             "grid": {"method": ["sat", "trades", "weat-adv"], "seed": [0, 1],
                                      "dataset": ["digits", "cifar10-demo"]}})
    runs = sweep.expand(spec)
    assert len(runs) == 3 * 2 * 2
    cells = [tuple(r["cell"].values()) for r in runs]
    assert len(set(cells)) == 12
    assert cells[0] == ("sat", 0, "digits") and cells[1] == ("sat", 0, "cifar10-demo") and cells[-1] == (
        "weat-adv", 1, "cifar10-demo")
    for r in runs:
        assert r["config"]["epochs"] == 3 and r["config"]["lr"] == 0.05
        assert {k: r["config"][k] for k in r["cell"]} == r["cell"]
        assert "out_dir" not in r["config"] and "name" not in r["config"]


def test_any_training_option_can_be_an_axis_and_budgets_read_as_fractions_of_255():
    spec = sweep.parse_spec("base: {eps: 8/255, step_size: 2/255}\ngrid:\n  beta: [1.0, 6.0]\n  weighting: [none, energy]\n")
    runs = sweep.expand(spec)
    assert [(r["cell"]["beta"], r["cell"]["weighting"]) for r in runs] == [(1.0, "none"), (1.0, "energy"),
                                                                           (6.0, "none"), (6.0, "energy")]
    assert runs[0]["config"]["eps"] == pytest.approx(8 / 255) and runs[0]["config"]["step_size"] == pytest.approx(2 / 255)


@pytest.mark.parametrize("spec, message", [
    ({"grid": {"methd": ["sat"]}}, "unknown training option 'methd' in 'grid' (did you mean 'method'?)"),
    ({"base": {"epoch": 3}, "grid": {"seed": [0]}}, "unknown training option 'epoch' in 'base' (did you mean 'epochs'?)"),
    ({"grid": {"method": ["sat", "foo"]}}, "run method=foo: unknown training method 'foo'"),
    ({"grid": {"epochs": ["ten"]}}, "run epochs=ten: epochs must be an integer, got 'ten'"),
    ({"grid": {"lr": [0.1, -1]}}, "run lr=-1: lr must be a finite number >= 0"),
    ({"grid": {"dataset": ["cifar11"]}}, "run dataset=cifar11: unknown dataset 'cifar11'"),
    ({"grid": {"seed": []}}, "grid 'seed' has no values"),
    ({"grid": {"seed": [0, 0]}}, "grid 'seed' lists a value twice"),
    ({"grid": {}}, "'grid' must be a non-empty mapping"),
    ({"base": {"seed": 1}, "grid": {"seed": [0]}}, "'seed' is both in 'base' and in 'grid'"),
    ({"base": {"out_dir": "x"}, "grid": {"seed": [0]}}, "'out_dir' cannot be set in a sweep"),
    ({"grid": {"seed": [0]}, "evaluate": {"pgd_stpes": 20}}, "unknown evaluation option 'pgd_stpes' in 'evaluate' (did you mean 'pgd_steps'?)"),
    ({"grid": {"seed": [0]}, "evaluate": {"checkpoint": "middle"}}, "evaluate.checkpoint must be 'best' or 'last'"),
    ({"grid": {"seed": [0]}, "backend": "pbs"}, "unknown backend 'pbs'"),
    ({"grid": {"seed": [0]}, "backend": {"name": "slurm", "partion": "gpu"}}, "did you mean 'partition'?"),
    ({"grid": {"seed": [0]}, "backend": {"name": "slurm", "time": "soon"}}, "time must be minutes or [D-]HH:MM:SS"),
    ({"grid": {"seed": [0]}, "backend": {"name": "slurm", "gpus_per_job": -1}}, "gpus_per_job must be an integer"),
    ({"grid": {"seed": [0]}, "nproc": 0}, "nproc (processes per run"),
    ({"grid": {"seed": list(range(50)), "lr": [0.01 * i for i in range(1, 60)]}}, "expands to 2,950 runs"),
    ({"grid": {"seed": [0]}, "grdi": {}}, "unknown sweep key 'grdi'"),
])
def test_bad_specs_are_refused_with_a_clear_message(spec, message):
    with pytest.raises(InputError) as e:
        sweep.parse_spec(spec)
    assert message in str(e.value)


def test_broken_yaml_and_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="is not valid YAML"):
        sweep.parse_spec("grid: [unclosed", fmt="yaml")
    with pytest.raises(InputError, match="cannot read the sweep file"):
        sweep.load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "s.json"
    bad.write_text('{"grid": {"seed": [0]}')
    with pytest.raises(InputError, match="is not valid JSON"):
        sweep.load_spec(bad)


def test_slurm_time_limits_parse_as_slurm_reads_them():
    from core.jobs.slurm import parse_time_minutes

    assert parse_time_minutes(90) == 90
    assert parse_time_minutes("90") == 90
    assert parse_time_minutes("04:00:00") == 240
    assert parse_time_minutes("1-00:00:00") == 1440
    assert parse_time_minutes("2-12") == 2 * 1440 + 12 * 60
    assert parse_time_minutes("30:00") == 30


def test_the_example_file_is_table_1a_cifar10():
    """examples/table1a_cifar10.yaml: the 5 methods of Table 1a x 5 seeds on CIFAR-10 with ResNet-18 and the
    paper's training recipe (official code: SGD 0.1, momentum 0.9, wd 5e-4, batch 128, 100 epochs, OneCycle,
    eps 8/255, step 2/255, beta 6), evaluated with PGD-20 and AutoAttack on the 10,000 test images."""
    spec = sweep.load_spec(EXAMPLE)
    runs = sweep.expand(spec)
    assert len(runs) == 25
    assert spec.grid["method"] == ["sat", "trades", "mail-trades", "weat-nat", "weat-adv"]
    assert spec.grid["seed"] == [0, 1, 2, 3, 4]
    c = runs[0]["config"]
    assert (c["dataset"], c["arch"], c["epochs"], c["batch_size"], c["lr"], c["momentum"], c["weight_decay"],
            c["schedule"]) == ("cifar10", "resnet18", 100, 128, 0.1, 0.9, 5e-4, "onecycle")
    assert c["eps"] == pytest.approx(8 / 255) and c["step_size"] == pytest.approx(2 / 255)
    assert c.get("beta", 6.0) == 6.0
    assert spec.evaluate["n"] == 10000 and spec.evaluate["pgd_steps"] == 20 and spec.evaluate["autoattack"]
    assert spec.evaluate["aa_version"] == "standard"
    assert spec.backend["name"] == "slurm" and spec.backend["gpus_per_job"] == 1


# ============================================================================================ aggregation
def _fake_sweep(root: Path, accs: dict[tuple[str, int], tuple[float, float, float]]) -> str:
    """A stored sweep whose cells point at job folders holding evaluation records with the given accuracies
    (the records have the fields core.evaluation.run_job writes)."""
    cells = []
    for (method, seed), (nat, pgd, aa) in accs.items():
        jid = f"job-{method}-{seed}"
        (root / jid).mkdir(parents=True)
        train_config = {**TINY_BASE, "method": method, "seed": seed, "eps": 16 / 255}
        rec = {"model": {"source": "local", "name": jid}, "model_name": jid, "method": method, "source": "local",
               "dataset": "digits", "arch": "smallcnn", "model_sha": f"sha-{jid}", "train_config": train_config,
               "train_seed": seed, "config": {"n": 100, "norm": "Linf", "eps": 16 / 255, "pgd_steps": 20,
                                              "autoattack": True, "seed": 0},
               "n": 100, "natural_acc": nat, "pgd_acc": pgd, "aa_acc": aa}
        (root / jid / "result.json").write_text(json.dumps(rec))
        cells.append({"cell": {"method": method, "seed": seed}, "job_id": jid})
    sid = "sweep-fake"
    (root / "sweeps").mkdir(parents=True, exist_ok=True)
    (root / "sweeps" / f"{sid}.json").write_text(json.dumps({"id": sid, "name": "fake", "created": 1.0, "cells": cells,
                                                             "axes": ["method", "seed"], "backend": {"name": "local"}}))
    return sid


def test_table_is_mean_and_std_over_seeds_and_exports_csv_and_markdown(tmp_path):
    root = tmp_path / "runs"
    accs = {("sat", 0): (0.80, 0.50, 0.45), ("sat", 1): (0.84, 0.48, 0.44), ("sat", 2): (0.82, 0.49, 0.47),
            ("trades", 0): (0.81, 0.53, 0.50), ("trades", 1): (0.83, 0.52, 0.49)}
    sid = _fake_sweep(root, accs)
    t = sweep.table(sid, root)
    assert len(t) == 2
    by = {r["method"]: r for r in t}
    for method, label in (("sat", "SAT"), ("trades", "TRADES")):
        vals = [v for (m, _), v in accs.items() if m == method]
        for i, key in enumerate(("natural", "pgd", "aa")):
            xs = [v[i] for v in vals]
            assert by[label][f"{key}_mean"] == pytest.approx(statistics.mean(xs))
            assert by[label][f"{key}_std"] == pytest.approx(statistics.stdev(xs))  # sample std over seeds
        assert by[label]["runs"] == len(vals)
        assert by[label]["seeds"] == sorted(s for (m, s) in accs if m == method)
    rows = list(csv.DictReader(io.StringIO(t.to_csv())))
    assert {r["method"] for r in rows} == {"SAT", "TRADES"}
    sat = next(r for r in rows if r["method"] == "SAT")
    assert float(sat["aa_mean"]) == pytest.approx(statistics.mean([0.45, 0.44, 0.47]))
    assert sat["seeds"] == "0 1 2" and sat["runs"] == "3"
    assert sat["aa"] == f"{100 * statistics.mean([0.45, 0.44, 0.47]):.2f} ± {100 * statistics.stdev([0.45, 0.44, 0.47]):.2f}"
    md = [ln for ln in t.to_markdown().splitlines() if ln.startswith("|")]
    header = [c.strip() for c in md[0].strip("|").split("|")]
    assert header == ["Method", "Dataset", "Arch", "ε", "Runs", "Natural", "PGD", "AA"]
    body = {c[0]: c for c in ([x.strip() for x in ln.strip("|").split("|")] for ln in md[2:])}
    assert body["TRADES"][4] == "2" and body["TRADES"][7] == sat_fmt([0.50, 0.49])
    assert body["SAT"][5] == sat_fmt([0.80, 0.84, 0.82])


def sat_fmt(xs):
    return f"{100 * statistics.mean(xs):.2f} ± {100 * statistics.stdev(xs):.2f}"


def test_status_lays_the_cells_out_by_method_and_seed(tmp_path):
    root = tmp_path / "runs"
    sid = _fake_sweep(root, {("sat", 0): (0.8, 0.5, 0.4), ("sat", 1): (0.8, 0.5, 0.4), ("trades", 0): (0.8, 0.5, 0.4)})
    s = sweep.status(sid, root)
    g = s["grid"]
    assert g["row_axes"] == ["method"] and g["seeds"] == [0, 1]
    assert [r["axes"]["method"] for r in g["rows"]] == ["sat", "trades"]
    assert set(g["rows"][1]["cells"]) == {0}
    # the fake job folders are not in the registry: every cell says so instead of failing
    assert s["counts"] == {"missing": 3}


# ============================================================================================ real local sweeps
@pytest.mark.slow
def test_local_sweep_runs_trains_evaluates_and_fills_table_1(runs):
    spec = sweep.parse_spec({"name": "tiny", "base": TINY_BASE, "grid": {"method": ["sat", "trades"], "seed": [0, 1]},
                             "evaluate": TINY_EVAL})
    rec = sweep.submit_sweep(spec, runs)
    assert len(rec["cells"]) == 4 and all(c["job_id"] for c in rec["cells"])
    s = wait_sweep(rec["id"], runs)
    assert s["counts"] == {"done": 4}, [c["message"] for c in s["cells"]]
    results = {}
    for c in s["cells"]:
        info = jobs.get_job(c["job_id"], runs)
        assert info.kind == "train" and info.config["method"] == c["method"] and info.config["seed"] == c["seed"]
        spec_file = json.loads((runs / c["job_id"] / "job.json").read_text())
        assert spec_file["target"] == "core.sweep:run_cell" and spec_file["sweep"]["id"] == rec["id"]
        res = json.loads((runs / c["job_id"] / "result.json").read_text())
        assert res["method"] == c["method"] and res["train_seed"] == c["seed"] and res["n"] == 32
        assert (runs / c["job_id"] / "metrics.jsonl").is_file()   # an ordinary training run, Fig. 3 and all
        assert c["natural"] == res["natural_acc"] and c["aa"] == res["aa_acc"]
        results.setdefault(c["method"], []).append(res)
    t = sweep.table(rec["id"], runs)
    assert sorted(r["method"] for r in t) == ["SAT", "TRADES"]
    for r in t:
        recs = results[r["method"].lower()]
        assert r["runs"] == 2 and r["seeds"] == [0, 1]
        assert r["natural_mean"] == pytest.approx(statistics.mean(x["natural_acc"] for x in recs))
        assert r["aa_mean"] == pytest.approx(statistics.mean(x["aa_acc"] for x in recs))


@pytest.mark.slow
def test_cli_sweep_submit_status_table(runs, tmp_path):
    f = tmp_path / "tiny.json"
    f.write_text(json.dumps({"name": "cli", "base": TINY_BASE, "grid": {"method": ["sat"], "seed": [0, 1]},
                             "evaluate": TINY_EVAL}))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "core.jobs", "--runs-dir", str(runs), "sweep", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    dry = cli(str(f), "--dry-run")
    assert dry.returncode == 0 and dry.stdout.splitlines()[:2] == ["method=sat, seed=0", "method=sat, seed=1"]
    assert not (runs / "sweeps").exists()
    r = cli(str(f))
    assert r.returncode == 0, r.stderr
    sid = r.stdout.split()[0]
    wait_sweep(sid, runs)
    st = cli("status", sid)
    assert st.returncode == 0 and st.stdout.count(" done ") == 2 and st.stdout.strip().endswith("2 done")
    out = tmp_path / "t.csv"
    tb = cli("table", sid, "--format", "csv", "-o", str(out))
    assert tb.returncode == 0, tb.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1 and rows[0]["method"] == "SAT" and rows[0]["runs"] == "2"
    assert sid in cli("list").stdout


def test_cli_bad_sweep_file_is_a_message_not_a_traceback(runs, tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("grid:\n  methd: [sat]\n")
    r = subprocess.run([sys.executable, "-m", "core.jobs", "--runs-dir", str(runs), "sweep", str(f)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "error: unknown training option 'methd' in 'grid' (did you mean 'method'?)" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "core.jobs", "--runs-dir", str(runs), "sweep", "status", "nope"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown sweep 'nope'" in r.stderr


@pytest.mark.slow
def test_a_run_with_nproc_2_trains_with_torchrun_and_evaluates(runs):
    """nproc > 1: the run's job process starts torchrun (2 processes, gloo on the CPU) for the training, then
    evaluates the checkpoint itself; only rank 0 wrote the metrics."""
    import torch

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    spec = sweep.parse_spec({"name": "ddp", "base": {**TINY_BASE, "epochs": 2}, "grid": {"seed": [0]},
                             "evaluate": TINY_EVAL, "nproc": 2})
    rec = sweep.submit_sweep(spec, runs)
    s = wait_sweep(rec["id"], runs)
    (cell,) = s["cells"]
    assert cell["status"] == "done", jobs.read_log_tail(cell["job_id"], 40, runs)
    folder = runs / cell["job_id"]
    log = (folder / "log.txt").read_text()
    assert "torch.distributed.run --standalone --nproc_per_node=2 -m core.train" in log
    epochs = [json.loads(ln)["epoch"] for ln in (folder / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    assert json.loads((folder / "result.json").read_text())["n"] == 32 and cell["aa"] is not None


def test_cli_options_after_the_file_and_before_it(runs):
    for args in ([str(EXAMPLE), "--dry-run", "--backend", "local"], ["--backend", "local", str(EXAMPLE), "--dry-run"],
                 ["submit", str(EXAMPLE), "--dry-run"]):
        r = subprocess.run([sys.executable, "-m", "core.jobs", "--runs-dir", str(runs), "sweep", *args], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        want = "local" if "local" in args else "slurm"
        assert r.stdout.splitlines()[-1] == f"25 runs, backend {want}"
    h = subprocess.run([sys.executable, "-m", "core.jobs", "sweep", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert h.returncode == 0 and "{submit,list,status,table,stop}" in h.stdout
