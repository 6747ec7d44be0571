"""The step-wise SGLD sampler (Eq. 7) and the energy trace of its chains (Fig. 5e)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..attacks.base import project
from ..drift import EnergyTrace
from ..errors import InputError
from ..models.folding import folded
from ..runtime import eval_mode, is_oom_error
from .defaults import (DEFAULT_PCA_SIGMA, DEFAULTS, INITS, MAX_CHAINS, _positive_int, _seeds, _validate_bound,
                       _validate_classes, _validate_init_params, sgld_defaults, validate_hyperparams, validate_steps)
from .stats import ClassStats, Progress

log = logging.getLogger("energylens.sampling")


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
    stopped_early: bool = False  # every chain had reached its class's Ē(x, y) (the stopping rule) before n steps


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

    ``reference`` (Ē(x, y) per class) and ``stop_at_reference`` (None: the default of the model's dataset, on) set
    the stopping rule: :meth:`set_reference`, :attr:`stopped_at`, :meth:`stop_report`.
    """

    def __init__(self, model, classes: Sequence[int], n_per_class: int | Sequence[int] = 8, init: str = "pca",
                 eta: float | None = None, zeta: float | None = None, gamma: float | None = None,
                 bound: tuple[str, float] | None = None, seed: int = 0, device: str | torch.device | None = None,
                 stats: ClassStats | None = None, *, dataset=None, pca_sigma: float = DEFAULT_PCA_SIGMA,
                 pca_variance: float | None = DEFAULTS["pca_variance"], pca_components: int | None = None,
                 gaussian_ridge: float = DEFAULTS["gaussian_ridge"], image_shape: Sequence[int] | None = None,
                 num_classes: int | None = None, x0: torch.Tensor | None = None,
                 trace_budget_bytes: int = 64 * 2 ** 20, reference: Mapping | None = None,
                 stop_at_reference: bool | None = None):
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
        self.stop_at_reference = bool(d["stop_at_reference"] if stop_at_reference is None else stop_at_reference)
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
        self._level: torch.Tensor | None = None    # Ē(x, y) of each chain's class (the stopping rule's target)
        self._stop_step = np.full(self.n_chains, -1, np.int64)
        self.set_reference(reference)
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
                "stop_at_reference": self.stop_at_reference, "steps_done": self._step, "device": str(self.device)}

    # ---- the stopping rule ----------------------------------------------------------------------
    def set_reference(self, reference: Mapping | None) -> None:
        """Ē(x, y) per class (``{class: Ē}`` or ``{class: {'joint': Ē, ...}}`` as :func:`reference_energies`
        returns it), the stopping rule's target; None removes it (chains then run every step asked for).

        With ``stop_at_reference`` on, a chain stops -- its image and velocity are frozen -- at the first recorded
        step at which its E(x, y) is at or below its class's Ē(x, y); ``step()`` ends once every chain has stopped.
        A chain already at or below Ē when the reference arrives stops at the current step."""
        if reference is None:
            self._level = None
            return
        try:
            level = [float(v["joint"] if isinstance(v, dict) else v) for v in (reference[int(c)] for c in
                                                                                   self.labels.tolist())]
        except KeyError as e:
            raise InputError(f"no reference energy Ē(x, y) for class {e.args[0]}") from None
        except (TypeError, ValueError):
            raise InputError("the reference energies must be numbers per class") from None
        if not np.all(np.isfinite(level)):
            raise InputError("the reference energies Ē(x, y) must be finite")
        self._level = torch.tensor(level, dtype=torch.float32, device=self.device)
        if getattr(self, "_rows", None):
            self._check_stop(self._step, self._rows[-1][1])

    @property
    def stopping(self) -> bool:
        """Whether the stopping rule is in force (switched on and Ē(x, y) known)."""
        return self.stop_at_reference and self._level is not None

    @property
    def stopped_at(self) -> np.ndarray:
        """(N,) the step at which each chain reached Ē(x, y) and stopped; -1 while it runs."""
        return self._stop_step.copy()

    def stop_report(self) -> dict[str, Any]:
        """What the stopping rule did: ``rule`` ('on' | 'off' | 'on, no Ē(x, y) yet'), ``stopped`` / ``n_chains``,
        the ``median_step`` / ``first_step`` / ``last_step`` among the stopped chains (None when none stopped)."""
        st = self._stop_step[self._stop_step >= 0]
        rule = "off" if not self.stop_at_reference else "on" if self._level is not None else "on, no Ē(x, y) yet"
        return {"rule": rule, "stopped": int(len(st)), "n_chains": self.n_chains,
                "median_step": float(np.median(st)) if len(st) else None,
                "first_step": int(st.min()) if len(st) else None, "last_step": int(st.max()) if len(st) else None}

    def _check_stop(self, step: int, logits: torch.Tensor) -> None:
        if not self.stopping:
            return
        e_xy = -logits.float().gather(1, self.labels[:, None]).squeeze(1)
        reached = (e_xy <= self._level).cpu().numpy() & (self._stop_step < 0)
        self._stop_step[reached] = step

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
            self._stop_step = np.full(self.n_chains, -1, np.int64)
            self._record(0, logits)
            self._check_stop(0, logits)
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
        early = False
        try:
            with eval_mode(self.model), torch.enable_grad():
                last_report = t0
                for i in range(n):
                    if self.stopping and bool((self._stop_step >= 0).all()):
                        early = True     # every chain has reached Ē(x, y): nothing moves any more
                        if progress is not None:
                            progress(1.0, f"every chain reached Ē(x, y): stopped at step {self._step}")
                        break
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
                          list(self.notes[notes_before:]), early)

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
        frozen = None
        if self.stopping and (self._stop_step >= 0).any():   # stopped chains keep their image and velocity
            frozen = torch.from_numpy(self._stop_step >= 0).to(self.device)
            keep = frozen.view(-1, *([1] * (x.dim() - 1)))
            x, v = torch.where(keep, self.x, x), torch.where(keep, self.v, v)
        logits, grad = self._energy_grad(x)
        if not self._finite(logits, grad):
            raise InputError(f"SGLD diverged at step {self._step + 1}: the energies or their gradients became NaN "
                             f"or infinite. The chain is kept at step {self._step}; lower η or γ.")
        self.x, self.v, self._grad = x, v, grad
        self._step += 1
        self._record(self._step, logits)
        self._check_stop(self._step, logits)

    def _record(self, step: int, logits: torch.Tensor) -> None:
        if len(self._rows) >= self._max_rows:  # thin: keep every other row (row 0 kept)
            self._rows = self._rows[::2]
        self._rows.append((step, logits))
        self._trace_cache = None

    def _build_trace(self, rows) -> SGLDTrace:
        n, k = self.n_chains, self.num_classes
        if not rows:
            return SGLDTrace(np.zeros(0, np.int64), np.zeros((0, n), np.float32), np.zeros((0, n, k), np.float32),
                             np.zeros((0, n), np.float32), self.labels.cpu().numpy(), self._trace_meta())
        lg = torch.stack([r[1] for r in rows]).float()        # (S, N, K)
        joint_all = -lg
        joint = joint_all.gather(2, self.labels.view(1, -1, 1).expand(lg.shape[0], -1, 1)).squeeze(2)
        marginal = -torch.logsumexp(lg, dim=2)
        return SGLDTrace(steps=np.asarray([r[0] for r in rows], np.int64), joint=joint.cpu().numpy(),
                         joint_all=joint_all.cpu().numpy(), marginal=marginal.cpu().numpy(),
                         labels=self.labels.cpu().numpy(), meta=self._trace_meta())

    def _trace_meta(self) -> dict[str, Any]:
        return {"sampler": self.config(), "stop": self.stop_report(), "stopped_at": self._stop_step.tolist()}

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
                      "noise_state": self._gen.get_state().cpu().numpy(), "stop_step": self._stop_step.copy()}
            if self._level is not None:
                arrays["stop_level"] = self._level.cpu().numpy()
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
                    num_classes=meta["num_classes"], x0=torch.from_numpy(np.asarray(arrays["x0"], np.float32)),
                    stop_at_reference=bool(meta.get("stop_at_reference", False)))  # saved before the rule: off
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
        if "stop_step" in arrays and np.shape(arrays["stop_step"]) == (s.n_chains,):
            s._stop_step = np.asarray(arrays["stop_step"], np.int64).copy()
        if "stop_level" in arrays and np.shape(arrays["stop_level"]) == (s.n_chains,):
            s._level = torch.from_numpy(np.asarray(arrays["stop_level"], np.float32)).to(s.device)
        return s
