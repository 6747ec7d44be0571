"""The catalogue (parsed robustbench files, or the built-in list) and finding an entry in it by name."""

from __future__ import annotations

import difflib
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

from ..compat import robustbench_info
from ..errors import ZooError
from .entries import _FALLBACK, DATASETS, THREAT_MODELS, ZooEntry, _make_entry
from .parse import _parse_zoo_file


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
