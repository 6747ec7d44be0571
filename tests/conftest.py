"""Shared fixtures. Tests run on CPU with few threads so that the suite behaves on 2-core CI."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_SUBSET = REPO.parent / "shared" / "data" / "cifar10_train_subset.npz"

# Respect OMP_NUM_THREADS when set (CI, loaded machines); otherwise at most 2 threads.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def cifar_subset():
    """(x uint8 N x 3 x 32 x 32, y int64) from ../shared/data, or skip when absent (fresh clone)."""
    if not SHARED_SUBSET.is_file():
        pytest.skip(f"real CIFAR-10 subset not present at {SHARED_SUBSET}")
    with np.load(SHARED_SUBSET) as d:
        return d["x"], d["y"]


@pytest.fixture
def tiny_linear_model():
    """A deterministic tiny classifier over 3x8x8 images (fast, for unit tests)."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    return m.eval()
