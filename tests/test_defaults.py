"""Defaults are stated once, in core: the pages show core's values (Evaluation page, the Training studio's launch
form and sweep panel), and the step-size rules and the paper's budget live in one place each."""
from __future__ import annotations

from pathlib import Path

import pytest

from core import evaluation
from core.attacks import AttackSpec, pgd_step_size, scaled_step_size
from core.data import DATASETS, PAPER_EPS, SGLD_FAMILIES, dataset_spec, load_dataset
from core.train import TrainConfig

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("runs_dir")


def _page(name: str) -> AppTest:
    import streamlit as st

    st.cache_data.clear()
    at = AppTest.from_file(str(REPO / "dashboard" / "Home.py"), default_timeout=120)
    at.run()
    at.switch_page(f"../pages/{name}").run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def _number(at: AppTest, prefix: str):
    hits = [w for w in at.number_input if str(w.key).startswith(prefix)]
    assert len(hits) == 1, (prefix, [w.key for w in at.number_input])
    return hits[0].value


def test_every_dataset_states_its_budget_flip_recipe_and_sgld_family():
    for name, spec in DATASETS.items():
        assert 0 < spec.default_eps <= 1 and isinstance(spec.flip, bool), name
        assert spec.sgld_family in SGLD_FAMILIES, name
        assert spec.recipe.epochs > 0 and spec.recipe.lr > 0 and spec.recipe.batch_size > 0, name
    assert DATASETS["digits"].sgld_family == "digits" and not DATASETS["digits"].flip
    assert DATASETS["cifar10"].default_eps == PAPER_EPS == 8 / 255
    assert dataset_spec("npz:x.npz").default_eps == PAPER_EPS


def test_one_place_for_each_step_rule():
    assert pgd_step_size(PAPER_EPS) == pytest.approx(2 / 255)                     # the paper's PGD step
    assert AttackSpec(eps=0.1, steps=20).alpha == pytest.approx(scaled_step_size(0.1, 20)) == pytest.approx(0.0125)
    cfg = TrainConfig(dataset="cifar10")
    assert cfg.resolved_eps() == PAPER_EPS and cfg.resolved_step() == pgd_step_size(PAPER_EPS)
    assert TrainConfig(dataset="digits").resolved_step() == pgd_step_size(16 / 255)
    assert TrainConfig(step_size=0.001).eval_step_size() == pgd_step_size(TrainConfig().resolved_eps())
    assert evaluation.resolve_config({"eps": 0.04})["pgd_step_size"] == pgd_step_size(0.04)
    assert evaluation.default_eps(None) == PAPER_EPS


def test_default_number_of_evaluated_images():
    assert evaluation.default_n() == evaluation.EVAL_DEFAULTS["n"]
    assert evaluation.default_n(10) == 10
    assert evaluation.default_n(10 ** 9) == evaluation.EVAL_DEFAULTS["n"]


def test_evaluation_page_shows_cores_defaults():
    at = _page("evaluation.py")
    D = evaluation.EVAL_DEFAULTS
    lm_meta = at.session_state["model_ref"]
    assert lm_meta is not None
    from core.models.registry import load_model_ref

    meta = load_model_ref(lm_meta).meta
    n_test = len(load_dataset(meta.dataset, "test"))
    assert at.number_input(key="ev_n").value == evaluation.default_n(n_test)
    assert at.number_input(key="ev_steps").value == D["pgd_steps"]
    assert at.number_input(key="ev_chunk").value == D["chunk_size"]
    assert at.number_input(key="ev_seed").value == D["seed"]
    assert at.number_input(key="ev_eps").value == pytest.approx(round(evaluation.default_eps(meta) * 255, 2))


def test_training_studio_shows_the_dataset_recipe_and_cores_eval_defaults():
    at = _page("training.py")
    ds = at.selectbox(key=[w.key for w in at.selectbox if str(w.key).startswith("tr_dataset_")][0]).value
    spec = DATASETS[ds]
    assert _number(at, "tr_epochs_") == spec.recipe.epochs
    assert _number(at, "tr_lr_") == pytest.approx(spec.recipe.lr)
    assert _number(at, "tr_bs_") == spec.recipe.batch_size
    assert [w.value for w in at.selectbox if str(w.key).startswith("tr_arch_")] == [spec.recipe.arch]
    assert _number(at, "tr_eps_") == pytest.approx(round(spec.default_eps * 255, 2))
    # the sweep panel: core's evaluation defaults, the number of images capped at its dataset's test set
    n_digits = len(load_dataset("digits", "test"))
    assert at.number_input(key="sw_evalimages").value == evaluation.default_n(n_digits)
    assert at.number_input(key="sw_evalsteps").value == evaluation.EVAL_DEFAULTS["pgd_steps"]
