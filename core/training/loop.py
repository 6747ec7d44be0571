"""``train(cfg)``: a training run as named steps.

:func:`setup` (check the settings, start the process group, read the data, build model / optimizer / schedule),
:func:`resume` (from ``state.pt``), then per epoch :func:`run_epoch` (the batches, with the batch log and
progress), :func:`evaluate_epoch` (natural / PGD accuracy on held-out images, every ``measure_every`` epochs
and at the last), :func:`probe` (Delta E of the probe set, every epoch), :func:`record` (``metrics.jsonl`` and
the arrow snapshot) and :func:`checkpoint` (last / best / every N, ``state.pt``), and :func:`finish`. Everything a step needs is in one :class:`Run`.

Randomness is derived from (seed, epoch), so a run resumed from an epoch boundary reproduces an uninterrupted run
exactly on the same device. Several processes: every batch's samples are split over them and the gradients are
averaged; rank 0 evaluates and writes.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..attacks import AttackSpec
from ..data import augment as augment_batch
from ..data import dataset_spec, probe_indices
from ..data.loader import prefetch_batches
from ..energy import weat_weight
from ..errors import EnergyLensError, InputError
from ..models import ModelMeta, build_model, save_checkpoint
from ..models.checkpoint import load_state_dict_checked
from ..rundir import RunDir
from ..runtime import resolve_device
from ..storage import StorageError, remove_stale_temp_files
from ..tensorio import atomic_torch_save, safe_torch_load
from ..train_progress import TrainClock, progress_message
from .config import TrainConfig
from .data import load_splits, make_scheduler
from .measure import (auto_measure_every, auto_probe_size, estimate_eval_time, evaluate, measure_due, probe_energies,
                      quantile_stats)
from .step import CompiledForward, TrainingStopped, oom_safe_step

__all__ = ["train", "Run", "setup", "resume", "run_epoch", "evaluate_epoch", "probe", "record", "checkpoint",
           "finish"]

Progress = Callable[[dict], None]


@dataclass
class Run:
    """The state of one training run, shared by its steps."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    run: RunDir
    train_ds: object
    val_ds: object
    lcfg: object                  # the LossConfig
    eps: float
    step: float
    flip: bool
    model: torch.nn.Module
    net: CompiledForward | None   # compiled train-mode forwards (cfg.compile)
    opt: torch.optim.Optimizer
    sched: object
    steps_per_epoch: int
    per_rank_bs: int
    xv: torch.Tensor              # held-out images evaluated after every epoch
    yv: torch.Tensor
    pidx: torch.Tensor            # the probe set: training-set indices
    xp: torch.Tensor
    yp: torch.Tensor
    amp: bool
    meta: ModelMeta
    atk_spec: AttackSpec          # the training attack
    clock: TrainClock
    start_epoch: int = 0
    best: float = -1.0            # the best PGD accuracy so far (best.safetensors)
    measure_every: int | None = None   # the evaluation period (epochs); None: auto, chosen after the first epoch
    num_classes: int | None = None
    oom: dict = field(default_factory=dict)   # {'micro_batch': k} once a training step ran out of memory

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class EpochResult:
    """The training part of one epoch: summed loss terms, the sample weights used, the seconds it took."""

    sums: dict
    weights: list
    train_time: float


def _dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _write_progress(run: RunDir, **kw) -> None:
    try:
        run.write_progress(**kw)
    except EnergyLensError:  # progress is a courtesy: a full disk must not stop the training
        pass


# --------------------------------------------------------------------------------------------------- setup
def setup(cfg: TrainConfig) -> Run:
    """Check every setting, start the process group, read the data, prepare the run folder and build the model,
    optimizer, schedule, evaluation / probe sets, checkpoint metadata and the training attack."""
    cfg.validate()  # every setting, before any data is read or any process group is started
    rank, world = _dist_info()
    device = resolve_device(cfg.device)
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    train_ds, val_ds = load_splits(cfg)
    cfg.validate(len(train_ds))
    lcfg = cfg.loss_config()
    eps, step = cfg.resolved_eps(), cfg.resolved_step()
    out = Path(cfg.out_dir)
    run = RunDir(out)
    if rank == 0:
        _prepare_folder(cfg, run)

    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    arch_kwargs = cfg.arch_kwargs()
    model = build_model(cfg.arch, train_ds.num_classes, **arch_kwargs).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = CompiledForward(model) if cfg.compile else None  # train-mode forwards only; state dicts stay the module's
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.batch_size % world:
        raise InputError(f"batch size {cfg.batch_size} must be divisible by the number of processes ({world})")
    steps_per_epoch = len(train_ds) // cfg.batch_size  # drop the last partial batch (keeps BN statistics sane)
    sched = make_scheduler(opt, cfg, steps_per_epoch)

    val_idx = torch.arange(min(cfg.eval_samples, len(val_ds)))
    probe_size = cfg.probe_size or auto_probe_size(len(train_ds), train_ds.num_classes)
    pidx = probe_indices(train_ds, probe_size, seed=cfg.seed)
    meta = ModelMeta(arch=cfg.arch, num_classes=train_ds.num_classes, dataset=cfg.dataset, arch_kwargs=arch_kwargs,
                     input_shape=list(train_ds.input_shape), class_names=train_ds.class_names, method=cfg.method,
                     hparams={**cfg.to_dict(), "eps": eps, "step_size": step, "probe_size": probe_size,
                              "loss": lcfg.to_dict()},
                     name=cfg.name or out.name)
    # random start for both inner losses: PGD-CE uniform in the ball, TRADES-KL x + 0.001 N(0, I) (at x itself the
    # KL gradient is exactly zero, so without it the first step would follow rounding noise or not move at all)
    atk_spec = AttackSpec("pgd", eps=eps, step_size=step, steps=cfg.attack_steps, random_start=True)
    clock = TrainClock(epochs=cfg.epochs, batches=steps_per_epoch, batch_size=cfg.batch_size,
                       attack_steps=cfg.attack_steps, eval_samples=len(val_idx), eval_steps=cfg.eval_steps,
                       probe_size=len(pidx))
    return Run(cfg=cfg, rank=rank, world=world, device=device, run=run, train_ds=train_ds, val_ds=val_ds, lcfg=lcfg,
               eps=eps, step=step, flip=dataset_spec(cfg.dataset).flip, model=model, net=net, opt=opt, sched=sched,
               steps_per_epoch=steps_per_epoch, per_rank_bs=cfg.batch_size // world,
               xv=val_ds.images(val_idx), yv=val_ds.labels(val_idx), pidx=pidx, xp=train_ds.images(pidx),
               yp=train_ds.labels(pidx), amp=cfg.amp and device.type == "cuda", meta=meta, atk_spec=atk_spec,
               clock=clock, measure_every=cfg.measure_every, num_classes=train_ds.num_classes)


def _prepare_folder(cfg: TrainConfig, run: RunDir) -> None:
    """Create the run folder, drop the temp files of a killed earlier run (on resume), write config.json."""
    try:
        run.probe_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"cannot create the run folder {run.path}: {e.strerror or e}") from e
    if cfg.resume:  # temp files of writes a killed earlier run left behind (state.pt's: hundreds of MB for a WRN)
        stale = remove_stale_temp_files(run.path)
        if stale:
            print(f"removed {len(stale)} stale temp file(s) of interrupted writes", file=sys.stderr, flush=True)
    run.write_config(cfg.to_dict())


# --------------------------------------------------------------------------------------------------- resume
def resume(r: Run) -> None:
    """With ``--resume`` and a ``state.pt``: model, optimizer, schedule, epoch and best accuracy from it, and the
    records written after it dropped (those epochs run again); otherwise the records of an earlier run are
    cleared. Several processes: every one starts from rank 0's weights."""
    if r.cfg.resume and r.run.state.exists():
        st = safe_torch_load(r.run.state)
        load_state_dict_checked(r.model, st["model"], where="state.pt")
        r.opt.load_state_dict(st["optimizer"])
        r.sched.load_state_dict(st["scheduler"])
        r.start_epoch, r.best = int(st["epoch"]), float(st["best"])
        if r.cfg.measure_every is None and st.get("measure_every"):  # auto: keep the period chosen before
            r.measure_every = int(st["measure_every"])
        if r.is_main:  # drop the metrics and batches written after the checkpoint we resume from
            r.run.keep_epochs(r.start_epoch)
    elif r.is_main:
        r.run.clear_records()
    if r.world > 1:
        for p in r.model.state_dict().values():
            dist.broadcast(p, 0)


# --------------------------------------------------------------------------------------------------- epoch
def _batch_indices(r: Run, perm: torch.Tensor, mine: slice) -> list[torch.Tensor]:
    """The epoch's batches (training-set indices). With augmentation every process gathers the whole global batch
    (augmentation then does not depend on the number of processes); without, only its own slice."""
    bs = r.cfg.batch_size
    batch_idx = [perm[b * bs:(b + 1) * bs] for b in range(r.steps_per_epoch)]
    return batch_idx if r.cfg.augment else [bi[mine] for bi in batch_idx]


def run_epoch(r: Run, epoch: int, progress: Progress | None = None,
              should_stop: Callable[[], bool] | None = None) -> EpochResult:
    """Train one epoch (``epoch`` counts from 0): every batch's optimisation step, the batch log and progress.
    Raises TrainingStopped on a stop request or non-finite weights."""
    cfg, t0 = r.cfg, time.time()
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    torch.manual_seed(cfg.seed * 7_919 + epoch)
    perm = torch.randperm(len(r.train_ds), generator=g)
    r.model.train()
    sums: dict[str, float] = {}
    wvals = []
    bar = tqdm(range(r.steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", file=sys.stderr,
               disable=not r.is_main, leave=False)
    # several processes: every one augments the whole global batch with the same generator and keeps its slice;
    # attack noise comes from a per-process generator (otherwise every process would draw the same noise)
    g_atk = g if r.world == 1 else torch.Generator().manual_seed(cfg.seed * 100_003 + epoch + 1_000_003 * (r.rank + 1))
    mine = slice(r.rank * r.per_rank_bs, (r.rank + 1) * r.per_rank_bs)
    workers = cfg.loader_workers if cfg.loader_workers is not None else (2 if r.device.type == "cuda" else 0)
    loader = prefetch_batches(r.train_ds.x, r.train_ds.y, _batch_indices(r, perm, mine), r.device, workers=workers)
    r.clock.start_batch()
    for b, (xu, yu) in zip(bar, loader):
        xb = xu.float().div_(255.0)  # exactly ImageDataset.images()
        if cfg.augment:
            xb, yb = augment_batch(xb, 4, r.flip, generator=g)[mine], yu[mine]
        else:
            yb = yu
        if cfg.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        lt = oom_safe_step(r.model, r.opt, r.lcfg, xb, yb, r.atk_spec, r.oom, epoch=epoch, generator=g_atk,
                           amp=r.amp, world=r.world, where=f" at epoch {epoch + 1}, batch {b + 1}", net=r.net)
        r.sched.step()
        for k, v in lt.terms.items():
            sums[k] = sums.get(k, 0.0) + v
        if lt.weights is not None:
            wvals.append(lt.weights.float().cpu())
        r.clock.end_batch()
        if r.is_main and r.clock.report_due(b + 1):
            _report_batch(r, epoch, b, lt, progress)
        if should_stop and should_stop():
            raise TrainingStopped("stopped on request")
        r.clock.start_batch()
    loader.close()  # (on an exception the generator's own clean-up stops the loader threads)
    train_time = time.time() - t0
    if not all(bool(torch.isfinite(p).all()) for p in r.model.parameters()):  # identical on every process
        raise TrainingStopped(f"the weights became non-finite during epoch {epoch + 1}: training stopped. "
                              "The last good checkpoint is kept; try a smaller learning rate.")
    if r.world > 1:
        if sums:  # log the loss terms of the whole global batch, not only rank 0's share
            keys = sorted(sums)
            red = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=r.device)
            dist.all_reduce(red)
            sums = dict(zip(keys, (red / r.world).tolist()))
        dist.barrier()
    return EpochResult(sums=sums, weights=wvals, train_time=train_time)


def _report_batch(r: Run, epoch: int, b: int, lt, progress: Progress | None) -> None:
    """progress.json, the batch-level loss log (the live plot's first points, long before the first epoch ends)
    and the caller's progress callback, after batch ``b`` (from 0)."""
    cfg, clock, spe = r.cfg, r.clock, r.steps_per_epoch
    frac = (epoch + (b + 1) / spe) / cfg.epochs
    eta = clock.eta(epoch + 1, b + 1)
    msg = progress_message(epoch + 1, cfg.epochs, b + 1, spe, eta, estimated=not clock.eval_measured)
    _write_progress(r.run, epoch=epoch + 1, epochs=cfg.epochs, batch=b + 1, batches=spe, fraction=frac,
                    phase="train", eta_s=eta, seconds_per_batch=clock.seconds_per_batch,
                    eta_estimated=not clock.eval_measured, message=msg)
    loss_now = lt.terms.get("loss")
    try:
        r.run.append_batch({
            "epoch": epoch + 1, "batch": b + 1, "batches": spe, "step": epoch * spe + b + 1,
            "loss": float(loss_now) if loss_now is not None else float(lt.loss.detach()),
            "seconds_per_batch": clock.seconds_per_batch, "time": time.time()})
    except EnergyLensError:
        pass
    if progress:
        progress({"epoch": epoch + 1, "batch": b + 1, "batches": spe, "fraction": frac, "eta_s": eta,
                  "message": msg})


# --------------------------------------------------------------------------------------------------- evaluate
def evaluate_epoch(r: Run, epoch: int, progress: Progress | None = None, held_out: bool = True) -> dict | None:
    """Announce the evaluation phase, then natural and PGD accuracy on the held-out images (rank 0); None without
    them (``held_out`` False: an epoch between two evaluations, see ``TrainConfig.measure_every``)."""
    cfg, clock, spe = r.cfg, r.clock, r.steps_per_epoch
    clock.start_eval()
    eta = clock.eta_after_eval(epoch + 1)
    msg = progress_message(epoch + 1, cfg.epochs, eta_s=eta, estimated=not clock.eval_measured, phase="evaluate")
    _write_progress(r.run, epoch=epoch + 1, epochs=cfg.epochs, batch=spe, batches=spe,
                    fraction=(epoch + 1) / cfg.epochs, phase="evaluate", eta_s=eta,
                    eta_estimated=not clock.eval_measured, message=msg)
    if progress:
        progress({"epoch": epoch + 1, "batch": spe, "batches": spe, "fraction": (epoch + 1) / cfg.epochs,
                  "eta_s": eta, "message": msg})
    if not held_out:
        return None
    return evaluate(r.model, r.xv, r.yv, r.eps, cfg.eval_step_size() if cfg.eval_steps else r.step, cfg.eval_steps,
                    num_classes=r.num_classes)


# --------------------------------------------------------------------------------------------------- probe
def probe(r: Run) -> dict[str, np.ndarray]:
    """Natural vs adversarial energies of the probe set under the training attack, and its WEAT weights."""
    pe = probe_energies(r.model, r.xp, r.yp, r.eps, r.step, r.cfg.attack_steps, "kl" if r.lcfg.inner == "kl" else "ce",
                        num_classes=r.num_classes)
    # WEAT weights of the probe set, whatever the method (for the weight histogram); w depends on E(x) only
    pe["w_probe"] = weat_weight(torch.from_numpy(-pe["e_nat"][:, None].astype(np.float32))).numpy()
    return pe


# --------------------------------------------------------------------------------------------------- record
def record(r: Run, epoch: int, ep: EpochResult, ev: dict | None, pe: dict, probe_time: float,
           eval_time: float | None = None, eval_estimate: float | None = None) -> dict:
    """The epoch's metrics record (appended to ``metrics.jsonl``) and, every ``snapshot_every`` epochs and at the
    last, the probe vectors (``probe/epoch_XXXX.npz``). Returns the record. ``ev`` None (no held-out evaluation
    this epoch): the record has no ``nat_acc`` / ``pgd_acc`` / ``nat_err`` / ``rob_err`` (readers see a gap).
    ``probe_time``: seconds of the whole measurement (evaluation + probe), ``eval_time``: of the evaluation,
    ``eval_estimate``: the evaluation seconds the automatic period was chosen from (the first epoch)."""
    cfg = r.cfg
    d_marg, d_joint = pe["e_nat"] - pe["e_adv"], pe["ej_nat"] - pe["ej_adv"]
    held_out = {} if ev is None else {"nat_acc": ev["nat_acc"], "pgd_acc": ev["pgd_acc"],
                                      "nat_err": 1 - ev["nat_acc"], "rob_err": 1 - ev["pgd_acc"]}
    rec = {
        "epoch": epoch + 1, "lr": float(r.opt.param_groups[0]["lr"]), **held_out,
        "train_time": ep.train_time, "probe_time": probe_time, "probe_size": int(len(r.pidx)),
        **({"eval_time": eval_time} if eval_time is not None else {}),
        **({"eval_time_estimate": eval_estimate} if eval_estimate is not None else {}),
        **({"measure_every": int(r.measure_every)} if r.measure_every is not None else {}),
        **({"compile": r.net.note} if r.net is not None else {}),
        **{f"train_{k}": v / max(r.steps_per_epoch, 1) for k, v in ep.sums.items()},
        **quantile_stats(d_marg, "dE"), **quantile_stats(d_joint, "dEy"),
        "E_nat_mean": float(pe["e_nat"].mean()), "E_adv_mean": float(pe["e_adv"].mean()),
        "probe_nat_acc": float(pe["correct_nat"].mean()), "probe_adv_acc": float(pe["correct_adv"].mean()),
    }
    if r.oom.get("micro_batch"):
        rec["oom_microbatch"] = int(r.oom["micro_batch"])
    if ep.weights:
        wv = torch.cat(ep.weights).numpy()
        rec.update({"w_mean": float(wv.mean()), "w_std": float(wv.std()), "w_min": float(wv.min()),
                    "w_max": float(wv.max())})
    if (epoch + 1) % cfg.snapshot_every == 0 or epoch + 1 == cfg.epochs:
        r.run.write_probe(epoch + 1, {**pe, "labels": r.yp.numpy(), "indices": r.pidx.numpy()})
    r.run.append_metrics(rec)
    return rec


# --------------------------------------------------------------------------------------------------- checkpoint
def checkpoint(r: Run, epoch: int, rec: dict) -> None:
    """``last.safetensors``, ``epoch_XXXX.safetensors`` (every ``checkpoint_every`` epochs), ``best.safetensors``
    (highest PGD accuracy) and ``state.pt`` (what ``--resume`` continues from), in that order."""
    cfg = r.cfg
    r.meta.epoch = epoch + 1
    # accuracies of the last evaluated epoch (an epoch between two evaluations has none of its own)
    r.meta.metrics = {**(r.meta.metrics or {}), **{k: rec[k] for k in ("nat_acc", "pgd_acc", "dE_mean", "dEy_mean")
                                                    if k in rec}}
    save_checkpoint(r.run.last, r.model, r.meta)
    if cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0:
        save_checkpoint(r.run.epoch_checkpoint(epoch + 1), r.model, r.meta)
    if "pgd_acc" in rec and rec["pgd_acc"] > r.best:
        r.best = rec["pgd_acc"]
        save_checkpoint(r.run.best, r.model, r.meta)
    atomic_torch_save(r.run.state, {"model": r.model.state_dict(), "optimizer": r.opt.state_dict(),
                                    "scheduler": r.sched.state_dict(), "epoch": epoch + 1, "best": r.best,
                                    "measure_every": r.measure_every})


def _report_epoch(r: Run, epoch: int, rec: dict, progress: Progress | None) -> None:
    if progress:
        left = r.clock.eta(epoch + 1, r.steps_per_epoch)
        eta = 0.0 if epoch + 1 == r.cfg.epochs or left is None else left - (r.clock.eval_seconds or 0.0)
        progress({"epoch": epoch + 1, "fraction": (epoch + 1) / r.cfg.epochs, "metrics": rec, "eta_s": eta})


# --------------------------------------------------------------------------------------------------- finish
def finish(r: Run) -> None:
    """progress.json says 'done'; several processes wait for each other and end the process group."""
    if r.is_main:
        _write_progress(r.run, epoch=r.cfg.epochs, epochs=r.cfg.epochs, fraction=1.0, phase="done")
    if r.world > 1:
        dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------- train
def train(cfg: TrainConfig, progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> dict:
    """Run training; returns the last metrics record. Raises EnergyLensError subclasses on bad input."""
    r = setup(cfg)
    resume(r)
    last: dict = {}
    for epoch in range(r.start_epoch, cfg.epochs):
        ep = run_epoch(r, epoch, progress, should_stop)
        if not r.is_main:
            continue
        t1 = time.time()
        due = measure_due(epoch + 1, cfg.epochs, r.measure_every)
        ev = evaluate_epoch(r, epoch, progress, held_out=due)
        t2 = time.time()
        pe = probe(r)
        t3 = time.time()
        measure_s, eval_s = t3 - t1, (t2 - t1) if due else None
        estimate = None
        if r.measure_every is None:  # auto: the period from this (first) epoch's training and probe times
            probe_s = measure_s - (eval_s or 0.0)
            estimate = eval_s if due else estimate_eval_time(probe_s, len(r.pidx), cfg.attack_steps, len(r.yv),
                                                             cfg.eval_steps)
            r.measure_every = auto_measure_every(ep.train_time, estimate, probe_s, cfg.epochs)
        last = record(r, epoch, ep, ev, pe, probe_time=measure_s, eval_time=eval_s, eval_estimate=estimate)
        checkpoint(r, epoch, last)
        r.clock.end_eval()
        _report_epoch(r, epoch, last, progress)
    finish(r)
    return last
