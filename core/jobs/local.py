"""The ``local`` backend of sweeps: this machine's job queue (core.jobs), one job per device slot, the runs
spread over every local GPU (``cuda:0``, ``cuda:1``, ... in turn) when the device is ``auto``."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import InputError
from . import api, process
from .scheduler import RUNNER, Scheduler, register

__all__ = ["LocalScheduler"]


@register
class LocalScheduler(Scheduler):
    """Today's queue: :func:`core.jobs.submit` per run, spread over the local GPUs."""

    name = "local"
    keys = frozenset({"name", "device"})
    slot = None  # the local queue runs these rows

    @classmethod
    def check(cls, params: dict) -> dict:
        dev = str(params.get("device") or "auto").strip().lower()
        if dev not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", dev):
            raise InputError(f"local backend device must be 'auto', 'cpu' or 'cuda[:N]', got '{dev}'")
        return {"name": "local", "device": dev}

    def submit(self, runs: list[dict], root: Path, sweep_id: str, ids: list[str]) -> list[str]:
        dev = self.params.get("device", "auto")
        n_gpu = process.cuda_count() if dev == "auto" else 0
        for i, r in enumerate(runs):
            device = f"cuda:{i % n_gpu}" if n_gpu else dev
            info = api.submit("train", r["config"], name=r["name"], device=device, runs_dir=root, target=RUNNER,
                              extra={"sweep": r["sweep"], "backend": self.params})
            ids.append(info.id)
        return ids
