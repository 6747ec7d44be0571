"""Every page renders without exception under Streamlit's AppTest (entry script + switch_page),
and the Attack Lab runs an attack, reports bad input clearly and never loses earlier results."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENTRY = str(REPO / "dashboard" / "Home.py")
PAGES = sorted(p.name for p in (REPO / "pages").glob("*.py"))


@pytest.fixture(autouse=True)
def _isolated_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("ENERGYLENS_RUNS", str(tmp_path / "runs"))


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


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_without_exception(page):
    at = fresh_app()
    at.switch_page(f"../pages/{page}").run()
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
    at.switch_page("../pages/attack_lab.py").run()  # the form's defaults: 64 images, seed 0
    assert not at.exception, [e.message for e in at.exception]
    charts = at.get("plotly_chart")
    assert len(charts) == 1 and "Natural energies of the chosen test images" in charts[0].proto.spec
    _, trace = at.session_state["atk_preview"]
    # the same 64 images the attack will use (seed 0), with the model's own energies
    ds = load_dataset("digits", "test")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:64]
    model = load_checkpoint(REPO / "checkpoints" / "digits-plain.safetensors").model.eval()
    with torch.no_grad():
        logits = model(ds.images(idx))
    assert (trace.labels == ds.labels(idx).numpy()).all()
    assert abs(trace.marginal[0] - marginal_energy(logits).numpy()).max() < 1e-4
    assert abs(trace.joint[0] - joint_energy(logits, ds.labels(idx)).numpy()).max() < 1e-4
    # an attack replaces the preview by the paper's figures
    run_attack_and_wait(at, n=24)
    specs = " ".join(c.proto.spec for c in at.get("plotly_chart"))
    assert "Natural energies of the chosen" not in specs and "zero loss" in specs


def test_attack_lab_runs_pgd_and_draws_the_paper_figures():
    at = fresh_app()
    at.switch_page("../pages/attack_lab.py").run()
    run_attack_and_wait(at, n=32)
    assert not at.exception, [e.message for e in at.exception]
    metrics = {m.label: m.value for m in at.metric}
    nat = float(metrics["Natural accuracy"].rstrip("%"))
    rob = float(metrics["Robust accuracy"].rstrip("%"))
    assert nat > 80 and rob < nat - 40, metrics  # the bundled non-robust model is broken by PGD
    specs = " ".join(c.proto.spec for c in at.get("plotly_chart"))
    assert "zero loss" in specs and "natural" in specs and "adversarial" in specs
    assert len(at.get("plotly_chart")) >= 3


def test_attack_lab_sets_the_cw_confidence_kappa():
    at = fresh_app()
    at.switch_page("../pages/attack_lab.py").run()
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
    at.switch_page("../pages/attack_lab.py").run()
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
    ("atk_eps255", -3.0, "epsilon must be >= 0"),
    ("atk_steps", 0, "steps must be a positive integer"),
    ("atk_n", 100000, "test images are available"),
])
def test_attack_lab_bad_input_is_reported_and_keeps_results(field, value, expected):
    at = fresh_app()
    at.switch_page("../pages/attack_lab.py").run()
    run_attack_and_wait(at)
    before = at.session_state["atk_result"]
    at.number_input(key=field).set_value(value)
    at.button[0].click().run()
    assert not at.exception, [e.message for e in at.exception]
    errors = " ".join(e.value for e in at.error)
    assert expected in errors, errors
    assert at.session_state["atk_result"] is before, "earlier results must survive a bad run"
    assert at.metric, "the earlier results are still displayed"
