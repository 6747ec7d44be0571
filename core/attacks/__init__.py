"""Attacks behind one interface. See :mod:`core.attacks.base` for the guarantees.

>>> result = run_attack(model, x, y, AttackSpec("pgd", eps=8/255, steps=10))
>>> result.x_adv, result.trace.robust_accuracy()
"""

from __future__ import annotations

import torch

from ..data import validate_images
from ..errors import InputError
from ..models import device_of
from ..models.folding import folded
from . import autoattack as _aa
from . import gradient as _g
from .base import (AttackInfo, AttackResult, AttackSpec, Progress, choose_targets, eval_mode, is_oom_error,
                   make_recorder, project, timed)

__all__ = ["ATTACKS", "AttackSpec", "AttackResult", "AttackInfo", "run_attack", "eval_mode", "project"]

ATTACKS: dict[str, AttackInfo] = {
    "pgd": AttackInfo("PGD (cross-entropy)", _g.pgd,
                      description="Projected gradient ascent on CE; targeted mode descends CE to the target."),
    "trades-kl": AttackInfo("TRADES-KL", _g.trades_kl, norms=("Linf",), targeted=False,
                            description="Maximises KL(p(.|x) || p(.|x*)): the TRADES / WEAT inner maximisation."),
    "cw": AttackInfo("CW-Linf (margin)", _g.cw_margin,
                     description="Carlini-Wagner margin loss under an eps bound; targeted raises f_t over the rest."),
    "apgd-ce": AttackInfo("APGD-CE", _aa.apgd_ce, targeted=False, per_step_trace=False,
                          description="AutoAttack's step-size-free PGD on CE (pyautoattack)."),
    "apgd-dlr": AttackInfo("APGD-DLR", _aa.apgd_dlr, targeted=False, per_step_trace=False, min_classes=3,
                           description="APGD on the difference-of-logits-ratio loss."),
    "apgd-t": AttackInfo("APGD-T", _aa.apgd_t, targeted=False, per_step_trace=False, min_classes=3,
                         description="Targeted APGD-DLR against the most likely wrong classes (chosen internally)."),
    "fab": AttackInfo("FAB", _aa.fab, targeted=False, per_step_trace=False,
                      description="Fast Adaptive Boundary: minimal perturbations, clipped to the eps-ball."),
    "fab-t": AttackInfo("FAB-T", _aa.fab_t, targeted=False, per_step_trace=False, min_classes=3,
                        description="Targeted FAB against the most likely wrong classes."),
    "square": AttackInfo("Square", _aa.square, targeted=False, per_step_trace=False, max_steps=100_000,
                         description="Score-based black-box attack; 'steps' is the number of queries."),
}


def _probe_num_classes(model: torch.nn.Module, x1: torch.Tensor) -> int:
    """The model's class count from one forward; a shape mismatch becomes a readable InputError."""
    try:
        with torch.no_grad():
            logits = model(x1)
    except RuntimeError as e:
        if is_oom_error(e):
            raise InputError("out of memory even with batch size 1: use fewer or smaller images, or the CPU") from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"the model cannot process images of shape {' x '.join(map(str, x1.shape[1:]))} "
                         f"(C x H x W): {first}") from e
    if logits.dim() != 2:
        raise InputError(f"the model must return N x K logits, got shape {tuple(logits.shape)}")
    return int(logits.shape[1])


def run_attack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec, *,
               record_trace: bool = True, progress: Progress | None = None, num_classes: int | None = None,
               fold_bn: bool = True) -> AttackResult:
    """Attack ``x`` (float N x C x H x W in [0,1]) with true labels ``y``.

    Returns the adversarial images (on the input's device) and the EnergyTrace (``None`` when
    ``record_trace`` is False). Batches of ``spec.batch_size``; halves the batch on OOM.
    ``fold_bn``: attack the BatchNorm-folded view of the model (:mod:`core.models.folding`: the same
    function up to float rounding, ~1.6x faster on the bundled CNN); False attacks the module as it is.
    """
    x = validate_images(x)
    y = torch.as_tensor(y).long().reshape(-1)
    if y.numel() != x.shape[0]:
        raise InputError(f"got {y.numel()} labels for {x.shape[0]} images")
    device = device_of(model)
    out_device = x.device
    elapsed = timed()
    notes: list[str] = []
    with eval_mode(model):
        if num_classes is None:
            num_classes = _probe_num_classes(model, x[:1].to(device))
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise InputError(f"labels must lie in [0, {num_classes - 1}] for this model")
        spec.validate(num_classes)
        info = ATTACKS[spec.name]
        net = folded(model, x[:4].to(device)) if fold_bn else model
        gen = torch.Generator().manual_seed(int(spec.seed)) if spec.seed is not None else None
        if spec.seed is not None:
            torch.manual_seed(int(spec.seed))
        n = x.shape[0]
        bs = min(spec.batch_size, n)
        advs, traces = [], []
        i = 0
        while i < n:
            xb = x[i:i + bs].to(device)
            if device.type == "cpu" and info.per_step_trace and xb.dim() == 4:
                # our gradient attacks take the layout the architecture runs fastest with on a CPU (channels-last
                # for the bundled CNN, bench/bench_attack.py); pyautoattack's classes .view() their input
                xb = xb.contiguous(memory_format=getattr(model, "cpu_input_layout", torch.contiguous_format))
            yb = y[i:i + bs].to(device)
            try:
                nat_logits = None
                targets = None
                if spec.targeted:
                    if spec.target_mode == "least-likely":
                        with torch.no_grad():
                            nat_logits = net(xb)
                    targets = choose_targets(nat_logits if nat_logits is not None else torch.empty(len(yb), num_classes),
                                             yb, spec, gen).to(device)
                rec = make_recorder(yb, targets, spec) if record_trace else None
                xa = info.fn(net, xb, yb, spec, rec, targets, generator=gen, nat_logits=nat_logits)
            except Exception as e:  # noqa: BLE001
                if is_oom_error(e) and bs > 1:
                    bs = max(1, bs // 2)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    msg = f"out of memory: retrying with batch size {bs}"
                    notes.append(msg)
                    if progress:
                        progress(i / n, msg)
                    continue
                if is_oom_error(e):
                    raise InputError("out of memory even with batch size 1: use fewer or smaller images, or the CPU") from e
                raise
            advs.append(xa.to(out_device).contiguous())
            if rec is not None:
                t = rec.finish()
                # which images the attack changed: AutoAttack's components hand back misclassified images and
                # those they failed on untouched (Delta E = 0), see EnergyTrace.delta_summary
                t.perturbed = (xa != xb).flatten(1).any(dim=1).cpu().numpy()
                traces.append(t)
            i += len(yb)
            if progress:
                progress(i / n, f"{info.label}: {i}/{n} images")
    trace = None
    if traces:
        trace = traces[0]
        for t in traces[1:]:
            trace = trace.concat(t)
        trace.meta.update({"attack": spec.to_dict(), "per_step": info.per_step_trace, "notes": notes})
    return AttackResult(torch.cat(advs) if advs else x.clone(), trace, spec, elapsed(), notes)
