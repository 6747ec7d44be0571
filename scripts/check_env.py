"""Check the project's virtualenv and print the versions it resolved (run by scripts/venv.sh).

    .venv/bin/python scripts/check_env.py [--profile test|runtime] [--quick]

Exits 1, naming the problem, when

* the interpreter is not a virtualenv, or sees site-packages from outside it (the system's, a user's);
* ``import core`` does not come from this clone (the editable install points elsewhere);
* a key package is not installed or does not import: torch and torchvision are imported for real
  (a torchvision built for another torch fails there, e.g. "operator torchvision::nms does not
  exist"), robustbench through ``core.compat`` (the AutoAttack alias and setuptools' pkg_resources).
  ``--quick`` only reads the installed versions, without importing.

Versions that differ from constraints.txt are listed; that is a report, not a failure.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import importlib.util
import re
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: (distribution, module to import or None, how): how = "import" | "find" (located, not imported:
#: umap compiles numba code on import) | "robustbench" (through core.compat)
RUNTIME = [
    ("torch", "torch", "import"),
    ("torchvision", "torchvision", "import"),
    ("streamlit", "streamlit", "import"),
    ("plotly", "plotly.graph_objects", "import"),
    ("robustbench", "robustbench", "robustbench"),
    ("pyautoattack", "pyautoattack", "import"),
    ("umap-learn", "umap", "find"),
    ("numpy", "numpy", "import"),
    ("scipy", "scipy.io", "import"),
    ("pillow", "PIL.Image", "import"),
    ("safetensors", "safetensors.torch", "import"),
    ("scikit-learn", "sklearn.datasets", "import"),
    ("torchmetrics", "torchmetrics.image", "import"),
    ("torch-fidelity", "torch_fidelity", "import"),
    ("setuptools", None, "import"),
    ("timm", None, "import"),
]
TEST = [
    ("pytest", "pytest", "import"),
    ("pytest-timeout", "pytest_timeout", "import"),
    ("playwright", "playwright.sync_api", "import"),
]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _constraints() -> dict[str, str]:
    pins = {}
    path = REPO / "constraints.txt"
    if path.is_file():
        for line in path.read_text().splitlines():
            m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)", line)
            if m:
                pins[_norm(m.group(1))] = m.group(2)
    return pins


def _isolation_problems() -> list[str]:
    problems = []
    prefix = Path(sys.prefix).resolve()
    if prefix == Path(sys.base_prefix).resolve():
        problems.append(f"{sys.executable} is not a virtualenv's interpreter")
    for entry in sys.path:
        if ("site-packages" in entry or "dist-packages" in entry) and entry:
            p = Path(entry).resolve()
            if prefix != p and prefix not in p.parents:
                problems.append(f"the venv sees packages from outside it: {entry}")
    cfg = prefix / "pyvenv.cfg"
    if cfg.is_file() and re.search(r"include-system-site-packages\s*=\s*true", cfg.read_text(), re.I):
        problems.append(f"{cfg} includes the system site-packages")
    return problems


def _core_problem() -> str | None:
    spec = importlib.util.find_spec("core")
    if spec is None or not spec.origin:
        return "`import core` fails: EnergyLens itself is not installed (pip install -e .)"
    where = Path(spec.origin).resolve().parent.parent
    if where != REPO:
        return f"`import core` comes from {where}, not from this clone ({REPO})"
    return None


def _check(dist: str, module: str | None, how: str, quick: bool) -> tuple[str | None, str | None, str]:
    """(installed version or None, problem or None, note)."""
    try:
        version = md.version(dist)
    except md.PackageNotFoundError:
        return None, f"{dist} is not installed", ""
    if quick or module is None:
        return version, None, ""
    note = ""
    try:
        if how == "find":
            if importlib.util.find_spec(module) is None:
                return version, f"{dist} is installed but `{module}` cannot be found", ""
        elif how == "robustbench":
            sys.path.insert(0, str(REPO))
            from core.compat import import_robustbench_utils, robustbench_info

            import_robustbench_utils()
            info = robustbench_info()
            note = ("eval.py imports AutoAttack" if info.eval_imports_autoattack
                    else "eval.py without the AutoAttack import")
        else:
            mod = importlib.import_module(module)
            if dist == "torch":
                cuda = getattr(mod.version, "cuda", None)
                note = (f"CUDA {cuda} build" if cuda else "CPU-only build") + (
                    ", GPU present" if mod.cuda.is_available() else ", no GPU: runs on CPU")
    except Exception as e:  # noqa: BLE001 - any import failure is the problem to report
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return version, f"{dist} {version} does not import ({type(e).__name__}: {first[:300]})", ""
    return version, None, note


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=["test", "runtime"], default="test")
    ap.add_argument("--quick", action="store_true", help="read installed versions only, import nothing")
    args = ap.parse_args(argv)
    t0 = time.time()
    problems = _isolation_problems()
    core = _core_problem()
    if core:
        problems.append(core)
    pins = _constraints()
    wanted = RUNTIME + (TEST if args.profile == "test" else [])
    print(f"== resolved versions (Python {sys.version.split()[0]}, {sys.prefix})")
    for dist, module, how in wanted:
        version, problem, note = _check(dist, module, how, args.quick)
        pin = pins.get(_norm(dist))
        flag = "" if pin is None or pin == version else f"   (constraints.txt: {pin})"
        print(f"   {dist:<15} {version or 'MISSING':<12} {note}{flag}")
        if problem:
            problems.append(problem)
    site_dirs = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {_norm(d.metadata["Name"]): d.version for d in md.distributions(path=site_dirs)
                 if d.metadata["Name"] and _norm(d.metadata["Name"]) != "energylens"}
    differ = sorted(f"{n} {v} (pinned {pins[n]})" for n, v in installed.items() if n in pins and pins[n] != v)
    missing_pins = sorted(n for n in pins if n not in installed)
    if differ:
        print(f"   {len(differ)} of {len(installed)} installed packages differ from constraints.txt: " + ", ".join(differ))
    else:
        print(f"   all {len(installed)} installed packages match constraints.txt where it pins them")
    if missing_pins and args.profile == "test":
        print(f"   pinned in constraints.txt but not installed: {', '.join(missing_pins)}")
    if problems:
        print("error: the environment is not usable:", file=sys.stderr)
        for p in problems:
            print(f"   - {p}", file=sys.stderr)
        return 1
    print(f"   environment check passed in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
