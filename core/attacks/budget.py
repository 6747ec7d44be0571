"""Attack budgets: AutoAttack's own settings, the Attack Lab's interactive ones, and what the full one would cost.

AutoAttack (Croce & Hein, 2020) fixes each component's budget: the *standard* version runs APGD-CE
(100 iterations, 1 restart), APGD-T (100 iterations against each of the 9 most likely wrong classes),
FAB-T (100 iterations x 9 targets) and Square (5,000 queries); the *plus* version adds APGD-DLR and
untargeted FAB with 5 restarts of 100 iterations each. The interactive defaults keep every algorithm
as defined and only shrink its budget (fewer iterations, the 3 most likely wrong classes instead of
9, fewer queries), so a result answers in seconds; :func:`full_cost` then scales the *measured* time
of a run to the full budget, ``seconds x full work / work done``, where the work is iterations x
targets x restarts (queries for Square). That is an upper bound: AutoAttack skips images already
broken, so on a weak model the full run costs less.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ..data import check_image_count
from ..errors import InputError

__all__ = ["AutoAttackBudget", "AUTOATTACK", "INTERACTIVE_TARGETS", "MAX_INTERACTIVE_IMAGES", "n_targets",
           "work_units", "full_cost", "check_interactive_images"]

INTERACTIVE_TARGETS = 3          # APGD-T / FAB-T: the 3 most likely wrong classes (AutoAttack: 9)
MAX_INTERACTIVE_IMAGES = 5000    # images per interactive run (Attack Lab, embeddings); background jobs take more
INTERACTIVE_BATCH = 16           # images per call of an attack without per-step trace: progress and Cancel per batch


class Budgeted(Protocol):
    """What a budget reads of an attack: an :class:`~core.attacks.base.AttackSpec` (which imports this module)."""

    name: str
    steps: int
    extra: dict[str, Any] | None


@dataclass(frozen=True)
class AutoAttackBudget:
    version: str                 # 'standard' or 'plus' (the AutoAttack version the component belongs to)
    steps: int                   # iterations, or queries for Square
    targets: int = 1             # target classes per image (APGD-T, FAB-T)
    restarts: int = 1

    def describe(self, name: str) -> str:
        if name == "square":
            return f"{self.steps:,} queries"
        parts = [f"{self.steps} iterations"]
        if self.targets > 1:
            parts.append(f"{self.targets} target classes")
        if self.restarts > 1:
            parts.append(f"{self.restarts} restarts")
        return " × ".join(parts)


AUTOATTACK: dict[str, AutoAttackBudget] = {
    "apgd-ce": AutoAttackBudget("standard", 100),
    "apgd-t": AutoAttackBudget("standard", 100, targets=9),
    "fab-t": AutoAttackBudget("standard", 100, targets=9),
    "square": AutoAttackBudget("standard", 5000),
    "apgd-dlr": AutoAttackBudget("plus", 100, restarts=5),
    "fab": AutoAttackBudget("plus", 100, restarts=5),
}
TARGETED = ("apgd-t", "fab-t")


def n_targets(spec: Budgeted, num_classes: int) -> int:
    """Target classes an APGD-T / FAB-T run uses: ``spec.extra['targets']`` (default: AutoAttack's 9), at most
    the number of wrong classes."""
    t = spec.extra.get("targets", AUTOATTACK["apgd-t"].targets) if spec.extra else AUTOATTACK["apgd-t"].targets
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise InputError(f"the number of target classes must be a positive integer, got {t!r}")
    return max(1, min(int(t), int(num_classes) - 1))


def work_units(spec: Budgeted, num_classes: int) -> int:
    """Iterations x targets (x restarts: 1 here) of a run; queries for Square."""
    if spec.name in TARGETED:
        return int(spec.steps) * n_targets(spec, num_classes)
    return int(spec.steps)


def full_cost(spec: Budgeted, seconds: float, num_classes: int) -> dict | None:
    """What the AutoAttack budget of this component would cost, scaled from a measured run: {'version',
    'setting', 'factor', 'seconds'}; None for attacks that are not AutoAttack components."""
    full = AUTOATTACK.get(spec.name)
    if full is None or not seconds or seconds <= 0:
        return None
    targets = min(full.targets, max(int(num_classes) - 1, 1))
    full_units = full.steps * targets * full.restarts
    factor = full_units / max(work_units(spec, num_classes), 1)
    return {"version": full.version, "setting": AutoAttackBudget(full.version, full.steps, targets,
                                                                 full.restarts).describe(spec.name),
            "factor": factor, "seconds": float(seconds) * factor}


def check_interactive_images(n, available: int | None = None, *, split: str = "test",
                             dataset: str | None = None) -> int:
    """The number of images of an interactive run (an Attack Lab attack): a positive integer, at most the
    ``available`` images of the split and at most :data:`MAX_INTERACTIVE_IMAGES`. Returns it as an int."""
    return check_image_count(n, available, split=split, dataset=dataset, limit=MAX_INTERACTIVE_IMAGES)
