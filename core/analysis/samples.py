"""Fig. 5 b-d: per-sample margins, entropy and energies of one model, their correlations, and the per-class
statistics."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attacks import AttackSpec, run_attack
from ..data import validate_images
from ..energy import joint_energy, marginal_energy
from ..errors import InputError
from ..models import device_of
from ..runtime import eval_mode
from .common import Progress, _fast_layout


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


def model_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 128,
                 progress: Progress | None = None) -> torch.Tensor:
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
