"""What a new user meets first (issue 11): the app opens on the CIFAR-10 demo, the guided tour sets the widgets of
the pages it opens, claims are computed from the data on screen, the Attack Lab compares two models side by side,
uploads get an energy-based out-of-distribution hint, and results survive a page reload."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from apptest_helpers import open_page

REPO = Path(__file__).resolve().parents[1]
HOME = str(REPO / "dashboard" / "Home.py")


@pytest.fixture(autouse=True)
def isolated(runs_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ENERGYLENS_CACHE", str(tmp_path / "cache"))


def app():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(HOME, default_timeout=120).run()
    ok(at)
    return at


def ok(at):
    assert not at.exception, [e.message for e in at.exception]
    assert not [e.value for e in at.error if "Unexpected error" in e.value], [e.value for e in at.error]


def wait_attack(at, previous=None, timeout=120):
    """Rerun until the attack the last click started has finished: a result in the session that is not ``previous``
    (the result of an earlier step; the page may store the new one within the click's own run)."""
    def fresh():
        r = at.session_state["atk_result"] if "atk_result" in at.session_state else None
        task = at.session_state["atk_task"] if "atk_task" in at.session_state else None
        return r is not None and r is not previous and (task is None or task.done)

    t0 = time.time()
    while time.time() - t0 < timeout and not fresh():
        time.sleep(0.3)
        at.run()
    at.run()
    ok(at)
    assert fresh(), "the attack did not finish"
    return at.session_state["atk_result"]


def titles(at) -> list[str]:
    from apptest_helpers import charts

    return [c.title for c in charts(at)]


# ------------------------------------------------------------------------------------------------ opening
def test_app_opens_on_the_cifar10_demo_and_home_offers_the_tour():
    at = app()
    assert at.session_state["model_ref"].name == "cifar10-demo-plain"
    assert any("Start here" in s.value for s in at.subheader)
    assert len([b for b in at.button if b.key and b.key.startswith("tour_go_")]) == 7
    text = " ".join(m.value for m in at.markdown)
    assert "The paper reports that untargeted attacks" in text, "claims on Home are attributed, not asserted"


# ------------------------------------------------------------------------------------------------ the tour
def test_tour_step_1_opens_the_attack_lab_on_the_plain_model_with_the_preview():
    at = app()
    at.button(key="tour_go_0").click().run()
    ok(at)
    assert at.title[0].value == "Attack Lab"
    assert at.session_state["model_ref"].name == "cifar10-demo-plain"
    assert at.selectbox(key="atk_name").value == "pgd" and at.number_input(key="atk_eps255").value == 8.0
    assert at.number_input(key="atk_n").value == 64 and at.checkbox(key="atk_targeted").value is False
    assert any("Tour, step 1 of 7" in m.value for m in at.markdown)
    assert titles(at) == ["Natural energies of the chosen test images (the arrows start here)"]


def test_tour_steps_2_to_4_run_the_attacks_they_describe():
    at = app()
    at.button(key="tour_go_0").click().run()
    at.button(key="tour_next").click().run()          # step 2: PGD on the plain model, run at once
    r = wait_attack(at)
    assert r["spec"].name == "pgd" and not r["spec"].targeted and abs(r["spec"].eps - 8 / 255) < 1e-9
    assert r["model"] == "cifar10-demo-plain" and "b" not in r
    claim = [s.value for s in at.success] + [w.value for w in at.warning]
    assert any("PGD (cross-entropy) lowered E(x) for" in c for c in claim), claim
    at.button(key="tour_next").click().run()          # step 3: the same attack side by side with SAT
    r = wait_attack(at, previous=r)
    assert r["b"]["model"] == "cifar10-demo-sat" and at.toggle(key="atk_compare").value is True
    t = titles(at)
    assert "Energy drift — cifar10-demo-plain" in t and "Energy drift — cifar10-demo-sat" in t
    # shared axes: both arrow charts have the same fixed ranges
    from apptest_helpers import charts

    arrows = [c.layout for c in charts(at) if c.title.startswith("Energy drift —")]
    assert arrows[0]["xaxis"]["range"] == arrows[1]["xaxis"]["range"]
    plain_d = abs(r["trace"].delta_marginal()).mean()
    sat_d = abs(r["b"]["trace"].delta_marginal()).mean()
    assert sat_d < plain_d, (sat_d, plain_d)
    at.button(key="tour_next").click().run()          # step 4: APGD-T (the targeted attack of Fig. 2), no second model
    r = wait_attack(at, previous=r)
    assert r["spec"].name == "apgd-t" and "b" not in r and r["model"] == "cifar10-demo-plain"
    claim = [s.value for s in at.success] + [w.value for w in at.warning]
    assert any("APGD-T" in c and "lowered E(x) for" in c for c in claim), claim


def test_tour_steps_5_and_6_open_the_recorded_runs():
    at = app()
    at.button(key="tour_go_4").click().run()
    ok(at)
    assert at.title[0].value == "Training studio"
    fig3 = "recorded:cifar10-demo-2k-"
    assert at.selectbox(key="tr_view").value == fig3 + "sat"
    assert set(at.multiselect(key="tr_compare").value) == {fig3 + "sat", fig3 + "trades", fig3 + "weat-adv"}
    assert any(t.startswith("ΔE during training — cifar10-demo-2k-sat") for t in titles(at))
    at.button(key="tour_next").click().run()
    ok(at)
    assert at.selectbox(key="tr_view").value == fig3 + "weat-adv"


def test_training_studio_tells_the_fig3_story_from_the_records():
    """The story block states the numbers of the shipped records (computed here from the files, independently of the
    page), and its button opens the Attack Lab side by side on SAT's peak and end checkpoints."""
    from core.recorded import FIG3_RUNS, list_recorded, read_recorded_metrics

    at = app()
    at.button(key="tour_go_4").click().run()        # the tour's Fig. 3 step opens the Training studio on these runs
    ok(at)
    assert any(h.value.startswith("Fig. 3 on real images") for h in at.subheader)
    text = " ".join(m.value for m in at.markdown)
    runs = {r.name: r for r in list_recorded()}
    for name in FIG3_RUNS:
        recs = read_recorded_metrics(runs[name])
        pgd = [r["pgd_acc"] for r in recs]
        k = max(range(len(pgd)), key=lambda i: (pgd[i], -i))          # the first epoch of the highest accuracy
        method = runs[name].config["method"].upper()
        assert f"{method}: robust test accuracy peaked at {100 * pgd[k]:.1f}% in epoch {recs[k]['epoch']} and ended " \
               f"at {100 * pgd[-1]:.1f}% after {recs[-1]['epoch']} epochs" in text, (method, text[:2000])
        assert f"robust accuracy reaches {100 * recs[-1]['probe_adv_acc']:.1f}%" in text
    assert "ΔE(x) on the training data enters phase 3 at epoch" in text    # SAT's sentence
    assert "TRADES: " in text and "ΔE(x) shows no phase 3" in text
    from apptest_helpers import chart_with

    chart_with(at, "Robust accuracy: training probe")                  # the Fig. 3 story chart
    at.button(key="tr_peak_vs_end").click().run()
    ok(at)
    assert at.title[0].value == "Attack Lab"
    assert at.session_state["model_ref"].name == "cifar10-demo-2k-sat-peak"
    r = wait_attack(at)
    assert r["model"] == "cifar10-demo-2k-sat-peak" and r["b"]["model"] == "cifar10-demo-2k-sat-end"
    # the overfitted model is less robust on the same images and attack than the peak one
    assert r["b"]["trace"].robust_accuracy() <= r["trace"].robust_accuracy()


def test_next_step_follows_the_tour_to_another_page():
    """"Next step" on the last step of a page opens the next step's page (Attack Lab → Training studio, Training
    studio → SGLD studio), with the step's widgets set."""
    at = app()
    at.button(key="tour_go_3").click().run()           # step 4, Attack Lab
    ok(at)
    assert at.title[0].value == "Attack Lab"
    at.button(key="tour_next").click().run()            # step 5 lives on the Training studio
    ok(at)
    assert at.title[0].value == "Training studio"
    assert any("Tour, step 5 of 7" in m.value for m in at.markdown)
    assert at.selectbox(key="tr_view").value == "recorded:cifar10-demo-2k-sat"
    at.button(key="tour_next").click().run()            # step 6, same page
    at.button(key="tour_next").click().run()            # step 7 lives on the SGLD studio
    ok(at)
    assert at.title[0].value == "SGLD studio" and at.session_state["model_ref"].name == "cifar10-demo-sat"
    assert any("Tour, step 7 of 7" in m.value for m in at.markdown)


def test_tour_step_7_starts_sgld_chains_with_the_sat_model():
    at = app()
    at.button(key="tour_go_6").click().run()
    ok(at)
    assert at.title[0].value == "SGLD studio" and at.session_state["model_ref"].name == "cifar10-demo-sat"
    t0 = time.time()   # the start statistics are prepared in the background once per model: the chains follow
    while "sgld_sampler" not in at.session_state and time.time() - t0 < 180:
        time.sleep(0.3)
        at.run()
        ok(at)
    s = at.session_state["sgld_sampler"]
    assert s.classes == [1, 7] and s.counts == [4, 4] and s.init == "pca"


# ------------------------------------------------------------------------------------------------ uploads
def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _high_energy_image(model) -> np.ndarray:
    """An image the model finds very unlikely: gradient ascent on E(x) = -logsumexp f(x) from mid-grey."""
    import torch

    from core.energy import marginal_energy

    x = torch.full((1, 3, 32, 32), 0.5)
    for _ in range(40):
        x.requires_grad_(True)
        (g,) = torch.autograd.grad(marginal_energy(model(x)).sum(), x)
        x = (x.detach() + 0.02 * g.sign()).clamp(0, 1)
    return (x[0].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)


def test_upload_hint_compares_the_energy_with_the_model_test_images():
    from core.data import load_dataset
    from core.models import load_checkpoint

    at = app()
    open_page(at, "attack")
    img = load_dataset("cifar10-demo", "test").x[3].numpy().transpose(1, 2, 0)
    at.file_uploader(key="atk_upload").set_value(("cat.png", _png(img), "image/png")).run()
    ok(at)
    assert any("within the range of the data" in c.value for c in at.caption), [c.value for c in at.caption]
    assert not any("out of distribution" in w.value for w in at.warning)
    odd = _high_energy_image(load_checkpoint(at.session_state["model_ref"].path).model.eval())
    at.file_uploader(key="atk_upload").set_value(("odd.png", _png(odd), "image/png")).run()
    ok(at)
    warn = [w.value for w in at.warning if "out of distribution" in w.value]
    assert warn and "99th percentile" in warn[0], [w.value for w in at.warning]


# ------------------------------------------------------------------------------------------------ reload
def test_attack_result_survives_a_reload_and_clear_removes_it():
    from streamlit.testing.v1 import AppTest

    at = app()
    open_page(at, "attack")
    at.button[0].click().run()
    r = wait_attack(at)
    sid = at.query_params["s"]
    sid = sid[0] if isinstance(sid, list) else sid
    at2 = AppTest.from_file(HOME, default_timeout=120)
    at2.query_params["s"] = sid
    at2.run()
    open_page(at2, "attack")
    ok(at2)
    r2 = at2.session_state["atk_result"]
    assert np.array_equal(r2["trace"].marginal, r["trace"].marginal) and r2["spec"] == r["spec"]
    assert at2.metric, "the restored result is drawn"
    at2.button(key="clear_attack").click().run()
    ok(at2)
    at3 = AppTest.from_file(HOME, default_timeout=120)
    at3.query_params["s"] = sid
    at3.run()
    open_page(at3, "attack")
    assert "atk_result" not in at3.session_state


def test_sgld_chains_survive_a_reload():
    from streamlit.testing.v1 import AppTest

    at = app()
    at.button(key="tour_go_6").click().run()
    at.button(key="sgld_btn_step10").click().run()
    ok(at)
    s = at.session_state["sgld_sampler"]
    assert s.steps_done == 10
    sid = at.query_params["s"]
    at2 = AppTest.from_file(HOME, default_timeout=120)
    at2.query_params["s"] = sid[0] if isinstance(sid, list) else sid
    at2.session_state["model_source"] = "Bundled"
    at2.session_state["pick-Bundled"] = "cifar10-demo-sat"
    at2.run()
    open_page(at2, "sgld")
    ok(at2)
    s2 = at2.session_state["sgld_sampler"]
    assert s2.steps_done == 10 and np.array_equal(s2.images().numpy(), s.images().numpy())


def test_sgld_state_round_trip_continues_exactly():
    import torch

    from core.models import load_checkpoint
    from core.sampling import SGLDSampler

    lm = load_checkpoint(REPO / "checkpoints" / "digits-sat.safetensors")
    s = SGLDSampler(lm, [0, 3], 2, init="random", seed=5)
    s.step(4)
    r = SGLDSampler.from_state(lm, *s.state())
    a, b = s.step(3), r.step(3)
    assert torch.equal(a.images, b.images) and np.array_equal(s.trace.joint, r.trace.joint)
    arrays, meta = s.state()
    arrays["x"] = arrays["x"][:1]
    from core.errors import InputError

    with pytest.raises(InputError, match="does not match"):
        SGLDSampler.from_state(lm, arrays, meta)


@pytest.mark.slow
def test_a_process_that_ends_while_a_task_runs_exits_cleanly(tmp_path):
    """A session ends while SGLD chains still run in a background task (the tour's step 7): the process cancels the
    task at exit instead of aborting inside torch (exit code 134, "terminate called without an active exception")."""
    script = tmp_path / "end_while_running.py"
    script.write_text(f"""
import os
os.environ["ENERGYLENS_CACHE"] = {str(tmp_path / "cache")!r}
os.environ["ENERGYLENS_RUNS"] = {str(tmp_path / "runs")!r}
os.environ["ENERGYLENS_UMAP_WARMUP"] = "0"
from streamlit.testing.v1 import AppTest
at = AppTest.from_file({HOME!r}, default_timeout=120).run()
at.button(key="tour_go_6").click().run()
import threading
assert any(t.name.startswith("energylens-") and t.is_alive() for t in threading.enumerate()), "no task running"
print("leaving with a task running")
""")
    out = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    assert "leaving with a task running" in out.stdout and "terminate called" not in out.stderr
