"""Recorded runs: training runs made by the project's CLI and shipped under ``checkpoints/runs/<name>/``.

A recorded run is an ordinary run folder without its optimizer state: ``config.json`` (the TrainConfig), ``metrics.jsonl``
(one record per epoch), ``probe/epoch_XXXX.npz`` (the probe snapshots behind Fig. 1 b-d) and ``COMMAND`` (the command
line that made it). The Training studio opens them read-only next to the user's own runs, so Fig. 3 can be read without
waiting for a training job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import overfitting, phase
from .errors import DataError
from .paths import RECORDED_RUNS_DIR
from .rundir import RunDir

__all__ = ["RECORDED_DIR", "RecordedRun", "list_recorded", "read_recorded_metrics", "RUN_FILES", "FIG3_RUNS",
           "CONTRAST_RUNS", "story"]

RECORDED_DIR = RECORDED_RUNS_DIR
RUN_FILES = (RunDir.CONFIG, RunDir.METRICS, RunDir.COMMAND)
# Fig. 3 on a CPU: the same recipe and seed for three methods on 2,000 demo training images without augmentation,
# in which SAT overfits (scripts/build_demo_models.sh fig3); and the contrast, the 4,585-image augmented runs
FIG3_RUNS = ("cifar10-demo-2k-sat", "cifar10-demo-2k-trades", "cifar10-demo-2k-weat-adv")
CONTRAST_RUNS = ("cifar10-demo-sat", "cifar10-demo-trades", "cifar10-demo-weat-adv")


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
    rd = RunDir(folder)
    try:
        run.config = rd.read_config()
    except DataError as e:
        run.error = str(e)
    if not rd.metrics.is_file():
        run.error = run.error or f"{rd.metrics} is missing"
    run.command = rd.read_command()
    return run


def list_recorded(folder: str | Path | None = None) -> list[RecordedRun]:
    """The recorded runs under ``folder`` (default :data:`RECORDED_DIR`), by name; broken ones carry ``error``."""
    folder = Path(folder) if folder is not None else RECORDED_DIR
    if not folder.is_dir():
        return []
    return [_read(p) for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def read_recorded_metrics(run: RecordedRun) -> list[dict]:
    """The per-epoch records of a recorded run (a torn last line is skipped)."""
    rd = RunDir(run.run_dir)
    if not rd.metrics.is_file():
        raise DataError(f"{rd.metrics} is missing")
    return rd.read_metrics()


def story(runs: list[RecordedRun]) -> dict[str, dict]:
    """The series and the robust-overfitting summary of each run, for the Training studio's Fig. 3 story:
    name -> {"method", "summary" (core.overfitting.Overfitting), "epochs", "dE", "rob_err", "train_rob", "test_rob"}.
    Runs whose files cannot be read are left out."""
    out = {}
    for run in runs:
        if run.error:
            continue
        try:
            recs = read_recorded_metrics(run)
        except DataError:
            continue
        method = str(run.config.get("method", "?"))
        summary = overfitting.summarize(recs, method, run.config.get("eval_samples"))
        if summary is None:
            continue
        ep, de = phase.metric_series(recs, "dE_mean")
        out[run.name] = {"method": method, "summary": summary, "recipe": overfitting.recipe(run.config),
                         "epochs": ep, "dE": de, "rob_err": phase.metric_series(recs, "rob_err")[1],
                         "train_rob": phase.metric_series(recs, "probe_adv_acc")[1],
                         "test_rob": phase.metric_series(recs, "pgd_acc")[1]}
    return out
