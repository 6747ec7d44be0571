"""Restricted unpickling: the CIFAR files are Python pickles, read here without ever executing code.

:class:`RestrictedUnpickler` resolves only the handful of callables needed to rebuild numpy arrays and plain
containers (and decodes Python 2 byte strings), so a tampered file is refused with a DataError instead of running
what it asks for. :func:`safe_unpickle` opens a file with it and names the path in every error.
"""

from __future__ import annotations

import builtins
import codecs
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError

__all__ = ["RestrictedUnpickler", "safe_unpickle"]


def _latin1_encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Stand-in for ``_codecs.encode``: protocol-2 pickles store ``bytes`` as latin-1 text."""
    if str(encoding).replace("_", "-").lower() not in ("latin1", "latin-1", "iso-8859-1"):
        raise DataError(f"pickle asks for codec '{encoding}', only latin-1 is allowed")
    if not isinstance(text, str):
        raise DataError("pickle passes a non-string to _codecs.encode")
    return codecs.encode(text, "latin1", errors)


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The numpy callables that array pickles reference, under both numpy 1.x and 2.x names.

    The objects are taken from numpy's own ``__reduce__`` output rather than imported by module
    path, so neither the private ``numpy._core`` package nor the deprecated ``numpy.core`` shim is
    touched.
    """
    reconstruct = np.zeros(1).__reduce__()[0]          # multiarray._reconstruct (protocol <= 4)
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]       # numeric._frombuffer (protocol 5)
    scalar = np.uint8(0).__reduce__()[0]               # multiarray.scalar (numpy scalars)
    table: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for pkg in ("numpy.core", "numpy._core"):
        table[(f"{pkg}.multiarray", "_reconstruct")] = reconstruct
        table[(f"{pkg}.multiarray", "scalar")] = scalar
        table[(f"{pkg}.numeric", "_frombuffer")] = frombuffer
    return table


_SAFE_BUILTINS = frozenset({"list", "dict", "tuple", "set", "frozenset", "bytearray", "bytes", "str",
                            "int", "float", "complex", "bool"})
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **_numpy_globals(),
    **{(mod, name): getattr(builtins, name) for mod in ("builtins", "__builtin__") for name in _SAFE_BUILTINS},
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and plain containers and nothing else.

    ``find_class`` is the only way a pickle can reach a Python callable; here it resolves a fixed
    allow-list (numpy's array reconstructors, ``numpy.ndarray``, ``numpy.dtype``, inert builtin
    types, latin-1 ``_codecs.encode``) and refuses every other global with :class:`DataError`,
    before anything is called.
    """

    def __init__(self, file, *, source: str | os.PathLike = "<pickle>", encoding: str = "latin1"):
        super().__init__(file, encoding=encoding)
        self._source = str(source)

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle API
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._source} references '{module}.{name}', which a dataset file never needs; refusing "
                "to load it (the file may have been tampered with). Delete it and download the dataset "
                "again.") from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self._source} uses persistent references, which dataset files never contain")


def safe_unpickle(path: str | os.PathLike) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler`; any failure becomes a :class:`DataError`.

    ``encoding="latin1"`` matches how torchvision reads the original (Python 2) CIFAR pickles:
    Python-2 ``str`` becomes ``str`` and numpy accepts latin-1 text as raw array bytes.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, source=path).load()
    except DataError as e:  # refused by the allow-list: make sure the message names the file
        if str(path) in str(e):
            raise
        raise DataError(f"{path}: {e}") from e
    except FileNotFoundError as e:
        raise DataError(f"dataset file not found: {path}") from e
    except OSError as e:
        raise DataError(f"could not read {path}: {e.strerror or e}") from e
    except MemoryError as e:
        raise DataError(f"{path} is corrupt (it asks for more memory than is available)") from e
    except Exception as e:  # noqa: BLE001 - a corrupt pickle can fail in many ways; all mean "bad file"
        raise DataError(f"{path} is corrupt or truncated and could not be read "
                        f"({type(e).__name__}: {_first_line(e)}). Delete it and download again.") from e


def _first_line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__
