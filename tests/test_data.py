"""Dataset loading: on-disk formats written for real in tmp_path, embedded digits, npz, helpers.

The fixtures below write tiny files in the genuine formats (CIFAR python pickles with the keys
torchvision's files have, SVHN ``.mat`` files, a Tiny-ImageNet folder of JPEGs) and check that
``core.data.load_dataset`` gives back exactly what was written. Nothing touches the network.
"""

from __future__ import annotations

import codecs
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import core.data as cd
from core.data import CIFAR10_CLASSES, ImageDataset, augment, load_dataset, probe_indices, validate_images
from core.data import disk
from core.errors import DataError, InputError

# --------------------------------------------------------------------------------------------
# Writers for the real on-disk formats
# --------------------------------------------------------------------------------------------


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler lets us change how bytes are written
    """Writes ``bytes`` as Python-2 ``str`` (SHORT_BINSTRING / BINSTRING), like the original
    CIFAR files made with Python 2's cPickle at protocol 2."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def py2_pickle(obj) -> bytes:
    """``obj`` pickled the way the CIFAR archives are: protocol 2, py2 ``str`` keys, ``numpy.core``."""
    import io

    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 2 names its module numpy._core; the original files (numpy 1.x) say numpy.core.
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def py3_pickle(obj, protocol: int) -> bytes:
    return pickle.dumps(obj, protocol=protocol)


def cifar_batch(x: np.ndarray, y: np.ndarray, label_key: bytes = b"labels", label: bytes = b"batch") -> dict:
    """A batch dict with the keys of torchvision's python-format files (bytes keys)."""
    n = len(x)
    d = {b"batch_label": label, label_key: [int(v) for v in y], b"data": x.reshape(n, -1).copy(),
         b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    if label_key == b"fine_labels":
        d[b"coarse_labels"] = [int(v) // 5 for v in y]
    return d


def write_cifar10(root: Path, x_train=None, y_train=None, x_test=None, y_test=None, meta=True,
                  dumps=py2_pickle) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    if x_train is not None:
        for i, (xs, ys) in enumerate(zip(np.array_split(x_train, 5), np.array_split(y_train, 5)), start=1):
            (folder / f"data_batch_{i}").write_bytes(dumps(cifar_batch(xs, ys, label=f"batch {i}".encode())))
    if x_test is not None:
        (folder / "test_batch").write_bytes(dumps(cifar_batch(x_test, y_test)))
    if meta:
        names = [n.encode() for n in CIFAR10_CLASSES]
        (folder / "batches.meta").write_bytes(
            dumps({b"num_cases_per_batch": 10000, b"label_names": names, b"num_vis": 3072}))
    return folder


def random_images(n: int, seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, size, size), dtype=np.uint8)


def random_labels(n: int, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, size=n).astype(np.int64)


def assert_dataset(ds: ImageDataset, name: str, split: str, x: np.ndarray, y: np.ndarray) -> None:
    assert isinstance(ds, ImageDataset)
    assert (ds.name, ds.split) == (name, split)
    assert ds.x.dtype == torch.uint8 and ds.y.dtype == torch.int64
    assert tuple(ds.x.shape) == x.shape and ds.x.is_contiguous()
    np.testing.assert_array_equal(ds.x.numpy(), x)
    np.testing.assert_array_equal(ds.y.numpy(), y)
    imgs = ds.images()
    assert imgs.dtype == torch.float32 and float(imgs.min()) >= 0.0 and float(imgs.max()) <= 1.0
    torch.testing.assert_close(imgs, torch.from_numpy(x).float() / 255)


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# --------------------------------------------------------------------------------------------


def test_cifar10_py2_format_round_trip(tmp_path):
    xtr, ytr = random_images(23, 0), random_labels(23, 10, 1)
    xte, yte = random_images(7, 2), random_labels(7, 10, 3)
    write_cifar10(tmp_path, xtr, ytr, xte, yte)

    train = load_dataset("cifar10", "train", root=tmp_path)
    test = load_dataset("cifar10", "test", root=tmp_path)
    assert_dataset(train, "cifar10", "train", xtr, ytr)
    assert_dataset(test, "cifar10", "test", xte, yte)
    assert train.class_names == CIFAR10_CLASSES and train.num_classes == 10
    assert train.input_shape == (3, 32, 32)


def test_cifar10_pixel_layout_is_rgb_planes(tmp_path):
    """Row 0 of 'data' is R plane (1024 values, row-major), then G, then B."""
    row = np.concatenate([np.full(1024, 10), np.arange(1024) % 256, np.full(1024, 200)]).astype(np.uint8)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(py2_pickle({b"data": row[None, :], b"labels": [4]}))
    ds = load_dataset("cifar10", "test", root=tmp_path)
    assert (ds.x[0, 0] == 10).all() and (ds.x[0, 2] == 200).all()
    assert int(ds.x[0, 1, 0, 5]) == 5 and int(ds.x[0, 1, 1, 0]) == 32 and int(ds.x[0, 1, 7, 31]) == (7 * 32 + 31) % 256
    assert ds.y.tolist() == [4]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_python3_pickles(tmp_path, protocol):
    xte, yte = random_images(5, 4), random_labels(5, 10, 5)
    write_cifar10(tmp_path, x_test=xte, y_test=yte, dumps=lambda o: py3_pickle(o, protocol))
    assert_dataset(load_dataset("cifar10", "test", root=tmp_path), "cifar10", "test", xte, yte)


def test_cifar10_train_only_needs_train_batches(tmp_path):
    xtr, ytr = random_images(10, 6), random_labels(10, 10, 7)
    folder = write_cifar10(tmp_path, xtr, ytr, meta=False)
    ds = load_dataset("cifar10", "train", root=tmp_path)
    assert_dataset(ds, "cifar10", "train", xtr, ytr)
    assert ds.class_names == CIFAR10_CLASSES  # default names without batches.meta

    with pytest.raises(DataError) as err:
        load_dataset("cifar10", "test", root=tmp_path)
    assert str(folder / "test_batch") in str(err.value)
    assert "data_batch_1" not in str(err.value).split(". Download")[0]


def test_cifar10_missing_folder_message(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", "train", root=tmp_path)
    msg = str(err.value)
    for i in range(1, 6):
        assert str(tmp_path / "cifar-10-batches-py" / f"data_batch_{i}") in msg
    assert "cifar-10-python.tar.gz" in msg and "download=True" in msg


def test_cifar10_partial_train_batches_reported(tmp_path):
    folder = write_cifar10(tmp_path, random_images(10, 8), random_labels(10, 10, 9))
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", "train", root=tmp_path)
    missing_part = str(err.value).split(". Download")[0]
    assert str(folder / "data_batch_3") in missing_part and str(folder / "data_batch_2") not in missing_part


def test_cifar100_round_trip(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    xtr, ytr = random_images(12, 10), random_labels(12, 100, 11)
    xte, yte = random_images(4, 12), random_labels(4, 100, 13)
    (folder / "train").write_bytes(py2_pickle(cifar_batch(xtr, ytr, b"fine_labels")))
    (folder / "test").write_bytes(py2_pickle(cifar_batch(xte, yte, b"fine_labels")))
    fine = [f"fine{i}".encode() for i in range(100)]
    coarse = [f"coarse{i}".encode() for i in range(20)]
    (folder / "meta").write_bytes(py2_pickle({b"fine_label_names": fine, b"coarse_label_names": coarse}))

    train = load_dataset("cifar100", "train", root=tmp_path)
    assert_dataset(train, "cifar100", "train", xtr, ytr)
    assert_dataset(load_dataset("cifar100", "test", root=tmp_path), "cifar100", "test", xte, yte)
    assert train.class_names == [f"fine{i}" for i in range(100)] and train.num_classes == 100

    (folder / "train").unlink()
    with pytest.raises(DataError, match="cifar-100-python"):
        load_dataset("cifar100", "train", root=tmp_path)


class _Reduce:
    """Pickles as a call of ``func(*args)``."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


class _Evil:
    """A pickle payload whose reduce would run a shell command creating ``marker``."""

    def __init__(self, marker: Path, func=os.system):
        self.marker, self.func = marker, func

    def __reduce__(self):
        if self.func is os.system:
            return (os.system, (f"touch '{self.marker}'",))
        return (self.func, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("func", [os.system, eval], ids=["os.system", "builtins.eval"])
@pytest.mark.parametrize("where", ["data", "labels", "meta"])
def test_malicious_cifar_pickle_is_refused(tmp_path, func, where):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batch = cifar_batch(random_images(2, 0), np.array([1, 2]))
    meta = {b"label_names": [n.encode() for n in CIFAR10_CLASSES]}
    if where == "meta":
        meta[b"payload"] = _Evil(marker, func)
    else:
        batch[b"data" if where == "data" else b"labels"] = _Evil(marker, func)
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))

    with pytest.raises(DataError) as err:
        load_dataset("cifar10", "test", root=tmp_path)
    assert not marker.exists(), "the pickle payload was executed"
    assert "refusing" in str(err.value) and str(folder) in str(err.value)


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    p = tmp_path / "f.pkl"
    p.write_bytes(pickle.dumps({"x": Path("a")}))
    with pytest.raises(DataError, match="pathlib"):
        disk.safe_unpickle(p)
    p.write_bytes(pickle.dumps(_Reduce(codecs.encode, ("61", "hex_codec")), protocol=2))
    with pytest.raises(DataError, match="latin-1"):
        disk.safe_unpickle(p)


@pytest.mark.parametrize("content", [
    b"",                                   # empty
    b"not a pickle at all",                # garbage
    None,                                  # truncated real batch (filled in below)
    pickle.dumps([1, 2, 3]),               # wrong container
    pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}),               # no labels
    pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),  # wrong width
    pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}),    # count mismatch
    pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}),  # out of range
    pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}),  # float pixels
], ids=["empty", "garbage", "truncated", "list", "no-labels", "width", "count", "range", "float"])
def test_corrupt_cifar_batch(tmp_path, content):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    if content is None:
        content = py2_pickle(cifar_batch(random_images(3, 1), np.array([0, 1, 2])))[:-500]
    (folder / "test_batch").write_bytes(content)
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", "test", root=tmp_path)
    assert str(folder / "test_batch") in str(err.value)


def test_corrupt_meta_is_reported(tmp_path):
    folder = write_cifar10(tmp_path, x_test=random_images(2, 0), y_test=np.array([0, 1]), meta=False)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b"]}))
    with pytest.raises(DataError, match="batches.meta"):
        load_dataset("cifar10", "test", root=tmp_path)


def test_cifar_download_failure_is_a_data_error(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    calls = []

    def offline(root, train=True, download=False, **kw):
        calls.append((root, train, download))
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tvd, "CIFAR10", offline)
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", "test", root=tmp_path, download=True)
    msg = str(err.value)
    assert "download failed" in msg and str(tmp_path / "cifar-10-batches-py") in msg and "test_batch" in msg
    assert calls == [(str(tmp_path), False, True)]


def test_cifar_download_then_parse(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    xte, yte = random_images(3, 5), random_labels(3, 10, 5)

    def fake_download(root, train=True, download=False, **kw):
        assert download and not train
        write_cifar10(Path(root), x_test=xte, y_test=yte)

    monkeypatch.setattr(tvd, "CIFAR10", fake_download)
    assert_dataset(load_dataset("cifar10", "test", root=tmp_path, download=True), "cifar10", "test", xte, yte)

    # Present files are never downloaded again.
    monkeypatch.setattr(tvd, "CIFAR10", lambda *a, **k: pytest.fail("downloaded although present"))
    load_dataset("cifar10", "test", root=tmp_path, download=True)


def test_real_cifar10_subset_round_trip(tmp_path, cifar_subset):
    x, y = cifar_subset
    write_cifar10(tmp_path, x, y, dumps=py2_pickle)
    ds = load_dataset("cifar10", "train", root=tmp_path)
    assert len(ds) == len(y) == 5085
    assert torch.equal(ds.x, torch.from_numpy(x)) and torch.equal(ds.y, torch.from_numpy(y))
    assert ds.class_names == CIFAR10_CLASSES
    assert np.bincount(ds.y.numpy(), minlength=10).tolist() == [517, 524, 490, 493, 537, 475, 503, 516, 529, 501]


# --------------------------------------------------------------------------------------------
# SVHN
# --------------------------------------------------------------------------------------------


def write_svhn(root: Path, split: str, x_nchw: np.ndarray, digits: np.ndarray) -> Path:
    """SVHN layout: X is 32 x 32 x 3 x N uint8, y is N x 1 with 10 standing for the digit 0."""
    from scipy.io import savemat

    folder = root / "svhn"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}_32x32.mat"
    y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(-1, 1)
    savemat(path, {"X": np.ascontiguousarray(x_nchw.transpose(2, 3, 1, 0)), "y": y})
    return path


def test_svhn_round_trip_maps_label_10_to_0(tmp_path):
    xtr, dtr = random_images(11, 20), np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0])
    xte, dte = random_images(3, 21), np.array([0, 9, 0])
    write_svhn(tmp_path, "train", xtr, dtr)
    write_svhn(tmp_path, "test", xte, dte)
    train = load_dataset("svhn", "train", root=tmp_path)
    assert_dataset(train, "svhn", "train", xtr, dtr)
    assert_dataset(load_dataset("svhn", "test", root=tmp_path), "svhn", "test", xte, dte)
    assert train.class_names == [str(i) for i in range(10)]


def test_svhn_missing_and_corrupt(tmp_path, monkeypatch):
    with pytest.raises(DataError) as err:
        load_dataset("svhn", "test", root=tmp_path)
    assert str(tmp_path / "svhn" / "test_32x32.mat") in str(err.value) and "download=True" in str(err.value)

    import torchvision.datasets as tvd

    def offline(root, split="train", download=False, **kw):
        assert Path(root) == tmp_path / "svhn" and split == "test" and download
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(tvd, "SVHN", offline)
    with pytest.raises(DataError, match="download failed"):
        load_dataset("svhn", "test", root=tmp_path, download=True)

    (tmp_path / "svhn").mkdir()
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file garbage" * 3)
    with pytest.raises(DataError, match="test_32x32.mat"):
        load_dataset("svhn", "test", root=tmp_path)

    from scipy.io import savemat

    savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1]])})
    with pytest.raises(DataError, match="1 labels for 2 images"):
        load_dataset("svhn", "test", root=tmp_path)


# --------------------------------------------------------------------------------------------
# Tiny-ImageNet
# --------------------------------------------------------------------------------------------

WNIDS = ["n02124075", "n01443537", "n09999999"]  # deliberately not sorted: wnids.txt order rules
WORDS = {"n01443537": "goldfish, Carassius auratus", "n02124075": "Egyptian cat", "n00001740": "entity"}


def smooth_image(seed: int, size: int = 64) -> np.ndarray:
    """A smooth H x W x 3 uint8 image (compresses to JPEG with tiny error)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    chans = [40 + 170 * (a * xx + (1 - a) * yy) for a in rng.uniform(0, 1, 3)]
    return np.clip(np.stack(chans, -1), 0, 255).round().astype(np.uint8)


def save_jpeg(path: Path, arr: np.ndarray, mode: str = "RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path, format="JPEG", quality=98)


def write_tinyimagenet(root: Path, words: bool = True) -> tuple[dict, dict]:
    """Two train images per class (one grayscale, one 80x80 to be resized) and four val images."""
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    if words:
        (base / "words.txt").write_text("".join(f"{k}\t{v}\n" for k, v in WORDS.items()))
    train = {}
    for k, w in enumerate(WNIDS):
        for i in range(2):
            img = smooth_image(10 * k + i)
            save_jpeg(base / "train" / w / "images" / f"{w}_{i}.JPEG", img)
            train[(k, i)] = img
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
    from PIL import Image

    # Class 0, image 1 replaced by a grayscale JPEG; class 2, image 0 by an 80x80 one.
    gray = smooth_image(99)[..., 0]
    save_jpeg(base / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_1.JPEG", gray)
    train[(0, 1)] = np.repeat(gray[..., None], 3, axis=2)
    big = smooth_image(98, size=80)
    save_jpeg(base / "train" / WNIDS[2] / "images" / f"{WNIDS[2]}_0.JPEG", big)
    train[(2, 0)] = np.asarray(Image.fromarray(big).resize((64, 64), Image.Resampling.BILINEAR))

    val = {}
    lines = []
    for j, k in enumerate([2, 0, 1, 2]):
        img = smooth_image(200 + j)
        save_jpeg(base / "val" / "images" / f"val_{j}.JPEG", img)
        val[j] = (img, k)
        lines.append(f"val_{j}.JPEG\t{WNIDS[k]}\t0\t3\t60\t62\n")
    (base / "val" / "val_annotations.txt").write_text("".join(lines))
    return train, val


def assert_close_jpeg(actual: torch.Tensor, expected_hwc: np.ndarray, tol: float = 3.0) -> None:
    diff = np.abs(actual.numpy().astype(np.int16) - expected_hwc.transpose(2, 0, 1).astype(np.int16))
    assert diff.mean() < tol and diff.max() < 8 * tol, (diff.mean(), diff.max())


def test_tinyimagenet_round_trip(tmp_path):
    train_imgs, val_imgs = write_tinyimagenet(tmp_path)
    train = load_dataset("tinyimagenet", "train", root=tmp_path)
    assert train.x.dtype == torch.uint8 and tuple(train.x.shape) == (6, 3, 64, 64)
    assert train.y.tolist() == [0, 0, 1, 1, 2, 2]
    assert train.class_names == ["Egyptian cat", "goldfish", "n09999999"]
    assert train.input_shape == (3, 64, 64)
    for n, (k, i) in enumerate(sorted(train_imgs)):
        assert_close_jpeg(train.x[n], train_imgs[(k, i)])
    gray = train.x[1]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    imgs = train.images()
    assert 0.0 <= float(imgs.min()) and float(imgs.max()) <= 1.0

    test = load_dataset("tinyimagenet", "test", root=tmp_path)
    assert test.split == "test" and len(test) == 4
    assert test.y.tolist() == [val_imgs[j][1] for j in range(4)] == [2, 0, 1, 2]
    for j in range(4):
        assert_close_jpeg(test.x[j], val_imgs[j][0])


def test_tinyimagenet_without_words_uses_wnids(tmp_path):
    write_tinyimagenet(tmp_path, words=False)
    assert load_dataset("tinyimagenet", "test", root=tmp_path).class_names == WNIDS


def test_tinyimagenet_cache_created_and_reused(tmp_path, monkeypatch):
    import PIL.Image

    write_tinyimagenet(tmp_path)
    base = tmp_path / "tiny-imagenet-200"
    first = load_dataset("tinyimagenet", "train", root=tmp_path)
    cache = base / ".energylens-cache-train.npz"
    assert cache.is_file()
    assert not (base / ".energylens-cache-test.npz").exists()
    assert not [p for p in base.iterdir() if p.name.endswith(".tmp")]

    real_open = PIL.Image.open

    def no_decoding(*a, **k):
        raise AssertionError("decoded JPEGs although the cache is valid")

    monkeypatch.setattr(PIL.Image, "open", no_decoding)
    second = load_dataset("tinyimagenet", "train", root=tmp_path)
    assert torch.equal(first.x, second.x) and torch.equal(first.y, second.y)
    assert second.class_names == first.class_names

    # Adding an image makes the cache stale: it is rebuilt and includes the new image.
    monkeypatch.setattr(PIL.Image, "open", real_open)
    folder = base / "train" / WNIDS[1] / "images"
    save_jpeg(folder / f"{WNIDS[1]}_9.JPEG", smooth_image(7))
    future = cache.stat().st_mtime_ns + 10**9
    os.utime(folder, ns=(future, future))
    third = load_dataset("tinyimagenet", "train", root=tmp_path)
    assert len(third) == 7 and third.y.tolist() == [0, 0, 1, 1, 1, 2, 2]

    # A corrupt cache is silently rebuilt.
    cache.write_bytes(b"garbage")
    os.utime(cache, ns=(future + 10**9, future + 10**9))
    fourth = load_dataset("tinyimagenet", "train", root=tmp_path)
    assert torch.equal(fourth.x, third.x)


def test_tinyimagenet_unwritable_cache_only_warns(tmp_path, monkeypatch):
    from core.storage import StorageError

    write_tinyimagenet(tmp_path)

    def read_only(path, *a, **k):
        raise StorageError(f"could not write {path}: Read-only file system")

    monkeypatch.setattr(disk, "atomic_write", read_only)
    with pytest.warns(RuntimeWarning, match="Read-only"):
        ds = load_dataset("tinyimagenet", "test", root=tmp_path)
    assert len(ds) == 4
    assert not (tmp_path / "tiny-imagenet-200" / ".energylens-cache-test.npz").exists()


def test_parallel_decoding(tmp_path):
    good, bad = tmp_path / "good.JPEG", tmp_path / "bad.JPEG"
    save_jpeg(good, smooth_image(1))
    bad.write_bytes(b"nope")
    x = disk.decode_images([good] * 300, workers=2)  # more than one chunk: the thread pool is used
    assert tuple(x.shape) == (300, 3, 64, 64) and bool((x == x[0]).all())
    assert_close_jpeg(x[-1], smooth_image(1))
    with pytest.raises(DataError, match="bad.JPEG"):
        disk.decode_images([good] * 280 + [bad] + [good] * 30, workers=2)


def test_tinyimagenet_missing_and_corrupt(tmp_path):
    for download in (False, True):
        with pytest.raises(DataError) as err:
            load_dataset("tinyimagenet", "train", root=tmp_path, download=download)
        msg = str(err.value)
        assert disk.TINYIMAGENET_URL in msg and str(tmp_path / "tiny-imagenet-200") in msg

    write_tinyimagenet(tmp_path)
    base = tmp_path / "tiny-imagenet-200"
    (base / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DataError, match="val_annotations.txt"):
        load_dataset("tinyimagenet", "test", root=tmp_path)

    bad = base / "train" / WNIDS[2] / "images" / f"{WNIDS[2]}_1.JPEG"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(DataError) as err:
        load_dataset("tinyimagenet", "train", root=tmp_path)
    assert str(bad) in str(err.value)

    import shutil

    shutil.rmtree(base / "train" / WNIDS[1])
    with pytest.raises(DataError) as err:
        load_dataset("tinyimagenet", "train", root=tmp_path)
    assert str(base / "train" / WNIDS[1]) in str(err.value)


# --------------------------------------------------------------------------------------------
# Embedded digits, npz datasets, registry
# --------------------------------------------------------------------------------------------


def test_digits_splits():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert (len(train), len(test)) == (1438, 359)
    assert train.input_shape == test.input_shape == (3, 32, 32)
    assert set(train.y.tolist()) == set(test.y.tolist()) == set(range(10))
    train_rows = {bytes(r) for r in train.x.reshape(len(train), -1).numpy()}
    # no image of the test split is in the train split (the digits data has no exact duplicates)
    assert not any(bytes(r) in train_rows for r in test.x.reshape(len(test), -1).numpy())
    again = load_dataset("digits", "train")
    assert torch.equal(again.x, train.x) and torch.equal(again.y, train.y)
    imgs = test.images()
    assert float(imgs.min()) >= 0 and float(imgs.max()) <= 1 and float(imgs.max()) > 0.9
    again.x[0].zero_()  # a caller mutating its copy must not affect later loads
    assert torch.equal(load_dataset("digits", "train").x, train.x)


def test_registry_and_limit(tmp_path):
    assert set(cd.DATASETS) == {"cifar10-demo", "digits", "cifar10", "cifar100", "svhn", "tinyimagenet"}
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("mnist")
    with pytest.raises(InputError):
        load_dataset("digits", "val")
    assert len(load_dataset("digits", "test", limit=17)) == 17
    assert cd.data_root(tmp_path) == tmp_path


def test_npz_datasets(tmp_path):
    x = random_images(6, 30)
    y = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "nchw.npz", x=x, y=y)
    np.savez(tmp_path / "nhwc.npz", x=x.transpose(0, 2, 3, 1), y=y)
    np.savez(tmp_path / "float.npz", x=x.astype(np.float32) / 255, y=y)
    for f in ("nchw", "nhwc", "float"):
        ds = load_dataset(f"npz:{tmp_path / f}.npz", "test")
        assert ds.x.dtype == torch.uint8 and tuple(ds.x.shape) == (6, 3, 32, 32), f
        np.testing.assert_array_equal(ds.x.numpy(), x)
        assert ds.y.tolist() == y.tolist() and ds.class_names == ["0", "1", "2"]
        assert 0 <= float(ds.images().min()) and float(ds.images().max()) <= 1

    np.savez(tmp_path / "bad.npz", images=x, labels=y)
    with pytest.raises(DataError, match="'x' and 'y'"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")
    with pytest.raises(DataError, match="not found"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")
    for junk in (b"this is not numpy", b"", b"PK\x03\x04 broken zip"):
        (tmp_path / "junk.npz").write_bytes(junk)
        with pytest.raises(DataError, match="junk.npz"):
            load_dataset(f"npz:{tmp_path / 'junk.npz'}")
    np.savez(tmp_path / "y2d.npz", x=x, y=y.reshape(-1, 1))
    assert load_dataset(f"npz:{tmp_path / 'y2d.npz'}").y.tolist() == y.tolist()
    np.savez(tmp_path / "ybad.npz", x=x, y=np.full(6, 0.5))
    with pytest.raises(DataError, match="integer labels"):
        load_dataset(f"npz:{tmp_path / 'ybad.npz'}")
    # the spec's loader is callable like every other registered loader
    spec = cd.dataset_spec(f"npz:{tmp_path / 'nchw.npz'}")
    assert len(spec.loader("train", root=None, download=False)) == 6


# --------------------------------------------------------------------------------------------
# augment / probe_indices / validate_images
# --------------------------------------------------------------------------------------------


def test_augment_keeps_shape_and_range_and_changes_images():
    x = load_dataset("digits", "test", limit=32).images()
    g = torch.Generator().manual_seed(0)
    out = augment(x, crop_pad=4, flip=True, generator=g)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    changed = (out - x).abs().flatten(1).amax(1) > 0
    assert changed.float().mean() > 0.5
    again = augment(x, crop_pad=4, flip=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert torch.equal(augment(x, crop_pad=0, flip=False), x)


def test_probe_indices_deterministic_and_balanced():
    ds = load_dataset("digits", "train")
    a, b = probe_indices(ds, 50, seed=3), probe_indices(ds, 50, seed=3)
    assert torch.equal(a, b) and len(a) == 50 and len(set(a.tolist())) == 50
    assert torch.all(a[1:] > a[:-1])
    assert np.bincount(ds.y[a].numpy(), minlength=10).tolist() == [5] * 10
    assert not torch.equal(a, probe_indices(ds, 50, seed=4))
    assert len(probe_indices(ds, 10**6)) == len(ds)
    # n not a multiple of the class count: every class gets 1 or 2, none is dropped.
    counts = np.bincount(ds.y[probe_indices(ds, 15)].numpy(), minlength=10)
    assert counts.sum() == 15 and counts.min() >= 1 and counts.max() <= 2


def test_probe_indices_with_small_classes():
    y = torch.tensor([0] * 50 + [1] * 3 + [2] * 50)
    ds = ImageDataset("toy", "train", torch.zeros(len(y), 3, 2, 2, dtype=torch.uint8), y, ["a", "b", "c"])
    idx = probe_indices(ds, 30)
    assert len(idx) == 30  # the rare class is exhausted and the others make up the difference
    counts = np.bincount(y[idx].numpy()).tolist()
    assert counts[1] == 3 and sorted([counts[0], counts[2]]) == [13, 14]


def test_validate_images():
    ok = torch.rand(2, 3, 8, 8)
    assert torch.equal(validate_images(ok, expect_shape=(3, 8, 8)), ok)
    assert validate_images(ok[0]).shape == (1, 3, 8, 8)
    u8 = validate_images(torch.full((1, 3, 4, 4), 255, dtype=torch.uint8))
    assert u8.dtype == torch.float32 and float(u8.max()) == 1.0

    bad_nan, bad_inf = ok.clone(), ok.clone()
    bad_nan[0, 0, 0, 0] = float("nan")
    bad_inf[1, 2, 3, 4] = float("inf")
    cases = [
        (bad_nan, {}, "NaN"),
        (bad_inf, {}, "NaN or infinite"),
        (torch.rand(3, 8), {}, "N x C x H x W"),
        (torch.rand(1, 1, 3, 8, 8), {}, "N x C x H x W"),
        (ok * 2, {}, r"\[0, 1\]"),
        (ok - 0.5, {}, r"\[0, 1\]"),
        (ok, {"expect_shape": (3, 32, 32)}, r"\(3, 32, 32\)"),
        (torch.zeros(0, 3, 8, 8), {}, "no images"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.int32), {}, "float"),
        (ok.numpy(), {}, "torch.Tensor"),
    ]
    for x, kw, pattern in cases:
        with pytest.raises(InputError, match=pattern):
            validate_images(x, **kw)
