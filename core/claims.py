"""What the paper says an attack does to the marginal energy, checked against the trace on screen.

Sec. 3.1 and Fig. 2 of the paper describe three behaviours of E(x) under an attack, on a non-robust model:

* **lower** -- untargeted CE attacks (PGD, TRADES-KL, APGD-CE) push E(x) *down*: adversarial points look more likely
  to the model than the data (ΔE(x) = E(x) - E(x*) > 0);
* **raise** -- targeted attacks (targeted PGD, APGD-T) and FAB push E(x) *up*, out of distribution (ΔE(x) < 0);
* **overlap** -- margin attacks (CW, APGD-DLR) and Square barely move it: the adversarial E(x) distribution
  overlaps the natural one.

:func:`marginal_claim` reads an :class:`~core.drift.EnergyTrace` and says, with numbers, whether this run does what
the paper reports. Pages print its sentence next to the Fig. 1 / Fig. 2 views instead of asserting the claim, so the
text can never contradict the chart. Robust models are expected to move E(x) little whatever the attack (Fig. 4); the
sentence reports the share of images moved and the mean shift either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .drift import EnergyTrace

__all__ = ["EXPECTED", "Claim", "expected_direction", "marginal_claim", "overlap_coefficient", "OVERLAP_MIN"]

# attack -> expected effect on E(x) (untargeted mode); targeted runs of PGD / CW flip or keep it, see below
EXPECTED = {"pgd": "lower", "trades-kl": "lower", "apgd-ce": "lower", "apgd-t": "raise", "fab": "raise",
            "fab-t": "raise", "cw": "overlap", "apgd-dlr": "overlap", "square": "overlap"}
OVERLAP_MIN = 0.5   # overlap coefficient above which two E(x) distributions "overlap"


def expected_direction(attack: str, targeted: bool = False) -> str | None:
    """'lower', 'raise' or 'overlap' as the paper reports for this attack; None when it says nothing."""
    base = EXPECTED.get(attack)
    if base is None:
        return None
    if targeted and attack == "pgd":
        return "raise"    # "the dynamic is flipped for targeted attacks"
    if targeted and attack == "cw":
        return "overlap"  # CW-T: "E(x) plot is similar to Fig. 2a-CW"
    return base


def overlap_coefficient(a: np.ndarray, b: np.ndarray, bins: int = 30) -> float:
    """Shared area of the two histograms (1 = identical distributions, 0 = disjoint), on common bins."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if not len(a) or not len(b):
        return float("nan")
    lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
    if hi - lo < 1e-12:
        return 1.0
    edges = np.linspace(lo, hi, bins + 1)
    pa = np.histogram(a, edges)[0] / len(a)
    pb = np.histogram(b, edges)[0] / len(b)
    return float(np.minimum(pa, pb).sum())


@dataclass
class Claim:
    expected: str | None        # 'lower' | 'raise' | 'overlap' | None
    holds: bool | None          # None: the paper makes no claim for this attack
    share_lowered: float        # fraction of images with E(x*) < E(x)
    mean_delta: float           # mean ΔE(x) = E(x) - E(x*)
    overlap: float              # overlap coefficient of natural and adversarial E(x)
    n: int
    text: str                   # one sentence, computed from the numbers above


def marginal_claim(trace: EnergyTrace, attack: str | None = None, targeted: bool | None = None,
                   label: str | None = None) -> Claim:
    """Check the paper's Sec. 3.1 statement for ``attack`` on this trace (see the module docstring).

    ``attack`` / ``targeted`` default to the trace's own metadata; ``label`` names the attack in the sentence.
    """
    spec = (trace.meta or {}).get("attack") or {}
    attack = attack or spec.get("name")
    targeted = bool(spec.get("targeted", False)) if targeted is None else bool(targeted)
    nat, adv = np.asarray(trace.marginal[0], float), np.asarray(trace.marginal[-1], float)
    # AutoAttack's classes return the images they did not perturb unchanged: judge the attack on those it changed
    changed = trace.perturbed_mask()
    ok = np.isfinite(nat) & np.isfinite(adv) & changed
    nat, adv = nat[ok], adv[ok]
    n = int(len(nat))
    name = label or ((attack or "this attack") + (" (targeted)" if targeted else ""))
    if n == 0:
        return Claim(None, None, float("nan"), float("nan"), float("nan"), 0,
                     "No image was perturbed (or no finite energies): nothing to check.")
    delta = nat - adv
    share = float(np.mean(adv < nat))
    mean = float(delta.mean())
    ovl = overlap_coefficient(nat, adv)
    exp = expected_direction(attack or "", targeted)
    whose = (f"of the {n} images it changed ({trace.n_samples - n} left untouched)" if n < trace.n_samples
             else f"of these {n} images")
    moved = f"{name} lowered E(x) for {share:.0%} {whose}, mean ΔE(x) = {mean:+.3g}"
    if exp is None:
        return Claim(None, None, share, mean, ovl, n, moved + ".")
    if exp == "lower":
        holds = mean > 0 and share > 0.5
        if holds:
            tail = ("as the paper reports for untargeted attacks (Sec. 3.1): adversarial points look more likely to "
                    "the model")
        elif mean <= 0:
            tail = ("so E(x) was raised on average: this model does not follow the paper's Sec. 3.1 claim that "
                    "untargeted attacks lower E(x)")
        else:
            tail = ("but for no more than half of the images: on this model the evidence for the paper's claim that "
                    "untargeted attacks lower E(x) is mixed")
    elif exp == "raise":
        holds = mean < 0 and share < 0.5
        if holds:
            tail = ("so E(x) was raised, as the paper reports for targeted attacks and FAB: the adversarial points are "
                    "less likely to the model")
        elif mean >= 0:
            tail = ("so E(x) was not raised on average: this model does not follow the paper's claim that targeted "
                    "attacks push E(x) up")
        else:
            tail = ("so E(x) rose on average but not for most images: on this model the evidence for the paper's "
                    "claim that targeted attacks push E(x) up is mixed")
    else:
        holds = ovl >= OVERLAP_MIN
        tail = (f"and the natural and adversarial E(x) distributions overlap ({ovl:.0%} shared area), as the paper "
                "reports for margin attacks and Square" if holds else
                f"and the E(x) distributions overlap only {ovl:.0%}: unlike the paper's Fig. 2, this attack moved "
                "E(x) clearly")
    spread = float(nat.std())
    if spread > 0 and exp in ("lower", "raise"):
        tail += f" (the mean shift is {abs(mean) / spread:.0%} of the spread of natural E(x))"
    return Claim(exp, bool(holds), share, mean, ovl, n, f"{moved}, {tail}.")
