"""The CIFAR-10 demo pack: real images that ship with the project.

``cifar10-demo`` is a deterministic, class-balanced split of 5,085 CIFAR-10 training images (the first
1,017 images of each of the five official training batches, in their original order):

* ``test``  -- 500 images, 50 per class, committed in ``checkpoints/demo/cifar10-demo-test.npz``: always
  available, offline. The bundled ``cifar10-demo-*`` models never saw them.
* ``train`` -- the remaining 4,585 images, committed in ``checkpoints/demo/cifar10-demo-train.npz``: also
  always available, offline (the bundled models were trained on them). Where the 5,085-image subset file
  (``$ENERGYLENS_CIFAR10_SUBSET``, or ``../shared/data/cifar10_train_subset.npz`` beside the checkout) or a full
  CIFAR-10 in the data root is present, ``scripts/build_demo_pack.py split`` rebuilds both files from it; when the
  train file is missing, the split is rebuilt from those sources on the fly.

The split: for each class ``c`` (CIFAR-10 order), the subset positions of class ``c`` are shuffled with
``numpy.random.default_rng(SPLIT_SEED)`` (one generator, classes in order) and the first 50 go to the
test split. Both files store their subset positions (``subset_index``): together they are the whole subset (so
:func:`load_subset` works from the pack alone), and a rebuilt training split is checked against the committed
test images before it is used.

Images: Krizhevsky, A. *Learning Multiple Layers of Features from Tiny Images*, tech. report, 2009.
"""

from __future__ import annotations

import os
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..paths import DEMO_PACK_DIR, ENV_CIFAR10_SUBSET, REPO_ROOT
from .dataset import CIFAR10_CLASSES, ImageDataset, data_root
from .disk import load_cifar10

__all__ = ["DEMO_DATASET", "DEMO_TEST_FILE", "DEMO_TRAIN_FILE", "SPLIT_SEED", "PER_CLASS", "SUBSET_PER_BATCH",
           "split_positions", "load_demo", "subset_file", "rebuild_hint", "load_subset", "train_available",
           "cache_clear"]

DEMO_DATASET = "cifar10-demo"
PACK_DIR = DEMO_PACK_DIR
DEMO_TEST_FILE = PACK_DIR / "cifar10-demo-test.npz"
DEMO_TRAIN_FILE = PACK_DIR / "cifar10-demo-train.npz"
SUBSET_ENV = ENV_CIFAR10_SUBSET
SHARED_SUBSET = REPO_ROOT.parent / "shared" / "data" / "cifar10_train_subset.npz"
SPLIT_SEED = 2024
PER_CLASS = 50
SUBSET_PER_BATCH = 1017     # the subset = the first 1,017 images of each official training batch
SUBSET_SIZE = 5 * SUBSET_PER_BATCH
TRAIN_SIZE = SUBSET_SIZE - PER_CLASS * len(CIFAR10_CLASSES)   # 4,585


def rebuild_hint() -> str:
    return ("Restore it with `git checkout -- checkpoints/demo`, or rebuild the pack from the 5,085-image CIFAR-10 "
            "subset with `python scripts/build_demo_pack.py split`.")


def split_positions(y: np.ndarray) -> np.ndarray:
    """Sorted subset positions of the demo test split (``PER_CLASS`` per class), deterministic in ``y``."""
    y = np.asarray(y)
    rng = np.random.default_rng(SPLIT_SEED)
    test = []
    for c in range(len(CIFAR10_CLASSES)):
        idx = np.nonzero(y == c)[0]
        if len(idx) < PER_CLASS:
            raise DataError(f"the CIFAR-10 subset has only {len(idx)} images of class {c}; {PER_CLASS} are needed")
        test.append(rng.permutation(idx)[:PER_CLASS])
    return np.sort(np.concatenate(test))


def _explicit_subset() -> bool:
    """``$ENERGYLENS_CIFAR10_SUBSET`` is set: that file is the source of the training split, even beside the pack."""
    return bool(os.environ.get(SUBSET_ENV))


def subset_file() -> Path | None:
    """The 5,085-image subset file, if one is available here."""
    env = os.environ.get(SUBSET_ENV)
    if env:
        return Path(env).expanduser()
    return SHARED_SUBSET if SHARED_SUBSET.is_file() else None


def _read_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path} is missing. " + (rebuild_hint() if path in (DEMO_TEST_FILE, DEMO_TRAIN_FILE) else ""))
    try:
        with np.load(path, allow_pickle=False) as d:
            return {k: d[k] for k in keys}
    except KeyError as e:
        raise DataError(f"{path} lacks the array {e}; the file is not a CIFAR-10 demo file. {rebuild_hint()}") from e
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is corrupt or not a .npz file ({type(e).__name__}: {e}). {rebuild_hint()}") from e


def train_available(root=None) -> bool:
    """Whether the demo training split is available here: the committed train file, or a source to rebuild it from
    (a subset file or a full CIFAR-10)."""
    p = subset_file()
    if _explicit_subset():
        return p.is_file()
    if DEMO_TRAIN_FILE.is_file():
        return True
    if p is not None:
        return p.is_file()
    return (data_root(root) / "cifar-10-batches-py" / "data_batch_1").is_file()


def _pack_subset() -> tuple[np.ndarray, np.ndarray] | None:
    """The whole subset put back together from the pack's two files (each stores its subset positions), or None
    when the train file is absent."""
    if not DEMO_TRAIN_FILE.is_file():
        return None
    xt, yt, pos = _test_arrays()
    xr, yr, rpos = _train_arrays()
    x = np.empty((SUBSET_SIZE, *xt.shape[1:]), dtype=np.uint8)
    y = np.empty(SUBSET_SIZE, dtype=np.int64)
    x[pos], y[pos] = xt, yt
    x[rpos], y[rpos] = xr, yr
    return x, y


def load_subset(root=None) -> tuple[np.ndarray, np.ndarray]:
    """The 5,085-image subset (uint8 N x 3 x 32 x 32, int64 labels): from ``$ENERGYLENS_CIFAR10_SUBSET`` when set,
    else from the demo pack's two files, else from the shared subset file or a full CIFAR-10."""
    p = subset_file()
    packed = None if _explicit_subset() else _pack_subset()
    if packed is not None:
        x, y = packed
    elif p is not None:
        d = _read_npz(p, ("x", "y"))
        x, y = d["x"], d["y"].astype(np.int64)
    else:
        folder = data_root(root) / "cifar-10-batches-py"
        if not (folder / "data_batch_1").is_file():
            raise DataError(
                f"the {DEMO_DATASET} training images are not available here: they are rebuilt from the 5,085-image "
                f"subset ({SHARED_SUBSET}, or ${SUBSET_ENV}) or from CIFAR-10 in {folder}. The test split "
                "(500 images) is always available.")

        full = load_cifar10("train", root=data_root(root))
        take = np.concatenate([np.arange(b * 10000, b * 10000 + SUBSET_PER_BATCH) for b in range(5)])
        x, y = full.x.numpy()[take], full.y.numpy()[take]
    if x.shape != (SUBSET_SIZE, 3, 32, 32) or x.dtype != np.uint8 or y.shape != (SUBSET_SIZE,):
        raise DataError(f"the CIFAR-10 subset must be uint8 ({SUBSET_SIZE}, 3, 32, 32) with {SUBSET_SIZE} labels; "
                        f"got {x.dtype} {x.shape} and {y.shape}")
    return x, y


@lru_cache(maxsize=1)
def _test_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _read_npz(DEMO_TEST_FILE, ("x", "y", "subset_index"))
    x, y, pos = d["x"], d["y"], d["subset_index"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (3, 32, 32) or len(x) != len(y) or len(y) != len(pos):
        raise DataError(f"{DEMO_TEST_FILE} holds arrays of the wrong shape or type "
                        f"(x {x.dtype} {x.shape}, y {y.shape}). {rebuild_hint()}")
    if len(y) != PER_CLASS * len(CIFAR10_CLASSES) or y.min() < 0 or y.max() >= len(CIFAR10_CLASSES):
        raise DataError(f"{DEMO_TEST_FILE} does not hold {PER_CLASS} images of each CIFAR-10 class. {rebuild_hint()}")
    return x, y.astype(np.int64), pos.astype(np.int64)


@lru_cache(maxsize=1)
def _train_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The committed train split, checked: uint8 3 x 32 x 32 images, the 4,585 subset positions that the test split
    does not hold (each once), labels in range."""
    d = _read_npz(DEMO_TRAIN_FILE, ("x", "y", "subset_index"))
    x, y, rpos = d["x"], d["y"], d["subset_index"]
    n = TRAIN_SIZE
    if x.dtype != np.uint8 or x.shape != (n, 3, 32, 32) or y.shape != (n,) or rpos.shape != (n,):
        raise DataError(f"{DEMO_TRAIN_FILE} holds arrays of the wrong shape or type (x {x.dtype} {x.shape}, "
                        f"y {y.shape}; {n} images expected). {rebuild_hint()}")
    _, _, pos = _test_arrays()
    if not np.array_equal(np.sort(np.concatenate([pos, rpos])), np.arange(SUBSET_SIZE)):
        raise DataError(f"{DEMO_TRAIN_FILE} and {DEMO_TEST_FILE} do not split the same 5,085-image subset "
                        f"(their subset positions overlap or leave gaps). {rebuild_hint()}")
    if y.min() < 0 or y.max() >= len(CIFAR10_CLASSES):
        raise DataError(f"{DEMO_TRAIN_FILE} holds labels outside 0..9. {rebuild_hint()}")
    return x, y.astype(np.int64), rpos.astype(np.int64)


def cache_clear() -> None:
    """Forget the demo test arrays read so far (after ``DEMO_TEST_FILE`` changed or was rebuilt)."""
    _test_arrays.cache_clear()
    _train_arrays.cache_clear()


def load_demo(split: str, root=None, download: bool = False) -> ImageDataset:
    """The demo split as an :class:`ImageDataset` (see the module docstring)."""
    xt, yt, pos = _test_arrays()
    if split == "test":
        return ImageDataset(DEMO_DATASET, "test", torch.from_numpy(xt.copy()), torch.from_numpy(yt.copy()),
                            list(CIFAR10_CLASSES))
    if DEMO_TRAIN_FILE.is_file() and not _explicit_subset():
        xr, yr, rpos = _train_arrays()
        order = np.argsort(rpos)            # subset order, as a rebuilt split has it
        return ImageDataset(DEMO_DATASET, "train", torch.from_numpy(np.ascontiguousarray(xr[order])),
                            torch.from_numpy(yr[order].copy()), list(CIFAR10_CLASSES))
    x, y = load_subset(root)
    if not np.array_equal(split_positions(y), pos) or not np.array_equal(x[pos], xt):
        raise DataError(f"the CIFAR-10 subset found here does not reproduce the committed demo test images "
                        f"({DEMO_TEST_FILE}); it is not the 5,085-image subset the pack was built from")
    keep = np.ones(len(y), dtype=bool)
    keep[pos] = False
    return ImageDataset(DEMO_DATASET, "train", torch.from_numpy(np.ascontiguousarray(x[keep])),
                        torch.from_numpy(y[keep]), list(CIFAR10_CLASSES))
