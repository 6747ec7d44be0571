"""Figure-level and text-level tests of the views (issue 13 items 6-10): what a chart or a label says,
decoded from the figure objects and strings the pages show. Page behaviour is tested with AppTest in
tests/test_pages.py, tests/test_analysis_pages.py and tests/test_training_page.py."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "dashboard"))

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
