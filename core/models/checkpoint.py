"""The EnergyLens checkpoint format: safetensors weights + JSON metadata, never pickle.

Metadata (stored in the safetensors header under the key ``energylens``):
``arch``, ``arch_kwargs``, ``dataset``, ``num_classes``, ``input_shape``, ``class_names``,
``method``, ``hparams``, ``epoch``, ``metrics``, ``created``, ``version``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from .. import __version__
from ..errors import CheckpointError
from ..storage import atomic_write_bytes, sniff_format
from ..tensorio import safe_torch_load
from .architectures import ARCHITECTURES

__all__ = ["ModelMeta", "LoadedModel", "build_model", "save_checkpoint", "load_checkpoint", "read_metadata",
           "load_state_dict_checked", "strip_prefixes", "check_meta", "MAX_CLASSES", "MAX_META_BYTES"]

META_KEY = "energylens"
MAX_META_BYTES = 1_000_000   # the JSON metadata of a checkpoint (class names, hyper-parameters): ~2 kB usually
MAX_CLASSES = 100_000
MAX_INPUT_SIDE = 1024
# integer/float/bool keyword arguments each architecture accepts, with their sane ranges (checked before any
# model is built: metadata such as depth 10000 / widen_factor 100 would otherwise allocate gigabytes)
_INT, _FLOAT, _BOOL = "int", "float", "bool"
ARCH_KWARGS: dict[str, dict[str, tuple]] = {
    "smallcnn": {"in_channels": (_INT, 1, 16), "width": (_INT, 1, 1024)},
    "resnet18": {"width": (_INT, 1, 1024)},
    "preactresnet18": {"width": (_INT, 1, 1024)},
    "wideresnet": {"depth": (_INT, 10, 160), "widen_factor": (_INT, 1, 32), "drop_rate": (_FLOAT, 0.0, 0.99),
                   "sub_block1": (_BOOL,)},
    "wrn-28-10": {"drop_rate": (_FLOAT, 0.0, 0.99), "sub_block1": (_BOOL,)},
    "wrn-34-10": {"drop_rate": (_FLOAT, 0.0, 0.99), "sub_block1": (_BOOL,)},
}


@dataclass
class ModelMeta:
    arch: str
    num_classes: int
    dataset: str = "unknown"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: list[int] = field(default_factory=lambda: [3, 32, 32])
    class_names: list[str] | None = None
    method: str = "unknown"
    hparams: dict[str, Any] = field(default_factory=dict)
    epoch: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    version: str = __version__
    source: str = "local"  # 'bundled' | 'local' | 'zoo'
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelMeta":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        missing = [k for k in ("arch", "num_classes") if k not in known]
        if missing:
            raise CheckpointError(f"checkpoint metadata lacks {', '.join(missing)}")
        return cls(**known)


@dataclass
class LoadedModel:
    model: nn.Module
    meta: ModelMeta
    path: Path | None = None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_meta(meta: ModelMeta, where: str = "checkpoint") -> ModelMeta:
    """Refuse metadata that would build an absurd or impossible model, cheaply (nothing is built).

    Checks the architecture name, the class count (an integer in 2..MAX_CLASSES), the input shape,
    the class names, the types of the other fields, and ``arch_kwargs`` (a dict of the keyword
    arguments the architecture accepts, each within a sane range). Raises CheckpointError."""
    def bad(msg: str):
        raise CheckpointError(f"{where} has malformed metadata: {msg}")

    if not isinstance(meta.arch, str) or meta.arch not in ARCHITECTURES:
        arch = meta.arch if isinstance(meta.arch, str) else repr(meta.arch)
        raise CheckpointError(f"{where}: unknown architecture '{str(arch)[:80]}'. Known: {', '.join(sorted(ARCHITECTURES))}")
    k = meta.num_classes
    if isinstance(k, float) and k.is_integer():
        k = meta.num_classes = int(k)
    if not _is_int(k):
        bad(f"num_classes must be an integer, got {str(k)[:40]!r}")
    if not 2 <= k <= MAX_CLASSES:
        bad(f"num_classes={k} is impossible or absurd (must lie in 2..{MAX_CLASSES:,})")
    kw = meta.arch_kwargs
    if kw is None:
        kw = meta.arch_kwargs = {}
    if not isinstance(kw, dict):
        bad(f"arch_kwargs must be an object of keyword arguments, got {type(kw).__name__} {str(kw)[:40]!r}")
    allowed = ARCH_KWARGS.get(meta.arch)
    if allowed is not None:
        unknown = sorted(str(a) for a in kw if a not in allowed)
        if unknown:
            bad(f"architecture '{meta.arch}' has no argument(s) {', '.join(unknown)[:200]}"
                f" (it accepts: {', '.join(allowed) or 'none'})")
        for name, v in kw.items():
            rule = allowed[name]
            if rule[0] == _BOOL:
                if not isinstance(v, bool):
                    bad(f"{meta.arch} argument {name} must be true or false, got {str(v)[:40]!r}")
                continue
            ok_type = _is_int(v) if rule[0] == _INT else (isinstance(v, (int, float)) and not isinstance(v, bool))
            if not ok_type or not rule[1] <= v <= rule[2]:
                bad(f"{meta.arch} argument {name}={str(v)[:40]} is impossible or absurd (must be "
                    f"{'an integer' if rule[0] == _INT else 'a number'} in {rule[1]}..{rule[2]})")
        if meta.arch == "wideresnet" and (kw.get("depth", 28) - 4) % 6:
            bad(f"wideresnet depth must be 6n+4, got {kw['depth']}")
    shape = meta.input_shape
    if shape is not None:
        if not isinstance(shape, (list, tuple)) or len(shape) != 3 or not all(_is_int(s) and s > 0 for s in shape):
            bad(f"input_shape must be [channels, height, width], got {str(shape)[:60]}")
        if shape[0] > 16 or max(shape[1:]) > MAX_INPUT_SIDE:
            bad(f"input_shape {list(shape)} is absurd (at most 16 channels and {MAX_INPUT_SIDE} pixels a side)")
    names = meta.class_names
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
            bad("class_names must be a list of strings")
        if len(names) != k:
            bad(f"it names {len(names)} classes but num_classes is {k}")
    for name, types in (("dataset", str), ("method", str), ("name", (str, type(None))), ("hparams", dict),
                        ("metrics", dict), ("epoch", (int, type(None)))):
        v = getattr(meta, name)
        if not isinstance(v, types) or isinstance(v, bool):
            bad(f"{name} has the wrong type ({type(v).__name__})")
    return meta


def build_model(arch: str, num_classes: int, **kwargs) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"unknown architecture '{arch}'. Known: {', '.join(sorted(ARCHITECTURES))}")
    try:
        return ARCHITECTURES[arch](num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise CheckpointError(f"bad arguments for architecture '{arch}': {e}") from e


def strip_prefixes(state: dict[str, torch.Tensor], prefixes=("module.", "model.", "_orig_mod.")) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], where: str = "checkpoint",
                            expected: str | None = None) -> None:
    """Strict load with a readable message when architecture or class count do not match.

    ``expected`` describes the model (e.g. "smallcnn, 10 classes") for the message."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{where} does not hold a state_dict of tensors")
    state = strip_prefixes(state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mism = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mism:
        parts = []
        if mism:
            k, got, want = mism[0]
            head = k.endswith(("linear.weight", "fc.weight", "linear.bias", "fc.bias", "logits.weight", "logits.bias"))
            # only the class dimension differs: same features in, another number of classes out
            hint = " (a different number of classes?)" if head and got[1:] == want[1:] and got[:1] != want[:1] else ""
            parts.append(f"{len(mism)} tensors have the wrong shape, e.g. {k}: file {got} vs model {want}{hint}")
        if missing:
            parts.append(f"{len(missing)} weights missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected weights (e.g. {unexpected[0]})")
        label = f" ({expected})" if expected else ""
        raise CheckpointError(f"{where} does not match the model architecture{label}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def save_checkpoint(path: str | Path, model: nn.Module | dict[str, torch.Tensor], meta: ModelMeta | dict) -> Path:
    """Atomically write weights + metadata as safetensors."""
    meta = meta if isinstance(meta, ModelMeta) else ModelMeta.from_dict(meta)
    state = model.state_dict() if isinstance(model, nn.Module) else model
    state = {k: v.detach().to("cpu").contiguous() for k, v in strip_prefixes(state).items()}
    blob = safetensors_bytes(state, metadata={META_KEY: json.dumps(meta.to_dict(), default=str)})
    return atomic_write_bytes(path, blob)


def read_metadata(path: str | Path) -> ModelMeta:
    """Read only the metadata header (cheap: does not load the weights)."""
    path = Path(path)
    kind = sniff_format(path)
    if kind != "safetensors":
        safe_torch_load(path)  # raises the right message for html/empty/missing/corrupt
        raise CheckpointError(f"{path} is a plain weights file without EnergyLens metadata; "
                              "choose its architecture and dataset when loading it")

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from e
    if not raw:
        raise CheckpointError(f"{path} has no EnergyLens metadata")
    if len(raw) > MAX_META_BYTES:
        raise CheckpointError(f"{path} has malformed metadata: {len(raw) / 1e6:.1f} MB of it (the limit is "
                              f"{MAX_META_BYTES / 1e6:.0f} MB)")
    try:
        meta = ModelMeta.from_dict(json.loads(raw))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} has corrupt metadata: {e}") from e
    except RecursionError as e:  # e.g. 100,000 nested '[': the parser gives up
        raise CheckpointError(f"{path} has malformed metadata: it is nested too deeply to read") from e
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    except (TypeError, AttributeError) as e:  # valid JSON of the wrong shape, e.g. a list or unknown value types
        raise CheckpointError(f"{path} has malformed metadata: {e}") from e
    return check_meta(meta, str(path))


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header (no weights are read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from e


def _check_shapes(meta: ModelMeta, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Build the model on the meta device (no memory) and compare its tensor shapes with the file's."""
    try:
        with torch.device("meta"):
            skeleton = build_model(meta.arch, meta.num_classes, **meta.arch_kwargs)
    except CheckpointError:
        raise
    except (ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{where}: the metadata does not describe a buildable model "
                              f"({meta.arch}, {meta.num_classes} classes, {meta.arch_kwargs}): {e}") from e
    fake = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    load_state_dict_checked(skeleton, fake, where=where,
                            expected=f"{meta.arch}, {meta.num_classes} classes, as its metadata says")


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu", expect_num_classes: int | None = None,
                    meta: ModelMeta | dict | None = None) -> LoadedModel:
    """Load a model from a checkpoint, safely.

    ``meta`` is only needed for plain ``.pt``/``.safetensors`` files without EnergyLens metadata.
    """
    path = Path(path)
    if meta is None:
        meta = read_metadata(path)
    elif isinstance(meta, dict):
        meta = ModelMeta.from_dict(meta)
    check_meta(meta, str(path.name))
    if expect_num_classes is not None and meta.num_classes != expect_num_classes:
        raise CheckpointError(f"{path.name} predicts {meta.num_classes} classes but {expect_num_classes} were expected")
    # shapes first (from the header for safetensors), against a model built on the meta device: metadata that does
    # not match the stored tensors is refused before anything is allocated
    if sniff_format(path) == "safetensors":
        _check_shapes(meta, _header_shapes(path), str(path.name))
        state = safe_torch_load(path)
    else:
        state = safe_torch_load(path)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path.name} does not hold a state_dict of tensors")
        _check_shapes(meta, {k: tuple(v.shape) for k, v in state.items()}, str(path.name))
    model = build_model(meta.arch, meta.num_classes, **meta.arch_kwargs)
    load_state_dict_checked(model, state, where=str(path.name),
                            expected=f"{meta.arch}, {meta.num_classes} classes, as its metadata says")
    model.to(device).eval()
    if meta.name is None:
        meta.name = path.stem
    return LoadedModel(model=model, meta=meta, path=path)
