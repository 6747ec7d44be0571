"""The rules the dashboard pages enforce on a configuration live in core: each config's ``validate()`` refuses a
bad value with an InputError naming the field and the value, and every CLI in core turns that into one line
``error: <message>`` on stderr with exit status 2 (no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import InputError
from core.losses import method_config
from core.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ training
# (field, bad value, words the message must hold): rules the Training studio applied before calling core
TRAIN_RULES = [
    ("train_limit", -5, ["train limit", "got -5"]),
    ("train_limit", 2.5, ["train limit", "got 2.5"]),
    ("burn_in", -3, ["burn in", "got -3"]),
    ("eps", -4 / 255, ["epsilon", "got -4/255"]),
    ("dataset", "npz:", ["dataset", "enter the path of your .npz file", "got 'npz:'"]),
    ("dataset", "npz:  ", ["dataset", "enter the path of your .npz file"]),
    # what a config file may hold: wrong kinds of values are refused by name, not with a TypeError
    ("epochs", "ten", ["epochs must be an integer", "'ten'"]),
    ("lr", None, ["lr must be a number", "None"]),
    ("device", 3, ["device must be a string", "3"]),
    ("augment", "yes", ["augment must be true or false", "'yes'"]),
    ("epochs", float("nan"), ["epochs must be an integer", "nan"]),
    ("val_fraction", 1.5, ["val_fraction must lie in (0, 1)", "1.5"]),
]


@pytest.mark.parametrize("field,value,needles", TRAIN_RULES, ids=[f"{r[0]}={r[1]!r}" for r in TRAIN_RULES])
def test_train_config_validate_names_the_field_and_value(field, value, needles):
    with pytest.raises(InputError) as e:
        TrainConfig(**{field: value}).validate()
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_train_config_accepts_the_page_defaults_for_all_and_none():
    TrainConfig(train_limit=0, burn_in=0).validate()    # 0 = every training image / no burn-in
    TrainConfig(train_limit=None, burn_in=None).validate()
    TrainConfig(train_limit=100, burn_in=2, method="mail-trades").validate()


def test_burn_in_is_checked_by_the_loss_config_too():
    with pytest.raises(InputError, match=r"burn in \(epochs with uniform weights\) must be an integer >= 0, got -1"):
        method_config("mail-trades", burn_in=-1)


def test_train_config_from_dict_refuses_a_non_object():
    with pytest.raises(InputError, match="must be a JSON object"):
        TrainConfig.from_dict([1, 2])  # type: ignore[arg-type]


def test_train_refuses_a_bad_setting_before_reading_any_data(tmp_path, monkeypatch):
    """`--train-limit -5` used to reach the data loader and end in a RuntimeError from torch.arange."""
    import core.train as T

    def no_data(*a, **k):
        raise AssertionError("the data were read before the settings were checked")

    monkeypatch.setattr(T, "load_splits", no_data)
    with pytest.raises(InputError, match="train limit"):
        T.train(TrainConfig(train_limit=-5, epochs=1, out_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ CLIs
def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def _one_error_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


TRAIN_CLI_CASES = [
    (["--train-limit", "-5"], ["train limit", "got -5"]),
    (["--eps", "-1"], ["epsilon must lie in [0, 1]", "got -255/255"]),
    (["--burn-in", "-3"], ["burn in", "got -3"]),
    (["--epochs", "0"], ["epochs must be a positive integer, got 0"]),
    (["--dataset", "nope"], ["unknown dataset 'nope'"]),
    (["--dataset", "npz:"], ["enter the path of your .npz file"]),
    (["--epochs", "abc"], ["argument --epochs: invalid int value: 'abc'"]),
    (["--no-such-flag", "1"], ["unrecognized arguments: --no-such-flag"]),
]


@pytest.mark.parametrize("args,needles", TRAIN_CLI_CASES, ids=[" ".join(c[0]) for c in TRAIN_CLI_CASES])
def test_train_cli_bad_value_is_one_error_line_and_exit_2(tmp_path, args, needles):
    out = tmp_path / "out"
    base = ["--dataset", "digits", "--epochs", "1", "--out-dir", str(out)]
    _one_error_line(_cli("core.train", *base, *args), *needles)
    assert not out.exists(), "a refused run leaves no run folder"


@pytest.mark.parametrize("content,needle", [
    ([1, 2], "must hold a JSON object of training options"),
    ({"epochs": "ten"}, "epochs must be an integer, got 'ten'"),
    ({"device": 3}, "device must be a string, got 3"),
])
def test_train_cli_bad_config_file_is_one_error_line(tmp_path, content, needle):
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps(content))
    _one_error_line(_cli("core.train", "--config", str(f), "--out-dir", str(tmp_path / "out")), needle)


# ------------------------------------------------------------------------------------------------ image counts
# the Attack Lab, Embeddings, Sample analysis and Evaluation pages asked these before calling core
@pytest.mark.parametrize("call,needle", [
    (lambda c: c(0), "the number of images must be a positive integer, got 0"),
    (lambda c: c(-3), "the number of images must be a positive integer, got -3"),
    (lambda c: c(2.5), "the number of images must be a whole number, got 2.5"),
    (lambda c: c(True), "the number of images must be a whole number, got True"),
    (lambda c: c(-1, allow_all=True), "the number of images must be a positive integer (0 = all), got -1"),
    (lambda c: c(600, 500, split="test", dataset="cifar10-demo"),
     "asked for 600 images but the test set of 'cifar10-demo' has only 500"),
    (lambda c: c(6000, 10_000, limit=5000), "at most 5000 images per interactive run"),
])
def test_check_image_count_refuses(call, needle):
    from core.data import check_image_count

    with pytest.raises(InputError) as e:
        call(check_image_count)
    assert needle in str(e.value), str(e.value)


def test_check_image_count_accepts():
    from core.data import check_image_count

    assert check_image_count(0, 359, allow_all=True) == 0
    assert check_image_count(359.0, 359) == 359


def test_interactive_attack_images_are_capped_in_core():
    from core.attacks.budget import MAX_INTERACTIVE_IMAGES, check_interactive_images

    assert check_interactive_images(64, 500) == 64
    with pytest.raises(InputError, match=f"at most {MAX_INTERACTIVE_IMAGES} images per interactive run"):
        check_interactive_images(MAX_INTERACTIVE_IMAGES + 1, 50_000)
    with pytest.raises(InputError, match="the number of images must be a positive integer, got 0"):
        check_interactive_images(0, 500)


def test_evaluation_config_checks_n_against_the_split():
    from types import SimpleNamespace

    from core.evaluation import resolve_config

    meta = SimpleNamespace(dataset="digits", source="bundled")
    cfg = {"model": {"source": "bundled", "name": "x"}, "n": 400}
    with pytest.raises(InputError, match="asked for 400 images but the test set of 'digits' has only 359"):
        resolve_config(cfg, meta, n_available=359)
    assert resolve_config({**cfg, "n": 359}, meta, n_available=359)["n"] == 359
    for bad, needle in (({"n": 0}, "n must be a positive integer, got 0"),
                        ({"chunk_size": -50}, "chunk size must be a positive integer, got -50"),
                        ({"eps": -0.1}, "epsilon must be a finite number >= 0")):
        with pytest.raises(InputError, match=needle):
            resolve_config({**cfg, **bad}, meta)


# ------------------------------------------------------------------------------------------------ SGLD
@pytest.mark.parametrize("classes,chains,kw,needle", [
    ([], 4, {}, "choose at least one class to sample"),
    ([0, 1], 65, {"max_per_class": 64}, "chains per class must be at most 64 in an interactive run, got 65"),
    ([0], 0, {}, "chains per class must be a positive integer, got 0"),
    ([0], 4, {"eta": -1.0}, "step size η must be > 0, got -1"),
    ([0], 4, {"zeta": 1.0}, "momentum ζ must lie in [0, 1)"),
    ([0], 4, {"gamma": -0.1}, "noise γ is a standard deviation and must be ≥ 0, got -0.1"),
    ([0], 4, {"bound": ("Linf", 0.0)}, "bound radius must be > 0, got 0"),
    ([0], 4, {"seed": -1}, "seed must be a non-negative integer, got -1"),
    ([0], 4, {"pca_sigma": -0.5}, "PCA σ must be ≥ 0, got -0.5"),
    ([0], 4, {"init": "magic"}, "initialisation must be one of"),
])
def test_sgld_sampler_settings_are_checked_in_core(classes, chains, kw, needle):
    from core.sampling import validate_sampler_settings

    with pytest.raises(InputError) as e:
        validate_sampler_settings(classes, chains, **kw)
    assert needle in str(e.value), str(e.value)


def test_sgld_sampler_settings_accept_the_page_defaults():
    from core.sampling import MAX_INTERACTIVE_CHAINS, validate_sampler_settings

    validate_sampler_settings(list(range(10)), 4, init="pca", eta=0.025, zeta=0.8, gamma=0.001, bound=None, seed=0,
                              max_per_class=MAX_INTERACTIVE_CHAINS)
    validate_sampler_settings([3], MAX_INTERACTIVE_CHAINS, pca_variance=None, pca_components=20,
                              max_per_class=MAX_INTERACTIVE_CHAINS)


def test_sgld_job_without_classes_is_refused_by_its_config():
    from core.sampling import SGLDJobConfig

    with pytest.raises(InputError, match="choose at least one class to sample"):
        SGLDJobConfig.from_dict({"model": {"source": "bundled", "name": "x"}, "classes": []}).validate()


# ------------------------------------------------------------------------------------------------ Fig. 5a subsets
def _lm(source: str = "bundled"):
    from types import SimpleNamespace

    return SimpleNamespace(meta=SimpleNamespace(hparams={"epochs": 10, "lr": 0.1}, dataset="digits", arch="smallcnn",
                                                method="sat", source=source))


@pytest.mark.parametrize("kw,needle", [
    ({"train": {"epochs": 0}}, "epochs must be a positive integer, got 0"),
    ({"train": {"epochs": -2}}, "epochs must be a positive integer, got -2"),
    ({"train": {"epochz": 3}}, "unknown training option(s): epochz"),
    ({"source": "zoo"}, "retraining RobustBench architectures is not supported"),
    ({"size": -3}, "the subset size must be a positive integer (or none for the largest possible), got -3"),
    ({"seed": -1}, "the selection seed must be an integer >= 0, got -1"),
])
def test_subset_request_is_checked_in_core(kw, needle):
    from core.analysis import validate_subset_request

    with pytest.raises(InputError) as e:
        validate_subset_request(_lm(), **kw)
    assert needle in str(e.value), str(e.value)


def test_subset_request_returns_the_retraining_config():
    from core.analysis import validate_subset_request

    base = validate_subset_request(_lm(), source="local", size=4, train={"epochs": 2})
    assert base["epochs"] == 2 and base["method"] == "sat" and base["dataset"] == "digits"
    with pytest.raises(InputError, match="RobustBench"):
        validate_subset_request(_lm(source="zoo"))


def test_decay_epochs_of_the_piecewise_schedule():
    from core.errors import InputError
    from core.train import TrainConfig

    assert TrainConfig(schedule="piecewise", epochs=40).validate().decay_milestones() == [20, 30]
    assert TrainConfig(schedule="piecewise", epochs=30, decay_epochs="10, 20").validate().decay_milestones() == [10, 20]
    for bad, what in (("20,10", "increase"), ("0", "lie in"), ("30", "lie in"), ("ten", "whole numbers"),
                      ("1," * 20 + "2", "whole numbers")):
        with pytest.raises(InputError, match=what):
            TrainConfig(schedule="piecewise", epochs=30, decay_epochs=bad).validate()
    with pytest.raises(InputError, match="piecewise schedule only"):
        TrainConfig(schedule="onecycle", epochs=30, decay_epochs="10").validate()


def test_decay_epochs_reach_the_learning_rate(tmp_path):
    """The recorded lr (end of each epoch) drops by 10x after each chosen decay epoch, not at the default half/3/4."""
    from core.rundir import RunDir
    from core.train import TrainConfig, train

    cfg = TrainConfig(dataset="digits", arch="demonet", width=8, train_per_class=13, epochs=4, batch_size=64,
                      attack_steps=1, eval_samples=32, eval_steps=1, out_dir=str(tmp_path / "run"), augment=False,
                      schedule="piecewise", decay_epochs="1,3", lr=0.1)
    train(cfg)
    lrs = [r["lr"] for r in RunDir(tmp_path / "run").read_metrics()]
    assert lrs == pytest.approx([0.01, 0.01, 0.001, 0.001])
