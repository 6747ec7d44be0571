"""Where jobs run: the :class:`Scheduler` interface and the registry of its implementations.

A scheduler takes the runs of a sweep (``submit``). The local one (core.jobs.local) hands them to this
machine's job queue; an *external* one (core.jobs.slurm) hands them to a scheduler on other machines. Rows
of an external scheduler have its ``slot`` as their device slot (``slurm``): the local queue never launches
them or judges them by a local pid, and core.jobs.api asks the scheduler to ``stop``, ``resubmit`` and
``reconcile`` them.

Schedulers are found by name in :data:`SCHEDULERS`. A new one is one module with a :class:`Scheduler` subclass
decorated with :func:`register`, plus its import in ``core/jobs/__init__.py``.
"""

from __future__ import annotations

import abc
import difflib
from pathlib import Path
from typing import Any, ClassVar

from ..errors import InputError
from .store import JobInfo

__all__ = ["Scheduler", "SCHEDULERS", "RUNNER", "register", "backend_names", "check_backend", "get_backend",
           "scheduler_for_slot", "external_slots", "is_external_slot"]

RUNNER = "core.sweep:run_cell"  # the runner of a sweep's runs (train, then evaluate), named in their job.json


class Scheduler(abc.ABC):
    """One way to run a sweep's jobs. ``params`` are the sweep file's ``backend`` mapping, checked by
    :meth:`check`.

    ``name`` is the backend's name in sweep files; ``keys`` the settings it accepts (others are refused with a
    suggestion); ``slot`` the device slot of the rows it runs, or None when the local queue runs them (then
    ``stop``, ``resubmit`` and ``reconcile`` are never called)."""

    name: ClassVar[str]
    keys: ClassVar[frozenset[str]] = frozenset({"name"})
    slot: ClassVar[str | None] = None

    def __init__(self, params: dict):
        self.params = params

    @classmethod
    @abc.abstractmethod
    def check(cls, params: dict) -> dict:
        """Validate ``params`` (a mapping whose keys are known) and fill in the defaults; InputError names the
        bad setting."""

    @abc.abstractmethod
    def submit(self, runs: list[dict], root: Path, sweep_id: str, ids: list[str]) -> list[str]:
        """Submit ``runs`` (each ``{"config", "name", "sweep"}``) as jobs in the runs folder ``root``; append
        each new job id to ``ids`` as soon as it exists (the caller records them even when this raises)."""

    @classmethod
    def stop(cls, root: Path, job_id: str, grace: float = 10.0) -> JobInfo:
        """Stop a queued or running row of this scheduler; the row afterwards."""
        raise NotImplementedError(f"the {cls.name} scheduler runs no rows of its own")

    @classmethod
    def resubmit(cls, root: Path, job_id: str) -> JobInfo:
        """Submit a row that core.jobs.resume_job queued again (with ``resume``) to this scheduler."""
        raise NotImplementedError(f"the {cls.name} scheduler runs no rows of its own")

    @classmethod
    def reconcile(cls, root: Path, force: bool = False) -> int:
        """Rows of this scheduler still queued/running whose task ended without recording an outcome get one;
        returns how many changed (throttled unless ``force``)."""
        return 0


SCHEDULERS: dict[str, type[Scheduler]] = {}


def register(cls: type[Scheduler]) -> type[Scheduler]:
    """Class decorator: make ``cls`` the scheduler of backend ``cls.name``."""
    SCHEDULERS[cls.name] = cls
    return cls


def backend_names() -> tuple[str, ...]:
    """The names of the registered schedulers ('local', 'slurm')."""
    return tuple(SCHEDULERS)


def check_backend(b: Any) -> dict:
    """Validate a backend mapping and fill its defaults; InputError names the bad setting."""
    if not isinstance(b, dict):
        raise InputError("backend must be a mapping, e.g. {name: slurm, partition: gpu}")
    name = str(b.get("name") or "local").strip().lower()
    cls = SCHEDULERS.get(name)
    if cls is None:
        raise InputError(f"unknown backend '{name}': choose {' or '.join(SCHEDULERS)}")
    for k in b:
        if k not in cls.keys:
            close = difflib.get_close_matches(str(k), list(cls.keys), n=1)
            raise InputError(f"unknown {name} backend setting '{k}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                             + f". Known: {', '.join(sorted(cls.keys))}")
    return cls.check(b)


def get_backend(b: dict) -> Scheduler:
    """The scheduler for a backend mapping (checked first)."""
    b = check_backend(b)
    return SCHEDULERS[b["name"]](b)


def external_slots() -> tuple[str, ...]:
    """The device slots of rows that an external scheduler runs (('slurm',))."""
    return tuple(cls.slot for cls in SCHEDULERS.values() if cls.slot)


def is_external_slot(device: str | None) -> bool:
    """True for the device slot of a row that an external scheduler runs ('slurm'): not the local queue's."""
    return str(device or "").split(":")[0] in external_slots()


def scheduler_for_slot(device: str | None) -> type[Scheduler] | None:
    """The external scheduler that runs rows of this device slot; None for the local queue's slots."""
    base = str(device or "").split(":")[0]
    return next((cls for cls in SCHEDULERS.values() if cls.slot and cls.slot == base), None)
