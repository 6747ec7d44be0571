"""EnergyTrace: how energies drift along an attack or a sampling chain.

A trace records, for every step s = 0..S and every sample i, the marginal energy E(x_s), the joint
energy E(x_s, y) of the true label (and of the target label for targeted runs), the predicted
class and the loss. Step 0 is always the natural point. Every figure of the Attack Lab (Fig. 1
arrows, Fig. 1a step curve, Fig. 2 histograms) and every Delta E is derived from it. An attack's
trace also records which images the attack changed (``perturbed``, x* != x):
:meth:`EnergyTrace.delta_summary` gives the mean Delta E over those and over all images.

Recording is designed to reuse logits the attack already computed: ``record`` takes logits and
keeps them on their device without synchronising; everything is moved to CPU once, in
``finish``.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .data import validate_images
from .energy import joint_energy, marginal_energy
from .errors import InputError
from .models import device_of
from .runtime import eval_mode

__all__ = ["EnergyTrace", "TraceRecorder"]


@dataclass
class EnergyTrace:
    """Per-step, per-sample energies. Arrays have shape (S+1, N); step 0 is natural."""

    marginal: np.ndarray                 # E(x_s)
    joint: np.ndarray                    # E(x_s, y) for the true label y
    pred: np.ndarray                     # argmax f(x_s)
    loss: np.ndarray                     # the attack's per-sample objective at x_s (NaN if n/a)
    labels: np.ndarray                   # (N,) true labels
    steps: np.ndarray                    # (S+1,) attack step index of every row
    targets: np.ndarray | None = None    # (N,) target labels of a targeted run
    joint_target: np.ndarray | None = None  # E(x_s, t) for the target label
    meta: dict[str, Any] = field(default_factory=dict)
    perturbed: np.ndarray | None = None  # (N,) bool: x* differs from x (None: not recorded, e.g. SGLD chains)

    # ---- shape helpers -------------------------------------------------------------------
    @property
    def n_samples(self) -> int:
        return int(self.marginal.shape[1])

    @property
    def n_steps(self) -> int:
        """Number of attack steps S (rows minus the natural row)."""
        return int(self.marginal.shape[0] - 1)

    # ---- end points ----------------------------------------------------------------------
    def natural(self) -> dict[str, np.ndarray]:
        return {"marginal": self.marginal[0], "joint": self.joint[0], "pred": self.pred[0]}

    def final(self) -> dict[str, np.ndarray]:
        return {"marginal": self.marginal[-1], "joint": self.joint[-1], "pred": self.pred[-1]}

    def delta_marginal(self) -> np.ndarray:
        """Delta E(x) = E(x) - E(x*) per sample."""
        return self.marginal[0] - self.marginal[-1]

    def delta_joint(self) -> np.ndarray:
        """Delta E(x, y) = E(x, y) - E(x*, y) per sample."""
        return self.joint[0] - self.joint[-1]

    def perturbed_mask(self) -> np.ndarray:
        """(N,) bool: the images the attack changed (x* != x). All True when that was not recorded."""
        if self.perturbed is None:
            return np.ones(self.n_samples, dtype=bool)
        return np.asarray(self.perturbed, dtype=bool)

    def delta_summary(self) -> dict[str, float | int]:
        """Mean Delta E(x) and Delta E(x, y) over the perturbed images and over all images.

        AutoAttack's components (pyautoattack) return an image unchanged when it is already misclassified
        or when the attack fails on it, so its Delta E is exactly 0 and a mean over all images mixes "no
        attack" with the drift of the attacked ones; PGD, by contrast, moves every image. The mean over the
        perturbed images (x* != x) compares like with like; ``n_perturbed`` says how many there are. Means
        over no images are NaN.
        """
        mask = self.perturbed_mask()
        dm, dj = self.delta_marginal().astype(np.float64), self.delta_joint().astype(np.float64)
        k = int(mask.sum())
        nan = float("nan")
        return {
            "n": self.n_samples,
            "n_perturbed": k,
            "dE_mean": float(dm[mask].mean()) if k else nan,
            "dEy_mean": float(dj[mask].mean()) if k else nan,
            "dE_mean_all": float(dm.mean()) if self.n_samples else nan,
            "dEy_mean_all": float(dj.mean()) if self.n_samples else nan,
        }

    def drift_length(self) -> np.ndarray:
        """Euclidean length of each arrow in the (E(x), E(x,y)) plane (Fig. 1 colour)."""
        return np.hypot(self.marginal[-1] - self.marginal[0], self.joint[-1] - self.joint[0])

    def natural_accuracy(self) -> float:
        return float((self.pred[0] == self.labels).mean()) if self.n_samples else float("nan")

    def robust_accuracy(self) -> float:
        return float((self.pred[-1] == self.labels).mean()) if self.n_samples else float("nan")

    def target_success(self) -> float | None:
        """Fraction of samples classified as their target at the end of a targeted run.

        Samples whose true label already is the target (possible with a chosen target class) are
        left out: they count as neither success nor failure."""
        if self.targets is None or not self.n_samples:
            return None
        valid = self.labels != self.targets
        if not valid.any():
            return None
        return float((self.pred[-1][valid] == self.targets[valid]).mean())

    def step_statistics(self, which: str = "marginal") -> dict[str, np.ndarray]:
        """Mean, std and quartiles of an energy over samples at every step (Fig. 1a)."""
        a = {"marginal": self.marginal, "joint": self.joint}.get(which)
        if a is None:
            raise InputError(f"unknown energy '{which}': use 'marginal' or 'joint'")
        return {
            "step": self.steps,
            "mean": a.mean(axis=1),
            "std": a.std(axis=1),
            "q25": np.quantile(a, 0.25, axis=1),
            "q75": np.quantile(a, 0.75, axis=1),
        }

    def concat(self, other: "EnergyTrace") -> "EnergyTrace":
        """Join two traces over samples (same steps), e.g. the batches of one run."""
        if self.marginal.shape[0] != other.marginal.shape[0]:
            raise InputError("cannot join traces with different numbers of steps")

        def cat(a, b, axis=1):
            return None if a is None or b is None else np.concatenate([a, b], axis=axis)

        return EnergyTrace(
            marginal=cat(self.marginal, other.marginal),
            joint=cat(self.joint, other.joint),
            pred=cat(self.pred, other.pred),
            loss=cat(self.loss, other.loss),
            labels=cat(self.labels, other.labels, 0),
            steps=self.steps,
            targets=cat(self.targets, other.targets, 0),
            joint_target=cat(self.joint_target, other.joint_target),
            meta=dict(self.meta),
            perturbed=cat(self.perturbed, other.perturbed, 0),
        )

    # ---- export --------------------------------------------------------------------------
    def to_rows(self) -> list[dict[str, Any]]:
        """Long format: one row per (step, sample)."""
        rows = []
        for s in range(self.marginal.shape[0]):
            for i in range(self.n_samples):
                row = {
                    "step": int(self.steps[s]),
                    "sample": i,
                    "label": int(self.labels[i]),
                    "E_x": float(self.marginal[s, i]),
                    "E_xy": float(self.joint[s, i]),
                    "pred": int(self.pred[s, i]),
                    "loss": float(self.loss[s, i]),
                }
                if self.targets is not None:
                    row["target"] = int(self.targets[i])
                    row["E_xt"] = float(self.joint_target[s, i]) if self.joint_target is not None else float("nan")
                rows.append(row)
        return rows

    def to_csv(self, context: dict[str, Any] | None = None) -> str:
        """The rows of :meth:`to_rows` as CSV; ``context`` (e.g. model, attack, ε) becomes leading columns
        repeated on every row, so an exported file says what it is."""
        rows = self.to_rows()
        if context:
            rows = [{**context, **r} for r in rows]
        buf = io.StringIO()
        if rows:
            w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)
        return buf.getvalue()

    def to_npz_dict(self) -> dict[str, np.ndarray]:
        d = {k: getattr(self, k) for k in ("marginal", "joint", "pred", "loss", "labels", "steps")}
        if self.targets is not None:
            d["targets"] = self.targets
        if self.joint_target is not None:
            d["joint_target"] = self.joint_target
        if self.perturbed is not None:
            d["perturbed"] = self.perturbed
        return d

    @classmethod
    def from_npz_dict(cls, d: dict[str, np.ndarray], meta: dict | None = None) -> "EnergyTrace":
        return cls(
            marginal=np.asarray(d["marginal"]), joint=np.asarray(d["joint"]), pred=np.asarray(d["pred"]),
            loss=np.asarray(d["loss"]), labels=np.asarray(d["labels"]), steps=np.asarray(d["steps"]),
            targets=np.asarray(d["targets"]) if "targets" in d else None,
            joint_target=np.asarray(d["joint_target"]) if "joint_target" in d else None,
            meta=dict(meta or {}),
            perturbed=np.asarray(d["perturbed"], dtype=bool) if "perturbed" in d else None,
        )


class TraceRecorder:
    """Accumulates logits step by step and builds an :class:`EnergyTrace` at the end.

    ``record(step, logits, loss=None)`` stores detached energies on the logits' device (no host
    sync); ``finish()`` stacks and copies them to numpy once, rows in step order (a step may be recorded
    late: the attacks record the natural step 0 with their final forward).
    """

    def __init__(self, labels: torch.Tensor, targets: torch.Tensor | None = None, meta: dict | None = None):
        self.labels = labels.detach().long()
        self.targets = None if targets is None else targets.detach().long()
        self.meta = dict(meta or {})
        self._steps: list[int] = []
        self._marg: list[torch.Tensor] = []
        self._joint: list[torch.Tensor] = []
        self._jt: list[torch.Tensor] = []
        self._pred: list[torch.Tensor] = []
        self._loss: list[torch.Tensor | None] = []

    def record(self, step: int, logits: torch.Tensor, loss: torch.Tensor | None = None) -> None:
        with torch.no_grad():
            lg = logits.detach()
            self._steps.append(int(step))
            self._marg.append(marginal_energy(lg))
            if not self._steps[:-1]:  # first record: check the labels against the logits once (a host sync)
                self._joint.append(joint_energy(lg, self.labels))
                if self.targets is not None:
                    self._jt.append(joint_energy(lg, self.targets))
            else:  # later records: the same checked labels, no sync
                lf = lg.float()
                self._joint.append(-lf.gather(1, self.labels.unsqueeze(1)).squeeze(1))
                if self.targets is not None:
                    self._jt.append(-lf.gather(1, self.targets.unsqueeze(1)).squeeze(1))
            self._pred.append(lg.argmax(dim=1))
            self._loss.append(None if loss is None else loss.detach().float().reshape(-1))

    def finish(self) -> EnergyTrace:
        if not self._steps:
            raise InputError("no step was recorded")
        n = self.labels.numel()
        order = sorted(range(len(self._steps)), key=self._steps.__getitem__)  # stable: equal steps keep their order
        losses = [torch.full((n,), float("nan"), device=self._marg[0].device) if l is None else l for l in self._loss]
        def to_np(ts, dt=np.float32):
            return torch.stack([ts[i] for i in order]).cpu().numpy().astype(dt, copy=False)

        return EnergyTrace(
            marginal=to_np(self._marg),
            joint=to_np(self._joint),
            pred=to_np(self._pred, np.int64),
            loss=to_np(losses),
            labels=self.labels.cpu().numpy(),
            steps=np.asarray([self._steps[i] for i in order], dtype=np.int64),
            targets=None if self.targets is None else self.targets.cpu().numpy(),
            joint_target=to_np(self._jt) if self._jt else None,
            meta=self.meta,
        )


def natural_trace(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> EnergyTrace:
    """The energies of unattacked images: an :class:`EnergyTrace` with step 0 only (eval mode, no gradients)."""
    x = validate_images(x)
    y = torch.as_tensor(y).long().reshape(-1)
    if y.numel() != x.shape[0]:
        raise InputError(f"got {y.numel()} labels for {x.shape[0]} images")
    device = device_of(model)
    traces = []
    with eval_mode(model), torch.inference_mode():
        for i in range(0, x.shape[0], batch_size):
            yb = y[i:i + batch_size].to(device)
            rec = TraceRecorder(yb)
            rec.record(0, model(x[i:i + batch_size].to(device)))
            traces.append(rec.finish())
    trace = traces[0]
    for t in traces[1:]:
        trace = trace.concat(t)
    return trace
