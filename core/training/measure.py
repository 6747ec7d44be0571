"""What a training run measures after every epoch: natural / PGD accuracy on held-out images, and the
natural vs adversarial energies of the probe set of training images (Delta E, paper Fig. 1 b-d, Fig. 3)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..attacks import AttackSpec, run_attack
from ..models import device_of
from ..runtime import eval_mode
from .config import MEASURE_SHARE, PROBE_MAX, PROBE_PER_CLASS_MIN, PROBE_SHARE

__all__ = ["evaluate", "auto_probe_size", "probe_energies", "quantile_stats", "auto_measure_every", "measure_due",
           "estimate_eval_time", "measurement_cost"]


def evaluate(model, x: torch.Tensor, y: torch.Tensor, eps: float, step: float, steps: int, batch_size: int = 256,
             norm: str = "Linf", num_classes: int | None = None) -> dict:
    """Natural and PGD accuracy (eval mode). With an attack, both come from its trace: the natural accuracy from
    the forward that also gives the natural energies (step 0), the PGD accuracy from the final one."""
    if eps > 0:
        spec = AttackSpec("pgd", norm=norm, eps=eps, step_size=step, steps=steps, batch_size=batch_size, seed=0)
        tr = run_attack(model, x, y, spec, num_classes=num_classes).trace
        return {"nat_acc": tr.natural_accuracy(), "pgd_acc": tr.robust_accuracy()}
    with eval_mode(model), torch.no_grad():
        dev = device_of(model)
        pred = torch.cat([model(x[i:i + batch_size].to(dev)).argmax(1).cpu() for i in range(0, len(x), batch_size)])
    acc = float((pred == y).float().mean())
    return {"nat_acc": acc, "pgd_acc": acc}


def auto_probe_size(n_train: int, num_classes: int) -> int:
    """Default probe-set size: 3% of the training set, at least 4 images per class, at most 256.

    The probe attack costs about as much per image as a training step, so 3% keeps Delta E probing
    near 3% of the epoch (bench/bench_train.py); 256 images (a 50k CIFAR-10 epoch) already pin the mean
    Delta E to a few thousandths, and the per-class floor keeps the arrows of every class on tiny sets.
    """
    n = max(PROBE_PER_CLASS_MIN * num_classes, round(PROBE_SHARE * n_train))
    return int(min(PROBE_MAX, n, n_train))


def probe_energies(model, x, y, eps: float, step: float, steps: int, inner: str,
                   num_classes: int | None = None) -> dict[str, np.ndarray]:
    """Natural vs adversarial energies of the probe set under the training attack (its inner loss, budget, step
    and number of steps)."""
    name = "trades-kl" if inner == "kl" else "pgd"
    spec = AttackSpec(name, eps=eps, step_size=step, steps=steps, seed=0, batch_size=256)
    tr = run_attack(model, x, y, spec, num_classes=num_classes).trace
    return {"e_nat": tr.marginal[0], "e_adv": tr.marginal[-1], "ej_nat": tr.joint[0], "ej_adv": tr.joint[-1],
            "correct_nat": (tr.pred[0] == tr.labels), "correct_adv": (tr.pred[-1] == tr.labels)}


def quantile_stats(v: np.ndarray, prefix: str) -> dict:
    q = np.quantile(v, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {f"{prefix}_mean": float(v.mean()), f"{prefix}_std": float(v.std()),
            **{f"{prefix}_q{int(p * 100)}": float(x) for p, x in zip([0.1, 0.25, 0.5, 0.75, 0.9], q)}}



def auto_measure_every(train_s: float, eval_s: float, probe_s: float, epochs: int,
                       share: float = MEASURE_SHARE) -> int:
    """The evaluation period k (epochs) that keeps the measurement of an average epoch -- the evaluation every k
    epochs (``eval_s`` / k) plus the probe every epoch (``probe_s``) -- at most ``share`` of that epoch's time
    (``train_s`` + measurement), from the costs measured on one epoch. 1 when evaluating every epoch fits; at most
    ``epochs`` (then only the first and the last epoch are evaluated)."""
    epochs = max(1, int(epochs))
    budget = share / (1.0 - share) * max(float(train_s), 0.0) - max(float(probe_s), 0.0)
    eval_s = max(float(eval_s), 0.0)
    if eval_s <= budget:
        return 1
    if budget <= 0:
        return epochs
    return int(min(epochs, max(1, math.ceil(eval_s / budget))))


def estimate_eval_time(probe_s: float, probe_images: int, probe_steps: int, eval_images: int,
                       eval_steps: int) -> float:
    """The seconds the held-out evaluation would take, from the measured seconds of the probe attack: both are
    gradient attacks through the same code on the same model, so their cost goes with images x (steps + 1) (the
    trace's natural and final forwards together cost about one step). The probe's smaller batches cost more per
    image, so this errs towards a longer evaluation (a longer period)."""
    work = lambda n, s: max(int(n), 0) * (max(int(s), 0) + 1)  # noqa: E731
    return float(probe_s) * work(eval_images, eval_steps) / max(work(probe_images, probe_steps), 1)


def measure_due(epoch: int, epochs: int, every: int | None) -> bool:
    """Whether epoch ``epoch`` (from 1) evaluates the held-out images: every ``every`` epochs and at the last.
    ``every`` None (auto, not chosen yet: the first epoch of a run) evaluates only when it is the last; the first
    epoch's training and probe times choose the period (:func:`auto_measure_every`, :func:`estimate_eval_time`)."""
    return epoch == epochs if every is None else (epoch == epochs or epoch % int(every) == 0)


def measurement_cost(records) -> dict | None:
    """What measuring cost a run, from its metrics records: the evaluation period ``every`` (None when not
    recorded), the mean seconds of a training epoch (``train_s``), of one held-out evaluation (``eval_s``, None
    before the first; else the first epoch's estimate in ``eval_estimate_s``), of the probe (``probe_s``), and
    the measurement's share of an average epoch at that period (``share``). None without records."""
    recs = [r for r in records if isinstance(r, dict) and isinstance(r.get("train_time"), (int, float))]
    if not recs:
        return None
    mean = lambda v: float(np.mean(v)) if v else None  # noqa: E731
    train_s = mean([float(r["train_time"]) for r in recs])
    evals = [float(r["eval_time"]) for r in recs if isinstance(r.get("eval_time"), (int, float))]
    probe_s = mean([float(r.get("probe_time", 0.0)) - float(r.get("eval_time", 0.0)) for r in recs])
    every = next((int(r["measure_every"]) for r in reversed(recs) if isinstance(r.get("measure_every"), int)), None)
    est = next((float(r["eval_time_estimate"]) for r in recs if isinstance(r.get("eval_time_estimate"), (int, float))),
               None)
    eval_s = mean(evals)
    per_eval = eval_s if eval_s is not None else est
    share = None
    if per_eval is not None and every:
        m = per_eval / every + (probe_s or 0.0)
        share = m / (train_s + m) if train_s + m > 0 else None
    return {"every": every, "train_s": train_s, "eval_s": eval_s, "eval_estimate_s": est, "probe_s": probe_s,
            "share": share}
