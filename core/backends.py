"""Moved to :mod:`core.jobs` (core.jobs.scheduler, core.jobs.local, core.jobs.slurm).

Kept for one stored reference only: submitit pickles the task of every Slurm job it submits, and tasks
submitted (or requeued) before the move name their class ``core.backends.NodeTask``; a node that unpickles
one must still find it here. Nothing else should import this module.
"""

from .jobs.slurm import NodeTask

__all__ = ["NodeTask"]
