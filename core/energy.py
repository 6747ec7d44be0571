"""Energies of a classifier read as an energy-based model (paper Sec. 3, Eq. 2-6).

For logits f(x) in R^K:

* marginal energy   E(x)   = -logsumexp_k f(x)[k]                       (Eq. 2)
* joint energy      E(x,y) = -f(x)[y]                                    (Eq. 2)
* cross-entropy     CE(x,y) = E(x,y) - E(x)                              (Eq. 3)
* KL(p(.|x) || p(.|x*)) = E_{k~p(.|x)}[E(x*,k) - E(x,k)] + E(x) - E(x*)   (Prop. 1, Eq. 5)
* TRADES objective  CE(x,y) + beta*KL = E(x,y) + (beta-1)E(x)
                     - beta*{E(x*) + E_{p(.|x)}[E(x,k) - E(x*,k)]}        (Cor. 1, Eq. 6)
* energy drift      dE(x) = E(x) - E(x*),  dE(x,y) = E(x,y) - E(x*,y)     (Sec. 3.2)

All functions take logits of shape (N, K) and return per-sample tensors of shape (N,),
computed in float32 or wider even when the logits come from bf16/fp16 autocast.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError

__all__ = [
    "marginal_energy",
    "joint_energy",
    "joint_energies",
    "energy_drift",
    "cross_entropy_from_energies",
    "kl_from_energies",
    "kl_decomposition",
    "trades_objective_from_energies",
    "trades_objective",
    "weat_weight",
    "typicality",
    "OOD_QUANTILE",
]


def _as_float(logits: torch.Tensor) -> torch.Tensor:
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise InputError(f"logits must have shape (N, K) with K >= 1; got {tuple(logits.shape)}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        return logits.float()
    return logits


def _pair(logits_nat: torch.Tensor, logits_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both logit tensors as float, refusing shapes that differ (broadcasting would hide the error)."""
    ln, la = _as_float(logits_nat), _as_float(logits_adv)
    if ln.shape != la.shape:
        raise InputError(f"natural and adversarial logits differ in shape: {tuple(ln.shape)} vs {tuple(la.shape)}")
    return ln, la


def _labels(y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    y = torch.as_tensor(y, device=logits.device).long().reshape(-1)
    if y.numel() != logits.shape[0]:
        raise InputError(f"got {y.numel()} labels for {logits.shape[0]} logit rows")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
        raise InputError(f"labels must lie in [0, {logits.shape[1] - 1}]")
    return y


def marginal_energy(logits: torch.Tensor) -> torch.Tensor:
    """E(x) = -logsumexp f(x). Low energy means 'likely' from the model's point of view."""
    return -torch.logsumexp(_as_float(logits), dim=1)


def joint_energy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """E(x, y) = -f(x)[y] for the given labels."""
    logits = _as_float(logits)
    return -logits.gather(1, _labels(y, logits).unsqueeze(1)).squeeze(1)


def joint_energies(logits: torch.Tensor) -> torch.Tensor:
    """E(x, k) for every class k: shape (N, K)."""
    return -_as_float(logits)


def energy_drift(e_natural: torch.Tensor, e_adversarial: torch.Tensor) -> torch.Tensor:
    """Delta E = E(x) - E(x*), the paper's sign convention.

    Delta E > 0 means the adversarial point has *lower* energy than the natural one (untargeted
    PGD), Delta E < 0 means the attack pushed it to higher energy (targeted attacks).
    Works for marginal and joint energies alike.
    """
    return e_natural - e_adversarial


def cross_entropy_from_energies(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CE(x, y) = E(x, y) - E(x) (Eq. 3); equals F.cross_entropy(..., reduction='none')."""
    return joint_energy(logits, y) - marginal_energy(logits)


def kl_decomposition(logits_nat: torch.Tensor, logits_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prop. 1: KL(p(.|x) || p(.|x*)) = conditional + marginal, per sample.

    conditional = E_{k ~ p(.|x)} [E(x*, k) - E(x, k)]
    marginal    = E(x) - E(x*)
    """
    ln, la = _pair(logits_nat, logits_adv)
    p = F.softmax(ln, dim=1)
    conditional = (p * (joint_energies(la) - joint_energies(ln))).sum(dim=1)
    marginal = energy_drift(marginal_energy(ln), marginal_energy(la))
    return conditional, marginal


def kl_from_energies(logits_nat: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """KL(p(.|x) || p(.|x*)) per sample, assembled from the two energy terms of Prop. 1."""
    conditional, marginal = kl_decomposition(logits_nat, logits_adv)
    return conditional + marginal


def trades_objective_from_energies(
    logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float
) -> torch.Tensor:
    """Cor. 1 (Eq. 6): the TRADES objective written with energies, per sample."""
    ln, la = _pair(logits_nat, logits_adv)
    p = F.softmax(ln, dim=1)
    expected_gap = (p * (joint_energies(ln) - joint_energies(la))).sum(dim=1)
    return (
        joint_energy(ln, y)
        + (beta - 1.0) * marginal_energy(ln)
        - beta * (marginal_energy(la) + expected_gap)
    )


def trades_objective(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """CE(f(x), y) + beta * KL(p(.|x) || p(.|x*)) per sample, computed the usual way (Eq. 4)."""
    ln, la = _pair(logits_nat, logits_adv)
    ce = F.cross_entropy(ln, _labels(y, ln), reduction="none")
    kl = F.kl_div(F.log_softmax(la, dim=1), F.log_softmax(ln, dim=1), reduction="none", log_target=True).sum(dim=1)
    return ce + beta * kl


def weat_weight(logits: torch.Tensor) -> torch.Tensor:
    """WEAT sample weight w(x) = 1 / log(1 + exp(|E(x)|)), detached (paper Sec. 3.2).

    Range (0, 1/ln 2]; samples with energy near zero weigh most.
    """
    with torch.no_grad():
        return 1.0 / F.softplus(marginal_energy(logits).abs())


# ------------------------------------------------------------------------------------------------ typicality
OOD_QUANTILE = 0.99


def typicality(energy: float, reference, quantile: float = OOD_QUANTILE) -> dict:
    """Where one image's E(x) falls among the model's own test images (the paper's reading of E(x) as
    -log p(x) + const: high energy = unlikely for the model).

    Returns ``{"energy", "percentile" (share of reference images with a lower E(x)), "threshold" (the reference's
    ``quantile``), "out_of_distribution" (energy above the threshold), "n_reference"}``.
    """
    ref = np.asarray(reference, dtype=float)
    ref = ref[np.isfinite(ref)]
    if not len(ref):
        raise InputError("no finite reference energies to compare with")
    if not 0 < quantile < 1:
        raise InputError(f"quantile must lie in (0, 1), got {quantile}")
    e = float(energy)
    thr = float(np.quantile(ref, quantile))
    return {"energy": e, "percentile": float((ref < e).mean()), "threshold": thr,
            "out_of_distribution": bool(np.isfinite(e) and e > thr), "n_reference": int(len(ref)),
            "quantile": float(quantile)}
