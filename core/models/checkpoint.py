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

from .. import __version__
from ..errors import CheckpointError
from ..storage import atomic_write_bytes, safe_torch_load, sniff_format
from .architectures import ARCHITECTURES

__all__ = ["ModelMeta", "LoadedModel", "build_model", "save_checkpoint", "load_checkpoint", "read_metadata",
           "load_state_dict_checked", "strip_prefixes"]

META_KEY = "energylens"


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
    from safetensors.torch import save

    meta = meta if isinstance(meta, ModelMeta) else ModelMeta.from_dict(meta)
    state = model.state_dict() if isinstance(model, nn.Module) else model
    state = {k: v.detach().to("cpu").contiguous() for k, v in strip_prefixes(state).items()}
    blob = save(state, metadata={META_KEY: json.dumps(meta.to_dict(), default=str)})
    return atomic_write_bytes(path, blob)


def read_metadata(path: str | Path) -> ModelMeta:
    """Read only the metadata header (cheap: does not load the weights)."""
    path = Path(path)
    kind = sniff_format(path)
    if kind != "safetensors":
        safe_torch_load(path)  # raises the right message for html/empty/missing/corrupt
        raise CheckpointError(f"{path} is a plain weights file without EnergyLens metadata; "
                              "choose its architecture and dataset when loading it")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from e
    if not raw:
        raise CheckpointError(f"{path} has no EnergyLens metadata")
    try:
        return ModelMeta.from_dict(json.loads(raw))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} has corrupt metadata: {e}") from e
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    except (TypeError, AttributeError) as e:  # valid JSON of the wrong shape, e.g. a list or unknown value types
        raise CheckpointError(f"{path} has malformed metadata: {e}") from e


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
    if expect_num_classes is not None and meta.num_classes != expect_num_classes:
        raise CheckpointError(f"{path.name} predicts {meta.num_classes} classes but {expect_num_classes} were expected")
    state = safe_torch_load(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    model = build_model(meta.arch, meta.num_classes, **meta.arch_kwargs)
    load_state_dict_checked(model, state, where=str(path.name),
                            expected=f"{meta.arch}, {meta.num_classes} classes, as its metadata says")
    model.to(device).eval()
    if meta.name is None:
        meta.name = path.stem
    return LoadedModel(model=model, meta=meta, path=path)
