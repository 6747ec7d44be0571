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

**Stopping rule** (on by default, ``sgld_defaults()["stop_at_reference"]``): given the real images' Ē(x, y)
(``reference=`` or :meth:`SGLDSampler.set_reference`), each chain stops -- image and velocity frozen -- at the first
step at which its E(x, y) reaches its class's Ē(x, y), and a run ends once every chain has stopped. Without it the
chains overshoot Ē and the FID worsens (docs/METHODS.md, "SGLD stopping rule"); ``steps`` is then the run's cap.

:class:`SGLDSampler` is step-wise: ``step(n)`` continues the chain, returning the images and the
energies of every step (E(x, y) of the target class, E(x, y') of all classes, E(x)), which also
accumulate in ``.trace`` (Fig. 5e). :func:`reference_joint_energy` gives the reference level
Ē(x, y) of real training images. :func:`run_job` is the background-job entry point (batch
generation + IS/FID/KID).

The package, one job per module:

* :mod:`.defaults`  the step defaults per dataset family (:func:`sgld_defaults`, :func:`dataset_family`), the σ
  conversion and the validation of a sampler's / a job's settings;
* :mod:`.stats`     per-class PCA statistics of the training images (:class:`ClassStats`, cached on disk) and the
  reference energies Ē(x, y), Ē(x) of real images;
* :mod:`.sampler`   :class:`SGLDSampler`, its :class:`SGLDTrace` and :class:`StepOutput`;
* :mod:`.diversity` :func:`within_class_diversity`, the mean pairwise L2 distance within a class (next to FID);
* :mod:`.job`       the batch job (:class:`SGLDJobConfig`, :func:`check_job_config`, :func:`run_job`).

Every public name is re-exported here: ``from core.sampling import X`` and the stored runner path
``core.sampling:run_job`` keep working.
"""


from .defaults import (CIFAR_DEFAULTS, DEFAULT_PCA_SIGMA, DEFAULTS, DIGITS_DEFAULTS, INITS, MAX_CHAINS,
                       MAX_INTERACTIVE_CHAINS, MAX_STEPS, NORMS, STATS_VERSION, STOP_AT_REFERENCE, dataset_family,
                       sgld_defaults, sigma_from_official, validate_hyperparams, validate_sampler_settings,
                       validate_steps)
from .diversity import DIVERSITY_MAX_PER_CLASS, within_class_diversity
from .job import SGLDJobConfig, check_job_config, run_job
from .sampler import SGLDSampler, SGLDTrace, StepOutput
from .stats import (ClassMoments, ClassStats, Progress, dataset_fingerprint, default_cache_dir, reference_energies,
                    reference_joint_energy)

__all__ = [
    "INITS", "NORMS", "MAX_STEPS", "MAX_CHAINS", "DEFAULT_PCA_SIGMA", "DEFAULTS", "DIGITS_DEFAULTS", "CIFAR_DEFAULTS",
    "STATS_VERSION", "Progress",
    "dataset_family", "sgld_defaults", "sigma_from_official", "ClassMoments", "ClassStats", "dataset_fingerprint",
    "default_cache_dir",
    "SGLDTrace", "StepOutput", "SGLDSampler", "validate_hyperparams", "validate_steps", "validate_sampler_settings",
    "MAX_INTERACTIVE_CHAINS", "reference_energies",
    "reference_joint_energy", "SGLDJobConfig", "check_job_config", "run_job",
    "STOP_AT_REFERENCE", "within_class_diversity", "DIVERSITY_MAX_PER_CLASS",
]
