"""Where things live: the repository root and every ``ENERGYLENS_*`` path setting, read in one place.

The bottom layer of ``core``: it imports nothing of the project. Settings are read on every call
(not frozen at import), so tests and the dashboard may point them elsewhere at any time.

=========================  ==============================  ===========================================
setting                    default                          what it holds
=========================  ==============================  ===========================================
``ENERGYLENS_RUNS``        ``<repo>/runs``                  training / evaluation / SGLD job folders
``ENERGYLENS_CACHE``       ``<repo>/checkpoints/cache``     landscape, SGLD statistics, saved sessions
``ENERGYLENS_DATA``        ``<repo>/data``                  datasets downloaded or placed by the user
``ENERGYLENS_CIFAR10_SUBSET``  ``../shared/data/...npz``    the 5,085-image CIFAR-10 subset (developers)
``ENERGYLENS_INCEPTION_WEIGHTS``  (none)                    Inception weights for FID / IS
=========================  ==============================  ===========================================
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["REPO_ROOT", "CHECKPOINTS_DIR", "BUNDLED_DIR", "LOCAL_DIR", "DEMO_PACK_DIR", "RECORDED_RUNS_DIR", "ZOO_DIR", "DEFAULT_RUNS_DIR",
           "ENV_RUNS", "ENV_CACHE", "ENV_DATA", "ENV_CIFAR10_SUBSET", "ENV_INCEPTION_WEIGHTS",
           "runs_dir", "cache_dir", "data_dir", "setting"]

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS_DIR = REPO_ROOT / "checkpoints"
BUNDLED_DIR = CHECKPOINTS_DIR                  # bundled models: checkpoints/*.safetensors
LOCAL_DIR = CHECKPOINTS_DIR / "local"          # the user's own checkpoints
DEMO_PACK_DIR = CHECKPOINTS_DIR / "demo"       # the CIFAR-10 demo pack's images
RECORDED_RUNS_DIR = CHECKPOINTS_DIR / "runs"   # training runs shipped with the project (read-only)
ZOO_DIR = CHECKPOINTS_DIR / "robustbench"      # RobustBench weights, downloaded on demand
DEFAULT_RUNS_DIR = REPO_ROOT / "runs"

ENV_RUNS = "ENERGYLENS_RUNS"
ENV_CACHE = "ENERGYLENS_CACHE"
ENV_DATA = "ENERGYLENS_DATA"
ENV_CIFAR10_SUBSET = "ENERGYLENS_CIFAR10_SUBSET"
ENV_INCEPTION_WEIGHTS = "ENERGYLENS_INCEPTION_WEIGHTS"


def setting(name: str) -> Path | None:
    """The path an ``ENERGYLENS_*`` variable names (``~`` expanded), or None when it is unset or empty."""
    value = os.environ.get(name)
    return Path(value).expanduser() if value else None


def runs_dir(override: str | os.PathLike | None = None) -> Path:
    """The job folder root: ``override``, else ``$ENERGYLENS_RUNS``, else ``<repo>/runs``."""
    if override is not None:
        return Path(override).expanduser()
    return setting(ENV_RUNS) or DEFAULT_RUNS_DIR


def cache_dir(*parts: str) -> Path:
    """The cache root (``$ENERGYLENS_CACHE`` or ``<repo>/checkpoints/cache``), joined with ``parts``."""
    return (setting(ENV_CACHE) or CHECKPOINTS_DIR / "cache").joinpath(*parts)


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The datasets folder: ``override``, else ``$ENERGYLENS_DATA``, else ``<repo>/data``."""
    if override is not None:
        return Path(override)
    return setting(ENV_DATA) or REPO_ROOT / "data"
