"""Every page renders without exception under Streamlit's AppTest (entry script + switch_page),
and the Attack Lab runs an attack, reports bad input clearly and never loses earlier results."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from apptest_helpers import HOME, charts, open_page  # noqa: E402
from navigation import PAGES as PAGE_LIST  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENTRY = HOME
PAGES = [p.key for p in PAGE_LIST]


pytestmark = pytest.mark.usefixtures("runs_dir")  # every test: its own runs folder (conftest)


def fresh_app() -> AppTest:
    import streamlit as st

    st.cache_data.clear()
    at = AppTest.from_file(ENTRY, default_timeout=120)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def test_home_renders_with_equations_and_sidebar_picker():
    at = fresh_app()
    assert at.title[0].value == "EnergyLens"
    assert any("E_\\theta(x)" in m.value for m in at.latex) if hasattr(at, "latex") else True
    assert at.sidebar.radio(key="model_source").value == "Bundled"
    assert at.session_state["model_ref"] is not None, "a bundled model is selected by default"


def test_one_page_list_names_every_page_file_once():
    """dashboard/navigation.py is the only list of pages: each file in pages/ has exactly one entry (a new page
    without an entry would never be reachable), every entry's file exists, keys are unique, one page is the default."""
    files = [(REPO / "dashboard" / p.file).resolve() for p in PAGE_LIST]
    assert sorted(f.name for f in files) == sorted(f.name for f in (REPO / "pages").glob("*.py"))
    assert all(f.is_file() and f.parent == REPO / "pages" for f in files)
    assert len({p.key for p in PAGE_LIST}) == len(PAGE_LIST) and sum(p.default for p in PAGE_LIST) == 1


def test_the_app_does_not_edit_sys_path():
    """Streamlit puts dashboard/ on sys.path and `core` is installed (pip install -e .): no module patches sys.path."""
    import ast

    offenders = []
    for f in [*(REPO / "dashboard").glob("*.py"), *(REPO / "pages").glob("*.py")]:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                    and node.value.id == "sys"):
                offenders.append(f"{f.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_without_exception(page):
    at = fresh_app()
    open_page(at, page)
    assert not at.exception, [e.message for e in at.exception]
    assert not [e for e in at.error if "Unexpected error" in e.value], [e.value for e in at.error]


def run_attack_and_wait(at: AppTest, timeout: float = 120.0, n: int = 16) -> AppTest:
    at.number_input(key="atk_n").set_value(n)
    at.button[0].click().run()  # the form's submit button (form values are sent with the submit)
    t0 = time.time()
    while "atk_result" not in at.session_state or (
            at.session_state["atk_task"] is not None and not at.session_state["atk_task"].done):
        if time.time() - t0 > timeout:
            pytest.fail("attack did not finish")
        time.sleep(0.3)
        at.run()
    at.run()
    return at


def test_attack_lab_previews_the_natural_energies_of_the_images_it_will_attack():
    import torch

    from core.data import load_dataset
    from core.energy import joint_energy, marginal_energy
    from core.models import load_checkpoint

    at = fresh_app()
    open_page(at, "attack")  # the form's defaults: 64 images, seed 0
    assert not at.exception, [e.message for e in at.exception]
    figs = charts(at)
    assert len(figs) == 1 and figs[0].title.startswith("Natural energies of the chosen test images"), \
        [c.title for c in figs]
    assert figs[0].axis_titles == {"xaxis": "marginal energy E(x)", "yaxis": "joint energy E(x, y)"}
    _, trace = at.session_state["atk_preview"]
    # the same 64 images the attack will use (seed 0), with the model's own energies
    ref = at.session_state["model_ref"]
    assert ref.name == "cifar10-demo-plain", "the app opens on the non-robust CIFAR-10 demo model"
    lm = load_checkpoint(ref.path)
    ds = load_dataset(lm.meta.dataset, "test")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:64]
    model = lm.model.eval()
    with torch.no_grad():
        logits = model(ds.images(idx))
    assert (trace.labels == ds.labels(idx).numpy()).all()
    assert abs(trace.marginal[0] - marginal_energy(logits).numpy()).max() < 1e-4
    assert abs(trace.joint[0] - joint_energy(logits, ds.labels(idx)).numpy()).max() < 1e-4
    # an attack replaces the preview by the paper's figures
    run_attack_and_wait(at, n=24)
    figs = charts(at)
    assert not any(c.title.startswith("Natural energies of the chosen") for c in figs), [c.title for c in figs]
    assert any(c.has_text("zero loss") for c in figs)


def test_attack_lab_runs_pgd_and_draws_the_paper_figures():
    at = fresh_app()
    open_page(at, "attack")
    run_attack_and_wait(at, n=32)
    assert not at.exception, [e.message for e in at.exception]
    metrics = {m.label: m.value for m in at.metric}
    nat = float(metrics["Natural accuracy"].rstrip("%"))
    rob = float(metrics["Robust accuracy"].rstrip("%"))
    assert nat > 50 and rob < nat - 40, metrics  # the default (non-robust CIFAR-10 demo) model is broken by PGD
    figs = charts(at)
    assert len(figs) >= 3, [c.title for c in figs]
    arrows = next(c for c in figs if c.title.startswith("Energy drift"))
    assert "zero loss: E(x,y) = E(x)" in arrows.trace_names                       # Fig. 1
    hist = next(c for c in figs if "marginal energy E(x)" in c.annotations)       # Fig. 2
    assert {"natural", "adversarial"} <= set(hist.trace_names)


def test_attack_lab_sets_the_cw_confidence_kappa():
    at = fresh_app()
    open_page(at, "attack")
    at.selectbox(key="atk_name").set_value("cw")
    at.number_input(key="atk_kappa").set_value(2.0)
    run_attack_and_wait(at, n=16)
    assert not at.exception, [e.message for e in at.exception]
    r = at.session_state["atk_result"]
    assert r["spec"].name == "cw" and r["spec"].kappa == 2.0
    loss = r["trace"].loss
    # the CW objective is the margin capped at kappa: it reaches 2 for the images pushed that far, never more
    assert loss.max() <= 2.0 + 1e-6 and (loss[-1] > 1.0).any()


def test_attack_lab_reports_autoattack_delta_e_over_the_perturbed_images():
    at = fresh_app()
    open_page(at, "attack")
    at.selectbox(key="atk_name").set_value("apgd-ce")
    at.number_input(key="atk_eps255").set_value(8.0)
    run_attack_and_wait(at, n=48)
    assert not at.exception, [e.message for e in at.exception]
    s = at.session_state["atk_result"]["trace"].delta_summary()
    assert 0 < s["n_perturbed"] < s["n"], s                  # digits-plain: some images survive APGD-CE at 8/255
    metrics = {m.label: m.value for m in at.metric}
    label = f"mean ΔE(x) = E(x) − E(x*) over {s['n_perturbed']}/{s['n']} perturbed"
    assert metrics[label] == f"{s['dE_mean']:+.3f}", metrics
    captions = " ".join(c.value for c in at.caption)
    assert f"Over all {s['n']} images: mean ΔE(x) {s['dE_mean_all']:+.3f}" in captions, captions


@pytest.mark.parametrize("field,value,expected", [
    ("atk_eps255", -3.0, "epsilon must be >= 0, got -3/255"),  # in the widget's units (issue 13)
    ("atk_steps", 0, "steps must be a positive integer"),
    ("atk_n", 100000, "asked for 100000 images but the test set of"),
])
def test_attack_lab_bad_input_is_reported_and_keeps_results(field, value, expected):
    at = fresh_app()
    open_page(at, "attack")
    run_attack_and_wait(at)
    before = at.session_state["atk_result"]
    at.number_input(key=field).set_value(value)
    at.button[0].click().run()
    assert not at.exception, [e.message for e in at.exception]
    errors = " ".join(e.value for e in at.error)
    assert expected in errors, errors
    assert at.session_state["atk_result"] is before, "earlier results must survive a bad run"
    assert at.metric, "the earlier results are still displayed"


def _submit(at: AppTest, label: str) -> AppTest:
    """Press the attack form's submit button with this label (form values are sent with the submit)."""
    next(b for b in at.button if b.label == label).click().run()
    return at


def _wait_attack(at: AppTest, before: int, timeout: float = 120.0) -> AppTest:
    t0 = time.time()
    while len(at.session_state["atk_history"] if "atk_history" in at.session_state else {}) <= before:
        if time.time() - t0 > timeout:
            pytest.fail("attack did not finish")
        time.sleep(0.3)
        at.run()
    at.run()
    return at


def test_attack_lab_shows_every_new_run_on_the_step_curve_and_keeps_deselections():
    """Issue 13 items 7 and 10: a targeted run, then a run at ε = 64/255, each appear on Fig. 1a by default
    (labelled as targeted / with their ε in /255); a run the user took off stays off."""
    at = fresh_app()
    open_page(at, "attack")
    at.number_input(key="atk_n").set_value(16)
    _wait_attack(_submit(at, "Run attack"), 0)
    first = list(at.session_state["atk_history"])[0]
    assert at.multiselect(key="atk_curves").value == [first]
    assert "Linf ε = 8/255" in first and "targeted" not in first, first  # the demo model's default budget

    at.checkbox(key="atk_targeted").set_value(True)
    _wait_attack(_submit(at, "Run attack"), 1)
    second = list(at.session_state["atk_history"])[1]
    assert "targeted (random targets)" in second, second
    assert at.multiselect(key="atk_curves").value == [first, second]
    assert any("targeted (random targets)" in h.value for h in at.subheader), [h.value for h in at.subheader]

    at.multiselect(key="atk_curves").unselect(first).run()
    at.checkbox(key="atk_targeted").set_value(False)
    at.number_input(key="atk_eps255").set_value(64.0)
    _wait_attack(_submit(at, "Run attack"), 2)
    third = list(at.session_state["atk_history"])[2]
    assert "Linf ε = 64/255" in third, third
    assert at.multiselect(key="atk_curves").value == [second, third]
    assert not at.exception, [e.message for e in at.exception]
    assert not [w.value for w in at.warning if "Session State" in w.value]
    import json

    step_fig = json.loads(next(c.proto.spec for c in at.get("plotly_chart") if "along the attack" in c.proto.spec))
    names = [t.get("name") for t in step_fig["data"] if t.get("name")]
    assert names == [second, third], names


def _png(seed: int = 0) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_attack_lab_attacks_an_upload_with_the_settings_on_screen():
    """Issue 13 item 8: ε typed as 0 (not yet submitted with 'Run attack') leaves the upload unchanged; the
    previously submitted default (8/255 for the CIFAR-10 demo model) perturbs it."""
    import numpy as np

    at = fresh_app()
    open_page(at, "attack")
    at.file_uploader(key="atk_upload").upload("x.png", _png(), "image/png").run()
    assert not at.exception, [e.message for e in at.exception]
    button = "Attack my uploaded image (below) with these settings"

    def wait_upload():  # the upload attack runs off the script thread (issue 17): wait for its task
        t0 = time.time()
        while not at.session_state["atk_upload_task"].done and time.time() - t0 < 120:
            time.sleep(0.2)
            at.run()
        at.run()

    _submit(at, button)  # the defaults: PGD-10 at 8/255
    wait_upload()
    x, xa, _, what = at.session_state["atk_upload_result"]
    assert "8/255" in what and np.abs(xa - x).max() > 1 / 255
    at.number_input(key="atk_eps255").set_value(0.0)  # typed on screen ...
    _submit(at, button)                                 # ... and used by this button
    wait_upload()
    assert not at.exception, [e.message for e in at.exception]
    x, xa, trace, what = at.session_state["atk_upload_result"]
    assert "Linf ε = 0," in what, what
    assert np.abs(xa - x).max() == 0.0
    assert any(what in m.value for m in at.markdown)
    assert "atk_result" not in at.session_state, "the upload button does not run the test-image attack"


def test_attack_lab_square_defaults_to_hundreds_of_queries_and_says_why():
    """Issue 13 item 10: Square's default query budget is not 10 (which looks like a failed attack), and the
    help text gives AutoAttack's 5,000 for scale."""
    at = fresh_app()
    open_page(at, "attack")
    q = at.number_input(key="atk_queries")
    assert q.value >= 100 and "5,000" in q.help
    at.selectbox(key="atk_name").set_value("square")
    at.number_input(key="atk_n").set_value(8)
    at.number_input(key="atk_queries").set_value(20)  # keep the test quick; the spec must carry it
    _wait_attack(_submit(at, "Run attack"), 0)
    assert at.session_state["atk_result"]["spec"].steps == 20
    assert "20 queries" in list(at.session_state["atk_history"])[0]


def test_models_table_formats_values_and_measures_the_readmes_drift(tmp_path, monkeypatch):
    """Issue 13 item 10: percentages instead of 0.9861, ε as 16/255, no raw None; the drift column is the
    README's mean |ΔE(x)| (PGD-10 on the test set, 2.56 for digits-plain), measured on request."""
    from core.models import registry

    monkeypatch.setenv("ENERGYLENS_CACHE", str(tmp_path / "cache"))
    real = registry.list_bundled
    monkeypatch.setattr(registry, "list_bundled",
                        lambda folder=registry.BUNDLED_DIR: [e for e in real(folder) if e[0].name == "digits-plain"])
    at = fresh_app()
    open_page(at, "models")
    assert not at.exception, [e.message for e in at.exception]
    df = at.dataframe[0].value
    row = df[df["name"] == "digits-plain"].iloc[0]
    assert row["natural acc."] == "98.6%" and row["PGD acc."] == "0.8%", row.to_dict()
    assert row["training ε"] == "16/255" and row["epoch"] == "15", row.to_dict()
    assert row["mean |ΔE(x)| (PGD-10, test)"] == "–" and row["ΔE(x) in training (probe, signed mean)"] == "-1.218"
    assert "None" not in df.astype(str).to_numpy().ravel().tolist()
    zoo = at.dataframe[-1].value
    acc = zoo["clean acc."]
    assert (acc.str.endswith("%") | (acc == "–")).all() and acc.str.endswith("%").any(), acc.tolist()
    assert set(zoo["ε"]) <= {"8/255", "0.5"}
    at.button(key="models_measure_bundled").click().run()
    t0 = time.time()
    while at.session_state["models_drift_task_bundled"] is not None and not at.session_state["models_drift_task_bundled"].done:
        assert time.time() - t0 < 120, "measuring did not finish"
        time.sleep(0.5)
    at.run()
    assert not at.exception and not at.error, ([e.message for e in at.exception], [e.value for e in at.error])
    df = at.dataframe[0].value
    assert df[df["name"] == "digits-plain"].iloc[0]["mean |ΔE(x)| (PGD-10, test)"] == "2.56 (N = 359)"


def test_attack_lab_apgd_t_uses_the_interactive_targets_and_states_the_full_autoattack_cost():
    """Issue 17: APGD-T runs against 3 target classes by default (AutoAttack: 9) in batches of 16 (progress moves),
    and the result says what AutoAttack's own setting would cost, scaled from the measured seconds."""
    import re

    at = fresh_app()
    open_page(at, "attack")
    assert at.number_input(key="atk_targets").value == 3
    at.selectbox(key="atk_name").set_value("apgd-t")
    at.number_input(key="atk_targets").set_value(2)
    at.number_input(key="atk_n").set_value(16)
    _wait_attack(_submit(at, "Run attack"), 0)
    assert not at.exception, [e.message for e in at.exception]
    r = at.session_state["atk_result"]
    assert r["spec"].extra == {"targets": 2} and r["spec"].batch_size == 16
    cap = next(c.value for c in at.caption if "AutoAttack's standard setting" in c.value)
    assert "100 iterations × 9 target classes" in cap and "45× this run's work" in cap   # 900 / (10 x 2)
    # under a minute "about 12.3 s for these", else "about 1 min 05 s for these" (a slow or loaded machine)
    m = re.search(r"about (?:(\d+) min )?([\d.]+) s for these", cap)
    if m:                                               # (hours are shown for very long estimates)
        shown = 60 * int(m.group(1) or 0) + float(m.group(2))
        assert shown == pytest.approx(45 * r["seconds"], rel=0.05, abs=0.1 if m.group(1) is None else 1.0)


@pytest.mark.parametrize("flag, expected", [("1", True), ("0", False)])
def test_the_app_starts_the_umap_warm_up_at_launch(monkeypatch, flag, expected):
    """Issue 17: numba's first UMAP compile starts in the background when the app opens (not when the user first
    asks for UMAP); ENERGYLENS_UMAP_WARMUP=0 turns it off."""
    import core.analysis as A

    calls = []
    monkeypatch.setattr(A, "start_umap_warmup", lambda: calls.append(1))
    monkeypatch.setenv("ENERGYLENS_UMAP_WARMUP", flag)
    fresh_app()
    assert bool(calls) is expected


# ------------------------------------------------------------------------------------ issue 24: saved results
def _reload(sid: str, model: str | None = None) -> AppTest:
    """A new browser session on the same ?s=<id> (a page reload), optionally with another bundled model."""
    at = AppTest.from_file(ENTRY, default_timeout=120)
    at.query_params["s"] = sid
    if model is not None:
        at.session_state["model_source"] = "Bundled"
        at.session_state["pick-Bundled"] = model
    at.run()
    at.switch_page("../pages/attack_lab.py").run()
    assert not at.exception, [e.message for e in at.exception]
    assert not [e for e in at.error if "Unexpected error" in e.value], [e.value for e in at.error]
    return at


def _sid(at: AppTest) -> str:
    sid = at.query_params["s"]
    return sid[0] if isinstance(sid, list) else sid


def test_attack_lab_restores_a_result_only_under_its_model_and_drops_crafted_ones(monkeypatch, tmp_path):
    import numpy as np

    from core import saved

    monkeypatch.setenv("ENERGYLENS_CACHE", str(tmp_path / "cache"))
    at = fresh_app()
    at.switch_page("../pages/attack_lab.py").run()
    run_attack_and_wait(at)
    sid, first = _sid(at), at.session_state["model_ref"].name
    other = "digits-sat" if not first.startswith("digits") else "cifar10-demo-sat"
    arrays, meta = saved.load(sid, "attack")
    assert meta["model_key"] == at.session_state["model_ref"].key

    # under another model: not shown (a digits result must not get CIFAR-10 class names), and kept on disk
    at2 = _reload(sid, other)
    assert "atk_result" not in at2.session_state
    assert saved.load(sid, "attack") is not None
    assert "atk_result" in _reload(sid).session_state, "restored under its own model"

    path = saved.sessions_dir() / sid / "attack.npz"
    crafted = {
        "labels >= the model's classes": ({**arrays, "a_labels": arrays["a_labels"] + 50}, meta,
                                          "labels outside the model's 10 classes"),
        "trace shape does not match its labels": ({**arrays, "a_labels": arrays["a_labels"][:3]}, meta,
                                                  "labels of shape (3,)"),
        "images do not match the trace": ({**arrays, "x_adv": arrays["x_adv"][:1]}, meta, "do not match"),
        "spec of the wrong kind": (arrays, {**meta, "spec": [1, 2]}, "could not be used"),
    }
    for what, (arr, m, needle) in crafted.items():
        saved.save(sid, "attack", arr, m)
        at3 = _reload(sid)
        assert "atk_result" not in at3.session_state, what
        notes = [w.value for w in at3.warning if "could not be used" in w.value]
        assert notes and needle in notes[0] and "\n" not in notes[0], (what, [w.value for w in at3.warning])
        assert not path.exists(), what

    # metadata nested 100,000 deep: removed with a one-line notice, the page draws
    with open(path, "wb") as f:
        np.savez(f, x=np.zeros(1), __meta__=np.array("[" * 100_000 + "]" * 100_000))
    at4 = _reload(sid)
    assert any("nested too deeply" in w.value and "was removed" in w.value for w in at4.warning), \
        [w.value for w in at4.warning]
    assert not path.exists()


def test_attack_lab_says_when_a_result_could_not_be_saved(monkeypatch, tmp_path):
    from core import saved

    monkeypatch.setenv("ENERGYLENS_CACHE", str(tmp_path / "cache"))

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    at = fresh_app()
    at.switch_page("../pages/attack_lab.py").run()
    monkeypatch.setattr(saved, "save", disk_full)
    run_attack_and_wait(at)
    assert at.session_state["atk_result"] is not None, "the result stays on screen"
    assert at.metric, "and is drawn"
    notes = [w.value for w in at.warning if "was not saved" in w.value]
    assert notes and "No space left on device" in notes[0], [w.value for w in at.warning]


@pytest.mark.parametrize("field, value", [("history", 5), ("trace_meta", [1]), ("spec", {"name": None}),
                                          ("seconds", {}), ("b", 3), ("notes", 7)])
def test_unpack_attack_refuses_fields_of_the_wrong_kind_with_value_error(field, value):
    """Found by scripts/fuzz_loaders.py: a saved result whose meta fields had the wrong kind raised AttributeError
    (the page caught only ValueError, KeyError, TypeError and IndexError)."""
    import sys

    import numpy as np

    sys.path.insert(0, str(REPO / "dashboard"))
    import persist

    n, s1 = 4, 3
    t = {f"a_{k}": np.zeros((s1, n), np.float32) for k in ("marginal", "joint", "loss")}
    t.update(a_pred=np.zeros((s1, n), np.int64), a_labels=np.zeros(n, np.int64), a_steps=np.arange(s1))
    arrays = {**t, "x": np.zeros((n, 3, 8, 8), np.float32), "x_adv": np.zeros((n, 3, 8, 8), np.float32)}
    meta = {"spec": {"name": "pgd"}, "model": "m", "seconds": 1.0, "notes": [], "trace_meta": {}, "history": {}}
    persist.unpack_attack(arrays, meta, num_classes=10)  # the valid one
    with pytest.raises(ValueError):
        persist.unpack_attack(arrays, {**meta, field: value}, num_classes=10)
