"""Training studio page (pages/training.py) under Streamlit's AppTest.

Every test gets its own runs folder (conftest's ``runs_dir``), so the real runs/ folder is never touched.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    from apptest_helpers import Chart

REPO = Path(__file__).resolve().parents[1]
HOME = str(REPO / "dashboard" / "Home.py")
PAGE = "training"  # key in dashboard/navigation.py

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def runs(runs_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("ENERGYLENS_EXTRA_KINDS", raising=False)
    # the form's default dataset is the CIFAR-10 demo where its training images exist, digits elsewhere (a fresh
    # clone); these tests run the fast digits path everywhere (test_demo_dataset_is_the_default_where_available)
    monkeypatch.setenv("ENERGYLENS_CIFAR10_SUBSET", str(tmp_path / "no-subset.npz"))
    return runs_dir


def open_page():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(HOME, default_timeout=60).run()
    switch_to(at, PAGE)
    no_crash(at)
    return at


def no_crash(at):
    """No exception element and no 'Unexpected error' from common.guard (a bug caught by the guard)."""
    assert not at.exception, [e.message for e in at.exception]
    assert not [e.value for e in at.error if "Unexpected error" in e.value]


def wait_done(job_id: str, timeout: float = 300.0):
    from core import jobs

    t0 = time.time()
    while time.time() - t0 < timeout:
        info = jobs.get_job(job_id)
        if not info.active:
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish in {timeout:.0f} s: {jobs.read_log_tail(job_id, 30)}")


# The AppTest helpers are imported inside these functions: job processes import this file by path (the
# fake runner below), without tests/ on sys.path.
def switch_to(at, key: str):
    from apptest_helpers import open_page

    return open_page(at, key)


def charts(at) -> list[Chart]:
    from apptest_helpers import charts as decoded

    return decoded(at)


def chart_with(figs: list[Chart], fragment: str) -> Chart:
    from apptest_helpers import chart_with as find

    return find(figs, fragment)


def fig3_of(figs: list[Chart]) -> Chart:
    """Fig. 3 of the viewed run: ΔE per epoch with the test errors on the right axis."""
    fig3 = next((c for c in figs if c.title.startswith("ΔE during training")), None)
    assert fig3 is not None, [c.title for c in figs]
    return fig3


def set_form(at, **values):
    """Set number inputs of the launch form by key prefix (keys are tr_<name>_<version>_<dataset>)."""
    for name, v in values.items():
        hits = [n for n in at.number_input if n.key.startswith(f"tr_{name}_")]
        assert hits, f"no number input tr_{name}_*"
        hits[0].set_value(v)


def launch_button(at):
    return next(b for b in at.button if b.key.startswith("tr_launch_"))


# -------------------------------------------------------------------------------------------------
def test_page_renders_without_runs(runs):
    at = open_page()
    assert any("Training studio" in t.value for t in at.title)
    assert any("No training runs of yours yet" in i.value for i in at.info)
    assert not at.error
    assert not runs.exists() or not any(p.is_dir() for p in runs.iterdir())
    # dataset-dependent defaults (digits: smallcnn, 16/255, 15 epochs)
    keys = {n.key.split("_")[1]: n.value for n in at.number_input}
    assert keys["eps"] == 16.0 and keys["epochs"] == 15
    assert next(s for s in at.selectbox if s.key.startswith("tr_arch_")).value == "smallcnn"


def test_demo_dataset_is_the_default_where_available(runs, monkeypatch):
    monkeypatch.delenv("ENERGYLENS_CIFAR10_SUBSET")          # the pack's own train split (in every clone)
    at = open_page()
    assert next(s for s in at.selectbox if s.key.startswith("tr_dataset_")).value == "cifar10-demo"
    assert next(s for s in at.selectbox if s.key.startswith("tr_arch_")).value == "demonet"
    keys = {n.key.split("_")[1]: n.value for n in at.number_input}
    assert keys["eps"] == 8.0
    assert not [w.value for w in at.warning if "demo's 4,585 training images" in w.value]


def test_demo_without_training_images_says_so(runs):
    at = open_page()
    next(s for s in at.selectbox if s.key.startswith("tr_dataset_")).select("cifar10-demo").run()
    no_crash(at)
    assert any("training images are not on this machine" in w.value for w in at.warning), [w.value for w in at.warning]


@pytest.mark.parametrize("field,value,needle", [
    ("epochs", 0, "epochs must be a positive integer"),
    ("eps", -4.0, "epsilon must lie in [0, 1] (0 to 255/255), got -4/255"),
    # refused by TrainConfig.validate (the page keeps no rules of its own), e.g. `python -m core.train --train-limit -5`
    ("limit", -5, "train limit (the number of training images) must be an integer >= 0 (0 = all), got -5"),
    ("burn", -3, "burn in (epochs with uniform weights) must be an integer >= 0, got -3"),
    ("lr", -0.1, "lr must be a finite number >= 0"),
    ("beta", -1.0, "beta must be >= 0"),
    ("bs", 5000, "larger than the training set"),
    # issue 14 (F5): accepted before, then the job hung at 0%
    ("steps", 10**6, "attack steps=1000000 is too many for the training attack"),
    ("evals", 10**6, "eval steps=1000000 is too many for the evaluation attack"),
    ("evaln", 10**9, "eval samples=1000000000 is absurd"),
    ("probe", 10**7, "probe size=10000000 is absurd"),
])
def test_invalid_settings_show_an_error_and_submit_nothing(runs, field, value, needle):
    from core import jobs

    at = open_page()
    set_form(at, **{field: value})
    launch_button(at).click().run()
    no_crash(at)
    errors = [e.value for e in at.error]
    assert any(needle in e for e in errors), errors
    assert jobs.list_jobs(runs) == []


def test_cifar_defaults_and_missing_data_is_an_error(runs, tmp_path, monkeypatch):
    from core import jobs

    monkeypatch.setenv("ENERGYLENS_DATA", str(tmp_path / "no-data"))
    at = open_page()
    next(s for s in at.selectbox if s.key.startswith("tr_dataset_")).select("cifar10").run()
    no_crash(at)
    vals = {n.key.split("_")[1]: n.value for n in at.number_input}
    assert vals["eps"] == 8.0 and vals["epochs"] == 100 and vals["lr"] == pytest.approx(0.1)
    assert next(s for s in at.selectbox if s.key.startswith("tr_arch_")).value == "resnet18"
    launch_button(at).click().run()
    no_crash(at)
    assert at.error and "cifar" in at.error[0].value.lower()
    assert jobs.list_jobs(runs) == []


def test_check_button_refuses_absurd_attack_steps(runs):
    """Issue 14 (F5): 'Check settings' said "The settings are valid" for 10**6 attack steps."""
    at = open_page()
    set_form(at, steps=10**6)
    next(b for b in at.button if b.key.startswith("tr_check_")).click().run()
    no_crash(at)
    assert not [s for s in at.success if "The settings are valid" in s.value]
    assert any("attack steps=1000000 is too many" in e.value for e in at.error), [e.value for e in at.error]


def test_check_button_shows_the_cli(runs):
    from core import jobs

    at = open_page()
    next(b for b in at.button if b.key.startswith("tr_check_")).click().run()
    no_crash(at)
    code = "\n".join(c.value for c in at.code)
    assert "python -m core.jobs submit train --config train_config.json" in code
    assert "python -m core.train --config train_config.json" in code
    cfg = json.loads(code.split("<<'EOF'\n", 1)[1].split("\nEOF", 1)[0])
    assert cfg["method"] == "sat" and cfg["dataset"] == "digits" and abs(cfg["eps"] - 16 / 255) < 1e-9
    from core.train import config_from_args

    path = runs.parent / "train_config.json"
    path.write_text(json.dumps(cfg))
    assert config_from_args(["--config", str(path), "--out-dir", str(runs.parent / "x")]).validate().epochs == 15
    assert jobs.list_jobs(runs) == []


@pytest.mark.slow
def test_tiny_launch_runs_and_shows_the_plots(runs):
    from core import jobs

    at = open_page()
    set_form(at, epochs=2, bs=64, limit=128, evaln=32, probe=32, steps=2, evals=2)
    next(s for s in at.selectbox if s.key.startswith("tr_device_")).set_value("cpu")
    next(t for t in at.text_input if t.key.startswith("tr_name_")).input("tiny sat")
    launch_button(at).click().run()
    no_crash(at)
    assert not at.error, [e.value for e in at.error]
    listed = jobs.list_jobs(runs, kind="train")
    assert len(listed) == 1
    job = listed[0]
    assert job.name == "tiny sat" and job.config["epochs"] == 2 and job.config["train_limit"] == 128
    assert any("CLI" in e.label or "command line" in e.label for e in at.expander)

    info = wait_done(job.id)
    assert info.status == "done", (info.error, jobs.read_log_tail(job.id, 40))
    assert len(jobs.read_metrics(job.id)) == 2

    at = open_page()      # a fresh session re-attaches from the registry on disk
    assert not at.error, [e.value for e in at.error]
    figs = charts(at)
    assert "robust test error" in fig3_of(figs).trace_names                              # Fig. 3
    assert any(c.title.endswith("natural → adversarial (Fig. 1 b–d)") for c in figs)     # arrow snapshot
    assert any(a.startswith("WEAT weight of the probe samples") for c in figs for a in c.annotations)
    assert any(c.title.endswith("(Table 2a)") for c in figs)
    assert any("tiny sat" in m.value for m in at.markdown)

    # duplicate-with-changes opens the prefilled form
    next(b for b in at.button if b.key == f"tr_dup_{job.id}").click().run()
    no_crash(at)
    assert any("prefilled" in i.value for i in at.info)
    vals = {n.key.split("_")[1]: n.value for n in at.number_input}
    assert vals["epochs"] == 2 and vals["limit"] == 128 and vals["probe"] == 32

    # delete asks for confirmation first
    next(b for b in at.button if b.key == f"tr_del_{job.id}").click().run()
    assert jobs.list_jobs(runs)                                     # not yet
    next(b for b in at.button if b.key == f"tr_del_yes_{job.id}").click().run()
    no_crash(at)
    assert jobs.list_jobs(runs) == []


# -------------------------------------------------------------------------------------------------
def fake_train_runner(config, run_dir, report):
    """Stands in for core.train.run_job: writes a precomputed SAT-like run (40 epochs, phase 3 from
    epoch 28, WEAT weight statistics) with the trainer's file layout, without torch."""
    run_dir = Path(run_dir)
    (run_dir / "probe").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    n, t3 = int(config.get("epochs", 40)), 28
    lines = []
    for e in range(1, n + 1):
        de = -0.17 * min(1.0, (e - 1) / 4) - 0.5 * max(0, e - t3) / (n - t3) + 0.005 * rng.standard_normal()
        rob = 0.7 - 0.2 * min(1.0, e / 20) + 0.15 * max(0, e - t3) / (n - t3)
        rec = {"epoch": e, "lr": 0.1, "nat_acc": 0.6 + 0.01 * e / n, "pgd_acc": 1 - rob, "nat_err": 0.4 - 0.01 * e / n,
               "rob_err": rob, "dE_mean": de, "dE_q50": de * 0.9, "dEy_mean": de * 1.5, "dEy_q50": de * 1.4,
               "E_nat_mean": -5.0, "E_adv_mean": -5.0 - de, "w_mean": 0.3, "w_std": 0.05, "w_min": 0.2, "w_max": 0.5,
               "train_loss": 1.0, "train_time": 1.0, "probe_time": 0.1}
        lines.append(json.dumps(rec) + "\n")
        if e % 10 == 0 or e == n:
            m = 64
            e_nat = -5 + rng.standard_normal(m)
            arrays = {"e_nat": e_nat, "e_adv": e_nat - 0.3 * rng.random(m), "ej_nat": e_nat + rng.random(m),
                      "ej_adv": e_nat + 2 * rng.random(m), "correct_nat": rng.random(m) > 0.3,
                      "correct_adv": rng.random(m) > 0.6, "labels": rng.integers(0, 10, m), "indices": np.arange(m),
                      "w_probe": 1 / np.log1p(np.exp(np.abs(e_nat)))}
            np.savez_compressed(run_dir / "probe" / f"epoch_{e:04d}.npz", **arrays)
        report(e / n, f"epoch {e}/{n}")
    (run_dir / "metrics.jsonl").write_text("".join(lines))
    (run_dir / "config.json").write_text(json.dumps(config))
    return {"epoch": n}


def test_precomputed_run_renders_all_plots(runs, monkeypatch):
    from core import jobs

    monkeypatch.setenv("ENERGYLENS_EXTRA_KINDS", json.dumps({"train": f"{__file__}:fake_train_runner"}))
    a = jobs.submit("train", {"method": "sat", "dataset": "digits", "epochs": 40}, name="fake sat", device="cpu",
                    runs_dir=runs)
    assert wait_done(a.id, 120).status == "done", jobs.read_log_tail(a.id, 40)
    b = jobs.submit("train", {"method": "trades", "dataset": "digits", "epochs": 20}, name="fake trades",
                    device="cpu", runs_dir=runs)
    assert wait_done(b.id, 120).status == "done", jobs.read_log_tail(b.id, 40)

    at = open_page()
    assert not at.error, [e.value for e in at.error]
    at.selectbox(key="tr_view").set_value(a.id).run()
    no_crash(at)
    figs = charts(at)
    fig3 = fig3_of(figs)
    assert "steep fall from epoch 28" in fig3.annotations           # detected phase 3 is marked
    # phases shaded, named as the paper names them (initial transient, plateau, steep fall)
    assert {"phase 1 · initial transient", "phase 3 · steep fall"} <= set(fig3.annotations)
    assert {"robust test error", "natural test error"} <= set(fig3.trace_names)
    assert any("robust overfitting" in w.value.lower() for w in at.warning)
    assert any(c.title.endswith("(Fig. 1 b–d)") for c in figs)
    weights = chart_with(figs, "WEAT weight of the probe samples")
    assert "training-batch weights per epoch" in weights.annotations  # w_mean/min/max panel
    compare, table2a = chart_with(figs, "several runs"), chart_with(figs, "(Table 2a)")
    assert compare is not table2a
    bars = [str(x) for t in table2a.traces for x in table2a.array(t, "x")]
    for run in ("fake sat", "fake trades"):                         # both runs in both comparison charts
        assert any(run in n for n in compare.trace_names), compare.trace_names
        assert any(run in b for b in bars), bars

    # smoothing keeps the raw line (faint) next to the smoothed one
    at.slider(key="tr_smooth").set_value(0.6).run()
    no_crash(at)
    assert "ΔE(x) (raw)" in fig3_of(charts(at)).trace_names

    # an older arrow snapshot via the epoch slider (the run is finished: no follow mode)
    at.select_slider(key=f"tr_arrow_epoch_{a.id}").set_value(20).run()
    no_crash(at)
    assert any("epoch 20: natural → adversarial" in c.title for c in charts(at))


def test_broken_run_folder_shows_a_message_not_a_traceback(runs, monkeypatch):
    from core import jobs

    monkeypatch.setenv("ENERGYLENS_EXTRA_KINDS", json.dumps({"train": f"{__file__}:fake_train_runner"}))
    a = jobs.submit("train", {"method": "sat", "dataset": "digits", "epochs": 12}, name="broken", device="cpu",
                    runs_dir=runs)
    assert wait_done(a.id, 120).status == "done"
    folder = jobs.job_dir(a.id, runs)
    (folder / "probe" / "epoch_0012.npz").write_bytes(b"not a zip file")
    with open(folder / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 13, "dE_mean": "oops"}\n{"torn line')
    at = open_page()
    no_crash(at)
    assert any("not readable" in e.value for e in at.error)          # the bad snapshot, reported
    fig3_of(charts(at))                                              # Fig. 3 still drawn


def test_run_list_shows_material_icons_and_no_running_time_while_queued(runs, monkeypatch):
    """Issue 13 item 10: status icons are Material icons (emoji render as empty boxes without an emoji font),
    and a queued run says it waits instead of showing a running time."""
    from core import jobs

    fixtures = Path(__file__).resolve().parent / "jobs_fixtures.py"
    monkeypatch.setenv("ENERGYLENS_EXTRA_KINDS", json.dumps({"train": f"{__file__}:fake_train_runner",
                                                              "sleepy": f"{fixtures}:sleepy"}))
    monkeypatch.setenv("ENERGYLENS_MAX_JOBS_PER_DEVICE", "1")
    # holds the cpu slot until the test stops it (not for a fixed time the page check would have to beat)
    jobs.submit("sleepy", {"steps": 10**7, "dt": 0.05}, device="cpu", runs_dir=runs)
    try:
        queued = jobs.submit("train", {"method": "sat", "dataset": "digits", "epochs": 3}, name="waiting run",
                             device="cpu", runs_dir=runs)
        at = open_page()
        line = next(m.value for m in at.markdown if queued.id in m.value)
        assert line.startswith(":material/hourglass_empty: **waiting run**"), line
        assert "waiting for a free slot" in line and "running time" not in line, line
        text = " ".join(m.value for m in at.markdown)
        assert not [c for c in text if ord(c) >= 0x1F000 or c in "⏳⏹✅❌"], "emoji in the page"
    finally:
        for j in jobs.list_jobs(runs):
            if j.active:
                jobs.stop_job(j.id, runs, grace=5)


def test_training_form_can_pick_an_npz_dataset(runs, tmp_path):
    """Issue 13 item 10: the Dataset choice offers 'your own .npz file'; its path becomes dataset npz:<path>,
    which is validated (a missing file is a clear error) and written to the CLI config."""
    from core import jobs

    x = np.random.default_rng(0).integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
    y = np.arange(300) % 10
    path = tmp_path / "mine.npz"
    np.savez(path, x=x, y=y)
    at = open_page()
    ds = next(s for s in at.selectbox if s.key.startswith("tr_dataset_"))
    assert "npz" in ds.options[-1]
    ds.set_value("npz").run()
    no_crash(at)
    box = next(t for t in at.text_input if t.key.startswith("tr_npz_"))
    next(b for b in at.button if b.key.startswith("tr_check_")).click().run()
    assert any("enter the path of your .npz file" in e.value for e in at.error), [e.value for e in at.error]
    box.set_value(str(tmp_path / "missing.npz")).run()
    set_form(at, epochs=2, bs=64)
    next(b for b in at.button if b.key.startswith("tr_check_")).click().run()
    no_crash(at)
    assert any("dataset file not found" in e.value for e in at.error), [e.value for e in at.error]
    next(t for t in at.text_input if t.key.startswith("tr_npz_")).set_value(str(path)).run()
    set_form(at, epochs=2, bs=64)
    next(b for b in at.button if b.key.startswith("tr_check_")).click().run()
    no_crash(at)
    assert not at.error, [e.value for e in at.error]
    assert any("The settings are valid" in s.value for s in at.success)
    code = "\n".join(c.value for c in at.code)
    cfg = json.loads(code.split("<<'EOF'\n", 1)[1].split("\nEOF", 1)[0])
    assert cfg["dataset"] == f"npz:{path}" and cfg["epochs"] == 2
    assert jobs.list_jobs(runs) == []


def test_running_job_shows_batch_progress_eta_and_live_batch_loss(runs, wait_until):
    """A real digits job, viewed while its first epoch runs: a batch counter and an ETA in the progress text and
    the batch-level training loss plot, before any per-epoch ΔE record exists; Stop ends it."""
    from core import jobs
    from core.rundir import RunDir

    at = open_page()
    set_form(at, epochs=3, bs=16, limit=0, evaln=32, probe=32, steps=10, evals=2)
    next(s for s in at.selectbox if s.key.startswith("tr_device_")).set_value("cpu")
    launch_button(at).click().run()
    no_crash(at)
    job = jobs.list_jobs(runs, kind="train")[0]
    try:
        import re
        shown = r"epoch [123]/3 · (batch \d+/89|evaluating).* · ETA ~?\d+m\d\ds"

        def alive(what):
            assert jobs.get_job(job.id).active, jobs.read_log_tail(job.id, 30)
            return what

        # wait for what the page is to show, however slowly it comes: a batch record, then a registry message with
        # a batch counter and an ETA (the registry write is throttled, the ETA needs a measured batch time)
        wait_until(lambda: alive(RunDir(job.run_dir).read_batches()), timeout=300, what="a reported batch")
        wait_until(lambda: alive(re.search(shown, jobs.get_job(job.id).message or "")), timeout=300,
                   what="a batch counter and an ETA in the job's message", detail=lambda: jobs.get_job(job.id).message)
        at.run()
        no_crash(at)
        texts = [p.proto.text for p in at.get("progress")]
        batch_texts = [t for t in texts if "batch " in t or "evaluating" in t]
        assert batch_texts, texts
        assert any(re.search(shown, t) for t in batch_texts), batch_texts
        figs = charts(at)
        live = chart_with(figs, "Training loss by batch")
        loss = live.array(live.trace("training loss"), "y")
        assert loss.size >= 1 and np.isfinite(loss).all() and (loss > 0).all()
        if not jobs.read_metrics(job.id):
            assert any("Waiting for the first epoch" in i.value for i in at.info)
    finally:
        jobs.stop_job(job.id, grace=5.0)
    assert jobs.get_job(job.id).status == "stopped"
