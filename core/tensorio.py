"""Tensor files: ``torch.save`` written atomically, and ``torch.load(..., weights_only=True)`` with clear errors.

Nothing here ever unpickles arbitrary objects: a file that would need code to load is refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as _load_safetensors

from .errors import CheckpointError
from .storage import atomic_write, sniff_format

__all__ = ["atomic_torch_save", "safe_torch_load"]


def atomic_torch_save(path, obj: Any) -> Path:
    """torch.save of tensors and plain containers only (so it loads with weights_only=True)."""
    return atomic_write(path, lambda f: torch.save(obj, f), "wb")


def safe_torch_load(path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(..., weights_only=True)`` with clear errors for the usual broken files.

    Never unpickles arbitrary objects: a file that needs code to load is refused.
    """
    path = Path(path)
    kind = sniff_format(path)
    if kind == "missing":
        raise CheckpointError(f"checkpoint not found: {path}")
    if kind == "empty":
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): delete it and download or train it again")
    if kind == "html":
        raise CheckpointError(
            f"{path} is an HTML page, not model weights (a failed download, e.g. a Google Drive "
            "quota or login page). Delete it and download again, or put the real file there.")
    if kind == "safetensors":
        try:
            return _load_safetensors(str(path), device=str(map_location))
        except Exception as e:  # noqa: BLE001 - report any parse failure as a checkpoint error
            raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from e
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "Weights only load failed" in str(e) or "Unsupported global" in str(e):
            if re.search(r"GLOBAL \S+|Unsupported global", str(e)):  # it names the code it would import
                raise CheckpointError(
                    f"{path} contains Python objects that would have to execute code to load; "
                    "EnergyLens only loads plain tensors (weights_only=True). Re-save it as a "
                    "state_dict or as safetensors.") from e
            # random bytes and pickles of unknown opcodes fail alike: say both, do not guess
            detail = next((ln.strip() for ln in str(e).splitlines() if ln.strip().startswith("Unsupported")), msg)
            raise CheckpointError(
                f"{path} is not a plain-tensor checkpoint: it is corrupt or truncated, or it holds Python "
                "objects that would have to execute code to load, which EnergyLens refuses (weights_only=True). "
                f"Re-save it as a state_dict or as safetensors, or download it again ({detail}).") from e
        raise CheckpointError(f"{path} is corrupt or truncated and could not be read ({msg})") from e
