"""A reference training step written the way the official WEAT code structures it (as described in
docs / the research notes — this is a re-implementation from that description, not a copy):

1. ``model.eval()`` for the whole inner maximisation; start at x + 0.001 * N(0, I);
2. every attack step recomputes the natural logits f(x) (not differentiated) and f(x_adv), takes
   the gradient of the summed KL(p_nat || p_adv) w.r.t. x_adv only, a sign step, projection onto
   the L-inf ball and clamping to [0, 1];
3. ``model.train()``; two separate train-mode forwards f(x) and f(x_adv), fp32;
4. WEAT: w = 1 / log(1 + exp(|E(x)|)) from the *train-mode* natural logits, detached; loss =
   (1/B) sum w * CE + beta (1/B) sum w * KL, KL written as sum p_nat (log p_nat - log(p_adv + 1e-12)).
   TRADES: CE(f(x)) + beta * (1/B) * sum KL, same attack.

It is only used by ``bench_train.py`` as the speed baseline for ``core.train.train_step``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_attack(model, x: torch.Tensor, eps: float, step_size: float, steps: int,
              generator: torch.Generator | None = None) -> torch.Tensor:
    model.eval()
    noise = torch.randn(x.shape, generator=generator).to(x.device)
    x_adv = x.detach() + 0.001 * noise
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            p_nat = F.softmax(model(x), dim=1)
            log_p_adv = F.log_softmax(model(x_adv), dim=1)
            # summed KL(p_nat || p_adv) over the batch
            loss = (p_nat * (torch.log(p_nat + 1e-30) - log_p_adv)).sum()
        (grad,) = torch.autograd.grad(loss, [x_adv])
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    model.train()
    return x_adv.clamp(0.0, 1.0).detach()


def _kl_rows(logits_nat: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    p_nat = F.softmax(logits_nat, dim=1)
    log_p_nat = F.log_softmax(logits_nat, dim=1)
    log_p_adv = torch.log(F.softmax(logits_adv, dim=1) + 1e-12)
    return (p_nat * (log_p_nat - log_p_adv)).sum(dim=1)


def reference_step(model, opt, x: torch.Tensor, y: torch.Tensor, *, loss: str = "weat-adv", beta: float = 6.0,
                   eps: float = 8 / 255, step_size: float = 2 / 255, steps: int = 10,
                   generator: torch.Generator | None = None) -> float:
    """One optimisation step; ``loss`` is 'weat-adv', 'weat-nat' or 'trades'. Returns the loss value."""
    x_adv = kl_attack(model, x, eps, step_size, steps, generator)
    opt.zero_grad()
    logits = model(x)
    adv_logits = model(x_adv)
    b = x.shape[0]
    kl = _kl_rows(logits, adv_logits)
    if loss == "trades":
        total = F.cross_entropy(logits, y) + beta * kl.sum() / b
    else:
        energy = -torch.logsumexp(logits, dim=1).detach()
        w = 1.0 / torch.log(1.0 + torch.exp(energy.abs()))
        ce = F.cross_entropy(adv_logits if loss == "weat-adv" else logits, y, reduction="none")
        total = (w * ce).sum() / b + beta * (w * kl).sum() / b
    total.backward()
    opt.step()
    return float(total.detach())
