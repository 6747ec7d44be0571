"""RobustBench zoo: catalogue parsing, offline loading through robustbench, and bad files.

Everything runs offline: weights are random tensors saved in the exact layout robustbench reads,
and the download function is either blocked by core.zoo or monkeypatched here.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from apptest_helpers import open_page
import torch

from core import zoo
from core.compat import ensure_autoattack_alias, import_robustbench_utils, robustbench_info
from core.errors import ZooError
from core.models.checkpoint import LoadedModel

SMALL = ("Rice2020Overfitting", "cifar10", "L2")  # PreAct-ResNet-18, 11M parameters
REPO = Path(__file__).resolve().parents[1]
HUB_PREFIX = "Debenedetti2022Light_XCiT-"  # the timm-hosted entries one robustbench 1.1.1 build comments out


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rb_utils():
    return import_robustbench_utils()


@pytest.fixture(scope="module")
def reference(rb_utils):
    """The small zoo architecture built exactly as robustbench builds it, randomised, plus a batch."""
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    from robustbench.model_zoo.models import model_dicts

    name, ds, tm = SMALL
    torch.manual_seed(1234)
    model = model_dicts[BenchmarkDataset(ds)][ThreatModel(tm)][name]["model"]()
    with torch.no_grad():  # make BN statistics non-trivial so that a wrong load would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    model.eval()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, x, y


def _target(tmp_path: Path, name=SMALL[0], ds=SMALL[1], tm=SMALL[2]) -> Path:
    p = tmp_path / ds / tm / f"{name}.pt"
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _assert_same_outputs(loaded: LoadedModel, reference) -> None:
    _, x, y = reference
    assert not loaded.model.training
    with torch.no_grad():
        out = loaded.model(x)
    torch.testing.assert_close(out, y, rtol=1e-5, atol=1e-5)


class _Evil:
    """Unpickling this object opens (creates) a marker file: a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _installed_robustbench() -> Path:
    info = robustbench_info()
    if not info.installed or info.model_zoo is None:
        pytest.skip("robustbench is not installed (CI's environment check fails on that)")
    return info.location


def _listed(zoo_file: Path, prefix: str) -> list[str]:
    """Names starting with ``prefix`` that a zoo file lists on a line that is not commented out."""
    return re.findall(r"^[ \t]*\(\s*['\"](" + re.escape(prefix) + r"[^'\"]*)['\"]", zoo_file.read_text(), re.M)


def _comment_out_entries(text: str, prefix: str) -> tuple[str, int]:
    """Comment out every ``('<prefix>...', {...}),`` entry of a zoo file, as that robustbench build does."""
    lines, out, i, n = text.splitlines(keepends=True), [], 0, 0
    while i < len(lines):
        m = re.match(r"^([ \t]*)\(\s*['\"]" + re.escape(prefix), lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent, n = m.group(1), n + 1
        while i < len(lines):
            line = lines[i]
            out.append(indent + "# " + line[len(indent):] if line.startswith(indent) else "# " + line)
            i += 1
            if line.startswith(indent + "})"):
                break
    return "".join(out), n


@contextlib.contextmanager
def _zoo_files(monkeypatch, folder: Path):
    """Parse the catalogue from ``folder`` (a model_zoo with cifar10.py / cifar100.py) instead of robustbench's."""
    monkeypatch.setattr(zoo.lookup, "robustbench_zoo_dir", lambda: folder)
    zoo.catalogue.cache_clear()
    try:
        yield
    finally:
        monkeypatch.undo()
        zoo.catalogue.cache_clear()


def _models_page(select: str | None = None):
    """The Models page (RobustBench zoo tab) under AppTest, optionally with one zoo model selected."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "dashboard" / "Home.py"), default_timeout=90).run()
    open_page(at, "models")
    if select is not None:
        at.selectbox(key="models_zoo_name").set_value(select).run()
    assert not at.exception, [e.message for e in at.exception]
    return at


# --------------------------------------------------------------------------------------------
# catalogue
# --------------------------------------------------------------------------------------------

def test_catalogue_parsed_from_installed_robustbench():
    assert zoo.catalogue_source().startswith("robustbench")
    linf = {e.name: e for e in zoo.list_zoo("cifar10", "Linf")}
    l2 = {e.name: e for e in zoo.list_zoo("cifar10", "L2")}
    c100 = zoo.list_zoo("cifar100", "Linf")
    assert len(linf) >= 40 and len(l2) >= 10 and len(c100) >= 20
    assert zoo.list_zoo("cifar100", "L2") == []  # robustbench has no CIFAR-100 L2 track
    for n in ("Standard", "Engstrom2019Robustness", "Zhang2019Theoretically", "Wang2020Improving",
              "Wu2020Adversarial", "Wu2020Adversarial_extra", "Wang2023Better_WRN-28-10", "Carmon2019Unlabeled",
              "Zhang2020Geometry", "Rice2020Overfitting"):
        assert n in linf, n
    for n in ("Engstrom2019Robustness", "Wang2023Better_WRN-28-10", "Wu2020Adversarial", "Rice2020Overfitting"):
        assert n in l2, n
    assert "Zhang2019Theoretically" not in l2
    assert all(e.dataset == "cifar10" and e.threat_model == "Linf" for e in linf.values())
    assert all(e.dataset == "cifar100" and e.num_classes == 100 for e in c100)
    # gdrive ids are read from the literals
    assert linf["Standard"].gdrive_id == "1t98aEuzeTL8P7Kpd5DIrCoCL21BNZUhC"
    assert linf["Standard"].urls == ["https://drive.google.com/uc?id=1t98aEuzeTL8P7Kpd5DIrCoCL21BNZUhC"]
    assert linf["Chen2020Adversarial"].is_ensemble
    # the timm-hosted entries are listed exactly when the installed files list them (one 1.1.1 build
    # has them commented out), and they are the catalogue's hub-hosted models
    zoo_dir = _installed_robustbench() / "model_zoo"
    listed = _listed(zoo_dir / "cifar10.py", HUB_PREFIX)
    assert sorted(n for n in linf if n.startswith(HUB_PREFIX)) == sorted(listed)
    assert all(linf[n].hosted_on_hub and linf[n].urls == [] for n in listed)
    assert len(zoo.list_zoo()) == len(linf) + len(l2) + len(c100)


def test_catalogue_accuracies_architectures_and_paper_flags():
    linf = {e.name: e for e in zoo.list_zoo("cifar10", "Linf")}
    l2 = {e.name: e for e in zoo.list_zoo("cifar10", "L2")}
    assert (linf["Standard"].clean_acc, linf["Standard"].aa_acc) == (94.78, 0.0)
    assert (linf["Engstrom2019Robustness"].clean_acc, linf["Engstrom2019Robustness"].aa_acc) == (87.03, 49.25)
    assert (l2["Engstrom2019Robustness"].clean_acc, l2["Engstrom2019Robustness"].aa_acc) == (90.83, 69.24)
    assert (l2["Wang2023Better_WRN-28-10"].clean_acc, l2["Wang2023Better_WRN-28-10"].aa_acc) == (95.16, 83.68)
    assert linf["Wu2020Adversarial_extra"].aa_acc == 60.04
    assert linf["Engstrom2019Robustness"].architecture == "ResNet-50"
    assert linf["Rice2020Overfitting"].architecture == "WideResNet-34-20"
    assert l2["Rice2020Overfitting"].architecture == "PreActResNet-18"
    # architectures of entries without hand-written facts are derived from the constructors
    assert linf["Gowal2020Uncovering_70_16"].architecture == "WideResNet-70-16"
    assert linf["Andriushchenko2020Understanding"].architecture == "PreActResNet-18"
    assert linf["Hendrycks2019Using"].architecture == "WideResNet-28-10"
    unknown = [e for e in linf.values() if e.clean_acc is None]
    assert unknown and all(e.aa_acc is None for e in unknown)

    paper_linf = {n for n, e in linf.items() if e.paper_model}
    assert paper_linf == {"Standard", "Engstrom2019Robustness", "Zhang2019Theoretically", "Wang2020Improving",
                          "Wu2020Adversarial", "Wang2023Better_WRN-28-10", "Carmon2019Unlabeled",
                          "Zhang2020Geometry", "Rice2020Overfitting"}
    assert {n for n, e in l2.items() if e.paper_model} == {"Engstrom2019Robustness", "Wang2023Better_WRN-28-10"}
    assert not any(e.paper_model for e in zoo.list_zoo("cifar100"))
    assert linf["Standard"].eps == pytest.approx(8 / 255) and l2["Standard"].eps == 0.5


def test_fallback_catalogue_when_robustbench_files_unparseable(monkeypatch):
    monkeypatch.setattr(zoo.lookup, "robustbench_zoo_dir", lambda: Path("/nonexistent/robustbench/model_zoo"))
    zoo.catalogue.cache_clear()
    try:
        assert zoo.catalogue_source().startswith("built-in")
        names = {e.name for e in zoo.list_zoo("cifar10", "Linf")}
        assert {"Standard", "Engstrom2019Robustness", "Wang2023Better_WRN-28-10"} <= names
        assert zoo.get_zoo_entry("Standard").clean_acc == 94.78
    finally:
        monkeypatch.undo()
        zoo.catalogue.cache_clear()
    assert zoo.catalogue_source().startswith("robustbench")


def test_lookup_is_case_insensitive_and_suggests(tmp_path):
    e = zoo.get_zoo_entry("standard", "CIFAR10", "linf")
    assert (e.name, e.dataset, e.threat_model) == ("Standard", "cifar10", "Linf")
    assert zoo.zoo_path("engstrom2019robustness", "Cifar10", "l2", tmp_path) == \
        tmp_path / "cifar10" / "L2" / "Engstrom2019Robustness.pt"
    with pytest.raises(ZooError, match="Did you mean: Engstrom2019Robustness"):
        zoo.get_zoo_entry("Engstrom2019Robustnes")
    with pytest.raises(ZooError, match="exists for: cifar10/Linf"):
        zoo.get_zoo_entry("Zhang2019Theoretically", "cifar10", "L2")
    with pytest.raises(ZooError, match="unknown dataset"):
        zoo.list_zoo("mnist")
    with pytest.raises(ZooError, match="unknown threat model"):
        zoo.load_zoo_model("Standard", threat_model="L1", model_dir=tmp_path)
    with pytest.raises(ZooError, match="Did you mean"):
        zoo.load_zoo_model("Wang2023Better_WRN28-10", model_dir=tmp_path)


def test_import_is_light():
    code = ("import sys, core.zoo as z; z.list_zoo(); z.zoo_path('Standard');"
            "assert 'robustbench' not in sys.modules and 'timm' not in sys.modules, 'heavy import'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# AutoAttack alias
# --------------------------------------------------------------------------------------------

def test_autoattack_alias_is_idempotent():
    first = ensure_autoattack_alias()
    assert first in ("pyautoattack", "autoattack")
    assert ensure_autoattack_alias() == first
    import autoattack
    from autoattack import AutoAttack
    from autoattack.state import EvaluationState
    import autoattack.autopgd_base
    import autoattack.fab_pt
    import autoattack.other_utils
    import autoattack.square

    assert AutoAttack is autoattack.AutoAttack and EvaluationState is not None
    if first == "pyautoattack":
        import pyautoattack
        import pyautoattack.state

        assert autoattack is pyautoattack
        assert EvaluationState is pyautoattack.state.EvaluationState
        assert sys.modules["autoattack.square"] is sys.modules["pyautoattack.square"]
        assert sum(1 for f in sys.meta_path if type(f).__name__ == "_AliasFinder") == 1
    with pytest.raises(ImportError):
        import autoattack.no_such_module  # noqa: F401


def test_robustbench_imports_after_alias(rb_utils):
    assert callable(rb_utils.load_model)
    import robustbench
    import robustbench.eval  # the module that may need `autoattack`

    info = robustbench_info()
    assert info.location == Path(robustbench.__file__).parent
    if info.eval_imports_autoattack:
        assert robustbench.eval.AutoAttack is sys.modules["autoattack"].AutoAttack
    else:  # the build whose eval.py has the import commented out: nothing of EnergyLens needs it
        assert not hasattr(robustbench.eval, "AutoAttack")


_NO_PKG_RESOURCES_SCRIPT = r"""
import importlib.abc, sys


class _Gone(importlib.abc.MetaPathFinder):  # as with setuptools >= 81, which removed pkg_resources
    def find_spec(self, name, path=None, target=None):
        if name == "pkg_resources" or name.startswith("pkg_resources."):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return None


sys.meta_path.insert(0, _Gone())
sys.modules.pop("pkg_resources", None)
from core.compat import import_robustbench_utils
from core.errors import ZooError

try:
    import_robustbench_utils()
except ZooError as e:
    print("ZooError:", e)
else:
    print("imported")
"""


@pytest.mark.slow
def test_robustbench_without_pkg_resources_says_which_setuptools_to_install():
    _installed_robustbench()
    r = subprocess.run([sys.executable, "-c", _NO_PKG_RESOURCES_SCRIPT], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ZooError: RobustBench models are unavailable" in r.stdout, r.stdout
    assert "setuptools<81" in r.stdout and "pkg_resources" in r.stdout


_EVAL_VARIANT_SCRIPT = r"""
import json, sys
from pathlib import Path

import torch

from core import zoo
from core.compat import import_robustbench_utils, robustbench_info

out = Path(sys.argv[1])
info = robustbench_info()
import_robustbench_utils()
import robustbench, robustbench.eval
from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
from robustbench.model_zoo.models import model_dicts

torch.manual_seed(0)
ref = model_dicts[BenchmarkDataset("cifar10")][ThreatModel("L2")]["Rice2020Overfitting"]["model"]().eval()
path = zoo.zoo_path("Rice2020Overfitting", "cifar10", "L2", out)
path.parent.mkdir(parents=True)
torch.save(ref.state_dict(), path)
lm = zoo.load_zoo_model("Rice2020Overfitting", "cifar10", "L2", model_dir=out)
x = torch.rand(2, 3, 32, 32)
with torch.no_grad():
    same = bool(torch.allclose(lm.model(x), ref(x), atol=1e-5))
aa = getattr(robustbench.eval, "AutoAttack", None)
print(json.dumps({"location": str(info.location), "imported_from": robustbench.__file__,
                  "eval_imports_autoattack": info.eval_imports_autoattack, "has_autoattack": aa is not None,
                  "autoattack_module": getattr(aa, "__module__", None), "same_outputs": same}))
"""


def _set_eval_autoattack_import(eval_py: Path, present: bool) -> None:
    """Make eval.py import AutoAttack at module level (``present``) or have those lines commented out."""
    lines = eval_py.read_text().splitlines(keepends=True)
    imp = re.compile(r"^(from autoattack|import autoattack)")
    commented = re.compile(r"^#\s*((from autoattack|import autoattack).*)$", re.S)
    if present:
        lines = [commented.sub(r"\1", ln) for ln in lines]
        if not any(imp.match(ln) for ln in lines):
            lines.insert(0, "from autoattack import AutoAttack\nfrom autoattack.state import EvaluationState\n")
    else:
        lines = ["# " + ln if imp.match(ln) else ln for ln in lines]
    eval_py.write_text("".join(lines))


@pytest.mark.slow
@pytest.mark.parametrize("eval_imports_autoattack", [True, False], ids=["eval-imports-autoattack",
                                                                     "eval-import-commented-out"])
def test_zoo_loads_with_each_robustbench_eval_variant(tmp_path, eval_imports_autoattack):
    """Both robustbench 1.1.1 builds, constructed from the installed one: import_robustbench_utils and
    an offline zoo load work, and core.compat reports which build it is."""
    site = tmp_path / "site"
    shutil.copytree(_installed_robustbench(), site / "robustbench", ignore=shutil.ignore_patterns("__pycache__"))
    _set_eval_autoattack_import(site / "robustbench" / "eval.py", eval_imports_autoattack)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    r = subprocess.run([sys.executable, "-c", _EVAL_VARIANT_SCRIPT, str(tmp_path / "zoo")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["location"] == str(site / "robustbench")
    assert got["imported_from"].startswith(str(site / "robustbench"))
    assert got["eval_imports_autoattack"] is eval_imports_autoattack
    assert got["has_autoattack"] is eval_imports_autoattack
    if eval_imports_autoattack and ensure_autoattack_alias() == "pyautoattack":
        assert got["autoattack_module"].startswith("pyautoattack")
    assert got["same_outputs"]


# --------------------------------------------------------------------------------------------
# offline loading through robustbench.utils.load_model
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("wrap", ["plain", "state_dict+module"])
def test_load_real_zoo_model_offline(tmp_path, reference, wrap):
    state, _, _ = reference
    if wrap == "state_dict+module":
        obj = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 99}
    else:
        obj = state
    torch.save(obj, _target(tmp_path))
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None

    loaded = zoo.load_zoo_model("rice2020overfitting", "CIFAR10", "l2", model_dir=tmp_path)

    _assert_same_outputs(loaded, reference)
    meta = loaded.meta
    assert (meta.arch, meta.num_classes, meta.dataset, meta.source, meta.method, meta.name) == \
        ("PreActResNet-18", 10, "cifar10", "zoo", "zoo", "Rice2020Overfitting")
    assert meta.hparams["threat_model"] == "L2" and meta.hparams["eps"] == 0.5
    assert meta.metrics == {"clean_acc": 88.67, "aa_acc": 67.68}
    assert meta.class_names[0] == "airplane"
    assert loaded.path == _target(tmp_path)
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # restored
    status = {e.name: e for e in zoo.list_zoo("cifar10", "L2", model_dir=tmp_path)}
    assert status["Rice2020Overfitting"].downloaded and status["Rice2020Overfitting"].file_status == "ok"
    assert status["Standard"].downloaded is False and status["Standard"].file_status == "missing"


def test_checkpoint_without_normalisation_buffers_keeps_defaults(tmp_path, reference):
    """robustbench quirk: Rice/Engstrom checkpoints lack mu/sigma; the constructor values are kept."""
    state, _, _ = reference
    torch.save({k: v for k, v in state.items() if k not in ("mu", "sigma")}, _target(tmp_path))
    _assert_same_outputs(zoo.load_zoo_model(*SMALL, model_dir=tmp_path), reference)


def test_download_branch_uses_robustbench_downloader(tmp_path, reference, rb_utils, monkeypatch):
    state, _, _ = reference
    calls = []

    def fake_download(gdrive_id, fname_save):
        calls.append(gdrive_id)
        torch.save(state, fname_save)

    _patch_downloaders(monkeypatch, rb_utils, fake_download)
    loaded = zoo.load_zoo_model(*SMALL, model_dir=tmp_path, allow_download=True)
    assert calls == [zoo.get_zoo_entry(*SMALL).gdrive_id]
    _assert_same_outputs(loaded, reference)


def test_download_returning_html_is_quarantined(tmp_path, rb_utils, monkeypatch):
    def fake_download(gdrive_id, fname_save):
        Path(fname_save).write_text("<!DOCTYPE html><html><body>Quota exceeded</body></html>")

    _patch_downloaders(monkeypatch, rb_utils, fake_download)
    with pytest.raises(ZooError, match="HTML") as ei:
        zoo.load_zoo_model(*SMALL, model_dir=tmp_path, allow_download=True)
    assert "moved to" in str(ei.value)
    folder = _target(tmp_path).parent
    assert not _target(tmp_path).exists()
    assert len(list(folder.glob("Rice2020Overfitting.pt.bad-*"))) == 1


# --------------------------------------------------------------------------------------------
# failures
# --------------------------------------------------------------------------------------------

def test_missing_file_offline_names_exact_path(tmp_path, rb_utils, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("network used")

    _patch_downloaders(monkeypatch, rb_utils, no_network)
    with pytest.raises(ZooError) as ei:
        zoo.load_zoo_model("Standard", "cifar10", "Linf", model_dir=tmp_path)
    msg = str(ei.value)
    assert str(tmp_path / "cifar10" / "Linf" / "Standard.pt") in msg
    assert "https://drive.google.com/uc?id=1t98aEuzeTL8P7Kpd5DIrCoCL21BNZUhC" in msg
    assert "enable downloads" in msg
    assert not (tmp_path / "cifar10").exists()


_SYNTHETIC_CIFAR10 = """from collections import OrderedDict

import timm

from robustbench.model_zoo.architectures.wide_resnet import WideResNet

linf = OrderedDict([
    ('Standard', {
        'model': lambda: WideResNet(depth=28, widen_factor=10),
        'gdrive_id': '1t98aEuzeTL8P7Kpd5DIrCoCL21BNZUhC',
    }),
    ('Debenedetti2022Light_XCiT-S12', {
        'model': (lambda: timm.create_model(
            'debenedetti2020light_xcit_s_cifar10_linf', pretrained=True)),
        'gdrive_id':
        None
    }),
])
l2 = OrderedDict([])
"""


@pytest.mark.parametrize("hub_entries", [True, False], ids=["zoo-with-hub-entries", "hub-entries-commented-out"])
def test_hub_hosted_model_in_each_zoo_variant(tmp_path, monkeypatch, hub_entries):
    """A timm-hosted model (no file of its own) needs downloads; a build without such entries reports the
    name as unknown. The Models page renders either way."""
    folder = tmp_path / "model_zoo"
    folder.mkdir()
    text, n = _comment_out_entries(_SYNTHETIC_CIFAR10, HUB_PREFIX) if not hub_entries else (_SYNTHETIC_CIFAR10, 0)
    assert n == (0 if hub_entries else 1)
    (folder / "cifar10.py").write_text(text)
    (folder / "cifar100.py").write_text("from collections import OrderedDict\nlinf = OrderedDict([])\n")
    name = "Debenedetti2022Light_XCiT-S12"
    with _zoo_files(monkeypatch, folder):
        assert zoo.catalogue_source().startswith("robustbench")
        names = [e.name for e in zoo.list_zoo("cifar10", "Linf", model_dir=tmp_path)]
        if hub_entries:
            assert names == ["Standard", name]
            e = zoo.get_zoo_entry(name)
            assert e.hosted_on_hub and e.urls == [] and zoo.zoo_files(e, tmp_path) == []
            assert e.architecture == "XCiT-S12" and "Hugging Face" in e.note
            assert {x.name: x.file_status for x in zoo.list_zoo("cifar10", "Linf", model_dir=tmp_path)}[name] == "hub"
            with pytest.raises(ZooError, match="Hugging Face"):
                zoo.load_zoo_model(name, model_dir=tmp_path)
            at = _models_page(select=name)
            assert any("Hugging Face hub" in m.value for m in at.markdown)
        else:
            assert names == ["Standard"]
            with pytest.raises(ZooError, match=f"unknown RobustBench model '{name}'"):
                zoo.load_zoo_model(name, model_dir=tmp_path)
            at = _models_page()
            assert at.selectbox(key="models_zoo_name").options == ["Standard"]


def test_installed_zoo_without_the_hub_entries(tmp_path, monkeypatch):
    """The installed model zoo with the Debenedetti2022Light_XCiT-* entries commented out (the other
    1.1.1 build): the catalogue loses exactly those entries and keeps every other one, in order."""
    dst = tmp_path / "model_zoo"
    shutil.copytree(_installed_robustbench() / "model_zoo", dst, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("cifar10.py", "cifar100.py"):
        text, n = _comment_out_entries((dst / f).read_text(), HUB_PREFIX)
        assert n == len(_listed(dst / f, HUB_PREFIX))
        (dst / f).write_text(text)
        assert _listed(dst / f, HUB_PREFIX) == []
    keys = [("cifar10", "Linf"), ("cifar10", "L2"), ("cifar100", "Linf")]
    before = {k: [e.name for e in zoo.list_zoo(*k)] for k in keys}
    with _zoo_files(monkeypatch, dst):
        assert zoo.catalogue_source().startswith("robustbench")
        for k in keys:
            assert [e.name for e in zoo.list_zoo(*k)] == [n for n in before[k] if not n.startswith(HUB_PREFIX)]
        assert not any(e.hosted_on_hub for e in zoo.list_zoo())
        assert zoo.get_zoo_entry("Standard").clean_acc == 94.78
        with pytest.raises(ZooError, match=f"unknown RobustBench model '{HUB_PREFIX}S12'"):
            zoo.get_zoo_entry(f"{HUB_PREFIX}S12")


def test_every_hub_hosted_entry_of_the_installed_zoo_needs_downloads(tmp_path):
    hub = [e for e in zoo.list_zoo() if e.hosted_on_hub]
    assert {e.name for e in hub} == set(_listed(_installed_robustbench() / "model_zoo" / "cifar10.py", HUB_PREFIX)
                                         + _listed(_installed_robustbench() / "model_zoo" / "cifar100.py", HUB_PREFIX))
    for e in hub:
        with pytest.raises(ZooError, match="Hugging Face"):
            zoo.load_zoo_model(e.name, e.dataset, e.threat_model, model_dir=tmp_path)


@pytest.mark.parametrize("content,kind", [(b"<!DOCTYPE html>\n<html><head><title>Google Drive</title>", "HTML"),
                                          (b"", "empty")])
def test_failed_download_is_refused_and_left_alone(tmp_path, content, kind):
    p = _target(tmp_path)
    p.write_bytes(content)
    with pytest.raises(ZooError, match=kind) as ei:
        zoo.load_zoo_model(*SMALL, model_dir=tmp_path)
    assert "quarantine" in str(ei.value) and str(p) in str(ei.value)
    assert p.read_bytes() == content  # untouched
    entry = {e.name: e for e in zoo.list_zoo("cifar10", "L2", model_dir=tmp_path)}["Rice2020Overfitting"]
    assert entry.downloaded is False and entry.file_status == ("html" if kind == "HTML" else "empty")

    moved = zoo.quarantine(p)
    assert not p.exists() and moved.parent == p.parent
    assert moved.name.startswith("Rice2020Overfitting.pt.bad-") and moved.read_bytes() == content
    p.write_bytes(content)  # a second bad file in the same second gets its own name
    assert zoo.quarantine(p) != moved
    with pytest.raises(ZooError, match="no such file"):
        zoo.quarantine(p)


def test_wrong_architecture_is_a_zoo_error(tmp_path):
    torch.manual_seed(0)
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(8, 10))
    torch.save(other.state_dict(), _target(tmp_path))
    with pytest.raises(ZooError, match="does not match architecture PreActResNet-18") as ei:
        zoo.load_zoo_model(*SMALL, model_dir=tmp_path)
    assert not isinstance(ei.value, RuntimeError)


def test_wrong_shapes_is_a_zoo_error(tmp_path, reference):
    state, _, _ = reference
    bad = dict(state)
    key = next(k for k, v in state.items() if v.ndim == 2)  # the final linear layer
    bad[key] = torch.zeros(100, state[key].shape[1])
    torch.save(bad, _target(tmp_path))
    with pytest.raises(ZooError, match="does not match architecture") as ei:
        zoo.load_zoo_model(*SMALL, model_dir=tmp_path)
    assert "wrong shape" in str(ei.value) and "different number of classes" in str(ei.value)


def test_truncated_checkpoint_is_a_zoo_error(tmp_path, reference):
    state, _, _ = reference
    p = _target(tmp_path)
    torch.save(state, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])
    with pytest.raises(ZooError, match="corrupt or truncated"):
        zoo.load_zoo_model(*SMALL, model_dir=tmp_path)


@pytest.mark.parametrize("fmt", ["torch.save", "raw-pickle"])
def test_code_executing_pickle_is_refused(tmp_path, monkeypatch, fmt):
    marker = tmp_path / "PWNED"
    p = _target(tmp_path)
    evil = {"state_dict": _Evil(marker)}
    if fmt == "torch.save":
        torch.save(evil, p)
    else:
        with open(p, "wb") as f:
            pickle.dump(evil, f, protocol=2)
    # even a user-level request to disable weights-only loading must not apply to zoo loads
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ZooError) as ei:
        zoo.load_zoo_model(*SMALL, model_dir=tmp_path)
    assert not marker.exists()
    assert "run code" in str(ei.value) and "weights_only" in str(ei.value)
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") == "1"  # restored
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None


def test_ensemble_files_follow_robustbench_naming(tmp_path):
    e = zoo.get_zoo_entry("Chen2020Adversarial", "cifar10", "Linf")
    files = zoo.zoo_files(e, tmp_path)
    assert [f.name for f in files] == [f"Chen2020Adversarial.pt_m{i}.pt" for i in range(3)]
    with pytest.raises(ZooError, match="Chen2020Adversarial.pt_m0.pt"):
        zoo.load_zoo_model("Chen2020Adversarial", model_dir=tmp_path)


def test_bad_device_is_a_zoo_error(tmp_path):
    with pytest.raises(ZooError, match="invalid device"):
        zoo.load_zoo_model(*SMALL, model_dir=tmp_path, device="not-a-device")


def _patch_downloaders(monkeypatch, rb_utils, fn):
    """Replace robustbench's downloader under whichever name this release uses."""
    names = [n for n in zoo.DOWNLOADERS if hasattr(rb_utils, n)]
    assert names, "robustbench has no known download function"
    for n in names:
        monkeypatch.setattr(rb_utils, n, fn)


# --------------------------------------------------------------------------------------------
# downloads without internet (issue 13 item 9): local fakes, no network
# --------------------------------------------------------------------------------------------

def _name_resolution_error():
    """What requests raises on a machine without DNS: ConnectionError(MaxRetryError(NameResolutionError))."""
    import socket

    import requests
    from urllib3.exceptions import MaxRetryError, NameResolutionError

    url = "/uc?export=download&confirm=t&id=x"
    nre = NameResolutionError("docs.google.com", None, socket.gaierror(-3, "Temporary failure in name resolution"))
    return requests.exceptions.ConnectionError(MaxRetryError(None, url, reason=nre))


def _refused_connection():
    """A real requests.get to a closed port on this machine: a genuine ConnectionError, no internet needed."""
    import socket

    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        requests.get(f"http://127.0.0.1:{port}/uc?id=x", timeout=2)
    except requests.exceptions.RequestException as e:
        return e
    raise AssertionError("a closed port accepted a connection")


def _wrapped_gaierror():
    import socket

    try:
        raise socket.gaierror(-2, "Name or service not known")
    except OSError as inner:
        try:
            raise RuntimeError("download failed") from inner
        except RuntimeError as outer:
            return outer


@pytest.mark.parametrize("make", [
    _name_resolution_error,
    _refused_connection,
    lambda: __import__("requests").exceptions.ConnectTimeout("connect timeout=10"),
    lambda: __import__("socket").gaierror(-3, "Temporary failure in name resolution"),
    lambda: TimeoutError("timed out"),
    lambda: __import__("urllib.error").error.URLError(__import__("socket").gaierror(-3, "no DNS")),
    _wrapped_gaierror,
], ids=["requests-NameResolutionError", "requests-refused-local-port", "requests-ConnectTimeout", "socket.gaierror",
        "TimeoutError", "urllib-URLError", "wrapped-gaierror"])
def test_download_without_internet_says_so_and_where_to_put_the_file(tmp_path, rb_utils, monkeypatch, make):
    err = make()

    def offline(gdrive_id, fname_save):
        raise err

    _patch_downloaders(monkeypatch, rb_utils, offline)
    with pytest.raises(ZooError) as ei:
        zoo.load_zoo_model(*SMALL, model_dir=tmp_path, allow_download=True)
    msg = str(ei.value)
    assert "needs internet" in msg and "could not be reached" in msg, msg
    assert "zoo folder" not in msg, msg
    assert str(_target(tmp_path)) in msg and zoo.get_zoo_entry(*SMALL).urls[0] in msg, msg


@pytest.mark.parametrize("make,expected", [
    (lambda: PermissionError(13, "Permission denied"), "could not read or write the zoo folder"),
    (lambda: __import__("gdown").exceptions.FileURLRetrievalError("Too many users have viewed or downloaded"),
     "Google Drive often limits downloads"),
])
def test_other_download_failures_keep_their_own_message(tmp_path, rb_utils, monkeypatch, make, expected):
    err = make()

    def failing(gdrive_id, fname_save):
        raise err

    _patch_downloaders(monkeypatch, rb_utils, failing)
    with pytest.raises(ZooError, match=expected) as ei:
        zoo.load_zoo_model(*SMALL, model_dir=tmp_path, allow_download=True)
    assert "needs internet" not in str(ei.value)


def test_models_page_download_now_offline_says_it_needs_internet(tmp_path, rb_utils, monkeypatch):
    """Issue 13 item 9, on the page: Models → RobustBench zoo → Download now, with the network unreachable."""
    import functools

    from streamlit.testing.v1 import AppTest

    def offline(gdrive_id, fname_save):
        raise _name_resolution_error()

    _patch_downloaders(monkeypatch, rb_utils, offline)
    monkeypatch.setattr(zoo, "load_zoo_model", functools.partial(zoo.load_zoo_model, model_dir=tmp_path))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "dashboard" / "Home.py"), default_timeout=120)
    at.run()
    open_page(at, "models")
    at.selectbox(key="models_zoo_ds").set_value("cifar10")
    at.selectbox(key="models_zoo_tm").set_value("L2").run()
    at.selectbox(key="models_zoo_name").set_value(SMALL[0]).run()
    at.button(key="models_zoo_download").click().run()
    assert not at.exception, [e.message for e in at.exception]
    errors = [e.value for e in at.error]
    assert any("needs internet" in e and "NameResolutionError" in e for e in errors), errors
    assert not any("zoo folder" in e or "Unexpected error" in e for e in errors), errors
