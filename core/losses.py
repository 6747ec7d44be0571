"""Adversarial-training objectives, all as one composable loss (paper Table 1c).

A method is a choice of
* inner loss (how x* is found):  'ce' (PGD on cross-entropy) | 'kl' (TRADES KL) | 'none'
* outer CE term:                  'nat' CE(x) | 'adv' CE(x*) | 'bce-adv' MART's boosted CE(x*)
* beta for the KL(p(.|x) || p(.|x*)) term (0 disables it)
* sample weighting:               'none' | 'mart' (1 - p_y(x) on KL, not detached) | 'pm' (probabilistic
                                  margin of x*, MAIL) | 'energy' (WEAT: 1/softplus(|E(x)|))

| method       | inner | outer    | beta | weighting |
|--------------|-------|----------|------|-----------|
| plain        | none  | nat      | 0    | none      |
| sat          | ce    | adv      | 0    | none      |
| trades       | kl    | nat      | 6    | none      |
| mart         | ce    | bce-adv  | 6    | mart      |
| mail-trades  | kl    | nat      | 6    | pm        |
| weat-nat     | kl    | nat      | 6    | energy    |
| weat-adv     | kl    | adv      | 6    | energy    |

WEAT follows the official code by default (see docs/METHODS.md): the weight w is computed from the
natural logits of the *train-mode* forward, detached, multiplies both CE and KL, and the loss is
divided by the batch size B (not by sum(w)). ``weight_norm='sum'`` and ``weight_logits='eval'``
give the alternatives. MAIL's weights w = sigmoid(-gamma (PM - bias)) are normalised to mean 1
and, as in the paper's Table 1c, multiply CE and KL; before ``burn_in`` epochs they are 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .energy import marginal_energy, weat_weight
from .errors import InputError

__all__ = ["LossConfig", "METHODS", "method_config", "outer_loss", "LossTerms"]

INNERS = ("none", "ce", "kl")
OUTERS = ("nat", "adv", "bce-adv")
WEIGHTINGS = ("none", "mart", "pm", "energy")
WEIGHT_NORMS = ("batch", "sum")       # energy weights: divide by B (official) or by sum(w)
WEIGHT_LOGITS = ("train", "eval")     # energy weights from the train-mode logits (official) or an eval forward


@dataclass
class LossConfig:
    inner: str = "kl"
    outer: str = "nat"
    beta: float = 6.0
    weighting: str = "none"
    weight_norm: str = "batch"       # energy weights: divide by B ('batch', official) or by sum(w) ('sum')
    weight_logits: str = "train"     # energy weights from train-mode logits (official) or an extra eval forward
    mail_gamma: float = 10.0
    mail_bias: float = -0.5
    burn_in: int = 0                 # epochs with uniform weights (MAIL)

    def validate(self) -> "LossConfig":
        if self.inner not in INNERS:
            raise InputError(f"inner loss must be one of {INNERS}")
        if self.outer not in OUTERS:
            raise InputError(f"outer loss must be one of {OUTERS}")
        if self.weighting not in WEIGHTINGS:
            raise InputError(f"weighting must be one of {WEIGHTINGS}")
        if not (self.beta >= 0) or self.beta != self.beta:
            raise InputError(f"beta must be >= 0, got {self.beta}")
        if self.weight_norm not in WEIGHT_NORMS:
            raise InputError("weight_norm must be 'batch' or 'sum'")
        if self.weight_logits not in WEIGHT_LOGITS:
            raise InputError("weight_logits must be 'train' or 'eval'")
        if self.outer in ("adv", "bce-adv") and self.inner == "none":
            raise InputError("an adversarial outer loss needs an inner attack (inner 'ce' or 'kl')")
        if self.beta > 0 and self.inner == "none":
            raise InputError("the KL term needs an inner attack (inner 'ce' or 'kl')")
        b = self.burn_in
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or int(b) != b or b < 0:
            raise InputError(f"burn in (epochs with uniform weights) must be an integer >= 0, got {b!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


METHODS: dict[str, LossConfig] = {
    "plain": LossConfig(inner="none", outer="nat", beta=0.0),
    "sat": LossConfig(inner="ce", outer="adv", beta=0.0),
    "trades": LossConfig(inner="kl", outer="nat", beta=6.0),
    "mart": LossConfig(inner="ce", outer="bce-adv", beta=6.0, weighting="mart"),
    "mail-trades": LossConfig(inner="kl", outer="nat", beta=6.0, weighting="pm"),
    "weat-nat": LossConfig(inner="kl", outer="nat", beta=6.0, weighting="energy"),
    "weat-adv": LossConfig(inner="kl", outer="adv", beta=6.0, weighting="energy"),
}


def method_config(method: str, **overrides) -> LossConfig:
    key = method.lower().replace("_", "-")
    if key not in METHODS:
        raise InputError(f"unknown training method '{method}'. Choose one of: {', '.join(METHODS)}")
    cfg = LossConfig(**{**METHODS[key].to_dict(), **{k: v for k, v in overrides.items() if v is not None}})
    return cfg.validate()


@dataclass
class LossTerms:
    loss: torch.Tensor
    terms: dict[str, float] = field(default_factory=dict)
    weights: torch.Tensor | None = None       # per-sample weights used (detached)
    energy_nat: torch.Tensor | None = None    # E(x) of the natural batch (detached)


def _kl_per_sample(logits_nat: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """KL(p_nat || p_adv) per sample; gradients flow through both branches, as in TRADES."""
    logp_nat = F.log_softmax(logits_nat, dim=1)
    logp_adv = F.log_softmax(logits_adv, dim=1)
    return (logp_nat.exp() * (logp_nat - logp_adv)).sum(dim=1)


def _bce_adv(logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MART's boosted CE: -log p_y(x*) - log(1 - max_{k != y} p_k(x*))."""
    p = F.softmax(logits_adv, dim=1)
    ce = F.cross_entropy(logits_adv, y, reduction="none")
    p_other = p.scatter(1, y.unsqueeze(1), 0.0).max(dim=1).values
    return ce - torch.log((1.0 - p_other).clamp_min(1e-12))


def probabilistic_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PM = p_y(x) - max_{k != y} p_k(x) (MAIL; in [-1, 1])."""
    p = F.softmax(logits.float(), dim=1)
    p_y = p.gather(1, y.unsqueeze(1)).squeeze(1)
    return p_y - p.scatter(1, y.unsqueeze(1), -1.0).max(dim=1).values


def outer_loss(cfg: LossConfig, logits_nat: torch.Tensor | None, logits_adv: torch.Tensor | None, y: torch.Tensor,
               *, epoch: int = 0, weight_source_logits: torch.Tensor | None = None) -> LossTerms:
    """The outer (training) loss given natural and adversarial logits (already computed).

    ``logits_nat`` may be None only when neither the CE term nor KL nor weighting need it.
    ``weight_source_logits`` overrides the logits the energy weights are computed from.
    """
    b = y.shape[0]
    ln = None if logits_nat is None else logits_nat.float()
    la = None if logits_adv is None else logits_adv.float()

    if cfg.outer == "nat":
        ce = F.cross_entropy(ln, y, reduction="none")
    elif cfg.outer == "adv":
        ce = F.cross_entropy(la, y, reduction="none")
    else:
        ce = _bce_adv(la, y)
    kl = _kl_per_sample(ln, la) if cfg.beta > 0 else torch.zeros_like(ce)

    w = None
    e_nat = marginal_energy(ln.detach()) if ln is not None else None
    if cfg.weighting == "energy":
        src = weight_source_logits if weight_source_logits is not None else ln
        w = weat_weight(src.float())
        denom = w.sum().clamp_min(1e-12) if cfg.weight_norm == "sum" else torch.tensor(float(b), device=y.device)
        loss = (w * ce).sum() / denom + cfg.beta * (w * kl).sum() / denom
    elif cfg.weighting == "mart":
        # not detached: MART's objective BCE + beta * KL * (1 - p_y(x)) is differentiated through p_y(x) too
        p_y = F.softmax(ln, dim=1).gather(1, y.unsqueeze(1)).squeeze(1)
        w = 1.0 - p_y
        loss = ce.mean() + cfg.beta * (kl * w).mean()
    elif cfg.weighting == "pm":
        with torch.no_grad():
            if epoch < cfg.burn_in:
                w = torch.ones_like(ce)
            else:
                pm = probabilistic_margin(la, y)
                w = torch.sigmoid(-cfg.mail_gamma * (pm - cfg.mail_bias))
                w = w * (b / w.sum().clamp_min(1e-12))
        loss = (w * ce).mean() + cfg.beta * (w * kl).mean()
    else:
        loss = ce.mean() + cfg.beta * kl.mean()

    terms = {"ce": float(ce.detach().mean()), "kl": float(kl.detach().mean()), "loss": float(loss.detach())}
    if w is not None:
        w = w.detach()
        terms.update({"w_mean": float(w.mean()), "w_min": float(w.min()), "w_max": float(w.max())})
    return LossTerms(loss=loss, terms=terms, weights=None if w is None else w.detach(), energy_nat=e_nat)
