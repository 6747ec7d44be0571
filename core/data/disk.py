"""Loaders for the on-disk datasets: CIFAR-10, CIFAR-100, SVHN and Tiny-ImageNet-200.

Each loader takes ``(split, root=<Path>, download=<bool>)`` with ``split`` in ``{"train", "test"}``
and returns an :class:`~core.data.ImageDataset` whose images are uint8 N x 3 x H x W. Anything
wrong with the files on disk (missing, truncated, corrupt, unsafe) is reported as a
:class:`~core.errors.DataError` whose message names the path and says how to fix it.

Expected layouts under ``root``::

    cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}    (torchvision python format)
    cifar-100-python/{train, test, meta}
    svhn/{train,test}_32x32.mat
    tiny-imagenet-200/{wnids.txt, words.txt, train/<wnid>/images/*.JPEG,
                       val/images/*.JPEG, val/val_annotations.txt}      ("test" = the val folder)

The CIFAR files are Python pickles. They are read with :class:`~core.data.unpickle.RestrictedUnpickler`,
which only resolves the handful of callables needed to rebuild numpy arrays and plain containers, so a
tampered file can never execute code while it is being loaded.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from ..storage import StorageError, atomic_write
from .dataset import CIFAR10_CLASSES, CIFAR100_CLASSES, ImageDataset, data_root
from .unpickle import RestrictedUnpickler, _first_line, safe_unpickle

__all__ = ["load_cifar10", "load_cifar100", "load_svhn", "load_tinyimagenet", "RestrictedUnpickler",
           "safe_unpickle", "TINYIMAGENET_URL", "TINY_CACHE_VERSION", "decode_images"]

SPLITS = ("train", "test")

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/{split}_32x32.mat"
TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"

TINY_DIR = "tiny-imagenet-200"
TINY_SIZE = 64
TINY_CACHE_VERSION = 1
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _CifarFormat:
    name: str               # dataset name in the registry
    title: str              # for messages
    folder: str
    files: dict[str, tuple[str, ...]]
    meta_file: str
    names_key: str
    labels_key: str
    num_classes: int
    url: str
    torchvision_class: str


_CIFAR10 = _CifarFormat(
    "cifar10", "CIFAR-10", "cifar-10-batches-py",
    {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    "batches.meta", "label_names", "labels", 10, CIFAR10_URL, "CIFAR10")

_CIFAR100 = _CifarFormat(
    "cifar100", "CIFAR-100", "cifar-100-python", {"train": ("train",), "test": ("test",)},
    "meta", "fine_label_names", "fine_labels", 100, CIFAR100_URL, "CIFAR100")


def load_cifar10(split: str, root: str | os.PathLike | None = None, download: bool = False) -> ImageDataset:
    """CIFAR-10 from ``<root>/cifar-10-batches-py`` (50,000 train / 10,000 test, 3 x 32 x 32)."""
    return _load_cifar(_CIFAR10, split, data_root(root), download)


def load_cifar100(split: str, root: str | os.PathLike | None = None, download: bool = False) -> ImageDataset:
    """CIFAR-100 (fine labels) from ``<root>/cifar-100-python`` (50,000 / 10,000, 3 x 32 x 32)."""
    return _load_cifar(_CIFAR100, split, data_root(root), download)


def _load_cifar(fmt: _CifarFormat, split: str, root: Path, download: bool) -> ImageDataset:
    _check_split(split)
    folder = root / fmt.folder
    paths = [folder / f for f in fmt.files[split]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        if not download:
            raise DataError(
                f"{fmt.title} {split} split not found: missing {_join(missing)}. Download {fmt.url} and "
                f"extract it into {root} (it creates {folder} with {_join(_all_cifar_files(fmt))}), or load "
                "it with download=True when online.")
        _download_cifar(fmt, split, root)
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise DataError(f"{fmt.title} download finished but {_join(missing)} is still missing; extract "
                            f"{fmt.url} into {root} by hand.")

    class_names = _cifar_class_names(fmt, folder / fmt.meta_file)
    batches = [_read_cifar_batch(p, fmt, len(class_names)) for p in paths]
    y = torch.from_numpy(np.concatenate([labels for _, labels in batches]))
    x = torch.empty((len(y), 3, 32, 32), dtype=torch.uint8)
    x_np = x.numpy()
    start = 0
    while batches:  # pop each batch as it is copied so that its memory is freed straight away
        data, _ = batches.pop(0)
        x_np[start:start + len(data)] = data.reshape(-1, 3, 32, 32)
        start += len(data)
        del data
    return ImageDataset(fmt.name, split, x, y, class_names)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split must be 'train' or 'test', got '{split}'")


def _join(paths) -> str:
    return ", ".join(str(p) for p in paths)


def _all_cifar_files(fmt: _CifarFormat) -> list[str]:
    return [*fmt.files["train"], *fmt.files["test"], fmt.meta_file]


def _text(value: Any) -> str:
    """A class name or dict key from a pickle: Python-3 ``bytes`` or Python-2 ``str`` (latin-1)."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(value).decode("latin1")
    return str(value)


def _str_keys(obj: Any, path: Path) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR batch: expected a dict, found {type(obj).__name__}")
    return {_text(k): v for k, v in obj.items()}


def _cifar_class_names(fmt: _CifarFormat, meta_path: Path) -> list[str]:
    """Class names from the meta file; the registry's names when the file is absent."""
    if not meta_path.is_file():
        return list(CIFAR10_CLASSES) if fmt is _CIFAR10 else list(CIFAR100_CLASSES)
    meta = _str_keys(safe_unpickle(meta_path), meta_path)
    names = meta.get(fmt.names_key)
    if not isinstance(names, (list, tuple, np.ndarray)) or len(names) != fmt.num_classes:
        if names is None:
            found = "no such key"
        elif isinstance(names, (list, tuple, np.ndarray)):
            found = f"{len(names)} names"
        else:
            found = f"a {type(names).__name__}"
        raise DataError(f"{meta_path} is not a valid {fmt.title} meta file: '{fmt.names_key}' should list "
                        f"{fmt.num_classes} class names, found {found}. Delete it (the default names are "
                        "then used) or extract it again from the archive.")
    return [_text(n) for n in names]


def _read_cifar_batch(path: Path, fmt: _CifarFormat, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as (uint8 N x 3072 row-major RGB planes, int64 N labels), validated."""
    batch = _str_keys(safe_unpickle(path), path)
    if "data" not in batch or fmt.labels_key not in batch:
        raise DataError(f"{path} is not a {fmt.title} batch: it needs keys 'data' and '{fmt.labels_key}', "
                        f"found {sorted(batch)}")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype.kind not in "ui":
        raise DataError(f"{path}: 'data' must be an integer numpy array, found "
                        f"{getattr(data, 'dtype', type(data).__name__)}")
    if data.ndim == 4 and data.shape[1:] == (3, 32, 32):
        data = data.reshape(len(data), -1)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' must have shape N x 3072 (3 x 32 x 32 images), found {data.shape}")
    if data.dtype != np.uint8:
        if data.size and (data.min() < 0 or data.max() > 255):
            raise DataError(f"{path}: pixel values must lie in 0..255")
        data = data.astype(np.uint8)
    try:
        labels = np.asarray(batch[fmt.labels_key])
    except Exception as e:  # noqa: BLE001 - odd label containers
        raise DataError(f"{path}: '{fmt.labels_key}' is not a list of integers ({_first_line(e)})") from e
    if labels.ndim != 1 or labels.dtype.kind not in "ui" or len(labels) != len(data):
        raise DataError(f"{path}: '{fmt.labels_key}' must be {len(data)} integer labels (one per image), "
                        f"found shape {labels.shape} of {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels must lie in 0..{num_classes - 1}, "
                        f"found {int(labels.min())}..{int(labels.max())}")
    return data, labels.astype(np.int64)


def _download_cifar(fmt: _CifarFormat, split: str, root: Path) -> None:
    """Fetch the archive with torchvision; any failure becomes a DataError with manual steps."""
    manual = (f"Download {fmt.url} by hand and extract it into {root} so that {root / fmt.folder} "
              f"contains {_join(_all_cifar_files(fmt))}.")
    try:
        import torchvision.datasets as tvd  # lazy: heavy (seconds to import), only to download

        getattr(tvd, fmt.torchvision_class)(str(root), train=(split == "train"), download=True)
    except Exception as e:  # noqa: BLE001 - network, checksum, disk errors all mean "download failed"
        raise DataError(f"{fmt.title} download failed ({type(e).__name__}: {_first_line(e)}). {manual}") from e


# --------------------------------------------------------------------------------------------
# SVHN
# --------------------------------------------------------------------------------------------

def load_svhn(split: str, root: str | os.PathLike | None = None, download: bool = False) -> ImageDataset:
    """SVHN cropped digits from ``<root>/svhn/{split}_32x32.mat`` (73,257 train / 26,032 test).

    The ``.mat`` files hold ``X`` as 32 x 32 x 3 x N uint8 and ``y`` as N x 1 with label 10 for the
    digit 0; labels are mapped to 0..9 so that label ``k`` is the digit ``k``.
    """
    _check_split(split)
    root = data_root(root)
    folder = root / "svhn"
    path = folder / f"{split}_32x32.mat"
    url = SVHN_URL.format(split=split)
    if not path.is_file():
        if not download:
            raise DataError(f"SVHN {split} split not found: missing {path}. Download {url} into {folder}, "
                            "or load it with download=True when online.")
        try:
            import torchvision.datasets as tvd  # lazy: heavy (seconds to import), only to download

            tvd.SVHN(str(folder), split=split, download=True)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"SVHN download failed ({type(e).__name__}: {_first_line(e)}). Download {url} "
                            f"by hand and save it as {path}.") from e
        if not path.is_file():
            raise DataError(f"SVHN download finished but {path} is still missing; download {url} by hand.")

    x_hwcn, y = _read_svhn_mat(path)
    # 32 x 32 x 3 x N (H, W, C, N) -> N x 3 x 32 x 32 in one contiguous copy.
    x = torch.from_numpy(np.ascontiguousarray(x_hwcn.transpose(3, 2, 0, 1)))
    del x_hwcn
    return ImageDataset("svhn", split, x, torch.from_numpy(y), [str(i) for i in range(10)])


def _read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat  # lazy: scipy only for SVHN's .mat files

    try:
        mat = loadmat(str(path), variable_names=["X", "y"])
    except NotImplementedError as e:  # MATLAB v7.3 (HDF5) files
        raise DataError(f"{path} is a MATLAB v7.3 file; SVHN's original v5 .mat files are expected. "
                        f"Download it again from {SVHN_URL.format(split=path.name.split('_')[0])}.") from e
    except MemoryError as e:
        raise DataError(f"{path} is corrupt (it asks for more memory than is available)") from e
    except Exception as e:  # noqa: BLE001 - scipy raises many types for corrupt files
        raise DataError(f"{path} is corrupt or truncated and could not be read "
                        f"({type(e).__name__}: {_first_line(e)}). Delete it and download again.") from e
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path} is not an SVHN file: it needs variables 'X' and 'y', found "
                        f"{sorted(k for k in mat if not k.startswith('__'))}")
    x, y = mat["X"], np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: 'X' must have shape 32 x 32 x 3 x N, found {x.shape}")
    if len(y) != x.shape[3]:
        raise DataError(f"{path}: 'y' has {len(y)} labels for {x.shape[3]} images")
    if x.dtype != np.uint8:
        if x.dtype.kind not in "uif" or (x.dtype.kind == "f" and not np.isfinite(x).all()) or \
                (x.size and (x.min() < 0 or x.max() > 255)):
            raise DataError(f"{path}: 'X' must hold pixel values 0..255, found dtype {x.dtype}")
        x = np.round(x).astype(np.uint8) if x.dtype.kind == "f" else x.astype(np.uint8)
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or (y != np.round(y)).any():
            raise DataError(f"{path}: 'y' must hold integer labels")
    elif y.dtype.kind not in "ui":
        raise DataError(f"{path}: 'y' must hold integer labels, found dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() > 10):
        raise DataError(f"{path}: labels must lie in 0..10 (10 is the digit 0), found {int(y.min())}..{int(y.max())}")
    y[y == 10] = 0
    return x, y


# --------------------------------------------------------------------------------------------
# Tiny-ImageNet-200
# --------------------------------------------------------------------------------------------

def load_tinyimagenet(split: str, root: str | os.PathLike | None = None, download: bool = False) -> ImageDataset:
    """Tiny-ImageNet-200 from ``<root>/tiny-imagenet-200`` (100,000 train / 10,000 val, 3 x 64 x 64).

    ``split="test"`` is the labelled ``val`` folder. Class ``k`` is line ``k`` of ``wnids.txt``; its
    name is the first synonym in ``words.txt`` (the wnid itself when that file is absent). Decoded
    images are cached in ``.energylens-cache-<split>.npz`` inside the dataset folder and reused
    while the cache is newer than the image folders.
    """
    _check_split(split)
    root = data_root(root)
    base = root / TINY_DIR
    how = (f"Download {TINYIMAGENET_URL} and unzip it into {root} so that {base / 'wnids.txt'}, "
           f"{base / 'train'} and {base / 'val'} exist.")
    if download:
        how += " (Tiny-ImageNet is not downloaded automatically.)"
    wnids_path = base / "wnids.txt"
    if not wnids_path.is_file():
        what = f"missing {wnids_path}" if base.is_dir() else f"missing folder {base}"
        raise DataError(f"Tiny-ImageNet not found: {what}. {how}")
    wnids = _read_wnids(wnids_path)
    class_names = _tiny_class_names(base / "words.txt", wnids)

    sources = _tiny_source_paths(base, split, wnids, how)
    cache_path = base / f".energylens-cache-{split}.npz"
    cached = _read_tiny_cache(cache_path, wnids, split, sources)
    if cached is not None:
        x, y = cached
    else:
        files, labels = (_tiny_train_files if split == "train" else _tiny_val_files)(base, wnids, how)
        x = decode_images(files)
        y = torch.from_numpy(labels)
        _write_tiny_cache(cache_path, x, y, wnids, split)
    return ImageDataset("tinyimagenet", split, x, y, class_names)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise DataError(f"could not read {path}: {e.strerror or e}") from e


def _read_wnids(path: Path) -> list[str]:
    wnids = [line.strip() for line in _read_lines(path) if line.strip()]
    if not wnids:
        raise DataError(f"{path} is empty: it should list one WordNet id (e.g. n01443537) per line")
    if len(set(wnids)) != len(wnids):
        raise DataError(f"{path} lists some WordNet ids more than once")
    return wnids


def _tiny_class_names(words_path: Path, wnids: list[str]) -> list[str]:
    """First synonym from ``words.txt`` (``<wnid>\\t<name>, <name>, ...``); the wnid when unknown."""
    names = {}
    if words_path.is_file():
        wanted = set(wnids)
        for line in _read_lines(words_path):
            wnid, _, words = line.partition("\t")
            wnid = wnid.strip()
            if wnid in wanted and words.strip():
                names[wnid] = words.split(",")[0].strip()
    return [names.get(w, w) for w in wnids]


def _tiny_source_paths(base: Path, split: str, wnids: list[str], how: str) -> list[Path]:
    """The files and folders whose modification time invalidates the split's cache.

    Adding, removing or renaming images changes the mtime of the folder holding them. The dataset
    folder itself is left out on purpose: writing the cache changes its mtime.
    """
    paths = [base / "wnids.txt", base / "words.txt"]
    if split == "train":
        train = base / "train"
        if not train.is_dir():
            raise DataError(f"Tiny-ImageNet train split not found: missing folder {train}. {how}")
        paths.append(train)
        for w in wnids:
            paths += [train / w, train / w / "images"]
    else:
        val = base / "val"
        if not (val / "val_annotations.txt").is_file():
            raise DataError(f"Tiny-ImageNet test (val) split not found: missing {val / 'val_annotations.txt'}. "
                            f"{how}")
        paths += [val, val / "images", val / "val_annotations.txt"]
    return paths


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _tiny_train_files(base: Path, wnids: list[str], how: str) -> tuple[list[Path], np.ndarray]:
    files: list[Path] = []
    labels: list[int] = []
    for k, w in enumerate(wnids):
        folder = base / "train" / w / "images"
        if not folder.is_dir():
            raise DataError(f"Tiny-ImageNet train folder for class {w} not found: missing {folder}. {how}")
        imgs = sorted(p for p in folder.iterdir() if _is_image(p))
        files += imgs
        labels += [k] * len(imgs)
    if not files:
        raise DataError(f"no images found under {base / 'train'}/<wnid>/images. {how}")
    return files, np.asarray(labels, dtype=np.int64)


def _tiny_val_files(base: Path, wnids: list[str], how: str) -> tuple[list[Path], np.ndarray]:
    """Images in the order of ``val_annotations.txt`` (``<file>\\t<wnid>\\t<box...>``)."""
    ann = base / "val" / "val_annotations.txt"
    index = {w: k for k, w in enumerate(wnids)}
    files: list[Path] = []
    labels: list[int] = []
    for n, line in enumerate(_read_lines(ann), start=1):
        if not line.strip():
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) < 2:
            raise DataError(f"{ann} line {n} is malformed: expected '<file>\\t<wnid>\\t...', got {line!r}")
        name, wnid = parts[0].strip(), parts[1].strip()
        if wnid not in index:
            raise DataError(f"{ann} line {n}: class {wnid} is not listed in {base / 'wnids.txt'}")
        if Path(name).name != name:
            raise DataError(f"{ann} line {n}: image name {name!r} must be a plain file name")
        path = base / "val" / "images" / name
        if not path.is_file():
            raise DataError(f"Tiny-ImageNet val image missing: {path} (listed in {ann} line {n}). {how}")
        files.append(path)
        labels.append(index[wnid])
    if not files:
        raise DataError(f"{ann} lists no images. {how}")
    return files, np.asarray(labels, dtype=np.int64)


def _decode_one(path: Path) -> np.ndarray:
    """One image as uint8 3 x 64 x 64 RGB; other modes are converted and other sizes resized."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (TINY_SIZE, TINY_SIZE):
                im = im.resize((TINY_SIZE, TINY_SIZE), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - Pillow raises many types (incl. DecompressionBombError)
        raise DataError(f"{path} is not a readable image ({_first_line(e)}). Delete the dataset folder and "
                        f"unzip {TINYIMAGENET_URL} again.") from e
    return arr.transpose(2, 0, 1)


def decode_images(files: list[Path], workers: int | None = None) -> torch.Tensor:
    """Decode ``files`` straight into one preallocated uint8 N x 3 x 64 x 64 tensor.

    Pillow releases the GIL while decoding, so a small thread pool gives a real speed-up.
    """
    x = torch.empty((len(files), 3, TINY_SIZE, TINY_SIZE), dtype=torch.uint8)
    out = x.numpy()
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    chunk = 256

    def fill(start: int) -> None:
        for i in range(start, min(start + chunk, len(files))):
            out[i] = _decode_one(files[i])

    starts = range(0, len(files), chunk)
    if workers == 1 or len(files) <= chunk:
        for s in starts:
            fill(s)
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="energylens-decode") as pool:
            futures = [pool.submit(fill, s) for s in starts]
            try:
                for fut in futures:
                    fut.result()
            except BaseException:
                for fut in futures:  # stop decoding the rest after the first bad file
                    fut.cancel()
                raise
    return x


def _newest_mtime_ns(paths: list[Path]) -> int:
    newest = 0
    for p in paths:
        try:
            newest = max(newest, p.stat().st_mtime_ns)
        except FileNotFoundError:
            continue
    return newest


def _read_tiny_cache(path: Path, wnids: list[str], split: str,
                     sources: list[Path]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached arrays when the cache exists, matches and is newer than every source; else None.

    A stale, foreign or unreadable cache is ignored (and later overwritten), never an error.
    """
    try:
        if path.stat().st_mtime_ns <= _newest_mtime_ns(sources):
            return None
    except FileNotFoundError:
        return None
    try:
        with np.load(path, allow_pickle=False) as d:
            if int(d["version"]) != TINY_CACHE_VERSION or str(d["split"]) != split or \
                    d["wnids"].tolist() != wnids:
                return None
            x, y = d["x"], d["y"]
    except Exception:  # noqa: BLE001 - a corrupt cache is simply rebuilt
        return None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (3, TINY_SIZE, TINY_SIZE) or \
            y.ndim != 1 or len(y) != len(x) or (y.size and (y.min() < 0 or y.max() >= len(wnids))):
        return None
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64, copy=False))


def _write_tiny_cache(path: Path, x: torch.Tensor, y: torch.Tensor, wnids: list[str], split: str) -> None:
    """Write the cache atomically; a read-only dataset folder only costs a warning."""
    def write(f) -> None:
        np.savez(f, x=x.numpy(), y=y.numpy(), wnids=np.asarray(wnids), split=np.asarray(split),
                 version=np.asarray(TINY_CACHE_VERSION))

    try:
        atomic_write(path, write)
    except StorageError as e:
        warnings.warn(f"could not cache decoded Tiny-ImageNet images ({e}); they will be decoded again "
                      "next time", RuntimeWarning, stacklevel=3)
