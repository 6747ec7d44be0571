"""A catalogue of bad inputs: every one is refused with a message that names the problem, and nothing
that existed before is lost (files, models, earlier results on the page).

Engine cases call core/ directly; page cases drive the dashboard through Streamlit's AppTest from
``dashboard/Home.py``. docs/RELIABILITY.md lists the same cases with the message the user sees.
"""

from __future__ import annotations

import errno
import functools
import io
import math
import os
import pickle
import random
import time
from pathlib import Path

import pytest
from apptest_helpers import open_page
import torch

import core.storage as storage
from core import zoo
from core.attacks import AttackSpec, run_attack
from core.data import load_dataset, validate_images
from core.errors import CheckpointError, DataError, InputError, ZooError
from core.models import ModelMeta, build_model, load_checkpoint, save_checkpoint
from core.models.registry import ModelRef, load_model_ref
from core.storage import StorageError, atomic_write_bytes
from core.tensorio import safe_torch_load
from core.train import TrainConfig, train
from core.uploads import MAX_UPLOAD_BYTES, decode_image

REPO = Path(__file__).resolve().parents[1]
HTML = (b"<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head>"
        b"<body>Google Drive can't scan this file for viruses.</body></html>")
SMALL_META = ModelMeta(arch="smallcnn", num_classes=10, dataset="digits")
NOISE = b"\x93" + random.Random(1234).randbytes(4999)  # fixed "random" bytes; no format starts with 0x93


def _small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("smallcnn", 10).eval()


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """A valid EnergyLens checkpoint (smallcnn, 10 classes)."""
    return save_checkpoint(tmp_path / "good.safetensors", _small_model(), SMALL_META)


def _expect(fn, exc, *needles):
    """Run ``fn``; it must raise ``exc`` whose message contains every needle (case-insensitive)."""
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for n in needles:
        assert n.lower() in msg.lower(), f"{n!r} not in message: {msg}"
    assert "Traceback" not in msg
    return msg


# =============================================================================================
# Model names
# =============================================================================================
NAME_CASES = [
    ("zoo-unknown-model", lambda t: zoo.get_zoo_entry("NoSuchModel2099", "cifar10", "Linf"), ZooError,
     ["unknown RobustBench model 'NoSuchModel2099'"]),
    ("zoo-misspelt-model-suggests", lambda t: zoo.load_zoo_model("Standrd", model_dir=t), ZooError,
     ["unknown RobustBench model 'Standrd'", "Did you mean", "Standard"]),
    ("zoo-unknown-dataset", lambda t: zoo.get_zoo_entry("Standard", "imagenet42", "Linf"), ZooError,
     ["unknown dataset 'imagenet42'", "cifar10"]),
    ("zoo-unknown-threat-model", lambda t: zoo.get_zoo_entry("Standard", "cifar10", "L7"), ZooError,
     ["unknown threat model 'L7'", "Linf"]),
    ("registry-unknown-architecture", lambda t: build_model("resnet9000", 10), CheckpointError,
     ["unknown architecture 'resnet9000'", "smallcnn"]),
    ("registry-unknown-source", lambda t: load_model_ref(ModelRef("cloud", "x")), CheckpointError,
     ["unknown model source 'cloud'"]),
    ("registry-missing-checkpoint-file",
     lambda t: load_model_ref(ModelRef("local", "ghost", str(t / "ghost.safetensors"))), CheckpointError,
     ["checkpoint not found", "ghost.safetensors"]),
]


@pytest.mark.parametrize("make,exc,needles", [c[1:] for c in NAME_CASES], ids=[c[0] for c in NAME_CASES])
def test_unknown_model_names(tmp_path, make, exc, needles):
    _expect(lambda: make(tmp_path), exc, *needles)


def test_zoo_model_not_downloaded_says_where_to_put_the_file(tmp_path):
    msg = _expect(lambda: zoo.load_zoo_model("Standard", "cifar10", "Linf", model_dir=tmp_path), ZooError,
                  "is not downloaded", "save it exactly at", "drive.google.com")
    assert str(tmp_path / "cifar10" / "Linf" / "Standard.pt") in msg
    assert not any(tmp_path.rglob("*")), "nothing is created while downloads are off"


# =============================================================================================
# Checkpoint files
# =============================================================================================
def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def _torch_pt(t: Path) -> Path:
    p = t / "weights.pt"
    torch.save(_small_model().state_dict(), p)
    return p


CKPT_CASES = [
    # id, builder(tmp, good_ckpt) -> path, meta for load_checkpoint, needles
    ("truncated-safetensors", lambda t, g: _truncated(g, t / "cut.safetensors"), None,
     ["cut.safetensors", "not a valid safetensors file"]),
    ("truncated-pt", lambda t, g: _truncated(_torch_pt(t), t / "cut.pt"), SMALL_META,
     ["cut.pt", "corrupt or truncated"]),
    ("random-bytes-pt", lambda t, g: (t / "noise.pt", (t / "noise.pt").write_bytes(NOISE[:3000]))[0],
     SMALL_META, ["noise.pt", "corrupt"]),
    ("empty-file", lambda t, g: (t / "empty.safetensors", (t / "empty.safetensors").write_bytes(b""))[0], None,
     ["empty (0 bytes)"]),
    ("html-page-as-pt", lambda t, g: (t / "model.pt", (t / "model.pt").write_bytes(HTML))[0], SMALL_META,
     ["model.pt", "is an HTML page, not model weights", "download again"]),
    ("html-page-as-safetensors",
     lambda t, g: (t / "model.safetensors", (t / "model.safetensors").write_bytes(HTML))[0], None,
     ["model.safetensors", "is an HTML page, not model weights"]),
    ("wrong-architecture",
     lambda t, g: save_checkpoint(t / "arch.safetensors", _small_model(), ModelMeta("resnet18", 10, "digits")),
     None, ["arch.safetensors", "does not match the model architecture (resnet18, 10 classes", "weights missing"]),
    ("wrong-class-count",
     lambda t, g: save_checkpoint(t / "k.safetensors", _small_model(), ModelMeta("smallcnn", 100, "cifar100")),
     None, ["does not match the model architecture (smallcnn, 100 classes", "wrong shape",
            "a different number of classes?"]),
    ("metadata-lacks-architecture",
     lambda t, g: _safetensors_with_meta(t / "nometa.safetensors", '{"dataset": "digits"}'), None,
     ["nometa.safetensors", "metadata lacks arch, num_classes"]),
    ("metadata-not-an-object",
     lambda t, g: _safetensors_with_meta(t / "list.safetensors", '["smallcnn", 10]'), None,
     ["list.safetensors", "malformed metadata"]),
    ("metadata-not-json",
     lambda t, g: _safetensors_with_meta(t / "badjson.safetensors", "{not json"), None, ["corrupt metadata"]),
    # issue 14 (F2, F6, F14): metadata is checked (ranges, then the stored shapes) before any model is built
    ("metadata-nested-100k-deep",
     lambda t, g: _safetensors_with_meta(t / "deep.safetensors", "[" * 100_000 + "]" * 100_000), None,
     ["deep.safetensors", "malformed metadata", "nested too deeply"]),
    ("metadata-over-1MB",
     lambda t, g: _safetensors_with_meta(t / "big.safetensors", _meta_json(hparams={"x": "a" * 1_100_000})), None,
     ["big.safetensors", "malformed metadata", "the limit is 1 MB"]),
    # (num_classes 1e9 and WideResNet depth 10000 / widen 100 are memory cases: MEMORY_CKPT_CASES, run capped)
    ("metadata-num-classes-negative",
     lambda t, g: _safetensors_with_meta(t / "k.safetensors", _meta_json(num_classes=-5)), None,
     ["num_classes=-5 is impossible or absurd"]),
    ("metadata-num-classes-not-a-number",
     lambda t, g: _safetensors_with_meta(t / "k.safetensors", _meta_json(num_classes="ten")), None,
     ["num_classes must be an integer"]),
    ("metadata-arch-kwargs-a-string",
     lambda t, g: _safetensors_with_meta(t / "x.safetensors", _meta_json(arch_kwargs="x")), None,
     ["arch_kwargs must be an object", "'x'"]),
    ("metadata-arch-kwargs-unknown-argument",
     lambda t, g: _safetensors_with_meta(t / "x.safetensors", _meta_json(arch_kwargs={"dpeth": 3})), None,
     ["architecture 'smallcnn' has no argument(s) dpeth"]),
    ("metadata-input-shape-absurd",
     lambda t, g: _safetensors_with_meta(t / "x.safetensors", _meta_json(input_shape=[3, 10**6, 10**6])), None,
     ["input_shape", "is absurd"]),
    ("metadata-class-names-count-wrong",
     lambda t, g: _safetensors_with_meta(t / "x.safetensors", _meta_json(class_names=["cat", "dog"])), None,
     ["it names 2 classes but num_classes is 10"]),
    ("metadata-50000-classes-vs-stored-shapes",
     lambda t, g: _relabelled(g, t / "k5.safetensors", num_classes=50_000), None,
     ["does not match the model architecture (smallcnn, 50000 classes", "file (10, 128) vs model (50000, 128)",
      "a different number of classes?"]),
    ("metadata-width-vs-stored-shapes",
     lambda t, g: _relabelled(g, t / "wd.safetensors", arch_kwargs={"width": 64}), None,
     ["does not match the model architecture", "features.0.weight: file (32, 3, 3, 3) vs model (64, 3, 3, 3)"]),
]


def _meta_json(**changes) -> str:
    import json

    return json.dumps({"arch": "smallcnn", "num_classes": 10, "dataset": "digits", **changes})


def _relabelled(good: Path, path: Path, **changes) -> Path:
    """The good checkpoint's real weights with altered metadata."""
    from safetensors.torch import load_file, save

    path.write_bytes(save(load_file(str(good)), metadata={"energylens": _meta_json(**changes)}))
    return path


def _safetensors_with_meta(path: Path, raw: str) -> Path:
    from safetensors.torch import save

    path.write_bytes(save({"w": torch.zeros(2)}, metadata={"energylens": raw}))
    return path


@pytest.mark.parametrize("build,meta,needles", [c[1:] for c in CKPT_CASES], ids=[c[0] for c in CKPT_CASES])
def test_bad_checkpoint_files(tmp_path, ckpt, build, meta, needles):
    path = build(tmp_path, ckpt)
    before = path.read_bytes()
    msg = _expect(lambda: load_checkpoint(path, meta=meta), CheckpointError, *needles)
    if "classes?" not in " ".join(needles):
        assert "different number of classes" not in msg, "no class-count hint when the architecture differs"
    assert path.read_bytes() == before, "a bad file is reported, never modified or deleted"
    assert load_checkpoint(ckpt).meta.arch == "smallcnn", "other checkpoints still load"


def test_checkpoint_for_another_dataset_is_refused_by_class_count(ckpt):
    _expect(lambda: load_checkpoint(ckpt, expect_num_classes=100), CheckpointError,
            "predicts 10 classes but 100 were expected")


class _Payload:
    """Unpickling this runs os.makedirs(marker): code execution as a side effect of loading."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy", "inside-state-dict"])
def test_pickle_that_would_run_code_is_refused(tmp_path, fmt):
    # control: the payload is live (a plain unpickle does run it)
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.is_dir()

    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    if fmt == "torch-zip":
        torch.save(_Payload(marker), path)
    elif fmt == "torch-legacy":
        torch.save(_Payload(marker), path, _use_new_zipfile_serialization=False)
    else:
        torch.save({**_small_model().state_dict(), "extra": _Payload(marker)}, path)
    _expect(lambda: load_checkpoint(path, meta=SMALL_META), CheckpointError, "evil.pt", "execute code",
            "weights_only=True")
    _expect(lambda: safe_torch_load(path), CheckpointError, "execute code")
    assert not marker.exists(), "loading the checkpoint executed code"


def test_zoo_html_page_saved_as_pt_is_refused_before_loading(tmp_path):
    p = tmp_path / "cifar10" / "Linf" / "Standard.pt"
    p.parent.mkdir(parents=True)
    p.write_bytes(HTML)
    _expect(lambda: zoo.load_zoo_model("Standard", model_dir=tmp_path), ZooError,
            "Standard.pt", "is an HTML page, not model weights", "quarantine")
    assert p.read_bytes() == HTML, "the bad file is left for the user to inspect (quarantine renames, never deletes)"


# =============================================================================================
# Tensors given to the engine
# =============================================================================================
def _imgs(*shape, fill=None, dtype=torch.float32):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    if fill is not None:
        x.view(-1)[3] = fill
    return x


TENSOR_CASES = [
    ("nan-pixel", _imgs(2, 3, 8, 8, fill=float("nan")), "NaN or infinite"),
    ("inf-pixel", _imgs(2, 3, 8, 8, fill=float("inf")), "NaN or infinite"),
    ("values-outside-0-1", _imgs(2, 3, 8, 8, fill=3.5), "must lie in [0, 1]"),
    ("2d-tensor", _imgs(8, 8), "N x C x H x W"),
    ("5d-tensor", _imgs(1, 2, 3, 8, 8), "N x C x H x W"),
    ("zero-images", _imgs(0, 3, 8, 8), "no images given"),
    ("int32-dtype", torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.int32), "float in [0,1] or uint8"),
    ("bool-dtype", torch.ones(2, 3, 8, 8, dtype=torch.bool), "float in [0,1] or uint8"),
    ("numpy-array-not-tensor", _imgs(2, 3, 8, 8).numpy(), "must be a torch.Tensor"),
]


@pytest.mark.parametrize("x,needle", [c[1:] for c in TENSOR_CASES], ids=[c[0] for c in TENSOR_CASES])
def test_validate_images_refuses(x, needle):
    _expect(lambda: validate_images(x), InputError, needle)


def test_validate_images_wrong_size_for_model():
    _expect(lambda: validate_images(_imgs(2, 3, 8, 8), expect_shape=(3, 32, 32)), InputError,
            "(3, 32, 32)", "got (3, 8, 8)")


@pytest.mark.parametrize("x,needle", [c[1:] for c in TENSOR_CASES if c[0] != "zero-images"],
                         ids=[c[0] for c in TENSOR_CASES if c[0] != "zero-images"])
def test_run_attack_refuses_bad_images(tiny_linear_model, x, needle):
    n = x.shape[0] if x.ndim == 4 else 1
    _expect(lambda: run_attack(tiny_linear_model, x, torch.zeros(n, dtype=torch.long), AttackSpec("pgd", steps=1)),
            InputError, needle)


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.training,
            [p.requires_grad for p in model.parameters()])


def _same_state(model, before):
    sd, training, flags = before
    assert model.training == training, "the model's train/eval mode is restored"
    assert [p.requires_grad for p in model.parameters()] == flags, "requires_grad is restored"
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items()), "weights unchanged"


RUN_ATTACK_SHAPE_CASES = [
    ("image-size-wrong-for-model", _imgs(2, 3, 32, 32), torch.zeros(2, dtype=torch.long),
     ["cannot process images of shape 3 x 32 x 32"]),
    ("channels-wrong-for-model", _imgs(2, 1, 8, 8), torch.zeros(2, dtype=torch.long),
     ["cannot process images of shape 1 x 8 x 8"]),
    ("label-count-mismatch", _imgs(2, 3, 8, 8), torch.zeros(3, dtype=torch.long), ["got 3 labels for 2 images"]),
    ("label-out-of-range", _imgs(2, 3, 8, 8), torch.tensor([0, 10]), ["labels must lie in [0, 9]"]),
    ("negative-label", _imgs(2, 3, 8, 8), torch.tensor([-1, 0]), ["labels must lie in [0, 9]"]),
]


@pytest.mark.parametrize("x,y,needles", [c[1:] for c in RUN_ATTACK_SHAPE_CASES],
                         ids=[c[0] for c in RUN_ATTACK_SHAPE_CASES])
def test_run_attack_refuses_bad_shapes_and_labels(tiny_linear_model, x, y, needles):
    model = tiny_linear_model.train()
    before = _state(model)
    x0 = x.clone()
    _expect(lambda: run_attack(model, x, y, AttackSpec("pgd", steps=1)), InputError, *needles)
    _same_state(model, before)
    assert torch.equal(x, x0), "the caller's images are not modified"


# =============================================================================================
# Attack settings
# =============================================================================================
SPEC_CASES = [
    ("eps-negative", dict(eps=-0.1), ["epsilon must be >= 0"]),
    ("eps-nan", dict(eps=float("nan")), ["eps must be a finite number"]),
    ("eps-inf", dict(eps=math.inf), ["eps must be a finite number"]),
    ("eps-absurd-linf", dict(eps=5.0), ["absurd for Linf"]),
    ("eps-absurd-l2", dict(norm="L2", eps=1000.0), ["absurd for L2"]),
    ("steps-zero", dict(steps=0), ["steps must be a positive integer"]),
    ("steps-negative", dict(steps=-5), ["steps must be a positive integer"]),
    ("steps-fractional", dict(steps=2.5), ["steps must be a positive integer"]),
    ("steps-too-many", dict(steps=50_000), ["too many for PGD"]),
    ("step-size-zero", dict(step_size=0.0), ["step size must be > 0"]),
    ("step-size-nan", dict(step_size=float("nan")), ["step size must be a finite number"]),
    ("batch-size-zero", dict(batch_size=0), ["batch size must be positive"]),
    ("unknown-norm", dict(norm="L1"), ["norm must be one of"]),
    ("unknown-attack", dict(name="deepfool"), ["unknown attack 'deepfool'"]),
    ("l2-with-linf-only-attack", dict(name="trades-kl", norm="L2", eps=0.5), ["supports only the Linf"]),
    ("targeted-autoattack-component", dict(name="apgd-ce", targeted=True, target_mode="chosen", target_class=3),
     ["APGD-CE has no targeted mode"]),
    ("target-class-missing", dict(targeted=True, target_mode="chosen", target_class=None),
     ["choose a target class"]),
    ("target-class-out-of-range", dict(targeted=True, target_mode="chosen", target_class=42),
     ["target class 42 does not exist", "10 classes"]),
    ("unknown-target-mode", dict(targeted=True, target_mode="nearest"), ["target mode must be one of"]),
    # issue 14 (F15): values that overflowed inside torch
    ("kappa-1e300", dict(name="cw", kappa=1e300), ["kappa (the CW confidence margin) must lie in [0, 10000]"]),
    ("kappa-negative", dict(name="cw", kappa=-1.0), ["kappa (the CW confidence margin) must lie in [0, 10000]"]),
    ("seed-2**70", dict(seed=2**70), ["seed must be an integer in [0, 4294967295]", str(2**70)]),
    ("seed-negative", dict(seed=-1), ["seed must be an integer in [0, 4294967295]"]),
    ("seed-fractional", dict(seed=1.5), ["seed must be an integer"]),
]


@pytest.mark.parametrize("kw,needles", [c[1:] for c in SPEC_CASES], ids=[c[0] for c in SPEC_CASES])
def test_run_attack_refuses_bad_settings(tiny_linear_model, kw, needles):
    model = tiny_linear_model
    before = _state(model)
    spec = AttackSpec(**{"name": "pgd", "steps": 2, **kw})
    _expect(lambda: run_attack(model, _imgs(2, 3, 8, 8), torch.tensor([1, 2]), spec), InputError, *needles)
    _same_state(model, before)


# =============================================================================================
# Training settings
# =============================================================================================
TRAIN_CASES = [
    ("beta-negative", dict(method="trades", beta=-1.0), ["beta must be >= 0"]),
    ("beta-nan", dict(method="trades", beta=float("nan")), ["beta must be >= 0"]),
    ("lr-zero", dict(lr=0.0), ["learning rate must be > 0"]),
    ("lr-negative", dict(lr=-0.1), ["lr must be a finite number >= 0"]),
    ("lr-inf", dict(lr=math.inf), ["lr must be a finite number >= 0"]),
    ("epochs-zero", dict(epochs=0), ["epochs must be a positive integer"]),
    ("epochs-absurd", dict(epochs=10**6), ["absurd"]),
    ("batch-size-zero", dict(batch_size=0), ["batch size must be a positive integer"]),
    ("attack-steps-zero", dict(attack_steps=0), ["attack steps must be a positive integer"]),
    ("eps-negative", dict(eps=-0.01), ["epsilon must lie in [0, 1]"]),
    ("eps-nan", dict(eps=float("nan")), ["epsilon must lie in [0, 1]"]),
    ("step-size-zero", dict(step_size=0.0), ["step size must be > 0"]),
    ("unknown-method", dict(method="magic"), ["unknown training method 'magic'"]),
    ("unknown-schedule", dict(schedule="sawtooth"), ["schedule must be one of"]),
    ("unknown-device", dict(device="tpu"), ["device must be"]),
    # issue 14 (F5): accepted before ("The settings are valid"), then the job hung at 0%
    ("attack-steps-1e6", dict(attack_steps=10**6),
     ["attack steps=1000000 is too many for the training attack (PGD (cross-entropy)) (max 10000)"]),
    ("attack-steps-trades-20000", dict(method="trades", attack_steps=20_000),
     ["too many for the training attack (TRADES-KL) (max 10000)"]),
    ("eval-steps-1e6", dict(eval_steps=10**6), ["eval steps=1000000 is too many for the evaluation attack (PGD)"]),
    ("eval-samples-1e9", dict(eval_samples=10**9), ["eval samples=1000000000 is absurd", "max 100,000"]),
    ("probe-size-1e7", dict(probe_size=10**7), ["probe size=10000000 is absurd", "max 10,000"]),
    ("seed-2**70", dict(seed=2**70), ["seed must be an integer in [0, 4294967295]"]),
]


@pytest.mark.parametrize("kw,needles", [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_train_config_refuses(kw, needles):
    _expect(lambda: TrainConfig(**kw).validate(), InputError, *needles)


def test_train_refuses_batch_larger_than_dataset_before_writing_anything(tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(out_dir=str(out), train_limit=50, batch_size=128, epochs=1)
    _expect(lambda: train(cfg), InputError, "batch size 128 is larger than the training set (50 images)")
    assert not out.exists(), "a refused run leaves no half-made run folder"


def test_train_refuses_unknown_dataset_before_writing_anything(tmp_path):
    out = tmp_path / "run"
    _expect(lambda: train(TrainConfig(dataset="imagenet-21k", out_dir=str(out))), DataError,
            "unknown dataset 'imagenet-21k'")
    assert not out.exists()


def test_train_rejects_unknown_option():
    _expect(lambda: TrainConfig.from_dict({"epochs": 1, "learnrate": 0.1}), InputError,
            "unknown training option(s): learnrate")


# =============================================================================================
# Datasets
# =============================================================================================
DATA_CASES = [
    ("unknown-dataset-name", lambda t: load_dataset("imagenet-21k"), DataError, ["unknown dataset 'imagenet-21k'",
                                                                                  "digits"]),
    ("npz-path-does-not-exist", lambda t: load_dataset(f"npz:{t / 'nope.npz'}"), DataError,
     ["dataset file not found", "nope.npz"]),
    ("npz-not-a-zip", lambda t: (t / "bad.npz").write_bytes(b"hello") and load_dataset(f"npz:{t / 'bad.npz'}"),
     DataError, ["bad.npz", "is not a .npz file"]),
    ("cifar10-root-does-not-exist", lambda t: load_dataset("cifar10", root=t / "missing"), DataError,
     ["CIFAR-10 train split not found", str(Path("missing") / "cifar-10-batches-py"), "download"]),
    ("svhn-root-does-not-exist", lambda t: load_dataset("svhn", "test", root=t / "missing"), DataError,
     ["SVHN test split not found", "test_32x32.mat"]),
    ("unknown-split", lambda t: load_dataset("digits", "validation"), InputError,
     ["split must be 'train' or 'test'"]),
    ("limit-zero", lambda t: load_dataset("digits", "test", limit=0), InputError, ["limit must be positive"]),
]


@pytest.mark.parametrize("make,exc,needles", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_datasets(tmp_path, make, exc, needles):
    _expect(lambda: make(tmp_path), exc, *needles)


# =============================================================================================
# Uploaded images
# =============================================================================================
@functools.lru_cache(maxsize=None)
def _png(w: int, h: int, mode: str = "RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(w: int = 64, h: int = 48) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise((w, h), 40).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _gif() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("P", (8, 8)).save(buf, "GIF")
    return buf.getvalue()


SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="32" height="32"><rect/></svg>'
PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n"

UPLOAD_CASES = [
    ("empty-file", lambda: b"", ["the uploaded file is empty"]),
    ("text-file", lambda: b"just some notes\nnot an image\n" * 20, ["not an image", "PNG or JPEG"]),
    ("random-bytes", lambda: NOISE, ["not an image", "PNG or JPEG"]),
    ("pdf", lambda: PDF, ["not an image", "PNG or JPEG"]),
    ("svg", lambda: SVG, ["not an image", "PNG or JPEG"]),
    ("gif-unsupported-format", _gif, ["unsupported image format GIF"]),
    ("truncated-jpeg-header", lambda: _jpeg()[:400], ["corrupt or truncated"]),
    ("truncated-jpeg-data", lambda: _jpeg()[: len(_jpeg()) * 2 // 3], ["corrupt or truncated"]),
    ("truncated-png", lambda: _png(64, 64)[:60], ["corrupt or truncated"]),
    ("oversize-over-10MB", lambda: _png(8, 8) + b"\0" * (MAX_UPLOAD_BYTES + 1), ["MB; the limit is 10 MB"]),
    ("too-many-pixels-25MP", lambda: _png(5000, 5000, "1"), ["5000 x 5000", "the limit is 16 megapixels"]),
    ("decompression-bomb-400MP", lambda: _png(20000, 20000, "1"), ["megapixels", "decompression bomb"]),
    # issue 14 (F1); the strips that needed gigabytes are memory cases: MEMORY_UPLOAD_CASES, run capped
    ("strip-21x1", lambda: _png(2100, 100), ["aspect ratio of 21:1", "the limit is 20:1"]),
]


@pytest.mark.parametrize("make,needles", [c[1:] for c in UPLOAD_CASES], ids=[c[0] for c in UPLOAD_CASES])
def test_bad_uploads(make, needles):
    data = make()
    _expect(lambda: decode_image(data), InputError, *needles)


@pytest.mark.parametrize("w,h", [(5000, 5000), (20000, 20000)], ids=["25MP", "400MP"])
def test_huge_image_is_refused_before_any_pixel_is_decoded(monkeypatch, w, h):
    from PIL import ImageFile

    data = _png(w, h, "1")
    assert len(data) < 100_000, "the bomb itself is small"
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    _expect(lambda: decode_image(data), InputError, "megapixels")
    assert decoded == [], "pixels were decoded before the size check"


def test_a_good_upload_still_works_after_bad_ones():
    for make, _ in [c[1:] for c in UPLOAD_CASES[:3]]:
        with pytest.raises(InputError):
            decode_image(make())
    x = decode_image(_jpeg(), size=(32, 32))
    assert x.shape == (1, 3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1


# =============================================================================================
# Unwritable folders and full disks
# =============================================================================================
def test_unwritable_checkpoint_folder_chmod(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as a user (root) who can write to a read-only folder anyway")
        _expect(lambda: save_checkpoint(folder / "m.safetensors", _small_model(), SMALL_META), StorageError,
                "cannot write to folder", str(folder))
    finally:
        folder.chmod(0o755)


def test_unwritable_folder_simulated(tmp_path, monkeypatch):
    """Same as above for root: the temp file cannot be created (EACCES)."""
    target = tmp_path / "runs" / "r1" / "last.safetensors"

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(storage.tempfile, "mkstemp", denied)
    _expect(lambda: save_checkpoint(target, _small_model(), SMALL_META), StorageError,
            "cannot write to folder", str(target.parent), "Permission denied")
    assert not target.exists()


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_full_disk_keeps_the_previous_file(tmp_path, monkeypatch, where):
    path = tmp_path / "ckpt" / "last.safetensors"
    save_checkpoint(path, _small_model(seed=1), ModelMeta("smallcnn", 10, "digits", epoch=1))
    before = path.read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "write":
        real = storage.atomic_write
        monkeypatch.setattr(storage, "atomic_write",
                            lambda p, writer, mode="wb", **kw: real(p, lambda f: (f.write(b"partial"), full()), mode, **kw))
    elif where == "fsync":
        monkeypatch.setattr(storage.os, "fsync", full)
    else:
        monkeypatch.setattr(storage.os, "replace", full)
    _expect(lambda: save_checkpoint(path, _small_model(seed=2), ModelMeta("smallcnn", 10, "digits", epoch=2)),
            StorageError, str(path), "No space left on device")
    monkeypatch.undo()
    assert path.read_bytes() == before, "the previous checkpoint is intact"
    assert load_checkpoint(path).meta.epoch == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.safetensors"], "no temp file left behind"


def test_full_disk_on_plain_bytes_write(tmp_path, monkeypatch):
    path = tmp_path / "notes.json"
    path.write_text('{"ok": true}')
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "fsync", full)
    _expect(lambda: atomic_write_bytes(path, b'{"ok": false}'), StorageError, "could not write", str(path))
    assert path.read_text() == '{"ok": true}'


# =============================================================================================
# Pages (AppTest from dashboard/Home.py)
# =============================================================================================
ENTRY = str(REPO / "dashboard" / "Home.py")


@pytest.fixture
def app(runs_dir):
    pytest.importorskip("streamlit")
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    st.cache_data.clear()  # (runs_dir clears it only once streamlit is imported)
    at = AppTest.from_file(ENTRY, default_timeout=120)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def _attack_once(at, n: int = 16, timeout: float = 120.0):
    at.number_input(key="atk_n").set_value(n)
    at.button[0].click().run()
    t0 = time.time()
    while "atk_result" not in at.session_state or not at.session_state["atk_task"].done:
        if time.time() - t0 > timeout:
            pytest.fail("attack did not finish")
        time.sleep(0.3)
        at.run()
    at.run()
    assert not at.error, [e.value for e in at.error]
    return at.session_state["atk_result"]


def _errors(at) -> str:
    return " | ".join(e.value for e in at.error)


def _set_targeted_apgd(at):
    at.selectbox(key="atk_name").set_value("apgd-ce")
    at.checkbox(key="atk_targeted").check()
    at.selectbox(key="atk_tmode").set_value("chosen")
    at.selectbox(key="atk_tclass").set_value(3)


def _set_l2_absurd(at):
    # the L2 epsilon box appears once the form was submitted with norm L2 (rejected here: 0 images)
    at.selectbox(key="atk_norm").set_value("L2")
    at.number_input(key="atk_n").set_value(0)
    at.button[0].click().run()
    assert "the number of images must be a positive integer, got 0" in _errors(at)
    at.number_input(key="atk_eps_l2").set_value(1000.0)
    at.number_input(key="atk_n").set_value(16)


def _set(key, value):
    return lambda at: at.number_input(key=key).set_value(value)


PAGE_CASES = [
    ("targeted-apgd-ce-with-chosen-class", _set_targeted_apgd, "APGD-CE has no targeted mode"),
    ("l2-absurd-epsilon", _set_l2_absurd, "epsilon 1000 is absurd for L2"),
    ("steps-beyond-limit", _set("atk_steps", 20_000), "steps=20000 is too many for PGD (cross-entropy) (max 10000)"),
    ("zero-images", _set("atk_n", 0), "the number of images must be a positive integer, got 0"),
    ("negative-steps", _set("atk_steps", -4), "steps must be a positive integer, got -4"),
]


@pytest.mark.parametrize("setup,expected", [c[1:] for c in PAGE_CASES], ids=[c[0] for c in PAGE_CASES])
def test_attack_lab_bad_settings_keep_the_earlier_result(app, setup, expected):
    at = app
    open_page(at, "attack")
    before = _attack_once(at)
    setup(at)
    at.button[0].click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert expected in _errors(at), _errors(at)
    assert not [e for e in at.error if "Unexpected error" in e.value]
    assert at.session_state["atk_result"] is before, "earlier results must survive a bad run"
    assert any(m.label == "Robust accuracy" for m in at.metric), "the earlier result is still displayed"


def test_corrupt_local_checkpoint_is_skipped_with_a_note(app, tmp_path, monkeypatch):
    import core.models.registry as registry

    local = tmp_path / "local"
    local.mkdir()
    save_checkpoint(local / "fine.safetensors", _small_model(), ModelMeta("smallcnn", 10, "digits", name="fine"))
    (local / "broken.safetensors").write_bytes(b"\x00" * 7 + b"garbage")
    (local / "page.safetensors").write_bytes(HTML)
    monkeypatch.setattr(registry, "LOCAL_DIR", local)
    at = app
    at.sidebar.radio(key="model_source").set_value("Local checkpoints").run()
    assert not at.exception, [e.message for e in at.exception]
    notes = " | ".join(c.value for c in at.sidebar.caption)
    assert "skipped broken.safetensors (unreadable)" in notes, notes
    assert "skipped page.safetensors (unreadable)" in notes and "HTML page" in notes, notes
    assert at.session_state["model_ref"].name == "fine", "the readable checkpoint is still offered"
    open_page(at, "models")
    assert not at.exception, [e.message for e in at.exception]
    statuses = " ".join(str(v) for df in at.dataframe for v in df.value.get("status", []) if isinstance(v, str))
    assert "unreadable:" in statuses and "broken.safetensors" in statuses, statuses


def test_zoo_model_not_downloaded_shows_where_to_put_the_file(app):
    path = zoo.zoo_path("Standard", "cifar10", "Linf")
    if path.exists():
        pytest.skip(f"{path} is present on this machine")
    at = app
    at.sidebar.radio(key="model_source").set_value("RobustBench zoo").run()
    at.sidebar.selectbox(key="zoo_name").set_value("Standard").run()
    open_page(at, "attack")
    assert not at.exception, [e.message for e in at.exception]
    errs = _errors(at)
    assert "Could not load model **Standard**" in errs and "is not downloaded" in errs, errs
    assert "save it exactly at" in errs and str(path) in errs, errs
    assert not path.exists()


# =============================================================================================
# The sidebar model picker survives any file (issue 14, F2)
# =============================================================================================
def test_no_checkpoint_file_can_break_the_model_picker(app, tmp_path, monkeypatch):
    import core.models.registry as registry

    local = tmp_path / "local"
    local.mkdir()
    save_checkpoint(local / "fine.safetensors", _small_model(), ModelMeta("smallcnn", 10, "digits", name="fine"))
    _safetensors_with_meta(local / "deep.safetensors", "[" * 100_000 + "]" * 100_000)
    _safetensors_with_meta(local / "huge.safetensors", _meta_json(num_classes=10**9))
    _safetensors_with_meta(local / "weird.safetensors", _meta_json())
    real = registry.read_metadata

    def flaky(p):  # any other exception a future bug might raise
        if Path(p).name == "weird.safetensors":
            raise RecursionError("maximum recursion depth exceeded")
        return real(p)

    monkeypatch.setattr(registry, "LOCAL_DIR", local)
    monkeypatch.setattr(registry, "read_metadata", flaky)
    at = app
    at.sidebar.radio(key="model_source").set_value("Local checkpoints").run()
    assert not at.exception, [e.message for e in at.exception]
    notes = " | ".join(c.value for c in at.sidebar.caption)
    assert "skipped deep.safetensors (unreadable)" in notes and "nested too deeply" in notes, notes
    assert "skipped huge.safetensors (unreadable)" in notes and "num_classes=1000000000" in notes, notes
    assert "skipped weird.safetensors (unreadable)" in notes and "RecursionError" in notes, notes
    assert at.session_state["model_ref"].name == "fine"
    # even a listing that fails as a whole only shows an error in the sidebar
    monkeypatch.setattr(registry, "list_local", lambda *a, **k: 1 / 0)  # imported by the picker at call time
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    errs = " | ".join(e.value for e in at.sidebar.error)
    assert "Could not list the checkpoints: ZeroDivisionError" in errs, errs


# =============================================================================================
# Bounded memory and time (issue 14, F1 and F6): hostile uploads and metadata run in a child process
# whose address space is capped at what it had after imports + 200 MB (RLIMIT_AS), never uncapped; the peak
# resident memory of each call (VmHWM, reset before it) must stay under 200 MB as well
# =============================================================================================
BOUND_MB = 200
_BOUNDED_CHILD = r"""
import io, json, resource, sys, time
kind, files = sys.argv[1], sys.argv[2:]
import torch
from core.errors import EnergyLensError

if kind == "upload":
    from PIL import Image
    from core.uploads import decode_image
    for mode, fmt in (("RGB", "PNG"), ("RGB", "JPEG"), ("I;16", "PNG"), ("RGBA", "PNG")):  # warm up lazy imports
        buf = io.BytesIO(); Image.new(mode, (40, 30)).save(buf, fmt); decode_image(buf.getvalue())
    items = [open(f, "rb").read() for f in files]
    call = decode_image
else:
    from core.models import load_checkpoint
    warm, files = files[0], files[1:]
    load_checkpoint(warm)
    items = files
    call = load_checkpoint

def status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

def reset_peak():  # the peak resident size (VmHWM) back to the current one; False where not allowed
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

cap = status_kb("VmSize") * 1024 + __BOUND_MB__ * 2**20
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
out = []
for it in items:
    exact = reset_peak()
    base = status_kb("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.process_time()  # CPU time of this process: the load other processes put on the machine does not count
    try:
        call(it)
        res = {"ok": True}
    except EnergyLensError as e:
        res = {"error": type(e).__name__, "msg": str(e)}
    except BaseException as e:
        res = {"error": type(e).__name__, "msg": str(e)[:300], "unexpected": True}
    res["cpu_seconds"] = time.process_time() - t0
    peak = status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res["peak_growth_mb"] = (peak - base) / 1024  # peak resident memory during the call, above the start
    out.append(res)
print("RESULT " + json.dumps(out))
""".replace("__BOUND_MB__", str(BOUND_MB))


def _bounded(kind: str, paths: list[Path]) -> list[dict]:
    import json
    import subprocess
    import sys

    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc to cap the child's address space")
    r = subprocess.run([sys.executable, "-c", _BOUNDED_CHILD, kind, *map(str, paths)], cwd=str(REPO),
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert r.returncode == 0 and line, f"child failed (rc {r.returncode}): {r.stderr[-3000:]}"
    return json.loads(line[len("RESULT "):])


# Memory cases: each would allocate gigabytes in code that does not check first, so they only ever run in the
# capped child (one child for all uploads, one for all checkpoints; the tests look their results up)
MEMORY_UPLOAD_CASES = [
    ("strip-1000000x1", lambda: _png(1_000_000, 1, "1"),
     ["1000000 x 1 pixels, an aspect ratio of 1,000,000:1; the limit is 20:1"]),
    ("strip-100000x1", lambda: _png(100_000, 1, "1"), ["aspect ratio of 100,000:1"]),
    ("strip-16000000x1", lambda: _png(16_000_000, 1, "1"), ["aspect ratio of 16,000,000:1"]),
    ("strip-1x4000000", lambda: _png(1, 4_000_000, "1"), ["1 x 4000000 pixels", "aspect ratio"]),
    ("decompression-bomb-400MP", lambda: _png(20000, 20000, "1"), ["megapixels", "decompression bomb"]),
    ("too-many-pixels-25MP", lambda: _png(5000, 5000, "1"), ["5000 x 5000", "the limit is 16 megapixels"]),
]
MEMORY_CKPT_CASES = [
    ("metadata-num-classes-1e9", lambda g: _meta_json(num_classes=10**9),
     ["num_classes=1000000000 is impossible or absurd", "2..100,000"]),
    ("metadata-wideresnet-depth-10000-widen-100",
     lambda g: _meta_json(arch="wideresnet", arch_kwargs={"depth": 10000, "widen_factor": 100}),
     ["wideresnet argument depth=10000 is impossible or absurd", "10..160"]),
    ("metadata-wideresnet-widen-100", lambda g: _meta_json(arch="wideresnet", arch_kwargs={"widen_factor": 100}),
     ["widen_factor=100 is impossible or absurd"]),
    ("metadata-wideresnet-34-10-for-a-smallcnn-file", lambda g: _meta_json(arch="wrn-34-10"),
     ["does not match the model architecture (wrn-34-10, 10 classes", "weights missing"]),
    ("metadata-num-classes-50000", None, ["file (10, 128) vs model (50000, 128)"]),
    ("metadata-nested-100k-deep", lambda g: "[" * 100_000 + "]" * 100_000, ["nested too deeply"]),
]


@pytest.fixture(scope="module")
def bounded_results(tmp_path_factory) -> dict[str, dict]:
    t = tmp_path_factory.mktemp("bounded")
    uploads = []
    for name, make, _ in MEMORY_UPLOAD_CASES:
        uploads.append(t / f"{name}.png")
        uploads[-1].write_bytes(make())
        assert uploads[-1].stat().st_size < 100_000, "each hostile file is small"
    good = save_checkpoint(t / "good.safetensors", _small_model(), SMALL_META)
    ckpts = []
    for name, raw, _ in MEMORY_CKPT_CASES:
        ckpts.append(t / f"{name}.safetensors")
        if raw is None:
            _relabelled(good, ckpts[-1], num_classes=50_000)
        else:
            ckpts[-1].write_bytes(_with_meta_of(good, raw(good)))
    results = dict(zip([c[0] for c in MEMORY_UPLOAD_CASES], _bounded("upload", uploads)))
    results.update(zip([c[0] for c in MEMORY_CKPT_CASES], _bounded("checkpoint", [good, *ckpts])))
    return results


def _with_meta_of(good: Path, raw: str) -> bytes:
    """The good checkpoint's real weights with the raw metadata string ``raw``."""
    from safetensors.torch import load_file, save

    return save(load_file(str(good)), metadata={"energylens": raw})


@pytest.mark.parametrize("needles", [c[2] for c in MEMORY_UPLOAD_CASES], ids=[c[0] for c in MEMORY_UPLOAD_CASES])
def test_memory_hostile_uploads_are_refused_in_bounded_memory_and_time(bounded_results, request, needles):
    res = bounded_results[request.node.callspec.id]
    assert res.get("error") == "InputError", res
    for n in needles:
        assert n in res["msg"], res
    assert res["cpu_seconds"] < 1.0 and res["peak_growth_mb"] < BOUND_MB, res


@pytest.mark.parametrize("needles", [c[2] for c in MEMORY_CKPT_CASES], ids=[c[0] for c in MEMORY_CKPT_CASES])
def test_memory_hostile_metadata_is_refused_before_any_model_is_built(bounded_results, request, needles):
    res = bounded_results[request.node.callspec.id]
    assert res.get("error") == "CheckpointError", res
    for n in needles:
        assert n in res["msg"], res
    assert res["cpu_seconds"] < 1.0 and res["peak_growth_mb"] < BOUND_MB, res


def _big_uploads() -> list[tuple[str, bytes]]:
    """Large uploads that are accepted: the worst cases for decoding memory under the 10 MB / 16 Mpx caps."""
    import numpy as np
    from PIL import Image

    def enc(im, fmt, **kw):
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        return buf.getvalue()

    ramp = np.tile(np.linspace(0, 65535, 4000).astype(np.uint16), (4000, 1))
    return [("png-rgb-16MP", enc(Image.new("RGB", (4000, 4000), (10, 100, 200)), "PNG")),
            ("png-rgba-16MP", enc(Image.new("RGBA", (4000, 4000), (10, 100, 200, 128)), "PNG")),
            ("png-16bit-gray-16MP", enc(Image.fromarray(ramp), "PNG")),
            ("jpeg-16MP", enc(Image.new("RGB", (4000, 4000), (10, 100, 200)), "JPEG", quality=90)),
            ("png-20x1-panorama", enc(Image.new("RGB", (8000, 400), (1, 2, 3)), "PNG"))]


def test_large_valid_uploads_decode_in_bounded_memory(tmp_path):
    big = _big_uploads()
    paths = []
    for name, data in big:
        assert len(data) <= MAX_UPLOAD_BYTES, name
        paths.append(tmp_path / name)
        paths[-1].write_bytes(data)
    results = _bounded("upload", paths)
    for (name, _), res in zip(big, results):
        assert res.get("ok"), (name, res)
        assert res["peak_growth_mb"] < BOUND_MB, (name, res)
        assert res["cpu_seconds"] < 5.0, (name, res)  # at most 0.5 s measured on two busy cores (16 Mpx RGBA PNG)


def test_metadata_shapes_are_checked_before_the_real_model_is_built(ckpt, tmp_path, monkeypatch):
    import core.models.checkpoint as cp

    built = []
    real = cp.build_model

    def spy(arch, num_classes, **kw):
        m = real(arch, num_classes, **kw)
        built.append((num_classes, next(m.parameters()).device.type))
        return m

    monkeypatch.setattr(cp, "build_model", spy)
    p = _relabelled(ckpt, tmp_path / "k.safetensors", num_classes=5000)
    _expect(lambda: load_checkpoint(p), CheckpointError, "does not match the model architecture")
    assert built == [(5000, "meta")], "only a shape-only skeleton is built for metadata that does not match"
    built.clear()
    assert load_checkpoint(ckpt).meta.num_classes == 10
    assert built == [(10, "meta"), (10, "cpu")]


# =============================================================================================
# Uploads that are accepted but changed: the user is told (issue 14: F8, F12, F13, RGBA)
# =============================================================================================
def _encode(im, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_16bit_grayscale_png_is_scaled_not_clipped():
    import numpy as np
    from PIL import Image

    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))  # left dark, right bright
    data = _encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    notes: list[str] = []
    x = decode_image(data, size=(32, 32), notes=notes)
    assert abs(float(x.mean()) - 0.5) < 0.02, "a 0..65535 ramp averages to 1/2, not 0.987 (clipped to white)"
    cols = x[0, 0].mean(dim=0)
    assert float(cols[0]) < 0.05 and float(cols[-1]) > 0.95 and bool((cols[1:] >= cols[:-1]).all())
    assert torch.equal(x[0, 0], x[0, 1]) and torch.equal(x[0, 0], x[0, 2]), "gray in all three channels"
    assert notes == ["16-bit grayscale image: scaled from 0..65535"]
    # 8-bit grayscale with the same ramp gives the same picture
    x8 = decode_image(_encode(Image.fromarray((ramp // 257).astype(np.uint8)), "PNG"), size=(32, 32))
    assert float((x - x8).abs().max()) < 0.01


def test_rgba_alpha_is_composited_on_white_and_said():
    from PIL import Image

    im = Image.new("RGBA", (40, 40), (255, 0, 0, 255))
    im.paste((0, 0, 255, 0), (0, 0, 40, 20))  # top half fully transparent blue
    notes: list[str] = []
    x = decode_image(_encode(im, "PNG"), size=(32, 32), notes=notes)
    assert notes == ["the image has transparent areas (alpha channel): they are shown on white"]
    assert torch.allclose(x[0, :, 2, 16], torch.ones(3)), "transparent pixels are white, not the hidden blue"
    assert torch.allclose(x[0, :, 29, 16], torch.tensor([1.0, 0.0, 0.0])), "opaque pixels keep their colour"
    notes.clear()
    decode_image(_encode(Image.new("RGBA", (40, 40), (1, 2, 3, 255)), "PNG"), notes=notes)
    assert notes == [], "a fully opaque alpha channel changes nothing and needs no note"


def test_mpo_camera_jpeg_is_accepted_with_its_first_picture():
    from PIL import Image

    frames = [Image.new("RGB", (64, 48), (200, 10, 10)), Image.new("RGB", (64, 48), (10, 10, 200))]
    data = _encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    notes: list[str] = []
    x = decode_image(data, notes=notes)
    assert x.shape == (1, 3, 32, 32)
    assert float(x[0, 0].mean()) > 0.7 and float(x[0, 2].mean()) < 0.1, "the first (red) picture is used"
    assert notes == ["the file holds 2 pictures (a multi-picture camera JPEG): the first is used"]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation):
    import numpy as np
    from PIL import Image, ImageOps

    rng = np.random.default_rng(orientation)
    base = Image.fromarray(rng.integers(0, 255, (30, 60, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(base, "JPEG", exif=exif.tobytes(), quality=95)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))  # what a photo viewer shows
    notes: list[str] = []
    got = decode_image(data, size=(16, 32), notes=notes)
    want = decode_image(_encode(upright, "PNG"), size=(16, 32))
    assert got.shape == want.shape == (1, 3, 16, 32)
    assert float((got - want).abs().max()) < 1e-6
    assert bool(notes) == (orientation != 1)


# =============================================================================================
# Zoo list: a refused file is not "downloaded" (issue 14)
# =============================================================================================
def test_zoo_file_that_would_run_code_is_not_listed_as_downloaded(tmp_path):
    marker = tmp_path / "PWNED"
    p = tmp_path / "cifar10" / "Linf" / "Standard.pt"
    p.parent.mkdir(parents=True)
    torch.save({"state_dict": _Payload(marker)}, p)
    [e] = [e for e in zoo.list_zoo("cifar10", "Linf", model_dir=tmp_path) if e.name == "Standard"]
    assert (e.file_status, e.downloaded) == ("unsafe", False)
    assert not marker.exists(), "listing never unpickles"


def test_zoo_file_refused_when_loaded_is_no_longer_listed_as_downloaded(tmp_path):
    marker = tmp_path / "PWNED"
    p = tmp_path / "cifar10" / "Linf" / "Standard.pt"
    p.parent.mkdir(parents=True)
    with open(p, "wb") as f:  # a raw pickle: its globals are only seen when loading
        pickle.dump({"state_dict": _Payload(marker)}, f, protocol=2)

    def status():
        [e] = [e for e in zoo.list_zoo("cifar10", "Linf", model_dir=tmp_path) if e.name == "Standard"]
        return e.file_status, e.downloaded

    assert status() == ("ok", True)  # cannot be told without loading it
    with pytest.raises(ZooError):
        zoo.load_zoo_model("Standard", model_dir=tmp_path)
    assert status() == ("refused", False)
    assert not marker.exists()
    time.sleep(0.01)
    torch.save({"w": torch.zeros(2)}, p)  # replaced: looked at again
    assert status() == ("ok", True)
