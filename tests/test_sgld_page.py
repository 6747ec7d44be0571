"""The SGLD studio page, driven headlessly with Streamlit's AppTest."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from apptest_helpers import charts, open_page

st_testing = pytest.importorskip("streamlit.testing.v1")
AppTest = st_testing.AppTest

REPO = Path(__file__).resolve().parents[1]
HOME = REPO / "dashboard" / "Home.py"
PAGE = "sgld"  # key in dashboard/navigation.py


@pytest.fixture
def app(runs_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ENERGYLENS_CACHE", str(tmp_path / "cache"))
    at = AppTest.from_file(str(HOME), default_timeout=120)
    at.run()
    open_page(at, PAGE)
    assert not at.exception, [e.message for e in at.exception]
    # prefer the bundled robust model when it is there (the default is the first bundled one)
    pick = at.sidebar.selectbox(key="pick-Bundled")
    sat = [i for i, lab in enumerate(pick.options) if str(lab).startswith("digits-sat")]
    if sat:
        pick.select_index(sat[0]).run()
    at.number_input(key="sgld_chains").set_value(2).run()
    at.multiselect(key="sgld_classes").set_value([0, 1, 2]).run()
    # these tests count steps: the stopping rule (on by default) would end the digits chains early
    at.checkbox(key="sgld_stop").set_value(False).run()
    return at


def _ok(at):
    assert not at.exception, [e.message for e in at.exception]


def _sampler(at):
    return at.session_state["sgld_sampler"]


def _initialise(at, timeout=180.0):
    """Press Initialise; while the page still prepares the start statistics in the background, the chains
    appear a few reruns later (the init task's progress bar shows meanwhile)."""
    at.button(key="sgld_btn_init").click().run()
    _ok(at)
    t0 = time.time()
    while "sgld_sampler" not in at.session_state and time.time() - t0 < timeout:
        time.sleep(0.25)
        at.run()
        _ok(at)
    assert "sgld_sampler" in at.session_state, [e.value for e in at.error]


def _run_until(at, cond, timeout=180.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        time.sleep(0.5)
        at.run()
        _ok(at)
        if cond():
            return
    raise AssertionError("timed out waiting for the page")


@pytest.mark.parametrize("setup,needle", [
    (lambda at: at.number_input(key="sgld_chains").set_value(65), "chains per class must be at most 64"),
    (lambda at: at.multiselect(key="sgld_classes").set_value([]), "choose at least one class"),
    (lambda at: at.number_input(key="sgld_gamma").set_value(-0.1), "noise γ"),
])
def test_initialise_refuses_bad_settings_with_core_messages(app, setup, needle):
    """The page's refusals come from core.sampling.validate_sampler_settings: an error, no chains, no task."""
    at = app
    setup(at)
    at.run()
    at.button(key="sgld_btn_init").click().run()
    _ok(at)
    assert any(needle in e.value for e in at.error), [e.value for e in at.error]
    assert "sgld_sampler" not in at.session_state and "sgld_init_task" not in at.session_state


def test_initialise_step_plot_and_bad_input(app):
    at = app
    assert not at.get("image")
    _initialise(at)
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    assert _sampler(at).steps_done == 0 and _sampler(at).n_chains == 6
    assert len(at.get("image")) >= 1
    at.button(key="sgld_btn_step10").click().run()
    _ok(at)
    assert _sampler(at).steps_done == 10
    at.button(key="sgld_btn_step1").click().run()
    assert _sampler(at).steps_done == 11
    figs = charts(at)
    assert figs
    names = set(figs[0].trace_names)
    assert {"target E(x, y)", "other classes E(x, y′)", "marginal E(x)", "Ē(x, y) of real images"} <= names
    assert any(m.label == "Steps" and m.value == "11" for m in at.metric)
    img_before = _sampler(at).images()

    # invalid step size: an error, and the chains and images are kept
    at.number_input(key="sgld_eta").set_value(0.0).run()
    at.button(key="sgld_btn_step10").click().run()
    _ok(at)
    assert any("η" in e.value for e in at.error)
    assert _sampler(at).steps_done == 11 and (_sampler(at).images() == img_before).all()
    assert len(at.get("image")) >= 1

    at.number_input(key="sgld_eta").set_value(1.0).run()
    at.number_input(key="sgld_zeta").set_value(1.0).run()
    at.button(key="sgld_btn_step1").click().run()
    assert any("ζ" in e.value for e in at.error) and _sampler(at).steps_done == 11
    at.number_input(key="sgld_zeta").set_value(0.5).run()
    at.number_input(key="sgld_n").set_value(0).run()
    at.button(key="sgld_btn_run").click().run()
    assert any("steps" in e.value for e in at.error) and _sampler(at).steps_done == 11

    at.button(key="sgld_btn_reset").click().run()
    _ok(at)
    assert _sampler(at).steps_done == 0

    # per-class energy plot
    at.selectbox(key="sgld_plot_cls").set_value("1").run()
    _ok(at)
    assert at.get("plotly_chart")


def test_run_in_background_and_cancel_keeps_images(app):
    at = app
    _initialise(at)
    at.number_input(key="sgld_n").set_value(15).run()
    at.button(key="sgld_btn_run").click().run()
    _run_until(at, lambda: at.session_state["sgld_task"].done and _sampler(at).steps_done == 15)
    at.run()
    _ok(at)
    assert not at.error and len(at.get("image")) >= 1

    # a long run, cancelled: the steps made so far stay
    at.number_input(key="sgld_n").set_value(20_000).run()
    at.button(key="sgld_btn_run").click().run()
    task = at.session_state["sgld_task"]
    assert not task.done
    task.cancel_event.set()
    _run_until(at, lambda: at.session_state["sgld_task"].done)
    at.run()
    s = _sampler(at)
    assert 15 < s.steps_done < 15 + 20_000
    assert any("Cancelled" in e.value for e in at.error)
    assert len(at.get("image")) >= 1 and s.trace.steps[-1] == s.steps_done


def test_compare_initialisations(app):
    at = app
    at.number_input(key="sgld_n").set_value(5).run()
    at.button(key="sgld_btn_cmp").click().run()
    _run_until(at, lambda: at.session_state["sgld_cmp_task"].done)
    at.run()
    _ok(at)
    cmp = at.session_state["sgld_compare"]
    assert set(cmp) == {"random", "gaussian", "pca"}
    assert all(int(r["summary"]["step"][-1]) == 5 for r in cmp.values())
    assert len(at.get("image")) >= 6     # start + result for each initialisation
    assert any(n.startswith("pca") for c in charts(at) for n in c.trace_names)


@pytest.mark.slow
def test_batch_job_runs_and_reports_labelled_metrics(app, tmp_path):
    jobs = pytest.importorskip("core.jobs")
    at = app
    # widgets inside a form take effect together with the submit click
    at.number_input(key="sgld_job_n").set_value(4)
    at.number_input(key="sgld_job_steps").set_value(3)
    at.selectbox(key="sgld_job_feats").set_value("classifier")
    at.button(key="FormSubmitter:sgld_job_form-Launch batch job").click().run()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    assert any("Queued SGLD job" in s.value for s in at.success)
    js = jobs.list_jobs(kind="sgld")
    assert len(js) == 1
    t0 = time.time()
    while jobs.get_job(js[0].id).active and time.time() - t0 < 300:
        time.sleep(1)
    j = jobs.get_job(js[0].id)
    assert j.status == "done", (j.error, jobs.read_log_tail(j.id, 40))
    # the default feature classifier is an independent one of the same data, never the generating model
    gen = at.session_state["model_ref"].name
    assert j.result["metrics"]["features"].startswith("classifier:digits-")
    assert j.result["metrics"]["features"] != f"classifier:{gen}"
    assert j.result["n_samples"] == 3 * 4 and j.result["config"]["steps"] == 3
    assert Path(j.result["samples"]).is_file()
    at.run()
    _ok(at)
    assert any("features" in (m.value or "") for m in at.markdown)
    floor = j.result["metrics"]["FID_floor"]
    assert any(f"real vs real: **{floor:.2f}** at n = 12" in (m.value or "") for m in at.markdown), \
        [m.value for m in at.markdown]


def test_step_defaults_follow_the_models_dataset_family(runs_dir, tmp_path, monkeypatch):
    """A CIFAR-10 model gets η = 0.025, ζ = 0.8 (the digits' η = 1 makes CIFAR chains worse); digits keep theirs."""
    import torch

    from core.models import ModelMeta, build_model, save_checkpoint

    runs = runs_dir
    (runs / "c10").mkdir(parents=True)
    torch.manual_seed(0)
    save_checkpoint(runs / "c10" / "best.safetensors", build_model("smallcnn", 10),
                    ModelMeta(arch="smallcnn", num_classes=10, dataset="cifar10", method="sat", name="c10-sat"))
    monkeypatch.setenv("ENERGYLENS_CACHE", str(tmp_path / "cache"))
    at = AppTest.from_file(str(HOME), default_timeout=120)
    at.run()
    open_page(at, PAGE)
    _ok(at)

    def pick_bundled(prefix):
        box = at.sidebar.selectbox(key="pick-Bundled")
        box.select_index(next(i for i, lab in enumerate(box.options) if str(lab).startswith(prefix))).run()
        _ok(at)
        assert at.session_state["model_ref"].name == prefix

    from core import sampling as S

    pick_bundled("digits-sat")
    assert at.number_input(key="sgld_eta").value == 1.0 and at.number_input(key="sgld_zeta").value == 0.5
    # the steps and the stopping rule the page starts with are core's (sgld_defaults)
    d = S.sgld_defaults(dataset="digits")
    assert at.number_input(key="sgld_n").value == d["steps"]
    assert at.checkbox(key="sgld_stop").value is d["stop_at_reference"] is True
    at.sidebar.radio(key="model_source").set_value("Local checkpoints").run()
    _ok(at)
    assert at.session_state["model_ref"].name.endswith("best")
    assert at.number_input(key="sgld_eta").value == 0.025 and at.number_input(key="sgld_zeta").value == 0.8
    assert at.number_input(key="sgld_gamma").value == 0.001
    assert at.number_input(key="sgld_n").value == S.sgld_defaults(dataset="cifar10")["steps"]
    at.sidebar.radio(key="model_source").set_value("Bundled").run()   # (the sidebar pick starts over)
    pick_bundled("digits-sat")
    assert at.number_input(key="sgld_eta").value == 1.0
    at.number_input(key="sgld_eta").set_value(0.5).run()            # an edit within a family is kept
    pick_bundled("digits-plain")
    assert at.number_input(key="sgld_eta").value == 0.5


def test_energy_plot_marks_when_the_chain_passed_the_real_data_level(app):
    at = app
    at.checkbox(key="sgld_stop").set_value(True).run()      # the default: each chain stops at its class's Ē(x, y)
    _initialise(at)
    at.number_input(key="sgld_n").set_value(40).run()
    at.button(key="sgld_btn_run").click().run()
    _run_until(at, lambda: at.session_state["sgld_task"].done)
    at.run()
    _ok(at)
    s = _sampler(at)
    rep = s.stop_report()
    assert rep["rule"] == "on" and rep["stopped"] >= 1                    # digits-sat, η = 1: chains reach Ē fast
    assert s.steps_done == 40 or rep["stopped"] == s.n_chains             # a run ends early only when all stopped
    assert any(m.label == "Stopped at Ē(x, y)" and m.value == f"{rep['stopped']}/{s.n_chains}" for m in at.metric)
    assert any("Within-class diversity" in c.value and "for real images" in c.value for c in at.caption), \
        [c.value for c in at.caption]
    from core import sampling as S
    from core.data import load_dataset

    ref = S.reference_energies(s.model, load_dataset("digits", "train"), s.classes)
    passed = s.trace.passed_reference(ref)
    assert passed["step"] is not None, passed          # digits-sat, η = 1: the chains pass Ē(x, y) within 40 steps
    spec = json.loads(next(c for c in at.get("plotly_chart") if "Fig. 5e" in c.proto.spec).proto.spec)
    marker = [t for t in spec["data"] if (t.get("name") or "").startswith("below Ē(x, y) from step")]
    assert marker and marker[0]["x"] == [passed["step"]]
    assert any(sh.get("type") == "line" and sh.get("x0") == passed["step"] for sh in spec["layout"].get("shapes", []))
    assert any(f"passed the real-image level Ē(x, y) at step {passed['step']}" in c.value for c in at.caption)


def test_initialise_waits_for_the_background_statistics_off_the_script_thread(app, monkeypatch, wait_until):
    """While the shared preparation of the start statistics is still running, Initialise answers at once with a
    progress bar (the buttons held) and the chains appear when the preparation ends."""
    from core import sgld_cache

    at = app
    lm = at.session_state["model_ref"]
    real = sgld_cache.warmups()
    assert real, lm
    for w in real.values():                               # every model's preparation (the digits one among them)
        assert w.wait(timeout=120)                        # ends; from now on pretend it is still running
    fakes = [sgld_cache.Warmup("still-running", fraction=0.4, message="class statistics 5/10")]
    waits = []                                                        # (thread, timeout) of every wait on it
    real_wait = fakes[0].wait

    def recorded_wait(timeout=None, progress=None):
        waits.append((threading.current_thread(), timeout))
        return real_wait(timeout=timeout, progress=progress)

    monkeypatch.setattr(fakes[0], "wait", recorded_wait)
    monkeypatch.setattr(sgld_cache, "warm_up", lambda *a, **k: fakes[0])
    at.run()
    at.button(key="sgld_btn_init").click().run()                     # returns: the preparation never ends by itself
    _ok(at)
    assert "sgld_sampler" not in at.session_state
    task = at.session_state["sgld_init_task"]
    assert task.done is False
    # the unbounded wait for the preparation runs in the task's thread; the script thread only ever waits with a
    # bound (the 1 s grace), so a rerun is a rerun + the grace, not the preparation (counted, not timed)
    wait_until(lambda: any(th is task.thread for th, _ in waits), what="the task's wait for the preparation")
    assert all(t is None for th, t in waits if th is task.thread), waits
    script_waits = [t for th, t in waits if th is not task.thread]
    assert script_waits and all(t is not None and t <= 1.0 for t in script_waits), waits
    at.run()
    assert at.button(key="sgld_btn_step10").disabled                  # busy while it waits
    assert any("preparing the start statistics" in (p.proto.text or "") for p in at.get("progress")), \
        [p.proto.text for p in at.get("progress")]
    for slow in fakes:
        slow.finish()
    _run_until(at, lambda: "sgld_sampler" in at.session_state or at.session_state["sgld_init_task"].error)
    assert not at.session_state["sgld_init_task"].error, at.session_state["sgld_init_task"].error
    assert _sampler(at).steps_done == 0 and _sampler(at).n_chains == 6
    assert "initialised in" in at.session_state["sgld_last"]
