"""Attacks behind one interface. See :mod:`core.attacks.base` for the guarantees.

>>> result = run_attack(model, x, y, AttackSpec("pgd", eps=8/255, steps=10))
>>> result.x_adv, result.trace.robust_accuracy()
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..data import validate_images
from ..errors import Cancelled, InputError
from ..models import device_of
from ..models.folding import folded
from . import autoattack as _aa
from . import gradient as _g
from .base import (ATTACKS, AttackInfo, AttackInterrupted, AttackResult, AttackSpec, Progress, choose_targets,
                   eval_mode, format_eps, is_oom_error, make_recorder, pgd_step_size, project, scaled_step_size, timed)
from .budget import INTERACTIVE_BATCH

__all__ = ["ATTACKS", "AttackSpec", "AttackResult", "AttackInfo", "run_attack", "eval_mode", "project", "format_eps",
           "describe_attack", "attack_slug", "interactive_batch_size", "pgd_step_size", "scaled_step_size"]

ATTACKS.update({  # the registry lives in core.attacks.base (AttackSpec.validate reads it); filled here
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
})


def interactive_batch_size(name: str, requested: int = 256) -> int:
    """Images per call: AutoAttack's components expose no iterates, so smaller batches let progress move and a
    Cancel keep the finished batches; the gradient attacks report every step and keep large batches."""
    info = ATTACKS.get(name)
    return min(int(requested), INTERACTIVE_BATCH) if info is not None and not info.per_step_trace else int(requested)


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
    if not bool(torch.isfinite(logits).all()):
        raise InputError(_NONFINITE_NATURAL.format(what="the first image"))
    return int(logits.shape[1])


_NONFINITE_NATURAL = ("the model returns NaN or infinite logits for {what}: its predictions, accuracies and energies "
                      "would be meaningless (argmax of NaN). Its weights may be corrupt (NaN) or overflow: check the "
                      "checkpoint, or retrain it with a smaller learning rate.")


class _StopOnForward(torch.nn.Module):
    """Checks ``should_stop`` at every forward pass: attacks that run inside pyautoattack (no access to their
    loop) are interrupted at their next model evaluation, i.e. within one step."""

    def __init__(self, net: torch.nn.Module, should_stop: Callable[[], bool]):
        super().__init__()
        self.net, self.should_stop = net, should_stop

    def forward(self, x):
        if self.should_stop():
            raise AttackInterrupted()
        return self.net(x)


def _nonfinite_note(trace, n_total: int) -> str | None:
    """Refuse non-finite natural logits; describe adversarial ones (a note the pages show as a warning)."""
    finite = np.isfinite(trace.marginal) & np.isfinite(trace.joint)
    if not finite[0].all():
        bad = np.flatnonzero(~finite[0])
        raise InputError(_NONFINITE_NATURAL.format(
            what=f"{len(bad)} of {trace.n_samples} natural images (e.g. image {int(bad[0])})"))
    if finite.all():
        return None
    rows = ~finite.all(axis=1)
    per_image = ~finite.all(axis=0)
    return (f"the model's logits became NaN or infinite during the attack for {int(per_image.sum())} of {n_total} "
            f"images (first at step {int(trace.steps[np.argmax(rows)])}): their energies are not finite and their "
            "predictions there are meaningless (argmax of NaN); treat the robust accuracy and ΔE with care")


def run_attack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec, *,
               record_trace: bool = True, progress: Progress | None = None, num_classes: int | None = None,
               fold_bn: bool = True, should_stop: Callable[[], bool] | None = None) -> AttackResult:
    """Attack ``x`` (float N x C x H x W in [0,1]) with true labels ``y``.

    Returns the adversarial images (on the input's device) and the EnergyTrace (``None`` when
    ``record_trace`` is False). Batches of ``spec.batch_size``; halves the batch on OOM.
    ``fold_bn``: attack the BatchNorm-folded view of the model (:mod:`core.models.folding`: the same
    function up to float rounding, ~1.6x faster on the bundled CNN); False attacks the module as it is.

    ``should_stop()`` (e.g. a Cancel button's event) is asked before every attack step (every model
    evaluation for the pyautoattack attacks). When it says True the attack ends within one step and
    the result is *partial* (``result.partial``, explained in ``result.notes``): the images of the
    batches already finished, or, when the first batch was interrupted, that batch as attacked so far
    (the trace ends at the step reached). An attack that cannot expose its iterates (APGD, FAB,
    Square) interrupted in its first batch has nothing to keep: :class:`~core.errors.Cancelled`.
    Non-finite logits: natural ones raise InputError, adversarial ones add a note.
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
        stopped = False
        step_kw = {"should_stop": should_stop} if should_stop is not None and info.per_step_trace else {}
        net_b = _StopOnForward(net, should_stop) if should_stop is not None and not info.per_step_trace else net
        while i < n:
            if should_stop is not None and should_stop():
                stopped = True
                break
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
                xa = info.fn(net_b, xb, yb, spec, rec, targets, generator=gen, nat_logits=nat_logits, **step_kw)
            except AttackInterrupted as stop:
                stopped = True
                if not advs and stop.x_adv is not None and stop.step:  # first batch: keep it as attacked so far
                    xs, s_done = stop.x_adv, int(stop.step)
                    if rec is not None:
                        with torch.no_grad():
                            rec.record(s_done, net(xs))
                        traces.append(rec.finish())
                    advs.append(xs.to(out_device).contiguous())
                    notes.append(f"cancelled at step {s_done} of {spec.steps}: showing the {len(yb)} images of the "
                                 f"first batch{'' if len(yb) == n else f' (of {n})'} as attacked so far "
                                 f"({s_done} step{'' if s_done == 1 else 's'})")
                break
            except Exception as e:  # noqa: BLE001
                if is_oom_error(e) and bs > 1:
                    bs = max(1, bs // 2)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    msg = f"out of memory: retrying with batch size {bs}"
                    notes.append(msg)
                    if progress and not _report(progress, i / n, msg):
                        stopped = True
                        break
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
            if i < n and should_stop is not None and should_stop():
                stopped = True
                break
            if progress and not _report(progress, i / n, f"{info.label}: {i}/{n} images") and i < n:
                stopped = True
                break
    if stopped:
        if not advs:
            raise Cancelled(f"cancelled before any image was finished: {info.label} does not expose its intermediate "
                            "images, so there is nothing to show" if not info.per_step_trace
                            else "cancelled before the first attack step")
        if not any(m.startswith("cancelled at step") for m in notes):
            k = sum(len(a) for a in advs)
            notes.append(f"cancelled: showing the {k} of {n} images whose attack had finished")
    trace = None
    if traces:
        trace = traces[0]
        for t in traces[1:]:
            trace = trace.concat(t)
        note = _nonfinite_note(trace, trace.n_samples)
        if note:
            notes.append(note)
        trace.meta.update({"attack": spec.to_dict(), "per_step": info.per_step_trace, "notes": notes})
        if stopped:
            trace.meta["partial"] = True
    return AttackResult(torch.cat(advs) if advs else x.clone(), trace, spec, elapsed(), notes, partial=stopped)


def _report(progress: Progress, fraction: float, message: str) -> bool:
    """Call ``progress``; False when it raised :class:`Cancelled` (a cancel request that arrived meanwhile)."""
    try:
        progress(fraction, message)
    except Cancelled:
        return False
    return True


def describe_attack(spec: AttackSpec, class_names=None) -> str:
    """One line naming a run: attack, targeting, threat model and budget, e.g.
    ``PGD (cross-entropy), targeted (random targets), Linf ε = 16/255, 10 steps``."""
    info = ATTACKS.get(spec.name)
    parts = [info.label if info else spec.name]
    if spec.targeted:
        if spec.target_mode == "chosen" and spec.target_class is not None:
            t = int(spec.target_class)
            name = class_names[t] if class_names is not None and 0 <= t < len(class_names) else str(t)
            parts.append(f"targeted → class {name}")
        else:
            parts.append(f"targeted ({spec.target_mode} targets)")
    parts.append(f"{spec.norm} ε = {format_eps(spec.eps, spec.norm)}")
    parts.append(f"{spec.steps} {'queries' if spec.name == 'square' else 'steps'}")
    if spec.name in ("apgd-t", "fab-t") and spec.extra and "targets" in spec.extra:
        parts.append(f"{spec.extra['targets']} target classes")
    return ", ".join(parts)


def attack_slug(spec: AttackSpec) -> str:
    """The run's settings for a file name, e.g. ``pgd_Linf-16-255_10steps_targeted-random``."""
    eps = format_eps(spec.eps, spec.norm).replace("/", "-")
    s = f"{spec.name}_{spec.norm}-{eps}_{spec.steps}{'queries' if spec.name == 'square' else 'steps'}"
    if spec.targeted:
        s += f"_targeted-{spec.target_class if spec.target_mode == 'chosen' else spec.target_mode}"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in s)
