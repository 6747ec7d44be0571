"""The bottom layer of core: paths, storage, the run folder, the runtime helpers, and the shape of the house
(no import circle in core, no import hidden in a function except a marked heavy optional library)."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core import paths
from core.errors import DataError, InputError
from core.rundir import PROBE_KEYS, RunDir
from core.runtime import resolve_device
from core.storage import dumps, is_temp_file, json_default, remove_stale_temp_files

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "core"


# ------------------------------------------------------------------------------------------------ paths
def test_paths_follow_the_environment_at_call_time(monkeypatch, tmp_path):
    monkeypatch.delenv(paths.ENV_RUNS, raising=False)
    monkeypatch.delenv(paths.ENV_CACHE, raising=False)
    assert paths.runs_dir() == paths.REPO_ROOT / "runs"
    assert paths.cache_dir("landscape") == paths.REPO_ROOT / "checkpoints" / "cache" / "landscape"
    monkeypatch.setenv(paths.ENV_RUNS, str(tmp_path / "r"))
    monkeypatch.setenv(paths.ENV_CACHE, str(tmp_path / "c"))
    assert paths.runs_dir() == tmp_path / "r"
    assert paths.runs_dir(tmp_path / "x") == tmp_path / "x"          # an explicit folder wins
    assert paths.cache_dir("sessions") == tmp_path / "c" / "sessions"
    monkeypatch.setenv(paths.ENV_RUNS, "")                            # empty = unset
    assert paths.runs_dir() == paths.REPO_ROOT / "runs"


def test_every_module_reads_the_cache_setting_through_paths(monkeypatch, tmp_path):
    from core import analysis, sampling, saved

    monkeypatch.setenv(paths.ENV_CACHE, str(tmp_path))
    assert analysis.default_cache_dir() == tmp_path / "landscape"
    assert sampling.default_cache_dir() == tmp_path
    assert saved.sessions_dir() == tmp_path / "sessions"


# ------------------------------------------------------------------------------------------------ storage
@dataclasses.dataclass
class _Rec:
    a: int
    b: str


def test_one_json_encoder_for_arrays_paths_sets_and_dataclasses():
    obj = {"f": np.float32(0.5), "i": np.int64(3), "arr": np.arange(3), "t": torch.tensor([1.5, 2.0]),
           "p": Path("/a/b"), "s": {"y", "x"}, "tu": (1, 2), "d": _Rec(1, "z"), "scalar_t": torch.tensor(7)}
    back = __import__("json").loads(dumps(obj))
    assert back == {"f": 0.5, "i": 3, "arr": [0, 1, 2], "t": [1.5, 2.0], "p": "/a/b", "s": ["x", "y"], "tu": [1, 2],
                    "d": {"a": 1, "b": "z"}, "scalar_t": 7}
    with pytest.raises(TypeError, match="object is not JSON serialisable"):
        json_default(object())


def test_storage_and_paths_do_not_import_torch():
    code = ("import sys; import core.storage, core.paths, core.errors; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_stale_temp_files_of_atomic_writes_are_recognised_and_removed(tmp_path):
    from core.storage import atomic_write_text

    atomic_write_text(tmp_path / "keep.json", "{}")
    (tmp_path / "sub").mkdir()
    stale = tmp_path / "sub" / ".state.pt.ab12cd34.tmp"
    stale.write_bytes(b"x")
    assert is_temp_file(stale.name) and not is_temp_file("keep.json")
    assert remove_stale_temp_files(tmp_path) == ["sub/.state.pt.ab12cd34.tmp"]
    assert (tmp_path / "keep.json").read_text() == "{}" and not stale.exists()


# ------------------------------------------------------------------------------------------------ the run folder
def test_run_folder_round_trips_and_survives_a_torn_line(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(DataError, match="config.json"):
        run.read_config()
    run.write_config({"method": "sat"})
    assert run.read_config() == {"method": "sat"}
    for e in (1, 2, 3):
        run.append_metrics({"epoch": e, "pgd_acc": 0.1 * e})
        run.append_batch({"epoch": e, "batch": 1, "loss": 1.0 / e})
    with open(run.metrics, "a") as f:
        f.write('{"epoch": 4, "pgd')                                # a writer killed mid-line
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2, 3]
    run.keep_epochs(2)                                              # a resumed run repeats epoch 3
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2]
    assert [r["epoch"] for r in run.read_batches()] == [1, 2]
    run.clear_records()
    assert run.read_metrics() == [] and run.read_batches() == []
    assert run.read_progress() is None
    run.write_progress(epoch=1, fraction=0.5)
    assert run.read_progress()["fraction"] == 0.5


def test_probe_snapshots_are_written_listed_and_checked(tmp_path):
    run = RunDir(tmp_path)
    n = 6
    arrays = {k: np.arange(n, dtype=np.float32) for k in PROBE_KEYS}
    run.write_probe(3, arrays)
    run.write_probe(1, arrays)
    (run.probe_dir / "epoch_xx.npz").write_bytes(b"junk")          # not an epoch number: ignored
    assert run.probe_epochs() == [1, 3]
    got = run.load_probe(3)
    assert set(got) == set(PROBE_KEYS) and np.array_equal(got["e_nat"], arrays["e_nat"])
    with pytest.raises(DataError, match="no probe snapshot for epoch 2"):
        run.load_probe(2)
    run.write_probe(4, {"e_nat": np.zeros(3)})
    with pytest.raises(DataError, match="lacks e_adv"):
        run.load_probe(4)
    run.probe_file(5).write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not readable"):
        run.load_probe(5)


# ------------------------------------------------------------------------------------------------ runtime
def test_resolve_device_names_the_problem():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match="'auto', 'cpu' or 'cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no GPU"):
            resolve_device("cuda:0")


# ------------------------------------------------------------------------------------------------ the house
def _core_modules() -> dict[str, Path]:
    out = {}
    for p in CORE.rglob("*.py"):
        rel = p.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if node.level:
        base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
        prefix = ".".join(base)
        target = f"{prefix}.{node.module}" if node.module else prefix
    else:
        target = node.module or ""
    return [target] + [f"{target}.{a.name}" for a in node.names]


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Who imports whom in core, wherever the import stands (a function too): an import moved into a function
    still ties two modules into a circle."""
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for t in _resolve(name, path.name == "__init__.py", node):
                    if t in mods and t != name:
                        deps.add(t)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in mods}
        graph[name] = deps
    return graph


def test_core_has_no_import_circle():
    mods = _core_modules()
    graph = _imports(mods)
    # a package's __init__ importing its own submodules is how a package is built, not a circle: a submodule
    # importing its package's __init__ back would be, and stays counted
    for name in graph:
        if mods[name].name == "__init__.py":
            graph[name] = {d for d in graph[name] if not d.startswith(name + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_core_hides_no_import_in_a_function_except_marked_heavy_optional_ones():
    hidden = []
    for path in CORE.rglob("*.py"):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        here = lines[sub.lineno - 1]
                        above = lines[sub.lineno - 2] if sub.lineno > 1 else ""
                        if "lazy:" not in here and "lazy:" not in above:
                            hidden.append(f"{path.relative_to(REPO)}:{sub.lineno}: {here.strip()}")
    assert not hidden, "imports inside functions without a '# lazy: <reason>' mark:\n" + "\n".join(hidden)


def test_core_never_imports_streamlit():
    bad = [str(p.relative_to(REPO)) for p in CORE.rglob("*.py")
           if any(isinstance(n, (ast.Import, ast.ImportFrom)) and "streamlit" in ast.unparse(n)
                  for n in ast.walk(ast.parse(p.read_text())))]
    assert not bad, bad


# the engines split into packages (issue 26): one job per module, none over 600 lines, every public name still
# reachable from the package and every runner / check path stored with jobs still resolvable
SPLIT_PACKAGES = ("analysis", "sampling")
MAX_MODULE_LINES = 600


def test_no_core_module_is_over_600_lines():
    too_long = [f"{p.relative_to(REPO)}: {n} lines" for p in sorted(CORE.rglob("*.py"))
                if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not too_long, too_long
    for old in ("analysis.py", "sampling.py", "zoo.py"):
        assert not (CORE / old).exists(), f"core/{old} is a package now"


def test_split_engine_packages_re_export_every_public_name_of_their_modules():
    import importlib

    for pkg in SPLIT_PACKAGES:
        package = importlib.import_module(f"core.{pkg}")
        assert len(set(package.__all__)) == len(package.__all__)
        for name in package.__all__:
            assert hasattr(package, name), f"core.{pkg}.{name}"
        for p in (CORE / pkg).glob("*.py"):
            if p.stem == "__init__":
                continue
            mod = importlib.import_module(f"core.{pkg}.{p.stem}")
            public = {n for n, v in vars(mod).items() if not n.startswith("_") and getattr(v, "__module__", None)
                      == mod.__name__ and (callable(v) or isinstance(v, type))}
            missing = sorted(public - set(package.__all__))
            assert not missing, f"core.{pkg}.{p.stem} defines {missing}, not re-exported by core.{pkg}"


def test_every_stored_job_runner_and_check_path_resolves():
    import importlib

    from core.jobs.api import CHECKS, KINDS

    for path in [*KINDS.values(), *CHECKS.values()]:
        module, _, name = path.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), path
