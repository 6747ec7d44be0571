"""One optimisation step: the inner attack, the train-mode forwards, the outer loss, backward, the gradient
average over processes and the optimizer step; micro-batches after an out-of-memory error; torch.compile."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from ..attacks import AttackSpec
from ..attacks.gradient import gradient_attack
from ..errors import EnergyLensError
from ..losses import LossTerms, outer_loss
from ..models.folding import folded
from ..runtime import eval_mode, is_oom_error

__all__ = ["TrainingStopped", "train_step", "oom_safe_step", "CompiledForward"]


class TrainingStopped(EnergyLensError):
    """Training stopped early (NaN loss, or a stop request)."""


def _allreduce_grads(model, world: int, loss: torch.Tensor | None = None) -> torch.Tensor | None:
    """Average the gradients (and ``loss``, returned) over the processes in one all-reduce."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    parts = [g.reshape(-1) for g in grads]
    if loss is not None:
        parts.append(loss.detach().float().reshape(1).to(parts[0].dtype if parts else torch.float32))
    if not parts:
        return None
    flat = torch.cat(parts)
    dist.all_reduce(flat)
    flat /= world
    off = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[off:off + n].view_as(g))
        off += n
    return flat[off] if loss is not None else None


def _forward_loss(model, lcfg, xb: torch.Tensor, yb: torch.Tensor, atk_spec: AttackSpec, epoch: int,
                  generator: torch.Generator | None, amp: bool, net=None):
    """Inner attack (eval mode), train-mode forwards and the outer loss of one (micro-)batch.

    ``net`` computes the train-mode forwards (a compiled ``model``, see :class:`CompiledForward`); the attack
    always runs through the module itself (its BatchNorm-folded view)."""
    net = model if net is None else net
    x_adv = None
    if lcfg.inner != "none":
        with eval_mode(model):
            # the BatchNorm-folded view (refreshed after every optimizer step): the same function, cheaper gradients
            x_adv = gradient_attack(folded(model), xb, yb, atk_spec, lcfg.inner, None, None, generator=generator)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        need_nat = lcfg.outer == "nat" or lcfg.beta > 0 or lcfg.weighting in ("energy", "mart")
        logits_nat = net(xb) if need_nat else None
        logits_adv = net(x_adv) if x_adv is not None else None
    wsrc = None
    if lcfg.weighting == "energy" and lcfg.weight_logits == "eval":
        with eval_mode(model), torch.no_grad():
            wsrc = model(xb)
    return outer_loss(lcfg, logits_nat, logits_adv, yb, epoch=epoch, weight_source_logits=wsrc)


def _accumulate(model, lcfg, xb, yb, atk_spec, epoch, generator, amp, micro: int, net=None) -> LossTerms:
    """Forward + backward in micro-batches of ``micro`` samples, each loss scaled by its share of the
    batch, so the accumulated gradient equals that of the full-batch mean (exactly for per-sample
    losses; BatchNorm statistics and batch-normalised sample weights are per micro-batch)."""
    n = int(yb.shape[0])
    total = torch.zeros((), device=yb.device)
    terms: dict[str, float] = {}
    weights, energies = [], []
    for i in range(0, n, micro):
        lt = _forward_loss(model, lcfg, xb[i:i + micro], yb[i:i + micro], atk_spec, epoch, generator, amp, net)
        share = int(yb[i:i + micro].shape[0]) / n
        (lt.loss * share).backward()
        total = total + lt.loss.detach().float() * share
        for k, v in lt.terms.items():
            if k == "w_min":
                terms[k] = min(terms.get(k, v), v)
            elif k == "w_max":
                terms[k] = max(terms.get(k, v), v)
            else:
                terms[k] = terms.get(k, 0.0) + v * share
        if lt.weights is not None:
            weights.append(lt.weights)
        if lt.energy_nat is not None:
            energies.append(lt.energy_nat)
        del lt
    terms["loss"] = float(total)
    return LossTerms(loss=total, terms=terms, weights=torch.cat(weights) if weights else None,
                     energy_nat=torch.cat(energies) if energies else None)


class CompiledForward:
    """``torch.compile(model)`` for the training forwards, falling back to the module itself for good if
    compiling fails (no compiler, an unsupported model, ...): the forward is then recomputed eagerly, so
    the step is the same and training goes on. ``note`` says what happened."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.note = "torch.compile on"
        try:
            self.fn = torch.compile(model)
        except Exception as e:  # noqa: BLE001
            self.fn = None
            first = str(e).splitlines()[0] if str(e) else ""
            self.note = f"torch.compile unavailable ({type(e).__name__}: {first}); eager"
            print(f"{self.note}", file=sys.stderr, flush=True)

    @property
    def active(self) -> bool:
        return self.fn is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fn is not None:
            try:
                return self.fn(x)
            except Exception as e:  # noqa: BLE001
                if is_oom_error(e):
                    raise
                self.fn = None
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                self.note = f"torch.compile failed ({type(e).__name__}: {first[:200]}); continued eagerly"
                print(self.note, file=sys.stderr, flush=True)
        return self.model(x)


def train_step(model, opt, lcfg, xb: torch.Tensor, yb: torch.Tensor, atk_spec: AttackSpec, *, epoch: int = 0,
               generator: torch.Generator | None = None, amp: bool = False, world: int = 1, where: str = "",
               micro_batch: int | None = None, net=None):
    """One optimisation step: inner attack (eval mode), train-mode forwards, outer loss, backward,
    gradient average over processes (``world > 1``), optimizer step. Returns the LossTerms.

    ``micro_batch`` (smaller than the batch) splits forward/backward into micro-batches whose
    gradients are accumulated before the single optimizer step (see :func:`oom_safe_step`).
    A non-finite loss (on any process) raises TrainingStopped before the weights change.
    """
    opt.zero_grad(set_to_none=True)
    n = int(yb.shape[0])
    if micro_batch and micro_batch < n:
        lt = _accumulate(model, lcfg, xb, yb, atk_spec, epoch, generator, amp, int(micro_batch), net)
        backward_done = True
    else:
        lt = _forward_loss(model, lcfg, xb, yb, atk_spec, epoch, generator, amp, net)
        backward_done = False
    loss_value = lt.loss.detach()
    if world > 1:  # backward first so that every process takes part in the all-reduce, then all decide alike
        if not backward_done:
            lt.loss.backward()
            backward_done = True
        loss_value = _allreduce_grads(model, world, loss_value)
    if not torch.isfinite(loss_value):
        opt.zero_grad(set_to_none=True)
        raise TrainingStopped(
            f"the loss became {float(loss_value)}{where}: training stopped. "
            "The last good checkpoint is kept; try a smaller learning rate.")
    if not backward_done:
        lt.loss.backward()
    opt.step()
    return lt


def oom_safe_step(model, opt, lcfg, xb: torch.Tensor, yb: torch.Tensor, atk_spec: AttackSpec, oom: dict, **kw):
    """:func:`train_step` that survives running out of memory.

    On an out-of-memory error the batch is retried as two half-size micro-batches with gradient
    accumulation (halving again while it still does not fit). The reduced size is kept in
    ``oom["micro_batch"]`` for the rest of the run, and a line is printed to stderr.
    """
    n = int(yb.shape[0])
    while True:
        current = min(int(oom.get("micro_batch") or n), n)
        try:
            return train_step(model, opt, lcfg, xb, yb, atk_spec, micro_batch=oom.get("micro_batch"), **kw)
        except Exception as e:  # noqa: BLE001 - only out-of-memory errors are handled
            if not is_oom_error(e):
                raise
            if current <= 1:
                raise TrainingStopped(
                    f"out of memory{kw.get('where', '')} even with micro-batches of 1 sample: training stopped. "
                    "Use a smaller model, fewer attack steps or the CPU.") from e
        # outside the except block, so the failed attempt's tensors can be freed
        opt.zero_grad(set_to_none=True)
        if xb.is_cuda:
            torch.cuda.empty_cache()
        oom["micro_batch"] = (current + 1) // 2
        print(f"out of memory{kw.get('where', '')} with {current} samples per forward pass: retrying the batch "
              f"as micro-batches of {oom['micro_batch']} (gradient accumulation); this size is kept for the rest "
              "of the run", file=sys.stderr, flush=True)

