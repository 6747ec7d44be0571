"""AppTest of the analysis pages: Energy landscape, Sample analysis, Embedding explorer, Evaluation.

Everything runs from the entry script ``dashboard/Home.py``; jobs go to a temporary runs folder
(``ENERGYLENS_RUNS``) and the landscape cache to a temporary folder (``ENERGYLENS_CACHE``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from apptest_helpers import charts, open_page

from core.models import registry
from core.models.checkpoint import load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
HOME = str(REPO / "dashboard" / "Home.py")
PAGES = ["landscape", "analysis", "embeddings", "evaluation"]
PLAIN = REPO / "checkpoints" / "digits-plain.safetensors"

pytestmark = pytest.mark.skipif(not PLAIN.is_file(), reason="bundled checkpoint digits-plain.safetensors is missing")


def _copy(path: Path, name: str, scale: float = 0.8, dataset: str | None = None) -> Path:
    lm = load_checkpoint(PLAIN)
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    state["linear.weight"] = state["linear.weight"] * scale
    save_checkpoint(path, state, replace(lm.meta, name=name, dataset=dataset or lm.meta.dataset))
    return path


@pytest.fixture
def env(runs_dir, tmp_path, monkeypatch):
    """Temporary runs (conftest's runs_dir) / cache folders; at least two bundled digits models (a copy when
    needed), plus one 'svhn' model for the mixed-dataset check."""
    monkeypatch.setenv("ENERGYLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ENERGYLENS_UMAP_WARMUP", "0")
    real = registry.list_bundled
    extra = []
    if len([e for e in real() if e[1] is not None]) < 2:
        extra.append(_copy(tmp_path / "digits-copy.safetensors", "digits-copy"))
    extra.append(_copy(tmp_path / "svhn-model.safetensors", "svhn-model", dataset="svhn"))

    def patched(folder=registry.BUNDLED_DIR):
        return real(folder) + registry.checkpoint_entries(extra, "bundled")

    monkeypatch.setattr(registry, "list_bundled", patched)
    return tmp_path


def _app():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(HOME, default_timeout=90)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def _wait(at, cond, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if cond(at):
            return True
        time.sleep(1.0)
        at.run()
    return cond(at)


def _n_test(at) -> int:
    """Size of the test split of the model on screen (the app opens on the CIFAR-10 demo: 500 images)."""
    from core.data import load_dataset

    return len(load_dataset(load_checkpoint(at.session_state["model_ref"].path).meta.dataset, "test"))


def _errors(at) -> list[str]:
    return [e.value for e in at.error]


def _charts(at):
    return charts(at)


def _assert_landscape(chart, n_models: int) -> None:
    """Fig. 4: one panel per model titled with its robust accuracy, ΔE(x) and ΔE(x,y) in each panel."""
    panels = [a for a in chart.annotations if "robust acc." in a]
    assert len(panels) == n_models, chart.annotations
    assert chart.title.startswith("ΔE = E(natural) − E(adversarial)"), chart.title
    names = chart.trace_names
    assert names.count("ΔE(x)") == n_models and names.count("ΔE(x,y)") == n_models, names


def _landscape_keys(at):
    ms = at.multiselect(key="land_models")
    digits = [k for k in ms.options if "svhn" not in k]
    svhn = [k for k in ms.options if "svhn" in k]
    return ms, digits, svhn


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES)
def test_page_renders_with_the_bundled_model(env, page):
    at = _app()
    open_page(at, page)
    assert not at.exception, [e.message for e in at.exception]
    assert not _errors(at), _errors(at)
    assert at.title and at.title[0].value


def test_landscape_computes_for_two_bundled_models(env):
    at = _app()
    open_page(at, "landscape")
    ms, digits, _ = _landscape_keys(at)
    assert len(digits) >= 2
    ms.set_value(digits[:2])
    at.number_input(key="land_n").set_value(16)
    at.number_input(key="land_steps").set_value(3)
    at.button(key="FormSubmitter:land_form-Compute landscape").click().run()
    assert _wait(at, lambda a: len(_charts(a)) >= 2 or a.exception or _errors(a))
    assert not at.exception, [e.message for e in at.exception]
    assert not _errors(at), _errors(at)
    _assert_landscape(_charts(at)[0], 2)
    assert at.dataframe, "the table behind the plot is shown"
    # the trend's verdict is core's sentence (two models: a rank test cannot tell), never a bare correlation
    assert any("not enough models to tell" in c.value for c in at.caption), [c.value for c in at.caption]
    # the same request again is served from the disk cache
    at.button(key="FormSubmitter:land_form-Compute landscape").click().run()
    assert list((env / "cache" / "landscape").glob("*.npz"))

    def all_cached(a):
        return bool(a.dataframe) and bool(a.dataframe[0].value["cached"].all())

    assert _wait(at, all_cached, 60)


@pytest.mark.parametrize("case", ["none", "mixed", "too_many"])
def test_landscape_bad_inputs_show_errors(env, case):
    at = _app()
    open_page(at, "landscape")
    ms, digits, svhn = _landscape_keys(at)
    if case == "none":
        ms.set_value([])
        expect = "no models selected"
    elif case == "mixed":
        ms.set_value([digits[0], svhn[0]])
        expect = "different datasets"
    else:
        ms.set_value(digits[:1])
        at.number_input(key="land_n").set_value(10_000)
        expect = f"has only {_n_test(at)}"
    at.button(key="FormSubmitter:land_form-Compute landscape").click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert any(expect in e for e in _errors(at)), _errors(at)


def test_landscape_background_job_progress_then_results(env):
    """The 'background job' path: the page polls the job, then loads and draws its results once."""
    at = _app()
    open_page(at, "landscape")
    ms, digits, _ = _landscape_keys(at)
    ms.set_value(digits[:2])
    at.number_input(key="land_n").set_value(16)
    at.number_input(key="land_steps").set_value(2)
    at.selectbox(key="land_mode").set_value("background job")
    at.button(key="FormSubmitter:land_form-Compute landscape").click().run()
    assert any("Started background job" in s.value for s in at.success)
    job_id = at.session_state["land_job"]
    assert _wait(at, lambda a: a.session_state["land_job_loaded"] == job_id
                 if "land_job_loaded" in a.session_state else bool(a.exception or _errors(a)), 180)
    assert not at.exception and not _errors(at), ([e.message for e in at.exception], _errors(at))
    assert len(at.session_state["land_results"]) == 2
    _assert_landscape(_charts(at)[0], 2)


def test_landscape_failed_job_shows_error_and_log(env):
    from core import jobs

    info = jobs.submit("landscape", {"models": [{"source": "bundled", "name": "ghost",
                                                 "path": str(env / "missing.safetensors")}], "n": 8}, device="cpu")
    deadline = time.time() + 120
    while time.time() < deadline and jobs.get_job(info.id).active:
        time.sleep(0.5)
    assert jobs.get_job(info.id).status == "failed"
    at = _app()
    open_page(at, "landscape")
    at.session_state["land_job"] = info.id
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert any("failed" in e and "not found" in e for e in _errors(at)), _errors(at)
    assert any(ex.label == "Error and log tail" for ex in at.expander)


def test_analysis_page_computes_fig5(env):
    at = _app()
    open_page(at, "analysis")
    at.number_input(key="ana_n").set_value(300)
    at.button(key="FormSubmitter:ana_form-Analyse").click().run()
    assert _wait(at, lambda a: len(_charts(a)) >= 3 or a.exception or _errors(a))
    assert not at.exception and not _errors(at), ([e.message for e in at.exception], _errors(at))
    assert any("Pearson(PM, E(x,y))" == m.label for m in at.metric)
    figs = _charts(at)
    assert any(c.title.startswith("PM vs E(x, y)") for c in figs), [c.title for c in figs]
    assert any("entropy" in c.trace_names for c in figs), [c.trace_names for c in figs]
    # bad input
    at.selectbox(key="ana_split").set_value("test")
    at.number_input(key="ana_n").set_value(5000)
    at.button(key="FormSubmitter:ana_form-Analyse").click().run()
    assert any(f"has only {_n_test(at)}" in e for e in _errors(at)), _errors(at)


def test_analysis_subset_preview(env):
    at = _app()
    open_page(at, "analysis")
    at.number_input(key="sub_size").set_value(3)
    at.button(key="FormSubmitter:subset_form-Preview the subsets").click().run()
    assert _wait(at, lambda a: any("**Selection**" in m.value for m in a.markdown) or a.exception or _errors(a))
    assert not at.exception and not _errors(at), ([e.message for e in at.exception], _errors(at))
    assert any("3 samples per subset" in m.value for m in at.markdown)
    at.number_input(key="sub_size").set_value(5000)
    at.button(key="FormSubmitter:subset_form-Preview the subsets").click().run()
    _wait(at, lambda a: bool(_errors(a)) or a.exception, 60)
    assert any("too large" in e for e in _errors(at)), _errors(at)


@pytest.mark.parametrize("button", ["Preview the subsets", "Launch the retraining jobs"])
def test_analysis_subset_bad_settings_are_refused_by_core(env, button):
    """The experiment's rules live in core.analysis.validate_subset_request: refused at once, nothing queued."""
    from core import jobs

    at = _app()
    open_page(at, "analysis")
    at.number_input(key="sub_epochs").set_value(0)
    at.button(key=f"FormSubmitter:subset_form-{button}").click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert any("epochs must be a positive integer, got 0" in e for e in _errors(at)), _errors(at)
    assert "sub_task" not in at.session_state and not jobs.list_jobs(kind="subset")
    at.number_input(key="sub_epochs").set_value(2)
    at.number_input(key="sub_size").set_value(-3)
    at.button(key=f"FormSubmitter:subset_form-{button}").click().run()
    assert any("the subset size must be a positive integer" in e for e in _errors(at)), _errors(at)
    assert "sub_task" not in at.session_state and not jobs.list_jobs(kind="subset")


def test_analysis_subset_preview_draws_where_the_subsets_sit(env):
    """Issue 13 item 10: the preview draws subset_energy_figure (the training-set E(x) histogram with the
    three subsets), with as many samples in each subset as the selection says."""
    at = _app()
    open_page(at, "analysis")
    at.number_input(key="sub_size").set_value(7)
    at.button(key="FormSubmitter:subset_form-Preview the subsets").click().run()
    assert _wait(at, lambda a: any("**Selection**" in m.value for m in a.markdown) or a.exception or _errors(a))
    assert not at.exception and not _errors(at), ([e.message for e in at.exception], _errors(at))
    chart = next((c for c in _charts(at) if c.has_text("E(x) under the robust model")), None)
    assert chart is not None, ("no subset histogram", [c.texts() for c in _charts(at)])
    names = chart.trace_names
    assert names == ["all training samples", "high-energy", "low-energy", "misclassified"], names
    sel = at.session_state["sub_preview"]["sel"]
    assert sel.e_x is not None and len(sel.e_x) == sel.n_train


def test_embeddings_page_pca_and_selection(env):
    at = _app()
    open_page(at, "embeddings")
    at.number_input(key="emb_n").set_value(40)
    at.button(key="FormSubmitter:emb_form-Compute features").click().run()
    assert _wait(at, lambda a: len(_charts(a)) >= 1 or a.exception or _errors(a))
    assert not at.exception and not _errors(at), ([e.message for e in at.exception], _errors(at))
    chart = _charts(at)[0]
    assert chart.title.startswith("PCA of"), chart.title
    # every point carries its global index (customdata[0]) for selections: 40 natural + 40 adversarial
    idx = np.concatenate([chart.array(t, "customdata")[:, 0] for t in chart.traces])
    assert sorted(idx.astype(int).tolist()) == list(range(80))
    assert any("natural: 40 points" in c.value and "adversarial: 40 points" in c.value for c in at.caption)
    for colour in ("class", "group"):
        at.radio(key="emb_color").set_value(colour).run()
        assert not at.exception and _charts(at)
    at.number_input(key="emb_n").set_value(100_000)
    at.button(key="FormSubmitter:emb_form-Compute features").click().run()
    assert any("asked for 100000 images but the test set of" in e and e.endswith(f"has only {_n_test(at)}")
               for e in _errors(at)), _errors(at)


def _box_select(at, key: str, indices, coords, energy):
    """Send a box selection of ``indices`` on the keyed chart exactly as the browser does: the widget value
    is a JSON string, and Streamlit 1.67's frontend sends each point's customdata[0] as an object with string
    index keys, ``{"0": 28}`` (captured from Chromium by tests/test_browser.py::test_embedding_box_selection_in_real_browser)."""
    import json

    from streamlit.proto.WidgetStates_pb2 import WidgetState

    chart = next(el for el in at.get("plotly_chart") if el.proto.id.endswith(key))
    pts = [{"curve_number": 0, "point_number": int(i), "point_index": int(i), "x": float(coords[i, 0]),
            "y": float(coords[i, 1]), "customdata": {"0": int(i)}, "text": f"#{int(i)}",
            "marker_color": float(energy[i])} for i in indices]
    xs, ys = coords[list(indices), 0], coords[list(indices), 1]
    payload = {"selection": {"points": pts, "point_indices": [int(i) for i in indices],
                             "box": [{"xref": "x", "yref": "y", "x": [float(xs.min()), float(xs.max())],
                                      "y": [float(ys.max()), float(ys.min())]}], "lasso": []}}
    states = at._tree.get_widget_states()
    w = WidgetState()
    w.id = chart.proto.id
    w.string_value = json.dumps(payload)
    states.widgets.append(w)
    return at._run(states)


def test_embeddings_box_selection_shows_the_selected_images(env):
    """Issue 13 item 5: a box selection (payload shape of the real frontend) shows the selected images."""
    at = _app()
    open_page(at, "embeddings")
    at.number_input(key="emb_n").set_value(40)
    at.checkbox(key="emb_adv").set_value(False)
    at.button(key="FormSubmitter:emb_form-Compute features").click().run()
    assert _wait(at, lambda a: len(_charts(a)) >= 1 or a.exception or _errors(a))
    assert not at.exception and not _errors(at), ([e.message for e in at.exception], _errors(at))
    assert not at.image, "no images before a selection"
    data = at.session_state["emb_data"]
    chosen = [3, 7, 11, 12, 30]
    _box_select(at, "emb_chart", chosen, data["pca"], data["energy"])
    assert not at.exception, [e.message for e in at.exception]
    assert any(f"**{len(chosen)} selected**" in m.value for m in at.markdown), [m.value for m in at.markdown]
    captions = [c for im in at.image for c in im.captions]
    assert len(captions) == len(chosen), captions
    assert all("natural · y=" in c for c in captions), captions
    mean_e = float(data["energy"][chosen].mean())
    assert any(f"mean E(x) {mean_e:.3f}" in m.value for m in at.markdown)


@pytest.mark.slow
def test_evaluation_page_launches_a_job_and_shows_the_table(env):
    at = _app()
    open_page(at, "evaluation")
    at.number_input(key="ev_n").set_value(5000)
    at.button(key="FormSubmitter:eval_form-Launch evaluation job").click().run()
    assert any(f"has only {_n_test(at)}" in e for e in _errors(at)), _errors(at)
    at.number_input(key="ev_n").set_value(8)
    at.number_input(key="ev_steps").set_value(3)
    at.selectbox(key="ev_aa").set_value("off")
    at.number_input(key="ev_chunk").set_value(4)
    at.button(key="FormSubmitter:eval_form-Launch evaluation job").click().run()
    assert not at.exception and not _errors(at), ([e.message for e in at.exception], _errors(at))
    assert any("Queued evaluation job" in s.value for s in at.success)
    from core import jobs

    deadline = time.time() + 180
    while time.time() < deadline and any(j.active for j in jobs.list_jobs(kind="eval")):
        time.sleep(1.0)
    js = jobs.list_jobs(kind="eval")
    assert js and js[0].status == "done", (js[0].error, jobs.read_log_tail(js[0].id, 30))
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert at.dataframe, "the Table-1 style summary is shown"
    labels = [b.label for b in at.get("download_button")] if at.get("download_button") else []
    assert at.get("download_button"), labels


def test_evaluation_page_shows_failed_jobs(env):
    from core import jobs

    info = jobs.submit("eval", {"model": {"source": "bundled", "name": "ghost", "path": str(env / "nope.safetensors")},
                                "n": 4}, device="cpu")
    deadline = time.time() + 120
    while time.time() < deadline and jobs.get_job(info.id).active:
        time.sleep(0.5)
    assert jobs.get_job(info.id).status == "failed"
    at = _app()
    open_page(at, "evaluation")
    assert not at.exception, [e.message for e in at.exception]
    assert any("failed" in e and "not found" in e for e in _errors(at)), _errors(at)
    assert any(ex.label == "Error and log tail" for ex in at.expander)
    assert at.button(key=f"ev_resume_{info.id}").label == "Resume"  # evaluation jobs resume their finished chunks


def test_figure_helpers():
    import numpy as np

    import analysis_figures as af
    from core.analysis import LandscapeResult

    ev = {"selection": {"points": [{"customdata": [5]}, {"customdata": [2]}, {"customdata": [5]}, {"x": 1}]}}
    assert af.selection_indices(ev) == [2, 5]
    assert af.selection_indices(None) == []
    lab = np.zeros(50, int)
    res = [LandscapeResult(f"m{i}", e_nat=np.linspace(-i, 3 * i, 50), e_adv=np.zeros(50), ej_nat=np.zeros(50),
                           ej_adv=np.linspace(0, i, 50), pred_nat=lab, pred_adv=np.where(np.arange(50) < 10 * i, 0, 1),
                           labels=lab) for i in range(1, 4)]
    fig = af.landscape_figure(res, c=1.0)
    titles = [a.text for a in fig.layout.annotations]
    assert titles[0].startswith("<b>m1</b>") and "robust acc. 20.0%" in titles[0]   # sorted by robust accuracy
    assert len(fig.data) == 6 and fig.layout.yaxis.ticktext
    assert af.landscape_figure(res, kind="box").data[0].type == "box"


def test_selection_indices_accepts_every_customdata_shape_the_frontend_sends():
    """Issue 13 item 5: {"0": 28} (Streamlit 1.67 + numpy customdata), [28] (lists) and 28 (1-D customdata)."""
    import analysis_figures as af

    ev = {"selection": {"points": [{"customdata": {"0": 28}}, {"customdata": [5]}, {"customdata": 2},
                                   {"customdata": 2.0}, {"customdata": "7"}, {"customdata": {"0": 28}},
                                   {"customdata": {}}, {"customdata": None}, {"customdata": float("nan")},
                                   {"customdata": True}, {"customdata": 1.5}, {"x": 1}]},
          "box": [], "lasso": []}
    assert af.selection_indices(ev) == [2, 5, 7, 28]

    class Event:  # the attribute-style object st.plotly_chart returns
        selection = {"points": [{"customdata": {"0": 4}}, {"customdata": {"0": 1}}]}

    assert af.selection_indices(Event()) == [1, 4]
    assert af.customdata_index({"0": 3, "1": 9}) == 3


def test_per_class_figure_rows_share_one_categorical_class_axis():
    """Issue 13 item 6: the error, entropy and energy rows of Fig. 5d use the same categorical class axis, in
    the order of the error (digit class names would otherwise make the upper rows numeric)."""
    import analysis_figures as af

    errs = [0.30, 0.05, 0.20, 0.10]
    rows = [{"name": str(k), "count": 10, "prob_error": e, "hard_error": e, "entropy": 2 * e, "energy": -e}
            for k, e in enumerate(errs)]
    fig = af.per_class_figure(rows)
    order = ["1", "3", "2", "0"]
    axes = [fig.layout[a] for a in ("xaxis", "xaxis2", "xaxis3")]
    assert [ax.type for ax in axes] == ["category"] * 3
    assert all(list(ax.categoryarray) == order and ax.categoryorder == "array" for ax in axes)
    assert [list(tr.x) for tr in fig.data] == [order] * 3
    assert axes[2].title.text == "class (sorted by error)"


@pytest.mark.slow
def test_embeddings_page_umap_in_the_background(env):
    at = _app()
    open_page(at, "embeddings")
    at.number_input(key="emb_n").set_value(40)
    at.checkbox(key="emb_adv").set_value(False)
    at.button(key="FormSubmitter:emb_form-Compute features").click().run()
    assert _wait(at, lambda a: len(_charts(a)) >= 1 or a.exception or _errors(a))
    at.radio(key="emb_method").set_value("UMAP").run()
    assert not at.exception, [e.message for e in at.exception]
    assert _charts(at)[0].title.startswith(("PCA of", "UMAP of"))  # PCA until UMAP is ready
    assert _wait(at, lambda a: bool(_charts(a)) and _charts(a)[0].title.startswith("UMAP of") or bool(_errors(a)), 180)
    assert not _errors(at), _errors(at)
