"""Compatibility shims for third-party packages.

RobustBench 1.1.1 imports AutoAttack as ``autoattack`` (``robustbench/eval.py`` does
``from autoattack import AutoAttack`` and ``from autoattack.state import EvaluationState``, and
``robustbench/__init__.py`` imports ``eval``). The AutoAttack wheel installed with EnergyLens,
``pyautoattack`` 0.2.0, ships the same code under the package name ``pyautoattack``. Without
help, ``import robustbench`` (and therefore ``robustbench.utils.load_model``) fails with
``ModuleNotFoundError: No module named 'autoattack'``.

:func:`ensure_autoattack_alias` is the one place in the project that bridges the two names. It
must run before robustbench is imported; :func:`import_robustbench_utils` does both in the right
order and is the way the rest of the engine should reach robustbench.

The alias is only installed when no real ``autoattack`` package is importable, so an environment
that has upstream AutoAttack keeps using it untouched.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import warnings
from types import ModuleType

from .errors import ZooError

__all__ = ["ensure_autoattack_alias", "import_robustbench_utils", "ALIAS_NAME", "TARGET_NAME"]

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
