"""core.models: architectures, the safetensors checkpoint format, safe loading, RobustBench compatibility."""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path

import pytest
import torch

import core.models.checkpoint as ckpt_mod
import core.storage as storage
from core.errors import CheckpointError
from core.models import (ARCHITECTURES, ModelMeta, build_model, load_checkpoint, load_state_dict_checked,
                         read_metadata, save_checkpoint)
from core.storage import StorageError
from core.tensorio import safe_torch_load



def _x(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights AND BatchNorm statistics (so a round trip that dropped buffers would show),
    scaled so that activations keep an O(1) magnitude through deep networks."""
    g = torch.Generator().manual_seed(seed)

    def rnd(t, scale=1.0, shift=0.0):
        t.copy_(torch.randn(t.shape, generator=g) * scale + shift)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                rnd(m.weight, 0.1, 1.0)
                rnd(m.bias, 0.1)
                rnd(m.running_mean, 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                rnd(m.weight, (1.0 / m.weight[0].numel()) ** 0.5)
                if m.bias is not None:
                    rnd(m.bias, 0.1)
    return model.eval()


# ---- architectures -------------------------------------------------------------------------------
SIZES = {"resnet18": (32, 64), "preactresnet18": (32, 64)}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_outputs_n_by_k(arch):
    model = build_model(arch, 7).eval()
    for size in SIZES.get(arch, (32,)):
        with torch.no_grad():
            out = model(_x(2, size))
        assert out.shape == (2, 7), f"{arch} at {size}x{size}"
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_build_model_errors():
    with pytest.raises(CheckpointError, match="unknown architecture 'vgg'"):
        build_model("vgg", 10)
    with pytest.raises(CheckpointError, match="bad arguments"):
        build_model("smallcnn", 10, no_such_argument=1)


# ---- checkpoint round trip -----------------------------------------------------------------------
def _meta(**kw):
    d = dict(arch="smallcnn", num_classes=10, dataset="digits", class_names=[str(i) for i in range(10)],
             method="trades", hparams={"beta": 6.0, "eps": 8 / 255, "nested": {"a": [1, 2]}}, epoch=3,
             metrics={"nat_acc": 0.5, "pgd_acc": 0.25})
    d.update(kw)
    return ModelMeta(**d)


def test_checkpoint_round_trip(tmp_path):
    model = _randomise(build_model("smallcnn", 10), seed=1)
    meta = _meta()
    path = save_checkpoint(tmp_path / "sub" / "m.safetensors", model, meta)
    assert path.is_file()
    lm = load_checkpoint(path)
    assert not lm.model.training
    x = _x(4)
    with torch.no_grad():
        assert torch.equal(lm.model(x), model(x))
    for k, v in model.state_dict().items():
        assert torch.equal(lm.model.state_dict()[k], v), k
    for field in ("arch", "num_classes", "dataset", "class_names", "method", "hparams", "epoch", "metrics",
                  "input_shape", "created", "version", "arch_kwargs"):
        assert getattr(lm.meta, field) == getattr(meta, field), field
    assert lm.meta.name == "m" and lm.path == path


def test_round_trip_keeps_arch_kwargs_and_accepts_dict_meta_and_prefixed_state(tmp_path):
    model = _randomise(build_model("wideresnet", 5, depth=10, widen_factor=1), seed=2)
    prefixed = {f"module.{k}": v for k, v in model.state_dict().items()}  # DataParallel-style keys
    meta = {"arch": "wideresnet", "num_classes": 5, "arch_kwargs": {"depth": 10, "widen_factor": 1}, "name": "tiny"}
    path = save_checkpoint(tmp_path / "w.safetensors", prefixed, meta)
    lm = load_checkpoint(path)
    assert lm.meta.arch_kwargs == {"depth": 10, "widen_factor": 1} and lm.meta.name == "tiny"
    with torch.no_grad():
        assert torch.equal(lm.model(_x(2)), model(_x(2)))


def test_read_metadata_does_not_load_weights(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "m.safetensors", build_model("smallcnn", 10), _meta(epoch=9))

    def boom(*a, **k):
        raise AssertionError("read_metadata loaded the weights")

    monkeypatch.setattr(ckpt_mod, "safe_torch_load", boom)
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", boom)
    monkeypatch.setattr(safetensors.torch, "load", boom)
    meta = read_metadata(path)
    assert meta.epoch == 9 and meta.arch == "smallcnn" and meta.hparams["nested"] == {"a": [1, 2]}


def test_read_metadata_errors(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="no EnergyLens metadata"):
        read_metadata(plain)
    pt = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2)}, pt)
    with pytest.raises(CheckpointError, match="without EnergyLens metadata"):
        read_metadata(pt)
    bad = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(2)}, str(bad), metadata={"energylens": "{not json"})
    with pytest.raises(CheckpointError, match="corrupt metadata"):
        read_metadata(bad)
    partial = tmp_path / "partial.safetensors"
    save_file({"w": torch.zeros(2)}, str(partial), metadata={"energylens": json.dumps({"dataset": "x"})})
    with pytest.raises(CheckpointError, match="arch"):
        read_metadata(partial)


# ---- atomic writes -------------------------------------------------------------------------------
def _crash_mid_write(exc):
    """An atomic_write_bytes whose writer dies after writing half of the data."""

    def writer_factory(path, data):
        def writer(f):
            f.write(data[: len(data) // 2])
            f.flush()
            raise exc

        return storage.atomic_write(path, writer)

    return writer_factory


@pytest.mark.parametrize("exc", [RuntimeError("killed"), OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["runtime", "disk-full", "interrupt"])
def test_crash_mid_write_keeps_old_checkpoint(tmp_path, monkeypatch, exc):
    path = tmp_path / "m.safetensors"
    old_model = _randomise(build_model("smallcnn", 10), seed=3)
    save_checkpoint(path, old_model, _meta(epoch=1))
    old_bytes = path.read_bytes()
    monkeypatch.setattr(ckpt_mod, "atomic_write_bytes", _crash_mid_write(exc))
    expected = StorageError if isinstance(exc, OSError) else type(exc)
    with pytest.raises(expected) as info:
        save_checkpoint(path, _randomise(build_model("smallcnn", 10), seed=4), _meta(epoch=2))
    if isinstance(exc, OSError):
        assert str(path) in str(info.value)
    assert path.read_bytes() == old_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"], "temp file left behind"
    monkeypatch.undo()
    lm = load_checkpoint(path)
    assert lm.meta.epoch == 1
    with torch.no_grad():
        assert torch.equal(lm.model(_x(2)), old_model(_x(2)))


def test_failed_rename_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, build_model("smallcnn", 10), _meta(epoch=1))
    old = path.read_bytes()

    def bad_replace(src, dst):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(storage.os, "replace", bad_replace)
    with pytest.raises(StorageError, match="could not write"):
        save_checkpoint(path, build_model("smallcnn", 10), _meta(epoch=2))
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


# ---- loading errors ------------------------------------------------------------------------------
HTML = b"<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head><body>Too many users</body></html>"
SMALL_META = {"arch": "smallcnn", "num_classes": 10}


def test_checkpoint_whose_header_length_starts_with_the_pickle_marker_byte(tmp_path):
    """A safetensors header of length 0x..80 makes the file's first byte 0x80, the legacy-pickle marker:
    it must still be read as safetensors (found by CI: a training run's metadata hit that length)."""
    model = build_model("smallcnn", 10)
    for pad in range(300):  # grow the metadata until the header length's low byte is 0x80
        path = tmp_path / f"m{pad}.safetensors"
        save_checkpoint(path, model, ModelMeta(arch="smallcnn", num_classes=10, dataset="digits", name="x" * pad))
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no metadata size gave a header length ending in 0x80")
    assert storage.sniff_format(path) == "safetensors"
    assert load_checkpoint(path).meta.name == "x" * pad
    # a real legacy (non-zip) torch file is still recognised as such
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    assert storage.sniff_format(legacy) == "torch-legacy"


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt", meta=SMALL_META)
    for name in ("empty.safetensors", "empty.pt"):
        p = tmp_path / name
        p.write_bytes(b"")
        with pytest.raises(CheckpointError, match="empty"):
            load_checkpoint(p)
        with pytest.raises(CheckpointError, match="empty"):
            load_checkpoint(p, meta=SMALL_META)


@pytest.mark.parametrize("name", ["page.safetensors", "page.pt", "page.pth"])
def test_html_saved_as_weights(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b"\n  " + HTML)
    for call in (lambda: load_checkpoint(p), lambda: load_checkpoint(p, meta=SMALL_META), lambda: read_metadata(p)):
        with pytest.raises(CheckpointError, match="HTML"):
            call()


def test_truncated_files(tmp_path):
    model = build_model("smallcnn", 10)
    full = save_checkpoint(tmp_path / "full.safetensors", model, _meta())
    data = full.read_bytes()
    for frac in (0.5, 0.99):
        p = tmp_path / f"cut{frac}.safetensors"
        p.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(CheckpointError):
            load_checkpoint(p)
    # cut inside the JSON header
    p = tmp_path / "cut_header.safetensors"
    p.write_bytes(data[:40])
    with pytest.raises(CheckpointError):
        load_checkpoint(p)
    pt = tmp_path / "full.pt"
    torch.save(model.state_dict(), pt)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(cut, meta=SMALL_META)


def test_wrong_architecture_and_class_count(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", build_model("smallcnn", 10), _meta())
    with pytest.raises(CheckpointError, match="does not match the model architecture"):
        load_checkpoint(path, meta={"arch": "resnet18", "num_classes": 10})
    with pytest.raises(CheckpointError, match="classes"):
        load_checkpoint(path, meta={"arch": "smallcnn", "num_classes": 100})
    with pytest.raises(CheckpointError, match="10 classes but 100 were expected"):
        load_checkpoint(path, expect_num_classes=100)
    with pytest.raises(CheckpointError, match="unknown architecture"):
        load_checkpoint(path, meta={"arch": "nonet", "num_classes": 10})
    with pytest.raises(CheckpointError, match="missing"):
        load_state_dict_checked(build_model("smallcnn", 10), {"linear.weight": torch.zeros(10, 128)})
    with pytest.raises(CheckpointError, match="state_dict of tensors"):
        load_state_dict_checked(build_model("smallcnn", 10), {"a": 1})


class _Evil:
    """Unpickling this calls open(marker, 'w'): code execution as a side effect of loading."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["torch-zip", "torch-legacy", "raw-pickle", "inside-state-dict"])
def test_malicious_pickle_is_refused_without_running_code(tmp_path, how):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    evil = _Evil(marker)
    if how == "torch-zip":
        torch.save(evil, path)
    elif how == "torch-legacy":
        torch.save(evil, path, _use_new_zipfile_serialization=False)
    elif how == "raw-pickle":
        path.write_bytes(pickle.dumps(evil, protocol=2))
    else:
        state = dict(build_model("smallcnn", 10).state_dict())
        state["linear.bias"] = evil
        torch.save({"state_dict": state}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, meta=SMALL_META)
    assert not marker.exists(), "loading the checkpoint executed code"
    assert "execute code" in str(info.value)
    with pytest.raises(CheckpointError):
        read_metadata(path)
    with pytest.raises(CheckpointError):
        safe_torch_load(path)
    assert not marker.exists()


def test_the_malicious_payload_is_real(tmp_path):
    """Control for the test above: a plain unpickle of the same object does create the marker."""
    marker = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(_Evil(marker))).close()
    assert marker.exists()


def test_safe_torch_load_plain_state_dict(tmp_path):
    model = _randomise(build_model("smallcnn", 10), seed=5)
    p = tmp_path / "weights.pt"
    torch.save(model.state_dict(), p)
    state = safe_torch_load(p)
    assert set(state) == set(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    lm = load_checkpoint(p, meta=SMALL_META)
    with torch.no_grad():
        assert torch.equal(lm.model(_x(3)), model(_x(3)))
    assert lm.meta.name == "weights"
    # the common {'state_dict': ...} wrapper with DataParallel prefixes
    p2 = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 7}, p2)
    lm2 = load_checkpoint(p2, meta=SMALL_META)
    with torch.no_grad():
        assert torch.equal(lm2.model(_x(3)), model(_x(3)))


# ---- RobustBench compatibility -------------------------------------------------------------------
def _robustbench_module(name: str):
    """Load robustbench/model_zoo/architectures/<name>.py by path (importing robustbench is slow)."""
    spec = importlib.util.find_spec("robustbench")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("robustbench is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "model_zoo" / "architectures" / f"{name}.py"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    mod_spec = importlib.util.spec_from_file_location(f"_rb_arch_{name}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("depth,widen,sub_block1", [(28, 10, False), (34, 10, False), (28, 10, True), (16, 2, False)])
def test_wideresnet_keys_match_robustbench(depth, widen, sub_block1):
    rb = _robustbench_module("wide_resnet")
    ours = build_model("wideresnet", 10, depth=depth, widen_factor=widen, sub_block1=sub_block1)
    theirs = rb.WideResNet(depth=depth, num_classes=10, widen_factor=widen, sub_block1=sub_block1)
    assert _shapes(ours) == _shapes(theirs)
    if (depth, widen, sub_block1) == (28, 10, False):
        assert _shapes(build_model("wrn-28-10", 10)) == _shapes(theirs)
    if (depth, widen, sub_block1) == (34, 10, False):
        assert _shapes(build_model("wrn-34-10", 10)) == _shapes(theirs)


def test_resnet18_keys_match_robustbench():
    rb = _robustbench_module("resnet")
    assert _shapes(build_model("resnet18", 10)) == _shapes(rb.ResNet18())


def _same_function(ours, theirs, seed):
    """RobustBench weights loaded strictly into our network compute the same logits."""
    _randomise(theirs, seed)
    load_state_dict_checked(ours, theirs.state_dict(), where="robustbench")
    ours.eval()
    x = _x(3, 32, seed)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert float(b.std()) > 1e-2, "degenerate test: logits are (nearly) constant"
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), float((a - b).abs().max())


def test_robustbench_weights_compute_the_same_function():
    wrn = _robustbench_module("wide_resnet")
    _same_function(build_model("wideresnet", 10, depth=16, widen_factor=2, sub_block1=True),
                   wrn.WideResNet(depth=16, num_classes=10, widen_factor=2, sub_block1=True), seed=6)
    res = _robustbench_module("resnet")
    _same_function(build_model("resnet18", 10), res.ResNet18(), seed=7)
    # our pre-activation ResNet-18 is RobustBench's PreActResNet with bn_before_fc and out_shortcut
    _same_function(build_model("preactresnet18", 10),
                   res.PreActResNet(res.PreActBlock, [2, 2, 2, 2], bn_before_fc=True, out_shortcut=True), seed=8)
