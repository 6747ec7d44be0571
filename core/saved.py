"""Small on-disk copies of a dashboard session's last results, so that they survive a page reload.

A result is a set of numpy arrays plus a JSON-able dict, stored as one compressed ``.npz`` (the dict as JSON text in
the array ``__meta__``; never pickle) at ``<cache>/sessions/<session>/<kind>.npz``, written atomically. ``<cache>`` is
``$ENERGYLENS_CACHE`` or ``<repo>/checkpoints/cache``. A session id is an opaque token of 16-64 lowercase hex digits
(the dashboard keeps it in the page URL); anything else is refused, so an id can never name a path outside the folder.
Sessions untouched for :data:`MAX_AGE_DAYS` days are removed by :func:`prune`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .paths import cache_dir
from .storage import atomic_write, dumps

__all__ = ["sessions_dir", "save", "load", "clear", "prune", "valid_session", "MAX_AGE_DAYS"]

SESSION_RE = re.compile(r"^[0-9a-f]{16,64}$")
KIND_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
MAX_AGE_DAYS = 14
MAX_BYTES = 64 * 2 ** 20   # one saved result at most (they are small: traces and a few images)


def sessions_dir() -> Path:
    return cache_dir("sessions")


def valid_session(session: str) -> bool:
    return isinstance(session, str) and bool(SESSION_RE.match(session))


def _path(session: str, kind: str) -> Path:
    if not valid_session(session):
        raise InputError("invalid session id")
    if not isinstance(kind, str) or not KIND_RE.match(kind):
        raise InputError(f"invalid result kind {kind!r}")
    return sessions_dir() / session / f"{kind}.npz"


def save(session: str, kind: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Store ``arrays`` and ``meta`` as the session's last result of ``kind`` (replacing the previous one)."""
    path = _path(session, kind)
    blob = {k: np.asarray(v) for k, v in arrays.items()}
    if any(v.dtype == object for v in blob.values()):
        raise InputError("saved results hold numeric or text arrays only")
    size = sum(v.nbytes for v in blob.values())
    if size > MAX_BYTES:
        raise InputError(f"result too large to keep ({size / 2 ** 20:.0f} MB > {MAX_BYTES / 2 ** 20:.0f} MB)")
    blob["__meta__"] = np.array(dumps(meta))
    return atomic_write(path, lambda f: np.savez_compressed(f, **blob))


def load(session: str, kind: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The saved result (arrays, meta), or None when there is none or it cannot be read (a corrupt file is removed)."""
    path = _path(session, kind)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as d:
            arrays = {k: d[k] for k in d.files if k != "__meta__"}
            meta = json.loads(str(d["__meta__"]))
        if not isinstance(meta, dict):
            raise ValueError("meta is not a JSON object")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        path.unlink(missing_ok=True)
        return None
    os.utime(path.parent)  # touched: kept by prune()
    return arrays, meta


def clear(session: str, kind: str | None = None) -> None:
    """Remove one saved result of the session, or all of them."""
    if kind is not None:
        _path(session, kind).unlink(missing_ok=True)
        return
    if not valid_session(session):
        raise InputError("invalid session id")
    shutil.rmtree(sessions_dir() / session, ignore_errors=True)


def prune(max_age_days: float = MAX_AGE_DAYS) -> int:
    """Remove sessions untouched for ``max_age_days``; returns how many were removed."""
    root = sessions_dir()
    if not root.is_dir():
        return 0
    cutoff, n = time.time() - max_age_days * 86400, 0
    for p in root.iterdir():
        try:
            if p.is_dir() and valid_session(p.name) and max(
                    [p.stat().st_mtime] + [f.stat().st_mtime for f in p.iterdir()]) < cutoff:
                shutil.rmtree(p, ignore_errors=True)
                n += 1
        except OSError:
            continue
    return n
