"""Issue 27: the app is as fast as its engine (no forced full GC after each poll, polling that backs off) and the
defects a teacher met on the tour stay fixed."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [REPO / ".streamlit" / "config.toml", REPO / "dashboard" / ".streamlit" / "config.toml"]


# ---------------------------------------------------------------------------------------------------- item 1
@pytest.mark.parametrize("path", CONFIGS, ids=["repo-root", "dashboard"])
def test_config_turns_off_the_forced_gc_after_each_rerun(path):
    cfg = tomllib.loads(path.read_text())
    assert cfg.get("runner", {}).get("postScriptGC") is False, \
        "runner.postScriptGC must be false: a gc.collect(2) after every 0.5 s poll starves the worker thread"


def test_a_server_started_from_the_repo_root_reads_the_setting():
    """Tests and benchmarks start `streamlit run dashboard/Home.py` with the repository root as the working
    directory: the option streamlit resolves there is the project's, not the default (true)."""
    code = "import streamlit.config as c; print(c.get_option('runner.postScriptGC'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_poll_interval_backs_off_and_never_shortens():
    sys.path.insert(0, str(REPO / "dashboard"))
    import common

    seq = [common.poll_every(t) for t in (0.0, 1.0, 4.9, 5.0, 20.0, 29.9, 30.0, 600.0, 1e6)]
    assert seq[0] == 0.5, "a young task is polled often, so quick actions answer quickly"
    assert seq == sorted(seq), seq
    assert seq[-1] >= 1.0 and seq[-1] <= 2.0, "a long task is polled every 1-2 s"


def _panel_script():
    import time

    import common
    import streamlit as st

    if "t" not in st.session_state:
        t = common.Task("long work")
        t.started = time.time() - st.session_state.get("_age", 0.0)
        st.session_state["t"] = t
    common.task_panel("t", lambda task: None)


@pytest.mark.parametrize("age, expected", [(0.0, 0.5), (100.0, 2.0)])
def test_task_panel_polls_a_long_task_less_often(monkeypatch, age, expected):
    """The progress fragment of a task running for ``age`` s is defined with the backed-off interval (before the
    fix: 0.5 s for ever)."""
    sys.path.insert(0, str(REPO / "dashboard"))
    import common

    seen = []
    real = common.st.fragment

    def recording_fragment(func=None, *, run_every=None, **kw):
        seen.append(run_every)
        return real(func, run_every=run_every, **kw) if func is not None else real(run_every=run_every, **kw)

    monkeypatch.setattr(common.st, "fragment", recording_fragment)
    at = AppTest.from_function(_panel_script, default_timeout=60)
    at.session_state["_age"] = age
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert seen == [expected], seen


# ---------------------------------------------------------------------------------------------------- item 6
HOME = str(REPO / "dashboard" / "Home.py")


@pytest.fixture
def sgld_app(runs_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ENERGYLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ENERGYLENS_UMAP_WARMUP", "0")
    at = AppTest.from_file(HOME, default_timeout=180)
    at.run()
    return at


def test_tour_values_on_the_sgld_page_raise_no_widget_warning(sgld_app, monkeypatch):
    """Tour step 7 sets sgld_classes and sgld_chains through session state: the widgets must not also get a
    default (Streamlit then logs 'created with a default value but also had its value set via the Session State
    API')."""
    import logging

    from streamlit.elements.lib import policies

    monkeypatch.setattr(policies, "_shown_default_value_warning", False)
    seen: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    sys.path.insert(0, str(REPO / "dashboard"))
    import dataclasses

    import tour

    k = next(i for i, s in enumerate(tour.STEPS) if s.page == "sgld")
    step = tour.STEPS[k]
    assert {"sgld_classes", "sgld_chains"} <= set(step.widgets)
    # the step as the tour defines it, without pressing Initialise for us (PCA statistics are slow on a CPU)
    quiet = dataclasses.replace(step, widgets={kk: v for kk, v in step.widgets.items() if kk != "sgld_autorun"})
    monkeypatch.setattr(tour, "STEPS", tour.STEPS[:k] + [quiet] + tour.STEPS[k + 1:])
    h = Grab()
    policies._LOGGER.addHandler(h)
    try:
        at = sgld_app
        at.button(key=f"tour_go_{k}").click().run()      # the tour's button: its callback sets the widgets' keys
        assert not at.exception, [e.message for e in at.exception]
    finally:
        policies._LOGGER.removeHandler(h)
    assert not [m for m in seen if "default value" in m], seen
    assert at.multiselect(key="sgld_classes").value == step.widgets["sgld_classes"]
    assert at.number_input(key="sgld_chains").value == step.widgets["sgld_chains"]


def test_sgld_downloads_are_eager_files_not_deferred_callables(sgld_app):
    """A deferred download (a callable as data) is dropped by the next rerun: three quick clicks failed with
    MediaFileStorageError. Every SGLD download carries its file; a click does not rerun the page."""
    at = sgld_app
    pick = at.sidebar.selectbox(key="pick-Bundled")
    digits = [o for o in pick.options if str(o).startswith("digits-sat")]
    if digits:
        pick.set_value(digits[0]).run()
    at.switch_page("../pages/sgld.py").run()
    at.selectbox(key="sgld_init_kind").set_value("random").run()
    at.multiselect(key="sgld_classes").set_value([0]).run()
    at.number_input(key="sgld_chains").set_value(1).run()
    at.button(key="sgld_btn_init").click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert "sgld_sampler" in at.session_state
    buttons = [e.proto for e in at.get("download_button")]
    labels = {b.label for b in buttons}
    assert {"Download grid (PNG)", "Download samples (.npz)", "Download energy trace (CSV)"} <= labels, labels
    for b in buttons:
        assert not b.HasField("deferred_file_id"), f"{b.label}: deferred download"
        assert b.url, f"{b.label}: no file"
        assert b.ignore_rerun, f"{b.label}: a click reruns the page"


# ---------------------------------------------------------------------------------------------------- items 4, 5
def _attack_app(runs_dir_unused=None) -> AppTest:
    import streamlit as st

    st.cache_data.clear()
    at = AppTest.from_file(HOME, default_timeout=180)
    at.run()
    at.switch_page("../pages/attack_lab.py").run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def _press(at: AppTest, label: str) -> AppTest:
    next(b for b in at.button if b.label == label).click().run()
    return at


def _wait(at: AppTest, cond, timeout: float = 300.0) -> AppTest:
    from conftest import wait_until

    def step():
        at.run()
        assert not at.exception, [e.message for e in at.exception]
        return cond()

    wait_until(step, timeout=timeout, what="the page", every=0.3)
    at.run()
    return at


def _png(seed: int = 0) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_tour_step_1_shows_the_natural_energy_scatter_over_an_earlier_result(runs_dir, monkeypatch):
    from apptest_helpers import charts

    monkeypatch.setenv("ENERGYLENS_UMAP_WARMUP", "0")
    at = _attack_app()
    at.number_input(key="atk_n").set_value(8)
    _press(at, "Run attack")
    _wait(at, lambda: "atk_result" in at.session_state)
    at.switch_page("../pages/home.py").run()
    at.button(key="tour_go_0").click().run()          # tour step 1: "Each dot is a CIFAR-10 test image ..."
    assert not at.exception, [e.message for e in at.exception]
    assert at.session_state["tour_step"] == 0 and "atk_result" in at.session_state
    titles = [c.title for c in charts(at)]
    assert any(t.startswith("Natural energies of the chosen test images") for t in titles), titles
    assert any(t.startswith("Energy drift") for t in titles), "the earlier result stays below"


def test_a_refused_upload_clears_the_previous_result_and_disables_the_upload_attack(runs_dir, monkeypatch):
    monkeypatch.setenv("ENERGYLENS_UMAP_WARMUP", "0")
    at = _attack_app()
    label = "Attack my uploaded image (below) with these settings"
    at.number_input(key="atk_steps").set_value(2)
    at.file_uploader(key="atk_upload").upload("x.png", _png(), "image/png").run()
    assert not next(b for b in at.button if b.label == label).disabled
    _press(at, label)
    _wait(at, lambda: at.session_state["atk_upload_task"].done)
    assert at.session_state["atk_upload_result"] is not None
    at.file_uploader(key="atk_upload").upload("broken.png", b"\x89PNG\r\n\x1a\n not an image", "image/png").run()
    assert not at.exception, [e.message for e in at.exception]
    assert at.error, "the refusal is shown"
    assert at.session_state["atk_upload_result"] is None if "atk_upload_result" in at.session_state else True
    assert not [m for m in at.markdown if "ε = 8/255, 2 steps" in m.value], "the previous image's result is gone"
    assert not [i for i in at.get("imgs")], "no image of the previous upload is shown"
    assert next(b for b in at.button if b.label == label).disabled, "a refused file cannot be attacked"


def test_an_attack_that_outlasts_its_script_run_finishes_over_an_earlier_result(runs_dir, monkeypatch):
    """The background attack calls the page's `who(meta)` when it ends; the results block of the same script run
    (drawn while the attack still runs, over the earlier result) rebound `who` to a caption string, so any attack
    slower than the page (APGD-T, FAB, Square over an earlier PGD result) failed with "'str' object is not
    callable" and never showed. The attack is held until the script run has ended."""
    import threading

    import core.attacks as attacks

    monkeypatch.setenv("ENERGYLENS_UMAP_WARMUP", "0")
    release = threading.Event()
    release.set()
    real = attacks.run_attack

    def held(*a, **kw):
        assert release.wait(300)
        return real(*a, **kw)

    monkeypatch.setattr(attacks, "run_attack", held)
    at = _attack_app()
    at.number_input(key="atk_n").set_value(8)
    at.number_input(key="atk_steps").set_value(2)
    _press(at, "Run attack")
    _wait(at, lambda: len(at.session_state["atk_history"] if "atk_history" in at.session_state else {}) == 1)
    release.clear()
    _press(at, "Run attack")                     # the run ends (results drawn) while the attack waits
    assert at.session_state["atk_task"].done is False
    release.set()
    _wait(at, lambda: at.session_state["atk_task"].done)
    assert not at.session_state["atk_task"].error, at.session_state["atk_task"].error
    assert len(at.session_state["atk_history"]) == 2


# ---------------------------------------------------------------------------------------------------- item 3
def _session_on(model_prefix: str, page: str, monkeypatch, tmp_path) -> AppTest:
    monkeypatch.setenv("ENERGYLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ENERGYLENS_UMAP_WARMUP", "0")
    at = AppTest.from_file(HOME, default_timeout=180)
    at.run()
    pick = at.sidebar.selectbox(key="pick-Bundled")
    name = next(o for o in pick.options if str(o).startswith(model_prefix))
    pick.set_value(name).run()
    at.switch_page(page).run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def _reload(at: AppTest, page: str) -> AppTest:
    """A page reload: a new Streamlit session with the same ?s=<id> in the URL (the sidebar opens on its default)."""
    sid = at.session_state["_persist_sid"]
    new = AppTest.from_file(HOME, default_timeout=180)
    new.query_params["s"] = sid
    new.run()
    assert new.sidebar.selectbox(key="pick-Bundled").value != at.sidebar.selectbox(key="pick-Bundled").value, \
        "the test needs a model other than the default"
    new.switch_page(page).run()
    assert not new.exception, [e.message for e in new.exception]
    return new


def test_sgld_chains_come_back_after_a_reload_with_their_model(runs_dir, monkeypatch, tmp_path):
    at = _session_on("digits-sat", "../pages/sgld.py", monkeypatch, tmp_path)
    at.selectbox(key="sgld_init_kind").set_value("random").run()
    at.multiselect(key="sgld_classes").set_value([3]).run()
    at.number_input(key="sgld_chains").set_value(2).run()
    at.button(key="sgld_btn_init").click().run()
    at.button(key="sgld_btn_step10").click().run()
    done = at.session_state["sgld_sampler"].steps_done
    assert 0 < done <= 10   # fewer when every chain reached its class's reference energy first (the stopping rule)
    model = at.sidebar.selectbox(key="pick-Bundled").value
    new = _reload(at, "../pages/sgld.py")
    assert new.sidebar.selectbox(key="pick-Bundled").value == model, "the reload restores the chains' model"
    s = new.session_state["sgld_sampler"]
    assert s.steps_done == done and list(s.classes) == [3]
    assert any(model in i.value for i in new.info), [i.value for i in new.info]


def test_sample_analysis_comes_back_after_a_reload_with_its_model(runs_dir, monkeypatch, tmp_path):
    at = _session_on("digits-sat", "../pages/analysis.py", monkeypatch, tmp_path)
    at.selectbox(key="ana_split").set_value("test")
    at.number_input(key="ana_n").set_value(60)
    next(b for b in at.button if b.label == "Analyse").click().run()
    _wait(at, lambda: "ana_result" in at.session_state)
    before = at.session_state["ana_result"]
    new = _reload(at, "../pages/analysis.py")
    assert new.sidebar.selectbox(key="pick-Bundled").value == at.sidebar.selectbox(key="pick-Bundled").value
    r = new.session_state["ana_result"]
    assert r["model"] == before["model"] and r["split"] == "test" and r["stats"].n == 60
    assert (r["stats"].e_xy == before["stats"].e_xy).all()
    assert [m for m in new.metric if m.label == "Images" and m.value == "60"]


def test_embedding_features_come_back_after_a_reload_with_their_model(runs_dir, monkeypatch, tmp_path):
    at = _session_on("digits-sat", "../pages/embeddings.py", monkeypatch, tmp_path)
    at.number_input(key="emb_n").set_value(40)
    at.checkbox(key="emb_adv").uncheck()
    next(b for b in at.button if b.label == "Compute features").click().run()
    _wait(at, lambda: "emb_data" in at.session_state)
    before = at.session_state["emb_data"]
    new = _reload(at, "../pages/embeddings.py")
    assert new.sidebar.selectbox(key="pick-Bundled").value == at.sidebar.selectbox(key="pick-Bundled").value
    d = new.session_state["emb_data"]
    assert d["model"] == before["model"] and len(d["energy"]) == 40
    assert abs(d["pca"] - before["pca"]).max() < 1e-6
    assert abs(d["x"] - before["x"]).max() <= 0.5 / 255 + 1e-6


# ---------------------------------------------------------------------------------------------------- item 2 (tour 5)
def test_tour_fig3_step_lands_on_the_chart_and_its_sentences_agree(runs_dir, monkeypatch):
    monkeypatch.setenv("ENERGYLENS_UMAP_WARMUP", "0")
    sys.path.insert(0, str(REPO / "dashboard"))
    import tour

    from core import overfitting
    from core.recorded import list_recorded

    k = next(i for i, s in enumerate(tour.STEPS) if s.page == "training" and "Fig. 3" in s.title)
    at = AppTest.from_file(HOME, default_timeout=300)
    at.run()
    at.button(key=f"tour_go_{k}").click().run()
    assert not at.exception, [e.message for e in at.exception]
    heads = [h.value for h in at.subheader]
    fig3 = next(i for i, h in enumerate(heads) if h.startswith("Fig. 3 on real images"))
    assert fig3 < heads.index("New training run"), f"the chart comes first under the tour banner: {heads}"
    texts = [e.value for kind in ("warning", "info", "caption", "markdown") for e in getattr(at, kind)]
    assert not [t for t in texts if "No robust overfitting detected" in t or "rose again (robust overfitting)" in t]
    # the run the step opens: one verdict, from core.overfitting, under its ΔE chart
    view = at.session_state["tr_view"]
    run = next(r for r in list_recorded() if r.id == view)
    from core.rundir import RunDir

    recs = RunDir(run.run_dir).read_metrics()
    o = overfitting.summarize(recs, run.config.get("method"), run.config.get("eval_samples"))
    verdict = overfitting.sentence(o)
    assert sum(t.startswith(verdict) for t in texts) >= 1, "the run's verdict is shown"
    phase_lines = [t for t in texts if t.startswith("ΔE(x) of the training data:")]
    assert phase_lines and all("initial transient" in t for t in phase_lines), phase_lines
    if o.phase3_start is not None:
        assert any("phase 3 (steep fall" in t for t in phase_lines)


# ---------------------------------------------------------------------------------------------------- item 7 polish
def _figs():
    sys.path.insert(0, str(REPO / "dashboard"))
    import analysis_figures as af
    import figures as fig

    return fig, af


def test_arrows_hover_names_true_and_predicted_class_and_side_by_side_share_one_colour_scale():
    import numpy as np

    fig, _ = _figs()
    e = np.array([1.0, 2.0, 3.0])
    f = fig.energy_arrows(e, e + 1, e - 0.5, e + 2, labels=["cat", "dog", "ship"], pred_nat=["cat", "cat", "ship"],
                          pred_adv=["frog", "cat", "bird"], drift_max=7.5)
    pts = next(t for t in f.data if t.name == "drift")
    assert "true dog" in pts.text[2] and "predicted cat → cat" in pts.text[2], pts.text[2]
    assert "true ship" in pts.text[4] and "→ bird" in pts.text[4]
    assert pts.marker.cmax == 7.5 and pts.marker.cmin == 0
    nat = fig.natural_energies(e, e + 1, ["cat", "dog", "cat"], preds=["cat", "cat", "dog"])
    tmpl = " ".join(t.hovertemplate for t in nat.data if t.hovertemplate)
    assert "true cat" in tmpl and "predicted %{customdata[1]}" in tmpl
    cat = next(t for t in nat.data if t.name == "cat")
    assert [list(r) for r in cat.customdata] == [["0", "cat", ""], ["2", "dog", " (misclassified)"]]


def test_zero_loss_and_zero_lines_are_not_black_so_dark_mode_shows_them():
    import numpy as np

    fig, af = _figs()
    e = np.array([1.0, 2.0])
    for f in (fig.energy_arrows(e, e + 1, e, e + 2), fig.natural_energies(e, e + 1, ["a", "b"])):
        line = next(t for t in f.data if t.name and t.name.startswith("zero loss"))
        assert line.line.color not in ("black", "#000", "#000000")


def test_step_curve_does_not_put_steps_and_queries_on_one_axis():
    import numpy as np

    fig, _ = _figs()
    pgd = {"step": np.arange(11), "mean": np.zeros(11), "std": np.zeros(11)}
    sq = {"step": np.array([0, 300]), "mean": np.zeros(2), "std": np.zeros(2)}
    f = fig.step_curve({"m · PGD, Linf ε = 8/255, 10 steps (1)": pgd, "m · Square, Linf ε = 8/255, 300 queries (2)": sq})
    xs = [np.asarray(t.x, float) for t in f.data if t.mode == "lines+markers"]
    assert all(x.max() <= 1.0 + 1e-9 for x in xs), "both runs on the share of their own budget"
    assert "budget" in f.layout.xaxis.title.text
    only = fig.step_curve({"m · PGD, 10 steps (1)": pgd})
    assert only.layout.xaxis.title.text == "attack step" and np.asarray(only.data[1].x).max() == 10


def test_analysis_axis_reads_in_words_and_landscape_labels_take_turns():
    import numpy as np

    _, af = _figs()
    f = af.pm_scatter(np.array([0.1, -0.2]), np.array([1.0, 2.0]), np.array([True, False]), "E(x, y)")
    title = f.layout.yaxis.title.text
    assert "max_{" not in title and "p_y" not in title and "probabilistic margin" in title
    rows = [{"model": f"m{i}", "robust_acc": 0.3 + 0.001 * i, "dE_abs_mean": 1.0, "dE_std": 0.1, "dEy_abs_mean": 1.0}
            for i in range(3)]
    t = af.landscape_trend(rows).data[0]
    assert len(set(t.textposition)) == 3, t.textposition


def test_sample_analysis_hint_names_the_selected_dataset(runs_dir, monkeypatch):
    monkeypatch.setenv("ENERGYLENS_UMAP_WARMUP", "0")
    at = AppTest.from_file(HOME, default_timeout=180)
    at.run()
    at.switch_page("../pages/analysis.py").run()
    assert not at.exception, [e.message for e in at.exception]
    ds = at.session_state["model_ref"].name
    hint = " ".join(i.value for i in at.info)
    meta_ds = "cifar10-demo" if ds.startswith("cifar10-demo") else "digits"
    assert meta_ds in hint and "digits training set (1,438" not in hint, hint
    assert "measured" in hint or "timed" in hint or "not available" in hint, "time promises come from a measurement"
