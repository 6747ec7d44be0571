"""Atomic, crash-safe file writes and safe reads.

Every write goes to a temporary file in the destination folder, is flushed and fsync'ed, then
renamed over the target with ``os.replace`` (atomic on POSIX). A reader therefore sees either the
old file or the new one, never a half-written file. Write failures (full disk, read-only folder)
raise :class:`StorageError` with a message naming the path.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import EnergyLensError

__all__ = ["StorageError", "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "atomic_torch_save", "append_jsonl", "read_jsonl", "sniff_format", "safe_torch_load"]


class StorageError(EnergyLensError, OSError):
    """A file could not be written or read (disk full, permissions, missing folder...)."""


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: str | os.PathLike, writer: Callable[[Any], None], mode: str = "wb") -> Path:
    """Write ``path`` atomically: ``writer(fileobj)`` fills a temp file that is then renamed."""
    path = Path(path)
    try:
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


def atomic_write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data), "wb")


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")), "wb")


def atomic_write_json(path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default))


def atomic_torch_save(path, obj: Any) -> Path:
    """torch.save of tensors and plain containers only (so it loads with weights_only=True)."""
    return atomic_write(path, lambda f: torch.save(obj, f), "wb")


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def append_jsonl(path, record: dict) -> None:
    """Append one JSON line and fsync; a torn last line is skipped by :func:`read_jsonl`."""
    path = Path(path)
    line = json.dumps(record, default=_json_default) + "\n"
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


def safe_torch_load(path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(..., weights_only=True)`` with clear errors for the usual broken files.

    Never unpickles arbitrary objects: a file that needs code to load is refused.
    """
    from .errors import CheckpointError

    path = Path(path)
    kind = sniff_format(path)
    if kind == "missing":
        raise CheckpointError(f"checkpoint not found: {path}")
    if kind == "empty":
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): delete it and download or train it again")
    if kind == "html":
        raise CheckpointError(
            f"{path} is an HTML page, not model weights (a failed download, e.g. a Google Drive "
            "quota or login page). Delete it and download again, or put the real file there.")
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(map_location))
        except Exception as e:  # noqa: BLE001 - report any parse failure as a checkpoint error
            raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from e
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "Weights only load failed" in str(e) or "Unsupported global" in str(e):
            if re.search(r"GLOBAL \S+|Unsupported global", str(e)):  # it names the code it would import
                raise CheckpointError(
                    f"{path} contains Python objects that would have to execute code to load; "
                    "EnergyLens only loads plain tensors (weights_only=True). Re-save it as a "
                    "state_dict or as safetensors.") from e
            # random bytes and pickles of unknown opcodes fail alike: say both, do not guess
            detail = next((ln.strip() for ln in str(e).splitlines() if ln.strip().startswith("Unsupported")), msg)
            raise CheckpointError(
                f"{path} is not a plain-tensor checkpoint: it is corrupt or truncated, or it holds Python "
                "objects that would have to execute code to load, which EnergyLens refuses (weights_only=True). "
                f"Re-save it as a state_dict or as safetensors, or download it again ({detail}).") from e
        raise CheckpointError(f"{path} is corrupt or truncated and could not be read ({msg})") from e
