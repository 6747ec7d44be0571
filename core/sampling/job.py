"""The SGLD batch job (kind 'sgld'): generate samples for every class and score them (IS / FID / KID)."""

from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import load_dataset
from ..errors import DataError, InputError
from ..metrics import choose_extractor, generation_metrics, inception_status, independent_classifier
from ..models.registry import ModelRef, load_model_ref
from ..rundir import RunDir
from ..runtime import resolve_device
from ..storage import atomic_write_bytes, atomic_write_json
from .defaults import (DEFAULT_PCA_SIGMA, DEFAULTS, INITS, MAX_CHAINS, _positive_int, _seeds, _validate_bound,
                       _validate_classes, _validate_init_params, sgld_defaults, validate_hyperparams, validate_steps)
from .diversity import within_class_diversity
from .sampler import SGLDSampler
from .stats import ClassStats, Progress, reference_energies


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
    steps: int | None = None                  # None: sgld_defaults()["steps"] of the model's dataset
    stop_at_reference: bool | None = None     # None: the default (on): each chain stops where E(x, y) reaches Ē(x, y)
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
        if self.steps is not None:
            validate_steps(self.steps)
        if self.stop_at_reference is not None and not isinstance(self.stop_at_reference, bool):
            raise InputError(f"stop_at_reference must be true or false, got {self.stop_at_reference!r}")
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


def _on_axis(steps: np.ndarray, values: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """``values`` recorded at ``steps``, read at every step of ``axis`` (the last value carried forward)."""
    i = np.clip(np.searchsorted(steps, axis, side="right") - 1, 0, len(steps) - 1)
    return np.asarray(values)[i]


def _load_ref(d: dict, device: str):
    allowed = {"source", "name", "path", "dataset", "threat_model"}
    return load_model_ref(ModelRef(**{k: v for k, v in d.items() if k in allowed}), device=device)


def check_job_config(config: dict) -> None:
    """core.jobs' check of an SGLD batch job's config before it is queued (InputError naming the setting)."""
    SGLDJobConfig.from_dict(config).validate()


def _score_samples(cfg: SGLDJobConfig, lm, ds, x: torch.Tensor, y: torch.Tensor, classes: list[int], device: str,
                   progress: Progress) -> tuple[dict | None, str | None]:
    """IS / FID / KID of the generated images ``x`` (labels ``y``) against the real images of ``classes``:
    (metrics, None), or (None, the reason) when no feature extractor independent of the generating model exists.

    The features: the classifier the user chose (``metrics.feature_model``); else Inception-v3 when asked for or, with
    'auto', when its weights are present; else an independent classifier of the same data, never the sampling model.
    """
    meta = lm.meta
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
        return None, (f"IS / FID / KID skipped: no feature extractor independent of {meta.name} is available for "
                      f"'{meta.dataset}'. {inception_why.split(';')[0]}; or choose a classifier for the features "
                      "(the generating model's own features are optimistic).")
    ext = choose_extractor(features, clf, clf_name or "classifier", device)
    if ext.label.startswith("classifier:"):
        ext.notes.extend(notes)
    sel = torch.nonzero(torch.isin(ds.y, torch.tensor(classes))).squeeze(1)
    n_real = mc.get("n_real")
    if n_real:
        g = torch.Generator().manual_seed(cfg.seed)
        sel = sel[torch.randperm(len(sel), generator=g)[:int(n_real)]].sort().values
    real, real_y = ds.images(sel), ds.y[sel]
    return generation_metrics(
        x, real, ext, fake_labels=y.numpy(), real_labels=real_y.numpy(), is_splits=int(mc.get("is_splits", 10)),
        kid_subset_size=int(mc.get("kid_subset_size", 1000)), kid_subsets=int(mc.get("kid_subsets", 100)),
        seed=cfg.seed, lpips=bool(mc.get("lpips", False)), progress=progress), None


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
    cfg.eta, cfg.zeta, cfg.gamma, cfg.steps, cfg.stop_at_reference = (
        d[k] if getattr(cfg, k) is None else getattr(cfg, k) for k in ("eta", "zeta", "gamma", "steps",
                                                                        "stop_at_reference"))
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
    # Ē(x, y) of the real images: the stopping rule's target and the reference of the result
    ref = reference_energies(lm, ds, classes, device=device) if ds is not None else None
    job_notes: list[str] = []  # out-of-memory retries, the stopping rule without a reference
    if cfg.stop_at_reference and ref is None:
        job_notes.append("the stopping rule needs Ē(x, y) of real images, and none are available: every chain ran "
                         f"all {cfg.steps} steps")

    labels_all = np.repeat(np.asarray(classes, np.int64), cfg.n_per_class)
    chunks = [labels_all[i:i + cfg.batch_size] for i in range(0, len(labels_all), cfg.batch_size)]
    seeds = _seeds(cfg.seed, len(chunks))
    total_steps = cfg.steps * len(chunks)
    gen_share = 0.85 if cfg.metrics.get("enabled", True) else 0.98
    xs, ys, finals_j, finals_m, curves, stops = [], [], [], [], [], []
    for ci, lab in enumerate(chunks):
        cls, cnt = np.unique(lab, return_counts=True)
        sampler = SGLDSampler(lm, cls.tolist(), cnt.tolist(), init=cfg.init, eta=cfg.eta, zeta=cfg.zeta,
                              gamma=cfg.gamma, bound=tuple(cfg.bound) if cfg.bound else None, seed=seeds[ci],
                              device=device, stats=stats, pca_sigma=cfg.pca_sigma, pca_variance=cfg.pca_variance,
                              pca_components=cfg.pca_components, gaussian_ridge=cfg.gaussian_ridge,
                              reference=ref, stop_at_reference=cfg.stop_at_reference)
        done = ci * cfg.steps

        def prog(f, msg, done=done, ci=ci):
            report(0.02 + gen_share * (done + f * cfg.steps) / total_steps,
                   f"batch {ci + 1}/{len(chunks)}: {msg}")

        out = sampler.step(cfg.steps, prog)
        job_notes.extend(m for m in sampler.notes if m not in job_notes)
        xs.append(out.images)
        ys.append(sampler.labels.cpu())
        tr = sampler.trace
        stops.append(sampler.stopped_at)
        finals_j.append(tr.joint[-1])
        finals_m.append(tr.marginal[-1])
        s = tr.summary()
        curves.append((tr.steps, s["target_mean"] * len(lab), s["others_mean"] * len(lab),
                       s["marginal_mean"] * len(lab), len(lab)))
    x = torch.cat(xs)
    y = torch.cat(ys)
    # mean curves over all chains on the longest batch's steps: a batch whose chains all stopped early ended there,
    # and its frozen chains keep their last energies (carried forward)
    steps_axis = max((c[0] for c in curves), key=len)
    w = sum(c[4] for c in curves)
    curve = {nm: sum(_on_axis(c[0], c[i], steps_axis) for c in curves) / w
             for i, nm in ((1, "target"), (2, "others"), (3, "marginal"))}
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
    stopped_at = np.concatenate(stops)
    hit = stopped_at[stopped_at >= 0]
    result["stop"] = {"rule": "off" if not cfg.stop_at_reference else "on" if ref is not None else "on, no Ē(x, y)",
                      "stopped": int(len(hit)), "n_chains": int(len(stopped_at)),
                      "median_step": float(np.median(hit)) if len(hit) else None,
                      "steps_run": int(steps_axis[-1])}
    result["diversity"] = {"samples": within_class_diversity(x, y)["mean"]}
    if ref is not None:
        result["energy"]["reference_E_xy"] = {str(c): v["joint"] for c, v in ref.items()}
        result["energy"]["reference_E_x"] = {str(c): v["marginal"] for c, v in ref.items()}
        below = [c for c in classes if float(e_xy[y.numpy() == c].mean()) < ref[c]["joint"]]
        gap_curve = curve["target"] - float(np.mean([ref[int(c)]["joint"] for c in y.numpy()]))
        hit = np.nonzero(gap_curve <= 0)[0]
        result["energy"]["classes_below_reference"] = len(below)
        result["energy"]["reference_passed_at_step"] = int(steps_axis[hit[0]]) if hit.size else None
    if ds is not None:
        sel = torch.nonzero(torch.isin(ds.y, torch.tensor(classes))).squeeze(1)
        result["diversity"]["real"] = within_class_diversity(ds.x[sel], ds.y[sel], seed=cfg.seed)["mean"]
    if cfg.metrics.get("enabled", True):
        result["metrics"], note = _score_samples(
            cfg, lm, ds, x, y, classes, device, lambda f, msg: report(0.02 + gen_share + (0.98 - gen_share) * f, msg))
        if note is not None:
            result["metrics_note"] = note
        if result["metrics"] is not None:   # within-class diversity next to FID (samples vs real images)
            result["metrics"]["diversity"] = result["diversity"]["samples"]
            result["metrics"]["diversity_real"] = result["diversity"].get("real")
    result["notes"] = job_notes
    result["seconds"] = round(time.time() - t0, 3)
    atomic_write_json(RunDir(run_dir).sample_metrics, result)
    report(1.0, "done")
    # the registry keeps a compact copy; the curves stay in metrics.json / samples.npz
    compact = dict(result)
    compact["energy"] = {k: v for k, v in result["energy"].items() if not k.startswith("curve_")}
    return compact
