"""Progress of a training run within the epoch: batch counter, ETA and a batch-level loss log.

The trainer (core.train) owns a :class:`TrainClock`; after every batch it asks the clock whether a
report is due (at most one per ``interval_s``, always on the first and last batch of an epoch), and
then writes ``progress.json`` (the latest state, atomically) and appends one line to
``batches.jsonl`` (the training loss so far, the Training studio's first live points, long before the
first epoch's ΔE record exists). The page reads both through :class:`core.rundir.RunDir`.

The ETA is measured, not promised: seconds per training batch are the mean over the batches this
process ran, the evaluation + probe time of an epoch is the last one measured; before the first
evaluation it is estimated from the measured per-image cost of a training batch, scaled by the number
of forward/backward passes the evaluation and probe attacks make (so a first-epoch ETA says "about").
"""

from __future__ import annotations

import time

__all__ = ["TrainClock", "format_eta", "progress_message"]


def format_eta(seconds: float | None) -> str:
    """``"2m05s"``, ``"1h03m"`` or ``"–"`` (unknown)."""
    if seconds is None or not seconds == seconds or seconds < 0:
        return "–"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s"


class TrainClock:
    """Seconds per batch and per evaluation of one training process, and the ETA they give."""

    def __init__(self, *, epochs: int, batches: int, batch_size: int, attack_steps: int, eval_samples: int,
                 eval_steps: int, probe_size: int, interval_s: float = 1.0, clock=time.monotonic):
        self.epochs, self.batches = int(epochs), max(int(batches), 1)
        self.interval_s, self._now = float(interval_s), clock
        # forward+backward passes per image: a training batch runs the attack and ~2 training passes;
        # the evaluation runs one natural pass + its PGD steps, the probe the training attack + 2 passes
        train_work = max(int(batch_size), 1) * (int(attack_steps) + 2)
        eval_work = int(eval_samples) * (int(eval_steps) + 1) + int(probe_size) * (int(attack_steps) + 2)
        self._eval_ratio = eval_work / train_work          # evaluation cost in training batches
        self._batch_s: list[float] = []
        self._eval_s: float | None = None
        self._t_batch = self._now()
        self._t_eval: float | None = None
        self._last_report = -float("inf")

    # ------------------------------------------------------------------ events from the trainer
    def start_batch(self) -> None:
        self._t_batch = self._now()

    def end_batch(self) -> None:
        self._batch_s.append(self._now() - self._t_batch)

    def start_eval(self) -> None:
        self._t_eval = self._now()

    def end_eval(self) -> None:
        if self._t_eval is not None:
            self._eval_s = self._now() - self._t_eval
            self._t_eval = None

    def report_due(self, batch: int) -> bool:
        """Whether batch ``batch`` (1-based) should be reported: first, last, else at most every interval_s."""
        now = self._now()
        if batch in (1, self.batches) or now - self._last_report >= self.interval_s:
            self._last_report = now
            return True
        return False

    # ------------------------------------------------------------------ estimates
    @property
    def seconds_per_batch(self) -> float | None:
        return sum(self._batch_s) / len(self._batch_s) if self._batch_s else None

    @property
    def eval_seconds(self) -> float | None:
        """Measured evaluation + probe seconds of the last epoch, else the estimate from the batch time."""
        if self._eval_s is not None:
            return self._eval_s
        spb = self.seconds_per_batch
        return None if spb is None else spb * self._eval_ratio

    @property
    def eval_measured(self) -> bool:
        return self._eval_s is not None

    def eta(self, epoch: int, batch: int) -> float | None:
        """Seconds left after batch ``batch`` (1-based) of epoch ``epoch`` (1-based), evaluation included."""
        spb, ev = self.seconds_per_batch, self.eval_seconds
        if spb is None:
            return None
        left_here = (self.batches - int(batch)) * spb + ev
        return left_here + (self.epochs - int(epoch)) * (self.batches * spb + ev)

    def eta_after_eval(self, epoch: int) -> float | None:
        """Seconds left while epoch ``epoch``'s evaluation runs (counted from its start)."""
        spb, ev = self.seconds_per_batch, self.eval_seconds
        if spb is None:
            return None
        spent = 0.0 if self._t_eval is None else self._now() - self._t_eval
        return max(ev - spent, 0.0) + (self.epochs - int(epoch)) * (self.batches * spb + ev)


def progress_message(epoch: int, epochs: int, batch: int | None = None, batches: int | None = None,
                     eta_s: float | None = None, *, estimated: bool = False, phase: str = "train") -> str:
    """The one-line job message: ``epoch 1/6 · batch 7/11 · ETA ~2m10s``."""
    parts = [f"epoch {epoch}/{epochs}"]
    if phase == "evaluate":
        parts.append("evaluating (PGD test accuracy, probe energies)")
    elif batch is not None and batches:
        parts.append(f"batch {batch}/{batches}")
    if eta_s is not None:
        parts.append(f"ETA {'~' if estimated else ''}{format_eta(eta_s)}")
    return " · ".join(parts)
