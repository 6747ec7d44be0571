"""The settings of a training run: :class:`TrainConfig` (every field, its default and its check)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import asdict, dataclass, field

import torch

from ..attacks import ATTACKS, pgd_step_size
from ..attacks.base import format_eps
from ..cli import parse_fraction
from ..data import DATASETS, dataset_spec
from ..errors import InputError
from ..losses import INNERS, METHODS, OUTERS, WEIGHT_LOGITS, WEIGHT_NORMS, WEIGHTINGS, method_config
from ..models import ARCHITECTURES

__all__ = ["TrainConfig", "field_choices", "SCHEDULES", "WIDTH_ARCHS", "MAX_EVAL_SAMPLES", "MAX_PROBE_SIZE",
           "PROBE_SHARE", "PROBE_MAX", "PROBE_PER_CLASS_MIN", "MEASURE_SHARE"]

SCHEDULES = ("onecycle", "piecewise", "cosine", "constant")
WIDTH_ARCHS = ("smallcnn", "demonet")   # architectures with a width option
MAX_EVAL_SAMPLES = 100_000   # held-out images attacked after every epoch (CIFAR test: 10,000; SVHN: 26,032)
MAX_PROBE_SIZE = 10_000      # probe images attacked after every epoch
# the default probe set (auto_probe_size): 3% of the training set, at least 4 images per class, at most 256
PROBE_SHARE, PROBE_MAX, PROBE_PER_CLASS_MIN = 0.03, 256, 4
# measure_every unset (auto): the held-out evaluation runs every k epochs, k chosen after the first epoch so that the
# per-epoch measurement (evaluation / k + probe) costs at most this share of an average epoch
MEASURE_SHARE = 0.25


def _opt(default, help: str, *, choices=None, fraction: bool = False):
    """A TrainConfig field: its default and the metadata the command line and the config reader are built from."""
    meta = {"help": help, "fraction": fraction}
    if choices is not None:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


def field_choices(f: dataclasses.Field) -> tuple[str, ...] | None:
    """The names a field accepts (from its registry), or None when it takes any value."""
    c = f.metadata.get("choices")
    return tuple(c()) if c is not None else None


@dataclass
class TrainConfig:
    """Every setting of a training run. Each field's metadata holds its help text (``help``), where its choices come
    from (``choices``: a callable returning the registry's names, read when asked, so architectures registered later
    count) and whether it is a budget written as a fraction like ``8/255`` (``fraction``): the command line
    (:func:`core.train.build_parser`) and the config-file reader are built from them."""

    method: str = _opt("sat", "training method (paper Table 1c): the loss recipe; inner / outer / weighting / beta "
                       "override its parts", choices=lambda: tuple(METHODS))
    dataset: str = _opt("digits", "dataset to train on", choices=lambda: (*DATASETS, "npz:<path>"))
    arch: str = _opt("smallcnn", "architecture", choices=lambda: tuple(ARCHITECTURES))
    epochs: int = _opt(10, "number of epochs")
    batch_size: int = _opt(128, "batch size (over all processes; the last partial batch of an epoch is dropped)")
    lr: float = _opt(0.1, "learning rate (the peak of the onecycle schedule)")
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(5e-4, "SGD weight decay")
    schedule: str = _opt("onecycle", "learning-rate schedule", choices=lambda: SCHEDULES)
    decay_epochs: str | None = _opt(None, "piecewise schedule: epochs after which lr is multiplied by 0.1, e.g. "
                                    "'8,16' (default: after half and three quarters of the epochs)")
    eps: float | None = _opt(None, "L-infinity budget of the training attack, e.g. 8/255 (default: the dataset's, "
                             "core.data.DatasetSpec.default_eps)", fraction=True)
    step_size: float | None = _opt(None, "step of the training attack, e.g. 2/255 (default: eps / 4, "
                                   "core.attacks.pgd_step_size)", fraction=True)
    attack_steps: int = _opt(10, "steps of the training attack (PGD / TRADES-KL)")
    beta: float | None = _opt(None, "weight of the KL term (default: the method's)")
    inner: str | None = _opt(None, "ablation (Table 1c): the inner loss that finds x* (default: the method's)",
                             choices=lambda: INNERS)
    outer: str | None = _opt(None, "ablation (Table 1c): the outer cross-entropy term (default: the method's)",
                             choices=lambda: OUTERS)
    weighting: str | None = _opt(None, "ablation (Table 1c): the sample weighting (default: the method's)",
                                 choices=lambda: WEIGHTINGS)
    weight_norm: str = _opt("batch", "energy weights: divide the loss by the batch size (official) or by sum(w)",
                            choices=lambda: WEIGHT_NORMS)
    weight_logits: str = _opt("train", "energy weights from the train-mode logits (official) or an extra eval-mode "
                              "forward", choices=lambda: WEIGHT_LOGITS)
    burn_in: int | None = _opt(None, "MAIL: epochs with uniform sample weights (default: the method's)")
    eval_steps: int = _opt(20, "PGD steps of the evaluation after every epoch")
    eval_samples: int = _opt(512, "held-out images evaluated after every epoch")
    measure_every: int | None = _opt(None, "evaluate the held-out images (natural / PGD accuracy) every N epochs and "
                                     "at the last; the probe Delta E stays every epoch (default: auto, N chosen "
                                     "from the first epoch's training and probe times so that measuring costs at "
                                     "most 25% of an epoch)")
    probe_size: int | None = _opt(None, "training images whose Delta E is probed after every epoch (default: 3% of "
                                  "the training set, at least 4 per class, at most 256)")
    snapshot_every: int = _opt(1, "write the probe set's energies (arrow plots) every N epochs")
    checkpoint_every: int = _opt(0, "also keep epoch_XXXX.safetensors every N epochs (0 = only last and best)")
    augment: bool = _opt(True, "random crops (and flips where the dataset allows them)")
    seed: int = _opt(0, "random seed (data order, augmentation, attack noise, probe set)")
    device: str = _opt("auto", "'auto', 'cpu' or 'cuda[:N]'")
    out_dir: str = _opt("runs/default", "run folder (metrics, checkpoints, probe snapshots)")
    data_root: str | None = _opt(None, "data folder (default: $ENERGYLENS_DATA or <repo>/data)")
    val_fraction: float = _opt(0.1, "held-out share of the training set when the dataset has no test split")
    train_limit: int | None = _opt(None, "use only the first N training images (0 or unset = all)")
    train_per_class: int | None = _opt(None, "class-balanced subset: the first N training images of each class")
    width: int | None = _opt(None, "architecture width (smallcnn / demonet; default: the architecture's)")
    exclude_indices_file: str | None = _opt(None, "JSON list of training-set indices to leave out (Fig. 5a)")
    amp: bool = _opt(False, "bf16 autocast (CUDA only)")
    channels_last: bool = _opt(False, "channels-last memory format")
    compile: bool = _opt(False, "torch.compile the training forwards (eager again if compiling fails)")
    loader_workers: int | None = _opt(None, "threads gathering the next batches (0 = inline; default: 2 on CUDA, "
                                      "0 on a CPU)")
    threads: int | None = _opt(None, "CPU threads of this process (torch.set_num_threads; default: torch's)")
    resume: bool = _opt(False, "continue from the run folder's state.pt (its last completed epoch)")
    name: str | None = _opt(None, "run name shown in the dashboard (default: the run folder's name)")

    def resolved_eps(self) -> float:
        return float(self.eps) if self.eps is not None else dataset_spec(self.dataset).default_eps

    def resolved_step(self) -> float:
        return float(self.step_size) if self.step_size is not None else pgd_step_size(self.resolved_eps())

    def eval_step_size(self) -> float:
        """The step of the per-epoch PGD evaluation: the training step, at least the PGD rule's (eps / 4)."""
        return max(self.resolved_step(), pgd_step_size(self.resolved_eps()))

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
                  "checkpoint_every", "measure_every"):
            v = getattr(self, k)
            if (k in ("probe_size", "measure_every") and v is None) or (k == "checkpoint_every" and v == 0):
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
        fractions = {f.name for f in dataclasses.fields(cls) if f.metadata.get("fraction")}
        return cls(**{k: parse_fraction(v, k.replace("_", " ")) if k in fractions and isinstance(v, str) else v
                      for k, v in d.items()})

