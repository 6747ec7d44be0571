"""Architectures, the checkpoint format and the registry of available models."""

import torch

from .architectures import ARCHITECTURES
from .checkpoint import (LoadedModel, ModelMeta, build_model, load_checkpoint, load_state_dict_checked,
                         read_metadata, save_checkpoint, strip_prefixes)

__all__ = ["ARCHITECTURES", "LoadedModel", "ModelMeta", "build_model", "device_of", "load_checkpoint",
           "load_state_dict_checked", "read_metadata", "save_checkpoint", "strip_prefixes"]


def device_of(model) -> torch.device:
    """The device of a model's parameters (CPU for a model without any)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
