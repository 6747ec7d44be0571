"""Fig. 5a: the subset-removal experiment. Three same-size training subsets chosen with a robust model's E(x)
(high-energy, low-energy, misclassified), one retraining job (kind 'train', ``exclude_indices_file``) without each,
and the comparison of their PGD error; the background job (kind 'subset') that selects and launches them."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from .. import jobs
from ..errors import EnergyLensError, InputError
from ..models.checkpoint import LoadedModel
from ..models.registry import load_model_ref
from ..rundir import RunDir
from ..runtime import resolve_device
from ..storage import atomic_write_json
from ..train import TrainConfig, load_splits
from .common import Progress, _model_ref
from .samples import sample_stats

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
