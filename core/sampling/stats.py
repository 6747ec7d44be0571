"""Per-class PCA statistics of the training images (cached on disk) and the reference energies of real data
(Fig. 5e dashed lines)."""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..paths import cache_dir
from ..runtime import eval_mode
from ..storage import StorageError, atomic_write_bytes
from .defaults import STATS_VERSION

log = logging.getLogger("energylens.sampling")

Progress = Callable[[float, str], None]


def default_cache_dir() -> Path:
    return cache_dir()


def dataset_fingerprint(dataset) -> str:
    """Content hash (blake2b, 16 hex digits) of a dataset's images, labels and shape."""
    h = hashlib.blake2b(digest_size=8)
    x, y = dataset.x.contiguous(), dataset.y.contiguous()
    h.update(repr((tuple(x.shape), str(x.dtype), tuple(y.shape))).encode())
    h.update(x.numpy().tobytes())
    h.update(y.numpy().astype(np.int64).tobytes())
    return h.hexdigest()


@dataclass
class ClassMoments:
    """Mean and principal directions of one class's training images (flattened, in [0, 1]).

    ``components`` (r x d) are orthonormal rows sorted by decreasing variance; ``stds`` (r) the
    standard deviation along each (√ explained variance, ddof = 1); r = rank ≤ min(n − 1, d), so
    the covariance is exactly Σ = componentsᵀ · diag(stds²) · components.
    """

    label: int
    n: int
    mean: torch.Tensor
    components: torch.Tensor
    stds: torch.Tensor
    total_variance: float

    @property
    def rank(self) -> int:
        return int(self.stds.shape[0])

    def cumulative_ratio(self) -> np.ndarray:
        v = self.stds.double().square().numpy()
        return np.cumsum(v) / self.total_variance if self.total_variance > 0 else np.ones(len(v))

    def n_components(self, variance: float | None = 0.95, count: int | None = None) -> int:
        """Components to keep: ``count`` (capped at the rank), or the smallest k whose cumulative
        explained variance reaches ``variance`` (the crossing component included)."""
        if count is not None:
            return min(int(count), self.rank)
        if variance is None or self.rank == 0 or self.total_variance <= 0:
            return self.rank
        cum = self.cumulative_ratio()
        k = int(np.searchsorted(cum, float(variance) - 1e-12) + 1)
        return min(k, self.rank)

    def covariance(self) -> torch.Tensor:
        """The full d x d covariance (for tests and small images only)."""
        c = self.components.double()
        return (c.T * self.stds.double().square()) @ c


class ClassStats:
    """Per-class PCA statistics of a dataset, computed lazily per class and cached on disk.

    ``stats.get(c)`` returns the :class:`ClassMoments` of class c; the first call computes them
    (an SVD of the class's images) and writes ``classstats-<dataset>-<N>-<hash>-c<c>.npz``;
    later calls, also in other processes, load that file. ``computed`` / ``loaded`` count both.
    """

    def __init__(self, dataset, *, cache_dir: str | os.PathLike | None = None, use_cache: bool = True):
        if dataset is None or len(dataset) == 0:
            raise InputError("PCA / Gaussian initialisation needs the training images of the model's dataset, "
                             "and none are available")
        self.dataset_name = str(dataset.name)
        self.n_images = len(dataset)
        self.image_shape = tuple(int(s) for s in dataset.x.shape[1:])
        self.class_names = list(dataset.class_names)
        self.fingerprint = dataset_fingerprint(dataset)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.use_cache = use_cache
        self._x, self._y = dataset.x, dataset.y
        self.available = sorted(int(c) for c in torch.unique(dataset.y).tolist())
        self._moments: dict[int, ClassMoments] = {}
        self._lock = threading.Lock()
        self.computed = 0
        self.loaded = 0

    @property
    def dim(self) -> int:
        return int(np.prod(self.image_shape))

    def cache_path(self, c: int) -> Path:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self.dataset_name).strip("_")[-48:] or "dataset"
        return self.cache_dir / f"classstats-{slug}-{self.n_images}-{self.fingerprint}-c{int(c)}.npz"

    def get(self, c: int) -> ClassMoments:
        c = int(c)
        with self._lock:
            if c in self._moments:
                return self._moments[c]
            if c not in self.available:
                raise InputError(f"dataset '{self.dataset_name}' has no training images of class {c}, "
                                 "so its PCA / Gaussian statistics cannot be computed")
            m = self._load(c) if self.use_cache else None
            if m is None:
                m = self._compute(c)
                self.computed += 1
                if self.use_cache:
                    self._save(m)
            else:
                self.loaded += 1
            self._moments[c] = m
            return m

    def prepare(self, classes: Sequence[int], progress: Progress | None = None) -> None:
        for i, c in enumerate(classes):
            if progress is not None:
                progress(i / max(len(classes), 1), f"class statistics {i + 1}/{len(classes)}")
            self.get(c)

    # ---- maths -------------------------------------------------------------------------------
    def _compute(self, c: int) -> ClassMoments:
        idx = torch.nonzero(self._y == c).squeeze(1)
        x = self._x[idx].reshape(len(idx), -1).double().div_(255.0)
        n, d = x.shape
        mean = x.mean(dim=0)
        if n < 2:
            comps, stds, total = torch.zeros(0, d), torch.zeros(0), 0.0
        else:
            xc = x - mean
            _, s, vh = torch.linalg.svd(xc, full_matrices=False)
            var = s.square() / (n - 1)
            total = float(var.sum())
            keep = var > max(total, 1e-300) * 1e-12
            comps, var = vh[keep], var[keep]
            # deterministic signs: the largest-magnitude entry of every component is positive
            pivot = comps.abs().argmax(dim=1)
            sign = torch.sign(comps.gather(1, pivot[:, None])).squeeze(1)
            comps = comps * torch.where(sign == 0, torch.ones_like(sign), sign)[:, None]
            stds = var.sqrt()
        return ClassMoments(c, n, mean.float(), comps.float().contiguous(), stds.float(), total)

    # ---- cache -------------------------------------------------------------------------------
    def _save(self, m: ClassMoments) -> None:
        buf = io.BytesIO()
        np.savez(buf, version=np.int64(STATS_VERSION), label=np.int64(m.label), n=np.int64(m.n),
                 mean=m.mean.numpy(), components=m.components.numpy(), stds=m.stds.numpy(),
                 total_variance=np.float64(m.total_variance), fingerprint=np.str_(self.fingerprint),
                 image_shape=np.asarray(self.image_shape, dtype=np.int64))
        try:
            atomic_write_bytes(self.cache_path(m.label), buf.getvalue())
        except StorageError as e:  # a read-only cache is not fatal: the statistics are in memory
            log.warning("could not cache class statistics: %s", e)

    def _load(self, c: int) -> ClassMoments | None:
        p = self.cache_path(c)
        if not p.is_file():
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                if int(z["version"]) != STATS_VERSION or str(z["fingerprint"]) != self.fingerprint \
                        or int(z["label"]) != c or tuple(z["image_shape"].tolist()) != self.image_shape:
                    return None
                mean, comps, stds = z["mean"], z["components"], z["stds"]
                n, total = int(z["n"]), float(z["total_variance"])
            d = self.dim
            if mean.shape != (d,) or comps.ndim != 2 or comps.shape[1] != d or stds.shape != (comps.shape[0],):
                raise ValueError("inconsistent array shapes")
            if not (np.isfinite(mean).all() and np.isfinite(comps).all() and np.isfinite(stds).all()):
                raise ValueError("non-finite values")
        except Exception as e:  # noqa: BLE001 - a corrupt cache file is recomputed, never trusted
            log.warning("ignoring unreadable class-statistics cache %s: %s", p, e)
            return None
        return ClassMoments(c, n, torch.from_numpy(mean.astype(np.float32)),
                            torch.from_numpy(comps.astype(np.float32)), torch.from_numpy(stds.astype(np.float32)),
                            total)

    # ---- sampling ----------------------------------------------------------------------------
    def sample_pca(self, c: int, m: int, sigma: float, variance: float | None, count: int | None,
                   generator: torch.Generator) -> tuple[torch.Tensor, int]:
        """m draws of μ + Σ_{i≤k} std_i·α_i·U_i, α ~ N(0, σ²), clamped to [0, 1]; returns (x, k)."""
        mo = self.get(c)
        k = mo.n_components(variance, count)
        alpha = torch.randn(m, k, generator=generator) * float(sigma)
        x = mo.mean + (alpha * mo.stds[:k]) @ mo.components[:k]
        return x.clamp_(0, 1).reshape(m, *self.image_shape), k

    def sample_gaussian(self, c: int, m: int, ridge: float, generator: torch.Generator) -> torch.Tensor:
        """m draws of N(μ, Σ + ridge·I) (exact, via the SVD factor of Σ), clamped to [0, 1]."""
        mo = self.get(c)
        z = torch.randn(m, mo.rank, generator=generator)
        w = torch.randn(m, self.dim, generator=generator)
        x = mo.mean + (z * mo.stds) @ mo.components + math.sqrt(ridge) * w
        return x.clamp_(0, 1).reshape(m, *self.image_shape)



# =============================================================================================
# Reference energies of real data (Fig. 5e dashed lines)
# =============================================================================================
def reference_energies(model, dataset, classes: Sequence[int] | None = None, *, batch_size: int = 256,
                       device: str | torch.device | None = None, max_per_class: int | None = None) -> dict[int, dict]:
    """Mean E(x, y) and E(x) of the real images of each class: {c: {'joint', 'marginal', 'n'}}."""
    net = getattr(model, "model", model)
    if dataset is None or len(dataset) == 0:
        raise InputError("reference energies need the training images of the model's dataset")
    p = next(iter(net.parameters()), None)
    dev = torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
    classes = sorted({int(c) for c in (classes if classes is not None else torch.unique(dataset.y).tolist())})
    idx_all = []
    for c in classes:
        idx = torch.nonzero(dataset.y == c).squeeze(1)
        if len(idx) == 0:
            raise InputError(f"dataset '{dataset.name}' has no images of class {c}")
        idx_all.append(idx[:max_per_class] if max_per_class else idx)
    idx = torch.cat(idx_all)
    sj = sm = cnt = None
    with eval_mode(net), torch.no_grad():
        for i in range(0, len(idx), batch_size):
            j = idx[i:i + batch_size]
            y = dataset.y[j].to(dev)
            lg = net(dataset.images(j, dev)).float()
            if sj is None:
                k = lg.shape[1]
                if classes[-1] >= k:
                    raise InputError(f"class {classes[-1]} does not exist: the model has {k} classes")
                sj, sm, cnt = (torch.zeros(k, dtype=torch.float64, device=dev) for _ in range(3))
            sj.index_add_(0, y, (-lg.gather(1, y[:, None]).squeeze(1)).double())
            sm.index_add_(0, y, (-torch.logsumexp(lg, dim=1)).double())
            cnt.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
    sj, sm, cnt = sj.cpu(), sm.cpu(), cnt.cpu()
    if not (torch.isfinite(sj).all() and torch.isfinite(sm).all()):
        raise InputError("the model returns NaN or infinite logits on real images")
    return {c: {"joint": float(sj[c] / cnt[c]), "marginal": float(sm[c] / cnt[c]), "n": int(cnt[c])} for c in classes}


def reference_joint_energy(model, dataset, classes: Sequence[int] | None = None, **kw) -> dict[int, float]:
    """Ē(x, y): the average joint energy of the real training images of each class (Fig. 5e)."""
    return {c: v["joint"] for c, v in reference_energies(model, dataset, classes, **kw).items()}
