"""Running work on a device: eval mode that threads can share, out-of-memory detection, the device choice,
progress callbacks.

A bottom-layer module: it imports torch and nothing of the project above :mod:`core.errors`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Callable

import torch
import torch.nn as nn

from .errors import InputError

__all__ = ["Progress", "eval_mode", "is_oom_error", "cuda_count", "resolve_device", "timed"]

Progress = Callable[[float, str], None]   # progress(fraction in [0, 1], message)


# Who holds which module / parameter in eval mode: id -> [object, holders, state before the first holder].
# One model is shared by every Streamlit session and task thread (st.cache_resource), so attacks on it overlap;
# a per-call save/restore would let the first caller to leave restore the state under the others' feet
# (A enters, B enters and saves A's frozen state, A leaves and unfreezes B's model, B leaves and freezes it
# for good). Instead the state is saved by the first holder and restored by the last one, under one lock.
_HOLD_LOCK = threading.Lock()
_HELD_MODULES: dict[int, list] = {}
_HELD_PARAMS: dict[int, list] = {}


def _hold(table: dict[int, list], obj, current: bool) -> bool:
    """Count one more holder of ``obj``; True when it is the first (the caller then changes the state)."""
    entry = table.get(id(obj))
    if entry is None:
        table[id(obj)] = [obj, 1, current]
        return True
    entry[1] += 1
    return False


def _release(table: dict[int, list], obj):
    """Count one holder less; the saved state when it was the last one, else None."""
    entry = table[id(obj)]
    entry[1] -= 1
    if entry[1] == 0:
        del table[id(obj)]
        return entry[2]
    return None


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put the model in eval mode and freeze its parameters; restore both afterwards.

    Safe when several threads hold the same model (or models sharing submodules) at once: every module's
    ``training`` flag and every parameter's ``requires_grad`` is saved by the first holder and restored by
    the last, so the model stays in eval mode and frozen (the BatchNorm-folded fast path on) until every
    attack on it has finished, and gets back exactly the state it had before the first one. A model being
    trained (parameters that require gradients, e.g. core.train's inner attack) gets them back afterwards.
    """
    # Every submodule's own flag is saved: model.train(was_training) alone would flip submodules that
    # were deliberately in the other mode (e.g. frozen BatchNorm inside a model being fine-tuned).
    modules = list(model.modules())
    params = list(model.parameters())
    with _HOLD_LOCK:
        for m in modules:
            if _hold(_HELD_MODULES, m, m.training):
                m.training = False
        for p in params:
            if _hold(_HELD_PARAMS, p, p.requires_grad):
                p.requires_grad_(False)
    try:
        yield model
    finally:
        with _HOLD_LOCK:
            for p in params:
                flag = _release(_HELD_PARAMS, p)
                if flag is not None:
                    p.requires_grad_(flag)
            for m in modules:
                mode = _release(_HELD_MODULES, m)
                if mode is not None:
                    m.training = mode




def is_oom_error(e: BaseException) -> bool:
    if isinstance(e, getattr(torch.cuda, "OutOfMemoryError", ())):  # type: ignore[arg-type]
        return True
    if isinstance(e, MemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def cuda_count() -> int:
    """GPUs this process can use (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(choice: str | None = "auto") -> torch.device:
    """``'auto'`` (or None) -> the first GPU of this process (``$LOCAL_RANK`` under torchrun) or the CPU;
    ``'cpu'``; ``'cuda'`` / ``'cuda:N'``, checked against the GPUs present (:class:`InputError` otherwise)."""
    d = str(choice or "auto").strip().lower()
    if d == "auto":
        if cuda_count():
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        return torch.device("cpu")
    if d == "cpu":
        return torch.device("cpu")
    if d.startswith("cuda"):
        n = cuda_count()
        if n == 0:
            raise InputError("CUDA was requested but no GPU is available: use device 'cpu' or 'auto'")
        try:
            dev = torch.device(d)
        except RuntimeError as e:
            raise InputError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got '{choice}'") from e
        if dev.index is not None and dev.index >= n:
            raise InputError(f"device '{d}' does not exist: this machine has {n} GPU(s) (cuda:0..cuda:{n - 1})")
        return dev
    raise InputError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got '{choice}'")


def timed() -> Callable[[], float]:
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0
