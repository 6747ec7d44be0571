"""The SGLD studio page, driven headlessly with Streamlit's AppTest."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from apptest_helpers import charts

st_testing = pytest.importorskip("streamlit.testing.v1")
AppTest = st_testing.AppTest

REPO = Path(__file__).resolve().parents[1]
HOME = REPO / "dashboard" / "Home.py"
PAGE = "../pages/sgld.py"


@pytest.fixture
def app(tmp_path, monkeypatch):
    monkeypatch.setenv("ENERGYLENS_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("ENERGYLENS_CACHE", str(tmp_path / "cache"))
    at = AppTest.from_file(str(HOME), default_timeout=120)
    at.run()
    at.switch_page(PAGE).run()
    assert not at.exception, [e.message for e in at.exception]
    # prefer the bundled robust model when it is there (the default is the first bundled one)
    pick = at.sidebar.selectbox(key="pick-Bundled")
    sat = [i for i, lab in enumerate(pick.options) if str(lab).startswith("digits-sat")]
    if sat:
        pick.select_index(sat[0]).run()
    at.number_input(key="sgld_chains").set_value(2).run()
    at.multiselect(key="sgld_classes").set_value([0, 1, 2]).run()
    return at


def _ok(at):
    assert not at.exception, [e.message for e in at.exception]


def _sampler(at):
    return at.session_state["sgld_sampler"]


def _run_until(at, cond, timeout=180.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        time.sleep(0.5)
        at.run()
        _ok(at)
        if cond():
            return
    raise AssertionError("timed out waiting for the page")


def test_initialise_step_plot_and_bad_input(app):
    at = app
    assert not at.get("image")
    at.button(key="sgld_btn_init").click().run()
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
    at.button(key="sgld_btn_init").click().run()
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
    assert j.result["metrics"]["features"].startswith("classifier:")
    assert j.result["n_samples"] == 3 * 4 and j.result["config"]["steps"] == 3
    assert Path(j.result["samples"]).is_file()
    at.run()
    _ok(at)
    assert any("features" in (m.value or "") for m in at.markdown)
