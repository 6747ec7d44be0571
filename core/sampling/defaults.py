"""SGLD defaults (per dataset family) and the validation of sampler / job settings. See the package doc for
the meaning of η, ζ, γ and the initialisations."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..data import DATASETS
from ..errors import InputError

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
# ``steps``: the page's "Run N steps" and the batch job's length; ``stop_at_reference``: each chain stops where its
# E(x, y) reaches the real images' Ē(x, y) of its class (docs/METHODS.md, "SGLD stopping rule")
STOP_AT_REFERENCE = True
DIGITS_DEFAULTS = {"eta": 1.0, "zeta": 0.5, "gamma": 0.001, "steps": 100, "stop_at_reference": STOP_AT_REFERENCE,
                   **_INIT_DEFAULTS}
CIFAR_DEFAULTS = {"eta": 0.025, "zeta": 0.8, "gamma": 0.001, "steps": 100, "stop_at_reference": STOP_AT_REFERENCE,
                  **_INIT_DEFAULTS}
_FAMILY_DEFAULTS = {"digits": DIGITS_DEFAULTS, "cifar": CIFAR_DEFAULTS}
DEFAULTS = CIFAR_DEFAULTS    # for a model whose dataset is unknown


def dataset_family(dataset: str | None) -> str:
    """The SGLD default set of a dataset: its catalogue entry's ``sgld_family`` (core.data.DatasetSpec: 'digits'
    for the embedded digits, 'cifar' for natural photos); names not in the catalogue ('digits…' variants aside,
    ``npz:`` files, unknown names) are natural images: 'cifar'."""
    name = str(dataset or "").strip().lower()
    if name in DATASETS:
        return DATASETS[name].sgld_family
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
