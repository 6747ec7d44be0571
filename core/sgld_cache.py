"""SGLD start statistics per (model, dataset), computed once and shared: a background warm-up and the
reference energies Ē(x, y), Ē(x) of the real images.

What the SGLD studio needs before its first chain answers is (a) the per-class PCA / Gaussian moments
of the dataset (``core.sampling.ClassStats``, an SVD per class, cached on disk per dataset) and (b)
the mean energies of the real images of every class under the model (one forward pass over the
dataset, Fig. 5e's dashed level). Both cost seconds on a CPU (a CIFAR-10 demo pack: ~7 s each on a
loaded 2-core machine) and neither changes while the model and the dataset stay the same, so:

* :func:`reference_energies_cached` computes the reference energies of *all* classes once per
  (model weights, dataset content), over at most ``REF_MAX_PER_CLASS`` images per class (the first ones) and keeps them in memory and on disk as JSON
  (``sgldref-<dataset>-<N>-<dataset hash>-<weights hash>.json`` in the class-statistics cache
  folder); a class subset is then a lookup.
* :func:`warm_up` starts, at most once per (model, dataset) and process, a daemon thread that
  prepares both, and returns a :class:`Warmup` handle (fraction, message, done, error, wait) that
  every session shares. The page starts it when it opens, so Initialise normally finds everything
  ready; if not, it waits on the handle off the script thread, with progress.

Thread safety: one lock per key serialises the computation (a second caller waits for the first's
result instead of computing it again); ``ClassStats.get`` has its own lock.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .errors import EnergyLensError, InputError
from .fingerprint import weights_sha256
from .sampling.stats import ClassStats, dataset_fingerprint, default_cache_dir, reference_energies
from .storage import atomic_write_json

__all__ = ["reference_energies_cached", "reference_ready", "warm_up", "Warmup", "cache_key", "warmups",
           "clear_memory"]

REF_VERSION = 1
REF_MAX_PER_CLASS = 1000     # reference energies: the mean over at most this many images per class (all of them for
                             # the digits and the CIFAR-10 demo pack; bounds the warm-up on a 50,000-image set)
_DS_FP_KEEP = 8
RETRY_AFTER_S = 60.0         # a failed warm-up is started again at most this often
_global_lock = threading.Lock()
_key_locks: dict[str, threading.Lock] = {}
_memory: dict[str, dict[int, dict]] = {}
_warmups: dict[str, "Warmup"] = {}
_ds_fp: dict[int, tuple[object, str]] = {}    # id(dataset) -> (dataset, fingerprint): hash each dataset once


def _dataset_fp(dataset) -> str:
    with _global_lock:
        hit = _ds_fp.get(id(dataset))
        if hit is not None and hit[0] is dataset:
            return hit[1]
    fp = dataset_fingerprint(dataset)
    with _global_lock:
        while len(_ds_fp) >= _DS_FP_KEEP:          # a few datasets at a time: this must not keep them all alive
            _ds_fp.pop(next(iter(_ds_fp)))
        _ds_fp[id(dataset)] = (dataset, fp)
    return fp


def cache_key(model, dataset) -> str:
    """The cache key of (model, dataset): the dataset's name, size and content fingerprint and the weights' hash."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(dataset.name)).strip("_")[-48:] or "dataset"
    return f"{slug}-{len(dataset)}-{_dataset_fp(dataset)}-{weights_sha256(getattr(model, 'model', model))[:16]}-m{REF_MAX_PER_CLASS}"


def _lock_for(key: str) -> threading.Lock:
    with _global_lock:
        return _key_locks.setdefault(key, threading.Lock())


def _path(key: str, cache_dir) -> Path:
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"sgldref-{key}.json"


MAX_ABS_ENERGY = 1e6        # a cached mean energy beyond this is not from a real model: recomputed


def _expected_counts(model, dataset) -> dict[int, int]:
    """{class: number of images the reference energies average} for this dataset (and model): what a cached file
    must hold, exactly."""
    counts = torch.bincount(torch.as_tensor(dataset.y).long().flatten()).tolist()
    out = {c: min(int(n), REF_MAX_PER_CLASS) for c, n in enumerate(counts) if n > 0}
    k = getattr(getattr(model, "meta", None), "num_classes", None)
    if isinstance(k, int) and out and max(out) >= k:
        return {}           # the dataset has labels the model does not: nothing cached can fit, recompute (and fail)
    return out


def _load(path: Path, expected: dict[int, int] | None = None) -> dict[int, dict] | None:
    """The cached reference energies, or None (recomputed) when absent, unreadable, too deep, or when they do not fit
    the model and dataset: ``expected`` {class: count} must match exactly; energies finite, within
    ±MAX_ABS_ENERGY, and E(x) <= E(x, y) (a log-sum-exp is at least each logit)."""
    try:
        if path.stat().st_size > 1_000_000:
            return None
        d = json.loads(path.read_text(encoding="utf-8"))
        if d.get("version") != REF_VERSION:
            return None
        out = {}
        for c, v in d["classes"].items():
            j, m, n = v["joint"], v["marginal"], v["n"]
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (j, m)) or \
                    not isinstance(n, int) or isinstance(n, bool):
                return None
            if not (math.isfinite(j) and math.isfinite(m) and abs(j) <= MAX_ABS_ENERGY and abs(m) <= MAX_ABS_ENERGY
                    and m <= j + 1e-6 * max(1.0, abs(j)) and n > 0):
                return None
            out[int(c)] = {"joint": float(j), "marginal": float(m), "n": n}
        if expected is not None and {c: v["n"] for c, v in out.items()} != expected:
            return None       # a missing or extra class, or another count: not this model and dataset's statistics
        return out or None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None           # absent or unreadable: recomputed, never trusted


def _save(path: Path, ref: dict[int, dict]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"version": REF_VERSION, "classes": {str(c): v for c, v in ref.items()}})
    except (EnergyLensError, OSError):
        pass                  # a read-only cache is not fatal: the values stay in memory


def _pick(ref: dict[int, dict], classes: Sequence[int] | None) -> dict[int, dict]:
    if classes is None:
        return dict(ref)
    missing = [int(c) for c in classes if int(c) not in ref]
    if missing:
        raise InputError(f"no real images of class {missing[0]} in the dataset, so no reference energy for it")
    return {int(c): ref[int(c)] for c in classes}


def reference_energies_cached(model, dataset, classes: Sequence[int] | None = None, *, cache_dir=None,
                              wait: bool = True) -> dict[int, dict] | None:
    """``core.sampling.reference_energies`` of all classes, computed once per (model, dataset).

    ``wait=False`` returns None instead of waiting while another thread computes them."""
    key = cache_key(model, dataset)
    hit = _memory.get(key)
    if hit is not None:
        return _pick(hit, classes)
    lock = _lock_for(key)
    if not lock.acquire(blocking=wait):
        return None
    try:
        hit = _memory.get(key)
        if hit is None:
            path = _path(key, cache_dir)
            hit = _load(path, _expected_counts(model, dataset))
            if hit is None:
                hit = reference_energies(model, dataset, None, max_per_class=REF_MAX_PER_CLASS)
                _save(path, hit)
            _memory[key] = hit
        return _pick(hit, classes)
    finally:
        lock.release()


def clear_memory() -> None:
    """Forget the reference energies held in memory and the background preparations, as a restarted server
    would; the files of the disk cache stay (the next call reads them back)."""
    with _global_lock:
        _memory.clear()
        _warmups.clear()


def warmups() -> dict[str, "Warmup"]:
    """The background preparations of this process so far: {cache key: handle} (a copy)."""
    with _global_lock:
        return dict(_warmups)


def reference_ready(model, dataset) -> bool:
    """Whether the reference energies are in memory (no computation, no waiting)."""
    return cache_key(model, dataset) in _memory


@dataclass
class Warmup:
    """A shared background preparation of one (model, dataset): class statistics, then reference energies."""

    key: str
    fraction: float = 0.0
    message: str = "starting"
    done: bool = False
    error: str | None = None
    seconds: float | None = None
    started: float = field(default_factory=time.time)
    _event: threading.Event = field(default_factory=threading.Event, repr=False)

    def wait(self, timeout: float | None = None, progress: Callable[[float, str], None] | None = None) -> bool:
        """Wait until done (True) or ``timeout`` (False); ``progress(fraction, message)`` every 0.25 s."""
        t0 = time.time()
        while not self._event.wait(0.25):
            if progress is not None:
                progress(self.fraction, self.message)
            if timeout is not None and time.time() - t0 >= timeout:
                return False
        return True

    def finish(self, error: str | None = None) -> None:
        """Mark the preparation ended (with ``error``, or ready) and wake up whoever waits."""
        if error is None:
            self.fraction, self.message = 1.0, "ready"
        self.error = error
        self.done = True
        self._event.set()


def warm_up(model, dataset, stats: ClassStats | None = None, *, cache_dir=None) -> Warmup:
    """Start (once per model, dataset and process) the background preparation; returns its handle."""
    key = cache_key(model, dataset)
    with _global_lock:
        w = _warmups.get(key)
        # running or done: share it; a failed one is retried, but not on every page rerun
        if w is not None and not (w.done and w.error and time.time() - w.started >= RETRY_AFTER_S):
            return w
        w = Warmup(key)
        _warmups[key] = w
    st = stats if stats is not None else ClassStats(dataset, cache_dir=cache_dir)
    classes = list(st.available)

    def body() -> None:
        t0 = time.perf_counter()
        error = None
        try:
            for i, c in enumerate(classes):
                w.fraction, w.message = 0.8 * i / max(len(classes), 1), f"class statistics {i + 1}/{len(classes)}"
                st.get(c)
            w.fraction, w.message = 0.8, "energies of the real images"
            reference_energies_cached(model, dataset, cache_dir=cache_dir)
        except EnergyLensError as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 - reported on the handle, never lost in a thread
            error = f"{type(e).__name__}: {e}"
        finally:
            w.seconds = time.perf_counter() - t0
            w.finish(error)

    threading.Thread(target=body, name=f"energylens-sgld-warmup-{key[-8:]}", daemon=True).start()
    return w
