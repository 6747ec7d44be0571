"""What the paper says an attack does to the marginal energy, checked against the trace on screen.

Sec. 3.1 and Fig. 2 of the paper describe three behaviours of E(x) under an attack, on a non-robust model:

* **lower** -- untargeted CE attacks (PGD, TRADES-KL, APGD-CE) push E(x) *down*: adversarial points look more likely
  to the model than the data (ΔE(x) = E(x) - E(x*) > 0);
* **raise** -- targeted attacks (targeted PGD, APGD-T) and FAB push E(x) *up*, out of distribution (ΔE(x) < 0);
* **overlap** -- margin attacks (CW, APGD-DLR) and Square barely move it: the adversarial E(x) distribution
  overlaps the natural one.

Those three statements are about *non-robust* models. For *robust* (adversarially trained) models the paper's claim is
Fig. 4's: under PGD their ΔE(x) stays near 0 (SAT, TRADES, ...), orders of magnitude below a non-robust model's. The
claim a page checks is therefore chosen from the model (:func:`model_kind`: its training method, else its measured
robustness) and the sentence says which one it checked.

**One rule for the three outcomes** (:func:`energy_shift`). The shift is measured in units of the natural spread:
``d = mean(ΔE(x)) / std(E(x))`` over the images the attack changed, with a 95 % bootstrap confidence interval (images
resampled, a fixed seed). With the band ``NEAR_ZERO`` = 0.25 (a "small" standardised effect):

* **lower** when the whole interval lies above +0.25, **raise** when it lies below -0.25,
* **overlap** (E(x) did not move appreciably) when the whole interval lies inside [-0.25, +0.25],
* **undecided** when the interval straddles +-0.25: too few images to tell (more images narrow it).

The shared histogram area (``overlap_coefficient``) is reported as a description, not used to judge.

:func:`marginal_claim` reads an :class:`~core.drift.EnergyTrace` and says, with numbers, whether this run does what
the paper reports. Pages print its sentence next to the Fig. 1 / Fig. 2 views instead of asserting the claim, so the
text can never contradict the chart. Robust models are expected to move E(x) little whatever the attack (Fig. 4); the
sentence reports the share of images moved and the mean shift either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .drift import EnergyTrace
from .losses import METHODS

__all__ = ["EXPECTED", "Claim", "EnergyShift", "expected_direction", "marginal_claim", "overlap_coefficient",
           "energy_shift", "model_kind", "NEAR_ZERO", "RULE", "ROBUST_CLAIM_ATTACKS"]

# attack -> expected effect on E(x) (untargeted mode); targeted runs of PGD / CW flip or keep it, see below
EXPECTED = {"pgd": "lower", "trades-kl": "lower", "apgd-ce": "lower", "apgd-t": "raise", "fab": "raise",
            "fab-t": "raise", "cw": "overlap", "apgd-dlr": "overlap", "square": "overlap"}
NEAR_ZERO = 0.25    # |mean ΔE(x)| / std(natural E(x)) below which E(x) "did not move" (the overlap band)
BOOTSTRAP = 2000    # resamples of the confidence interval
RULE = ("Verdict rule: the mean shift ΔE(x) = E(x) − E(x*) in units of the natural E(x) spread, with a 95% bootstrap "
        f"interval; 'lowered' if the interval lies above +{NEAR_ZERO:g}, 'raised' if below −{NEAR_ZERO:g}, "
        f"'did not move' if it lies within ±{NEAR_ZERO:g}, else 'undecided' (too few images to tell). The claim "
        "checked depends on the model: Sec. 3.1 / Fig. 2 for a non-robust model, Fig. 4 (E(x) stays put under PGD) "
        "for a robust one.")
# attacks for which the paper states the robust-model claim (Fig. 4: PGD, untargeted CE attacks)
ROBUST_CLAIM_ATTACKS = ("pgd", "trades-kl", "apgd-ce")


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
class EnergyShift:
    """The mean shift of E(x) in natural-spread units, its 95 % bootstrap interval and the outcome of the rule."""

    d: float                    # mean ΔE(x) / std(natural E(x)); > 0: E(x) lowered
    lo: float
    hi: float
    outcome: str                # 'lower' | 'raise' | 'overlap' | 'undecided'

    def describe(self) -> str:
        return f"{self.d:+.2f} natural spreads (95% CI {self.lo:+.2f} to {self.hi:+.2f})"


def energy_shift(nat, adv, near_zero: float = NEAR_ZERO, n_boot: int = BOOTSTRAP, seed: int = 0) -> EnergyShift:
    """The rule of the module docstring on paired natural / adversarial marginal energies (finite pairs only)."""
    nat, adv = np.asarray(nat, float), np.asarray(adv, float)
    ok = np.isfinite(nat) & np.isfinite(adv)
    nat, adv = nat[ok], adv[ok]
    n = len(nat)
    if n == 0:
        return EnergyShift(float("nan"), float("nan"), float("nan"), "undecided")
    delta = nat - adv
    spread = float(nat.std())
    if not spread > 0:   # every natural energy equal: scale by the shifts themselves (or call a zero shift zero)
        spread = float(np.abs(delta).mean()) or 1.0
    d = float(delta.mean()) / spread
    if n < 2:
        lo = hi = d
    else:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n, size=(n_boot, n))
        sd = nat[idx].std(axis=1)
        sd = np.where(sd > 0, sd, spread)
        boot = delta[idx].mean(axis=1) / sd
        lo, hi = (float(q) for q in np.quantile(boot, [0.025, 0.975]))
        lo, hi = min(lo, d), max(hi, d)
    if lo > near_zero:
        outcome = "lower"
    elif hi < -near_zero:
        outcome = "raise"
    elif -near_zero <= lo and hi <= near_zero:
        outcome = "overlap"
    else:
        outcome = "undecided"
    return EnergyShift(d, lo, hi, outcome)


def model_kind(method: str | None = None, source: str | None = None, name: str | None = None,
               robust_accuracy: float | None = None) -> tuple[str | None, str]:
    """('robust' | 'non-robust' | None, the reason in words) for choosing the paper's claim.

    From the training method when it is known (adversarial training = robust; 'plain' = not), a RobustBench zoo
    entry (all robust except 'Standard'), else from the measured robust accuracy under a gradient attack
    (``robust_accuracy``, >= 10 % at the dataset's ε = robust). None when nothing tells."""
    m = (method or "").lower()
    if m in METHODS:
        if METHODS[m].inner == "none":
            return "non-robust", "trained without adversarial examples"
        return "robust", f"adversarially trained ({m.upper()})"
    if (source or "") == "zoo" or m == "zoo":
        if (name or "").lower() == "standard":
            return "non-robust", "RobustBench's non-robust 'Standard' model"
        return "robust", "a RobustBench model (adversarially trained)"
    if robust_accuracy is not None and np.isfinite(robust_accuracy):
        if robust_accuracy >= 0.10:
            return "robust", f"measured: {robust_accuracy:.0%} robust accuracy under this attack"
        return "non-robust", f"measured: {robust_accuracy:.0%} robust accuracy under this attack"
    return None, "the model's training is unknown"


@dataclass
class Claim:
    expected: str | None        # 'lower' | 'raise' | 'overlap' | None
    holds: bool | None          # None: the paper makes no claim here, or too few images to tell
    share_lowered: float        # fraction of images with E(x*) < E(x)
    mean_delta: float           # mean ΔE(x) = E(x) - E(x*)
    overlap: float              # shared histogram area of natural and adversarial E(x) (descriptive)
    n: int
    text: str                   # one sentence, computed from the numbers above
    shift: EnergyShift | None = None
    kind: str | None = None     # the model kind the claim was chosen for ('robust' / 'non-robust' / None)
    source: str = ""            # which statement of the paper was checked


OUTCOME_WORDS = {"lower": "E(x) was lowered", "raise": "E(x) was raised", "overlap": "E(x) did not move appreciably",
                 "undecided": "too few images to tell whether E(x) moved"}


def marginal_claim(trace: EnergyTrace, attack: str | None = None, targeted: bool | None = None,
                   label: str | None = None, *, method: str | None = None, source: str | None = None,
                   model_name: str | None = None) -> Claim:
    """Check the paper's statement for ``attack`` on this trace and this kind of model (module docstring).

    ``attack`` / ``targeted`` default to the trace's own metadata; ``label`` names the attack in the sentence;
    ``method`` / ``source`` / ``model_name``: the model's training method, origin and name (its metadata), which
    choose the claim (non-robust: Sec. 3.1 / Fig. 2; robust: Fig. 4)."""
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
    shift = energy_shift(nat, adv)
    measured = None
    if (attack or "") in ROBUST_CLAIM_ATTACKS and not targeted:
        try:
            measured = float(trace.robust_accuracy())
        except Exception:  # noqa: BLE001 -- a trace without predictions: the kind stays unknown
            measured = None
    kind, why = model_kind(method, source, model_name, measured)
    whose = (f"of the {n} images it changed ({trace.n_samples - n} left untouched)" if n < trace.n_samples
             else f"of these {n} images")
    moved = (f"{name} lowered E(x) for {share:.0%} {whose}; mean ΔE(x) = {mean:+.3g}, {shift.describe()}: "
             f"{OUTCOME_WORDS[shift.outcome]}")
    if kind == "robust":
        if (attack or "") in ROBUST_CLAIM_ATTACKS and not targeted:
            exp, source_ = "overlap", "Fig. 4 (robust models)"
            claim_words = "a robust model's E(x) stays near its natural value under PGD"
        else:
            return Claim(None, None, share, mean, ovl, n,
                         f"{moved}. This model is robust ({why}); the paper states what robust models do under PGD "
                         "(Fig. 4), not under this attack, so there is no claim to check.", shift, kind, "")
    else:
        exp = expected_direction(attack or "", targeted)
        source_ = "Sec. 3.1 / Fig. 2 (non-robust models)"
        claim_words = {"lower": "untargeted attacks lower E(x)", "raise": "targeted attacks and FAB raise E(x)",
                       "overlap": "margin attacks and Square leave E(x) where it was"}.get(exp or "", "")
    if exp is None:
        return Claim(None, None, share, mean, ovl, n, moved + ".", shift, kind, "")
    who = (f"This model is {kind} ({why}), so that is the claim checked" if kind else
           "This model's training is unknown, so it is judged as a non-robust model")
    if shift.outcome == "undecided":
        holds = None
        verdict = f"undecided (the interval straddles ±{NEAR_ZERO:g}; attack more images to tell)"
    else:
        holds = shift.outcome == exp
        verdict = "the claim holds" if holds else "the claim does not hold on this model"
    text = f"{moved}. The paper, {source_}: {claim_words}. {who}: {verdict}."
    return Claim(exp, holds, share, mean, ovl, n, text, shift, kind, source_)
