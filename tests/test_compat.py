"""Version-dependent behaviour, one variant at a time: what core.compat detects in robustbench's files,
torch.load's weights-only default (before and after torch 2.6), and plotly's two JSON dialects as the
tests' chart reader sees them. Every variant is constructed here, whichever versions are installed."""

from __future__ import annotations

import base64
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from apptest_helpers import Chart, decode_array, decode_spec

from core.compat import forced_weights_only, robustbench_info

# --------------------------------------------------------------------------------------------
# robustbench: what the installed files offer
# --------------------------------------------------------------------------------------------

_EVAL_HEAD = "import torch\nfrom robustbench.data import load_clean_dataset\n"


def _fake_robustbench(root: Path, eval_source: str | None, with_zoo: bool = True, version: str | None = "1.1.1") -> Path:
    pkg = root / "robustbench"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .utils import load_model\nfrom .eval import benchmark\n")
    if eval_source is not None:
        (pkg / "eval.py").write_text(eval_source)
    if with_zoo:
        (pkg / "model_zoo").mkdir()
        (pkg / "model_zoo" / "cifar10.py").write_text("linf = {}\n")
    if version:
        dist = root / f"robustbench-{version}.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: robustbench\nVersion: {version}\n")
    return pkg


@pytest.mark.parametrize("eval_source,expected", [
    (_EVAL_HEAD + "from autoattack import AutoAttack\nfrom autoattack.state import EvaluationState\n", True),
    # the variant the registry served: the AutoAttack imports commented out
    (_EVAL_HEAD + "# from autoattack import AutoAttack\n#from autoattack.state import EvaluationState\n", False),
    (_EVAL_HEAD + "try:\n    import autoattack.autopgd_base as apgd\nexcept ImportError:\n    apgd = None\n", True),
    # an import inside a function runs only when called: importing robustbench does not need it
    (_EVAL_HEAD + "def benchmark():\n    from autoattack import AutoAttack\n    return AutoAttack\n", False),
    (_EVAL_HEAD + "import pyautoattack as autoattack_like\n", False),
    (None, None),  # no eval.py at all
    ("def broken(:\n", None),  # unparsable
])
def test_robustbench_info_reads_eval_py_without_importing(tmp_path, eval_source, expected):
    pkg = _fake_robustbench(tmp_path, eval_source)
    info = robustbench_info(pkg)
    assert info.installed and info.location == pkg and info.version == "1.1.1"
    assert info.eval_imports_autoattack is expected
    assert info.model_zoo == pkg / "model_zoo"


def test_robustbench_info_without_zoo_version_or_package(tmp_path):
    pkg = _fake_robustbench(tmp_path, _EVAL_HEAD, with_zoo=False, version=None)
    info = robustbench_info(pkg)
    assert info.installed and info.model_zoo is None and info.version is None
    assert robustbench_info(tmp_path / "nowhere").installed is False


def test_robustbench_info_of_the_installed_package():
    import importlib.util

    spec = importlib.util.find_spec("robustbench")  # located, not imported (that needs the alias)
    if spec is None:
        pytest.skip("robustbench is not installed (CI's environment check fails on that)")
    info = robustbench_info()
    assert info.installed and info.location == Path(list(spec.submodule_search_locations)[0])
    assert info.version == "1.1.1" and info.model_zoo is not None and (info.model_zoo / "cifar10.py").is_file()
    text = (info.location / "eval.py").read_text()
    uncommented = any(line.startswith(("from autoattack", "import autoattack")) for line in text.splitlines())
    assert info.eval_imports_autoattack is uncommented


# --------------------------------------------------------------------------------------------
# torch.load: weights-only whatever the default
# --------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this creates a file: a stand-in for code a malicious checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("default", ["torch>=2.6 (weights-only)", "torch<2.6 (full unpickling)"])
@pytest.mark.parametrize("call", ["no weights_only argument", "weights_only=False"])
def test_forced_weights_only_under_either_default(tmp_path, monkeypatch, default, call):
    """robustbench calls torch.load without weights_only. Before torch 2.6 that unpickles anything; from
    2.6 on too when TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 restores the old default, which is how the
    older behaviour is constructed here."""
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    if default.startswith("torch<2.6"):
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    else:
        monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    before = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    marker = tmp_path / "PWNED"
    evil, plain = tmp_path / "evil.pt", tmp_path / "plain.pt"
    torch.save({"state_dict": _Payload(marker)}, evil)
    torch.save({"w": torch.arange(3.0)}, plain)
    kwargs = {} if call.startswith("no") else {"weights_only": False}

    with forced_weights_only():
        with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
            torch.load(evil, map_location="cpu", **kwargs)
        assert torch.equal(torch.load(plain, map_location="cpu", **kwargs)["w"], torch.arange(3.0))
    assert not marker.exists()
    assert {k: os.environ.get(k) for k in before} == before  # the user's environment is restored exactly


def test_the_constructed_old_default_really_unpickles(tmp_path, monkeypatch):
    """Control for the test above: without forced_weights_only, the 'torch<2.6' setting does run the payload
    (so that test checks something)."""
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "PWNED"
    torch.save({"state_dict": _Payload(marker)}, tmp_path / "evil.pt")
    with warnings.catch_warnings():  # torch >= 2.6 warns that the variable forced weights_only=False
        warnings.simplefilter("ignore")
        torch.load(tmp_path / "evil.pt", map_location="cpu")
    assert marker.exists()


# --------------------------------------------------------------------------------------------
# plotly's JSON, as the tests read it
# --------------------------------------------------------------------------------------------

def _figure():
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("ΔE(x) − natural", "ΔE(x,y)"))
    fig.add_trace(go.Scatter(x=np.arange(4), y=np.array([0.5, -1.25, 2.0, 3.5]), name="ΔE(x)",
                             customdata=np.arange(4)[:, None]), row=1, col=1)
    fig.add_trace(go.Bar(x=["fake sat", "fake trades"], y=np.array([1.0, 2.0], dtype=np.float32), name="Ē(x, y′)",
                         marker=dict(colorbar=dict(title="drift"))), row=1, col=2)
    fig.add_vrect(x0=0, x1=1, annotation_text="phase 1", row=1, col=1)
    fig.update_layout(title="ΔE during training — run ①", xaxis_title="epoch", yaxis_title="energy gap")
    return fig


def _lists(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: _lists(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_lists(v) for v in obj]
    return obj


def _dialects() -> dict[str, str]:
    import plotly.io as pio

    fig = _figure()
    as_lists = _lists(fig.to_dict())
    return {
        "this plotly build (to_json)": pio.to_json(fig, validate=False),
        "plotly 5: lists, raw UTF-8": json.dumps(as_lists, ensure_ascii=False),
        "lists, \\u-escaped": json.dumps(as_lists, ensure_ascii=True),
    }


@pytest.mark.parametrize("dialect", list(_dialects()))
def test_chart_reader_sees_the_same_figure_in_every_json_dialect(dialect):
    spec = _dialects()[dialect]
    c = Chart(decode_spec(spec))
    assert c.title == "ΔE during training — run ①"
    assert c.trace_names == ["ΔE(x)", "Ē(x, y′)"]
    assert c.axis_titles == {"xaxis": "epoch", "yaxis": "energy gap"}
    assert c.annotations == ["ΔE(x) − natural", "ΔE(x,y)", "phase 1"]
    assert c.has_text("drift") and c.has_text("Ē(x") and not c.has_text("customdata")
    scatter, bar = c.traces
    np.testing.assert_array_equal(c.array(scatter, "x"), np.arange(4))
    np.testing.assert_allclose(c.array(scatter, "y"), [0.5, -1.25, 2.0, 3.5])
    assert c.array(scatter, "customdata").shape == (4, 1)
    np.testing.assert_array_equal(c.array(scatter, "customdata")[:, 0], np.arange(4))
    np.testing.assert_allclose(c.array(bar, "y"), [1.0, 2.0])
    assert c.array(bar, "x").tolist() == ["fake sat", "fake trades"]


def test_typed_arrays_decode_with_dtype_and_shape():
    v = np.array([[1.5, -2.0], [3.25, 4.0], [5.0, 6.5]])
    typed = {"dtype": "f8", "bdata": base64.b64encode(v.astype("<f8").tobytes()).decode(), "shape": "3, 2"}
    np.testing.assert_array_equal(decode_array(typed), v)
    small = {"dtype": "i1", "bdata": base64.b64encode(np.array([0, -1, 7], "i1").tobytes()).decode()}
    assert decode_array(small).tolist() == [0, -1, 7]
    assert decode_array([1, 2]).tolist() == [1, 2]
    with pytest.raises(AssertionError, match="not a plotly figure"):
        decode_spec(json.dumps({"layout": {}}))


def test_escaped_text_is_what_broke_substring_checks():
    """Why the reader exists: in an escaped spec the raw text lacks 'ΔE' although the figure shows it."""
    spec = _dialects()["lists, \\u-escaped"]
    assert "ΔE(x)" not in spec and "\\u0394E(x)" in spec
    assert "ΔE(x)" in Chart(decode_spec(spec)).trace_names

