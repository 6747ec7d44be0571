"""The run folder: the only code that knows the names of the files a run writes, and how to read them back.

A training run (``core.train``) writes::

    config.json            the TrainConfig
    metrics.jsonl          one record per epoch (accuracies, losses, ΔE statistics)
    batches.jsonl          one record per reported batch (loss, seconds per batch)
    progress.json          the latest progress (epoch, batch, ETA), rewritten as it goes
    probe/epoch_XXXX.npz   energies of the fixed training probe set, natural and attacked, per epoch
    best.safetensors       the weights at the highest robust test accuracy
    last.safetensors       the weights after the last finished epoch
    epochs/epoch_XXXX.safetensors   every N epochs when asked (``checkpoint_every``)
    state.pt               model + optimizer + scheduler state for resuming (weights-only loadable)
    COMMAND                the command line of a recorded run (shipped runs only)

an evaluation writes ``result.json``; an SGLD batch ``samples.npz`` and ``metrics.json``. The job system's own files
(``job.json``, ``job-state.json``, ``log.txt``) belong to :mod:`core.jobs`.

Reads never raise on a torn last line or a missing optional file; writes are atomic (:mod:`core.storage`).
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .storage import append_jsonl, atomic_write, atomic_write_json, atomic_write_text, read_jsonl

__all__ = ["RunDir", "PROBE_KEYS", "CHECKPOINT_FILES"]

# the arrays of a probe snapshot: marginal / joint energies of the probe images, natural and attacked, whether each
# was classified correctly, labels, training-set indices and the WEAT weight; older files may lack the optional ones
PROBE_KEYS = ("e_nat", "e_adv", "ej_nat", "ej_adv", "correct_nat", "correct_adv", "labels", "indices", "w_probe")
PROBE_REQUIRED = ("e_nat", "e_adv", "ej_nat", "ej_adv")
CHECKPOINT_FILES = ("best.safetensors", "last.safetensors")


def _json_object(path: Path) -> dict | None:
    """A JSON object read from ``path``, or None when the file is absent, unreadable or holds something else."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


class RunDir:
    """One run folder. ``RunDir(path).metrics`` is the path of its metrics file, ``.read_metrics()`` its records."""

    CONFIG = "config.json"
    METRICS = "metrics.jsonl"
    BATCHES = "batches.jsonl"
    PROGRESS = "progress.json"
    PROBE_DIR = "probe"
    EPOCHS_DIR = "epochs"
    BEST = "best.safetensors"
    LAST = "last.safetensors"
    STATE = "state.pt"
    RESULT = "result.json"
    SAMPLES = "samples.npz"
    SAMPLE_METRICS = "metrics.json"
    COMMAND = "COMMAND"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # ---- paths -------------------------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def batches(self) -> Path:
        return self.path / self.BATCHES

    @property
    def progress(self) -> Path:
        return self.path / self.PROGRESS

    @property
    def probe_dir(self) -> Path:
        return self.path / self.PROBE_DIR

    @property
    def best(self) -> Path:
        return self.path / self.BEST

    @property
    def last(self) -> Path:
        return self.path / self.LAST

    @property
    def state(self) -> Path:
        return self.path / self.STATE

    @property
    def result(self) -> Path:
        return self.path / self.RESULT

    @property
    def samples(self) -> Path:
        return self.path / self.SAMPLES

    @property
    def sample_metrics(self) -> Path:
        return self.path / self.SAMPLE_METRICS

    @property
    def command(self) -> Path:
        return self.path / self.COMMAND

    def probe_file(self, epoch: int) -> Path:
        return self.probe_dir / f"epoch_{int(epoch):04d}.npz"

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.path / self.EPOCHS_DIR / f"epoch_{int(epoch):04d}.safetensors"

    # ---- config ------------------------------------------------------------------------------------------------
    def write_config(self, config: dict) -> None:
        atomic_write_json(self.config, config)

    def read_config(self) -> dict:
        """The run's config; :class:`DataError` naming the file when it is missing or not a JSON object."""
        try:
            cfg = json.loads(self.config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{self.config} is missing or unreadable ({e})") from e
        if not isinstance(cfg, dict):
            raise DataError(f"{self.config} does not hold a JSON object")
        return cfg

    # ---- per-epoch metrics ---------------------------------------------------------------------------------------
    def read_metrics(self) -> list[dict]:
        """The per-epoch records (a torn last line is skipped; [] when there are none yet)."""
        return read_jsonl(self.metrics)

    def append_metrics(self, record: dict) -> None:
        append_jsonl(self.metrics, record)

    def keep_epochs(self, last_epoch: int) -> None:
        """Drop the metric and batch records after ``last_epoch`` (a resumed run repeats those epochs)."""
        for path in (self.metrics, self.batches):
            if path.exists():
                kept = [r for r in read_jsonl(path) if r.get("epoch", 0) <= last_epoch]
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def clear_records(self) -> None:
        """Remove the metric and batch records of an earlier run in this folder (a fresh start)."""
        for path in (self.metrics, self.batches):
            if path.exists():
                path.unlink()

    # ---- batches and progress -------------------------------------------------------------------------------------
    def append_batch(self, record: dict) -> None:
        append_jsonl(self.batches, record)

    def read_batches(self, max_bytes: int = 256_000) -> list[dict]:
        """The batch-level log: one record per reported batch (epoch, batch, batches, step, loss, seconds_per_batch,
        time). Only its last ``max_bytes`` are read (a few thousand records), so polling a long run stays cheap."""
        try:
            with open(self.batches, "rb") as f:
                f.seek(0, 2)
                size = f.tell()
                f.seek(max(0, size - int(max_bytes)))
                data = f.read()
        except OSError:
            return []
        lines = data.split(b"\n")
        if size > max_bytes:
            lines = lines[1:]                      # the first line read may be cut
        out = []
        for ln in lines:
            try:
                r = json.loads(ln)
            except ValueError:
                continue                           # empty, or a torn last line
            if isinstance(r, dict):
                out.append(r)
        return out

    def write_progress(self, **fields: Any) -> None:
        atomic_write_json(self.progress, {**fields, "time": time.time()})

    def read_progress(self) -> dict | None:
        """The latest ``progress.json`` (epoch, batch, batches, eta_s, ...), or None."""
        return _json_object(self.progress)

    # ---- probe snapshots -------------------------------------------------------------------------------------------
    def write_probe(self, epoch: int, arrays: dict[str, np.ndarray]) -> None:
        atomic_write(self.probe_file(epoch), lambda f: np.savez_compressed(f, **arrays))

    def probe_epochs(self) -> list[int]:
        """Epochs with a probe snapshot, ascending."""
        out = []
        if self.probe_dir.is_dir():
            for p in self.probe_dir.glob("epoch_*.npz"):
                try:
                    out.append(int(p.stem.split("_", 1)[1]))
                except ValueError:
                    continue
        return sorted(out)

    def load_probe(self, epoch: int) -> dict[str, np.ndarray]:
        """The probe arrays of one epoch (natural / adversarial energies of the fixed training probe set).

        Raises :class:`DataError` naming the file when it is missing or unreadable; arrays absent from an older file
        are simply left out."""
        path = self.probe_file(epoch)
        if not path.is_file():
            raise DataError(f"no probe snapshot for epoch {epoch} ({path})")
        try:
            with np.load(path, allow_pickle=False) as d:
                out = {k: np.asarray(d[k]) for k in PROBE_KEYS if k in d.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"probe snapshot {path} is not readable: {e}") from e
        missing = [k for k in PROBE_REQUIRED if k not in out]
        if missing:
            raise DataError(f"probe snapshot {path} lacks {', '.join(missing)}")
        n = len(out["e_nat"])
        if any(len(out[k]) != n for k in PROBE_REQUIRED):
            raise DataError(f"probe snapshot {path} has arrays of different lengths")
        return out

    # ---- results of evaluation and sampling runs ------------------------------------------------------------------
    def write_result(self, record: dict) -> None:
        atomic_write_json(self.result, record)

    def read_result(self) -> dict | None:
        """``result.json`` of an evaluation run, or None when absent or unreadable."""
        return _json_object(self.result)

    def write_command(self, command: str) -> None:
        atomic_write_text(self.command, command.rstrip("\n") + "\n")

    def read_command(self) -> str:
        try:
            return self.command.read_text().strip()
        except OSError:
            return ""
