"""Datasets as in-memory tensors with pixel values in [0, 1].

``load_dataset(name, split)`` returns an :class:`ImageDataset` whose images are stored as uint8
N x C x H x W (memory-light) and handed out as float tensors in [0, 1].

Datasets:
* ``cifar10-demo``  the CIFAR-10 demo pack (:mod:`core.data.demo`): 500 real test images shipped with
                    the project (offline), 4,585 training images rebuilt from a CIFAR-10 subset.
* ``digits``        embedded, offline: scikit-learn's bundled 8x8 handwritten digits (1,797
                    images) upscaled to 3 x 32 x 32, fixed stratified split 1,438 / 359.
* ``cifar10``, ``cifar100``  torchvision's python format under ``<root>/cifar-10-batches-py`` /
                    ``cifar-100-python``; downloaded when ``download=True`` and online.
* ``svhn``          ``<root>/svhn/{train,test}_32x32.mat``.
* ``tinyimagenet``  the standard folder layout ``<root>/tiny-imagenet-200``.
* ``npz:<path>``    any ``.npz`` with ``x`` (uint8 N x 3 x H x W or N x H x W x 3) and ``y``.

The data root is ``$ENERGYLENS_DATA`` or ``<repo>/data``.
"""

from __future__ import annotations

import functools
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import DataError, InputError

__all__ = ["ImageDataset", "DatasetSpec", "DATASETS", "load_dataset", "data_root", "augment", "dataset_spec",
           "probe_indices", "validate_images", "check_image_count"]

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_root(root: str | os.PathLike | None = None) -> Path:
    if root is not None:
        return Path(root)
    env = os.environ.get("ENERGYLENS_DATA")
    return Path(env) if env else REPO_ROOT / "data"


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


@dataclass
class DatasetSpec:
    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    class_names: list[str]
    loader: Callable[..., ImageDataset]
    default_eps: float = 8 / 255
    flip: bool = True                  # horizontal flips are a valid augmentation
    offline: bool = False              # ships with the package (no download needed)
    description: str = ""


def _load_digits(split: str, root=None, download=False) -> ImageDataset:
    from .embedded import load_digits32

    return load_digits32(split)


def _load_demo(split: str, root=None, download=False) -> ImageDataset:
    from .demo import load_demo

    return load_demo(split, root=root, download=download)


def _lazy(module: str, fn: str) -> Callable[..., ImageDataset]:
    def call(split: str, root=None, download=False):
        import importlib

        mod = importlib.import_module(f"{__name__}.{module}")
        return getattr(mod, fn)(split, root=data_root(root), download=download)

    return call


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

DATASETS: dict[str, DatasetSpec] = {
    "cifar10-demo": DatasetSpec("cifar10-demo", 10, (3, 32, 32), CIFAR10_CLASSES, _load_demo, offline=True,
                                description="CIFAR-10 demo pack: 500 real test images (50 per class) shipped with the "
                                            "project; its 4,585 training images come from the CIFAR-10 subset"),
    "digits": DatasetSpec("digits", 10, (3, 32, 32), [str(i) for i in range(10)], _load_digits,
                          default_eps=16 / 255, flip=False, offline=True,
                          description="scikit-learn 8x8 handwritten digits upscaled to 32x32 (embedded, offline)"),
    "cifar10": DatasetSpec("cifar10", 10, (3, 32, 32), CIFAR10_CLASSES, _lazy("disk", "load_cifar10"),
                           description="CIFAR-10 (torchvision python format)"),
    "cifar100": DatasetSpec("cifar100", 100, (3, 32, 32), [f"class {i}" for i in range(100)],
                            _lazy("disk", "load_cifar100"), description="CIFAR-100 (torchvision python format)"),
    "svhn": DatasetSpec("svhn", 10, (3, 32, 32), [str(i) for i in range(10)], _lazy("disk", "load_svhn"),
                        flip=False, description="SVHN cropped digits (.mat files)"),
    "tinyimagenet": DatasetSpec("tinyimagenet", 200, (3, 64, 64), [f"class {i}" for i in range(200)],
                                _lazy("disk", "load_tinyimagenet"), description="Tiny-ImageNet-200 (folder layout)"),
}


def dataset_spec(name: str) -> DatasetSpec:
    if name.startswith("npz:"):
        return DatasetSpec(name, 10, (3, 32, 32), [], functools.partial(_load_npz, path=name[4:]),
                           description=f"images from {name[4:]}")
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'. Known: {', '.join(DATASETS)} or npz:<path>")
    return DATASETS[name]


def _load_npz(split: str, root=None, download=False, *, path: str) -> ImageDataset:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"dataset file not found: {p}")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise DataError(f"could not read {p}: {e.strerror or e}") from e
    if magic != b"PK\x03\x04":  # an .npz is a zip archive; numpy would guess "pickled data" for anything else
        raise DataError(f"{p} is not a .npz file (expected a zip archive of arrays 'x' and 'y', "
                        "as written by numpy.savez)")
    try:
        with np.load(p, allow_pickle=False) as d:
            x, y = d["x"], d["y"]
    except KeyError as e:
        raise DataError(f"{p} must contain arrays 'x' and 'y' ({e} missing)") from e
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{p} is not a readable .npz file: {e}") from e
    if x.ndim != 4:
        raise DataError(f"{p}: x must be 4-D (N x C x H x W), got shape {x.shape}")
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise DataError(f"{p}: y must be a 1-D array of integer labels, got shape {y.shape} of {y.dtype}")
    if y.size and (not np.isfinite(y).all() or (y != np.round(y)).any() or y.min() < 0):
        raise DataError(f"{p}: y must hold non-negative integer labels")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{p}: x must hold numbers, got {x.dtype}")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise DataError(f"{p}: x contains NaN or infinite values")
    if x.dtype != np.uint8:
        if np.issubdtype(x.dtype, np.floating) and x.size and x.max() <= 1.0:
            x = np.round(x * 255)
        x = np.clip(x, 0, 255).astype(np.uint8)
    names = [str(i) for i in range(int(y.max()) + 1)] if len(y) else []
    return ImageDataset(f"npz:{p}", split, torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)), names)


def load_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None, download: bool = False,
                 limit: int | None = None) -> ImageDataset:
    """Load a dataset split. Raises :class:`DataError` with instructions when files are missing."""
    if split not in ("train", "test"):
        raise InputError(f"split must be 'train' or 'test', got '{split}'")
    if name.startswith("npz:"):
        ds = _load_npz(split, path=name[4:])
    else:
        ds = dataset_spec(name).loader(split, root=root, download=download)
    if limit is not None:
        if limit <= 0:
            raise InputError(f"limit must be positive, got {limit}")
        ds = ds.subset(torch.arange(min(limit, len(ds))))
    return ds


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
