"""One interface for every attack: ``run_attack(model, x, y, spec) -> AttackResult``.

Guarantees, for every attack:
* the model is in eval mode during the attack and its previous mode (and its parameters'
  ``requires_grad``) is restored afterwards, even on error, also when several threads attack the same
  (cached, shared) model at once (:func:`eval_mode`);
* the result lies in the epsilon-ball around x (Linf or L2) and in the [0, 1] box;
* an :class:`~core.drift.EnergyTrace` is returned, step 0 being the natural images;
* work is batched; on an out-of-memory error the batch is halved and retried, and the caller's
  ``progress`` callback is told so.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ..data.dataset import PAPER_EPS
from ..drift import EnergyTrace, TraceRecorder
from ..errors import InputError
from ..runtime import Progress, eval_mode, is_oom_error, timed
from .budget import n_targets

__all__ = ["ATTACKS", "AttackSpec", "AttackResult", "AttackInfo", "AttackInterrupted", "eval_mode", "project", "choose_targets",
           "is_oom_error", "Progress", "format_eps", "timed", "pgd_step_size", "scaled_step_size"]

NORMS = ("Linf", "L2")
MAX_KAPPA = 1e4          # a logit margin; far beyond any real one, and exactly representable in float32
MAX_SEED = 2**32 - 1     # seeds feed torch.manual_seed and pyautoattack (which also seeds CUDA)
TARGET_MODES = ("random", "chosen", "least-likely")


def format_eps(eps: float, norm: str = "Linf") -> str:
    """ε in the units people type it: ``16/255`` (``0.5/255``, ``-5/255``) for Linf, ``0.5`` for L2."""
    e = float(eps)
    if not math.isfinite(e):
        return str(e)
    if norm != "Linf":
        return f"{e:g}"
    k = e * 255
    if k == 0:
        return "0"
    r = round(k)
    return f"{r}/255" if abs(k - r) < 1e-6 else f"{k:.3g}/255"


# ---- the step-size rules: the only place they are stated ------------------------------------------------------------
def pgd_step_size(eps: float) -> float:
    """The paper's PGD step, eps / 4 (2/255 at eps = 8/255), whatever the number of steps: the training attack
    (TrainConfig, PGD-10), the per-epoch and the job evaluation (PGD-20), and the Attack Lab's manual step."""
    return float(eps) / 4


def scaled_step_size(eps: float, steps: int) -> float:
    """2.5 * eps / steps (Madry et al.): a step that covers the ball whatever ``steps`` is. An :class:`AttackSpec`
    without ``step_size`` uses it (the Attack Lab's "auto" step, attacks run from code); equal to
    :func:`pgd_step_size` at 10 steps."""
    return 2.5 * float(eps) / max(int(steps), 1)


@dataclass
class AttackSpec:
    """What to run. ``step_size=None`` means :func:`scaled_step_size` (2.5 * eps / steps, Madry et al.)."""

    name: str = "pgd"
    norm: str = "Linf"
    eps: float = PAPER_EPS
    steps: int = 10
    step_size: float | None = None
    targeted: bool = False
    target_mode: str = "random"          # random | chosen | least-likely
    target_class: int | None = None      # for target_mode == 'chosen'
    random_start: bool = True
    seed: int | None = 0
    batch_size: int = 256
    kappa: float = 0.0                   # CW confidence margin (>= 0; 0 = stop at the boundary)
    extra: dict = field(default_factory=dict)

    @property
    def alpha(self) -> float:
        return float(self.step_size) if self.step_size is not None else scaled_step_size(self.eps, self.steps)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self, num_classes: int | None = None) -> "AttackSpec":
        if self.name not in ATTACKS:
            raise InputError(f"unknown attack '{self.name}'. Choose one of: {', '.join(ATTACKS)}")
        info = ATTACKS[self.name]
        if self.norm not in NORMS:
            raise InputError(f"norm must be one of {NORMS}, got '{self.norm}'")
        if self.norm not in info.norms:
            raise InputError(f"{info.label} supports only the {'/'.join(info.norms)} threat model")
        for nm, v in (("eps", self.eps), ("step size", self.step_size), ("kappa", self.kappa)):
            if v is not None and not math.isfinite(float(v)):
                raise InputError(f"{nm} must be a finite number, got {v}")
        if not 0 <= float(self.kappa) <= MAX_KAPPA:
            raise InputError(f"kappa (the CW confidence margin) must lie in [0, {MAX_KAPPA:g}], got {self.kappa:g}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
                                      or not 0 <= int(self.seed) <= MAX_SEED):
            raise InputError(f"seed must be an integer in [0, {MAX_SEED}] (or None), got {self.seed!r}")
        if self.eps < 0:
            raise InputError(f"epsilon must be >= 0, got {format_eps(self.eps, self.norm)}")
        limit = 1.0 if self.norm == "Linf" else 64.0
        if self.eps > limit:
            raise InputError(f"epsilon {format_eps(self.eps, self.norm)} is absurd for {self.norm} on [0,1] images "
                             f"(max {format_eps(limit, self.norm)})")
        if int(self.steps) != self.steps or self.steps <= 0:
            raise InputError(f"steps must be a positive integer, got {self.steps}")
        if self.steps > info.max_steps:
            raise InputError(f"steps={self.steps} is too many for {info.label} (max {info.max_steps})")
        if self.step_size is not None and self.step_size <= 0:
            raise InputError(f"step size must be > 0, got {self.step_size}")
        if self.extra and "targets" in self.extra:
            n_targets(self, num_classes if num_classes is not None else 1_000_000)
        if self.batch_size <= 0:
            raise InputError(f"batch size must be positive, got {self.batch_size}")
        if self.targeted:
            if not info.targeted:
                raise InputError(f"{info.label} has no targeted mode")
            if self.target_mode not in TARGET_MODES:
                raise InputError(f"target mode must be one of {TARGET_MODES}, got '{self.target_mode}'")
            if self.target_mode == "chosen":
                if self.target_class is None:
                    raise InputError("choose a target class for a targeted attack with target mode 'chosen'")
                if num_classes is not None and not 0 <= int(self.target_class) < num_classes:
                    raise InputError(f"target class {self.target_class} does not exist (model has {num_classes} classes)")
        elif info.requires_targeted:
            raise InputError(f"{info.label} is a targeted attack: enable 'targeted'")
        if num_classes is not None and num_classes < info.min_classes:
            raise InputError(f"{info.label} needs a model with at least {info.min_classes} classes")
        return self


@dataclass
class AttackResult:
    x_adv: torch.Tensor
    trace: EnergyTrace
    spec: AttackSpec
    seconds: float
    notes: list[str] = field(default_factory=list)
    partial: bool = False                # cancelled: only part of the images / steps (see notes)


@dataclass
class AttackInfo:
    label: str
    fn: Callable[..., torch.Tensor]
    norms: tuple[str, ...] = NORMS
    targeted: bool = True               # has a targeted mode
    requires_targeted: bool = False     # only targeted
    per_step_trace: bool = True         # records every step (else natural + final only)
    min_classes: int = 2
    max_steps: int = 10_000
    description: str = ""


# Every attack by name; core.attacks fills it with the gradient attacks and the AutoAttack components.
ATTACKS: dict[str, AttackInfo] = {}


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project onto the eps-ball around x, then onto the [0, 1] box."""
    delta = x_adv - x
    if norm == "Linf":
        delta = delta.clamp(-eps, eps)
    else:
        n = delta.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
        delta = delta * (eps / n).clamp(max=1.0).view(-1, *([1] * (x.dim() - 1)))
    return (x + delta).clamp(0.0, 1.0)


def choose_targets(logits: torch.Tensor, y: torch.Tensor, spec: AttackSpec, generator: torch.Generator | None = None) -> torch.Tensor:
    """Target labels != y: uniformly random, a chosen class, or the least likely class."""
    k = logits.shape[1]
    if spec.target_mode == "chosen":
        return torch.full_like(y, int(spec.target_class))
    if spec.target_mode == "least-likely":
        lg = logits.detach().clone()
        lg.scatter_(1, y.unsqueeze(1), float("inf"))
        return lg.argmin(dim=1)
    r = torch.randint(1, k, y.shape, generator=generator).to(y.device)
    return (y + r) % k


class AttackInterrupted(Exception):
    """Internal: a stop request reached an attack mid-way. ``x_adv`` / ``step``: the iterate reached (None when
    the attack cannot expose it). Never escapes :func:`core.attacks.run_attack`."""

    def __init__(self, x_adv: torch.Tensor | None = None, step: int | None = None):
        super().__init__("attack interrupted")
        self.x_adv, self.step = x_adv, step


def make_recorder(y: torch.Tensor, targets: torch.Tensor | None, spec: AttackSpec) -> TraceRecorder:
    return TraceRecorder(y, targets, meta={"attack": spec.to_dict()})
