"""Compatibility shims: every version-dependent behaviour of a third-party package, in one place.

Engine-side differences between releases (or between builds of one release) are bridged here and
nowhere else, so that the rest of ``core`` is written against one behaviour:

* **AutoAttack's package name.** RobustBench 1.1.1 imports AutoAttack as ``autoattack``
  (``robustbench/eval.py`` does ``from autoattack import AutoAttack`` and
  ``from autoattack.state import EvaluationState``, and ``robustbench/__init__.py`` imports ``eval``).
  The AutoAttack wheel installed with EnergyLens, ``pyautoattack`` 0.2.0, ships the same code under
  the package name ``pyautoattack``. Without help, ``import robustbench`` (and therefore
  ``robustbench.utils.load_model``) fails with ``ModuleNotFoundError: No module named 'autoattack'``.
  :func:`ensure_autoattack_alias` is the one place in the project that bridges the two names. It
  must run before robustbench is imported; :func:`import_robustbench_utils` does both in the right
  order and is the way the rest of the engine should reach robustbench. The alias is only installed
  when no real ``autoattack`` package is importable, so an environment that has upstream AutoAttack
  keeps using it untouched.
* **RobustBench 1.1.1 variants.** The registry has served more than one set of files under the
  version number 1.1.1: in one, ``eval.py`` has its AutoAttack import commented out (so
  ``robustbench.eval.AutoAttack`` does not exist; EnergyLens never uses it: its AutoAttack runs
  through ``pyautoattack`` directly); in another, the model zoo has the timm-hosted
  ``Debenedetti2022Light_XCiT-*`` entries commented out (the catalogue of :mod:`core.zoo`, parsed
  from the installed files, then simply does not list them). :func:`robustbench_info` reports what
  the installed files offer, read from the source without importing robustbench.
* **torch's weights-only default.** ``torch.load`` defaults to ``weights_only=False`` before torch
  2.6 and to ``True`` from 2.6 on, where ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` brings the old
  default back. EnergyLens' own loads always pass ``weights_only=True`` (``core.storage``);
  third-party loaders that call ``torch.load`` without it (robustbench's ``load_model``) run inside
  :func:`forced_weights_only`, which makes them weights-only under either default.

The UI-side differences (Streamlit's widget payloads) are handled in ``dashboard/``.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Iterator

from .errors import ZooError

__all__ = ["ensure_autoattack_alias", "import_robustbench_utils", "ALIAS_NAME", "TARGET_NAME",
           "RobustBenchInfo", "robustbench_info", "forced_weights_only"]

ALIAS_NAME = "autoattack"
TARGET_NAME = "pyautoattack"

#: Submodules that other packages import by their ``autoattack.<name>`` path. They are aliased
#: eagerly (when the target has them); any other ``autoattack.<x>`` is resolved lazily by
#: :class:`_AliasFinder`, so optional modules (``fab_tf`` needs TensorFlow) are only imported
#: when somebody actually asks for them.
EAGER_SUBMODULES = ("autoattack", "state", "autopgd_base", "fab_base", "fab_projections", "fab_pt",
                    "square", "other_utils", "checks")

_lock = threading.RLock()
_status: str | None = None  # 'real' | 'alias' once decided


class _AliasLoader(importlib.abc.Loader):
    """Loader that hands back the already-importable ``pyautoattack.<rest>`` module."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):  # noqa: D401 - importlib protocol
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        # The target module was fully executed by its own import; nothing left to do.
        return None


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Resolves ``autoattack.<x>`` to ``pyautoattack.<x>`` for submodules not aliased eagerly."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != ALIAS_NAME and not fullname.startswith(ALIAS_NAME + "."):
            return None
        real = TARGET_NAME + fullname[len(ALIAS_NAME):]
        try:
            if importlib.util.find_spec(real) is None:
                return None
        except (ImportError, ValueError):
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(real))


_finder = _AliasFinder()


def _real_autoattack_available() -> bool:
    """True when a genuine ``autoattack`` package (not our alias) can be imported."""
    mod = sys.modules.get(ALIAS_NAME)
    if mod is not None:
        return getattr(mod, "__name__", ALIAS_NAME) != TARGET_NAME
    try:
        return importlib.util.find_spec(ALIAS_NAME) is not None
    except (ImportError, ValueError):
        return False


def ensure_autoattack_alias() -> str | None:
    """Make ``import autoattack`` work, backed by ``pyautoattack`` when needed.

    Idempotent and thread-safe. Returns which package now answers to ``autoattack``:

    * ``"autoattack"`` – a real AutoAttack package is installed; nothing was changed;
    * ``"pyautoattack"`` – the alias is active: ``sys.modules['autoattack']`` and the submodules
      robustbench and others import (``autoattack.state``, ``autoattack.autopgd_base``,
      ``autoattack.fab_pt``, ``autoattack.square``, ``autoattack.other_utils``, ...) are the
      ``pyautoattack`` modules, and any other ``autoattack.<x>`` resolves lazily;
    * ``None`` – neither package is installed (importing robustbench will then fail).
    """
    global _status
    with _lock:
        if _status == "alias":
            return TARGET_NAME
        if _status == "real" or _real_autoattack_available():
            _status = "real"
            return ALIAS_NAME
        try:
            target = importlib.import_module(TARGET_NAME)
        except ImportError:
            return None
        sys.modules[ALIAS_NAME] = target
        for sub in EAGER_SUBMODULES:
            try:
                mod = importlib.import_module(f"{TARGET_NAME}.{sub}")
            except ImportError:
                continue  # absent in this version: the lazy finder reports it normally
            sys.modules.setdefault(f"{ALIAS_NAME}.{sub}", mod)
        if _finder not in sys.meta_path:
            # In front of the path finders: otherwise ``autoattack.<x>`` would be found again in
            # pyautoattack's folder (the parent's __path__) and executed a second time as a copy.
            sys.meta_path.insert(0, _finder)
        _status = "alias"
        return TARGET_NAME


def import_robustbench_utils() -> ModuleType:
    """Import and return ``robustbench.utils`` (installing the AutoAttack alias first).

    Raises :class:`~core.errors.ZooError` with an explanation when robustbench, or something it
    needs at import time (torchvision, timm, gdown, AutoAttack), cannot be imported.
    """
    backend = ensure_autoattack_alias()
    try:
        with warnings.catch_warnings():
            # Import-time noise from third-party code the user cannot act on: robustbench imports
            # the deprecated pkg_resources, timm its own deprecated module paths and
            # torch.jit.interface.
            warnings.filterwarnings("ignore", message=r".*pkg_resources.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(timm|torch)(\.|$)")
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"(timm|torch)(\.|$)")
            return importlib.import_module("robustbench.utils")
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
        if backend is None and missing and str(missing).split(".")[0] == ALIAS_NAME:
            hint = "AutoAttack is not installed: pip install pyautoattack"
        elif missing and str(missing).split(".")[0] == "pkg_resources":
            hint = ("robustbench 1.1.1 imports pkg_resources, which setuptools 81 removed: "
                    "pip install 'setuptools<81'")
        elif missing and str(missing).split(".")[0] == "robustbench":
            hint = "robustbench is not installed: pip install robustbench==1.1.1"
        else:
            hint = f"a package robustbench needs could not be imported ({missing})"
        raise ZooError(f"RobustBench models are unavailable: {hint}. Original error: {e}") from e
    except Exception as e:  # noqa: BLE001 - e.g. a torch/torchvision build mismatch at import time
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ZooError(
            "RobustBench models are unavailable because importing robustbench failed "
            f"({type(e).__name__}: {first}). A common cause is torchvision built for a different "
            "torch (e.g. 'operator torchvision::nms does not exist'); reinstall matching torch and "
            "torchvision builds.") from e


# --------------------------------------------------------------------------------------------
# What the installed robustbench offers
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RobustBenchInfo:
    """The installed robustbench, as read from its files (robustbench itself is not imported).

    ``eval_imports_autoattack`` is True when ``robustbench/eval.py`` imports ``autoattack`` at module
    level (so ``import robustbench`` needs the alias and ``robustbench.eval.AutoAttack`` exists),
    False when that import is absent (commented out), None when ``eval.py`` is missing or
    unreadable. ``model_zoo`` is the folder holding ``cifar10.py`` / ``cifar100.py``, or None.
    """

    installed: bool
    version: str | None = None
    location: Path | None = None
    eval_imports_autoattack: bool | None = None
    model_zoo: Path | None = None


def _imports_module(path: Path, name: str) -> bool | None:
    """Whether the module file imports ``name`` (or a submodule of it) outside functions and classes."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None

    def hits(mod: str | None) -> bool:
        return bool(mod) and (mod == name or mod.startswith(name + "."))

    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import) and any(hits(a.name) for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.level == 0 and hits(node.module):
            return True
        if isinstance(node, (ast.If, ast.Try, ast.With)):  # module-level try/except ImportError etc.
            for field in ("body", "orelse", "finalbody", "handlers"):
                stack.extend(getattr(node, field, []) or [])
        elif isinstance(node, ast.ExceptHandler):
            stack.extend(node.body)
    return False


def _distribution_version(location: Path, name: str) -> str | None:
    """Version of the distribution ``name`` installed next to ``location`` (its site folder)."""
    try:
        for dist in importlib.metadata.distributions(path=[str(location.parent)]):
            if (dist.metadata.get("Name") or "").lower().replace("_", "-") == name:
                return dist.version
    except Exception:  # noqa: BLE001 - broken metadata: the version is simply unknown
        return None
    return None


def robustbench_info(location: str | os.PathLike | None = None) -> RobustBenchInfo:
    """Which robustbench is installed and what its files offer; never imports it (that takes seconds).

    ``location`` inspects the package folder given instead of the one ``import robustbench`` finds.
    """
    if location is None:
        try:
            spec = importlib.util.find_spec("robustbench")
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            return RobustBenchInfo(installed=False)
        location = list(spec.submodule_search_locations)[0]
    location = Path(location)
    if not (location / "__init__.py").is_file():
        return RobustBenchInfo(installed=False, location=location)
    zoo_dir = location / "model_zoo"
    return RobustBenchInfo(
        installed=True, version=_distribution_version(location, "robustbench"), location=location,
        eval_imports_autoattack=_imports_module(location / "eval.py", ALIAS_NAME),
        model_zoo=zoo_dir if zoo_dir.is_dir() else None)


# --------------------------------------------------------------------------------------------
# torch.load's weights-only default
# --------------------------------------------------------------------------------------------

_FORCE_ON = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_OFF = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def forced_weights_only() -> Iterator[None]:
    """Make every ``torch.load`` in the block weights-only, whatever torch's default and the caller say.

    For third-party loaders that call ``torch.load`` without ``weights_only`` (robustbench's
    ``load_model``): before torch 2.6 such a call unpickles arbitrary objects, and from 2.6 on it
    does so too when the user has set ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``. This sets
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` (which torch honours even over an explicit
    ``weights_only=False``) and hides ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` (torch refuses to load when
    both are set) for the duration, then restores both exactly. The environment is process-wide: a
    ``torch.load`` in another thread during this window is also weights-only, the safe direction.
    """
    saved = {k: os.environ.get(k) for k in (_FORCE_ON, _FORCE_OFF)}
    os.environ[_FORCE_ON] = "1"
    os.environ.pop(_FORCE_OFF, None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
