"""Gradient attacks written here so that every step's energies can be recorded for free.

* PGD (Linf / L2), cross-entropy: untargeted maximises CE(x*, y); targeted minimises CE(x*, t).
* TRADES-KL: maximises KL(p(.|x) || p(.|x*)), the TRADES / WEAT inner maximisation
  (start x + 0.001 * N(0, I), sign steps, Linf).
* CW-Linf: the Carlini-Wagner margin loss min(max_{i!=y} f_i - f_y, kappa) under an eps bound,
  untargeted or targeted (min(f_t - max_{i!=t} f_i, kappa)), capped at the confidence kappa >= 0: with
  the default kappa = 0 an image stops moving once it has crossed the decision boundary (Linf sign steps
  of a zero gradient are zero), as in Carlini & Wagner and torchattacks.

The trace reuses the logits of each step's gradient forward, so recording costs one extra
natural forward (none without a random start) and the final forward needed for the result. Where the
attack does not need the natural logits itself (not TRADES-KL), the natural forward waits until the end
and runs in one batch with the final one (one forward of 2N images costs less than two of N).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..drift import TraceRecorder
from ..runtime import is_oom_error
from .base import AttackInterrupted, AttackSpec, project

__all__ = ["objective", "gradient_attack", "pgd", "trades_kl", "cw_margin"]


def _other_max(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    masked = logits.scatter(1, cls.unsqueeze(1), float("-inf"))
    return masked.max(dim=1).values


def objective(kind: str, logits: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None,
              logp_nat: torch.Tensor | None, kappa: float = 0.0) -> torch.Tensor:
    """Per-sample quantity the attack MAXIMISES."""
    logits = logits.float()
    if kind == "ce":
        if targets is None:
            return F.cross_entropy(logits, y, reduction="none")
        return -F.cross_entropy(logits, targets, reduction="none")
    if kind == "kl":
        assert logp_nat is not None
        logp_adv = F.log_softmax(logits, dim=1)
        return (logp_nat.exp() * (logp_nat - logp_adv)).sum(dim=1)
    if kind == "margin":
        # capped at kappa >= 0, 0 included (Carlini & Wagner's max(., -kappa) on the loss they minimise): a point
        # whose margin has reached kappa gets a zero gradient and stops, so kappa = 0 stops at the boundary
        if targets is None:
            z_y = logits.gather(1, y.unsqueeze(1)).squeeze(1)
            m = _other_max(logits, y) - z_y
        else:
            z_t = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
            m = z_t - _other_max(logits, targets)
        return m.clamp(max=float(kappa))
    raise ValueError(f"unknown objective {kind}")


def _random_start(x: torch.Tensor, spec: AttackSpec, kind: str, generator: torch.Generator | None) -> torch.Tensor:
    shape = x.shape
    if kind == "kl":
        delta = 0.001 * torch.randn(shape, generator=generator)
    elif spec.norm == "Linf":
        delta = (torch.rand(shape, generator=generator) * 2 - 1) * spec.eps
    else:
        d = torch.randn(shape, generator=generator)
        d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        r = torch.rand(shape[0], generator=generator).view(-1, 1, 1, 1)
        delta = d * r * spec.eps
    return project(x + delta.to(x.device, x.dtype), x, spec.eps, spec.norm)


def _natural_and_final(model, x: torch.Tensor, x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The natural and the final logits in one forward of 2N images; two forwards of N when that one does not fit
    in memory (the batch size the attack itself runs at must never be halved for this saving)."""
    try:
        return model(torch.cat([x, x_adv])).split(x.shape[0])
    except RuntimeError as e:
        if not is_oom_error(e):
            raise
        if x.is_cuda:
            torch.cuda.empty_cache()
        return model(x), model(x_adv)


def gradient_attack(model, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec, kind: str,
                    recorder: TraceRecorder | None, targets: torch.Tensor | None,
                    generator: torch.Generator | None = None, nat_logits: torch.Tensor | None = None,
                    should_stop=None) -> torch.Tensor:
    """Iterated steepest ascent on ``objective(kind)`` with projection on the ball and the box.

    ``nat_logits`` (no-grad logits of x) may be passed in to avoid a second natural forward.
    ``should_stop()`` is asked before every step; when it says True, :class:`AttackInterrupted` carries
    the iterate reached (x_s after s steps, the recorder holding steps 0..s-1).
    """
    logp_nat = None
    # the natural point's energies (step 0 of a random-start trace): deferred to the final forward, batched with it
    defer_nat = recorder is not None and spec.random_start and kind != "kl" and nat_logits is None
    if kind == "kl" or (recorder is not None and spec.random_start and not defer_nat):
        if nat_logits is None:
            with torch.no_grad():
                nat_logits = model(x)
        if kind == "kl":
            logp_nat = F.log_softmax(nat_logits.float(), dim=1)
    if recorder is not None and spec.random_start and not defer_nat:
        recorder.record(0, nat_logits, objective(kind, nat_logits, y, targets, logp_nat, spec.kappa))

    x_adv = _random_start(x, spec, kind, generator) if spec.random_start and spec.eps > 0 else x.clone()
    alpha = spec.alpha
    for s in range(spec.steps):
        if should_stop is not None and should_stop():
            if defer_nat:  # the trace keeps its natural step
                with torch.no_grad():
                    lg = model(x)
                recorder.record(0, lg, objective(kind, lg, y, targets, logp_nat, spec.kappa))
            raise AttackInterrupted(x_adv.detach(), s)
        x_adv = x_adv.detach().requires_grad_(True)
        logits = model(x_adv)
        obj = objective(kind, logits, y, targets, logp_nat, spec.kappa)
        if recorder is not None and (s > 0 or not spec.random_start):
            recorder.record(s, logits, obj)  # logits at x_s: free energies
        (grad,) = torch.autograd.grad(obj.sum(), x_adv)
        with torch.no_grad():
            if spec.norm == "Linf":
                x_adv = x_adv + alpha * grad.sign()
            else:
                gn = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
                x_adv = x_adv + alpha * grad / gn
            x_adv = project(x_adv, x, spec.eps, spec.norm)
    x_adv = x_adv.detach()
    if recorder is not None:
        with torch.no_grad():
            if defer_nat:
                nat_logits, logits = _natural_and_final(model, x, x_adv)
            else:
                logits = model(x_adv)
        if defer_nat:
            recorder.record(0, nat_logits, objective(kind, nat_logits, y, targets, logp_nat, spec.kappa))
        recorder.record(spec.steps, logits, objective(kind, logits, y, targets, logp_nat, spec.kappa))
    return x_adv


def pgd(model, x, y, spec, recorder, targets, generator=None, nat_logits=None, should_stop=None):
    return gradient_attack(model, x, y, spec, "ce", recorder, targets, generator, nat_logits, should_stop)


def trades_kl(model, x, y, spec, recorder, targets, generator=None, nat_logits=None, should_stop=None):
    return gradient_attack(model, x, y, spec, "kl", recorder, None, generator, nat_logits, should_stop)


def cw_margin(model, x, y, spec, recorder, targets, generator=None, nat_logits=None, should_stop=None):
    return gradient_attack(model, x, y, spec, "margin", recorder, targets, generator, nat_logits, should_stop)
