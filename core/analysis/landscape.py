"""Fig. 4: the energy landscape across models (signed drifts ΔE(x), ΔE(x, y) under one attack), its disk
cache (per model file SHA-256, attack spec, N, seed, images; ``.npz``, never pickle), the README's per-model drift
and the background job (kind 'landscape')."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
import torch

from .. import zoo
from ..attacks import AttackSpec, run_attack
from ..data import PAPER_EPS, check_image_count, dataset_spec, load_dataset, probe_indices, validate_images
from ..errors import EnergyLensError, InputError
from ..evaluation import default_eps
from ..fingerprint import data_sha256, model_sha256, weights_sha256
from ..models import device_of
from ..models.checkpoint import LoadedModel, ModelMeta, read_metadata
from ..models.registry import load_model_ref
from ..paths import cache_dir
from ..runtime import resolve_device
from ..storage import atomic_write
from .common import Progress, _fast_layout, _model_name, _model_ref, _noop
from .trend import robustness_trend


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
            eps = PAPER_EPS
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
