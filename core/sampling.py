"""Sampling images from a robust classifier read as an energy-based model (paper Sec. 3.3, Eq. 7).

The chain samples p(x | y) ∝ exp(-E(x, y)) with E(x, y) = -f(x)[y], using SGLD with momentum
(Eq. 7)::

    v_{n+1} = ζ·v_n − ½·η·∇ₓE(x_n, y)           v_0 = 0
    x_{n+1} = Π( x_n + v_{n+1} + ε )              ε ~ N(0, γ²·I)

* ``eta`` (η) is the step size, ``zeta`` (ζ ∈ [0, 1)) the momentum / friction coefficient
  (ζ = 0 is plain SGLD), ``gamma`` (γ) the **standard deviation** of the injected noise. The paper
  writes ε ~ N(0, γI), but the official code draws ``normal_(0, γ)``, i.e. γ is a std; so is ours.
* Π is the projection onto the [0, 1] pixel box, preceded, when a ``bound=('Linf'|'L2', r)`` is
  given, by the projection of the *perturbation* x − x₀ onto the r-ball around the chain's start
  x₀ (the official code's L2 variant renormalises the whole image instead, which is a bug).
* The momentum is not reset by the projection.

Initialisations x₀ (``init``):

* ``'random'``   U(0, 1) noise, as JEM.
* ``'gaussian'`` one Gaussian per class, N(μ_y, Σ_y + ρ·I) with the class mean, the full
  (unbiased) pixel covariance and a ridge ρ (default 1e-4), clamped to [0, 1]. It is sampled
  *exactly* through the factor Σ_y = Uᵀ diag(s²) U of the class SVD:
  x₀ = μ_y + Uᵀ(s ∘ z) + √ρ·w with z, w standard normal. This is the same distribution as a
  Cholesky draw of Σ_y + ρI but needs O(rank·d) memory instead of O(d²) and no factorisation of a
  d × d matrix.
* ``'pca'``      (the paper's, Eq. 7) x₀ = μ_y + Σ_{i≤k} λ_i α_i U_i^y with α_i ~ N(0, σ²), clamped.
  **Scaling of λ:** λ_i is the standard deviation of the class data along component i
  (√ of the explained variance, ddof = 1), so σ is measured *in units of the data's own spread*:
  σ = 1 reproduces the class's variance in the kept subspace, σ = 0 gives the class mean. The
  official code used sklearn's singular values, s_i = √(n−1)·std_i, with σ_official = 0.005; that
  is σ = 0.005·√(n−1) ≈ 0.35 for the 5,000 images of a CIFAR-10 class, our default
  (:data:`DEFAULT_PCA_SIGMA`); :func:`sigma_from_official` converts other values.
  The k components are chosen by retained variance (default 0.95: the smallest k whose cumulative
  explained variance reaches it, *including* the component that crosses the threshold, unlike
  the official off-by-one) or by an explicit count.

Per-class statistics (mean, components, stds) come from the model's *training* images and are
computed once per class and cached on disk as ``.npz`` (never pickle) under
``<repo>/checkpoints/cache`` (or ``$ENERGYLENS_CACHE``), keyed by dataset name, number of
images and a content hash, so a changed dataset never reuses stale statistics. A class file holds
all rank ≤ min(n − 1, d) components (the Gaussian start needs the full covariance): about 38 MB
for a CIFAR-10 class (d = 3,072), a few hundred kB for the embedded digits.

Step defaults depend on the data (:func:`sgld_defaults`, keyed by :func:`dataset_family`): η = 1,
ζ = 0.5, γ = 0.001 (:data:`DIGITS_DEFAULTS`) give recognisable digits in about 50 steps with the bundled
SAT model, but on CIFAR-10 they make PCA-started chains *worse* (FID 30 -> 114 after 100 steps, and the
target energy far below the real-data level Ē(x, y) in 10/10 classes); natural-image datasets (CIFAR-10/100,
SVHN, Tiny-ImageNet and any unknown or ``npz:`` dataset) get η = 0.025, ζ = 0.8, γ = 0.001
(:data:`CIFAR_DEFAULTS`: FID 30 -> 17 after 100 steps). The measurements are in docs/METHODS.md. The
official code used η ∈ [0.025, 0.8], ζ ∈ {0, 0.8}, γ = 0.001 and 20-500 steps on CIFAR-10 models.

:class:`SGLDSampler` is step-wise: ``step(n)`` continues the chain, returning the images and the
energies of every step (E(x, y) of the target class, E(x, y') of all classes, E(x)), which also
accumulate in ``.trace`` (Fig. 5e). :func:`reference_joint_energy` gives the reference level
Ē(x, y) of real training images. :func:`run_job` is the background-job entry point (batch
generation + IS/FID/KID).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from .attacks.base import project
from .data import load_dataset
from .drift import EnergyTrace
from .errors import DataError, InputError
from .metrics import choose_extractor, generation_metrics, inception_status, independent_classifier
from .models.folding import folded
from .models.registry import ModelRef, load_model_ref
from .paths import cache_dir
from .rundir import RunDir
from .runtime import eval_mode, is_oom_error, resolve_device
from .storage import StorageError, atomic_write_bytes, atomic_write_json

__all__ = [
    "INITS", "NORMS", "MAX_STEPS", "MAX_CHAINS", "DEFAULT_PCA_SIGMA", "DEFAULTS", "DIGITS_DEFAULTS", "CIFAR_DEFAULTS",
    "dataset_family", "sgld_defaults", "sigma_from_official", "ClassMoments", "ClassStats", "dataset_fingerprint",
    "default_cache_dir",
    "SGLDTrace", "StepOutput", "SGLDSampler", "validate_hyperparams", "validate_steps", "validate_sampler_settings",
    "MAX_INTERACTIVE_CHAINS", "reference_energies",
    "reference_joint_energy", "SGLDJobConfig", "run_job",
]

log = logging.getLogger("energylens.sampling")

INITS = ("random", "gaussian", "pca")
NORMS = ("Linf", "L2")
MAX_STEPS = 100_000          # per call of step() and per job
MAX_CHAINS = 10_000          # chains held by one sampler (a job batches more)
MAX_INTERACTIVE_CHAINS = 64  # chains per class of an interactive sampler (the SGLD studio); a batch job takes more
STATS_VERSION = 1
DEFAULT_PCA_SIGMA = 0.35     # = official σ 0.005 × √(5000 − 1) for a CIFAR-10 class, see module doc
_INIT_DEFAULTS = {"pca_sigma": DEFAULT_PCA_SIGMA, "pca_variance": 0.95, "gaussian_ridge": 1e-4}
# η, ζ, γ per dataset family (docs/METHODS.md, "SGLD step defaults", has the measurements). The model's robustness
# does not change them: a plain model's chains turn into adversarial noise with either setting.
DIGITS_DEFAULTS = {"eta": 1.0, "zeta": 0.5, "gamma": 0.001, **_INIT_DEFAULTS}
CIFAR_DEFAULTS = {"eta": 0.025, "zeta": 0.8, "gamma": 0.001, **_INIT_DEFAULTS}
_FAMILY_DEFAULTS = {"digits": DIGITS_DEFAULTS, "cifar": CIFAR_DEFAULTS}
# dataset name -> family; names not listed (npz: files, new datasets) are natural images: the 'cifar' family
_FAMILIES = {"digits": "digits", "cifar10": "cifar", "cifar100": "cifar", "cifar10-demo": "cifar", "svhn": "cifar",
             "tinyimagenet": "cifar"}
DEFAULTS = CIFAR_DEFAULTS    # for a model whose dataset is unknown

Progress = Callable[[float, str], None]


def dataset_family(dataset: str | None) -> str:
    """'digits' for the embedded digits (and names starting with 'digits'), 'cifar' for every other dataset:
    CIFAR-10/100, their demo subsets, SVHN, Tiny-ImageNet, ``npz:`` files and unknown names."""
    name = str(dataset or "").strip().lower()
    if name in _FAMILIES:
        return _FAMILIES[name]
    if name.startswith("digits"):
        return "digits"
    return "cifar"


def sgld_defaults(model=None, dataset: str | None = None) -> dict[str, Any]:
    """The default SGLD settings (η, ζ, γ and the initialisation's σ, retained variance, ridge) for a model's data.

    ``model``: a LoadedModel or ModelMeta (its ``dataset`` is used), or None; ``dataset`` names the dataset
    directly. The one place the SGLD page, :class:`SGLDSampler` and the batch job (:func:`run_job`, hence the
    jobs CLI) take their defaults from. Returns a new dict with the settings and ``family`` / ``dataset``.
    """
    meta = getattr(model, "meta", model)
    name = dataset if dataset is not None else getattr(meta, "dataset", None)
    family = dataset_family(name)
    return {**_FAMILY_DEFAULTS[family], "family": family, "dataset": name}


def sigma_from_official(sigma_official: float, n_class_images: int) -> float:
    """Convert the official code's σ (which multiplies singular values) into our σ (which multiplies
    per-component standard deviations): σ_ours = σ_official · √(n − 1)."""
    if n_class_images < 2:
        raise InputError("a class needs at least 2 images for PCA")
    return float(sigma_official) * math.sqrt(n_class_images - 1)


# =============================================================================================
# Validation
# =============================================================================================
def _finite(name: str, v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {v!r}") from None
    if not math.isfinite(f):
        raise InputError(f"{name} must be a finite number, got {v}")
    return f


def validate_hyperparams(eta: float, zeta: float, gamma: float) -> tuple[float, float, float]:
    """Check η > 0, ζ ∈ [0, 1), γ ≥ 0 (all finite); return them as floats."""
    eta, zeta, gamma = _finite("step size η", eta), _finite("momentum ζ", zeta), _finite("noise γ", gamma)
    if eta <= 0:
        raise InputError(f"step size η must be > 0, got {eta:g}")
    if not 0 <= zeta < 1:
        raise InputError(f"momentum ζ must lie in [0, 1) (ζ ≥ 1 makes the chain diverge), got {zeta:g}")
    if gamma < 0:
        raise InputError(f"noise γ is a standard deviation and must be ≥ 0, got {gamma:g}")
    return eta, zeta, gamma


def validate_steps(n) -> int:
    """A whole number of steps in [1, MAX_STEPS]."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) and not (isinstance(n, float) and n.is_integer()):
        raise InputError(f"the number of steps must be a whole number, got {n!r}")
    n = int(n)
    if n <= 0:
        raise InputError(f"the number of steps must be positive, got {n}")
    if n > MAX_STEPS:
        raise InputError(f"{n} steps is too many for one call (max {MAX_STEPS:,})")
    return n


def _validate_bound(bound) -> tuple[str, float] | None:
    if bound is None:
        return None
    if not isinstance(bound, (tuple, list)) or len(bound) != 2:
        raise InputError("bound must be None or (norm, radius), e.g. ('Linf', 0.1)")
    norm, r = bound
    if norm not in NORMS:
        raise InputError(f"bound norm must be one of {NORMS}, got '{norm}'")
    r = _finite("bound radius", r)
    if r <= 0:
        raise InputError(f"bound radius must be > 0, got {r:g}")
    return str(norm), r


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer, float)) or int(v) != v or v < 1:
        raise InputError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def _validate_classes(classes) -> list[int]:
    try:
        out = [int(c) for c in (classes or [])]
    except (TypeError, ValueError):
        raise InputError(f"classes must be integers, got {classes!r}") from None
    if not out:
        raise InputError("choose at least one class to sample")
    if len(set(out)) != len(out):
        raise InputError("each class may appear only once (use n_per_class for more chains)")
    return out


def _validate_init_params(pca_sigma, pca_variance, pca_components, gaussian_ridge):
    """(σ ≥ 0, retained variance in (0, 1] unless a component count is given, count ≥ 1, ridge ≥ 0)."""
    sigma = _finite("PCA σ", pca_sigma)
    if sigma < 0:
        raise InputError(f"PCA σ must be ≥ 0, got {sigma:g}")
    if pca_components is not None:
        pca_components = _positive_int("the number of PCA components", pca_components)
    elif pca_variance is None or not 0 < _finite("retained variance", pca_variance) <= 1:
        raise InputError(f"retained variance must lie in (0, 1], got {pca_variance}")
    ridge = _finite("Gaussian ridge", gaussian_ridge)
    if ridge < 0:
        raise InputError(f"the Gaussian ridge must be ≥ 0, got {ridge:g}")
    return sigma, None if pca_variance is None else float(pca_variance), pca_components, ridge


def _seeds(seed: int, n: int) -> list[int]:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer, float)) or not math.isfinite(seed) \
            or int(seed) != seed or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    return [int(s) for s in np.random.SeedSequence(int(seed)).generate_state(n, dtype=np.uint32)]


def validate_sampler_settings(classes, n_per_class, *, init: str = "pca", eta=None, zeta=None, gamma=None,
                              bound=None, seed: int = 0, pca_sigma: float = DEFAULT_PCA_SIGMA,
                              pca_variance: float | None = _INIT_DEFAULTS["pca_variance"],
                              pca_components: int | None = None,
                              gaussian_ridge: float = _INIT_DEFAULTS["gaussian_ridge"],
                              max_per_class: int | None = None) -> None:
    """Check the settings of an :class:`SGLDSampler` before it is built (no model or data needed): the rules of
    its constructor, and at most ``max_per_class`` chains per class (:data:`MAX_INTERACTIVE_CHAINS` for an
    interactive sampler). η, ζ, γ left at None are the model's defaults, valid by construction."""
    d = DEFAULTS
    validate_hyperparams(d["eta"] if eta is None else eta, d["zeta"] if zeta is None else zeta,
                         d["gamma"] if gamma is None else gamma)
    _validate_bound(bound)
    if init not in INITS:
        raise InputError(f"initialisation must be one of {', '.join(INITS)}, got '{init}'")
    _validate_init_params(pca_sigma, pca_variance, pca_components, gaussian_ridge)
    _seeds(seed, 1)
    classes = _validate_classes(classes)
    counts = [n_per_class] * len(classes) if np.ndim(n_per_class) == 0 else list(n_per_class)
    if len(counts) != len(classes):
        raise InputError("n_per_class must be one number or one number per class")
    counts = [_positive_int("chains per class", k) for k in counts]
    if max_per_class is not None and max(counts) > max_per_class:
        raise InputError(f"chains per class must be at most {max_per_class} in an interactive run, got "
                         f"{max(counts)}; use a batch job for more")
    if sum(counts) > MAX_CHAINS:
        raise InputError(f"{sum(counts):,} chains at once is too many (max {MAX_CHAINS:,}); "
                         "use a batch job for large runs")


# =============================================================================================
# Per-class statistics
# =============================================================================================
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
# Trace
# =============================================================================================
@dataclass
class SGLDTrace:
    """Energies along a chain. Row s holds the energies of the images after ``steps[s]`` steps
    (row 0 = the initialisation). Long chains are thinned to stay within a memory budget, so
    ``steps`` need not be contiguous."""

    steps: np.ndarray         # (S,)
    joint: np.ndarray         # (S, N) E(x_s, y) for each chain's target class y
    joint_all: np.ndarray     # (S, N, K) E(x_s, k) for every class k
    marginal: np.ndarray      # (S, N) E(x_s)
    labels: np.ndarray        # (N,) target classes
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return int(self.steps.shape[0])

    @property
    def n_chains(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.joint_all.shape[2]) if self.joint_all.ndim == 3 else 0

    def other_joint(self) -> np.ndarray:
        """(S, N) mean of E(x_s, k) over the classes k ≠ y."""
        k = self.num_classes
        if k < 2:
            return np.full_like(self.joint, np.nan)
        return (self.joint_all.sum(axis=2) - self.joint) / (k - 1)

    def pred(self) -> np.ndarray:
        """(S, N) class predicted at every row (argmin of the joint energies = argmax logits)."""
        return self.joint_all.argmin(axis=2)

    def summary(self, classes: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """Means and stds over chains (optionally of some target classes only) at every row."""
        sel = np.ones(self.n_chains, bool) if classes is None else np.isin(self.labels, list(classes))
        j, o, m = self.joint[:, sel], self.other_joint()[:, sel], self.marginal[:, sel]
        acc = (self.pred()[:, sel] == self.labels[sel]).mean(axis=1) if sel.any() else np.full(self.n_rows, np.nan)
        return {"step": self.steps, "target_mean": j.mean(axis=1), "target_std": j.std(axis=1),
                "others_mean": o.mean(axis=1), "others_std": o.std(axis=1),
                "marginal_mean": m.mean(axis=1), "marginal_std": m.std(axis=1), "target_hit": acc}

    def reference_gap(self, reference: dict, classes: Sequence[int] | None = None) -> np.ndarray:
        """(S,) mean over chains (optionally of some target classes) of E(x_s, y) − Ē(x, y), with Ē of each chain's
        own class: ``reference`` maps class -> Ē(x, y), or class -> {'joint': Ē(x, y), ...} as
        :func:`reference_energies` returns it. Negative: the chains are below the real-data level."""
        sel = np.ones(self.n_chains, bool) if classes is None else np.isin(self.labels, list(classes))
        if not sel.any() or not self.n_rows:
            return np.full(self.n_rows, np.nan)
        lab = self.labels[sel]
        try:
            level = np.array([float(v["joint"] if isinstance(v, dict) else v)
                              for v in (reference[int(c)] for c in lab)], dtype=np.float64)
        except KeyError as e:
            raise InputError(f"no reference energy for class {e.args[0]}") from None
        return (self.joint[:, sel].astype(np.float64) - level).mean(axis=1)

    def passed_reference(self, reference: dict, classes: Sequence[int] | None = None) -> dict[str, Any]:
        """When the chains' mean target energy went below the real-data level Ē(x, y) (Fig. 5e's dashed line).

        Returns ``step`` (the first recorded step at which the mean of E(x, y) − Ē(x, y) over the chains is
        ≤ 0, None if it never was; row 0 counts, so a start already below gives step 0), ``gap`` (that mean at
        the last row), ``classes_below`` / ``n_classes`` (target classes whose chains' mean E(x, y) is below their
        Ē(x, y) at the last row) and ``below_now``. A chain far below Ē is past the energy of real images:
        typically too large a step size or too many steps (docs/METHODS.md)."""
        gap = self.reference_gap(reference, classes)
        hit = np.nonzero(gap <= 0)[0] if gap.size else np.zeros(0, int)
        cls = sorted({int(c) for c in self.labels}) if classes is None else [int(c) for c in classes]
        below = 0
        if self.n_rows:
            for c in cls:
                g = self.reference_gap(reference, [c])
                below += int(g.size > 0 and np.isfinite(g[-1]) and g[-1] < 0)
        return {"step": int(self.steps[hit[0]]) if hit.size else None,
                "gap": float(gap[-1]) if gap.size else float("nan"),
                "classes_below": below, "n_classes": len(cls), "below_now": bool(gap.size and gap[-1] < 0)}

    def to_energy_trace(self):
        """As a :class:`core.drift.EnergyTrace` (loss = cross-entropy = E(x,y) − E(x))."""
        return EnergyTrace(marginal=self.marginal, joint=self.joint, pred=self.pred(),
                           loss=(self.joint - self.marginal).astype(np.float32), labels=self.labels,
                           steps=self.steps, meta=dict(self.meta))

    def to_npz_dict(self) -> dict[str, np.ndarray]:
        return {"trace_steps": self.steps, "trace_joint": self.joint, "trace_joint_all": self.joint_all,
                "trace_marginal": self.marginal}


@dataclass
class StepOutput:
    images: torch.Tensor      # (N, C, H, W) float in [0, 1], on CPU
    trace: SGLDTrace          # rows of the steps made by this call
    steps_done: int           # chain length after the call
    seconds: float
    notes: list[str] = field(default_factory=list)  # e.g. out-of-memory retries with fewer chains at a time


# =============================================================================================
# Sampler
# =============================================================================================
class SGLDSampler:
    """SGLD with momentum (Eq. 7) over ``len(classes) × n_per_class`` chains, advanced step-wise.

    ``model`` is an ``nn.Module`` returning logits, or a ``LoadedModel`` (then the image shape and
    the number of classes come from its metadata). The model is put in eval mode with frozen
    parameters during each call and restored afterwards; it is never moved or modified.
    ``n_per_class`` may be one int or one int per class. ``eta``, ``zeta``, ``gamma`` left at None take
    :func:`sgld_defaults` of the model's dataset. ``stats`` (a :class:`ClassStats`) or
    ``dataset`` (training images; statistics are then computed/cached) is needed for the 'pca' and
    'gaussian' initialisations. The same seed gives identical chains on the same device, whatever
    the split of the steps into calls.

    Each step costs one forward and one backward pass: the gradient at the current images is
    computed together with their energies and kept for the next update.
    """

    def __init__(self, model, classes: Sequence[int], n_per_class: int | Sequence[int] = 8, init: str = "pca",
                 eta: float | None = None, zeta: float | None = None, gamma: float | None = None,
                 bound: tuple[str, float] | None = None, seed: int = 0, device: str | torch.device | None = None,
                 stats: ClassStats | None = None, *, dataset=None, pca_sigma: float = DEFAULT_PCA_SIGMA,
                 pca_variance: float | None = DEFAULTS["pca_variance"], pca_components: int | None = None,
                 gaussian_ridge: float = DEFAULTS["gaussian_ridge"], image_shape: Sequence[int] | None = None,
                 num_classes: int | None = None, x0: torch.Tensor | None = None,
                 trace_budget_bytes: int = 64 * 2 ** 20):
        meta = getattr(model, "meta", None)
        net = getattr(model, "model", model)
        if not isinstance(net, nn.Module):
            raise InputError("model must be a torch nn.Module (or a loaded EnergyLens model)")
        self.model = net
        # None: the default of the model's dataset family (sgld_defaults); without metadata, of the training images'
        known = meta.dataset if meta is not None and getattr(meta, "dataset", None) not in (None, "unknown") else \
            stats.dataset_name if stats is not None else getattr(dataset, "name", None)
        d = sgld_defaults(dataset=known)
        self.eta, self.zeta, self.gamma = validate_hyperparams(d["eta"] if eta is None else eta,
                                                               d["zeta"] if zeta is None else zeta,
                                                               d["gamma"] if gamma is None else gamma)
        self.bound = _validate_bound(bound)
        if init not in INITS:
            raise InputError(f"initialisation must be one of {', '.join(INITS)}, got '{init}'")
        self.init = init
        (self.pca_sigma, self.pca_variance, self.pca_components,
         self.gaussian_ridge) = _validate_init_params(pca_sigma, pca_variance, pca_components, gaussian_ridge)
        self._init_seed, self._noise_seed = _seeds(seed, 2)
        self.seed = int(seed)

        # ---- classes and chains ----------------------------------------------------------------
        classes = _validate_classes(classes)
        counts = [n_per_class] * len(classes) if np.ndim(n_per_class) == 0 else list(n_per_class)
        if len(counts) != len(classes):
            raise InputError("n_per_class must be one number or one number per class")
        counts = [_positive_int("chains per class", k) for k in counts]
        if sum(counts) > MAX_CHAINS:
            raise InputError(f"{sum(counts):,} chains at once is too many (max {MAX_CHAINS:,}); "
                             "use a batch job for large runs")
        self.classes, self.counts = classes, counts

        # ---- device, shape, number of classes ---------------------------------------------------
        p = next(iter(net.parameters()), None)
        model_dev = p.device if p is not None else torch.device("cpu")
        want = torch.device(device) if device is not None else model_dev
        if p is not None and (want.type != model_dev.type or want.index not in (None, model_dev.index)):
            raise InputError(f"the model is on {model_dev} but sampling was asked on {want}")
        self.device = model_dev if p is not None else want
        if stats is None and dataset is not None and init != "random":
            stats = ClassStats(dataset)
        self.stats = stats
        shape = image_shape or (tuple(meta.input_shape) if meta is not None and meta.input_shape else None) \
            or (stats.image_shape if stats is not None else None)
        if shape is None:
            raise InputError("the image shape is unknown: pass image_shape=(C, H, W) or a dataset")
        self.image_shape = tuple(int(s) for s in shape)
        if len(self.image_shape) != 3:
            raise InputError(f"image_shape must be (C, H, W), got {self.image_shape}")
        self.num_classes = int(num_classes) if num_classes else self._probe_num_classes(meta)
        bad = [c for c in classes if not 0 <= c < self.num_classes]
        if bad:
            raise InputError(f"class {bad[0]} does not exist: the model has {self.num_classes} classes "
                             f"(0-{self.num_classes - 1})")
        if init != "random" and x0 is None:
            if stats is None:
                raise InputError(f"the '{init}' initialisation needs the training images of the model's dataset "
                                 "(class statistics); none are available — use the 'random' initialisation")
            if tuple(stats.image_shape) != self.image_shape:
                raise InputError(f"the dataset's images are {stats.image_shape} but the model expects "
                                 f"{self.image_shape}")
        self.labels = torch.repeat_interleave(torch.tensor(classes), torch.tensor(counts)).to(self.device)
        self.pca_k: dict[int, int] = {}
        self._lock = threading.Lock()
        self._max_rows = int(max(16, min(20_000, trace_budget_bytes // max(1, self.n_chains * self.num_classes * 4))))
        self.custom_start = x0 is not None
        self.notes: list[str] = []       # what the sampler had to change (out of memory: fewer chains per pass)
        self._chunk: int | None = None   # chains per forward/backward pass (None = all), halved on out of memory
        self._progress: Progress | None = None
        self.x0 = self._check_x0(x0) if x0 is not None else self._draw_init()
        self.reset()

    # ---- public state ------------------------------------------------------------------------
    @property
    def n_chains(self) -> int:
        return int(sum(self.counts))

    @property
    def steps_done(self) -> int:
        return self._step

    def images(self) -> torch.Tensor:
        """Current images (N, C, H, W) on CPU."""
        return self.x.detach().to("cpu", copy=True)

    def config(self) -> dict[str, Any]:
        return {"classes": list(self.classes), "n_per_class": list(self.counts),
                "init": "given images" if self.custom_start else self.init,
                "eta": self.eta, "zeta": self.zeta, "gamma": self.gamma,
                "bound": list(self.bound) if self.bound else None, "seed": self.seed,
                "pca_sigma": self.pca_sigma, "pca_variance": self.pca_variance, "pca_components": self.pca_components,
                "pca_k": {str(c): k for c, k in self.pca_k.items()}, "gaussian_ridge": self.gaussian_ridge,
                "steps_done": self._step, "device": str(self.device)}

    def set_params(self, eta: float | None = None, zeta: float | None = None, gamma: float | None = None) -> None:
        """Change η, ζ, γ for the following steps (validated first; nothing changes on error)."""
        e, z, g = validate_hyperparams(self.eta if eta is None else eta, self.zeta if zeta is None else zeta,
                                       self.gamma if gamma is None else gamma)
        self.eta, self.zeta, self.gamma = e, z, g

    def reset(self) -> None:
        """Back to the initial images x₀ (v = 0, empty trace, noise stream restarted)."""
        if not self._lock.acquire(blocking=False):
            raise InputError("the sampler is busy with a run; wait for it or cancel it first")
        try:
            with eval_mode(self.model):
                logits, grad = self._energy_grad(self.x0)
            if not self._finite(logits, grad):
                raise InputError("the model returns NaN or infinite logits (or gradients) for the initial images")
            self._gen = torch.Generator(device=self.device).manual_seed(self._noise_seed)
            self.x = self.x0.clone()
            self.v = torch.zeros_like(self.x0)
            self._step = 0
            self._rows: list[tuple[int, torch.Tensor]] = []
            self._trace_cache: SGLDTrace | None = None
            self._grad = grad
            self._record(0, logits)
        finally:
            self._lock.release()

    @property
    def trace(self) -> SGLDTrace:
        """All recorded rows of the chain so far (row 0 = initialisation)."""
        if self._trace_cache is None:
            self._trace_cache = self._build_trace(self._rows)
        return self._trace_cache

    def step(self, n: int = 1, progress: Progress | None = None) -> StepOutput:
        """Advance every chain by ``n`` steps of Eq. 7.

        ``progress(fraction, message)`` is called about 4 times a second; if it raises (e.g. a
        cancel request), the chain keeps every step completed so far and the error propagates.
        Raises :class:`InputError` if the energies or gradients become NaN/inf; the chain then
        stays at its last finite state.
        """
        n = validate_steps(n)
        if not self._lock.acquire(blocking=False):
            raise InputError("the sampler is busy with another run; wait for it or cancel it")
        t0 = time.perf_counter()
        start = self._step
        notes_before = len(self.notes)
        self._progress = progress
        try:
            with eval_mode(self.model), torch.enable_grad():
                last_report = t0
                for i in range(n):
                    self._frac = i / n
                    self._one_step()
                    if progress is not None and (time.perf_counter() - last_report > 0.25 or i == n - 1):
                        last_report = time.perf_counter()
                        progress((i + 1) / n, f"step {self._step} ({i + 1}/{n})")
        finally:
            self._progress = None
            self._lock.release()
        rows = [r for r in self._rows if r[0] > start]
        return StepOutput(self.images(), self._build_trace(rows), self._step, time.perf_counter() - t0,
                          list(self.notes[notes_before:]))

    # ---- internals ---------------------------------------------------------------------------
    def _probe_num_classes(self, meta) -> int:
        if meta is not None and getattr(meta, "num_classes", None):
            return int(meta.num_classes)
        with eval_mode(self.model), torch.no_grad():
            out = self.model(torch.full((1, *self.image_shape), 0.5, device=self.device))
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise InputError("the model must return logits of shape (N, K)")
        return int(out.shape[1])

    def _check_x0(self, x0) -> torch.Tensor:
        if not isinstance(x0, torch.Tensor) or tuple(x0.shape) != (self.n_chains, *self.image_shape):
            raise InputError(f"start images must be a tensor of shape {(self.n_chains, *self.image_shape)}")
        x0 = x0.detach().float()
        if not torch.isfinite(x0).all() or x0.min() < 0 or x0.max() > 1:
            raise InputError("start images must be finite and lie in [0, 1]")
        return x0.to(self.device).clone()

    def _draw_init(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self._init_seed)
        parts = []
        for c, m in zip(self.classes, self.counts):
            if self.init == "random":
                parts.append(torch.rand(m, *self.image_shape, generator=g))
            elif self.init == "gaussian":
                parts.append(self.stats.sample_gaussian(c, m, self.gaussian_ridge, g))
            else:
                x, k = self.stats.sample_pca(c, m, self.pca_sigma, self.pca_variance, self.pca_components, g)
                self.pca_k[c] = k
                parts.append(x)
        return torch.cat(parts).to(self.device)

    def _energy_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at x and ∇ₓ Σ E(x, y). The caller holds eval_mode (frozen parameters).

        Out of memory: the chains are processed in two halves (then quarters, ...) from then on; chains are
        independent in eval mode, so the numbers do not change. Each reduction is noted and reported."""
        while True:
            chunk = self._chunk or len(x)
            try:
                parts = [self._energy_grad_part(x[i:i + chunk], self.labels[i:i + chunk])
                         for i in range(0, len(x), chunk)]
                break
            except Exception as e:  # noqa: BLE001 - only out-of-memory errors are handled
                if not is_oom_error(e):
                    raise
                if chunk <= 1:
                    raise InputError("out of memory even with one SGLD chain at a time: use fewer chains, a smaller "
                                     "model or the CPU") from e
            self._chunk = (chunk + 1) // 2  # outside the except block, so the failed attempt's tensors can be freed
            if x.is_cuda:
                torch.cuda.empty_cache()
            msg = f"out of memory: computing the energies {self._chunk} chains at a time (same results, slower)"
            self.notes.append(msg)
            log.warning(msg)
            if self._progress is not None:
                self._progress(getattr(self, "_frac", 0.0), msg)
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _energy_grad_part(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            logits = folded(self.model)(xr)  # BatchNorm folded: same function, cheaper input gradients
            e_xy = -logits.gather(1, labels[:, None]).squeeze(1)
            (grad,) = torch.autograd.grad(e_xy.sum(), xr)
        return logits.detach(), grad

    @staticmethod
    def _finite(logits: torch.Tensor, grad: torch.Tensor) -> bool:
        return bool(torch.isfinite(logits).all() and torch.isfinite(grad).all())

    def _one_step(self) -> None:
        v = self.v * self.zeta - (0.5 * self.eta) * self._grad if self.zeta else self._grad * (-0.5 * self.eta)
        x = self.x + v
        if self.gamma > 0:
            x = x + self.gamma * torch.randn(x.shape, generator=self._gen, device=self.device, dtype=x.dtype)
        x = project(x, self.x0, self.bound[1], self.bound[0]) if self.bound else x.clamp_(0.0, 1.0)
        logits, grad = self._energy_grad(x)
        if not self._finite(logits, grad):
            raise InputError(f"SGLD diverged at step {self._step + 1}: the energies or their gradients became NaN "
                             f"or infinite. The chain is kept at step {self._step}; lower η or γ.")
        self.x, self.v, self._grad = x, v, grad
        self._step += 1
        self._record(self._step, logits)

    def _record(self, step: int, logits: torch.Tensor) -> None:
        if len(self._rows) >= self._max_rows:  # thin: keep every other row (row 0 kept)
            self._rows = self._rows[::2]
        self._rows.append((step, logits))
        self._trace_cache = None

    def _build_trace(self, rows) -> SGLDTrace:
        n, k = self.n_chains, self.num_classes
        if not rows:
            return SGLDTrace(np.zeros(0, np.int64), np.zeros((0, n), np.float32), np.zeros((0, n, k), np.float32),
                             np.zeros((0, n), np.float32), self.labels.cpu().numpy(), {"sampler": self.config()})
        lg = torch.stack([r[1] for r in rows]).float()        # (S, N, K)
        joint_all = -lg
        joint = joint_all.gather(2, self.labels.view(1, -1, 1).expand(lg.shape[0], -1, 1)).squeeze(2)
        marginal = -torch.logsumexp(lg, dim=2)
        return SGLDTrace(steps=np.asarray([r[0] for r in rows], np.int64), joint=joint.cpu().numpy(),
                         joint_all=joint_all.cpu().numpy(), marginal=marginal.cpu().numpy(),
                         labels=self.labels.cpu().numpy(), meta={"sampler": self.config()})

    def to_npz_dict(self) -> dict[str, np.ndarray]:
        """Images (uint8 'x', loadable as an ``npz:`` dataset), labels, start images and the trace."""
        x = (self.images().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        x0 = (self.x0.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        d = {"x": x, "y": self.labels.cpu().numpy().astype(np.int64), "x0": x0,
             "x_float": self.images().numpy().astype(np.float32)}
        d.update(self.trace.to_npz_dict())
        return d

    # ---- save / restore (e.g. the dashboard keeps a session's chains across a page reload) -------
    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The whole chain state as numpy arrays + a JSON-able dict; :meth:`from_state` rebuilds the sampler.

        A restored sampler continues exactly as this one would (same images, velocity, trace and noise stream)."""
        with self._lock:
            arrays = {"x0": self.x0.detach().cpu().numpy(), "x": self.x.detach().cpu().numpy(),
                      "v": self.v.detach().cpu().numpy(), "grad": self._grad.detach().cpu().numpy(),
                      "row_steps": np.asarray([r[0] for r in self._rows], np.int64),
                      "row_logits": torch.stack([r[1] for r in self._rows]).float().cpu().numpy(),
                      "noise_state": self._gen.get_state().cpu().numpy()}
            meta = {**self.config(), "init": self.init, "custom_start": self.custom_start,
                    "image_shape": list(self.image_shape), "num_classes": self.num_classes}
        return arrays, meta

    @classmethod
    def from_state(cls, model, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> "SGLDSampler":
        """Rebuild a sampler saved by :meth:`state` for ``model`` (raises InputError when they do not fit)."""
        try:
            bound = tuple(meta["bound"]) if meta.get("bound") else None
            s = cls(model, meta["classes"], meta["n_per_class"], init="random", eta=meta["eta"], zeta=meta["zeta"],
                    gamma=meta["gamma"], bound=bound, seed=meta["seed"], image_shape=meta["image_shape"],
                    num_classes=meta["num_classes"], x0=torch.from_numpy(np.asarray(arrays["x0"], np.float32)))
            shape = tuple(s.x0.shape)
            x, v, g = (torch.from_numpy(np.asarray(arrays[k], np.float32)) for k in ("x", "v", "grad"))
            logits = torch.from_numpy(np.asarray(arrays["row_logits"], np.float32))
            steps = [int(t) for t in np.asarray(arrays["row_steps"])]
            if {tuple(x.shape), tuple(v.shape), tuple(g.shape)} != {shape} or len(steps) != len(logits) \
                    or logits.shape[1:] != (s.n_chains, s.num_classes) or not steps:
                raise InputError("the saved chain does not match its own shapes")
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"cannot restore the saved chains: {e}") from e
        s.init, s.custom_start = meta.get("init", "random"), bool(meta.get("custom_start", False))
        s.pca_k = {int(c): int(k) for c, k in (meta.get("pca_k") or {}).items()}
        s.x, s.v, s._grad = x.to(s.device), v.to(s.device), g.to(s.device)
        s._rows = [(t, lg.to(s.device)) for t, lg in zip(steps, logits)]
        s._step, s._trace_cache = steps[-1], None
        s._gen.set_state(torch.from_numpy(np.asarray(arrays["noise_state"], np.uint8)))
        return s


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


# =============================================================================================
# Background job: batch generation + metrics
# =============================================================================================
@dataclass
class SGLDJobConfig:
    """A batch generation run. ``model`` is a ModelRef as a dict (source, name, path, dataset,
    threat_model); ``metrics.features``: 'auto' (Inception-v3 when its weights are present, else a
    classifier) | 'inception' | 'classifier'; ``metrics.feature_model``: a ModelRef dict of the classifier
    whose features to use. Without one, an independent classifier of the same data
    (:func:`core.metrics.independent_classifier`), never the sampling model; when there is none (and no
    Inception), the metrics are skipped with a note saying why."""

    model: dict
    classes: list[int] | None = None          # None = every class of the model
    n_per_class: int = 100
    init: str = "pca"
    eta: float | None = None                  # None: sgld_defaults() of the model's dataset (set by run_job)
    zeta: float | None = None
    gamma: float | None = None
    steps: int = 100
    bound: list | None = None
    seed: int = 0
    pca_sigma: float = DEFAULT_PCA_SIGMA
    pca_variance: float | None = DEFAULTS["pca_variance"]
    pca_components: int | None = None
    gaussian_ridge: float = DEFAULTS["gaussian_ridge"]
    batch_size: int = 256
    device: str = "auto"
    metrics: dict = field(default_factory=dict)
    name: str | None = None                   # a label only (the jobs CLI may put it in the config)

    METRIC_KEYS = ("enabled", "features", "feature_model", "n_real", "kid_subset_size", "kid_subsets",
                   "is_splits", "lpips")

    @classmethod
    def from_dict(cls, d: dict) -> "SGLDJobConfig":
        if not isinstance(d, dict):
            raise InputError("the job configuration must be a dict")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown SGLD job settings: {', '.join(unknown)}")
        if "model" not in d:
            raise InputError("the SGLD job needs a 'model' (a model reference)")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> "SGLDJobConfig":
        d = DEFAULTS  # stand-ins for the settings left to the model's defaults, which are valid by construction
        validate_hyperparams(d["eta"] if self.eta is None else self.eta, d["zeta"] if self.zeta is None else self.zeta,
                             d["gamma"] if self.gamma is None else self.gamma)
        validate_steps(self.steps)
        _validate_bound(self.bound)
        _seeds(self.seed, 1)
        if self.init not in INITS:
            raise InputError(f"initialisation must be one of {', '.join(INITS)}")
        _validate_init_params(self.pca_sigma, self.pca_variance, self.pca_components, self.gaussian_ridge)
        if self.classes is not None:
            self.classes = _validate_classes(self.classes)
        for k in ("n_per_class", "batch_size"):
            _positive_int(k.replace("_", " "), getattr(self, k))
        if self.n_per_class > 100_000:
            raise InputError("at most 100,000 samples per class")
        if self.batch_size > MAX_CHAINS:
            raise InputError(f"batch size at most {MAX_CHAINS:,}")
        if not isinstance(self.metrics, dict):
            raise InputError("metrics settings must be a dict")
        bad = sorted(set(self.metrics) - set(self.METRIC_KEYS))
        if bad:
            raise InputError(f"unknown metric settings: {', '.join(bad)}")
        if self.metrics.get("features", "auto") not in ("auto", "inception", "classifier"):
            raise InputError("metrics.features must be 'auto', 'inception' or 'classifier'")
        for k in ("kid_subset_size", "kid_subsets", "is_splits", "n_real"):
            if self.metrics.get(k) is not None:
                _positive_int(f"metrics.{k}", self.metrics[k])
        if not isinstance(self.device, str):
            raise InputError("device must be 'auto', 'cpu' or 'cuda[:N]'")
        if not isinstance(self.model, dict) or "source" not in self.model or "name" not in self.model:
            raise InputError("model must be a model reference dict with at least 'source' and 'name'")
        return self


def _load_ref(d: dict, device: str):
    allowed = {"source", "name", "path", "dataset", "threat_model"}
    return load_model_ref(ModelRef(**{k: v for k, v in d.items() if k in allowed}), device=device)


def check_job_config(config: dict) -> None:
    """core.jobs' check of an SGLD batch job's config before it is queued (InputError naming the setting)."""
    SGLDJobConfig.from_dict(config).validate()


def run_job(config: dict, run_dir, report: Progress) -> dict:
    """Generate ``n_per_class`` samples for each class and score them.

    Writes ``<run_dir>/samples.npz`` (``x`` uint8 N x C x H x W, ``y``, final ``E_xy`` / ``E_x``,
    the mean energy curves; loadable as dataset ``npz:<path>``) and ``<run_dir>/metrics.json``
    (IS / FID / KID labelled with their feature extractor, energies vs the real-data reference).
    """
    cfg = SGLDJobConfig.from_dict(dict(config)).validate()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    device = str(resolve_device(cfg.device))
    report(0.0, "loading model and data")
    lm = _load_ref(cfg.model, device)
    meta = lm.meta
    d = sgld_defaults(lm)   # settings left out take the defaults of the model's dataset; the result records them
    cfg.eta, cfg.zeta, cfg.gamma = (d[k] if getattr(cfg, k) is None else getattr(cfg, k)
                                    for k in ("eta", "zeta", "gamma"))
    classes = list(range(meta.num_classes)) if cfg.classes is None else [int(c) for c in cfg.classes]
    ds = None
    try:
        ds = load_dataset(meta.dataset, "train")
    except DataError as e:
        if cfg.init != "random" or cfg.metrics.get("enabled", True):
            raise InputError(f"the training images of '{meta.dataset}' are needed: {e}") from e
    stats = ClassStats(ds) if ds is not None and cfg.init != "random" else None
    if stats is not None:
        stats.prepare(classes, lambda f, m: report(0.02 * f, m))

    labels_all = np.repeat(np.asarray(classes, np.int64), cfg.n_per_class)
    chunks = [labels_all[i:i + cfg.batch_size] for i in range(0, len(labels_all), cfg.batch_size)]
    seeds = _seeds(cfg.seed, len(chunks))
    total_steps = cfg.steps * len(chunks)
    gen_share = 0.85 if cfg.metrics.get("enabled", True) else 0.98
    xs, ys, finals_j, finals_m, curves = [], [], [], [], []
    job_notes: list[str] = []  # out-of-memory retries
    for ci, lab in enumerate(chunks):
        cls, cnt = np.unique(lab, return_counts=True)
        sampler = SGLDSampler(lm, cls.tolist(), cnt.tolist(), init=cfg.init, eta=cfg.eta, zeta=cfg.zeta,
                              gamma=cfg.gamma, bound=tuple(cfg.bound) if cfg.bound else None, seed=seeds[ci],
                              device=device, stats=stats, pca_sigma=cfg.pca_sigma, pca_variance=cfg.pca_variance,
                              pca_components=cfg.pca_components, gaussian_ridge=cfg.gaussian_ridge)
        done = ci * cfg.steps

        def prog(f, msg, done=done, ci=ci):
            report(0.02 + gen_share * (done + f * cfg.steps) / total_steps,
                   f"batch {ci + 1}/{len(chunks)}: {msg}")

        out = sampler.step(cfg.steps, prog)
        job_notes.extend(m for m in sampler.notes if m not in job_notes)
        xs.append(out.images)
        ys.append(sampler.labels.cpu())
        tr = sampler.trace
        finals_j.append(tr.joint[-1])
        finals_m.append(tr.marginal[-1])
        s = tr.summary()
        curves.append((tr.steps, s["target_mean"] * len(lab), s["others_mean"] * len(lab),
                       s["marginal_mean"] * len(lab), len(lab)))
    x = torch.cat(xs)
    y = torch.cat(ys)
    # mean curves over all chains (rows of all batches share the same steps)
    steps_axis = curves[0][0]
    w = sum(c[4] for c in curves)
    curve = {nm: sum(c[i] for c in curves) / w for i, nm in ((1, "target"), (2, "others"), (3, "marginal"))}
    e_xy, e_x = np.concatenate(finals_j), np.concatenate(finals_m)

    buf = io.BytesIO()
    np.savez_compressed(buf, x=(x.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), y=y.numpy(),
                        E_xy=e_xy, E_x=e_x, curve_steps=steps_axis, curve_target=curve["target"],
                        curve_others=curve["others"], curve_marginal=curve["marginal"])
    atomic_write_bytes(RunDir(run_dir).samples, buf.getvalue())

    result: dict[str, Any] = {
        "model": meta.name, "dataset": meta.dataset, "config": cfg.to_dict(), "n_samples": int(len(y)),
        "seconds_sampling": round(time.time() - t0, 3), "samples": str(RunDir(run_dir).samples),
        "energy": {"final_E_xy_mean": {str(c): float(e_xy[y.numpy() == c].mean()) for c in classes},
                   "final_E_x_mean": {str(c): float(e_x[y.numpy() == c].mean()) for c in classes},
                   "curve_steps": steps_axis.tolist(), "curve_target": curve["target"].tolist(),
                   "curve_others": curve["others"].tolist(), "curve_marginal": curve["marginal"].tolist()},
        "metrics": None,
    }
    if ds is not None:
        ref = reference_energies(lm, ds, classes, device=device)
        result["energy"]["reference_E_xy"] = {str(c): v["joint"] for c, v in ref.items()}
        result["energy"]["reference_E_x"] = {str(c): v["marginal"] for c, v in ref.items()}
        below = [c for c in classes if float(e_xy[y.numpy() == c].mean()) < ref[c]["joint"]]
        gap_curve = curve["target"] - float(np.mean([ref[int(c)]["joint"] for c in y.numpy()]))
        hit = np.nonzero(gap_curve <= 0)[0]
        result["energy"]["classes_below_reference"] = len(below)
        result["energy"]["reference_passed_at_step"] = int(steps_axis[hit[0]]) if hit.size else None
    if cfg.metrics.get("enabled", True):
        mc = cfg.metrics
        fm = mc.get("feature_model")
        features = mc.get("features", "auto")
        own_note = ("features from the generating model itself: SGLD optimises the samples for it, so these numbers "
                    "are optimistic (and a robust model's features barely tell images apart); choose another "
                    "classifier for a fairer score")
        clf = clf_name = None
        notes: list[str] = []
        inception_ok, inception_why = inception_status()
        if fm:   # chosen by the user
            flm = _load_ref(fm, device)
            clf, clf_name = flm.model, flm.meta.name or fm.get("name", "classifier")
            if flm.path is not None and lm.path is not None and Path(flm.path).resolve() == Path(lm.path).resolve():
                notes.append(own_note)
        elif features == "classifier" or (features == "auto" and not inception_ok):
            # never the generating model by default: an independent classifier of the same data
            pick = independent_classifier(meta, lm.path)
            if pick is not None:
                pref, pmeta = pick
                flm = _load_ref({"source": pref.source, "name": pref.name, "path": pref.path}, device)
                clf, clf_name = flm.model, pmeta.name or pref.name
                notes.append(f"features from {clf_name} ({pmeta.method}, {pmeta.dataset}), a classifier other than "
                             f"the generating model {meta.name}")
        if clf is None and (features == "classifier" or (features == "auto" and not inception_ok)):
            result["metrics"] = None
            result["metrics_note"] = (
                f"IS / FID / KID skipped: no feature extractor independent of {meta.name} is available for "
                f"'{meta.dataset}'. {inception_why.split(';')[0]}; or choose a classifier for the features "
                "(the generating model's own features are optimistic).")
        else:
            ext = choose_extractor(features, clf, clf_name or "classifier", device)
            if ext.label.startswith("classifier:"):
                ext.notes.extend(notes)
            sel = torch.nonzero(torch.isin(ds.y, torch.tensor(classes))).squeeze(1)
            n_real = mc.get("n_real")
            if n_real:
                g = torch.Generator().manual_seed(cfg.seed)
                sel = sel[torch.randperm(len(sel), generator=g)[:int(n_real)]].sort().values
            real, real_y = ds.images(sel), ds.y[sel]
            m = generation_metrics(
                x, real, ext, fake_labels=y.numpy(), real_labels=real_y.numpy(),
                is_splits=int(mc.get("is_splits", 10)), kid_subset_size=int(mc.get("kid_subset_size", 1000)),
                kid_subsets=int(mc.get("kid_subsets", 100)), seed=cfg.seed, lpips=bool(mc.get("lpips", False)),
                progress=lambda f, msg: report(0.02 + gen_share + (0.98 - gen_share) * f, msg))
            result["metrics"] = m
    result["notes"] = job_notes
    result["seconds"] = round(time.time() - t0, 3)
    atomic_write_json(RunDir(run_dir).sample_metrics, result)
    report(1.0, "done")
    # the registry keeps a compact copy; the curves stay in metrics.json / samples.npz
    compact = dict(result)
    compact["energy"] = {k: v for k, v in result["energy"].items() if not k.startswith("curve_")}
    return compact
