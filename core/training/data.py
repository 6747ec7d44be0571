"""The data of a training run: the training and held-out splits (subsets, exclusions) and the lr schedule."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data import load_dataset
from ..errors import InputError
from .config import TrainConfig

__all__ = ["load_splits", "make_scheduler"]


def load_splits(cfg: TrainConfig):
    """(train, held-out) datasets. Datasets without a test split give a fixed validation slice."""
    train = load_dataset(cfg.dataset, "train", root=cfg.data_root)
    if cfg.dataset.startswith("npz:"):
        g = torch.Generator().manual_seed(12345)
        perm = torch.randperm(len(train), generator=g)
        n_val = max(1, int(len(train) * cfg.val_fraction))
        val, train = train.subset(perm[:n_val], "val"), train.subset(perm[n_val:], "train")
    else:
        val = load_dataset(cfg.dataset, "test", root=cfg.data_root)
    if cfg.train_limit:
        train = train.subset(torch.arange(min(cfg.train_limit, len(train))))
    if cfg.train_per_class:
        keep = torch.cat([train.class_indices(c)[:cfg.train_per_class] for c in range(train.num_classes)])
        train = train.subset(keep.sort().values)
    if cfg.exclude_indices_file:
        train = train.subset(_kept_indices(cfg.exclude_indices_file, len(train)))
    return train, val


def _kept_indices(path: str, n: int) -> torch.Tensor:
    """Indices of the training set minus those listed in ``path`` (a JSON list, or {"indices": [...]})."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read the exclusion file {path}: {e}") from e
    idx = data.get("indices") if isinstance(data, dict) else data
    if not isinstance(idx, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
        raise InputError(f"{path} must hold a JSON list of integer training-set indices")
    if idx and (min(idx) < 0 or max(idx) >= n):
        raise InputError(f"{path} lists indices outside the training set (0..{n - 1})")
    keep = torch.ones(n, dtype=torch.bool)
    keep[torch.as_tensor(idx, dtype=torch.long)] = False
    if not bool(keep.any()):
        raise InputError(f"{path} excludes every training sample")
    return torch.nonzero(keep).squeeze(1)


def make_scheduler(opt, cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        if total < 8:  # OneCycleLR divides by (0.25 * total - 1): zero at 4 steps, nonsense below; keep lr constant
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.25)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if cfg.schedule == "piecewise":
        m = [e * steps_per_epoch for e in cfg.decay_milestones()] if cfg.decay_epochs is not None else \
            [int(total * 0.5), int(total * 0.75)]
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=m, gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)

