"""What a zoo entry is, the RobustBench constants, and the leaderboard facts kept by hand.

:data:`KNOWN` holds the clean / AutoAttack accuracies, architectures and training methods of the models the
paper uses (robustbench's files carry none of these); :data:`_FALLBACK` is the built-in list of names and
Google-Drive ids used when the installed robustbench files cannot be parsed (see :mod:`core.zoo.lookup`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.dataset import PAPER_EPS
from ..paths import ZOO_DIR

#: Where zoo weights are kept by default: ``<repo>/checkpoints/robustbench`` (git-ignored).
DEFAULT_ZOO_DIR = ZOO_DIR

#: RobustBench enum values (case-sensitive in robustbench; matched case-insensitively here).
DATASETS = ("cifar10", "cifar100")
THREAT_MODELS = ("Linf", "L2")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
#: The RobustBench evaluation budget of each threat model.
EPS = {"Linf": PAPER_EPS, "L2": 0.5}

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

GDRIVE_URL = "https://drive.google.com/uc?id={}"


# --------------------------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ZooEntry:
    """One RobustBench model.

    ``clean_acc`` / ``aa_acc`` are the leaderboard's clean and AutoAttack accuracies in percent
    (``None`` when not recorded here; the dashboard shows "—"). ``gdrive_id`` is a string, a
    tuple of strings for ensembles (files ``<name>.pt_m<i>.pt``), or ``None`` for models hosted
    on the Hugging Face hub through timm. ``file_status`` / ``downloaded`` / ``path`` are only
    filled in by :func:`list_zoo` (``None`` otherwise).
    """

    name: str
    dataset: str
    threat_model: str
    architecture: str
    clean_acc: float | None = None
    aa_acc: float | None = None
    paper_model: bool = False
    note: str = ""
    training: str | None = None
    gdrive_id: str | tuple[str, ...] | None = None
    constructor: str | None = None
    file_status: str | None = None
    downloaded: bool | None = None
    path: Path | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return self.dataset, self.threat_model, self.name

    @property
    def eps(self) -> float:
        """The threat model's RobustBench budget (8/255 for Linf, 0.5 for L2)."""
        return EPS[self.threat_model]

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES[self.dataset]

    @property
    def is_ensemble(self) -> bool:
        return isinstance(self.gdrive_id, tuple)

    @property
    def hosted_on_hub(self) -> bool:
        """True for timm-hosted models (no Google-Drive file; loading needs the network)."""
        return self.gdrive_id is None

    @property
    def urls(self) -> list[str]:
        ids = self.gdrive_id if isinstance(self.gdrive_id, tuple) else ([self.gdrive_id] if self.gdrive_id else [])
        return [gdrive_url(i) for i in ids]


def gdrive_url(gdrive_id: str) -> str:
    """The direct Google-Drive download URL of a RobustBench checkpoint id."""
    return GDRIVE_URL.format(gdrive_id)


@dataclass(frozen=True)
class _Known:
    """Leaderboard facts kept by hand (RobustBench model_info, as recorded in the project notes)."""

    architecture: str | None = None
    clean_acc: float | None = None
    aa_acc: float | None = None
    paper_model: bool = False
    training: str | None = None
    note: str = ""


_EXTRA = "trained with extra (unlabeled or generated) data"

#: (dataset, threat, name) -> leaderboard facts. Accuracies are RobustBench's clean / AutoAttack
#: accuracies in percent at the standard budget (Linf 8/255, L2 0.5) unless the note says otherwise.
KNOWN: dict[tuple[str, str, str], _Known] = {
    ("cifar10", "Linf", "Standard"): _Known(
        "WideResNet-28-10", 94.78, 0.0, True, "standard training (no adversarial training)",
        "non-robust baseline; expects [0,1] input without normalisation"),
    ("cifar10", "Linf", "Engstrom2019Robustness"): _Known(
        "ResNet-50", 87.03, 49.25, True, "PGD adversarial training (SAT)",
        "normalises inside the model; checkpoint lacks mu/sigma, robustbench keeps the defaults"),
    ("cifar10", "Linf", "Rice2020Overfitting"): _Known(
        "WideResNet-34-20", 85.34, 53.42, True, "PGD adversarial training with early stopping",
        "large model (~185M parameters, ~700 MB)"),
    ("cifar10", "Linf", "Zhang2019Theoretically"): _Known(
        "WideResNet-34-10", 84.92, 53.08, True, "TRADES", "leaderboard evaluated at eps=0.031"),
    ("cifar10", "Linf", "Wang2020Improving"): _Known(
        "WideResNet-28-10", 87.50, 56.29, True, "MART", _EXTRA),
    ("cifar10", "Linf", "Carmon2019Unlabeled"): _Known(
        "WideResNet-28-10", 89.69, 59.53, True, "RST (TRADES with pseudo-labelled data)", _EXTRA),
    ("cifar10", "Linf", "Zhang2020Geometry"): _Known(
        "WideResNet-28-10", 89.36, 59.64, True, "GAIRAT (GAIR-RST)",
        _EXTRA + "; leaderboard evaluated at eps=0.031"),
    ("cifar10", "Linf", "Wu2020Adversarial"): _Known(
        "WideResNet-34-10", 85.36, 56.17, True, "AWP (TRADES-AWP)",
        "the AWP model used by the paper's official code"),
    ("cifar10", "Linf", "Wu2020Adversarial_extra"): _Known(
        "WideResNet-28-10", 88.25, 60.04, False, "AWP (RST-AWP)",
        _EXTRA + "; the paper's code uses Wu2020Adversarial"),
    ("cifar10", "Linf", "Gowal2020Uncovering_28_10_extra"): _Known(
        "WideResNet-28-10", 89.48, 62.76, False, "TRADES (Gowal et al.)", _EXTRA + "; Swish activations"),
    ("cifar10", "Linf", "Wang2023Better_WRN-28-10"): _Known(
        "WideResNet-28-10", 92.44, 67.31, True, "TRADES with 20M diffusion-generated images",
        _EXTRA + "; SiLU activations"),
    ("cifar10", "Linf", "Wang2023Better_WRN-70-16"): _Known(
        "WideResNet-70-16", 93.25, 70.69, False, "TRADES with 50M diffusion-generated images", _EXTRA),
    ("cifar10", "Linf", "Cui2023Decoupled_WRN-28-10"): _Known(
        "WideResNet-28-10", 92.16, 67.73, False, "DKL / IKL (decoupled KL)", _EXTRA),
    ("cifar10", "L2", "Standard"): _Known(
        "WideResNet-28-10", 94.78, 0.0, False, "standard training (no adversarial training)",
        "same weights as the Linf entry"),
    ("cifar10", "L2", "Engstrom2019Robustness"): _Known(
        "ResNet-50", 90.83, 69.24, True, "PGD adversarial training (SAT), L2",
        "normalises inside the model; checkpoint lacks mu/sigma, robustbench keeps the defaults"),
    ("cifar10", "L2", "Rice2020Overfitting"): _Known(
        "PreActResNet-18", 88.67, 67.68, False, "PGD adversarial training with early stopping, L2",
        "small model (11M parameters): the quickest robust zoo model on CPU"),
    ("cifar10", "L2", "Wu2020Adversarial"): _Known("WideResNet-34-10", training="AWP, L2"),
    ("cifar10", "L2", "Wang2023Better_WRN-28-10"): _Known(
        "WideResNet-28-10", 95.16, 83.68, True, "TRADES with 20M diffusion-generated images, L2",
        _EXTRA + "; SiLU activations"),
}

#: Used only when the installed robustbench files cannot be parsed. Google-Drive ids as in
#: robustbench 1.1.1's model zoo.
_FALLBACK: dict[tuple[str, str], list[tuple[str, str]]] = {
    ("cifar10", "Linf"): [
        ("Standard", "1t98aEuzeTL8P7Kpd5DIrCoCL21BNZUhC"),
        ("Engstrom2019Robustness", "1etqmQsksNIWBvBQ4r8ZFk_3FJlLWr8Rr"),
        ("Rice2020Overfitting", "1vC_Twazji7lBjeMQvAD9uEQxi9Nx2oG-"),
        ("Zhang2019Theoretically", "1hPz9QQwyM7QSuWu-ANG_uXR-29xtL8t_"),
        ("Wang2020Improving", "1T939mU4kXYt5bbvM55aT4fLBvRhyzjiQ"),
        ("Carmon2019Unlabeled", "15tUx-gkZMYx7BfEOw1GY5OKC-jECIsPQ"),
        ("Zhang2020Geometry", "1UoG1JhbAps1MdMc6PEFiZ2yVXl_Ii5Jk"),
        ("Wu2020Adversarial", "13LBcgNvhFppCFG22i1xATrahFPfMgXGf"),
        ("Wu2020Adversarial_extra", "1-WJWpAZLlmc4gJ8XXNf7IETjnSZzaCNp"),
        ("Wang2023Better_WRN-28-10", "1-6MYKJdECDVGaWjj6GgqvaT95BGKhUvI"),
    ],
    ("cifar10", "L2"): [
        ("Standard", "1t98aEuzeTL8P7Kpd5DIrCoCL21BNZUhC"),
        ("Engstrom2019Robustness", "1O8rGa6xOUIRwQ-M4ESrCjzknby8TM2ZE"),
        ("Rice2020Overfitting", "1jo-31utiYNBVzLM0NxUEWz0teo3Z0xa7"),
        ("Wu2020Adversarial", "1M5AZ0EZQt7d2AlTmsnqZcfx91-x7YEAV"),
        ("Wang2023Better_WRN-28-10", "1-fwKiJXEqHHUngt8wKsNnHuD4vAPvPXC"),
    ],
    ("cifar100", "Linf"): [],
    ("cifar100", "L2"): [],
}



def _make_entry(name: str, dataset: str, threat: str, arch: str | None, gid, ctor: str | None) -> ZooEntry:
    k = KNOWN.get((dataset, threat, name), _Known())
    if arch is not None and "(" in arch and "_" in name and "-" in name.split("_", 1)[1]:
        # An unrecognised factory call (timm.create_model, get_model('WRN-A4'), ...): robustbench
        # names such entries '<Paper>_<Architecture>', e.g. Debenedetti2022Light_XCiT-S12.
        arch = name.split("_", 1)[1]
    note = k.note
    if gid is None:
        hub = "hosted on the Hugging Face hub via timm; loading it needs downloads enabled"
        note = f"{note}; {hub}" if note else hub
    elif isinstance(gid, tuple):
        ens = f"ensemble of {len(gid)} checkpoint files"
        note = f"{note}; {ens}" if note else ens
    return ZooEntry(name=name, dataset=dataset, threat_model=threat, architecture=k.architecture or arch or "unknown",
                    clean_acc=k.clean_acc, aa_acc=k.aa_acc, paper_model=k.paper_model, note=note,
                    training=k.training, gdrive_id=gid, constructor=ctor)
