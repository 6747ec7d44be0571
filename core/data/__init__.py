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
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import DataError, InputError
from . import disk
from .dataset import (CIFAR10_CLASSES, CIFAR100_CLASSES, PAPER_EPS, SGLD_FAMILIES, DatasetSpec, ImageDataset,
                      TrainingRecipe, augment, check_image_count, data_root, probe_indices, validate_images)
from .demo import load_demo
from .embedded import load_digits32

__all__ = ["ImageDataset", "DatasetSpec", "TrainingRecipe", "PAPER_EPS", "SGLD_FAMILIES", "DATASETS", "load_dataset",
           "data_root", "augment", "dataset_spec",
           "probe_indices", "validate_images", "check_image_count", "CIFAR10_CLASSES"]


def _load_digits(split: str, root=None, download=False) -> ImageDataset:
    return load_digits32(split)


def _load_demo(split: str, root=None, download=False) -> ImageDataset:
    return load_demo(split, root=root, download=download)


def _on_disk(loader: Callable[..., ImageDataset]) -> Callable[..., ImageDataset]:
    """A loader of :mod:`core.data.disk`, given the data root (``root``, ``$ENERGYLENS_DATA`` or ``<repo>/data``)."""
    def call(split: str, root=None, download=False):
        return loader(split, root=data_root(root), download=download)

    return call


DATASETS: dict[str, DatasetSpec] = {
    "cifar10-demo": DatasetSpec("cifar10-demo", 10, (3, 32, 32), CIFAR10_CLASSES, _load_demo, offline=True,
                                recipe=TrainingRecipe(arch="demonet", epochs=15),
                                description="CIFAR-10 demo pack: 500 real test images (50 per class) shipped with the "
                                            "project; its 4,585 training images come from the CIFAR-10 subset"),
    "digits": DatasetSpec("digits", 10, (3, 32, 32), [str(i) for i in range(10)], _load_digits,
                          default_eps=16 / 255, flip=False, offline=True, sgld_family="digits",
                          recipe=TrainingRecipe(arch="smallcnn", epochs=15),
                          description="scikit-learn 8x8 handwritten digits upscaled to 32x32 (embedded, offline)"),
    "cifar10": DatasetSpec("cifar10", 10, (3, 32, 32), CIFAR10_CLASSES, _on_disk(disk.load_cifar10),
                           description="CIFAR-10 (torchvision python format)"),
    "cifar100": DatasetSpec("cifar100", 100, (3, 32, 32), CIFAR100_CLASSES,
                            _on_disk(disk.load_cifar100), description="CIFAR-100 (torchvision python format)"),
    "svhn": DatasetSpec("svhn", 10, (3, 32, 32), [str(i) for i in range(10)], _on_disk(disk.load_svhn),
                        flip=False, recipe=TrainingRecipe(lr=0.01), description="SVHN cropped digits (.mat files)"),
    "tinyimagenet": DatasetSpec("tinyimagenet", 200, (3, 64, 64), [f"class {i}" for i in range(200)],
                                _on_disk(disk.load_tinyimagenet), description="Tiny-ImageNet-200 (folder layout)"),
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


