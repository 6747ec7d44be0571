"""Issue 27, item 8: a link that reproduces the current view (page, model, settings; no session id), and figures for
slides (Fig. 1, Fig. 3 and the SGLD grid with a caption)."""

from __future__ import annotations

import io
import json
import logging
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from apptest_helpers import HOME, charts  # noqa: E402

CAPTION_OF = {"attack": "Fig. 1 —", "training": "Fig. 3 —"}


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


# ------------------------------------------------------------------------------------------------ (d)
def test_slide_figure_has_the_caption_under_the_plot_and_the_export_config_the_format():
    import figures as fig
    import slides

    f = fig.energy_arrows(np.array([0.0, 1.0]), np.array([1.0, 2.0]), np.array([-1.0, 0.5]), np.array([2.0, 3.0]))
    s = slides.slide_figure(f, "Fig. 1 — model m · PGD (ε = 8/255) · 2 test images")
    caps = [a for a in s.layout.annotations if a.name == slides.CAPTION_NAME]
    assert len(caps) == 1 and "8/255" in caps[0].text and "2 test images" in caps[0].text
    assert caps[0].yref == "paper" and caps[0].y == 0 and caps[0].yanchor == "top", "under the plot"
    assert s.layout.paper_bgcolor == "white" and s.layout.font.size >= 18
    assert not [a for a in f.layout.annotations if a.name == slides.CAPTION_NAME], "the original is unchanged"
    for fmt in ("png", "svg"):
        opts = slides.export_config(fmt, "fig1 m/pgd")["toImageButtonOptions"]
        assert opts["format"] == fmt and (opts["width"], opts["height"]) == (1600, 900)
        assert opts["filename"] == "fig1_m_pgd"
    with pytest.raises(ValueError):
        slides.export_config("gif", "x")


def _slide_chart(at: AppTest, page: str):
    chart = [(c, el) for c, el in zip(charts(at), at.get("plotly_chart"))
             if any(a.startswith(CAPTION_OF[page]) for a in c.annotations)]
    assert len(chart) == 1, [c.annotations for c in charts(at)]
    return chart[0][0], json.loads(chart[0][1].proto.config)


def test_attack_lab_offers_fig1_for_slides_in_the_chosen_format(runs_dir, monkeypatch, tmp_path):
    at = _attack_page(monkeypatch, tmp_path)
    at.number_input(key="atk_steps").set_value(2)
    at.number_input(key="atk_n").set_value(8)
    _run_attack(at)
    assert not [c for c in charts(at) if any(a.startswith(CAPTION_OF["attack"]) for a in c.annotations)], \
        "the slide copy is built only when asked for"
    at.toggle(key="slide_arrows_on").set_value(True).run()
    chart, config = _slide_chart(at, "attack")
    cap = next(a for a in chart.annotations if a.startswith("Fig. 1 —"))
    assert "digits-plain" in cap and "8 test images" in cap and "ε" in cap, cap
    assert config["toImageButtonOptions"]["format"] == "png"
    at.radio(key="slide_arrows_fmt").set_value("svg").run()
    assert _slide_chart(at, "attack")[1]["toImageButtonOptions"]["format"] == "svg"
    assert any("camera icon" in c.value and "SVG" in c.value for c in at.caption)


def test_training_studio_offers_fig3_for_slides(runs_dir, monkeypatch, tmp_path):
    at = _open({"page": "training", "run": "recorded:cifar10-demo-2k-sat"}, monkeypatch, tmp_path)
    at.toggle(key="slide_fig3_on").set_value(True).run()
    chart, config = _slide_chart(at, "training")
    cap = next(a for a in chart.annotations if a.startswith("Fig. 3 —"))
    assert "cifar10-demo-2k-sat" in cap and "probe" in cap, cap
    at.radio(key="slide_fig3_fmt").set_value("svg").run()
    assert _slide_chart(at, "training")[1]["toImageButtonOptions"]["format"] == "svg"


def test_sgld_grid_for_slides_is_a_png_with_a_caption_strip(runs_dir, monkeypatch, tmp_path):
    from PIL import Image
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    files: dict[str, bytes] = {}
    real = MemoryMediaFileStorage.load_and_get_id

    def keep(self, path_or_data, mimetype, kind, filename=None):
        if filename and isinstance(path_or_data, bytes):
            files[filename] = path_or_data
        return real(self, path_or_data, mimetype, kind, filename)

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", keep)
    at = _open({"page": "sgld", "model": "digits-sat", "classes": "3,5", "chains": "2", "init": "random"},
               monkeypatch, tmp_path)
    at.button(key="sgld_btn_init").click().run()
    at.button(key="sgld_btn_step1").click().run()
    assert not at.exception, [e.message for e in at.exception]
    png = next(v for k, v in files.items() if k.endswith("steps.png"))
    slide = next(v for k, v in files.items() if k.endswith("_slide.png"))
    svg = next(v for k, v in files.items() if k.endswith("_slide.svg"))
    grid, big = Image.open(io.BytesIO(png)), Image.open(io.BytesIO(slide))
    big.load()
    assert big.format == "PNG" and big.height > grid.height + 20 and big.width >= grid.width
    strip = np.asarray(big.convert("L"))[grid.height + 16:]
    assert (strip < 128).any(), "the caption strip holds text"
    assert b"<svg" in svg and b"data:image/png;base64," in svg and "digits-sat".encode() in svg
    assert "η = ".encode() in svg and b"random" in svg
