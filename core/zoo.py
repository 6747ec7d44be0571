"""RobustBench model zoo: catalogue, download status and safe loading.

The catalogue lists the RobustBench CIFAR-10 / CIFAR-100 models for the ``Linf`` and ``L2``
threat models. Names, Google-Drive ids and constructors are read by *parsing* (``ast``) the
installed ``robustbench/model_zoo/cifar10.py`` and ``cifar100.py``; importing robustbench takes
seconds and pulls in timm/torchvision, so ``import core.zoo`` and :func:`list_zoo` never do it.
The catalogue is therefore exactly what the installed files offer: builds of robustbench 1.1.1
differ (one has the timm-hosted ``Debenedetti2022Light_XCiT-*`` entries commented out; see
:mod:`core.compat`), and a model the installed build lacks is reported as an unknown model, with
suggestions, like any other name. When parsing fails (robustbench missing or its layout changed)
a small built-in list of the paper's models is used instead.

Weights live where RobustBench itself puts them::

    <model_dir>/<dataset>/<threat_model>/<name>.pt        e.g. checkpoints/robustbench/cifar10/Linf/Standard.pt

so a folder filled by ``robustbench.utils.load_model(..., model_dir=...)`` elsewhere can be
reused as is. :func:`load_zoo_model` delegates the actual construction and loading to
``robustbench.utils.load_model`` (the reference loader, which handles the many per-model
checkpoint quirks) but first checks the files itself, so that the usual failures become
readable :class:`~core.errors.ZooError` messages instead of tracebacks:

* missing file while downloads are off -> the exact path to put it at and its Google-Drive URL;
* an HTML page saved as ``.pt`` (Google Drive quota/login page, RobustBench's infamous
  ``invalid load key, '<'``) -> refused before loading, with :func:`quarantine` to move it aside;
* a pickle that would run code -> refused: loading is forced to ``weights_only=True``;
* a file for another architecture -> "does not match architecture ...";
* a download without internet (DNS failure, refused or timed-out connection) -> "needs internet",
  with the URL and the exact path to put the file at by hand (never "could not read the folder").
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import os
import re
import socket
import threading
import time
import urllib.error
from collections import OrderedDict
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.serialization import get_unsafe_globals_in_checkpoint

from .compat import forced_weights_only, import_robustbench_utils, robustbench_info
from .errors import ZooError
from .paths import ZOO_DIR
from .models.checkpoint import LoadedModel, ModelMeta
from .storage import sniff_format

__all__ = ["ZooEntry", "DEFAULT_ZOO_DIR", "DATASETS", "THREAT_MODELS", "EPS", "list_zoo", "get_zoo_entry",
           "zoo_path", "zoo_files", "gdrive_url", "load_zoo_model", "quarantine", "catalogue_source",
           "canonical_dataset", "canonical_threat_model", "catalogue", "robustbench_zoo_dir", "DOWNLOADERS"]

#: Where zoo weights are kept by default: ``<repo>/checkpoints/robustbench`` (git-ignored).
DEFAULT_ZOO_DIR = ZOO_DIR

#: RobustBench enum values (case-sensitive in robustbench; matched case-insensitively here).
DATASETS = ("cifar10", "cifar100")
THREAT_MODELS = ("Linf", "L2")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
#: The RobustBench evaluation budget of each threat model.
EPS = {"Linf": 8 / 255, "L2": 0.5}

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

GDRIVE_URL = "https://drive.google.com/uc?id={}"
_OK_FORMATS = ("torch-zip", "torch-legacy")


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


# --------------------------------------------------------------------------------------------
# Parsing robustbench's model_zoo files (no import)
# --------------------------------------------------------------------------------------------

_MISSING = object()


def _literal(node: ast.AST | None, env: dict[str, Any]) -> Any:
    """Value of a literal expression, resolving bare names through ``env``; ``_MISSING`` if not literal."""
    if node is None:
        return _MISSING
    if isinstance(node, ast.Name):
        return env.get(node.id, _MISSING)
    if isinstance(node, (ast.List, ast.Tuple)):
        vals = [_literal(e, env) for e in node.elts]
        return _MISSING if any(v is _MISSING for v in vals) else vals
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return _MISSING


def _func_name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _resnet_depth(block: str, num_blocks: Any) -> int | None:
    if not isinstance(num_blocks, list) or not all(isinstance(n, int) for n in num_blocks):
        return None
    per_block = 3 if "bottleneck" in block.lower() else 2
    return per_block * sum(num_blocks) + 2


def _describe_call(func: str, args: list[ast.AST], kwargs: dict[str, ast.AST], env: dict[str, Any]) -> str | None:
    """A leaderboard-style architecture label for a known robustbench constructor call."""

    def arg(pos: int | None, name: str, default: Any) -> Any:
        if name in kwargs:
            v = _literal(kwargs[name], env)
        elif pos is not None and pos < len(args):
            v = _literal(args[pos], env)
        else:
            v = default
        return default if v is _MISSING else v

    if func == "WideResNet":
        # robustbench: WideResNet(depth=28, num_classes=10, widen_factor=10, sub_block1=False, ...)
        return f"WideResNet-{arg(0, 'depth', 28)}-{arg(2, 'widen_factor', 10)}"
    if func == "DMWideResNet":
        return f"WideResNet-{arg(None, 'depth', 28)}-{arg(None, 'width', 10)}"
    if func == "DMPreActResNet":
        return f"PreActResNet-{arg(None, 'depth', 18)}"
    if func in ("ResNet", "PreActResNet") and args:
        depth = _resnet_depth(_func_name(args[0]), _literal(args[1], env) if len(args) > 1 else _MISSING)
        if depth:
            return f"{func}-{depth}"
    if func in ("ResNet18", "ResNet34", "ResNet50", "PreActResNet18"):
        return f"{func[:-2]}-{func[-2:]}"
    if func.startswith("ResNest"):
        return f"ResNeSt-{func[len('ResNest'):]}"
    return None


def _class_arch(cls: ast.ClassDef) -> str | None:
    """Architecture of a wrapper class ``class X(Base): def __init__(...): super().__init__(...)``."""
    base = _func_name(cls.bases[0]) if cls.bases else ""
    init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    if init is None:
        return None
    env: dict[str, Any] = {}
    a = init.args
    positional = a.posonlyargs + a.args
    for argnode, default in zip(positional[len(positional) - len(a.defaults):], a.defaults):
        env[argnode.arg] = _literal(default, {})
    for argnode, default in zip(a.kwonlyargs, a.kw_defaults):
        if default is not None:
            env[argnode.arg] = _literal(default, {})
    for node in ast.walk(init):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "__init__"
                and isinstance(node.func.value, ast.Call) and _func_name(node.func.value.func) == "super"):
            kwargs = {k.arg: k.value for k in node.keywords if k.arg}
            return _describe_call(base, list(node.args), kwargs, env)
    return None


def _describe_ctor(node: ast.AST, classes: dict[str, ast.ClassDef]) -> str:
    """Readable architecture for the ``'model'`` value of a zoo entry (a lambda or a class name)."""
    body = node.body if isinstance(node, ast.Lambda) else node
    label = None
    if isinstance(body, ast.Call):
        kwargs = {k.arg: k.value for k in body.keywords if k.arg}
        label = _describe_call(_func_name(body.func), list(body.args), kwargs, {})
    elif isinstance(body, (ast.Name, ast.Attribute)):
        name = _func_name(body)
        if name in classes:
            label = _class_arch(classes[name])
        label = label or _describe_call(name, [], {}, {}) or name
    if label:
        return label
    text = ast.unparse(body)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_zoo_file(path: Path, dataset: str) -> dict[str, list[ZooEntry]]:
    """Entries of the module-level ``linf`` / ``l2`` OrderedDict literals of one zoo file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    out: dict[str, list[ZooEntry]] = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        threat = {"linf": "Linf", "l2": "L2"}.get(node.targets[0].id)
        call = node.value
        if threat is None or not (isinstance(call, ast.Call) and _func_name(call.func) == "OrderedDict" and call.args):
            continue
        items = call.args[0]
        if not isinstance(items, (ast.List, ast.Tuple)):
            continue
        entries = []
        for item in items.elts:
            if not (isinstance(item, ast.Tuple) and len(item.elts) == 2):
                continue
            name_node, spec = item.elts
            if not (isinstance(name_node, ast.Constant) and isinstance(name_node.value, str)):
                continue
            fields: dict[str, ast.AST] = {}
            if isinstance(spec, ast.Dict):  # a repeated key keeps its last value, as in Python
                fields = {k.value: v for k, v in zip(spec.keys, spec.values)
                          if isinstance(k, ast.Constant) and isinstance(k.value, str)}
            gid = _literal(fields.get("gdrive_id"), {})
            if isinstance(gid, list) and all(isinstance(g, str) for g in gid):
                gid = tuple(gid)
            elif not (gid is None or isinstance(gid, str)):
                gid = None  # not a literal; load_model will still know it
            model_node = fields.get("model")
            arch = _describe_ctor(model_node, classes) if model_node is not None else "unknown"
            ctor = ast.unparse(model_node.body if isinstance(model_node, ast.Lambda) else model_node) \
                if model_node is not None else None
            entries.append(_make_entry(name_node.value, dataset, threat, arch, gid, ctor))
        out[threat] = entries
    return out


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


def robustbench_zoo_dir() -> Path:
    """The installed robustbench's ``model_zoo`` folder, whose cifar10.py / cifar100.py :func:`catalogue` parses
    (FileNotFoundError when robustbench or the folder is missing: the built-in catalogue is used then)."""
    info = robustbench_info()  # locates the package without importing it
    if not info.installed:
        raise FileNotFoundError("robustbench is not installed")
    if info.model_zoo is None:
        raise FileNotFoundError(f"robustbench at {info.location} has no model_zoo folder")
    return info.model_zoo


@lru_cache(maxsize=1)
def catalogue() -> tuple[dict[tuple[str, str], "OrderedDict[str, ZooEntry]"], str]:
    """(dataset, threat) -> name -> entry, and where it came from. Parsed once per process
    (``catalogue.cache_clear()`` parses again, e.g. after robustbench was installed)."""
    cat: dict[tuple[str, str], OrderedDict[str, ZooEntry]] = {(d, t): OrderedDict() for d in DATASETS
                                                               for t in THREAT_MODELS}
    try:
        zoo_dir = robustbench_zoo_dir()
        for dataset, fname in (("cifar10", "cifar10.py"), ("cifar100", "cifar100.py")):
            for threat, entries in _parse_zoo_file(zoo_dir / fname, dataset).items():
                cat[(dataset, threat)] = OrderedDict((e.name, e) for e in entries)
        if not cat[("cifar10", "Linf")]:
            raise ValueError("no CIFAR-10 Linf entries found")
        version = robustbench_info().version
        return cat, f"robustbench{' ' + version if version else ''} ({zoo_dir})"
    except Exception:  # noqa: BLE001 - any parse problem (new robustbench layout...) -> built-in list
        pass
    for (dataset, threat), items in _FALLBACK.items():
        cat[(dataset, threat)] = OrderedDict(
            (n, _make_entry(n, dataset, threat, None, gid, None)) for n, gid in items)
    return cat, "built-in list (robustbench's model zoo files could not be parsed)"


def catalogue_source() -> str:
    """Where the catalogue came from: the parsed robustbench files, or the built-in fallback."""
    return catalogue()[1]


# --------------------------------------------------------------------------------------------
# Lookup
# --------------------------------------------------------------------------------------------

def _pick(value: str, choices: tuple[str, ...], what: str) -> str:
    if isinstance(value, str):
        for c in choices:
            if value.strip().lower() == c.lower():
                return c
    raise ZooError(f"unknown {what} '{value}'. Choose one of: {', '.join(choices)}")


def canonical_dataset(dataset: str) -> str:
    """'CIFAR10' / 'cifar10' -> 'cifar10' (robustbench's exact enum value); ZooError otherwise."""
    if isinstance(dataset, str) and dataset.strip().lower().replace("-", "").replace("_", "") in DATASETS:
        dataset = dataset.strip().lower().replace("-", "").replace("_", "")
    return _pick(dataset, DATASETS, "dataset")


def canonical_threat_model(threat_model: str) -> str:
    """'linf' / 'LINF' -> 'Linf', 'l2' -> 'L2' (robustbench's exact enum values); ZooError otherwise."""
    return _pick(threat_model, THREAT_MODELS, "threat model")


def get_zoo_entry(name: str, dataset: str = "cifar10", threat_model: str = "Linf") -> ZooEntry:
    """The catalogue entry for ``name`` (matched case-insensitively); ZooError with suggestions."""
    dataset, threat_model = canonical_dataset(dataset), canonical_threat_model(threat_model)
    entries = catalogue()[0][(dataset, threat_model)]
    if name in entries:
        return entries[name]
    folded = {n.lower(): n for n in entries}
    if isinstance(name, str) and name.strip().lower() in folded:
        return entries[folded[name.strip().lower()]]
    msg = f"unknown RobustBench model '{name}' for {dataset} / {threat_model}."
    if not entries:
        msg += f" RobustBench has no {dataset} {threat_model} models."
    close = difflib.get_close_matches(str(name).lower(), list(folded), n=5, cutoff=0.5)
    if close:
        msg += " Did you mean: " + ", ".join(folded[c] for c in close) + "?"
    elsewhere = [f"{d}/{t}" for (d, t), es in catalogue()[0].items()
                 if (d, t) != (dataset, threat_model) and str(name).strip().lower() in {n.lower() for n in es}]
    if elsewhere:
        msg += f" '{name}' exists for: {', '.join(elsewhere)}."
    raise ZooError(msg)


def zoo_path(name: str, dataset: str = "cifar10", threat_model: str = "Linf",
             model_dir: str | os.PathLike = DEFAULT_ZOO_DIR) -> Path:
    """Where robustbench reads (and downloads) the weights: ``<model_dir>/<dataset>/<threat>/<name>.pt``."""
    e = get_zoo_entry(name, dataset, threat_model)
    return Path(model_dir) / e.dataset / e.threat_model / f"{e.name}.pt"


def zoo_files(entry: ZooEntry, model_dir: str | os.PathLike = DEFAULT_ZOO_DIR) -> list[Path]:
    """All weight files of an entry: one ``.pt``, or ``<name>.pt_m<i>.pt`` per ensemble member
    (robustbench's naming); empty for timm-hosted models."""
    base = Path(model_dir) / entry.dataset / entry.threat_model / f"{entry.name}.pt"
    if entry.gdrive_id is None:
        return []
    if isinstance(entry.gdrive_id, tuple):
        return [Path(f"{base}_m{i}.pt") for i in range(len(entry.gdrive_id))]
    return [base]


#: files this process refused to load: path -> (size, mtime_ns, status); a changed file is looked at again
_refused: dict[str, tuple[int, int, str]] = {}
_scan_cache: dict[tuple[str, int, int], bool] = {}
_refused_lock = threading.Lock()


def _stamp(p: Path) -> tuple[int, int] | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _holds_code(p: Path) -> bool:
    """True when a torch zip checkpoint names globals that weights-only loading refuses (code that would run).

    Only the pickle of the archive is disassembled (no tensor is read, nothing is executed); cached per
    (path, size, mtime)."""
    stamp = _stamp(p)
    if stamp is None:
        return False
    key = (str(p), *stamp)
    with _refused_lock:
        if key in _scan_cache:
            return _scan_cache[key]
    try:
        unsafe = bool(get_unsafe_globals_in_checkpoint(str(p)))
    except Exception:  # noqa: BLE001 - an unreadable archive is reported when it is loaded
        unsafe = False
    with _refused_lock:
        _scan_cache[key] = unsafe
    return unsafe


def _remember_refusal(files: list[Path], status: str) -> None:
    for p in files:
        stamp = _stamp(p)
        if stamp is not None:
            with _refused_lock:
                _refused[str(p)] = (*stamp, status)


def _file_status(entry: ZooEntry, model_dir) -> tuple[str, Path | None]:
    files = zoo_files(entry, model_dir)
    if not files:
        return "hub", None
    kinds = [sniff_format(p) for p in files]
    bad = next((k for k in kinds if k not in _OK_FORMATS), None)
    if bad is None:
        for p, k in zip(files, kinds):
            stamp = _stamp(p)
            with _refused_lock:
                seen = _refused.get(str(p))
            if seen is not None and stamp is not None and seen[:2] == stamp:
                return seen[2], files[0]
            if k == "torch-zip" and _holds_code(p):
                return "unsafe", files[0]
    return (bad or "ok"), files[0]


def list_zoo(dataset: str | None = None, threat_model: str | None = None,
             model_dir: str | os.PathLike = DEFAULT_ZOO_DIR) -> list[ZooEntry]:
    """Catalogue entries (robustbench order), each with its download status in ``model_dir``.

    ``file_status`` is ``'ok'`` (a torch file), ``'missing'``, ``'html'`` (a failed download),
    ``'empty'``, ``'safetensors'``/``'unknown'`` (not what robustbench can load), ``'unsafe'`` (its
    pickle names code that weights-only loading refuses), ``'refused'`` (this process refused to load
    it as corrupt or unsafe, and it has not changed since) or ``'hub'`` (timm model, no local file);
    ``downloaded`` is ``file_status == 'ok'``. Only file headers (and a torch archive's pickle, never
    its tensors) are read.
    """
    datasets = DATASETS if dataset is None else (canonical_dataset(dataset),)
    threats = THREAT_MODELS if threat_model is None else (canonical_threat_model(threat_model),)
    cat = catalogue()[0]
    out = []
    for d in datasets:
        for t in threats:
            for e in cat[(d, t)].values():
                status, path = _file_status(e, model_dir)
                out.append(replace(e, file_status=status, downloaded=status == "ok", path=path))
    return out


# --------------------------------------------------------------------------------------------
# Bad files
# --------------------------------------------------------------------------------------------

def quarantine(path: str | os.PathLike) -> Path:
    """Rename a broken weights file to ``<name>.pt.bad-<timestamp>`` so a retry downloads it again.

    Nothing is ever deleted; the renamed file can be inspected or removed by the user. Returns the
    new path.
    """
    path = Path(path)
    if not path.is_file():
        raise ZooError(f"cannot quarantine {path}: no such file")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.bad-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.bad-{stamp}-{n}")
        n += 1
    try:
        os.replace(path, target)
    except OSError as e:
        raise ZooError(f"could not rename {path} to {target.name}: {e.strerror or e}") from e
    return target


def _bad_file_message(entry: ZooEntry, path: Path, kind: str) -> str:
    what = {
        "html": "is an HTML page, not model weights: a failed download (typically a Google Drive quota, "
                "virus-scan or login page; robustbench reports it as \"invalid load key, '<'\")",
        "empty": "is empty (0 bytes): an interrupted download",
        "safetensors": "is a safetensors file, but robustbench expects the original torch .pt checkpoint",
        "unknown": "is not a PyTorch checkpoint (a failed or partial download?)",
    }.get(kind, f"cannot be read ({kind})")
    urls = " or ".join(entry.urls)
    return (f"{path} {what}. It was not loaded. Move it aside with core.zoo.quarantine('{path}') "
            f"(renames it to {path.name}.bad-<time>, nothing is deleted) and retry with downloads "
            f"enabled, or download it manually{' from ' + urls if urls else ''} and save it at {path}.")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

_load_lock = threading.RLock()


class _DownloadBlocked(Exception):
    """Raised by the stand-in download function while downloads are disabled."""


#: robustbench's Google-Drive download functions (the name changed between releases).
DOWNLOADERS = ("download_gdrive", "download_gdrive_new")


@contextlib.contextmanager
def _downloads(rb_utils, allowed: bool) -> Iterator[None]:
    """While not ``allowed``, replace robustbench's downloader so it can never reach the network."""
    if allowed:
        yield
        return
    names = [n for n in DOWNLOADERS if hasattr(rb_utils, n)]
    originals = {n: getattr(rb_utils, n) for n in names}

    def blocked(gdrive_id, fname_save):
        raise _DownloadBlocked(str(fname_save))

    for n in names:
        setattr(rb_utils, n, blocked)
    try:
        yield
    finally:
        for n, f in originals.items():
            setattr(rb_utils, n, f)


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _missing_message(entry: ZooEntry, path: Path) -> str:
    urls = entry.urls
    where = f" Download it from {' and '.join(urls)}" if urls else " Download it"
    return (f"RobustBench model '{entry.name}' ({entry.dataset}, {entry.threat_model}) is not downloaded: "
            f"{path} does not exist.{where} and save it exactly at {path}, or enable downloads (needs "
            "internet) to have it fetched automatically.")


def _summarise_load_error(text: str) -> str:
    """Condense torch's ``load_state_dict`` error (which lists every key) into one sentence."""
    parts = []
    sizes = re.findall(r"size mismatch for ([^:]+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) "
                       r"from checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)", text)
    if sizes:
        k, got, want = sizes[0]
        hint = " (a different number of classes?)" if k.endswith(("fc.weight", "fc.bias", "linear.weight",
                                                                  "linear.bias", "logits.weight", "logits.bias")) else ""
        parts.append(f"{len(sizes)} tensors have the wrong shape, e.g. {k}: file [{got}] vs model [{want}]{hint}")
    for what, label in (("Missing", "weights missing"), ("Unexpected", "unexpected weights")):
        m = re.search(what + r' key\(s\) in state_dict: ((?:"[^"]*"(?:, )?)+)', text)
        if m:
            keys = re.findall(r'"([^"]*)"', m.group(1))
            parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
    if not parts:
        detail = " ".join(text.split())
        return detail if len(detail) <= 300 else detail[:297] + "..."
    return "; ".join(parts)


#: Exception classes (by name, in requests / urllib3) that mean "the server could not be reached".
_NETWORK_CLASSES = {"ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "ProxyError", "NewConnectionError",
                    "NameResolutionError", "MaxRetryError", "ConnectTimeoutError", "ReadTimeoutError", "ProtocolError"}
#: ... and the messages they (or the OS) carry when wrapped in something else.
_NETWORK_TEXT = ("NameResolutionError", "Temporary failure in name resolution", "Name or service not known",
                 "nodename nor servname", "getaddrinfo failed", "Failed to establish a new connection",
                 "Max retries exceeded", "Network is unreachable", "No route to host", "Connection refused",
                 "timed out")


def _is_network_error(e: BaseException) -> bool:
    """True when ``e`` (or an exception it wraps) says the download server could not be reached: DNS
    failures, refused / reset / timed-out connections from socket, urllib, requests, urllib3 or gdown.
    An HTTP error *response* (the server answered) is not one."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen and len(seen) < 20:
        seen.add(id(cur))
        if isinstance(cur, urllib.error.HTTPError):
            return False
        if isinstance(cur, (socket.gaierror, socket.herror, socket.timeout, ConnectionError, TimeoutError,
                            urllib.error.URLError)):
            return True
        for k in type(cur).__mro__:
            if k.__module__.split(".")[0] in ("requests", "urllib3", "gdown") and k.__name__ in _NETWORK_CLASSES:
                return True
        if type(cur).__module__.split(".")[0] in ("requests", "urllib3", "gdown") and \
                any(t in str(cur) for t in _NETWORK_TEXT):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _network_message(e: BaseException, entry: ZooEntry, files: list[Path]) -> str:
    urls = entry.urls
    where = "\n".join(str(p) for p in files) or "?"
    return (f"Downloading RobustBench model '{entry.name}' ({entry.dataset}, {entry.threat_model}) needs internet "
            f"access, and the download server could not be reached ({type(e).__name__}: {_first_line(e, 160)}). "
            f"Connect to the internet and try again, or download the file on another machine"
            f"{' from ' + ' and '.join(urls) if urls else ''} and put it by hand exactly at {where}; it then loads "
            "offline.")


def _translate(e: BaseException, entry: ZooEntry, files: list[Path]) -> ZooError:
    """A readable ZooError for whatever robustbench / torch raised."""
    text = str(e)
    label = f"'{entry.name}' ({entry.dataset}, {entry.threat_model})"
    if isinstance(e, _DownloadBlocked):
        return ZooError(_missing_message(entry, Path(text)))
    if _is_network_error(e):  # before the OSError branch: requests' errors are OSErrors too
        return ZooError(_network_message(e, entry, files))
    for p in files:
        kind = sniff_format(p)
        if kind not in _OK_FORMATS and kind != "missing":
            return ZooError(_bad_file_message(entry, p, kind))
    if "Weights only load failed" in text or "Unsupported global" in text:
        return ZooError(
            f"the checkpoint of {label} contains Python objects that would run code when unpickled, so it "
            "was refused: EnergyLens loads zoo weights with weights_only=True. If you trust the file, "
            "re-save only its tensors (its state_dict) with torch.save and load that instead.")
    if "Error(s) in loading state_dict" in text or "size mismatch" in text:
        return ZooError(f"the file for {label} does not match architecture {entry.architecture} "
                        f"(robustbench constructor {entry.constructor or '?'}): {_summarise_load_error(text)}. "
                        "Is it the checkpoint of another model?")
    if isinstance(e, KeyError):
        return ZooError(f"the checkpoint of {label} does not have the layout robustbench expects "
                        f"(missing key {text}); it is probably not the original file.")
    if "zip archive" in text or "unpickl" in text.lower() or "load key" in text or isinstance(e, EOFError):
        return ZooError(f"the checkpoint of {label} is corrupt or truncated ({_first_line(e)}); an "
                        f"interrupted download? Move it aside with core.zoo.quarantine() and download it again.")
    if isinstance(e, OSError):
        return ZooError(f"could not read or write the zoo folder for {label}: {_first_line(e)}")
    if type(e).__module__.startswith(("gdown", "requests", "urllib3")):
        urls = " or ".join(entry.urls)
        return ZooError(f"downloading {label} failed ({type(e).__name__}: {_first_line(e)}). Google Drive "
                        f"often limits downloads of popular files; try later or download it manually"
                        f"{' from ' + urls if urls else ''} and save it at {files[0] if files else '?'}.")
    return ZooError(f"loading RobustBench model {label} failed: {type(e).__name__}: {_first_line(e)}")


def load_zoo_model(name: str, dataset: str = "cifar10", threat_model: str = "Linf",
                   model_dir: str | os.PathLike = DEFAULT_ZOO_DIR, allow_download: bool = False,
                   device: str = "cpu"):
    """Load a RobustBench model with ``robustbench.utils.load_model``, safely.

    ``name``, ``dataset`` and ``threat_model`` are matched case-insensitively and passed to
    robustbench with its exact spelling. With the weights already at :func:`zoo_path` nothing
    touches the network. With ``allow_download=False`` (the default) a missing file raises
    :class:`ZooError` saying where to put it; with ``True`` robustbench downloads it (gdown).
    Files are always unpickled with ``weights_only=True``. Returns a
    :class:`~core.models.checkpoint.LoadedModel` in eval mode on ``device``; the model takes
    [0,1] images (normalisation, if any, is inside it).
    """
    entry = get_zoo_entry(name, dataset, threat_model)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ZooError(f"invalid device '{device}': {e}") from e
    files = zoo_files(entry, model_dir)
    if entry.hosted_on_hub and not allow_download:
        raise ZooError(f"RobustBench model '{entry.name}' is hosted on the Hugging Face hub via timm and has no "
                       "local .pt file; enable downloads (needs internet) to load it.")
    was_missing = []
    for p in files:
        kind = sniff_format(p)
        if kind == "missing":
            if not allow_download:
                raise ZooError(_missing_message(entry, p))
            was_missing.append(p)
        elif kind not in _OK_FORMATS:
            raise ZooError(_bad_file_message(entry, p, kind))


    rb_utils = import_robustbench_utils()
    with _load_lock, forced_weights_only(), _downloads(rb_utils, allow_download):
        try:
            model = rb_utils.load_model(model_name=entry.name, model_dir=str(model_dir),
                                        dataset=entry.dataset, threat_model=entry.threat_model)
        except Exception as e:  # noqa: BLE001 - everything becomes a readable ZooError
            err = _translate(e, entry, files)
            text = str(e)
            if not isinstance(e, _DownloadBlocked) and not was_missing and (
                    "Weights only load failed" in text or "Unsupported global" in text or "zip archive" in text
                    or "load key" in text or "unpickl" in text.lower() or isinstance(e, EOFError)):
                _remember_refusal(files, "refused")  # the listing no longer shows it as downloaded
            # A file this very call downloaded that turned out to be an HTML page (quota/login
            # page) is moved aside so that the next attempt downloads it again.
            moved = [quarantine(p) for p in was_missing if sniff_format(p) not in _OK_FORMATS + ("missing",)]
            if moved:
                err = ZooError(f"{err} The bad download was moved to {', '.join(str(m) for m in moved)}.")
            raise err from e
    try:
        model = model.eval().to(dev)
    except (RuntimeError, AssertionError) as e:
        raise ZooError(f"could not move '{entry.name}' to device '{device}': {_first_line(e)}") from e
    meta = ModelMeta(
        arch=entry.architecture, num_classes=entry.num_classes, dataset=entry.dataset,
        class_names=list(CIFAR10_CLASSES) if entry.dataset == "cifar10" else None,
        method="zoo", source="zoo", name=entry.name,
        hparams={"threat_model": entry.threat_model, "eps": entry.eps, "training": entry.training,
                 "robustbench_constructor": entry.constructor},
        metrics={"clean_acc": entry.clean_acc, "aa_acc": entry.aa_acc})
    return LoadedModel(model=model, meta=meta, path=files[0] if files else None)
