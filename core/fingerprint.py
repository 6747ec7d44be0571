"""Content hashes: of files, of a model's weights, of a loaded model, of an image batch.

They key every disk cache (landscape, evaluation chunks, SGLD start statistics), so a changed checkpoint,
an in-place weight update or other images never reuse a stale result.
"""

from __future__ import annotations

import hashlib
import os
import re
import weakref
from pathlib import Path

import torch
import torch.nn as nn

from .models.checkpoint import LoadedModel

__all__ = ["file_sha256", "weights_sha256", "model_sha256", "data_sha256"]

_HASH_MEMO: dict[tuple[str, int, int], str] = {}
_MEMO_MIN_BYTES = 32 * 1024 * 1024   # only large files (zoo weights) are memoised, by (size, mtime_ns)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's content. Large files are memoised per (path, size, mtime_ns)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if st.st_size >= _MEMO_MIN_BYTES and key in _HASH_MEMO:
        return _HASH_MEMO[key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    if st.st_size >= _MEMO_MIN_BYTES:
        _HASH_MEMO[key] = digest
    return digest


_WEIGHTS_MEMO: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]]" = weakref.WeakKeyDictionary()


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 of a module's state_dict (names, dtypes, values). Memoised per module object and
    recomputed when any tensor was modified in place (tracked through tensor version counters)."""
    state = model.state_dict(keep_vars=True)
    versions = tuple((k, v._version, v.data_ptr()) for k, v in state.items())
    memo = _WEIGHTS_MEMO.get(model)
    if memo is not None and memo[0] == versions:
        return memo[1]
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        t = v.detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
    try:
        _WEIGHTS_MEMO[model] = (versions, digest)
    except TypeError:
        pass
    return digest


def model_sha256(lm: LoadedModel) -> str:
    """Content hash of a model: its checkpoint file(s), or its weights when it has no file.

    Zoo ensembles (``<name>.pt_m0.pt``, ``_m1`` ...) hash every member file.
    """
    if lm.path is not None and Path(lm.path).is_file():
        p = Path(lm.path)
        m = re.match(r"^(.*\.pt)_m\d+\.pt$", p.name)
        if m:
            members = sorted(p.parent.glob(f"{m.group(1)}_m*.pt"))
            h = hashlib.sha256()
            for f in members:
                h.update(file_sha256(f).encode())
            return h.hexdigest()
        return file_sha256(p)
    return "weights-" + weights_sha256(lm.model)


def data_sha256(x: torch.Tensor, y: torch.Tensor) -> str:
    """SHA-256 of an image batch (as float32) and its labels."""
    h = hashlib.sha256()
    xc = x.detach().to("cpu", torch.float32).contiguous()
    h.update(str(tuple(xc.shape)).encode())
    h.update(xc.numpy().tobytes())
    h.update(y.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()
