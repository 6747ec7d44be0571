"""Robustness evaluation jobs (paper Table 1): natural accuracy, PGD-20 and AutoAttack.

``run_job(config, run_dir, report)`` is the job runner of kind 'eval'. ``config``:

=================  ==========================================================================
``model``          ModelRef fields: {"source", "name", "path", "dataset", "threat_model"}
                   (the same keys at the top level are accepted too)
``n``              number of test images (the first ``n`` of the split, as RobustBench does)
``split``          'test' (default) or 'train'
``norm``           'Linf' (default) or 'L2'
``eps``            budget; default: the dataset's (DatasetSpec.default_eps), 0.5 for L2,
                   the threat model's for zoo models
``pgd_steps``      20;  ``pgd_step_size``: default core.attacks.pgd_step_size(eps) (eps / 4)
``autoattack``     true; ``aa_version``: 'standard' (APGD-CE, APGD-T, FAB-T, Square) or 'custom'
                   with ``aa_attacks`` (a list of pyautoattack attack names)
``chunk_size``     images per chunk (resumability unit); ``batch_size`` for attacks
``seed``           seeds the attacks (chunk k uses seed * 1000 + k)
``device``         'auto' | 'cpu' | 'cuda[:N]'
=================  ==========================================================================

Resumable: images are processed in chunks; after every chunk the per-image results go to
``<run_dir>/partial.json`` (atomic write). A resumed job whose configuration and model file
are unchanged skips the finished chunks. The final record goes to ``<run_dir>/result.json``.

A point counts as robust only when it is correctly classified both naturally and after the
attack (as AutoAttack counts), so PGD and AA accuracy never exceed natural accuracy.

:func:`results_table` turns evaluation records into Table-1 rows (one per method; runs sharing a
configuration except the seed are grouped, mean ± std over seeds) with CSV / Markdown export.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from pyautoattack import AutoAttack

from .attacks import AttackSpec, pgd_step_size, run_attack
from .attacks.base import format_eps
from .cli import ArgumentParser, error_exit, parse_fraction
from .data import PAPER_EPS, check_image_count, dataset_spec, load_dataset, validate_images
from .errors import EnergyLensError, InputError
from .fingerprint import model_sha256
from .models import device_of
from .models.registry import ModelRef, load_model_ref
from .rundir import RunDir
from .runtime import eval_mode, is_oom_error
from .storage import atomic_write_json

__all__ = ["EVAL_DEFAULTS", "default_n", "resolve_config", "evaluate", "run_job", "load_partial", "results_table",
           "ResultsTable", "AA_ATTACKS", "default_eps"]

logging.getLogger("auto-attack").setLevel(logging.WARNING)

Progress = Callable[[float, str], None]
AA_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
AA_VERSIONS = ("standard", "plus", "rand", "custom")

EVAL_DEFAULTS: dict[str, Any] = {
    "n": 1000, "split": "test", "norm": "Linf", "eps": None, "pgd_steps": 20, "pgd_step_size": None,
    "autoattack": True, "aa_version": "standard", "aa_attacks": None, "chunk_size": 200, "batch_size": 200,
    "seed": 0, "device": "auto",
}
DEFAULT_L2_EPS = 0.5


def default_n(n_available: int | None = None) -> int:
    """The number of images an evaluation takes by default: ``EVAL_DEFAULTS['n']``, or the whole split when it is
    smaller (``n_available``: its size, when known). What the Evaluation page and the sweep panel show."""
    n = int(EVAL_DEFAULTS["n"])
    return min(n, int(n_available)) if n_available else n


EVAL_HELP = {  # the command line's help text of each EVAL_DEFAULTS key (python -m core evaluate)
    "n": "number of test images (the first n of the split)", "split": "split the images come from",
    "norm": "threat model", "eps": "budget, e.g. 8/255 (default: the dataset's; 0.5 for L2; a zoo model's own)",
    "pgd_steps": "PGD steps", "pgd_step_size": "PGD step, e.g. 2/255 (default: eps / 4, core.attacks.pgd_step_size)",
    "autoattack": "run AutoAttack", "aa_version": "AutoAttack version", "aa_attacks": "custom AutoAttack: "
    "comma-separated attacks", "chunk_size": "images per chunk (the resume unit)", "batch_size": "attack batch size",
    "seed": "seed of the attacks (chunk k: seed * 1000 + k)", "device": "'auto', 'cpu' or 'cuda[:N]'"}
EVAL_CHOICES = {"split": ("test", "train"), "norm": ("Linf", "L2"), "aa_version": AA_VERSIONS}
MAX_EVAL_SEED = 1_000_000  # chunk seeds seed * 1000 + k stay below 2**32 (AttackSpec's limit)
# keys that do not change the numbers (ignored when checking whether partial results can be resumed)
_NOT_RESULT_KEYS = {"device", "batch_size"}


def _noop(_f: float, _m: str = "") -> None:
    return None


# ---------------------------------------------------------------------------------------------
def _model_ref_dict(config: dict) -> dict:
    names = [f.name for f in fields(ModelRef)]
    src = config.get("model") if isinstance(config.get("model"), dict) else config
    ref = {k: src.get(k) for k in names if src.get(k) is not None}
    if not ref.get("source") or not ref.get("name"):
        raise InputError("the evaluation config needs a model: {'model': {'source': ..., 'name': ..., 'path': ...}}")
    return ref


def resolve_config(config: dict, meta=None, n_available: int | None = None) -> dict:
    """Fill defaults (eps from the dataset / threat model, PGD step eps/4) and validate. ``n_available``: the
    size of the split the images come from, when known (``n`` must not exceed it)."""
    unknown = sorted(set(config) - set(EVAL_DEFAULTS) - {"model", "source", "name", "path", "dataset", "threat_model"})
    if unknown:
        raise InputError(f"unknown evaluation option(s): {', '.join(unknown)}")
    cfg = {**EVAL_DEFAULTS, **{k: v for k, v in config.items() if k in EVAL_DEFAULTS and v is not None}}
    if cfg["norm"] not in ("Linf", "L2"):
        raise InputError(f"norm must be 'Linf' or 'L2', got '{cfg['norm']}'")
    if cfg["split"] not in ("test", "train"):
        raise InputError(f"split must be 'test' or 'train', got '{cfg['split']}'")
    for k in ("n", "pgd_steps", "chunk_size", "batch_size"):
        v = cfg[k]
        if isinstance(v, bool) or int(v) != v or v <= 0:
            raise InputError(f"{k.replace('_', ' ')} must be a positive integer, got {v}")
        cfg[k] = int(v)
    if isinstance(cfg["seed"], bool) or int(cfg["seed"]) != cfg["seed"] or not 0 <= cfg["seed"] <= MAX_EVAL_SEED:
        raise InputError(f"seed must be an integer in [0, {MAX_EVAL_SEED:,}] (chunk k is attacked with seed "
                         f"* 1000 + k), got {cfg['seed']!r}")
    cfg["seed"] = int(cfg["seed"])
    if cfg["eps"] is None:
        cfg["eps"] = default_eps(meta, cfg["norm"])
    cfg["eps"] = float(cfg["eps"])
    if not math.isfinite(cfg["eps"]) or cfg["eps"] < 0:
        raise InputError(f"epsilon must be a finite number >= 0, got {format_eps(cfg['eps'], cfg['norm'])}")
    if cfg["pgd_step_size"] is None:
        cfg["pgd_step_size"] = pgd_step_size(cfg["eps"])
    cfg["pgd_step_size"] = float(cfg["pgd_step_size"])
    if cfg["autoattack"]:
        if cfg["aa_version"] not in AA_VERSIONS:
            raise InputError(f"AutoAttack version must be one of {AA_VERSIONS}")
        if cfg["aa_version"] == "custom":
            atk = list(cfg["aa_attacks"] or [])
            bad = [a for a in atk if a not in AA_ATTACKS]
            if not atk or bad:
                raise InputError(f"custom AutoAttack needs a list of attacks from {AA_ATTACKS}"
                                 + (f"; unknown: {', '.join(bad)}" if bad else ""))
            cfg["aa_attacks"] = atk
        else:
            cfg["aa_attacks"] = None
    if n_available is not None:
        check_image_count(cfg["n"], n_available, split=cfg["split"], dataset=getattr(meta, "dataset", None))
    return cfg


def default_eps(meta, norm: str = "Linf") -> float:
    """The evaluation budget: 0.5 for L2, the zoo threat model's, else the dataset's default."""
    if norm == "L2":
        return DEFAULT_L2_EPS
    if meta is not None and getattr(meta, "source", None) == "zoo":
        e = (meta.hparams or {}).get("eps")
        if e:
            return float(e)

    try:
        return float(dataset_spec(meta.dataset).default_eps) if meta is not None else PAPER_EPS
    except EnergyLensError:
        return PAPER_EPS


def _fingerprint(cfg: dict, model_sha: str, n_images: int) -> str:
    blob = json.dumps({"cfg": {k: v for k, v in cfg.items() if k not in _NOT_RESULT_KEYS}, "model": model_sha,
                       "n_images": n_images, "v": 1}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_partial(run_dir: str | Path) -> dict | None:
    p = Path(run_dir) / "partial.json"
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) and isinstance(d.get("chunks"), dict) else None


# ---------------------------------------------------------------------------------------------
def _halving(fn: Callable[[int], Any], batch_size: int, what: str, notes: list[str] | None,
             progress: Callable[[str], None] | None = None) -> Any:
    """``fn(batch_size)``, retried with half the batch size after an out-of-memory error (as run_attack does),
    each retry noted in ``notes`` and told to ``progress``; InputError when even a batch of 1 does not fit."""

    bs = int(batch_size)
    while True:
        try:
            return fn(bs)
        except Exception as e:  # noqa: BLE001 - only out-of-memory errors are handled
            if not is_oom_error(e):
                raise
            if bs <= 1:
                raise InputError(f"out of memory during {what} even with batch size 1: evaluate fewer or smaller "
                                 "images, or use the CPU") from e
        bs = max(1, bs // 2)  # outside the except block, so the failed attempt's tensors can be freed
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        msg = f"out of memory during {what}: retrying with batch size {bs}"
        if notes is not None and msg not in notes:
            notes.append(msg)
        if progress is not None:
            progress(msg)


def _natural_correct(model, x, y, batch_size: int, notes: list[str] | None = None,
                     progress: Callable[[str], None] | None = None) -> torch.Tensor:
    dev = device_of(model)

    def run(bs: int) -> torch.Tensor:
        logits = []
        with eval_mode(model), torch.no_grad():
            for i in range(0, len(x), bs):
                logits.append(model(x[i:i + bs].to(dev)).float().cpu())
        return torch.cat(logits)

    logits = _halving(run, batch_size, "the natural forward pass", notes, progress)
    finite = torch.isfinite(logits).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten()
        raise InputError(f"the model returns NaN or infinite logits for {len(bad)} of {len(x)} images (e.g. image "
                         f"{int(bad[0])}): accuracies would be meaningless (argmax of NaN). Its weights may be corrupt "
                         "(NaN) or overflow: check the checkpoint.")
    return logits.argmax(1) == y


class _AALogForward(logging.Handler):
    """Forwards pyautoattack's DEBUG progress lines ('running apgd-t', 'robust accuracy after ...')."""

    def __init__(self, callback: Callable[[str], None]):
        super().__init__(logging.DEBUG)
        self.callback = callback

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith(("running ", "robust accuracy after", "initial accuracy")):
            try:
                self.callback(msg)
            except Exception:  # noqa: BLE001 - progress must never break the attack
                pass


def _autoattack_correct(model, x, y, cfg: dict, seed: int, on_message: Callable[[str], None] | None = None,
                        notes: list[str] | None = None) -> torch.Tensor:
    return _halving(lambda bs: _autoattack_run(model, x, y, {**cfg, "batch_size": bs}, seed, on_message),
                    min(cfg["batch_size"], len(x)), "AutoAttack", notes, on_message)


def _autoattack_run(model, x, y, cfg: dict, seed: int, on_message: Callable[[str], None] | None = None
                    ) -> torch.Tensor:
    dev = device_of(model)
    version = cfg["aa_version"]
    kw = {"attacks": list(cfg["aa_attacks"])} if version == "custom" else {}
    with eval_mode(model):
        aa = AutoAttack(model, norm=cfg["norm"], eps=cfg["eps"], version=version, device=dev, seed=seed, **kw)
        if version == "custom":  # constructor defaults are 5 restarts; standard uses 1
            aa.apgd.n_restarts = 1
            aa.fab.n_restarts = 1
        logger = logging.getLogger("auto-attack")
        handler = _AALogForward(on_message) if on_message is not None else None
        old_level = logger.level
        if handler is not None:
            logger.addHandler(handler)
            logger.setLevel(logging.DEBUG)
            logger.propagate = False
        try:
            _, y_adv = aa.run_standard_evaluation(x.to(dev), y.to(dev), batch_size=min(cfg["batch_size"], len(x)))
        finally:
            if handler is not None:
                logger.removeHandler(handler)
                logger.setLevel(old_level)
                logger.propagate = True
    return y_adv.cpu() == y


def evaluate(lm, x: torch.Tensor, y: torch.Tensor, config: dict, *, run_dir: str | Path | None = None,
             progress: Progress | None = None, model_sha: str | None = None) -> dict:
    """Evaluate ``lm`` (a LoadedModel) on images ``x`` / labels ``y`` chunk by chunk.

    With ``run_dir`` the per-chunk results go to ``partial.json`` after every chunk and finished chunks
    are skipped when called again with the same configuration and model. Returns the accuracies and
    the per-image correctness vectors.
    """


    progress = progress or _noop
    cfg = resolve_config(config, lm.meta)
    x = validate_images(x)
    y = torch.as_tensor(y).long().reshape(-1)
    if y.numel() != x.shape[0]:
        raise InputError(f"got {y.numel()} labels for {x.shape[0]} images")
    n = len(y)
    sha = model_sha or model_sha256(lm)
    fp = _fingerprint(cfg, sha, n)
    chunks: dict[str, dict] = {}
    resumed = 0
    if run_dir is not None:
        part = load_partial(run_dir)
        if part is not None and part.get("fingerprint") == fp:
            chunks = dict(part["chunks"])
            resumed = len(chunks)
    bounds = [(s, min(s + cfg["chunk_size"], n)) for s in range(0, n, cfg["chunk_size"])]
    t_start = time.time()
    model = lm.model
    notes: list[str] = []  # out-of-memory retries, non-finite logits
    for k, (s, e) in enumerate(bounds):
        key = str(k)
        if key in chunks and chunks[key].get("start") == s and chunks[key].get("end") == e:
            continue
        t0 = time.time()
        xb, yb = x[s:e], y[s:e]
        base = k / len(bounds)
        width = 1 / len(bounds)

        def sub(f, msg="", base=base, width=width, k=k):
            progress(base + width * (0.05 + 0.45 * min(max(f, 0.0), 1.0)), f"chunk {k + 1}/{len(bounds)}: {msg}")

        nat = _natural_correct(model, xb, yb, cfg["batch_size"], notes,
                               lambda m, b=base, k=k: progress(b, f"chunk {k + 1}/{len(bounds)}: {m}"))
        spec = AttackSpec("pgd", norm=cfg["norm"], eps=cfg["eps"], steps=cfg["pgd_steps"],
                          step_size=cfg["pgd_step_size"], random_start=True, seed=cfg["seed"] * 1000 + k,
                          batch_size=cfg["batch_size"])
        if cfg["eps"] > 0:
            res = run_attack(model, xb, yb, spec, progress=sub, num_classes=int(lm.meta.num_classes))
            tr = res.trace
            notes.extend(m for m in res.notes if m not in notes)
            # a point whose adversarial logits are NaN/inf is not counted as robust (its argmax means nothing)
            pgd = nat & torch.from_numpy((tr.pred[-1] == tr.labels) & np.isfinite(tr.marginal[-1]))
        else:
            pgd = nat.clone()
        aa = None
        if cfg["autoattack"]:
            progress(base + width * 0.55, f"chunk {k + 1}/{len(bounds)}: AutoAttack ({cfg['aa_version']})")
            tag = f"chunk {k + 1}/{len(bounds)}: AutoAttack"
            aa = (nat & _autoattack_correct(model, xb, yb, cfg, cfg["seed"] * 1000 + k,
                                            on_message=lambda m, b=base, w=width, t=tag: progress(b + w * 0.6, f"{t}: {m}"),
                                            notes=notes)
                  ) if cfg["eps"] > 0 else nat
        chunks[key] = {"start": s, "end": e, "nat": nat.int().tolist(), "pgd": pgd.int().tolist(),
                       "aa": None if aa is None else aa.int().tolist(), "seconds": time.time() - t0}
        if run_dir is not None:
            atomic_write_json(Path(run_dir) / "partial.json",
                              {"fingerprint": fp, "config": cfg, "model_sha": sha, "n": n, "chunks": chunks})
        done = sum(c["end"] - c["start"] for c in chunks.values())
        nat_so_far = sum(sum(c["nat"]) for c in chunks.values()) / max(done, 1)
        pgd_so_far = sum(sum(c["pgd"]) for c in chunks.values()) / max(done, 1)
        progress((k + 1) / len(bounds), f"{done}/{n} images: natural {nat_so_far:.1%}, PGD-{cfg['pgd_steps']} "
                 f"{pgd_so_far:.1%}")
    order = [chunks[str(k)] for k in range(len(bounds))]
    nat_v = np.concatenate([c["nat"] for c in order]).astype(bool)
    pgd_v = np.concatenate([c["pgd"] for c in order]).astype(bool)
    aa_v = np.concatenate([c["aa"] for c in order]).astype(bool) if cfg["autoattack"] else None
    return {
        "config": cfg, "model_sha": sha, "n": n, "natural_acc": float(nat_v.mean()), "pgd_acc": float(pgd_v.mean()),
        "aa_acc": None if aa_v is None else float(aa_v.mean()), "natural_correct": nat_v, "pgd_correct": pgd_v,
        "aa_correct": aa_v, "chunks": len(bounds), "chunks_resumed": resumed, "notes": notes,
        "seconds": float(sum(c.get("seconds", 0.0) for c in order)), "wall_seconds": time.time() - t_start,
    }


_TRAIN_KEYS_IGNORED = {"seed", "out_dir", "name", "resume", "device", "data_root", "amp", "channels_last",
                       "snapshot_every", "eval_samples", "probe_size", "eval_steps", "exclude_indices_file"}


def check_job_config(config: dict) -> None:
    """core.jobs' check of an evaluation job's config before it is queued (InputError naming the setting)."""
    resolve_config(config)


def run_job(config: dict, run_dir: Path, report: Progress) -> dict:
    """Job runner (kind 'eval'). Returns the evaluation record (also written to ``result.json``)."""
    ref = ModelRef(**_model_ref_dict(config))
    device = config.get("device") or "auto"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    report(0.0, f"loading {ref.name}")
    lm = load_model_ref(ref, device=device)
    cfg = resolve_config({k: v for k, v in config.items() if k in EVAL_DEFAULTS}, lm.meta)
    ds = load_dataset(lm.meta.dataset, cfg["split"])
    check_image_count(cfg["n"], len(ds), split=cfg["split"], dataset=lm.meta.dataset)
    idx = torch.arange(cfg["n"])
    x, y = ds.images(idx), ds.labels(idx)
    sha = model_sha256(lm)
    res = evaluate(lm, x, y, cfg, run_dir=run_dir, progress=report, model_sha=sha)
    hp = dict(lm.meta.hparams or {})
    record = {
        "model": asdict(ref), "model_name": lm.meta.name or ref.name, "method": lm.meta.method,
        "source": ref.source, "dataset": lm.meta.dataset, "arch": lm.meta.arch, "model_sha": sha,
        "train_config": {k: v for k, v in hp.items() if k not in ("loss",)},
        "train_seed": hp.get("seed"), "config": res["config"], "n": res["n"],
        "natural_acc": res["natural_acc"], "pgd_acc": res["pgd_acc"], "aa_acc": res["aa_acc"],
        "seconds": res["seconds"], "chunks_resumed": res["chunks_resumed"], "finished": time.time(),
        "notes": res["notes"],
    }
    RunDir(run_dir).write_result(record)
    report(1.0, f"natural {record['natural_acc']:.1%}, PGD-{cfg['pgd_steps']} {record['pgd_acc']:.1%}"
           + (f", AA {record['aa_acc']:.1%}" if record["aa_acc"] is not None else ""))
    return record


# ---------------------------------------------------------------------------------------------
# Table 1
# ---------------------------------------------------------------------------------------------
PRETTY_METHODS = {"plain": "Standard (no AT)", "sat": "SAT", "trades": "TRADES", "mart": "MART",
                  "mail-trades": "MAIL-TRADES", "weat-nat": "WEAT-NAT", "weat-adv": "WEAT-ADV"}


def _method_label(rec: dict) -> str:
    m = str(rec.get("method") or "unknown")
    if m in ("zoo", "unknown", "uploaded"):
        return str(rec.get("model_name") or (rec.get("model") or {}).get("name") or m)
    return PRETTY_METHODS.get(m, m.upper())


def _group_key(rec: dict) -> str:
    cfg = {k: v for k, v in (rec.get("config") or {}).items() if k not in _NOT_RESULT_KEYS | {"seed", "chunk_size"}}
    train = {k: v for k, v in (rec.get("train_config") or {}).items() if k not in _TRAIN_KEYS_IGNORED}
    ident = {"label": _method_label(rec), "dataset": rec.get("dataset"), "arch": rec.get("arch"), "eval": cfg,
             "train": train}
    if not train and rec.get("method") not in ("zoo",):
        ident["model_sha"] = rec.get("model_sha")  # unknown provenance: only the same weights group together
    return json.dumps(ident, sort_keys=True, default=str)


def _fmt(mean: float | None, std: float | None, runs: int) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if runs > 1 else "")


@dataclass
class ResultsTable:
    """Table-1 rows: ``rows`` hold numbers (fractions) and formatted strings (percent, mean ± std)."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    COLUMNS = ("method", "dataset", "arch", "eps", "runs", "natural", "pgd", "aa")
    NUMERIC = ("natural_mean", "natural_std", "pgd_mean", "pgd_std", "aa_mean", "aa_std")

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def to_csv(self) -> str:
        buf = io.StringIO()
        cols = list(self.COLUMNS) + list(self.NUMERIC) + ["seeds"]
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in self.rows:
            w.writerow({**r, "seeds": " ".join(str(s) for s in r.get("seeds", []))})
        return buf.getvalue()

    def to_markdown(self) -> str:
        head = ["Method", "Dataset", "Arch", "ε", "Runs", "Natural", "PGD", "AA"]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 4 + ["--:"] * 4) + "|"]
        for r in self.rows:
            cells = [str(r["method"]), str(r["dataset"]), str(r["arch"]), str(r["eps"]), str(r["runs"]),
                     r["natural"], r["pgd"], r["aa"]]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return "\n".join(lines) + "\n"


def _eps_label(cfg: dict) -> str:
    e = cfg.get("eps")
    if e is None:
        return "—"
    if cfg.get("norm", "Linf") == "Linf":
        v = e * 255
        return f"{v:.4g}/255"
    return f"{e:g} (L2)"


def results_table(records: Sequence[dict]) -> ResultsTable:
    """Group evaluation records sharing a configuration except the seed(s); one row per group with the
    mean ± std (over runs) of natural, PGD and AA accuracy. Rows are sorted by dataset, then AA (or PGD)
    accuracy. Labels that occur in several groups get the differing settings appended."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        if not isinstance(r, dict) or r.get("natural_acc") is None:
            continue
        groups.setdefault(_group_key(r), []).append(r)
    rows = []
    for key, recs in groups.items():
        ident = json.loads(key)

        def stat(k):
            v = [float(x[k]) for x in recs if x.get(k) is not None]
            if not v:
                return None, None
            return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0

        nm, ns = stat("natural_acc")
        pm, ps = stat("pgd_acc")
        am, as_ = stat("aa_acc")
        cfg = recs[0].get("config") or {}
        k = len(recs)
        rows.append({
            "method": ident["label"], "dataset": ident.get("dataset") or "—", "arch": ident.get("arch") or "—",
            "eps": _eps_label(cfg), "runs": k, "natural": _fmt(nm, ns, k), "pgd": _fmt(pm, ps, k), "aa": _fmt(am, as_, k),
            "natural_mean": nm, "natural_std": ns, "pgd_mean": pm, "pgd_std": ps, "aa_mean": am, "aa_std": as_,
            "seeds": sorted({x.get("train_seed") for x in recs if x.get("train_seed") is not None}),
            "_train": ident.get("train") or {}, "_eval": ident.get("eval") or {},
        })
    # disambiguate duplicate labels with the settings that differ between them
    by_label: dict[tuple, list[dict]] = {}
    for r in rows:
        by_label.setdefault((r["method"], r["dataset"]), []).append(r)
    for same in by_label.values():
        if len(same) < 2:
            continue
        keys = sorted({k for r in same for k in list(r["_train"]) + list(r["_eval"])})
        for r in same:
            diff = []
            for k in keys:
                vals = {json.dumps(x["_train"].get(k, x["_eval"].get(k)), default=str) for x in same}
                if len(vals) > 1:
                    diff.append(f"{k}={r['_train'].get(k, r['_eval'].get(k))}")
            if diff:
                r["method"] = f"{r['method']} ({', '.join(diff[:3])})"
    for r in rows:
        r.pop("_train")
        r.pop("_eval")
    rows.sort(key=lambda r: (r["dataset"], -(r["aa_mean"] if r["aa_mean"] is not None else r["pgd_mean"] or 0.0),
                             r["method"]))
    return ResultsTable(rows)


# ---------------------------------------------------------------------------------------------
def build_parser(prog: str = "python -m core.evaluation") -> ArgumentParser:
    """``python -m core evaluate``: evaluate one model in the foreground into a run folder (as an 'eval' job does)."""
    p = ArgumentParser(prog=prog, description="Evaluate a model: natural, PGD and AutoAttack accuracy (Table 1).")
    p.add_argument("--config", help="JSON file with the evaluation config (command-line flags override it)")
    p.add_argument("--out-dir", required=True, help="folder for partial.json (resume) and result.json")
    for k, what in (("source", "model source: bundled, local or zoo"), ("name", "model name"),
                    ("path", "checkpoint file (bundled / local)"), ("dataset", "zoo: the model's dataset"),
                    ("threat_model", "zoo: the model's threat model")):
        p.add_argument("--" + k.replace("_", "-"), dest=k, help=what)
    for k, default in EVAL_DEFAULTS.items():
        flag, text = "--" + k.replace("_", "-"), EVAL_HELP[k] + ("" if default is None else f" [default: {default}]")
        if isinstance(default, bool):
            p.add_argument(flag, dest=k, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif k in ("eps", "pgd_step_size"):
            p.add_argument(flag, dest=k, type=lambda v, _k=k: parse_fraction(v, _k.replace("_", " ")), default=None,
                           help=text, metavar="NUMBER")
        elif k == "aa_attacks":
            p.add_argument(flag, dest=k, type=lambda v: [a.strip() for a in v.split(",") if a.strip()], default=None,
                           help=text + f" (from: {', '.join(AA_ATTACKS)})")
        else:
            p.add_argument(flag, dest=k, type=int if isinstance(default, int) else str, default=None, help=text,
                           choices=EVAL_CHOICES.get(k))
    return p


def main(argv: list[str] | None = None, prog: str = "python -m core.evaluation") -> int:
    """A bad setting ends with one line ``error: <message>`` on stderr, exit status 2."""
    try:
        args = vars(build_parser(prog).parse_args(argv))
        config: dict = {}
        cfg_path = args.pop("config")
        if cfg_path:
            try:
                config = json.loads(Path(cfg_path).read_text())
            except (OSError, ValueError) as e:
                raise InputError(f"cannot read the config file {cfg_path}: {e}") from e
        if not isinstance(config, dict):
            raise InputError("the config file must hold a JSON object of evaluation options")
        out = Path(args.pop("out_dir"))
        config = {**config, **{k: v for k, v in args.items() if v is not None}}
        for k in ("eps", "pgd_step_size"):   # a config file may write them as fractions too
            if config.get(k) is not None:
                config[k] = parse_fraction(config[k], k.replace("_", " "))
        rec = run_job(config, out, lambda f, m: print(f"{f:4.0%} {m}", file=sys.stderr, flush=True))
    except EnergyLensError as e:
        return error_exit(e)
    print(json.dumps({k: rec.get(k) for k in ("model_name", "n", "natural_acc", "pgd_acc", "aa_acc")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
