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
from core.errors import InputError, JobError

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


# ============================================================================================ issue 24 (round 3)
def _laughs(depth: int = 9, where: str = "grid") -> str:
    """A 'billion laughs' sweep file: anchors nested ``depth`` deep, 9 aliases per level (9**depth leaves)."""
    lines = ['a0: &a0 "lol"']
    for i in range(1, depth + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    anchors = "\n".join("  " + ln for ln in lines)
    top = {"grid": f"grid:\n  seed: [0, *a{depth}]\n",
           "name": f"name: *a{depth}\ngrid:\n  seed: [0]\n",
           "axis": f"grid:\n  seed: *a{depth}\n",
           "base": "grid:\n  seed: [0]\n"}[where]
    base = "base:\n" + anchors + ("\n  dataset: *a%d\n" % depth if where == "base" else "\n")
    return base + top  # anchors first: YAML refers back only


_SWEEP_CHILD = r"""
import json, resource, sys, time
from core import sweep
from core.errors import EnergyLensError
sweep.parse_spec({"grid": {"seed": [0]}})  # warm up lazy imports

def status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

cap = status_kb("VmSize") * 1024 + 300 * 2**20
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
out = []
for f in sys.argv[1:]:
    base = status_kb("VmRSS")
    t0 = time.process_time()
    try:
        sweep.load_spec(f)
        res = {"ok": True}
    except EnergyLensError as e:
        res = {"error": type(e).__name__, "msg": str(e)[:300]}
    except BaseException as e:
        res = {"error": type(e).__name__, "msg": str(e)[:300], "unexpected": True}
    res["cpu_ms"] = 1000 * (time.process_time() - t0)
    res["peak_growth_mb"] = (status_kb("VmHWM") - base) / 1024
    out.append(res)
print("RESULT " + json.dumps(out))
"""


def _parse_capped(paths: list[Path]) -> list[dict]:
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc to cap the child's address space")
    try:
        r = subprocess.run([sys.executable, "-c", _SWEEP_CHILD, *map(str, paths)], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise AssertionError("parsing the hostile sweep files did not end in 120 s") from None
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert r.returncode == 0 and line, f"child failed (rc {r.returncode}): {r.stderr[-2000:]}"
    return json.loads(line[len("RESULT "):])


def test_billion_laughs_and_huge_axes_are_refused_in_bounded_time_and_memory(tmp_path):
    files = []
    for where in ("grid", "name", "axis", "base"):
        files.append(tmp_path / f"laughs-{where}.yaml")
        files[-1].write_text(_laughs(9, where))
        assert files[-1].stat().st_size < 2048
    big_yaml = tmp_path / "axis-1e5.yaml"          # 100,000 values on one axis (under the 256 KiB text bound)
    big_yaml.write_text("grid:\n  seed: [" + ",".join(["0"] * 100_000) + "]\n")
    big_json = tmp_path / "axis-1e6.json"          # 10**6 values: refused by the text bound before parsing
    big_json.write_text(json.dumps({"grid": {"seed": list(range(10**6))}}))
    deep = tmp_path / "deep.json"
    deep.write_text('{"grid": {"seed": ' + "[" * 100_000 + "]" * 100_000 + "}}")
    cyclic = tmp_path / "cycle.yaml"
    cyclic.write_text("grid:\n  seed: &s [0, *s]\n")
    res = _parse_capped(files + [big_yaml, big_json, deep, cyclic])
    for f, r in zip(files + [big_yaml, big_json, deep, cyclic], res):
        assert r.get("error") == "InputError", (f.name, r)
        assert r["cpu_ms"] < 2000 and r["peak_growth_mb"] < 100, (f.name, r)
    assert all("YAML aliases" in r["msg"] for r in res[:4]), res[:4]
    assert "more than 2,000 values" in res[4]["msg"], res[4]
    assert "characters long" in res[5]["msg"], res[5]


def test_axis_lengths_are_counted_before_values_are_compared():
    with pytest.raises(InputError, match="expands to 3,600 runs"):
        sweep.parse_spec({"grid": {"seed": list(range(60)), "lr": [0.1] * 60}})  # counted before the repeat is seen
    with pytest.raises(InputError, match="a list of the sweep has more than 2,000 values"):
        sweep.parse_spec({"grid": {"seed": [0] * 3000}})
    with pytest.raises(InputError, match="a text of the sweep is 5,000 characters long"):
        sweep.parse_spec({"name": "x" * 5000, "grid": {"seed": [0]}})


@pytest.mark.parametrize("evaluate, message", [
    ({"n": [5]}, "evaluate.n must be an integer, got [5]"),
    ({"pgd_steps": "abc"}, "evaluate.pgd_steps must be an integer, got 'abc'"),
    ({"autoattack": "yes"}, "evaluate.autoattack must be true or false"),
    ({"aa_attacks": [1, 2]}, "evaluate.aa_attacks must be a list or null of attack names"),
    ({"eps": {"a": 1}}, "evaluate.eps must be an integer or a number or null"),
    ({"n": True}, "evaluate.n must be an integer, got True"),
])
def test_evaluate_options_are_type_checked(evaluate, message):
    with pytest.raises(InputError) as e:
        sweep.parse_spec({"grid": {"seed": [0]}, "evaluate": evaluate})
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_cli_evaluate_of_the_wrong_type_is_one_line_not_a_traceback(tmp_path):
    f = tmp_path / "ev.yaml"
    f.write_text("grid:\n  seed: [0]\nevaluate:\n  n: [5]\n")
    from core.sweep_cli import cli
    r = cli([str(f), "--dry-run"], runs_dir=tmp_path / "runs")
    assert r == 2


@pytest.mark.parametrize("extra, message", [
    ({"exclusive\n#SBATCH --wrap=touch /tmp/pwned": True}, "is not an sbatch option name"),
    ({"comment": "x\ntouch /tmp/pwned"}, "one-line string without control characters"),
    ({"comment": "x\rtouch"}, "one-line string without control characters"),
    ({"comment": ["a"]}, "one-line string"),
    ({"--mail": "x"}, "is not an sbatch option name"),
])
def test_slurm_extra_refuses_newlines_and_odd_keys(extra, message):
    with pytest.raises(InputError, match="slurm backend extra") as e:
        sweep.parse_spec({"grid": {"seed": [0]}, "backend": {"name": "slurm", "extra": extra}})
    assert message in str(e.value)
    ok = sweep.parse_spec({"grid": {"seed": [0]}, "backend": {"name": "slurm",
                                                               "extra": {"exclusive": True, "comment": "a b"}}})
    assert ok.backend["extra"] == {"exclusive": True, "comment": "a b"}


def test_slurm_setup_needs_an_explicit_yes_from_the_dashboard(tmp_path):
    spec = {"grid": {"seed": [0]}, "backend": {"name": "slurm", "setup": ["module load cuda"]}}
    with pytest.raises(InputError, match="run as shell commands on the cluster nodes"):
        sweep.parse_spec(spec, allow_setup=False)
    with pytest.raises(InputError, match="run as shell commands"):
        sweep.submit_sweep(sweep.parse_spec(spec), tmp_path / "runs", allow_setup=False)
    assert sweep.parse_spec(spec, allow_setup=True).backend["setup"] == ["module load cuda"]
    assert sweep.parse_spec({"grid": {"seed": [0]}, "backend": "slurm"}, allow_setup=False)  # no setup: fine


def _slurm_local(tmp_path: Path, **kw) -> dict:
    return {"name": "sweep-x", "base": {**TINY_BASE}, "grid": {"seed": list(range(10))}, "evaluate": False,
            "backend": {"name": "slurm", "cluster": "local", **kw}}


def test_stop_during_submission_stops_what_exists_and_submits_nothing_more(tmp_path, monkeypatch):
    from core.jobs import api, slurm

    root = tmp_path / "runs"
    created: list[str] = []
    real_submit = api.submit
    batches: list = []

    def submit_then_stop(*a, **kw):
        info = real_submit(*a, **kw)
        created.append(info.id)
        if len(created) == 3:  # 'sweep stop' from another process, while the submission is under way
            (sid,) = [p.stem for p in (root / "sweeps").glob("*.json")]
            assert sweep.stop_sweep(sid, root) == 2  # the two ids recorded so far
        return info

    monkeypatch.setattr(api, "submit", submit_then_stop)
    monkeypatch.setattr(slurm.SlurmScheduler, "executor", lambda *a, **k: batches.append(a) or (_ for _ in ()).throw(
        AssertionError("nothing may reach the scheduler after stop")))
    rec = sweep.submit_sweep(sweep.parse_spec(_slurm_local(tmp_path)), root)
    assert len(created) == 3 and not batches
    assert [c["job_id"] for c in rec["cells"]][:3] == created and rec["cells"][3]["job_id"] is None
    assert "stopped during its submission after 3 of 10 runs" in rec["stopped"]
    on_disk = sweep.load_sweep(rec["id"], root)
    assert [c["job_id"] for c in on_disk["cells"]][:3] == created
    assert {jobs.peek_job(j, root).status for j in created} == {"stopped"}
    assert len(jobs.list_jobs(root)) == 3


def test_a_submission_that_fails_marks_its_rows_failed_with_the_reason(tmp_path):
    root = tmp_path / "runs"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    spec = sweep.parse_spec(_slurm_local(tmp_path, folder=str(blocker / "submitit")))
    with pytest.raises(JobError, match="submitting") as e:
        sweep.submit_sweep(spec, root)
    assert "Traceback" not in str(e.value)
    (sid,) = [p.stem for p in (root / "sweeps").glob("*.json")]
    s = sweep.status(sid, root)
    assert s["counts"] == {"failed": 10}, s["counts"]
    assert all("submitting" in c["message"] and "Not a directory" in c["message"] for c in s["cells"]), s["cells"][0]
