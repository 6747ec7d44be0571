"""Security properties of EnergyLens, checked statically (AST scans of the source) and dynamically.

* every ``torch.load`` passes ``weights_only=True``; no shell, ``os.system`` or ``os.popen``; no
  unrestricted unpickling; the engine (``core/``) never imports streamlit;
* the app listens on localhost only, headless, without usage statistics or tracebacks for users;
* uploaded files are decoded in memory and never written to disk;
* weights-only loading holds even when ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` is set.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import functools
import io
import os
import pickle
import tempfile
import tomllib
from pathlib import Path

import pytest
import torch

from core.errors import CheckpointError, DataError, EnergyLensError, ZooError
from core.models import ModelMeta, build_model, load_checkpoint
from core.tensorio import safe_torch_load
from core.uploads import MAX_UPLOAD_BYTES, decode_image

REPO = Path(__file__).resolve().parents[1]
TOP_SKIP = {"tests", "data", "runs", "checkpoints", "test-artifacts", "build", "dist"}  # only at the repo root
ANY_SKIP = {"__pycache__", "node_modules", "site-packages"}


def _py_files(*roots: str, exclude_tests: bool = True) -> list[Path]:
    out = []
    for root in roots:
        base = REPO / root
        files = [base] if base.is_file() else sorted(base.rglob("*.py"))
        for p in files:
            rel = p.relative_to(REPO).parts
            if rel[0] in TOP_SKIP or any(part in ANY_SKIP or part.startswith(".") or part.endswith(".egg-info")
                                         for part in rel[:-1]):
                continue
            out.append(p)
    return out


@functools.lru_cache(maxsize=None)
def _tree(path: Path) -> ast.AST:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _dotted(node: ast.AST) -> str:
    """'torch.load' for Attribute(Name('torch'), 'load'); '' when not a plain dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


# ---------------------------------------------------------------------------------------------
# Scanners (each is tested on a bad snippet below, so a scanner that finds nothing cannot pass silently)
# ---------------------------------------------------------------------------------------------
def unsafe_torch_loads(tree: ast.AST) -> list[int]:
    """Line numbers of torch.load calls without a literal ``weights_only=True``."""
    aliases = {"torch.load", "torch.serialization.load"}
    for node in ast.walk(tree):  # from torch import load [as x]
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            aliases |= {a.asname or a.name for a in node.names if a.name == "load"}
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _dotted(node.func) in aliases:
            ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                     for k in node.keywords)
            if not ok:
                bad.append(node.lineno)
    return bad


def shell_calls(tree: ast.AST) -> list[str]:
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in ("os.system", "os.popen", "system", "popen", "subprocess.getoutput",
                        "subprocess.getstatusoutput", "os.execl", "os.execlp", "os.spawnl"):
                bad.append(f"{name}() line {node.lineno}")
            for k in node.keywords:
                if k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False):
                    bad.append(f"shell= line {node.lineno}")
        if isinstance(node, ast.ImportFrom) and node.module == "os":
            bad += [f"from os import {a.name} line {node.lineno}" for a in node.names if a.name in ("system", "popen")]
    return bad


def streamlit_imports(tree: ast.AST) -> list[int]:
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "streamlit" for a in node.names):
            bad.append(node.lineno)
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "streamlit":
            bad.append(node.lineno)
        if isinstance(node, ast.Call) and _dotted(node.func) in ("importlib.import_module", "__import__") and \
                node.args and isinstance(node.args[0], ast.Constant) and \
                str(node.args[0].value).startswith("streamlit"):
            bad.append(node.lineno)
    return bad


def unrestricted_unpickling(tree: ast.AST) -> list[str]:
    """pickle.load(s) / plain pickle.Unpickler(...) calls and np.load(allow_pickle=True)."""
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "dill.load",
                        "joblib.load", "yaml.load", "yaml.unsafe_load", "marshal.loads", "shelve.open"):
                bad.append(f"{name}() line {node.lineno}")
            if name in ("np.load", "numpy.load") and any(
                    k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                    for k in node.keywords):
                bad.append(f"{name}(allow_pickle=...) line {node.lineno}")
    return bad


BAD_SNIPPET = """
import os, subprocess, pickle, numpy as np
import torch
from torch import load as tl
import streamlit as st
from streamlit import session_state
def f(p):
    import streamlit
    torch.load(p)
    torch.load(p, weights_only=False)
    torch.load(p, map_location="cpu", weights_only=True)
    tl(p)
    os.system("ls")
    os.popen("ls")
    subprocess.run("ls", shell=True)
    subprocess.run(["ls"], shell=False)
    pickle.loads(b"")
    np.load(p, allow_pickle=True)
    np.load(p, allow_pickle=False)
"""


def test_scanners_find_every_planted_problem():
    tree = ast.parse(BAD_SNIPPET)
    assert sorted(unsafe_torch_loads(tree)) == [9, 10, 12]
    assert [s.split()[0] for s in shell_calls(tree)] == ["os.system()", "os.popen()", "shell="]
    assert sorted(streamlit_imports(tree)) == [5, 6, 8]
    assert [s.split("(")[0] for s in unrestricted_unpickling(tree)] == ["pickle.loads", "np.load"]


# ---------------------------------------------------------------------------------------------
# Static checks of the repository
# ---------------------------------------------------------------------------------------------
ALL_SOURCES = _py_files(".")
APP_SOURCES = _py_files("core", "dashboard", "pages")


def test_the_scan_sees_the_whole_project():
    rels = {p.relative_to(REPO).as_posix() for p in ALL_SOURCES}
    assert {"core/storage.py", "core/zoo/load.py", "core/data/disk.py", "core/models/checkpoint.py",
            "dashboard/common.py", "pages/attack_lab.py", "bench/bench_attack.py"} <= rels
    assert not any(r.startswith("tests/") for r in rels)


def test_every_torch_load_is_weights_only():
    bad = {p.relative_to(REPO).as_posix(): lines for p in ALL_SOURCES if (lines := unsafe_torch_loads(_tree(p)))}
    assert not bad, f"torch.load without weights_only=True: {bad}"


def test_no_shell_in_the_app():
    bad = {p.relative_to(REPO).as_posix(): s for p in APP_SOURCES if (s := shell_calls(_tree(p)))}
    assert not bad, bad


def test_engine_never_imports_streamlit():
    bad = {p.relative_to(REPO).as_posix(): s for p in _py_files("core") if (s := streamlit_imports(_tree(p)))}
    assert not bad, f"core/ must stay UI-free: {bad}"


def test_no_unrestricted_unpickling_in_the_app():
    bad = {p.relative_to(REPO).as_posix(): s for p in APP_SOURCES if (s := unrestricted_unpickling(_tree(p)))}
    assert not bad, bad


def test_the_only_custom_unpickler_is_an_allow_list():
    """core/data/disk.py subclasses pickle.Unpickler; its find_class must consult an allow-list and raise."""
    found = []
    for p in APP_SOURCES:
        for node in ast.walk(_tree(p)):
            if isinstance(node, ast.ClassDef) and any(_dotted(b) == "pickle.Unpickler" for b in node.bases):
                methods = {f.name: f for f in node.body if isinstance(f, ast.FunctionDef)}
                assert "find_class" in methods, f"{p}: {node.name} must override find_class"
                assert any(isinstance(n, ast.Raise) for n in ast.walk(methods["find_class"])), node.name
                found.append(node.name)
    assert found == ["RestrictedUnpickler"], found


# ---------------------------------------------------------------------------------------------
# Server configuration
# ---------------------------------------------------------------------------------------------
CONFIGS = [REPO / ".streamlit" / "config.toml", REPO / "dashboard" / ".streamlit" / "config.toml"]


@pytest.mark.parametrize("path", CONFIGS, ids=["repo-root", "dashboard"])
def test_server_config_is_local_and_quiet(path):
    assert path.is_file(), f"{path} is missing: streamlit would use its defaults (all interfaces, telemetry on)"
    cfg = tomllib.loads(path.read_text())
    assert cfg["server"]["address"] == "localhost", "the dashboard must not listen on all interfaces by default"
    assert cfg["server"]["headless"] is True
    assert cfg["browser"]["gatherUsageStats"] is False
    assert cfg["client"].get("showErrorDetails") in ("none", False), "users must never see tracebacks"
    assert int(cfg["server"]["maxUploadSize"]) * 1024 * 1024 <= MAX_UPLOAD_BYTES + 1024 * 1024, \
        "the server's upload limit matches decode_image's"
    assert cfg["server"].get("enableCORS", True) is not False and cfg["server"].get("enableXsrfProtection", True)


def test_both_configs_are_identical():
    a, b = (tomllib.loads(p.read_text()) for p in CONFIGS)
    assert a == b, "`streamlit run dashboard/Home.py` from either folder must behave the same"


# ---------------------------------------------------------------------------------------------
# Uploads stay in memory
# ---------------------------------------------------------------------------------------------
def _png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise((40, 30), 50).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def _jpeg_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise((40, 30), 50).convert("RGB").save(buf, "JPEG")
    return buf.getvalue()


@contextlib.contextmanager
def filesystem_refused():
    """Every way of opening or creating a file records the attempt and fails; yields the record."""
    from _pytest.monkeypatch import MonkeyPatch

    attempts: list[str] = []

    def refuse(name):
        def f(*a, **k):
            attempts.append(f"{name}{a[:1]}")
            raise PermissionError(f"filesystem access during decoding: {name}")
        return f

    with MonkeyPatch.context() as mp:
        for mod, names in ((builtins, ["open"]), (io, ["open", "FileIO"]), (os, ["open", "mkdir", "makedirs"]),
                           (tempfile, ["mkstemp", "mkdtemp", "NamedTemporaryFile", "TemporaryFile",
                                       "SpooledTemporaryFile", "TemporaryDirectory"])):
            for n in names:
                mp.setattr(mod, n, refuse(f"{mod.__name__}.{n}"))
        yield attempts


def test_the_filesystem_guard_works():
    with filesystem_refused() as attempts:
        with pytest.raises(PermissionError):
            open(os.devnull, "rb")
        with pytest.raises(PermissionError):
            tempfile.mkstemp()
    assert len(attempts) == 2
    with open(os.devnull, "rb"):  # restored afterwards
        pass


def test_decode_image_never_touches_the_filesystem():
    png, jpeg = _png_bytes(), _jpeg_bytes()
    for data in (png, jpeg, b"not an image"):  # warm up Pillow's lazily imported plugins first
        try:
            decode_image(data)
        except EnergyLensError:
            pass
    with filesystem_refused() as attempts:
        x1 = decode_image(png, size=(32, 32))
        x2 = decode_image(jpeg, size=(64, 64))
        for bad in (b"%PDF-1.4 nope", png[:50], b"\x93" + bytes(range(256)) * 8):
            with pytest.raises(EnergyLensError):
                decode_image(bad)
    assert attempts == [], f"decode_image tried to use the filesystem: {attempts}"
    assert x1.shape == (1, 3, 32, 32) and x2.shape == (1, 3, 64, 64)


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _uploader_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                _dotted(node.value.func).endswith("file_uploader"):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def test_attack_lab_upload_flows_only_into_decode_image():
    """The uploaded file is used in exactly two ways: ``up is not None`` and ``decode_image(up.getvalue())``."""
    tree = _tree(REPO / "pages" / "attack_lab.py")
    ups = _uploader_names(tree)
    assert ups, "the Attack Lab has an image uploader"
    parent = _parents(tree)
    uses = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id in ups and isinstance(n.ctx, ast.Load)]
    assert uses
    for n in uses:
        p = parent[n]
        if isinstance(p, ast.Compare):
            continue
        assert isinstance(p, ast.Attribute) and p.attr == "getvalue", \
            f"line {n.lineno}: upload used as {ast.dump(p)[:80]}"
        call = parent[p]
        sink = parent[call]
        assert isinstance(sink, ast.Call) and _dotted(sink.func) == "decode_image", \
            f"line {n.lineno}: the upload's bytes go somewhere other than decode_image"
    writes = [f"{_dotted(c.func)} line {c.lineno}" for c in ast.walk(tree) if isinstance(c, ast.Call)
              and (_dotted(c.func) in ("open", "io.open", "os.open", "np.save", "torch.save")
                   or _dotted(c.func).split(".")[-1] in ("write", "write_bytes", "write_text", "mkstemp",
                                                           "NamedTemporaryFile")
                   or _dotted(c.func).split(".")[-1].startswith("atomic_"))]
    assert not writes, f"the Attack Lab writes files: {writes}"


def test_no_page_writes_uploaded_bytes_to_disk():
    sinks = ("open", "write", "write_bytes", "write_text", "save", "savez", "savez_compressed", "copyfileobj",
             "atomic_write", "atomic_write_bytes", "atomic_torch_save")
    bad = []
    for p in _py_files("pages", "dashboard"):
        tree = _tree(p)
        ups = _uploader_names(tree)
        for c in ast.walk(tree):
            if isinstance(c, ast.Call) and _dotted(c.func).split(".")[-1] in sinks:
                if any(isinstance(n, ast.Name) and n.id in ups for a in c.args + [k.value for k in c.keywords]
                       for n in ast.walk(a)):
                    bad.append(f"{p.name} line {c.lineno}")
    assert not bad, bad


# ---------------------------------------------------------------------------------------------
# Weights-only loading cannot be switched off from the environment
# ---------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.fixture
def force_unsafe_env(monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)


def test_the_env_var_really_disables_default_weights_only(tmp_path, force_unsafe_env):
    """Control: with the variable set, a torch.load that does not pass weights_only runs the payload."""
    marker = tmp_path / "control"
    torch.save(_Payload(marker), tmp_path / "evil.pt")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.load(tmp_path / "evil.pt")
    assert marker.is_dir()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_safe_torch_load_ignores_force_no_weights_only(tmp_path, force_unsafe_env, legacy):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": _Payload(marker)}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match="execute code"):
        safe_torch_load(path)
    with pytest.raises(CheckpointError, match="execute code"):
        load_checkpoint(path, meta=ModelMeta("smallcnn", 10))
    assert not marker.exists(), "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD made EnergyLens run code from a checkpoint"
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1", "the user's environment is left alone"


def test_plain_state_dicts_still_load_with_the_env_var(tmp_path, force_unsafe_env):
    model = build_model("smallcnn", 10)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    state = safe_torch_load(tmp_path / "w.pt")
    assert set(state) == set(model.state_dict())


def test_zoo_loader_is_weights_only_even_with_the_env_var(tmp_path, force_unsafe_env, monkeypatch):
    """robustbench calls torch.load without weights_only, exactly what the variable would make unsafe."""
    from core import zoo
    from core.compat import ensure_autoattack_alias, import_robustbench_utils

    ensure_autoattack_alias()  # robustbench imports `autoattack`; the registry's package is `pyautoattack`
    pytest.importorskip("robustbench")

    import_robustbench_utils()

    marker = tmp_path / "PWNED"
    p = zoo.zoo_path("Standard", "cifar10", "Linf", model_dir=tmp_path)
    p.parent.mkdir(parents=True)
    torch.save({"state_dict": {"x": _Payload(marker)}}, p)
    with pytest.raises(ZooError, match="would run code when unpickled"):
        zoo.load_zoo_model("Standard", "cifar10", "Linf", model_dir=tmp_path)
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") == "1", "the zoo loader restores the environment"
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ, "the zoo loader restores the environment"


def test_dataset_pickles_cannot_run_code(tmp_path):
    """CIFAR batches are pickles; they are read with an allow-list unpickler."""
    from core.data import load_dataset

    marker = tmp_path / "PWNED"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    blob = pickle.dumps({"data": _Payload(marker), "labels": [0]}, protocol=2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(blob)
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", "test", root=tmp_path)
    assert "makedirs" in str(info.value) and "refusing" in str(info.value), str(info.value)
    assert not marker.exists()


# ============================================================================================ issue 24 (round 3)
# saved results (core.saved): a crafted file is removed with a one-line reason, never raised or read in full
SID = "ef" * 12


@pytest.fixture
def saved_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ENERGYLENS_CACHE", str(tmp_path / "cache"))
    from core import saved

    path = saved.sessions_dir() / SID / "attack.npz"
    path.parent.mkdir(parents=True)
    return path


def _npz(path: Path, members: dict[str, bytes]) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)


def _npy(a) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(a))
    return buf.getvalue()


def _zip_bomb(path: Path, mb: int) -> None:
    """An npz whose one array declares (and really holds, compressed to almost nothing) ``mb`` MB of zeros."""
    import zipfile

    import numpy as np

    n = mb * 2 ** 20 // 4
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": (n,)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open("x.npy", "w", force_zip64=True) as f:
            f.write(head.getvalue())  # the magic string and the header
            chunk = bytes(2 ** 22)
            for _ in range(n * 4 // len(chunk)):
                f.write(chunk)
        z.writestr("__meta__.npy", _npy("{}"))


def test_saved_meta_nested_100k_deep_is_removed_with_a_notice(saved_cache):
    from core import saved

    _npz(saved_cache, {"x.npy": _npy([1.0]), "__meta__.npy": _npy("[" * 100_000 + "]" * 100_000)})
    problems: list[str] = []
    assert saved.load(SID, "attack", problems) is None
    assert not saved_cache.exists()
    assert problems == ["the saved attack result could not be read (its metadata is nested too deeply) and was "
                        "removed"]


def test_saved_npz_declaring_a_huge_array_is_refused_before_reading(saved_cache):
    from core import saved

    import numpy as np

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**9,)})
    _npz(saved_cache, {"x.npy": header.getvalue(), "__meta__.npy": _npy("{}")})
    problems: list[str] = []
    assert saved.load(SID, "attack", problems) is None and not saved_cache.exists()
    assert "declares 7,629 MB" in problems[0], problems


_SAVED_CHILD = r"""
import json, resource, sys, time
import numpy as np
from core import saved
def kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
cap = kb("VmSize") * 1024 + 200 * 2**20
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
base, t0, problems = kb("VmRSS"), time.process_time(), []
try:
    try:
        res = saved.load(sys.argv[1], "attack", problems)
    except TypeError:  # a version without the problems argument
        res = saved.load(sys.argv[1], "attack")
    out = {"result": res is None, "problems": problems}
except BaseException as e:
    out = {"error": type(e).__name__}
out.update(cpu_ms=1000 * (time.process_time() - t0), growth_mb=(kb("VmHWM") - base) / 1024)
print("RESULT " + json.dumps(out))
"""


def test_saved_zip_bomb_is_refused_in_bounded_time_and_memory(saved_cache):
    import json
    import subprocess
    import sys

    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc to cap the child's address space")
    _zip_bomb(saved_cache, 160)  # over the 64 MB limit; the cap would let the code before issue 24 read it
    assert saved_cache.stat().st_size < 2 * 2 ** 20, "a small file"
    r = subprocess.run([sys.executable, "-c", _SAVED_CHILD, SID], cwd=str(REPO), capture_output=True, text=True,
                       timeout=120, env=os.environ.copy())
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, r.stderr[-2000:]
    res = json.loads(line[7:])
    assert res.get("result") is True and "declares 160 MB" in res["problems"][0], res
    assert res["cpu_ms"] < 1000 and res["growth_mb"] < 50, res
    assert not saved_cache.exists()


def test_saved_refuses_oversized_metadata_on_save(saved_cache):
    from core import saved
    from core.errors import InputError

    with pytest.raises(InputError, match="metadata too large"):
        saved.save(SID, "attack", {}, {"notes": "x" * (saved.MAX_META + 1)})


def test_saved_file_with_any_one_byte_corrupted_is_removed_never_raised(saved_cache):
    """Found by scripts/fuzz_loaders.py: a byte flipped inside a deflate stream raised zlib.error out of load()."""
    import numpy as np

    from core import saved

    rng = np.random.default_rng(0)
    saved.save(SID, "attack", {"x": rng.normal(size=(4, 8)).astype(np.float32), "labels": np.arange(4)},
               {"model": "m", "notes": ["a", "b"]})
    good = saved_cache.read_bytes()
    removed = 0
    for i in range(0, len(good)):
        bad = bytearray(good)
        bad[i] ^= 0xFF
        saved_cache.write_bytes(bytes(bad))
        problems: list[str] = []
        res = saved.load(SID, "attack", problems)   # never raises
        if res is None:
            removed += 1
            assert len(problems) == 1 and "\n" not in problems[0] and not saved_cache.exists(), (i, problems)
    assert removed > len(good) // 2
