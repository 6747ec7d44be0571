"""AutoAttack components through the ``pyautoattack`` package (Croce & Hein).

APGD-CE, APGD-DLR, APGD-T, FAB, FAB-T and Square. These attacks do not expose their iterates,
so their trace holds the natural point (step 0) and the final point (step = iterations).
APGD-T and FAB-T choose their target classes internally (the most likely wrong classes); how many
is ``spec.extra['targets']`` (AutoAttack's 9 when absent; see core.attacks.budget).
"""

from __future__ import annotations

import logging

import torch
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
from pyautoattack.fab_pt import FABAttack_PT
from pyautoattack.square import SquareAttack

from ..drift import TraceRecorder
from .base import AttackSpec, project
from .budget import n_targets

__all__ = ["apgd_ce", "apgd_dlr", "apgd_t", "fab", "fab_t", "square"]

logging.getLogger("auto-attack").setLevel(logging.WARNING)


def _seed(spec: AttackSpec) -> int:
    return 0 if spec.seed is None else int(spec.seed)


def _run(make, model, x, y, spec: AttackSpec, recorder: TraceRecorder | None, nat_logits=None):
    if recorder is not None:
        if nat_logits is None:
            with torch.no_grad():
                nat_logits = model(x)
        recorder.record(0, nat_logits)
    atk = make(model)
    x_adv = atk.perturb(x, y)
    x_adv = project(x_adv.detach().to(x.device, x.dtype), x, spec.eps, spec.norm)
    if recorder is not None:
        with torch.no_grad():
            recorder.record(spec.steps, model(x_adv))
    return x_adv


def _n_targets(model, x, spec: AttackSpec) -> int:
    """Target classes of APGD-T / FAB-T: ``spec.extra['targets']`` (AutoAttack: 9), at most the wrong classes."""
    with torch.no_grad():
        k = model(x[:1]).shape[1]
    return n_targets(spec, k)


def apgd_ce(model, x, y, spec, recorder, targets=None, generator=None, nat_logits=None):
    return _run(lambda m: APGDAttack(m, n_iter=spec.steps, norm=spec.norm, eps=spec.eps, loss="ce", n_restarts=1,
                                     seed=_seed(spec), device=x.device), model, x, y, spec, recorder, nat_logits)


def apgd_dlr(model, x, y, spec, recorder, targets=None, generator=None, nat_logits=None):
    return _run(lambda m: APGDAttack(m, n_iter=spec.steps, norm=spec.norm, eps=spec.eps, loss="dlr", n_restarts=1,
                                     seed=_seed(spec), device=x.device), model, x, y, spec, recorder, nat_logits)


def apgd_t(model, x, y, spec, recorder, targets=None, generator=None, nat_logits=None):
    n_t = _n_targets(model, x, spec)
    return _run(lambda m: APGDAttack_targeted(m, n_iter=spec.steps, norm=spec.norm, eps=spec.eps, n_restarts=1,
                                              n_target_classes=n_t, seed=_seed(spec), device=x.device),
                model, x, y, spec, recorder, nat_logits)


def fab(model, x, y, spec, recorder, targets=None, generator=None, nat_logits=None):
    return _run(lambda m: FABAttack_PT(m, norm=spec.norm, n_restarts=1, n_iter=spec.steps, eps=spec.eps,
                                       seed=_seed(spec), targeted=False, device=x.device), model, x, y, spec, recorder,
                nat_logits)


def fab_t(model, x, y, spec, recorder, targets=None, generator=None, nat_logits=None):
    n_t = _n_targets(model, x, spec)
    return _run(lambda m: FABAttack_PT(m, norm=spec.norm, n_restarts=1, n_iter=spec.steps, eps=spec.eps,
                                       seed=_seed(spec), targeted=True, n_target_classes=n_t, device=x.device),
                model, x, y, spec, recorder, nat_logits)


def square(model, x, y, spec, recorder, targets=None, generator=None, nat_logits=None):
    return _run(lambda m: SquareAttack(m, norm=spec.norm, n_queries=spec.steps, eps=spec.eps, n_restarts=1,
                                       seed=_seed(spec), device=x.device), model, x, y, spec, recorder, nat_logits)
