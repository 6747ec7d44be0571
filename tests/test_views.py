"""Figure-level and text-level tests of the views (issue 13 items 6-10): what a chart or a label says,
decoded from the figure objects and strings the pages show. Page behaviour is tested with AppTest in
tests/test_pages.py, tests/test_analysis_pages.py and tests/test_training_page.py."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

from core.attacks import AttackSpec, attack_slug, describe_attack, format_eps  # noqa: E402
from core.errors import InputError  # noqa: E402


# ---------------------------------------------------------------------------------------------------- ε and run labels
@pytest.mark.parametrize("eps,norm,text", [(16 / 255, "Linf", "16/255"), (-5 / 255, "Linf", "-5/255"),
                                           (0.5 / 255, "Linf", "0.5/255"), (0.0, "Linf", "0"),
                                           (8 / 255, "Linf", "8/255"), (0.5, "L2", "0.5"), (-1.0, "L2", "-1")])
def test_format_eps_uses_the_widgets_units(eps, norm, text):
    assert format_eps(eps, norm) == text


def test_epsilon_errors_speak_the_widgets_units():
    """Issue 13 item 10: '-5/255', not 'got -0.0196078431372549'."""
    with pytest.raises(InputError, match=r"epsilon must be >= 0, got -5/255$"):
        AttackSpec(eps=-5 / 255).validate()
    with pytest.raises(InputError, match=r"epsilon 300/255 is absurd for Linf .*max 255/255"):
        AttackSpec(eps=300 / 255).validate()
    with pytest.raises(InputError, match=r"got -0.5$"):
        AttackSpec(norm="L2", eps=-0.5).validate()
    from core.train import TrainConfig

    with pytest.raises(InputError, match=r"epsilon must lie in \[0, 1\].*got 300/255"):
        TrainConfig(eps=300 / 255).validate()


def test_targeted_runs_are_labelled_as_targeted():
    """Issue 13 item 10: a targeted run's label says so (and how targets were chosen)."""
    base = describe_attack(AttackSpec("pgd", eps=16 / 255, steps=10))
    assert base == "PGD (cross-entropy), Linf ε = 16/255, 10 steps"
    assert "targeted (random targets)" in describe_attack(AttackSpec("pgd", eps=16 / 255, targeted=True))
    assert "targeted (least-likely targets)" in describe_attack(AttackSpec("cw", targeted=True,
                                                                           target_mode="least-likely"))
    chosen = describe_attack(AttackSpec("pgd", targeted=True, target_mode="chosen", target_class=3),
                             class_names=[f"c{i}" for i in range(10)])
    assert "targeted → class c3" in chosen
    assert describe_attack(AttackSpec("square", steps=300)).endswith("300 queries")
    assert attack_slug(AttackSpec("pgd", eps=16 / 255, steps=10)) == "pgd_Linf-16-255_10steps"
    assert attack_slug(AttackSpec("pgd", eps=16 / 255, targeted=True)).endswith("_targeted-random")
    assert attack_slug(AttackSpec("pgd", norm="L2", eps=0.5)) == "pgd_L2-0.5_10steps"


def test_trace_csv_carries_the_runs_context():
    """Issue 13 item 10: the exported trace says which model, attack and ε it comes from."""
    import torch

    from core.attacks import run_attack
    from core.models import build_model

    torch.manual_seed(0)
    model = build_model("smallcnn", num_classes=10, in_channels=1)
    x, y = torch.rand(3, 1, 16, 16), torch.tensor([0, 1, 2])
    tr = run_attack(model, x, y, AttackSpec("pgd", eps=8 / 255, steps=2)).trace
    rows = list(csv.DictReader(io.StringIO(tr.to_csv({"model": "m1", "attack": "pgd", "eps_text": "8/255"}))))
    assert len(rows) == 3 * 3
    assert list(rows[0])[:3] == ["model", "attack", "eps_text"]
    assert {r["model"] for r in rows} == {"m1"} and {r["eps_text"] for r in rows} == {"8/255"}
    assert float(rows[0]["E_x"]) == pytest.approx(float(tr.marginal[0, 0]), rel=1e-6)
    assert "model" not in tr.to_csv().splitlines()[0]


# ---------------------------------------------------------------------------------------------------- examples.png
def test_examples_png_has_row_labels():
    """Issue 13 item 10: the examples grid names its rows; a label strip with text precedes each row."""
    from PIL import Image

    import figures as fig

    imgs = np.full((6, 3, 16, 16), 0.5)
    plain = Image.open(io.BytesIO(fig.image_grid_png(imgs, ncol=2)))
    labelled = Image.open(io.BytesIO(fig.image_grid_png(imgs, ncol=2, row_labels=["natural", "adversarial", "pert."])))
    assert labelled.height == plain.height and labelled.width > plain.width
    strip = np.asarray(labelled.convert("L"))[:, :labelled.width - plain.width]
    row_h = plain.height // 3
    for r in range(3):  # dark text pixels inside each row's band of the strip
        assert (strip[r * row_h:(r + 1) * row_h] < 100).sum() > 10, r
    assert np.array_equal(np.asarray(labelled)[:, labelled.width - plain.width:], np.asarray(plain.convert("RGB")))


# ---------------------------------------------------------------------------------------------------- Fig. 3
def _phase(p1, p3, text="Too few epochs to tell phases apart: 3 usable value(s), need at least 10."):
    from core.phase import PhaseResult

    return PhaseResult(p1, p3, 0.0, text)


def _shaded(fig) -> list[str]:
    return [a.text for a in fig.layout.annotations if a.text and a.text.startswith("phase")]


def test_fig3_shades_no_phase_when_the_detector_cannot_tell():
    """Issue 13 item 10: 'Too few epochs to tell phases apart' must not come with a 'phase 2' shading."""
    import training_figures as tfig

    ep = np.arange(1, 4)
    curves = {"ΔE(x)": (np.array([0.1, 0.2, 0.15]), None)}
    fig = tfig.phase_figure(ep, curves, {"robust test error": np.array([0.8, 0.7, 0.6])}, _phase(None, None))
    assert _shaded(fig) == [] and not fig.layout.shapes
    fig = tfig.phase_figure(np.arange(1, 41), {"ΔE(x)": (np.linspace(0, 1, 40), None)}, {},
                            _phase(5.0, 28.0, "Robust overfitting from epoch 28"))
    assert _shaded(fig) == list(tfig.PHASE_NAMES)   # named as the paper names them
    fig = tfig.phase_figure(np.arange(1, 41), {"ΔE(x)": (np.linspace(0, 1, 40), None)}, {},
                            _phase(6.0, None, "No steep sustained fall"))
    assert _shaded(fig) == list(tfig.PHASE_NAMES[:2])


@pytest.mark.parametrize("errs", [[0.89, 0.74, 0.58, 0.62], [0.31, 0.30, 0.33], [0.05, 0.95], [np.nan, 0.5],
                                  [0.0, 0.02], [0.99, 1.0]])
def test_fig3_error_axis_has_round_ticks_covering_the_data(errs):
    """Issue 13 item 10: the right axis ticks at multiples of 5/10/20 % (it showed 89 %, 74 %, 58 %)."""
    import training_figures as tfig

    e = np.asarray(errs, float)
    ep = np.arange(1, len(e) + 1)
    fig = tfig.phase_figure(ep, {"ΔE(x)": (np.zeros(len(e)), None)}, {"robust test error": e, "natural test error": e / 2},
                            None)
    ax = fig.layout.yaxis2
    assert ax.tickmode == "linear" and ax.tick0 == 0 and ax.tickformat == ".0%"
    assert ax.dtick in (0.05, 0.1, 0.2)
    lo, hi = ax.range
    for v in (lo, hi):
        assert abs(v / ax.dtick - round(v / ax.dtick)) < 1e-6, (v, ax.dtick)
    fin = np.concatenate([e, e / 2])
    fin = fin[np.isfinite(fin)]
    assert 0 <= lo <= fin.min() + 1e-9 and fin.max() - 1e-9 <= hi <= 1
    assert (hi - lo) / ax.dtick <= 10


# ---------------------------------------------------------------------------------------------------- arrows
def test_arrow_snapshot_axes_follow_the_points_not_the_diagonal():
    """Issue 13 item 10: at epoch 1 E(x) spans [-2.4, -2.2] while E(x,y) is near 0: the axes must cover the
    points (padded), not the diagonal's union range that squashed them."""
    import figures as fig

    rng = np.random.default_rng(0)
    e_nat, e_adv = -2.3 + 0.05 * rng.standard_normal(50), -2.25 + 0.05 * rng.standard_normal(50)
    ey_nat, ey_adv = 0.1 + 0.02 * rng.standard_normal(50), 0.2 + 0.02 * rng.standard_normal(50)
    f = fig.energy_arrows(e_nat, ey_nat, e_adv, ey_adv)
    xr, yr = list(f.layout.xaxis.range), list(f.layout.yaxis.range)
    xs = np.concatenate([e_nat, e_adv])
    ys = np.concatenate([ey_nat, ey_adv])
    assert xr[0] < xs.min() and xr[1] > xs.max() and yr[0] < ys.min() and yr[1] > ys.max()
    assert (xr[1] - xr[0]) < 2 * (xs.max() - xs.min()) + 0.2   # the points fill the plot ...
    assert (yr[1] - yr[0]) < 2 * (ys.max() - ys.min()) + 0.2   # ... in both directions
    diag = next(t for t in f.data if t.name and t.name.startswith("zero loss"))
    assert list(diag.x) == list(diag.y)                         # still the E(x,y) = E(x) line
    g = fig.natural_energies(e_nat, ey_nat, ["a"] * 50)
    assert g.layout.xaxis.range[1] - g.layout.xaxis.range[0] < 1.0 and g.layout.yaxis.range[0] > -1.0


# ---------------------------------------------------------------------------------------------------- Fig. 4
def test_landscape_ticks_do_not_overlap_and_no_violin_is_clipped():
    """Issue 13 item 10: ticks 0.1, 0 and -0.1 were drawn on top of each other, and the y range clipped the
    longest violin. Ticks are now at least 1/11 of the axis apart and the range covers every value."""
    import analysis_figures as af
    from axes import symlog

    from core.analysis import LandscapeResult

    rng = np.random.default_rng(1)
    lab = np.zeros(128, int)
    spreads = {"plain": (3.0, 8.0), "sat": (0.6, 0.5), "trades": (0.05, 0.1), "weat": (0.01, 0.02)}
    res = []
    for i, (name, (mu, sd)) in enumerate(spreads.items()):
        d = mu + sd * rng.standard_normal(128)
        d[0] = 40.0 if name == "plain" else d[0]                  # one long tail
        res.append(LandscapeResult(name, e_nat=d, e_adv=np.zeros(128), ej_nat=np.zeros(128), ej_adv=d / 3,
                                   pred_nat=lab, pred_adv=np.where(np.arange(128) < 30 * i, 0, 1), labels=lab))
    fig = af.landscape_figure(res, c=1.0)
    ax = fig.layout.yaxis
    t = np.asarray(ax.tickvals, float)
    lo, hi = ax.range
    assert np.all(np.diff(t) >= (hi - lo) / 12), list(zip(ax.ticktext, t))
    allv = np.concatenate([np.concatenate([r.delta_marginal, r.delta_joint]) for r in res])
    assert lo < symlog(allv).min() and hi > symlog(allv).max()
    assert "0" in ax.ticktext and "10" in ax.ticktext


# ---------------------------------------------------------------------------------------------
# symmetric log axis (dashboard/axes.py)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("c", [0.01, 0.1, 1.0, 10.0])
def test_symlog_monotone_odd_and_invertible(c):
    import axes

    v = np.sort(np.concatenate([-np.logspace(-4, 4, 200), [0.0], np.logspace(-4, 4, 200)]))
    t = axes.symlog(v, c)
    assert np.all(np.diff(t) > 0)
    np.testing.assert_allclose(axes.symlog(-v, c), -t)
    np.testing.assert_allclose(axes.symlog_inverse(t, c), v, rtol=1e-9, atol=1e-12)
    # linear near zero: symlog(v) ~ v / (c ln 10)
    assert axes.symlog(1e-6 * c, c) == pytest.approx(1e-6 / np.log(10), rel=1e-5)
    with pytest.raises(InputError):
        axes.symlog(v, 0.0)


def test_symlog_ticks():
    import axes

    vals, text = axes.symlog_ticks(-250.0, 3.0, c=1.0)
    assert "0" in text and "-100" in text and "1" in text
    assert vals == sorted(vals) and len(vals) <= 11
    back = axes.symlog_inverse(np.array(vals), 1.0)
    assert back.min() >= -250.0 - 1e-9 and back.max() <= 3.0 + 1e-9
    np.testing.assert_allclose(back, [float(s) for s in text], rtol=1e-9)
    vals, text = axes.symlog_ticks(-0.05, 0.03, c=0.01)
    assert "0" in text and len(vals) >= 3
