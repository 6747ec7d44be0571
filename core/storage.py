"""Atomic, crash-safe file writes and safe reads.

Every write goes to a temporary file in the destination folder, is flushed and fsync'ed, then
renamed over the target with ``os.replace`` (atomic on POSIX). A reader therefore sees either the
old file or the new one, never a half-written file. Write failures (full disk, read-only folder)
raise :class:`StorageError` with a message naming the path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path, PurePath
from typing import Any, Callable

from .errors import EnergyLensError

__all__ = ["StorageError", "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "append_jsonl", "read_jsonl", "json_default", "dumps", "is_temp_file", "remove_stale_temp_files",
           "sniff_format"]


class StorageError(EnergyLensError, OSError):
    """A file could not be written or read (disk full, permissions, missing folder...)."""


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: str | os.PathLike, writer: Callable[[Any], None], mode: str = "wb", *,
                 parents: bool = True) -> Path:
    """Write ``path`` atomically: ``writer(fileobj)`` fills a temp file that is then renamed. ``parents=False``
    writes only into a folder that exists (a job folder deleted meanwhile is not created again)."""
    path = Path(path)
    try:
        if parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise StorageError(f"cannot write to folder {path.parent}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, mode) as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except OSError as e:
        _silent_unlink(tmp)
        raise StorageError(f"could not write {path}: {e.strerror or e}") from e
    except BaseException:
        _silent_unlink(tmp)
        raise
    return path


def _silent_unlink(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def atomic_write_bytes(path, data: bytes, *, parents: bool = True) -> Path:
    return atomic_write(path, lambda f: f.write(data), "wb", parents=parents)


def atomic_write_text(path, text: str, *, parents: bool = True) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")), "wb", parents=parents)


def atomic_write_json(path, obj: Any, *, parents: bool = True) -> Path:
    """JSON (indented, sorted keys, the project's encoder) written atomically."""
    return atomic_write_text(path, dumps(obj, indent=2), parents=parents)


def json_default(o: Any) -> Any:
    """The project's one JSON encoder for what ``json`` cannot write itself: numpy / torch arrays and scalars
    (``tolist``), paths, sets and tuples, dataclasses. Anything else is a bug and raises ``TypeError``."""
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, PurePath):
        return str(o)
    if isinstance(o, (set, frozenset, tuple)):
        return sorted(o, key=str) if isinstance(o, (set, frozenset)) else list(o)
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def dumps(obj: Any, **kw: Any) -> str:
    """``json.dumps`` with the project's encoder and sorted keys (stable text for files and hashes)."""
    kw.setdefault("sort_keys", True)
    return json.dumps(obj, default=json_default, **kw)


def append_jsonl(path, record: dict) -> None:
    """Append one JSON line and fsync; a torn last line is skipped by :func:`read_jsonl`."""
    path = Path(path)
    line = json.dumps(record, default=json_default) + "\n"
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise StorageError(f"could not append to {path}: {e.strerror or e}") from e


def read_jsonl(path) -> list[dict]:
    """Read a JSON-lines file, ignoring a partially written last line."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def sniff_format(path) -> str:
    """Guess a weights file's format from its first bytes.

    Returns one of 'missing', 'empty', 'html', 'safetensors', 'torch-zip', 'torch-legacy',
    'unknown'. 'html' is the classic failed Google-Drive download saved as ``.pt``.
    """
    path = Path(path)
    if not path.is_file():
        return "missing"
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "empty"
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")) or stripped.startswith(b"<"):
        return "html"
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    # safetensors before the pickle marker: its first byte is the low byte of the header length, which is
    # 0x80 for one header size in 256
    if len(head) >= 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if 0 < n < 100_000_000 and n <= path.stat().st_size - 8:
            return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol marker of the legacy torch format
        return "torch-legacy"
    return "unknown"


# the temp-file names of atomic_write: tempfile.mkstemp(prefix=".<name>.", suffix=".tmp")
_TEMP_RE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def is_temp_file(name: str) -> bool:
    """Whether ``name`` is the temporary file of an :func:`atomic_write` (left behind when a writer was killed)."""
    return bool(_TEMP_RE.match(name))


def remove_stale_temp_files(folder: str | os.PathLike) -> list[str]:
    """Delete the temp files of interrupted atomic writes (``.<name>.<8 random chars>.tmp``) in a run folder and
    its subfolders (symbolic links are not followed). Only call it while no other process writes there (a job
    process does it when it starts, before its runner). Returns the removed paths relative to ``folder``."""
    folder = Path(folder)
    removed = []
    for dirpath, _dirnames, filenames in os.walk(folder, followlinks=False):
        for fn in filenames:
            if is_temp_file(fn):
                p = Path(dirpath) / fn
                try:
                    if p.is_symlink() or not p.is_file():
                        continue
                    p.unlink()
                    removed.append(str(p.relative_to(folder)))
                except OSError:
                    pass
    return removed
