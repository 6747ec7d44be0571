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
import zlib
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
MAX_META = 2 ** 20         # characters of its JSON metadata
MAX_MEMBERS = 256          # arrays in one saved result


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
    if len(blob) >= MAX_MEMBERS:
        raise InputError(f"result has {len(blob)} arrays (at most {MAX_MEMBERS - 1})")
    size = sum(v.nbytes for v in blob.values())
    if size > MAX_BYTES:
        raise InputError(f"result too large to keep ({size / 2 ** 20:.0f} MB > {MAX_BYTES / 2 ** 20:.0f} MB)")
    text = dumps(meta)
    if len(text) > MAX_META:
        raise InputError(f"result metadata too large to keep ({len(text):,} characters > {MAX_META:,})")
    blob["__meta__"] = np.array(text)
    return atomic_write(path, lambda f: np.savez_compressed(f, **blob))


def _check_members(path: Path) -> None:
    """The declared sizes of the arrays of a saved file (zip entries and .npy headers: shape x itemsize) within the
    limits, before any array is read: a zip bomb is refused without decompressing it (ValueError)."""
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        if len(infos) > MAX_MEMBERS:
            raise ValueError(f"{len(infos)} arrays (at most {MAX_MEMBERS})")
        total = 0
        for info in infos:
            if not info.filename.endswith(".npy") or info.file_size > MAX_BYTES + MAX_META * 4 + 4096:
                raise ValueError(f"array {info.filename[:-4][:60]!r} declares {info.file_size / 2 ** 20:,.0f} MB "
                                 f"unpacked (limit {MAX_BYTES / 2 ** 20:.0f} MB)")
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"unsupported .npy version {version}")
            if dtype.hasobject:
                raise ValueError("an array of Python objects")
            n = 1
            for d in shape:
                n *= int(d)
            nbytes = n * dtype.itemsize
            limit = MAX_META * 4 if info.filename == "__meta__.npy" else MAX_BYTES  # '<U' is 4 bytes a character
            total += nbytes
            if nbytes > limit or total > MAX_BYTES + limit:
                raise ValueError(f"array {info.filename[:-4]!r} declares {nbytes / 2 ** 20:,.0f} MB "
                                 f"(limit {MAX_BYTES / 2 ** 20:.0f} MB)")


def load(session: str, kind: str, problems: list[str] | None = None
         ) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The saved result (arrays, meta), or None when there is none or it cannot be read: a file that cannot be read
    (corrupt, too large, nested too deeply) is removed, and one line saying why is appended to ``problems``."""
    path = _path(session, kind)
    if not path.is_file():
        return None
    try:
        _check_members(path)  # before reading: declared sizes within the limits
        with np.load(path, allow_pickle=False) as d:
            arrays = {k: d[k] for k in d.files if k != "__meta__"}
            meta = json.loads(str(d["__meta__"]))
        if not isinstance(meta, dict):
            raise ValueError("meta is not a JSON object")
    except RecursionError:
        return _drop(path, "its metadata is nested too deeply", problems)
    except (Exception, MemoryError) as e:  # noqa: BLE001 - zipfile / zlib / numpy raise many kinds on a corrupt file
        if isinstance(e, zlib.error):
            e = ValueError(f"corrupt compressed data: {e}")
        return _drop(path, str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__, problems)
    os.utime(path.parent)  # touched: kept by prune()
    return arrays, meta


def _drop(path: Path, why: str, problems: list[str] | None) -> None:
    path.unlink(missing_ok=True)
    if problems is not None:
        problems.append(f"the saved {path.stem} result could not be read ({why}) and was removed")
    return None


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
