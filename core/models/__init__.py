"""Architectures, the checkpoint format and the registry of available models."""

from .architectures import ARCHITECTURES
from .checkpoint import (LoadedModel, ModelMeta, build_model, load_checkpoint, load_state_dict_checked,
                         read_metadata, save_checkpoint, strip_prefixes)

__all__ = ["ARCHITECTURES", "LoadedModel", "ModelMeta", "build_model", "load_checkpoint", "load_state_dict_checked",
           "read_metadata", "save_checkpoint", "strip_prefixes"]
