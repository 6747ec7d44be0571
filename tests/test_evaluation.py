"""core.evaluation: natural / PGD / AutoAttack numbers, chunked resume, and the Table-1 summary."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from core import evaluation as E
from core.attacks import AttackSpec, run_attack
from core.errors import InputError
from core.models.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
PLAIN = REPO / "checkpoints" / "digits-plain.safetensors"
ROBUST = [REPO / "checkpoints" / f for f in ("digits-sat.safetensors", "digits-trades.safetensors")]
REF = {"source": "bundled", "name": "digits-plain", "path": str(PLAIN)}
FAST_AA = {"aa_version": "custom", "aa_attacks": ["apgd-ce", "apgd-dlr"]}


@pytest.fixture(scope="module")
def plain():
    if not PLAIN.is_file():
        pytest.skip("bundled checkpoint digits-plain.safetensors is missing")
    return load_checkpoint(PLAIN)


@pytest.fixture(scope="module")
def robust_or_plain():
    """A bundled robust model when present; else the plain one at a small epsilon (partly robust)."""
    for p in ROBUST:
        if p.is_file():
            return load_checkpoint(p), None
    if not PLAIN.is_file():
        pytest.skip("no bundled checkpoint")
    return load_checkpoint(PLAIN), 2 / 255


@pytest.fixture(scope="module")
def data():
    from core.data import load_dataset

    ds = load_dataset("digits", "test")
    idx = torch.arange(24)
    return ds.images(idx), ds.labels(idx)


# ---------------------------------------------------------------------------------------------
def test_resolve_config_defaults_and_validation(plain):
    cfg = E.resolve_config({}, plain.meta)
    assert cfg["eps"] == pytest.approx(16 / 255)               # the dataset's default
    assert cfg["pgd_step_size"] == pytest.approx(4 / 255)      # eps / 4 (2/255 at 8/255)
    assert cfg["pgd_steps"] == 20 and cfg["aa_version"] == "standard"
    assert E.resolve_config({"norm": "L2"}, plain.meta)["eps"] == 0.5
    assert E.resolve_config({"eps": 8 / 255}, plain.meta)["pgd_step_size"] == pytest.approx(2 / 255)
    for bad, msg in (({"bogus": 1}, "unknown evaluation option"), ({"norm": "L1"}, "norm"),
                     ({"n": 0}, "positive integer"), ({"chunk_size": 2.5}, "positive integer"),
                     ({"aa_version": "custom"}, "custom AutoAttack"),
                     ({"aa_version": "custom", "aa_attacks": ["pgd"]}, "unknown: pgd"),
                     ({"eps": -1}, "epsilon")):
        with pytest.raises(InputError, match=msg):
            E.resolve_config(bad, plain.meta)


def test_numbers_ordering_and_consistency(robust_or_plain, data, tmp_path):
    lm, eps = robust_or_plain
    x, y = data[0][:12], data[1][:12]
    cfg = {"chunk_size": 6, "batch_size": 6, "pgd_steps": 10, **FAST_AA}
    if eps is not None:
        cfg["eps"] = eps
    res = E.evaluate(lm, x, y, cfg, run_dir=tmp_path)
    nat, pgd, aa = res["natural_acc"], res["pgd_acc"], res["aa_acc"]
    assert 0.0 <= aa <= nat and pgd <= nat
    assert aa <= pgd + 0.1  # AutoAttack is at least about as strong as PGD
    # natural accuracy = a plain forward pass
    with torch.no_grad():
        want = (lm.model.eval()(x).argmax(1) == y).float().mean().item()
    assert nat == pytest.approx(want)
    # PGD = run_attack with the same per-chunk seed, counted only where the natural point is correct
    c = res["config"]
    ok = []
    for k, s in enumerate(range(0, 12, 6)):
        spec = AttackSpec("pgd", eps=c["eps"], steps=10, step_size=c["pgd_step_size"], seed=k, batch_size=6)
        tr = run_attack(lm.model, x[s:s + 6], y[s:s + 6], spec).trace
        ok.append((tr.pred[0] == tr.labels) & (tr.pred[-1] == tr.labels))
    assert pgd == pytest.approx(np.concatenate(ok).mean())
    part = json.loads((tmp_path / "partial.json").read_text())
    assert sorted(part["chunks"]) == ["0", "1"] and len(part["chunks"]["0"]["nat"]) == 6


def test_standard_autoattack_on_the_plain_model(plain, data):
    """The real 'standard' AutoAttack through pyautoattack's keyword-only API (fast: APGD-CE breaks all)."""
    x, y = data
    res = E.evaluate(plain, x[:8], y[:8], {"chunk_size": 8, "batch_size": 8, "pgd_steps": 5})
    assert res["config"]["aa_version"] == "standard"
    assert res["aa_acc"] <= res["pgd_acc"] <= res["natural_acc"]
    assert res["aa_acc"] == 0.0


class _Crash(Exception):
    pass


def test_resume_skips_finished_chunks(plain, data, tmp_path, monkeypatch):
    x, y = data
    cfg = {"chunk_size": 8, "batch_size": 8, "pgd_steps": 3, "autoattack": False, "eps": 4 / 255}
    full = E.evaluate(plain, x, y, cfg)

    def crash_after_first_chunk(f, msg):
        if msg.startswith("8/24 images"):
            raise _Crash()

    with pytest.raises(_Crash):
        E.evaluate(plain, x, y, cfg, run_dir=tmp_path, progress=crash_after_first_chunk)
    assert list(E.load_partial(tmp_path)["chunks"]) == ["0"]

    calls = []
    real = E.run_attack
    monkeypatch.setattr(E, "run_attack", lambda m, xb, *a, **k: calls.append(len(xb)) or real(m, xb, *a, **k))
    resumed = E.evaluate(plain, x, y, cfg, run_dir=tmp_path)
    assert calls == [8, 8]                      # only chunks 1 and 2 were attacked
    assert resumed["chunks_resumed"] == 1
    np.testing.assert_array_equal(resumed["pgd_correct"], full["pgd_correct"])
    assert resumed["pgd_acc"] == full["pgd_acc"] and resumed["natural_acc"] == full["natural_acc"]
    calls.clear()
    E.evaluate(plain, x, y, cfg, run_dir=tmp_path)
    assert calls == []                          # everything done: nothing recomputed
    E.evaluate(plain, x, y, {**cfg, "pgd_steps": 4}, run_dir=tmp_path)
    assert calls == [8, 8, 8]                   # another configuration: a fresh start
    calls.clear()
    E.evaluate(plain, x, y, {**cfg, "pgd_steps": 4, "device": "cpu", "batch_size": 4}, run_dir=tmp_path)
    assert calls == []                          # device / batch size do not change the numbers


def test_run_job_writes_the_record(tmp_path):
    if not PLAIN.is_file():
        pytest.skip("bundled checkpoint missing")
    reports = []
    rec = E.run_job({"model": REF, "n": 16, "chunk_size": 8, "batch_size": 8, "pgd_steps": 3, "autoattack": False,
                     "device": "cpu"}, tmp_path, lambda f, m: reports.append((f, m)))
    assert rec["n"] == 16 and rec["method"] == "plain" and rec["dataset"] == "digits" and rec["aa_acc"] is None
    assert json.loads((tmp_path / "result.json").read_text())["pgd_acc"] == rec["pgd_acc"]
    assert reports[-1][0] == 1.0 and "natural" in reports[-1][1]
    with pytest.raises(InputError, match="has only 359"):
        E.run_job({"model": REF, "n": 5000}, tmp_path, lambda f, m: None)
    with pytest.raises(InputError, match="needs a model"):
        E.run_job({"n": 5}, tmp_path, lambda f, m: None)


@pytest.mark.slow
def test_eval_job_through_the_job_system(runs_dir):
    if not PLAIN.is_file():
        pytest.skip("bundled checkpoint missing")
    from core import jobs

    info = jobs.submit("eval", {"model": REF, "n": 12, "chunk_size": 6, "batch_size": 6, "pgd_steps": 3,
                                "autoattack": False}, device="cpu")
    deadline = time.time() + 180
    while time.time() < deadline and jobs.get_job(info.id).active:
        time.sleep(0.5)
    done = jobs.get_job(info.id)
    assert done.status == "done", (done.error, jobs.read_log_tail(info.id, 30))
    assert done.result["n"] == 12 and (Path(done.run_dir) / "partial.json").is_file()
    table = E.results_table([done.result])
    assert len(table) == 1 and table[0]["runs"] == 1


# ---------------------------------------------------------------------------------------------
def _rec(method, seed, nat, pgd, aa, *, beta=6, dataset="digits", name=None, eps=16 / 255):
    return {"method": method, "model_name": name or f"{method}-{seed}", "dataset": dataset, "arch": "smallcnn",
            "model_sha": f"sha-{method}-{seed}-{beta}",
            "train_config": {"method": method, "epochs": 10, "beta": beta, "seed": seed, "out_dir": f"runs/{seed}",
                             "name": f"{method}-{seed}"},
            "train_seed": seed, "config": {"eps": eps, "norm": "Linf", "pgd_steps": 20, "n": 359, "seed": seed,
                                           "device": "cpu", "autoattack": True, "aa_version": "standard"},
            "n": 359, "natural_acc": nat, "pgd_acc": pgd, "aa_acc": aa}


def test_results_table_groups_seeds_mean_std_and_exports():
    recs = [_rec("sat", 0, 0.90, 0.50, 0.40), _rec("sat", 1, 0.92, 0.60, 0.50), _rec("sat", 2, 0.94, 0.55, 0.45),
            _rec("trades", 0, 0.95, 0.65, 0.60),
            _rec("trades", 1, 0.85, 0.45, 0.42, beta=1),          # another configuration: its own row
            {"method": "zoo", "model_name": "Carmon2019Unlabeled", "dataset": "cifar10", "arch": "wrn-28-10",
             "config": {"eps": 8 / 255, "norm": "Linf"}, "natural_acc": 0.8969, "pgd_acc": 0.62, "aa_acc": 0.5953},
            {"method": "sat", "natural_acc": None}]                 # unfinished: ignored
    t = E.results_table(recs)
    by = {r["method"]: r for r in t}
    sat = by["SAT"]
    assert sat["runs"] == 3 and sat["seeds"] == [0, 1, 2]
    assert sat["natural_mean"] == pytest.approx(0.92)
    assert sat["natural_std"] == pytest.approx(np.std([0.90, 0.92, 0.94], ddof=1))
    assert sat["natural"] == "92.00 ± 2.00"
    assert sat["aa"] == "45.00 ± 5.00"
    trades = [r for r in t if r["method"].startswith("TRADES")]
    assert len(trades) == 2 and all("beta=" in r["method"] for r in trades)
    single = next(r for r in trades if "beta=6" in r["method"])
    assert single["runs"] == 1 and single["pgd"] == "65.00"   # no ± for a single run
    assert by["Carmon2019Unlabeled"]["eps"] == "8/255" and by["Carmon2019Unlabeled"]["aa"] == "59.53"
    assert len(t) == 4
    # digits rows sorted by AA accuracy, best first
    digits = [r for r in t if r["dataset"] == "digits"]
    assert [r["aa_mean"] for r in digits] == sorted((r["aa_mean"] for r in digits), reverse=True)

    rows = list(csv.DictReader(io.StringIO(t.to_csv())))
    assert len(rows) == 4 and {"method", "natural", "pgd", "aa", "natural_mean", "aa_std", "seeds"} <= set(rows[0])
    assert next(r for r in rows if r["method"] == "SAT")["seeds"] == "0 1 2"
    md = t.to_markdown().strip().splitlines()
    assert md[0].startswith("| Method |") and set(md[1]) <= set("|-: ") and len(md) == 2 + 4
    assert any("92.00 ± 2.00" in line for line in md)


def test_results_table_without_provenance_groups_only_identical_weights():
    a = {"method": "unknown", "model_name": "upload", "model_sha": "x", "dataset": "digits", "config": {"eps": 0.1},
         "natural_acc": 0.5, "pgd_acc": 0.1, "aa_acc": 0.1}
    b = {**a, "model_sha": "y", "natural_acc": 0.7}
    t = E.results_table([a, dict(a), b])
    assert sorted(r["runs"] for r in t) == [1, 2]
    assert E.results_table([]).rows == [] and E.results_table([]).to_markdown().count("\n") == 2
