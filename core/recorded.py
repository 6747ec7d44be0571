"""Recorded runs: training runs made by the project's CLI and shipped under ``checkpoints/runs/<name>/``.

A recorded run is an ordinary run folder without its optimizer state: ``config.json`` (the TrainConfig), ``metrics.jsonl``
(one record per epoch), ``probe/epoch_XXXX.npz`` (the probe snapshots behind Fig. 1 b-d) and ``COMMAND`` (the command
line that made it). The Training studio opens them read-only next to the user's own runs, so Fig. 3 can be read without
waiting for a training job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError
from .storage import read_jsonl

__all__ = ["RECORDED_DIR", "RecordedRun", "list_recorded", "read_recorded_metrics", "RUN_FILES"]

RECORDED_DIR = Path(__file__).resolve().parents[1] / "checkpoints" / "runs"
RUN_FILES = ("config.json", "metrics.jsonl", "COMMAND")


@dataclass
class RecordedRun:
    """A read-only run folder, with the attributes the Training studio reads from a job."""

    name: str
    run_dir: str
    config: dict = field(default_factory=dict)
    command: str = ""
    error: str | None = None       # why the folder cannot be shown (missing or corrupt files)

    @property
    def id(self) -> str:
        return f"recorded:{self.name}"

    status = "recorded"
    active = False
    progress = 1.0
    message = "recorded run (read-only)"
    device = "—"
    duration = None
    recorded = True


def _read(folder: Path) -> RecordedRun:
    run = RecordedRun(folder.name, str(folder))
    try:
        run.config = json.loads((folder / "config.json").read_text())
        if not isinstance(run.config, dict):
            raise ValueError("config.json does not hold a JSON object")
    except (OSError, ValueError) as e:
        run.error = f"{folder / 'config.json'} is missing or unreadable ({e})"
    if not (folder / "metrics.jsonl").is_file():
        run.error = run.error or f"{folder / 'metrics.jsonl'} is missing"
    try:
        run.command = (folder / "COMMAND").read_text().strip()
    except OSError:
        run.command = ""
    return run


def list_recorded(folder: str | Path | None = None) -> list[RecordedRun]:
    """The recorded runs under ``folder`` (default :data:`RECORDED_DIR`), by name; broken ones carry ``error``."""
    folder = Path(folder) if folder is not None else RECORDED_DIR
    if not folder.is_dir():
        return []
    return [_read(p) for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def read_recorded_metrics(run: RecordedRun) -> list[dict]:
    """The per-epoch records of a recorded run (a torn last line is skipped)."""
    path = Path(run.run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path} is missing")
    return read_jsonl(path)
