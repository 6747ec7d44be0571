"""Issue 27, item 8: a link that reproduces the current view (page, model, settings; no session id)."""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl, urlsplit

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from apptest_helpers import HOME  # noqa: E402

@pytest.fixture
def no_widget_warning(monkeypatch):
    """The messages Streamlit logs while the test runs; Streamlit's once-per-process flag is reset, so the
    'default value but also set via the Session State API' warning would be seen."""
    from streamlit.elements.lib import policies

    monkeypatch.setattr(policies, "_shown_default_value_warning", False)
    seen: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    h = Grab()
    policies._LOGGER.addHandler(h)
    yield seen
    policies._LOGGER.removeHandler(h)


def _open(params: dict, monkeypatch, tmp_path) -> AppTest:
    """A new browser session opening ``?<params>`` at the app's address (the Home page)."""
    monkeypatch.setenv("ENERGYLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ENERGYLENS_UMAP_WARMUP", "0")
    at = AppTest.from_file(HOME, default_timeout=180)
    for k, v in params.items():
        at.query_params[k] = v
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def _link(at: AppTest) -> str:
    links = [c.value for c in at.code if str(c.value).startswith("?")]
    assert len(links) == 1, [c.value for c in at.code]
    return links[0]


def _attack_values(at: AppTest) -> dict:
    return {"model": at.sidebar.selectbox(key="pick-Bundled").value, "attack": at.selectbox(key="atk_name").value,
            "norm": at.selectbox(key="atk_norm").value,
            "eps": (at.number_input(key="atk_eps255").value if at.selectbox(key="atk_norm").value == "Linf"
                    else at.number_input(key="atk_eps_l2").value),
            "steps": at.number_input(key="atk_steps").value, "n": at.number_input(key="atk_n").value,
            "seed": at.number_input(key="atk_seed").value, "targeted": at.checkbox(key="atk_targeted").value,
            "target": at.selectbox(key="atk_tmode").value, "tclass": at.selectbox(key="atk_tclass").value}


# ------------------------------------------------------------------------------------------------ (a)
def test_a_link_opens_the_attack_lab_with_its_model_and_attack_settings(runs_dir, monkeypatch, tmp_path,
                                                                        no_widget_warning):
    import share

    default = share._default_model()[0]["name"]
    assert default != "digits-sat", "the test needs a model other than the default"
    at = _open({"page": "attack", "model": "digits-sat", "attack": "cw", "norm": "L2", "eps": "0.75", "steps": "7",
                "n": "24", "seed": "5", "targeted": "1", "target": "chosen", "tclass": "3", "vs": "digits-trades"},
               monkeypatch, tmp_path)
    assert [t.value for t in at.title] == ["Attack Lab"], "the link's page is open"
    assert _attack_values(at) == {"model": "digits-sat", "attack": "cw", "norm": "L2", "eps": 0.75, "steps": 7,
                                  "n": 24, "seed": 5, "targeted": True, "target": "chosen", "tclass": 3}
    assert at.toggle(key="atk_compare").value is True and at.selectbox(key="atk_model_b").value == "digits-trades"
    assert not at.warning, [w.value for w in at.warning]
    assert dict(at.query_params).keys() == {"s"}, "the link's settings leave the URL; the session id stays"
    assert not [m for m in no_widget_warning if "Session State API" in m], no_widget_warning


def test_a_link_opens_the_sgld_studio_with_its_settings(runs_dir, monkeypatch, tmp_path, no_widget_warning):
    at = _open({"page": "sgld", "model": "digits-sat", "classes": "3,5", "chains": "2", "init": "random",
                "steps": "37"}, monkeypatch, tmp_path)
    assert [t.value for t in at.title] == ["SGLD studio"]
    assert at.sidebar.selectbox(key="pick-Bundled").value == "digits-sat"
    assert at.multiselect(key="sgld_classes").value == [3, 5]
    assert at.number_input(key="sgld_chains").value == 2
    assert at.selectbox(key="sgld_init_kind").value == "random"
    assert at.number_input(key="sgld_n").value == 37, "the link's steps win over the model family's default"
    assert not [m for m in no_widget_warning if "Session State API" in m], no_widget_warning


def test_a_link_opens_a_training_run_and_names_a_run_that_is_not_here(runs_dir, monkeypatch, tmp_path):
    run = "recorded:cifar10-demo-2k-trades"
    at = _open({"page": "training", "run": run}, monkeypatch, tmp_path)
    assert at.selectbox(key="tr_view").value == run
    assert share_link_params(at) == {"page": "training", "model": at.sidebar.selectbox(key="pick-Bundled").value,
                                     "run": run}
    at = _open({"page": "training", "run": "no-such-run"}, monkeypatch, tmp_path)
    assert any("no-such-run" in i.value.replace("\\", "") for i in at.info), [i.value for i in at.info]


def share_link_params(at: AppTest) -> dict:
    return dict(parse_qsl(urlsplit(_link(at)).query))


# ------------------------------------------------------------------------------------------------ (b)
@pytest.mark.parametrize("bad, why", [
    ({"model": "no-such-model"}, "model=no-such-model"),
    ({"eps": "-1"}, "eps=-1"),
    ({"eps": "abc"}, "eps=abc"),
    ({"eps": "nan"}, "eps=nan"),
    ({"attack": "laser"}, "attack=laser"),
    ({"steps": "2.5"}, "steps=2.5"),
    ({"n": "0"}, "n=0"),
    ({"tclass": "99"}, "tclass=99"),
    ({"targeted": "maybe"}, "targeted=maybe"),
    ({"page": "nowhere"}, "page=nowhere"),
    ({"source": "ftp", "model": "x"}, "source=ftp"),
    ({"vs": "no-such-model"}, "vs=no-such-model"),
])
def test_each_bad_parameter_is_named_and_left_out(bad, why):
    import share

    page, ident, values, ignored = share.read({"page": "attack", **bad}, None)
    assert len(ignored) == 1 and ignored[0].startswith(why), ignored
    assert values == {} and ident is None


def test_bad_sgld_parameters_are_named_and_left_out():
    import share

    _, _, values, ignored = share.read({"page": "sgld", "model": "digits-sat", "classes": "1,x", "chains": "0",
                                        "init": "magic", "steps": "-3", "eps": "4"}, None)
    assert values == {}
    assert [b.split(" ")[0] for b in ignored] == ["classes=1,x", "chains=0", "init=magic", "steps=-3", "eps=4"], ignored


def test_a_bad_link_gives_one_warning_and_the_defaults(runs_dir, monkeypatch, tmp_path):
    import share

    default = share._default_model()[0]["name"]
    at = _open({"page": "attack", "model": "no-such-model", "eps": "-1", "attack": "laser", "steps": "abc"},
               monkeypatch, tmp_path)
    assert [t.value for t in at.title] == ["Attack Lab"], "the good part of the link (the page) is used"
    warnings = [w.value for w in at.warning if "link" in w.value]
    assert len(warnings) == 1, [w.value for w in at.warning]
    for part in ("model=no-such-model", "eps=-1", "attack=laser", "steps=abc"):
        assert part in warnings[0], warnings[0]
    v = _attack_values(at)
    assert v["model"] == default and v["attack"] == "pgd" and v["steps"] == 10
    assert v["eps"] == pytest.approx(8.0), "the dataset's default ε"
    at.run()
    assert not [w for w in at.warning if "link" in w.value], "the warning is shown once"


# ------------------------------------------------------------------------------------------------ (c)
def _attack_page(monkeypatch, tmp_path) -> AppTest:
    at = _open({}, monkeypatch, tmp_path)
    pick = at.sidebar.selectbox(key="pick-Bundled")
    pick.set_value("digits-plain").run()
    at.switch_page("../pages/attack_lab.py").run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def _run_attack(at: AppTest) -> AppTest:
    from conftest import wait_until

    next(b for b in at.button if b.label == "Run attack").click().run()

    def done():
        at.run()
        assert not at.exception, [e.message for e in at.exception]
        return "atk_result" in at.session_state and at.session_state["atk_task"].done

    wait_until(done, timeout=300, what="the attack", every=0.3)
    at.run()
    return at


def test_the_link_shown_has_no_session_id_and_reopens_the_same_view(runs_dir, monkeypatch, tmp_path):
    at = _attack_page(monkeypatch, tmp_path)
    at.selectbox(key="atk_name").set_value("apgd-ce")
    at.number_input(key="atk_eps255").set_value(6.0)
    at.number_input(key="atk_steps").set_value(2)
    at.number_input(key="atk_n").set_value(8)
    at.number_input(key="atk_seed").set_value(3)
    _run_attack(at)                                  # the form's values reach the page with its submit button
    link = _link(at)
    sid = at.session_state["_persist_sid"]
    params = dict(parse_qsl(urlsplit(link).query))
    assert "s" not in params and sid not in link, link
    assert params["page"] == "attack" and params["model"] == "digits-plain", params
    new = _open(params, monkeypatch, tmp_path)
    assert [t.value for t in new.title] == ["Attack Lab"]
    assert _attack_values(new) == _attack_values(at)
    assert _attack_values(new)["attack"] == "apgd-ce" and _attack_values(new)["eps"] == 6.0
    assert new.session_state["_persist_sid"] != sid, "the link opens a session of its own"
    assert "atk_result" not in new.session_state, "the link shares settings, not results"
    assert _link(new) == link
