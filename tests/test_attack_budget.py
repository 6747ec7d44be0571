"""core.attacks.budget: AutoAttack's budgets, the interactive ones, and the cost scaled from a measured run."""

from __future__ import annotations

import pytest
import torch

from core.attacks import AttackSpec, describe_attack, interactive_batch_size, run_attack
from core.attacks import budget
from core.errors import InputError
from core.models import build_model


def test_full_cost_scales_the_measured_time_by_the_work_left_out():
    s = AttackSpec("apgd-t", steps=10, extra={"targets": 3})
    c = budget.full_cost(s, 2.0, num_classes=10)
    assert c["version"] == "standard" and c["setting"] == "100 iterations × 9 target classes"
    assert c["factor"] == pytest.approx(900 / 30) and c["seconds"] == pytest.approx(60.0)
    sq = budget.full_cost(AttackSpec("square", steps=300), 1.5, 10)
    assert sq["factor"] == pytest.approx(5000 / 300) and sq["setting"] == "5,000 queries"
    fab = budget.full_cost(AttackSpec("fab", steps=10), 3.0, 10)
    assert fab["version"] == "plus" and fab["factor"] == pytest.approx(50.0)
    assert budget.full_cost(AttackSpec("pgd", steps=10), 1.0, 10) is None          # not an AutoAttack component
    # 3 classes: at most 2 wrong classes to target, for the run and for AutoAttack alike
    t3 = budget.full_cost(AttackSpec("fab-t", steps=100, extra={"targets": 9}), 4.0, 3)
    assert t3["factor"] == pytest.approx(1.0) and "2 target classes" in t3["setting"]


@pytest.mark.parametrize("bad", [0, -2, 1.5, "3", True])
def test_bad_target_counts_are_refused_clearly(bad):
    with pytest.raises(InputError, match="number of target classes"):
        AttackSpec("apgd-t", extra={"targets": bad}).validate(10)


def test_interactive_batch_only_for_attacks_without_per_step_trace():
    assert interactive_batch_size("square") == budget.INTERACTIVE_BATCH
    assert interactive_batch_size("apgd-t") == budget.INTERACTIVE_BATCH
    assert interactive_batch_size("pgd") == 256


def test_fewer_targets_do_less_work_on_a_real_model():
    """APGD-T with 1 target vs 3 on images it cannot break (eps = 0, labels = the model's own predictions): the
    3-target run evaluates the model about 3x as often, and the description names the budget."""
    torch.manual_seed(0)
    model = build_model("smallcnn", 10).eval()
    x = torch.rand(8, 3, 32, 32)
    calls = {"n": 0}

    class Counting(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, z):
            calls["n"] += 1
            return self.m(z)

    counts = {}
    for t in (1, 3):
        calls["n"] = 0
        spec = AttackSpec("apgd-t", eps=0.0, steps=4, extra={"targets": t}, seed=0)
        run_attack(Counting(model), x, model(x).argmax(1), spec, fold_bn=False)
        counts[t] = calls["n"]
    assert counts[3] > 2 * counts[1]
    assert "3 target classes" in describe_attack(AttackSpec("apgd-t", extra={"targets": 3}))
