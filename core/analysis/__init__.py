"""Analyses across models and samples, one job per module:

* :mod:`.landscape`  Fig. 4: :func:`landscape` attacks every model on the same images and returns the signed drifts
  Delta E(x) = E(x) - E(x*) and Delta E(x, y) = E(x, y) - E(x*, y) with natural and robust accuracy.
  Results are cached on disk per (model file SHA-256, attack spec, N, seed, images) under
  ``<repo>/checkpoints/cache/landscape/`` as ``.npz`` (never pickle); a changed model file has a
  different hash, so stale results are never reused. :func:`run_landscape_job` is the job runner.
* :mod:`.trend`      Fig. 4's trend as a test that can fail: :func:`robustness_trend` (Spearman with an exact
  permutation p-value and a bootstrap interval over the images; "not enough models to tell" otherwise) and the
  order among the robust models alone (:func:`robust_order`, SEs from the image counts).
* :mod:`.samples`    Fig. 5 b-d: :func:`sample_stats`, :func:`margin_correlations`, :func:`per_class_stats`.
* :mod:`.subsets`    Fig. 5a: :func:`select_subsets` picks the three same-size training subsets;
  :func:`run_subset_job` / :func:`launch_subset_jobs` retrain without each of them (jobs of kind
  'train' with ``exclude_indices_file``) and :func:`subset_comparison` compares their PGD error.
* :mod:`.embeddings` :func:`extract_features` (penultimate features through a hook on the input of the last
  ``nn.Linear`` that runs, or logits), :func:`pca_2d` (instant) and :func:`umap_2d` (umap imported
  lazily; :func:`warm_umap` triggers numba's JIT once per process).
* :mod:`.common`     what they share (the progress type, a model's name, the CPU image layout).

The symmetric-log axis of the figures (``symlog``, ``symlog_ticks``) is drawing, not analysis: it lives in
``dashboard/axes.py``.

Every public name is re-exported here, so ``from core.analysis import X`` and the runner paths stored with jobs
(``core.analysis:run_landscape_job``, ``core.analysis:run_subset_job``) keep working. This package never imports
streamlit.
"""

from ..fingerprint import file_sha256, model_sha256, weights_sha256
from .common import Progress
from .embeddings import (UMAP_FIT_1000_FALLBACK_S, UMAP_FIT_EXPONENT, UMAP_WARMUP_FALLBACK_S, extract_features, pca_2d,
                         preimport_umap_dependencies, record_umap_timing, stack_groups, start_umap_warmup, umap_2d,
                         umap_estimate, umap_state, umap_timings, warm_umap)
from .landscape import (DRIFT_MAX_IMAGES, LandscapeResult, default_cache_dir, describe_ref, drift_summary, landscape,
                        landscape_table, load_landscape_results, robustness_trend, run_landscape_job, sample_images,
                        save_landscape_results, validate_landscape_request)
from .samples import (Correlation, PerClassStats, SampleStats, correlation, entropy, margin_correlations, model_logits,
                      per_class_stats, probabilistic_margin, sample_stats, sample_stats_from_logits)
from .subsets import (SUBSET_LABELS, SUBSETS, SubsetSelection, base_train_config, compute_subset_selection,
                      launch_subset_jobs, run_subset_job, select_subsets, subset_comparison, subset_train_configs,
                      validate_subset_request, write_subset_files)
from .trend import TREND_RULE, bootstrap_spearman, permutation_p_value, rank_trend, robust_order, spearman, trend_text

__all__ = [
    "Progress",
    "LandscapeResult", "landscape", "drift_summary", "DRIFT_MAX_IMAGES", "landscape_table", "robustness_trend",
    "TREND_RULE", "permutation_p_value", "bootstrap_spearman", "rank_trend", "robust_order", "spearman", "trend_text",
    "default_cache_dir", "model_sha256", "weights_sha256", "file_sha256", "describe_ref", "validate_landscape_request",
    "sample_images", "load_landscape_results", "save_landscape_results", "run_landscape_job",
    "SampleStats", "Correlation", "PerClassStats", "probabilistic_margin", "entropy", "correlation",
    "sample_stats", "sample_stats_from_logits", "model_logits", "margin_correlations", "per_class_stats",
    "SUBSETS", "SUBSET_LABELS", "SubsetSelection", "select_subsets", "compute_subset_selection", "write_subset_files",
    "base_train_config", "validate_subset_request",
    "subset_train_configs", "launch_subset_jobs", "run_subset_job", "subset_comparison",
    "extract_features", "stack_groups", "pca_2d", "umap_2d", "warm_umap", "umap_state", "umap_estimate",
    "umap_timings", "start_umap_warmup", "preimport_umap_dependencies", "record_umap_timing",
    "UMAP_WARMUP_FALLBACK_S", "UMAP_FIT_1000_FALLBACK_S", "UMAP_FIT_EXPONENT",
]
