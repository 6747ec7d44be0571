"""The dataset type: images held as uint8 tensors and handed out as floats in [0, 1], the dataset description,
augmentation, probe selection and the check every image batch from outside goes through."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import DataError, InputError
from ..paths import data_dir

__all__ = ["ImageDataset", "DatasetSpec", "TrainingRecipe", "PAPER_EPS", "SGLD_FAMILIES", "CIFAR10_CLASSES",
           "CIFAR100_CLASSES", "data_root", "augment",
           "probe_indices", "validate_images", "check_image_count"]


def data_root(root: str | os.PathLike | None = None) -> Path:
    return data_dir(root)


@dataclass
class ImageDataset:
    name: str
    split: str
    x: torch.Tensor                       # uint8 N x C x H x W
    y: torch.Tensor                       # int64 N
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.x.dtype != torch.uint8:
            raise DataError(f"dataset {self.name}: images must be stored as uint8, got {self.x.dtype}")
        if self.x.dim() != 4 or self.x.shape[0] != self.y.shape[0]:
            raise DataError(f"dataset {self.name}: bad shapes x={tuple(self.x.shape)} y={tuple(self.y.shape)}")
        self.y = self.y.long()

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else int(self.y.max()) + 1

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def images(self, idx=None, device: str | torch.device = "cpu") -> torch.Tensor:
        """Float images in [0, 1] for the given indices (all when None)."""
        x = self.x if idx is None else self.x[torch.as_tensor(idx, dtype=torch.long)]
        return x.to(device, non_blocking=True).float().div_(255.0)

    def labels(self, idx=None, device: str | torch.device = "cpu") -> torch.Tensor:
        y = self.y if idx is None else self.y[torch.as_tensor(idx, dtype=torch.long)]
        return y.to(device)

    def subset(self, idx, split: str | None = None) -> "ImageDataset":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ImageDataset(self.name, split or self.split, self.x[idx], self.y[idx], list(self.class_names))

    def class_indices(self, c: int) -> torch.Tensor:
        return torch.nonzero(self.y == c).squeeze(1)


PAPER_EPS = 8 / 255   # the paper's L-infinity budget (CIFAR-10/100, SVHN, Tiny-ImageNet): the one place it is stated
SGLD_FAMILIES = ("cifar", "digits")   # the SGLD default sets (core.sampling): natural photos vs. upscaled digits


@dataclass(frozen=True)
class TrainingRecipe:
    """The Training studio's starting point for a dataset: architecture, epochs, learning rate, batch size."""

    arch: str = "resnet18"
    epochs: int = 100
    lr: float = 0.1
    batch_size: int = 128


@dataclass
class DatasetSpec:
    """Everything a dataset decides by default: its attack budget, whether flips are a valid augmentation, the
    training recipe and which SGLD default set its images take."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    class_names: list[str]
    loader: Callable[..., ImageDataset]
    default_eps: float = PAPER_EPS
    flip: bool = True                  # horizontal flips are a valid augmentation
    offline: bool = False              # ships with the package (no download needed)
    description: str = ""
    recipe: TrainingRecipe = field(default_factory=TrainingRecipe)
    sgld_family: str = "cifar"         # one of SGLD_FAMILIES


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = [f"class {i}" for i in range(100)]

def augment(x: torch.Tensor, crop_pad: int = 4, flip: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with zero padding + optional horizontal flip, batched on the tensor's device."""
    n, _, h, w = x.shape
    if crop_pad > 0:
        padded = torch.nn.functional.pad(x, (crop_pad,) * 4)
        dx = torch.randint(0, 2 * crop_pad + 1, (n,), generator=generator).tolist()
        dy = torch.randint(0, 2 * crop_pad + 1, (n,), generator=generator).tolist()
        x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def probe_indices(ds: ImageDataset, n: int, seed: int = 0) -> torch.Tensor:
    """A fixed, class-balanced set of ``n`` sample indices (the probe set for Delta E)."""
    g = torch.Generator().manual_seed(seed)
    n = min(n, len(ds))
    perm = torch.randperm(len(ds), generator=g)
    # Round-robin over classes: a sample's rank is its position among its class in the random
    # permutation; taking the n lowest ranks (ties in permutation order) keeps class counts within
    # one of each other and still returns n indices when some classes are small.
    yp = ds.y[perm]
    rank = torch.empty(len(ds), dtype=torch.long)
    for c in torch.unique(yp):
        mask = yp == c
        rank[mask] = torch.arange(int(mask.sum()))
    order = torch.argsort(rank * len(ds) + torch.arange(len(ds)))
    return perm[order[:n]].sort().values


def validate_images(x: torch.Tensor, *, expect_shape: tuple[int, ...] | None = None, max_batch: int = 100_000) -> torch.Tensor:
    """Check a float image batch: 4-D, finite, in [0, 1], expected C x H x W. Returns it as float32."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"images must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise InputError(f"images must have shape N x C x H x W, got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InputError("no images given")
    if x.shape[0] > max_batch:
        raise InputError(f"too many images at once ({x.shape[0]} > {max_batch})")
    if expect_shape is not None and tuple(x.shape[1:]) != tuple(expect_shape):
        raise InputError(f"images must be {tuple(expect_shape)} (C x H x W) for this model, got {tuple(x.shape[1:])}")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif not x.is_floating_point():
        raise InputError(f"images must be float in [0,1] or uint8, got {x.dtype}")
    x = x.float()
    if not torch.isfinite(x).all():
        raise InputError("images contain NaN or infinite values")
    if x.min() < 0 or x.max() > 1:
        raise InputError(f"image values must lie in [0, 1]; got range [{float(x.min()):.3g}, {float(x.max()):.3g}]")
    return x


def check_image_count(n, available: int | None = None, *, split: str = "test", dataset: str | None = None,
                      allow_all: bool = False, limit: int | None = None) -> int:
    """The number of images a request asks for: a whole number >= 1 (``allow_all``: 0 = every image of the
    split), at most ``available`` (the split's size, when known) and at most ``limit`` (an interactive run's
    cap). Returns it as an int; an InputError naming the count otherwise."""
    if isinstance(n, bool) or not isinstance(n, (int, float, np.integer)) or not np.isfinite(n) or int(n) != n:
        raise InputError(f"the number of images must be a whole number, got {n!r}")
    n = int(n)
    if n < 0 or (n == 0 and not allow_all):
        raise InputError(f"the number of images must be a positive integer{' (0 = all)' if allow_all else ''}, "
                         f"got {n}")
    if available is not None and n > available:
        where = f"the {split} set" + (f" of '{dataset}'" if dataset else "")
        raise InputError(f"asked for {n} images but {where} has only {available}")
    if limit is not None and n > limit:
        raise InputError(f"the number of images is {n}: at most {limit} images per interactive run; use a "
                         "background job for more")
    return n
