"""What the analyses share: the progress callback type, a model's display name, a model reference from a
job config, and the channels-last layout that makes CPU convolutions faster."""

from __future__ import annotations

from dataclasses import fields
from typing import Callable

import torch

from ..errors import InputError
from ..models.checkpoint import LoadedModel
from ..models.registry import ModelRef

Progress = Callable[[float, str], None]


def _noop(_f: float, _m: str = "") -> None:
    return None


def _model_name(lm: LoadedModel, i: int = 0) -> str:
    return lm.meta.name or (lm.path.stem if lm.path else f"model {i + 1}")


def _model_ref(d: dict):
    if not isinstance(d, dict) or not d.get("source") or not d.get("name"):
        raise InputError("a model must be given as a dict with at least 'source' and 'name' (ModelRef fields)")
    names = {f.name for f in fields(ModelRef)}
    return ModelRef(**{k: v for k, v in d.items() if k in names})


def _fast_layout(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Channels-last 4-D images on the CPU: the same numbers, ~1.5-2x faster convolutions there."""
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cpu" and x.dim() == 4 else x
