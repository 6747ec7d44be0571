"""Where an entry's weight files live, what state they are in (without loading them), and moving bad ones aside."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path

from torch.serialization import get_unsafe_globals_in_checkpoint

from ..errors import ZooError
from ..storage import sniff_format
from .entries import DATASETS, DEFAULT_ZOO_DIR, THREAT_MODELS, ZooEntry
from .lookup import canonical_dataset, canonical_threat_model, catalogue, get_zoo_entry

_OK_FORMATS = ("torch-zip", "torch-legacy")


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
