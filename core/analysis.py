"""Analyses across models and samples: the energy landscape (Fig. 4), margins / entropy / energy
per sample and per class (Fig. 5 b-d), the subset-removal experiment (Fig. 5a) and 2-D maps of
features (embedding explorer).

* :func:`landscape` attacks every model on the same images and returns the signed drifts
  Delta E(x) = E(x) - E(x*) and Delta E(x, y) = E(x, y) - E(x*, y) with natural and robust accuracy.
  Results are cached on disk per (model file SHA-256, attack spec, N, seed, images) under
  ``<repo>/checkpoints/cache/landscape/`` as ``.npz`` (never pickle); a changed model file has a
  different hash, so stale results are never reused.
* :func:`symlog` / :func:`symlog_ticks` emulate a symmetric-log axis (plotly has none).
* :func:`sample_stats`, :func:`margin_correlations`, :func:`per_class_stats` give Fig. 5 b-d.
* :func:`select_subsets` picks the three same-size training subsets of Fig. 5a;
  :func:`run_subset_job` / :func:`launch_subset_jobs` retrain without each of them (jobs of kind
  'train' with ``exclude_indices_file``) and :func:`subset_comparison` compares their PGD error.
* :func:`extract_features` (penultimate features through a hook on the input of the last
  ``nn.Linear`` that runs, or logits), :func:`pca_2d` (instant) and :func:`umap_2d` (umap imported
  lazily; :func:`warm_umap` triggers numba's JIT once per process).

This module never imports streamlit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import jobs, zoo
from .attacks import AttackSpec, run_attack
from .data import check_image_count, dataset_spec, load_dataset, probe_indices, validate_images
from .energy import joint_energy, marginal_energy
from .errors import EnergyLensError, InputError
from .evaluation import default_eps
from .fingerprint import data_sha256, file_sha256, model_sha256, weights_sha256
from .models import device_of
from .models.checkpoint import LoadedModel, ModelMeta, read_metadata
from .models.registry import ModelRef, load_model_ref
from .paths import cache_dir
from .rundir import RunDir
from .runtime import eval_mode, resolve_device
from .storage import atomic_write, atomic_write_json
from .train import TrainConfig, load_splits

__all__ = [
    "LandscapeResult", "landscape", "drift_summary", "landscape_table", "robustness_trend", "default_cache_dir", "model_sha256", "weights_sha256",
    "file_sha256", "describe_ref", "validate_landscape_request", "sample_images", "load_landscape_results", "save_landscape_results", "run_landscape_job",
    "symlog", "symlog_inverse", "symlog_ticks",
    "SampleStats", "Correlation", "PerClassStats", "probabilistic_margin", "entropy", "correlation",
    "sample_stats", "sample_stats_from_logits", "model_logits", "margin_correlations", "per_class_stats",
    "SUBSETS", "SubsetSelection", "select_subsets", "compute_subset_selection", "write_subset_files",
    "base_train_config", "validate_subset_request",
    "subset_train_configs", "launch_subset_jobs", "run_subset_job", "subset_comparison",
    "extract_features", "stack_groups", "pca_2d", "umap_2d", "warm_umap", "umap_state", "umap_estimate",
    "umap_timings", "start_umap_warmup", "preimport_umap_dependencies", "record_umap_timing",
]

Progress = Callable[[float, str], None]


def _noop(_f: float, _m: str = "") -> None:
    return None


def _model_name(lm: LoadedModel, i: int = 0) -> str:
    return lm.meta.name or (lm.path.stem if lm.path else f"model {i + 1}")


# =============================================================================================
# Hashing and the disk cache
# =============================================================================================
def default_cache_dir() -> Path:
    """``<repo>/checkpoints/cache/landscape`` (``$ENERGYLENS_CACHE/landscape`` when set)."""
    return cache_dir("landscape")


# =============================================================================================
# Fig. 4: the energy landscape across models
# =============================================================================================
@dataclass
class LandscapeResult:
    """Natural vs adversarial energies of one model on the common images."""

    name: str
    e_nat: np.ndarray          # E(x)
    e_adv: np.ndarray          # E(x*)
    ej_nat: np.ndarray         # E(x, y)
    ej_adv: np.ndarray         # E(x*, y)
    pred_nat: np.ndarray
    pred_adv: np.ndarray
    labels: np.ndarray
    spec: dict = field(default_factory=dict)
    dataset: str = "unknown"
    method: str = "unknown"
    source: str = "local"
    model_sha: str = ""
    seed: int | None = None
    cached: bool = False
    seconds: float = 0.0

    @property
    def n(self) -> int:
        return int(len(self.labels))

    @property
    def delta_marginal(self) -> np.ndarray:
        """Signed Delta E(x) = E(x) - E(x*)."""
        return self.e_nat - self.e_adv

    @property
    def delta_joint(self) -> np.ndarray:
        """Signed Delta E(x, y) = E(x, y) - E(x*, y)."""
        return self.ej_nat - self.ej_adv

    @property
    def natural_accuracy(self) -> float:
        return float((self.pred_nat == self.labels).mean()) if self.n else float("nan")

    @property
    def robust_accuracy(self) -> float:
        return float((self.pred_adv == self.labels).mean()) if self.n else float("nan")

    def summary(self) -> dict[str, Any]:
        dm, dj = self.delta_marginal.astype(np.float64), self.delta_joint.astype(np.float64)

        def q(v, p):
            return float(np.quantile(v, p)) if len(v) else float("nan")

        return {
            "model": self.name, "method": self.method, "source": self.source, "n": self.n,
            "natural_acc": self.natural_accuracy, "robust_acc": self.robust_accuracy,
            "dE_mean": float(dm.mean()), "dE_abs_mean": float(np.abs(dm).mean()), "dE_std": float(dm.std()),
            "dE_median": q(dm, 0.5), "dE_iqr": q(dm, 0.75) - q(dm, 0.25),
            "dEy_mean": float(dj.mean()), "dEy_abs_mean": float(np.abs(dj).mean()), "dEy_std": float(dj.std()),
            "dEy_median": q(dj, 0.5), "dEy_iqr": q(dj, 0.75) - q(dj, 0.25),
            "cached": self.cached, "seconds": self.seconds,
        }

    # ---- (de)serialisation: arrays + one JSON string, loadable with allow_pickle=False ----
    _ARRAYS = ("e_nat", "e_adv", "ej_nat", "ej_adv", "pred_nat", "pred_adv", "labels")

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        meta = {k: getattr(self, k) for k in ("name", "spec", "dataset", "method", "source", "model_sha", "seed",
                                               "seconds")}
        d = {prefix + k: np.asarray(getattr(self, k)) for k in self._ARRAYS}
        d[prefix + "meta_json"] = np.asarray(json.dumps(meta, default=str))
        return d

    @classmethod
    def from_arrays(cls, d, prefix: str = "", cached: bool = False) -> "LandscapeResult":
        meta = json.loads(str(d[prefix + "meta_json"]))
        return cls(**{k: np.asarray(d[prefix + k]) for k in cls._ARRAYS}, **meta, cached=cached)


def _check_compatible(models: Sequence[LoadedModel]) -> None:
    if not models:
        raise InputError("no models selected: choose at least one model to compare")
    first = models[0].meta
    for i, lm in enumerate(models[1:], 1):
        m = lm.meta
        if m.dataset != first.dataset:
            raise InputError(f"the models were trained on different datasets ({_model_name(models[0])}: "
                             f"{first.dataset}, {_model_name(lm, i)}: {m.dataset}); compare models of one dataset")
        if int(m.num_classes) != int(first.num_classes):
            raise InputError(f"the models predict different numbers of classes ({_model_name(models[0])}: "
                             f"{first.num_classes}, {_model_name(lm, i)}: {m.num_classes})")
        if list(m.input_shape or []) != list(first.input_shape or []):
            raise InputError(f"the models expect different input shapes ({_model_name(models[0])}: "
                             f"{tuple(first.input_shape)}, {_model_name(lm, i)}: {tuple(m.input_shape)})")


def describe_ref(ref):
    """Cheap metadata of a ModelRef without loading weights (checkpoint header or zoo catalogue)."""
    if ref.source == "zoo":
        e = zoo.get_zoo_entry(ref.name, ref.dataset or "cifar10", ref.threat_model or "Linf")
        return ModelMeta(arch=e.architecture, num_classes=e.num_classes, dataset=e.dataset, method="zoo",
                         source="zoo", name=e.name, input_shape=[3, 32, 32], hparams={"eps": e.eps})
    if not ref.path:
        raise InputError(f"model '{ref.name}' has no checkpoint path")
    meta = read_metadata(ref.path)
    meta.source = ref.source
    meta.name = meta.name or ref.name
    return meta


def validate_landscape_request(refs: Sequence, n: int, split: str = "test") -> list:
    """Check a comparison before any model is loaded: models chosen, one dataset / class count /
    input shape, ``n`` within the split. Returns the metadata of every model."""
    refs = list(refs)
    if not refs:
        raise InputError("no models selected: choose at least one model to compare")
    metas = [describe_ref(r) for r in refs]
    _check_compatible([SimpleNamespace(meta=m, path=None) for m in metas])  # type: ignore[list-item]
    check_image_count(n)
    check_image_count(n, len(load_dataset(metas[0].dataset, split)), split=split, dataset=metas[0].dataset)
    return metas


def sample_images(dataset: str, n: int, seed: int = 0, split: str = "test", root=None):
    """``n`` class-balanced images of a split (a fixed draw for a given seed). Validates ``n``."""
    check_image_count(n)
    ds = load_dataset(dataset, split, root=root)
    n = check_image_count(n, len(ds), split=split, dataset=dataset)
    idx = probe_indices(ds, n, seed=int(seed))
    return ds.images(idx), ds.labels(idx), idx


def _cache_key(sha: str, weights: str, spec: AttackSpec, n: int, seed: int | None, data_sha: str) -> str:
    blob = json.dumps({"model": sha, "weights": weights, "attack": spec.to_dict(), "n": int(n), "seed": seed,
                       "data": data_sha, "v": 1}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _cache_read(path: Path, key: str) -> LandscapeResult | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as d:
            if str(d["key"]) != key:
                return None
            return LandscapeResult.from_arrays(d, cached=True)
    except Exception:  # noqa: BLE001 - a corrupt cache entry is simply recomputed
        return None


def _cache_write(path: Path, key: str, res: LandscapeResult) -> None:
    arrays = {**res.to_arrays(), "key": np.asarray(key)}
    try:
        atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
    except EnergyLensError:
        pass  # a read-only cache folder must not break the analysis


def landscape(models: Sequence[LoadedModel], x: torch.Tensor | None = None, y: torch.Tensor | None = None,
              spec: AttackSpec | None = None, *, n: int | None = None, seed: int = 0, split: str = "test",
              names: Sequence[str] | None = None, cache_dir: str | os.PathLike | None = None,
              use_cache: bool = True, progress: Progress | None = None) -> list[LandscapeResult]:
    """Attack every model on the same images; return per model the signed Delta E(x), Delta E(x, y) and
    natural / robust accuracy (paper Fig. 4).

    Give the images (``x`` float N x C x H x W in [0, 1], ``y``) or ``n`` (and ``seed``, ``split``) to
    draw ``n`` class-balanced images of the models' dataset. ``spec`` defaults to PGD-10 at the
    dataset's epsilon. Raises :class:`InputError` for no models, mixed datasets / class counts / input
    shapes, or ``n`` larger than the split.
    """
    models = list(models)
    _check_compatible(models)
    meta0 = models[0].meta
    if names is not None and len(names) != len(models):
        raise InputError(f"got {len(names)} names for {len(models)} models")
    if x is None:
        if n is None:
            raise InputError("give the images (x, y) or the number of images n")
        x, y, _ = sample_images(meta0.dataset, n, seed=seed, split=split)
    elif y is None:
        raise InputError("labels y are required with images x")

    x = validate_images(x)
    y = torch.as_tensor(y).long().reshape(-1)
    if y.numel() != x.shape[0]:
        raise InputError(f"got {y.numel()} labels for {x.shape[0]} images")
    if meta0.input_shape and tuple(x.shape[1:]) != tuple(meta0.input_shape):
        raise InputError(f"the models expect images of shape {tuple(meta0.input_shape)}, got {tuple(x.shape[1:])}")
    if spec is None:
        try:
            eps = dataset_spec(meta0.dataset).default_eps
        except EnergyLensError:
            eps = 8 / 255
        spec = AttackSpec("pgd", eps=eps, steps=10, seed=seed, batch_size=128)
    spec.validate(int(meta0.num_classes))
    # channels-last images make CPU convolutions ~30% faster (same numbers); the models are not touched
    x_run = _fast_layout(x, torch.device("cpu"))
    progress = progress or _noop
    cdir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    data_sha = data_sha256(x, y) if use_cache else ""
    out: list[LandscapeResult] = []
    k = len(models)
    for i, lm in enumerate(models):
        name = names[i] if names is not None else _model_name(lm, i)
        t0 = time.perf_counter()
        sha = model_sha256(lm) if use_cache else ""
        # the file hash names the checkpoint; the in-memory weights hash guards against a model object
        # loaded before its file was overwritten (its weights are then not the file's)
        key = _cache_key(sha, weights_sha256(lm.model), spec, len(y), seed, data_sha) if use_cache else ""
        path = cdir / f"{key[:40]}.npz"
        res = _cache_read(path, key) if use_cache else None
        if res is not None:
            res.name = name
            res.seconds = time.perf_counter() - t0
            progress((i + 1) / k, f"{name}: cached")
            out.append(res)
            continue

        def sub(f, msg="", i=i, name=name):
            progress((i + min(max(f, 0.0), 1.0)) / k, f"{name}: {msg}")

        xm = x_run if device_of(lm.model).type == "cpu" else x
        tr = run_attack(lm.model, xm, y, spec, progress=sub, num_classes=int(lm.meta.num_classes)).trace
        res = LandscapeResult(
            name=name, e_nat=tr.marginal[0].copy(), e_adv=tr.marginal[-1].copy(), ej_nat=tr.joint[0].copy(),
            ej_adv=tr.joint[-1].copy(), pred_nat=tr.pred[0].copy(), pred_adv=tr.pred[-1].copy(),
            labels=tr.labels.copy(), spec=spec.to_dict(), dataset=lm.meta.dataset, method=lm.meta.method,
            source=lm.meta.source, model_sha=sha, seed=seed, seconds=time.perf_counter() - t0)
        if use_cache:
            _cache_write(path, key, res)
        progress((i + 1) / k, f"{name}: done")
        out.append(res)
    return out


DRIFT_MAX_IMAGES = 1000


def drift_summary(lm: LoadedModel, *, max_images: int = DRIFT_MAX_IMAGES, seed: int = 0,
                  progress: Progress | None = None) -> dict[str, Any]:
    """The README's per-model drift: PGD-10 at the dataset's L∞ budget (the zoo model's own budget) on the
    model's test set (all of it, at most ``max_images``), through :func:`landscape` and its disk cache.
    Returns :meth:`LandscapeResult.summary` (``dE_abs_mean`` = mean |ΔE(x)|) plus ``eps`` and ``steps``."""
    ds = load_dataset(lm.meta.dataset, "test")
    n = min(len(ds), int(max_images))
    eps = default_eps(lm.meta, "Linf")
    spec = AttackSpec("pgd", eps=eps, steps=10, seed=seed, batch_size=128)
    res = landscape([lm], spec=spec, n=n, seed=seed, split="test", names=[_model_name(lm)], progress=progress)[0]
    return {**res.summary(), "eps": eps, "steps": 10}


def landscape_table(results: Sequence[LandscapeResult], sort: bool = True) -> list[dict[str, Any]]:
    """One summary row per model (the table behind Fig. 4), sorted by robust accuracy when ``sort``."""
    rows = [r.summary() for r in results]
    if sort:
        rows.sort(key=lambda r: (r["robust_acc"], r["natural_acc"]))
    return rows


def robustness_trend(results: Sequence[LandscapeResult]) -> dict[str, Any]:
    """Across models: does |Delta E(x)| (mean, spread) shrink as robust accuracy grows?

    Returns Spearman / Pearson correlations of robust accuracy with mean |Delta E(x)| and with the std
    of Delta E(x) (negative = shrinks with robustness); NaN with fewer than 3 models.
    """
    rows = [r.summary() for r in results]
    rob = np.array([r["robust_acc"] for r in rows], float)
    out: dict[str, Any] = {"n_models": len(rows)}
    for key in ("dE_abs_mean", "dE_std", "dEy_abs_mean"):
        v = np.array([r[key] for r in rows], float)
        c = correlation(rob, v) if len(rows) >= 3 else Correlation(float("nan"), float("nan"), len(rows))
        out[key] = {"pearson": c.pearson, "spearman": c.spearman}
    return out


def save_landscape_results(path: str | os.PathLike, results: Sequence[LandscapeResult]) -> Path:
    arrays: dict[str, np.ndarray] = {"count": np.asarray(len(results))}
    for i, r in enumerate(results):
        arrays.update(r.to_arrays(prefix=f"m{i}_"))
    return atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def load_landscape_results(path: str | os.PathLike) -> list[LandscapeResult]:
    p = Path(path)
    if p.is_dir():
        p = p / "landscape.npz"
    if not p.is_file():
        raise InputError(f"no landscape results at {p}")
    with np.load(p, allow_pickle=False) as d:
        return [LandscapeResult.from_arrays(d, prefix=f"m{i}_") for i in range(int(d["count"]))]


def _model_ref(d: dict):
    if not isinstance(d, dict) or not d.get("source") or not d.get("name"):
        raise InputError("a model must be given as a dict with at least 'source' and 'name' (ModelRef fields)")
    names = {f.name for f in fields(ModelRef)}
    return ModelRef(**{k: v for k, v in d.items() if k in names})


def _spec_from_dict(d: dict | None, fallback: AttackSpec | None = None) -> AttackSpec | None:
    if d is None:
        return fallback
    names = {f.name for f in fields(AttackSpec)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise InputError(f"unknown attack option(s): {', '.join(unknown)}")
    return AttackSpec(**d)


def run_landscape_job(config: dict, run_dir: Path, report: Progress) -> dict:
    """Job runner (kind 'landscape'): ``config`` = {"models": [ModelRef dicts], "n", "seed", "split",
    "attack": AttackSpec dict or None, "device", "use_cache"}. Models are loaded one at a time, so
    big zoo models do not have to fit in memory together. Writes ``<run_dir>/landscape.npz``."""
    refs = [_model_ref(d) for d in (config.get("models") or [])]
    device = str(resolve_device(config.get("device")))
    n, seed, split = config.get("n", 256), int(config.get("seed", 0)), config.get("split", "test")
    validate_landscape_request(refs, n, split)
    spec = _spec_from_dict(config.get("attack"))
    results: list[LandscapeResult] = []
    first = None
    x = y = None
    for i, ref in enumerate(refs):
        report(i / len(refs), f"loading {ref.name}")
        lm = load_model_ref(ref, device=device)
        if first is None:
            first = lm
            x, y, _ = sample_images(lm.meta.dataset, n, seed=seed, split=split)
        else:
            _check_compatible([first, lm])

        def sub(f, msg, i=i):
            report((i + f) / len(refs), msg)

        results += landscape([lm], x, y, spec, seed=seed, names=[ref.name], use_cache=config.get("use_cache", True),
                             progress=sub)
        if lm is not first:
            del lm
    run_dir = Path(run_dir)
    save_landscape_results(run_dir / "landscape.npz", results)
    report(1.0, "done")
    return {"results_file": str(run_dir / "landscape.npz"), "table": landscape_table(results),
            "trend": robustness_trend(results)}


# ---------------------------------------------------------------------------------------------
# Symmetric log axis (plotly has none)
# ---------------------------------------------------------------------------------------------
def symlog(v, c: float = 1.0) -> np.ndarray:
    """sign(v) * log10(1 + |v| / c): linear near 0 (|v| << c), logarithmic beyond; odd, monotone."""
    if not c > 0:
        raise InputError(f"the symlog constant must be > 0, got {c}")
    v = np.asarray(v, dtype=np.float64)
    return np.sign(v) * np.log10(1.0 + np.abs(v) / c)


def symlog_inverse(t, c: float = 1.0) -> np.ndarray:
    """Inverse of :func:`symlog`."""
    if not c > 0:
        raise InputError(f"the symlog constant must be > 0, got {c}")
    t = np.asarray(t, dtype=np.float64)
    return np.sign(t) * c * (np.power(10.0, np.abs(t)) - 1.0)


def _fmt_tick(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if 1e-3 <= a < 1e5:
        return f"{v:g}"
    return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-").replace("e+", "e")


def symlog_ticks(lo: float, hi: float, c: float = 1.0, max_ticks: int = 11) -> tuple[list[float], list[str]]:
    """Tick positions (in symlog units) and labels (original units) covering [lo, hi].

    Candidates are 0 and +-m·10^k (m = 1, 5, 2, in that order of preference, down to c/10); a candidate is
    kept only when it lies at least 1/max_ticks of the axis span (in symlog units) from every kept tick, so
    labels never overlap (e.g. ±0.1 next to 0 on a ±1 linear range). At most ``max_ticks`` ticks.
    """
    lo, hi = float(min(lo, hi)), float(max(lo, hi))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0], ["0"]
    amax = max(abs(lo), abs(hi), c)
    kmin = math.floor(math.log10(c)) - 1
    kmax = math.ceil(math.log10(amax))
    tol = 1e-9 * amax
    cands: list[float] = [0.0]
    for m in (1, 5, 2):
        for k in sorted(range(kmin, kmax + 1), key=lambda k: -abs(k - math.log10(c))):
            v = round(m * 10.0 ** k, 12)
            if v >= c / 10:
                cands += [v, -v]
    cands = [v for v in cands if lo - tol <= v <= hi + tol]
    t_lo, t_hi = float(symlog(lo, c)), float(symlog(hi, c))
    span = max(t_hi - t_lo, 1e-12)
    gap = span / max(max_ticks, 1)
    while True:
        kept: list[float] = []
        for v in cands:
            t = float(symlog(v, c))
            if all(abs(t - float(symlog(u, c))) >= gap for u in kept):
                kept.append(v)
        if len(kept) <= max_ticks:
            break
        gap *= 1.25
    out = sorted(kept) or [lo, hi]
    return [float(symlog(v, c)) for v in out], [_fmt_tick(v) for v in out]


# =============================================================================================
# Fig. 5 b-d: per-sample and per-class statistics
# =============================================================================================
def _as_logits(logits) -> torch.Tensor:
    t = torch.as_tensor(logits)
    if t.dim() != 2:
        raise InputError(f"logits must have shape (N, K), got {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.double()
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def probabilistic_margin(logits, y) -> np.ndarray:
    """PM = p_y(x) - max_{k != y} p_k(x) in [-1, 1] (MAIL's probabilistic margin)."""
    lg = _as_logits(logits)
    y = torch.as_tensor(y).long().reshape(-1)
    if lg.shape[1] < 2:
        raise InputError("the probabilistic margin needs at least 2 classes")
    p = F.softmax(lg, dim=1)
    py = p.gather(1, y.unsqueeze(1)).squeeze(1)
    other = p.scatter(1, y.unsqueeze(1), -1.0).max(dim=1).values
    return (py - other).cpu().numpy()


def entropy(logits) -> np.ndarray:
    """Shannon entropy (nats) of p(.|x)."""
    lg = _as_logits(logits)
    logp = F.log_softmax(lg, dim=1)
    return (-(logp.exp() * logp).sum(dim=1)).cpu().numpy()


@dataclass
class Correlation:
    pearson: float
    spearman: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def _rank(v: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as Spearman needs)."""
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v), dtype=np.float64)
    sv = v[order]
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def correlation(a, b) -> Correlation:
    """Pearson and Spearman correlation of two 1-D arrays (NaN pairs dropped; NaN if degenerate)."""
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    if a.shape != b.shape:
        raise InputError(f"cannot correlate arrays of lengths {a.size} and {b.size}")
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 2:
        return Correlation(float("nan"), float("nan"), int(a.size))
    return Correlation(_pearson(a, b), _pearson(_rank(a), _rank(b)), int(a.size))


@dataclass
class SampleStats:
    """Per-sample quantities from one model's logits (natural or adversarial inputs)."""

    labels: np.ndarray
    pred: np.ndarray
    e_x: np.ndarray        # E(x)
    e_xy: np.ndarray       # E(x, y)
    p_y: np.ndarray        # p(y|x)
    pm: np.ndarray         # probabilistic margin
    entropy: np.ndarray
    num_classes: int
    adversarial: bool = False

    @property
    def correct(self) -> np.ndarray:
        return self.pred == self.labels

    @property
    def n(self) -> int:
        return int(len(self.labels))


def sample_stats_from_logits(logits, y, adversarial: bool = False) -> SampleStats:
    lg = _as_logits(logits)
    y = torch.as_tensor(y).long().reshape(-1)
    if y.numel() != lg.shape[0]:
        raise InputError(f"got {y.numel()} labels for {lg.shape[0]} logit rows")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= lg.shape[1]):
        raise InputError(f"labels must lie in [0, {lg.shape[1] - 1}]")
    p = F.softmax(lg, dim=1)
    return SampleStats(
        labels=y.numpy().copy(), pred=lg.argmax(1).numpy(), e_x=marginal_energy(lg).numpy(),
        e_xy=joint_energy(lg, y).numpy(), p_y=p.gather(1, y.unsqueeze(1)).squeeze(1).numpy(),
        pm=probabilistic_margin(lg, y), entropy=entropy(lg), num_classes=int(lg.shape[1]), adversarial=adversarial)


def _fast_layout(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Channels-last 4-D images on the CPU: the same numbers, ~1.5-2x faster convolutions there."""
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cpu" and x.dim() == 4 else x


def model_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 128, progress: Progress | None = None) -> torch.Tensor:
    """Logits of every image (eval mode, no grad), on the CPU."""
    dev = device_of(model)
    x = _fast_layout(x, dev)
    outs = []
    with eval_mode(model), torch.no_grad():
        for i in range(0, len(x), batch_size):
            outs.append(model(x[i:i + batch_size].to(dev)).float().cpu())
            if progress:
                progress(min(1.0, (i + batch_size) / len(x)), f"forward {min(i + batch_size, len(x))}/{len(x)}")
    return torch.cat(outs) if outs else torch.empty(0, 0)


def sample_stats(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, attack: AttackSpec | None = None,
                 batch_size: int = 128, progress: Progress | None = None) -> SampleStats:
    """Energies, p(y|x), probabilistic margin and entropy of every sample.

    With ``attack`` the statistics are taken at the adversarial points x* (e.g. PM_adv as in MAIL).
    """
    x = validate_images(x)
    y = torch.as_tensor(y).long().reshape(-1)
    if y.numel() != x.shape[0]:
        raise InputError(f"got {y.numel()} labels for {x.shape[0]} images")
    if attack is not None:
        x = run_attack(model, _fast_layout(x, device_of(model)), y, attack, record_trace=False,
                       progress=progress).x_adv
    return sample_stats_from_logits(model_logits(model, x, batch_size, None if attack else progress), y,
                                    adversarial=attack is not None)


def margin_correlations(stats: SampleStats) -> dict[str, Correlation]:
    """Fig. 5 b/c: correlation of the probabilistic margin with E(x, y) and with E(x)."""
    return {"E(x,y)": correlation(stats.pm, stats.e_xy), "E(x)": correlation(stats.pm, stats.e_x)}


@dataclass
class PerClassStats:
    rows: list[dict[str, Any]]
    correlations: dict[str, Correlation]

    def column(self, key: str) -> np.ndarray:
        return np.array([r[key] for r in self.rows], dtype=float)


def per_class_stats(stats: SampleStats, class_names: Sequence[str] | None = None) -> PerClassStats:
    """Fig. 5d: per class the probabilistic error 1 - p(y|x), hard error, entropy, mean E(x) and mean
    E(x, y), plus the correlations of error with entropy and with energy across classes."""
    rows = []
    for c in range(stats.num_classes):
        m = stats.labels == c
        k = int(m.sum())
        nan = float("nan")
        rows.append({
            "class": c, "name": str(class_names[c]) if class_names and c < len(class_names) else str(c), "count": k,
            "prob_error": float(1.0 - stats.p_y[m].mean()) if k else nan,
            "hard_error": float(1.0 - stats.correct[m].mean()) if k else nan,
            "entropy": float(stats.entropy[m].mean()) if k else nan,
            "energy": float(stats.e_x[m].mean()) if k else nan,
            "joint_energy": float(stats.e_xy[m].mean()) if k else nan,
        })
    present = [r for r in rows if r["count"]]
    col = {k: np.array([r[k] for r in present], float) for k in ("prob_error", "entropy", "energy")}
    corr = {"error~entropy": correlation(col["prob_error"], col["entropy"]),
            "error~energy": correlation(col["prob_error"], col["energy"]),
            "entropy~energy": correlation(col["entropy"], col["energy"])}
    return PerClassStats(rows, corr)


# =============================================================================================
# Fig. 5a: the subset-removal experiment
# =============================================================================================
SUBSETS = ("high-energy", "low-energy", "misclassified")
SUBSET_LABELS = {"high-energy": "high-energy, correctly classified", "low-energy": "low-energy, correctly classified",
                 "misclassified": "misclassified", "none": "nothing removed (baseline)"}


@dataclass
class SubsetSelection:
    """Three same-size, disjoint subsets of the training set, chosen with a robust model's E(x)."""

    indices: dict[str, np.ndarray]
    size: int
    n_train: int
    n_correct: int
    n_misclassified: int
    mean_energy: dict[str, float]
    mean_energy_all: float
    seed: int = 0
    e_x: np.ndarray | None = None       # E(x) of every training sample (for the preview histogram)

    def summary(self) -> dict[str, Any]:
        return {"size": self.size, "n_train": self.n_train, "n_correct": self.n_correct,
                "n_misclassified": self.n_misclassified, "mean_energy": self.mean_energy,
                "mean_energy_all": self.mean_energy_all, "seed": self.seed}


def select_subsets(e_x, correct, size: int | None = None, *, seed: int = 0) -> SubsetSelection:
    """Pick ``size`` training indices for each of:

    * ``high-energy``: the correctly classified samples with the *highest* E(x);
    * ``low-energy``: the correctly classified samples with the *lowest* E(x);
    * ``misclassified``: a seeded random draw of misclassified samples.

    ``size`` defaults to the largest possible: min(#misclassified, #correct // 2).
    """
    e = np.asarray(e_x, np.float64).reshape(-1)
    ok = np.asarray(correct, bool).reshape(-1)
    if e.shape != ok.shape:
        raise InputError(f"got {e.size} energies for {ok.size} correctness flags")
    cor = np.nonzero(ok)[0]
    wrong = np.nonzero(~ok)[0]
    if len(wrong) == 0:
        raise InputError("the model classifies every training sample correctly: there is no misclassified subset "
                         "(use a model that is less accurate on its training data, e.g. an adversarially trained one)")
    if len(cor) < 2:
        raise InputError("fewer than 2 correctly classified training samples: cannot form the energy subsets")
    limit = min(len(wrong), len(cor) // 2)
    if size is None:
        size = limit
    if int(size) != size or size <= 0:
        raise InputError(f"the subset size must be a positive integer, got {size}")
    size = int(size)
    if size > limit:
        raise InputError(f"subset size {size} is too large: there are {len(wrong)} misclassified and {len(cor)} "
                         f"correctly classified samples, so at most {limit} per subset")
    order = cor[np.argsort(e[cor], kind="mergesort")]
    rng = np.random.default_rng(seed)
    idx = {"high-energy": np.sort(order[::-1][:size]), "low-energy": np.sort(order[:size]),
           "misclassified": np.sort(rng.choice(wrong, size=size, replace=False))}
    return SubsetSelection(indices=idx, size=size, n_train=int(e.size), n_correct=int(len(cor)),
                           n_misclassified=int(len(wrong)), mean_energy={k: float(e[v].mean()) for k, v in idx.items()},
                           mean_energy_all=float(e.mean()), seed=seed, e_x=e)


def _train_fields() -> set[str]:
    return {f.name for f in fields(TrainConfig)}


_NOT_INHERITED = {"out_dir", "resume", "name", "exclude_indices_file", "device", "loss", "step_size_resolved"}


def base_train_config(lm: LoadedModel, overrides: dict | None = None) -> dict:
    """The robust model's own training configuration (from its metadata), to retrain 'the same
    network from scratch'; ``overrides`` win. Unknown keys in ``overrides`` raise InputError."""
    names = _train_fields()
    hp = dict(lm.meta.hparams or {})
    base = {k: v for k, v in hp.items() if k in names and k not in _NOT_INHERITED}
    base.setdefault("dataset", lm.meta.dataset)
    base.setdefault("arch", lm.meta.arch)
    if lm.meta.method not in ("unknown", "zoo"):
        base.setdefault("method", lm.meta.method)
    over = dict(overrides or {})
    unknown = sorted(set(over) - names)
    if unknown:
        raise InputError(f"unknown training option(s): {', '.join(unknown)}")
    return {**base, **over}


def validate_subset_request(lm: LoadedModel, *, source: str | None = None, size: int | None = None, seed: int = 0,
                            train: dict | None = None) -> dict:
    """Check a subset-removal experiment (Fig. 5a) before anything is computed or queued: a model EnergyLens can
    retrain (not a RobustBench ``source`` 'zoo' one), ``size`` None (= the largest possible) or a positive integer,
    ``seed`` >= 0, and the retraining configuration (the model's own with the ``train`` overrides) valid for
    :meth:`core.train.TrainConfig.validate`. Returns that configuration."""
    if source == "zoo" or getattr(lm.meta, "source", None) == "zoo":
        raise InputError("model: retraining RobustBench architectures is not supported here: use a bundled or local "
                         "model trained with EnergyLens")
    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, float, np.integer))
                             or not math.isfinite(size) or int(size) != size or size <= 0):
        raise InputError(f"the subset size must be a positive integer (or none for the largest possible), got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"the selection seed must be an integer >= 0, got {seed!r}")
    base = base_train_config(lm, train)
    TrainConfig.from_dict(base).validate()
    return base


def compute_subset_selection(lm: LoadedModel, size: int | None = None, *, train_config: dict | None = None,
                             seed: int = 0, batch_size: int = 256, progress: Progress | None = None
                             ) -> SubsetSelection:
    """Energies and correctness of the robust model on its (natural) training set, then
    :func:`select_subsets`. The training set is the one ``core.train`` will use for ``train_config``
    (same dataset / train_limit / npz split), so the indices line up with ``exclude_indices_file``."""
    cfg = {k: v for k, v in (train_config or base_train_config(lm)).items() if k in _train_fields()}
    cfg.pop("exclude_indices_file", None)
    tc = TrainConfig.from_dict(cfg)
    train_ds, _ = load_splits(tc)
    if train_ds.num_classes != lm.meta.num_classes and lm.meta.num_classes < int(train_ds.y.max()) + 1:
        raise InputError(f"the model predicts {lm.meta.num_classes} classes but the training set "
                         f"'{tc.dataset}' has {train_ds.num_classes}")
    x, y = train_ds.images(), train_ds.labels()
    st = sample_stats(lm.model, x, y, batch_size=batch_size, progress=progress)
    return select_subsets(st.e_x, st.correct, size, seed=seed)


def write_subset_files(selection: SubsetSelection, folder: str | os.PathLike) -> dict[str, Path]:
    """``<folder>/exclude_<subset>.json`` (a JSON list of indices) per subset, and ``selection.json``."""
    folder = Path(folder)
    out = {}
    for name, idx in selection.indices.items():
        out[name] = atomic_write_json(folder / f"exclude_{name}.json", [int(i) for i in idx])
    atomic_write_json(folder / "selection.json", selection.summary())
    return out


def subset_train_configs(files: dict[str, str | os.PathLike], base: dict, *, include_baseline: bool = False,
                         name_prefix: str = "subset") -> dict[str, dict]:
    """One TrainConfig dict per subset: ``base`` plus ``exclude_indices_file`` (and a baseline)."""
    cfgs = {name: {**base, "exclude_indices_file": str(Path(p).resolve()), "name": f"{name_prefix}-no-{name}"}
            for name, p in files.items()}
    if include_baseline:
        cfgs["none"] = {**base, "exclude_indices_file": None, "name": f"{name_prefix}-baseline"}

    for c in cfgs.values():  # fail early, in the caller's thread, on a bad option
        TrainConfig.from_dict({k: v for k, v in c.items()}).validate()
    return cfgs


def launch_subset_jobs(configs: dict[str, dict], *, device: str = "auto", runs_dir=None) -> dict[str, str]:
    """Submit one training job (kind 'train') per subset; returns {subset: job id}."""
    ids = {}
    for name, cfg in configs.items():
        kw = {"runs_dir": runs_dir} if runs_dir is not None else {}
        info = jobs.submit("train", cfg, name=cfg.get("name") or f"subset-{name}", device=device, **kw)
        ids[name] = info.id
    return ids


def run_subset_job(config: dict, run_dir: Path, report: Progress) -> dict:
    """Job runner (kind 'subset'): select the three subsets with a robust model and launch the
    retraining jobs. ``config`` = {"model": ModelRef dict, "size": int | None, "seed": 0,
    "train": {TrainConfig overrides}, "include_baseline": false, "device": "auto",
    "launch": true}. Returns the selection summary and {subset: training job id}."""
    ref = _model_ref(config.get("model") or {})
    device = str(resolve_device(config.get("device")))
    report(0.0, f"loading {ref.name}")
    lm = load_model_ref(ref, device=device)
    base = validate_subset_request(lm, source=ref.source, size=config.get("size"), seed=config.get("seed", 0),
                                   train=config.get("train"))
    report(0.1, "energies of the training set")
    sel = compute_subset_selection(lm, config.get("size"), train_config=base, seed=int(config.get("seed", 0)),
                                   progress=lambda f, m: report(0.1 + 0.7 * f, m))
    run_dir = Path(run_dir)
    files = write_subset_files(sel, run_dir)
    cfgs = subset_train_configs(files, base, include_baseline=bool(config.get("include_baseline", False)),
                                name_prefix=config.get("name_prefix") or f"subset-{ref.name}")
    out: dict[str, Any] = {"selection": sel.summary(), "configs": cfgs, "model": asdict(ref), "jobs": {}}
    if config.get("launch", True):
        report(0.9, "launching the training jobs")
        out["jobs"] = launch_subset_jobs(cfgs, device=config.get("device") or "auto",
                                         runs_dir=config.get("runs_dir") or run_dir.parent)
    atomic_write_json(run_dir / "subset_experiment.json", out)
    report(1.0, "launched " + ", ".join(out["jobs"]) if out["jobs"] else "selection written")
    return out


def subset_comparison(job_ids: dict[str, str], *, runs_dir=None) -> list[dict[str, Any]]:
    """Status and final PGD robust error of each retraining job (Fig. 5a)."""
    rows = []
    for name, jid in job_ids.items():
        row: dict[str, Any] = {"subset": name, "label": SUBSET_LABELS.get(name, name), "job": jid,
                               "status": "missing", "progress": 0.0, "epoch": None,
                               "rob_err": None, "nat_err": None, "error": None}
        try:
            info = jobs.get_job(jid, runs_dir=runs_dir) if runs_dir is not None else jobs.get_job(jid)
        except EnergyLensError as e:
            row["error"] = str(e)
            rows.append(row)
            continue
        row.update(status=info.status, progress=float(info.progress or 0.0), error=info.error)
        recs = RunDir(info.run_dir).read_metrics() if info.run_dir else []
        if recs:
            last = recs[-1]
            row.update(epoch=last.get("epoch"), rob_err=last.get("rob_err"), nat_err=last.get("nat_err"))
        rows.append(row)
    return rows


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
