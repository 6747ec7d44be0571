"""2-D maps of features (the embedding explorer): penultimate features or logits, PCA (instant) and UMAP
(imported lazily; numba compiles on the first fit, so it is warmed once per process and the time it will take is
promised from what this machine measured)."""

from __future__ import annotations

import json
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..data import validate_images
from ..errors import EnergyLensError, InputError
from ..models import device_of
from ..paths import cache_dir
from ..runtime import eval_mode
from ..storage import atomic_write_json
from .common import Progress, _fast_layout


# =============================================================================================
# Embeddings
# =============================================================================================
def extract_features(model: nn.Module, x: torch.Tensor, *, kind: str = "penultimate", batch_size: int = 128,
                     progress: Progress | None = None) -> np.ndarray:
    """Features of every image: ``'penultimate'`` = the input of the last ``nn.Linear`` that runs in
    the forward pass (generic across architectures), or ``'logits'``. Returns float32 (N, D)."""
    if kind not in ("penultimate", "logits"):
        raise InputError(f"feature kind must be 'penultimate' or 'logits', got '{kind}'")
    x = validate_images(x)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if kind == "penultimate" and not linears:
        raise InputError("this model has no nn.Linear layer to read penultimate features from; use logits")
    dev = device_of(model)
    x = _fast_layout(x, dev)
    calls: list[tuple[int, torch.Tensor]] = []
    handles = []
    if kind == "penultimate":
        for i, m in enumerate(linears):
            handles.append(m.register_forward_hook(
                lambda mod, inp, out, i=i: calls.append((i, inp[0].detach()))))
    feats = []
    try:
        with eval_mode(model), torch.no_grad():
            for s in range(0, len(x), batch_size):
                calls.clear()
                out = model(x[s:s + batch_size].to(dev))
                if kind == "logits":
                    f = out
                else:
                    if not calls:
                        raise InputError("no nn.Linear ran in the forward pass; use logits")
                    f = calls[-1][1]
                feats.append(f.float().flatten(1).cpu())
                if progress:
                    progress(min(1.0, (s + batch_size) / len(x)), f"features {min(s + batch_size, len(x))}/{len(x)}")
    finally:
        for h in handles:
            h.remove()
        calls.clear()
    return torch.cat(feats).numpy()


def stack_groups(groups: dict[str, Any]) -> tuple[torch.Tensor, np.ndarray]:
    """Concatenate image arrays of several groups (natural, adversarial, generated ...): returns the
    images (float tensor in [0, 1]) and the group name of every row. ``None`` / empty groups are skipped."""
    xs, labels = [], []
    for name, arr in groups.items():
        if arr is None or len(arr) == 0:
            continue
        t = arr if isinstance(arr, torch.Tensor) else torch.as_tensor(np.asarray(arr))
        t = validate_images(t)
        xs.append(t.cpu())
        labels += [name] * len(t)
    if not xs:
        raise InputError("no images to embed")
    shapes = {tuple(t.shape[1:]) for t in xs}
    if len(shapes) > 1:
        raise InputError(f"the image groups have different shapes: {sorted(shapes)}")
    return torch.cat(xs), np.asarray(labels)


def _check_features(features) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise InputError(f"features must be a 2-D array (N, D), got shape {f.shape}")
    if f.shape[0] < 3:
        raise InputError(f"need at least 3 points for a 2-D map, got {f.shape[0]}")
    if not np.isfinite(f).all():
        raise InputError("features contain NaN or infinite values")
    return f


def pca_2d(features) -> np.ndarray:
    """First two principal components (N, 2), float32. Deterministic signs; instant for 1e4 x 1e3."""
    f = _check_features(features)
    f = f - f.mean(axis=0, keepdims=True)
    n, d = f.shape
    if d == 1:
        return np.column_stack([f[:, 0], np.zeros(n)]).astype(np.float32)
    if d <= n:
        cov = f.T @ f / max(n - 1, 1)
        w, v = np.linalg.eigh(cov)
        comps = v[:, np.argsort(w)[::-1][:2]]
    else:
        gram = f @ f.T
        w, u = np.linalg.eigh(gram)
        top = np.argsort(w)[::-1][:2]
        comps = f.T @ u[:, top]
        comps /= np.maximum(np.linalg.norm(comps, axis=0, keepdims=True), 1e-300)
    # deterministic sign: the largest-magnitude loading of each component is positive
    signs = np.sign(comps[np.abs(comps).argmax(axis=0), np.arange(comps.shape[1])])
    signs[signs == 0] = 1
    return (f @ (comps * signs)).astype(np.float32)


_UMAP_LOCK = threading.Lock()
_UMAP_STATE = {"state": "cold", "seconds": None, "error": None, "started": None}
# Fallbacks for the time promise before anything was measured on this machine (bench/bench_umap.py on a
# 2-core CPU loaded by training, issue 17): the first warm-up of a fresh install (numba compiles; its
# on-disk cache then makes later processes ~3x faster) and a fit of 1,000 points after the warm-up; a fit
# grows about as n^1.5 (300 -> 0.5 s, 1,000 -> 3 s, 2,000 -> 8.4 s).
UMAP_WARMUP_FALLBACK_S = 35.0
UMAP_FIT_1000_FALLBACK_S = 3.0
UMAP_FIT_EXPONENT = 1.5
_UMAP_TIMINGS_FILE = "umap-timings.json"
_umap_timings_lock = threading.Lock()
_umap_warmup_thread: threading.Thread | None = None


def _umap_timings_path() -> Path:
    return cache_dir() / _UMAP_TIMINGS_FILE


def umap_timings() -> dict:
    """What this machine measured last: {'warmup_s': float | None, 'fit_n': int | None, 'fit_s': float | None}."""
    try:
        d = json.loads(_umap_timings_path().read_text(encoding="utf-8"))
        out = {"warmup_s": d.get("warmup_s"), "fit_n": d.get("fit_n"), "fit_s": d.get("fit_s")}
        for k in ("warmup_s", "fit_s"):
            out[k] = float(out[k]) if isinstance(out[k], (int, float)) and out[k] > 0 else None
        out["fit_n"] = int(out["fit_n"]) if isinstance(out["fit_n"], int) and out["fit_n"] > 0 else None
        return out
    except (OSError, ValueError, AttributeError):
        return {"warmup_s": None, "fit_n": None, "fit_s": None}


def record_umap_timing(**kw) -> None:
    """Remember measured UMAP timings (``warmup_s``, ``fit_n``, ``fit_s``) for :func:`umap_estimate`."""
    with _umap_timings_lock:
        d = {**umap_timings(), **kw}
        try:
            _umap_timings_path().parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(_umap_timings_path(), d)
        except (EnergyLensError, OSError):
            pass   # a read-only cache only loses the measured promise


def umap_estimate(n: int, state: str | None = None) -> dict:
    """Seconds a UMAP of ``n`` points would take now: {'seconds', 'warmup_s', 'fit_s', 'measured'}. The warm-up
    (0 once warm; the remainder while warming) and the fit come from this machine's last measurements
    (umap_timings), else from the fallbacks measured in bench/bench_umap.py; ``measured`` says which.
    ``state`` ('cold', 'warming', 'warm'): estimate for that warm-up state instead of this process's."""
    t = umap_timings()
    state = _UMAP_STATE["state"] if state is None else state
    warm = 0.0
    if state in ("cold", "warming"):
        warm = t["warmup_s"] or UMAP_WARMUP_FALLBACK_S
        if state == "warming" and _UMAP_STATE.get("started"):
            warm = max(warm - (time.perf_counter() - _UMAP_STATE["started"]), 1.0)
    if t["fit_s"] and t["fit_n"]:
        fit = t["fit_s"] * (max(int(n), 1) / t["fit_n"]) ** UMAP_FIT_EXPONENT
    else:
        fit = UMAP_FIT_1000_FALLBACK_S * (max(int(n), 1) / 1000) ** UMAP_FIT_EXPONENT
    return {"seconds": warm + fit, "warmup_s": warm, "fit_s": fit,
            "measured": bool(t["fit_s"]) and (state == "warm" or bool(t["warmup_s"]))}


def preimport_umap_dependencies() -> None:
    """Import pandas on the calling thread before a thread imports umap: when two threads import pandas for the
    first time at once, one of them can get the partially initialised module ("module 'pandas' has no attribute
    'Series'"), as the Embedding explorer did while it drew its chart (plotly imports pandas too)."""
    try:
        import pandas  # noqa: F401 - lazy: optional, only to tell whether tables can be drawn
    except ImportError:
        pass


def start_umap_warmup() -> threading.Thread | None:
    """Warm UMAP (numba's JIT, its on-disk cache) in a daemon thread, once per process; None if already done."""
    global _umap_warmup_thread
    preimport_umap_dependencies()
    with _umap_timings_lock:
        if _UMAP_STATE["state"] == "warm" or (_umap_warmup_thread is not None and _umap_warmup_thread.is_alive()):
            return None
        if _UMAP_STATE["state"] == "failed":
            return None

        def body():
            try:
                warm_umap()
            except EnergyLensError:
                pass

        _umap_warmup_thread = threading.Thread(target=body, name="energylens-umap-warmup", daemon=True)
        _umap_warmup_thread.start()
        return _umap_warmup_thread


def umap_state() -> dict:
    """{'state': 'cold' | 'warming' | 'warm' | 'failed', 'seconds': float | None, 'error': str | None}."""
    return dict(_UMAP_STATE)


def warm_umap() -> float:
    """Trigger numba's compilation with a tiny fit (first fit in a process takes ~10-30 s on CPU).
    Safe to call from several threads: one warms, the others wait. Returns the seconds it took."""
    if _UMAP_STATE["state"] == "warm":
        return 0.0
    with _UMAP_LOCK:
        if _UMAP_STATE["state"] == "warm":
            return 0.0
        t0 = time.perf_counter()
        _UMAP_STATE.update(state="warming", started=t0)
        try:
            import umap  # noqa: F401 - lazy: importing compiles numba code

            rng = np.random.default_rng(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                umap.UMAP(n_neighbors=5, n_components=2, random_state=0, n_epochs=20).fit_transform(
                    rng.normal(size=(64, 8)).astype(np.float32))
        except Exception as e:  # noqa: BLE001
            _UMAP_STATE.update(state="failed", error=f"{type(e).__name__}: {e}")
            raise InputError(f"UMAP is not available: {type(e).__name__}: {e}. Use PCA instead.") from e
        dt = time.perf_counter() - t0
        _UMAP_STATE.update(state="warm", seconds=dt, error=None)
        record_umap_timing(warmup_s=dt)
        return dt


def umap_2d(features, seed: int | None = 0, *, n_neighbors: int = 15, min_dist: float = 0.1,
            pca_first: int | None = 50) -> np.ndarray:
    """UMAP to 2-D (umap imported lazily). Reduces wide features to ``pca_first`` PCA dimensions first
    (fast and standard practice). ``n_neighbors`` is capped at N - 1. Returns float32 (N, 2)."""
    f = _check_features(features)
    if f.shape[0] < 4:
        raise InputError(f"UMAP needs at least 4 points, got {f.shape[0]}")
    try:
        import umap  # lazy: heavy optional (umap-learn compiles numba code on import)
    except ImportError as e:
        raise InputError("umap-learn is not installed: use PCA") from e
    if pca_first and f.shape[1] > pca_first and f.shape[0] > pca_first:
        c = f - f.mean(axis=0, keepdims=True)
        _, _, vt = np.linalg.svd(c, full_matrices=False)
        f = c @ vt[:pca_first].T
    k = int(max(2, min(n_neighbors, f.shape[0] - 1)))
    was_warm = _UMAP_STATE["state"] == "warm"
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emb = umap.UMAP(n_neighbors=k, n_components=2, min_dist=min_dist,
                        random_state=None if seed is None else int(seed)).fit_transform(f.astype(np.float32))
    if was_warm and f.shape[0] >= 100:   # a warm fit: the time the next promise scales from
        record_umap_timing(fit_n=int(f.shape[0]), fit_s=time.perf_counter() - t0)
    if _UMAP_STATE["state"] != "warm":
        _UMAP_STATE.update(state="warm")
    return np.asarray(emb, dtype=np.float32)
