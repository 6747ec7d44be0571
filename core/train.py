"""Adversarial training with energy probing: ``python -m core.train --method sat ...``.

Per epoch it writes one JSON line to ``<out>/metrics.jsonl`` with natural and PGD accuracy on
held-out data, Delta E(x) = E(x) - E(x*) and Delta E(x, y) on a fixed probe set of *training*
samples (mean and quantiles; the full vectors go to ``<out>/probe/epoch_XXXX.npz`` for the arrow
plots of Fig. 1 b-d), WEAT weight statistics, loss terms, learning rate and time. Checkpoints:
``last.safetensors`` / ``best.safetensors`` (model + metadata, best = highest PGD accuracy) and
``state.pt`` (optimizer, scheduler, epoch) for ``--resume``. All writes are atomic.

Randomness is derived from (seed, epoch), so a run resumed from an epoch boundary reproduces an
uninterrupted run exactly on the same device.

Multi-process: ``torchrun --nproc_per_node N -m core.train ...`` splits every batch's samples over
the processes and averages gradients with an all-reduce (gloo on CPU, nccl on GPU); rank 0 evaluates
and writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .attacks import ATTACKS, AttackSpec, run_attack
from .attacks.base import format_eps
from .attacks.gradient import gradient_attack
from .cli import ArgumentParser, error_exit
from .data import augment as augment_batch
from .data import dataset_spec, load_dataset, probe_indices
from .data.loader import prefetch_batches
from .energy import weat_weight
from .errors import EnergyLensError, InputError
from .losses import LossTerms, method_config, outer_loss
from .models import ModelMeta, build_model, device_of, save_checkpoint
from .models.checkpoint import load_state_dict_checked
from .models.folding import folded
from .rundir import RunDir
from .runtime import eval_mode, is_oom_error, resolve_device
from .storage import StorageError, remove_stale_temp_files
from .tensorio import atomic_torch_save, safe_torch_load
from .train_progress import TrainClock, format_eta, progress_message

__all__ = ["TrainConfig", "train", "train_step", "oom_safe_step", "main", "TrainingStopped"]

SCHEDULES = ("onecycle", "piecewise", "cosine", "constant")
WIDTH_ARCHS = ("smallcnn", "demonet")   # architectures with a width option
MAX_EVAL_SAMPLES = 100_000   # held-out images attacked after every epoch (CIFAR test: 10,000; SVHN: 26,032)
MAX_PROBE_SIZE = 10_000      # probe images attacked after every epoch


class TrainingStopped(EnergyLensError):
    """Training stopped early (NaN loss, or a stop request)."""


@dataclass
class TrainConfig:
    method: str = "sat"
    dataset: str = "digits"
    arch: str = "smallcnn"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    decay_epochs: str | None = None     # piecewise: epochs after which lr is multiplied by 0.1, e.g. "8,16";
    #                                     None = after half and three quarters of the epochs
    eps: float | None = None            # default: the dataset's (8/255 CIFAR, 16/255 digits)
    step_size: float | None = None      # default: eps / 4
    attack_steps: int = 10
    beta: float | None = None           # default: the method's (6)
    inner: str | None = None            # ablation overrides (Table 1c)
    outer: str | None = None
    weighting: str | None = None
    weight_norm: str = "batch"
    weight_logits: str = "train"
    burn_in: int | None = None
    eval_steps: int = 20
    eval_samples: int = 512
    probe_size: int | None = None       # default: auto_probe_size(training set) -- 3% of it, 4/class..256
    snapshot_every: int = 1
    checkpoint_every: int = 0           # also keep epoch_XXXX.safetensors every N epochs (0 = only last/best)
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    out_dir: str = "runs/default"
    data_root: str | None = None
    val_fraction: float = 0.1           # held-out share of train when the dataset has no test split
    train_limit: int | None = None
    train_per_class: int | None = None  # class-balanced subset: the first N training images of each class
    width: int | None = None            # architecture width (smallcnn / demonet); None = the architecture's default
    exclude_indices_file: str | None = None  # JSON list of training-set indices to leave out (Fig. 5a)
    amp: bool = False                   # bf16 autocast (CUDA only)
    channels_last: bool = False
    compile: bool = False               # torch.compile the training forwards (eager again if compiling fails)
    loader_workers: int | None = None   # threads gathering the next batches (pinned memory on CUDA); 0 = inline;
    #                                     None: 2 on CUDA, 0 on a CPU (there they only compete with torch's threads)
    threads: int | None = None          # CPU threads of this process (torch.set_num_threads); None = torch's
    resume: bool = False
    name: str | None = None

    def resolved_eps(self) -> float:
        return float(self.eps) if self.eps is not None else dataset_spec(self.dataset).default_eps

    def resolved_step(self) -> float:
        return float(self.step_size) if self.step_size is not None else self.resolved_eps() / 4

    def decay_milestones(self) -> list[int]:
        """The epochs after which the piecewise schedule multiplies lr by 0.1 (InputError when malformed)."""
        if self.decay_epochs is None:
            return [int(self.epochs * 0.5), int(self.epochs * 0.75)]
        if self.schedule != "piecewise":
            raise InputError(f"decay epochs apply to the piecewise schedule only, not to '{self.schedule}'")
        parts = [p.strip() for p in str(self.decay_epochs).split(",")]
        if not all(p.isdigit() for p in parts) or len(parts) > 16:
            raise InputError(f"decay epochs must be up to 16 comma-separated whole numbers like '8,16', "
                             f"got {self.decay_epochs!r}")
        m = [int(p) for p in parts]
        if m != sorted(set(m)) or not all(1 <= e < self.epochs for e in m):
            raise InputError(f"decay epochs must increase and lie in [1, {self.epochs - 1}] (before the last epoch), "
                             f"got {self.decay_epochs!r}")
        return m

    def arch_kwargs(self) -> dict:
        """Keyword arguments of the architecture (its width, when set)."""
        return {"width": int(self.width)} if self.width is not None else {}

    def loss_config(self):
        return method_config(self.method, beta=self.beta, inner=self.inner, outer=self.outer, weighting=self.weighting,
                             weight_norm=self.weight_norm, weight_logits=self.weight_logits, burn_in=self.burn_in)

    def validate(self, n_train: int | None = None) -> "TrainConfig":
        """Check every setting (InputError naming the field and the bad value); ``n_train``: the training set's
        size, when known (the batch must fit in it). Cheap: no data is read."""
        self._check_types()
        if self.dataset.startswith("npz:") and not self.dataset[4:].strip():
            raise InputError(f"dataset: enter the path of your .npz file (arrays x and y) after 'npz:', "
                             f"got '{self.dataset}'")
        self.loss_config()
        num = {"lr": self.lr, "momentum": self.momentum, "weight decay": self.weight_decay}
        for k, v in num.items():
            if not math.isfinite(v) or v < 0:
                raise InputError(f"{k} must be a finite number >= 0, got {v}")
        if self.lr == 0:
            raise InputError("learning rate must be > 0")
        if self.eps is not None and (not math.isfinite(self.eps) or self.eps < 0 or self.eps > 1):
            raise InputError(f"epsilon must lie in [0, 1] (0 to 255/255), got {format_eps(self.eps)}")
        if self.step_size is not None and not (self.step_size > 0):
            raise InputError(f"step size must be > 0, got {self.step_size}")
        if self.beta is not None and not (self.beta >= 0):
            raise InputError(f"beta must be >= 0, got {self.beta}")
        for k in ("epochs", "batch_size", "attack_steps", "eval_steps", "eval_samples", "probe_size", "snapshot_every",
                  "checkpoint_every"):
            v = getattr(self, k)
            if (k == "probe_size" and v is None) or (k == "checkpoint_every" and v == 0):
                continue
            if int(v) != v or v <= 0:
                raise InputError(f"{k.replace('_', ' ')} must be a positive integer, got {v}")
        for k in ("loader_workers", "threads"):
            v = getattr(self, k)
            if v is not None and (int(v) != v or v < (1 if k == "threads" else 0) or v > 256):
                raise InputError(f"{k.replace('_', ' ')} must be an integer in [{1 if k == 'threads' else 0}, 256], "
                                 f"got {v}")
        if self.epochs > 10_000:
            raise InputError(f"epochs={self.epochs} is absurd (max 10000)")
        # the training attack, the evaluation attack and the probe attack run through the attack code: the same
        # step limits as run_attack (AttackInfo.max_steps), so that nothing is accepted here that fails (or hangs) later

        inner = "trades-kl" if self.loss_config().inner == "kl" else "pgd"
        for k, limit, what in (("attack_steps", min(ATTACKS[inner].max_steps, ATTACKS["pgd"].max_steps),
                                f"for the training attack ({ATTACKS[inner].label})"),
                               ("eval_steps", ATTACKS["pgd"].max_steps, "for the evaluation attack (PGD)")):
            if getattr(self, k) > limit:
                raise InputError(f"{k.replace('_', ' ')}={getattr(self, k)} is too many {what} (max {limit})")
        if self.eval_samples > MAX_EVAL_SAMPLES:
            raise InputError(f"eval samples={self.eval_samples} is absurd: every epoch attacks that many test images "
                             f"(max {MAX_EVAL_SAMPLES:,}; the whole test set is used when it is smaller)")
        if self.probe_size is not None and self.probe_size > MAX_PROBE_SIZE:
            raise InputError(f"probe size={self.probe_size} is absurd: every epoch attacks that many training images "
                             f"(max {MAX_PROBE_SIZE:,}; the default is 3% of the training set, at most {PROBE_MAX})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= 2**32 - 1:
            raise InputError(f"seed must be an integer in [0, {2**32 - 1}], got {self.seed!r}")
        if self.schedule not in SCHEDULES:
            raise InputError(f"schedule must be one of {SCHEDULES}")
        self.decay_milestones()
        if not 0 < self.val_fraction < 1:
            raise InputError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")
        if self.train_limit is not None and (int(self.train_limit) != self.train_limit or self.train_limit < 0):
            raise InputError(f"train limit (the number of training images) must be an integer >= 0 (0 = all), "
                             f"got {self.train_limit}")
        for k, lo, hi in (("train_per_class", 1, 10_000_000), ("width", 1, 1024)):
            v = getattr(self, k)
            if v is not None and (int(v) != v or not lo <= v <= hi):
                raise InputError(f"{k.replace('_', ' ')} must be an integer in [{lo}, {hi:,}] (or unset), got {v}")
        if self.width is not None and self.arch not in WIDTH_ARCHS:
            raise InputError(f"width applies to {' and '.join(WIDTH_ARCHS)} only, not to '{self.arch}'")
        if n_train is not None and self.batch_size > n_train:
            raise InputError(f"batch size {self.batch_size} is larger than the training set ({n_train} images)")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise InputError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got '{self.device}'")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError("CUDA was requested but no GPU is available: use device 'cpu' or 'auto'")
        return self

    def _check_types(self) -> None:
        """Each field holds its kind of value (a config file may hold anything): text, a number, true/false."""
        for f in dataclasses.fields(self):
            v, kind = getattr(self, f.name), str(f.type).split("|")[0].strip()
            if v is None and "None" in str(f.type):
                continue
            ok = {"str": isinstance(v, str), "bool": isinstance(v, bool),
                  "int": isinstance(v, numbers.Real) and not isinstance(v, bool),
                  "float": isinstance(v, numbers.Real) and not isinstance(v, bool)}.get(kind, True)
            if not ok:
                what = {"str": "a string", "bool": "true or false", "int": "an integer", "float": "a number"}[kind]
                raise InputError(f"{f.name.replace('_', ' ')} must be {what}, got {v!r}")
        for f in dataclasses.fields(self):  # NaN / inf where a whole number is expected
            v = getattr(self, f.name)
            if str(f.type).startswith("int") and isinstance(v, float) and not math.isfinite(v):
                raise InputError(f"{f.name.replace('_', ' ')} must be an integer, got {v}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        if not isinstance(d, dict):
            raise InputError(f"the training configuration must be a JSON object of options, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InputError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**d)


# --------------------------------------------------------------------------------------------
def _dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def load_splits(cfg: TrainConfig):
    """(train, held-out) datasets. Datasets without a test split give a fixed validation slice."""
    train = load_dataset(cfg.dataset, "train", root=cfg.data_root)
    if cfg.dataset.startswith("npz:"):
        g = torch.Generator().manual_seed(12345)
        perm = torch.randperm(len(train), generator=g)
        n_val = max(1, int(len(train) * cfg.val_fraction))
        val, train = train.subset(perm[:n_val], "val"), train.subset(perm[n_val:], "train")
    else:
        val = load_dataset(cfg.dataset, "test", root=cfg.data_root)
    if cfg.train_limit:
        train = train.subset(torch.arange(min(cfg.train_limit, len(train))))
    if cfg.train_per_class:
        keep = torch.cat([train.class_indices(c)[:cfg.train_per_class] for c in range(train.num_classes)])
        train = train.subset(keep.sort().values)
    if cfg.exclude_indices_file:
        train = train.subset(_kept_indices(cfg.exclude_indices_file, len(train)))
    return train, val


def _kept_indices(path: str, n: int) -> torch.Tensor:
    """Indices of the training set minus those listed in ``path`` (a JSON list, or {"indices": [...]})."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read the exclusion file {path}: {e}") from e
    idx = data.get("indices") if isinstance(data, dict) else data
    if not isinstance(idx, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
        raise InputError(f"{path} must hold a JSON list of integer training-set indices")
    if idx and (min(idx) < 0 or max(idx) >= n):
        raise InputError(f"{path} lists indices outside the training set (0..{n - 1})")
    keep = torch.ones(n, dtype=torch.bool)
    keep[torch.as_tensor(idx, dtype=torch.long)] = False
    if not bool(keep.any()):
        raise InputError(f"{path} excludes every training sample")
    return torch.nonzero(keep).squeeze(1)


def _make_scheduler(opt, cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        if total < 8:  # OneCycleLR divides by (0.25 * total - 1): zero at 4 steps, nonsense below; keep lr constant
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.25)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if cfg.schedule == "piecewise":
        m = [e * steps_per_epoch for e in cfg.decay_milestones()] if cfg.decay_epochs is not None else \
            [int(total * 0.5), int(total * 0.75)]
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=m, gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def evaluate(model, x: torch.Tensor, y: torch.Tensor, eps: float, step: float, steps: int, batch_size: int = 256,
             norm: str = "Linf") -> dict:
    """Natural and PGD accuracy (eval mode)."""
    if eps > 0:
        spec = AttackSpec("pgd", norm=norm, eps=eps, step_size=step, steps=steps, batch_size=batch_size, seed=0)
        tr = run_attack(model, x, y, spec).trace
        return {"nat_acc": tr.natural_accuracy(), "pgd_acc": tr.robust_accuracy()}
    with eval_mode(model), torch.no_grad():
        dev = device_of(model)
        pred = torch.cat([model(x[i:i + batch_size].to(dev)).argmax(1).cpu() for i in range(0, len(x), batch_size)])
    acc = float((pred == y).float().mean())
    return {"nat_acc": acc, "pgd_acc": acc}


PROBE_SHARE, PROBE_MAX, PROBE_PER_CLASS_MIN = 0.03, 256, 4


def auto_probe_size(n_train: int, num_classes: int) -> int:
    """Default probe-set size: 3% of the training set, at least 4 images per class, at most 256.

    The probe attack costs about as much per image as a training step, so 3% keeps Delta E probing
    near 3% of the epoch (bench/bench_train.py); 256 images (a 50k CIFAR-10 epoch) already pin the mean
    Delta E to a few thousandths, and the per-class floor keeps the arrows of every class on tiny sets.
    """
    n = max(PROBE_PER_CLASS_MIN * num_classes, round(PROBE_SHARE * n_train))
    return int(min(PROBE_MAX, n, n_train))


def probe_energies(model, x, y, eps: float, step: float, steps: int, inner: str) -> dict[str, np.ndarray]:
    """Natural vs adversarial energies of the probe set under the training attack."""
    name = "trades-kl" if inner == "kl" else "pgd"
    spec = AttackSpec(name, eps=eps, step_size=step, steps=steps, seed=0, batch_size=256)
    tr = run_attack(model, x, y, spec).trace
    return {"e_nat": tr.marginal[0], "e_adv": tr.marginal[-1], "ej_nat": tr.joint[0], "ej_adv": tr.joint[-1],
            "correct_nat": (tr.pred[0] == tr.labels), "correct_adv": (tr.pred[-1] == tr.labels)}


def _stats(v: np.ndarray, prefix: str) -> dict:
    q = np.quantile(v, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {f"{prefix}_mean": float(v.mean()), f"{prefix}_std": float(v.std()),
            **{f"{prefix}_q{int(p * 100)}": float(x) for p, x in zip([0.1, 0.25, 0.5, 0.75, 0.9], q)}}


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
            self.note = f"torch.compile unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); eager"
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


def _write_progress(run: RunDir, **kw) -> None:
    try:
        run.write_progress(**kw)
    except EnergyLensError:  # progress is a courtesy: a full disk must not stop the training
        pass


# --------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, progress: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> dict:
    """Run training; returns the last metrics record. Raises EnergyLensError subclasses on bad input."""
    cfg.validate()  # every setting, before any data is read or any process group is started
    rank, world = _dist_info()
    device = resolve_device(cfg.device)
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    train_ds, val_ds = load_splits(cfg)
    cfg.validate(len(train_ds))
    lcfg = cfg.loss_config()
    eps, step = cfg.resolved_eps(), cfg.resolved_step()
    out = Path(cfg.out_dir)
    run = RunDir(out)
    is_main = rank == 0
    if is_main:
        try:
            run.probe_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create the run folder {out}: {e.strerror or e}") from e
        if cfg.resume:  # temp files of writes a killed earlier run left behind (state.pt's: hundreds of MB for a WRN)
            stale = remove_stale_temp_files(out)
            if stale:
                print(f"removed {len(stale)} stale temp file(s) of interrupted writes", file=sys.stderr, flush=True)
        run.write_config(cfg.to_dict())

    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    spec = dataset_spec(cfg.dataset)
    arch_kwargs = cfg.arch_kwargs()
    model = build_model(cfg.arch, train_ds.num_classes, **arch_kwargs).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = CompiledForward(model) if cfg.compile else None  # train-mode forwards only; state dicts stay the module's
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    n = len(train_ds)
    if cfg.batch_size % world:
        raise InputError(f"batch size {cfg.batch_size} must be divisible by the number of processes ({world})")
    per_rank_bs = cfg.batch_size // world
    steps_per_epoch = n // cfg.batch_size  # drop the last partial batch (keeps BN statistics sane)
    sched = _make_scheduler(opt, cfg, steps_per_epoch)

    start_epoch, best = 0, -1.0
    state_path = run.state
    if cfg.resume and state_path.exists():
        st = safe_torch_load(state_path)
        load_state_dict_checked(model, st["model"], where="state.pt")
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        start_epoch, best = int(st["epoch"]), float(st["best"])
        if is_main:  # drop the metrics and batches written after the checkpoint we resume from (those epochs run again)
            run.keep_epochs(start_epoch)
    elif is_main:
        run.clear_records()
    if world > 1:
        for p in model.state_dict().values():
            dist.broadcast(p, 0)

    val_idx = torch.arange(min(cfg.eval_samples, len(val_ds)))
    xv, yv = val_ds.images(val_idx), val_ds.labels(val_idx)
    probe_size = cfg.probe_size or auto_probe_size(len(train_ds), train_ds.num_classes)
    pidx = probe_indices(train_ds, probe_size, seed=cfg.seed)
    xp, yp = train_ds.images(pidx), train_ds.labels(pidx)
    amp = cfg.amp and device.type == "cuda"
    meta = ModelMeta(arch=cfg.arch, num_classes=train_ds.num_classes, dataset=cfg.dataset, arch_kwargs=arch_kwargs,
                     input_shape=list(train_ds.input_shape), class_names=train_ds.class_names, method=cfg.method,
                     hparams={**cfg.to_dict(), "eps": eps, "step_size": step, "probe_size": probe_size,
                              "loss": lcfg.to_dict()},
                     name=cfg.name or out.name)
    # random start for both inner losses: PGD-CE uniform in the ball, TRADES-KL x + 0.001 N(0, I) (at x itself the
    # KL gradient is exactly zero, so without it the first step would follow rounding noise or not move at all)
    atk_spec = AttackSpec("pgd", eps=eps, step_size=step, steps=cfg.attack_steps, random_start=True)
    kind = lcfg.inner
    last_record: dict = {}
    oom: dict = {}  # {'micro_batch': k} once a training step ran out of memory
    clock = TrainClock(epochs=cfg.epochs, batches=steps_per_epoch, batch_size=cfg.batch_size,
                       attack_steps=cfg.attack_steps, eval_samples=len(val_idx), eval_steps=cfg.eval_steps,
                       probe_size=len(pidx))
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        torch.manual_seed(cfg.seed * 7_919 + epoch)
        perm = torch.randperm(n, generator=g)
        model.train()
        sums: dict[str, float] = {}
        wvals = []
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", file=sys.stderr,
                   disable=not is_main, leave=False)
        # several processes: every one augments the whole global batch with the same generator and keeps its
        # slice (so augmentation does not depend on the number of processes); attack noise comes from a
        # per-process generator (otherwise every process would draw the same noise for its slice)
        g_atk = g if world == 1 else torch.Generator().manual_seed(cfg.seed * 100_003 + epoch + 1_000_003 * (rank + 1))
        mine = slice(rank * per_rank_bs, (rank + 1) * per_rank_bs)
        # with augmentation every process gathers the global batch (see above); without, only its slice
        batch_idx = [perm[b * cfg.batch_size:(b + 1) * cfg.batch_size] for b in range(steps_per_epoch)]
        if not cfg.augment:
            batch_idx = [bi[mine] for bi in batch_idx]
        workers = cfg.loader_workers if cfg.loader_workers is not None else (2 if device.type == "cuda" else 0)
        loader = prefetch_batches(train_ds.x, train_ds.y, batch_idx, device, workers=workers)
        clock.start_batch()
        for b, (xu, yu) in zip(bar, loader):
            xb = xu.float().div_(255.0)  # exactly ImageDataset.images()
            if cfg.augment:
                xb, yb = augment_batch(xb, 4, spec.flip, generator=g)[mine], yu[mine]
            else:
                yb = yu
            if cfg.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            lt = oom_safe_step(model, opt, lcfg, xb, yb, atk_spec, oom, epoch=epoch, generator=g_atk, amp=amp,
                                world=world, where=f" at epoch {epoch + 1}, batch {b + 1}", net=net)
            sched.step()
            for k, v in lt.terms.items():
                sums[k] = sums.get(k, 0.0) + v
            if lt.weights is not None:
                wvals.append(lt.weights.float().cpu())
            clock.end_batch()
            if is_main and clock.report_due(b + 1):
                frac = (epoch + (b + 1) / steps_per_epoch) / cfg.epochs
                eta = clock.eta(epoch + 1, b + 1)
                msg = progress_message(epoch + 1, cfg.epochs, b + 1, steps_per_epoch, eta,
                                       estimated=not clock.eval_measured)
                _write_progress(run, epoch=epoch + 1, epochs=cfg.epochs, batch=b + 1, batches=steps_per_epoch,
                                fraction=frac, phase="train", eta_s=eta, seconds_per_batch=clock.seconds_per_batch,
                                eta_estimated=not clock.eval_measured, message=msg)
                loss_now = lt.terms.get("loss")
                try:  # the batch-level loss log: the live plot's first points, long before the first epoch ends
                    run.append_batch({
                        "epoch": epoch + 1, "batch": b + 1, "batches": steps_per_epoch,
                        "step": epoch * steps_per_epoch + b + 1,
                        "loss": float(loss_now) if loss_now is not None else float(lt.loss.detach()),
                        "seconds_per_batch": clock.seconds_per_batch, "time": time.time()})
                except EnergyLensError:
                    pass
                if progress:
                    progress({"epoch": epoch + 1, "batch": b + 1, "batches": steps_per_epoch, "fraction": frac,
                              "eta_s": eta, "message": msg})
            if should_stop and should_stop():
                raise TrainingStopped("stopped on request")
            clock.start_batch()
        loader.close()  # (on an exception the generator's own clean-up stops the loader threads)
        train_time = time.time() - t0
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):  # identical on every process
            raise TrainingStopped(f"the weights became non-finite during epoch {epoch + 1}: training stopped. "
                                  "The last good checkpoint is kept; try a smaller learning rate.")

        if world > 1:
            if sums:  # log the loss terms of the whole global batch, not only rank 0's share
                keys = sorted(sums)
                red = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
                dist.all_reduce(red)
                sums = dict(zip(keys, (red / world).tolist()))
            dist.barrier()
        if not is_main:
            continue
        clock.start_eval()
        eta = clock.eta_after_eval(epoch + 1)
        msg = progress_message(epoch + 1, cfg.epochs, eta_s=eta, estimated=not clock.eval_measured, phase="evaluate")
        _write_progress(run, epoch=epoch + 1, epochs=cfg.epochs, batch=steps_per_epoch, batches=steps_per_epoch,
                        fraction=(epoch + 1) / cfg.epochs, phase="evaluate", eta_s=eta,
                        eta_estimated=not clock.eval_measured, message=msg)
        if progress:
            progress({"epoch": epoch + 1, "batch": steps_per_epoch, "batches": steps_per_epoch,
                      "fraction": (epoch + 1) / cfg.epochs, "eta_s": eta, "message": msg})
        t1 = time.time()
        ev = evaluate(model, xv, yv, eps, max(step, eps / 4) if cfg.eval_steps else step, cfg.eval_steps)
        pe = probe_energies(model, xp, yp, eps, step, cfg.attack_steps, "kl" if kind == "kl" else "ce")
        d_marg, d_joint = pe["e_nat"] - pe["e_adv"], pe["ej_nat"] - pe["ej_adv"]
        # WEAT weights of the probe set, whatever the method (for the weight histogram)
        w_probe = weat_weight(torch.from_numpy(-pe["e_nat"][:, None].astype(np.float32))).numpy()  # w depends on E(x) only
        probe_time = time.time() - t1
        rec = {
            "epoch": epoch + 1, "lr": float(opt.param_groups[0]["lr"]),
            "nat_acc": ev["nat_acc"], "pgd_acc": ev["pgd_acc"],
            "nat_err": 1 - ev["nat_acc"], "rob_err": 1 - ev["pgd_acc"],
            "train_time": train_time, "probe_time": probe_time, "probe_size": int(len(pidx)),
            **({"compile": net.note} if net is not None else {}),
            **{f"train_{k}": v / max(steps_per_epoch, 1) for k, v in sums.items()},
            **_stats(d_marg, "dE"), **_stats(d_joint, "dEy"),
            "E_nat_mean": float(pe["e_nat"].mean()), "E_adv_mean": float(pe["e_adv"].mean()),
            "probe_nat_acc": float(pe["correct_nat"].mean()), "probe_adv_acc": float(pe["correct_adv"].mean()),
        }
        if oom.get("micro_batch"):
            rec["oom_microbatch"] = int(oom["micro_batch"])
        if wvals:
            wv = torch.cat(wvals).numpy()
            rec.update({"w_mean": float(wv.mean()), "w_std": float(wv.std()), "w_min": float(wv.min()), "w_max": float(wv.max())})
        if (epoch + 1) % cfg.snapshot_every == 0 or epoch + 1 == cfg.epochs:
            arrays = {**pe, "labels": yp.numpy(), "indices": pidx.numpy(), "w_probe": w_probe}
            run.write_probe(epoch + 1, arrays)
        run.append_metrics(rec)
        meta.epoch = epoch + 1
        meta.metrics = {k: rec[k] for k in ("nat_acc", "pgd_acc", "dE_mean", "dEy_mean")}
        save_checkpoint(run.last, model, meta)
        if cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(run.epoch_checkpoint(epoch + 1), model, meta)
        if ev["pgd_acc"] > best:
            best = ev["pgd_acc"]
            save_checkpoint(run.best, model, meta)
        atomic_torch_save(state_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                       "scheduler": sched.state_dict(), "epoch": epoch + 1, "best": best})
        last_record = rec
        clock.end_eval()
        if progress:
            left = clock.eta(epoch + 1, steps_per_epoch)
            eta = 0.0 if epoch + 1 == cfg.epochs or left is None else left - (clock.eval_seconds or 0.0)
            progress({"epoch": epoch + 1, "fraction": (epoch + 1) / cfg.epochs, "metrics": rec, "eta_s": eta})
    if is_main:
        _write_progress(run, epoch=cfg.epochs, epochs=cfg.epochs, fraction=1.0, phase="done")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return last_record


# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m core.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="JSON file with TrainConfig fields (command-line flags override it)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            typ = {"int": int, "float": float}.get(str(f.type).split(" ")[0].replace("|", "").strip(), None)
            if "float" in str(f.type):
                typ = float
            elif "int" in str(f.type):
                typ = int
            else:
                typ = str
            p.add_argument(flag, dest=f.name, type=typ, default=None)
    return p


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    base: dict = {}
    if args.config:
        try:
            base = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"cannot read config file {args.config}: {e}") from e
    if not isinstance(base, dict):
        raise InputError(f"config file {args.config} must hold a JSON object of training options")
    over = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    return TrainConfig.from_dict({**base, **over})


def main(argv: list[str] | None = None) -> int:
    """``python -m core.train``: a bad setting ends with one line ``error: <message>`` on stderr, exit status 2."""
    try:
        cfg = config_from_args(argv)
        rec = train(cfg)
    except EnergyLensError as e:
        return error_exit(e)
    if rec:
        print(json.dumps({k: rec[k] for k in ("epoch", "nat_acc", "pgd_acc", "dE_mean", "dEy_mean")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def check_job_config(config: dict) -> None:
    """core.jobs' check of a training job's config before it is queued (InputError naming the field)."""
    TrainConfig.from_dict({k: v for k, v in config.items() if k != "out_dir"}).validate()


def run_job(config: dict, run_dir, report: Callable[[float, str], None]) -> dict:
    """Entry point for background jobs (core.jobs): train into ``run_dir``.

    ``config`` holds TrainConfig fields; ``out_dir`` is forced to the job folder and ``resume``
    is honoured so a stopped or crashed job continues from its last completed epoch.
    """
    cfg = TrainConfig.from_dict({**{k: v for k, v in config.items() if k != "out_dir"}, "out_dir": str(run_dir)})

    def prog(p: dict) -> None:
        msg = p.get("message") or f"epoch {p.get('epoch')}/{cfg.epochs}"
        if "metrics" in p:
            m = p["metrics"]
            msg = (f"epoch {p.get('epoch')}/{cfg.epochs} done — nat {m['nat_acc']:.1%}, PGD {m['pgd_acc']:.1%}, "
                   f"ΔE(x) {m['dE_mean']:+.3f}")
            if p.get("eta_s") is not None and p.get("epoch", 0) < cfg.epochs:
                msg += f" · ETA {format_eta(p['eta_s'])}"
        report(float(p.get("fraction", 0.0)), msg)

    return train(cfg, progress=prog)
