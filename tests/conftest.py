"""Shared fixtures. Tests run on CPU with few threads so that the suite behaves on 2-core CI."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# dashboard/ on sys.path, as Streamlit puts it there for `streamlit run dashboard/Home.py`: tests import the dashboard
# modules (common, figures, navigation, ...) by the plain names the pages use. Done here once, for every test file
# (not through pytest's `pythonpath` in pyproject.toml: scripts/venv.sh rebuilds the venv when pyproject.toml changes).
if str(REPO / "dashboard") not in sys.path:
    sys.path.insert(0, str(REPO / "dashboard"))

# Respect OMP_NUM_THREADS when set (CI, loaded machines); otherwise at most 2 threads.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))
# The app warms UMAP (numba's compile) in a background thread at launch; in tests that thread would only compete
# for the CPU with the test itself. Tests of the warm-up set the variable back.
os.environ.setdefault("ENERGYLENS_UMAP_WARMUP", "0")


def wait_until(pred: Callable[[], Any], timeout: float = 120.0, what: str = "the condition", every: float = 0.05,
               detail: Callable[[], Any] | None = None) -> Any:
    """Poll ``pred()`` and return its first truthy value as soon as it holds. ``timeout`` only bounds a hang: it is
    generous (the thing waited for either happens or never does) and is never a time the work has to beat, so a
    slow, loaded machine passes exactly as a fast one. On a timeout the message names ``what`` (and ``detail()``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f": {detail()}" if detail is not None else ""
            raise AssertionError(f"{what} never happened (gave up after {timeout:.0f} s){extra}")
        time.sleep(every)


@pytest.fixture(name="wait_until")
def wait_until_fixture() -> Callable[..., Any]:
    """:func:`wait_until` for tests: ``wait_until(lambda: cond, what="...")``."""
    return wait_until


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def cifar_subset():
    """(x uint8 5,085 x 3 x 32 x 32, y int64): the real CIFAR-10 subset, put together from the demo pack's two
    committed splits (so it exists in every clone); skips with the reason when the pack is damaged."""
    from core.data import demo
    from core.errors import DataError

    try:
        return demo.load_subset()
    except DataError as e:
        pytest.skip(f"the CIFAR-10 demo pack cannot give the subset here: {e}")


@pytest.fixture(scope="session")
def cifar_plain_model(cifar_subset):
    """A plain (not adversarially trained) SmallCNN (width 16) trained for 3 epochs on the first 2,000 images
    of the real CIFAR-10 subset, and 128 held-out images of it: ~30% accurate and not robust at all, which is
    what the attack checks on real images need. About 5-15 s on a CPU; skips when the subset is absent."""
    import torch.nn.functional as F

    from core.models import build_model

    xs, ys = cifar_subset
    x = torch.from_numpy(xs).float().div_(255)
    y = torch.from_numpy(ys).long()
    torch.manual_seed(0)
    model = build_model("smallcnn", 10, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        model.train()
        for idx in torch.randperm(2000, generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval(), x[-128:].clone(), y[-128:].clone()


@pytest.fixture
def tiny_linear_model():
    """A deterministic tiny classifier over 3x8x8 images (fast, for unit tests)."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    return m.eval()


@pytest.fixture
def runs_dir(tmp_path, monkeypatch) -> Iterator[Path]:
    """A fresh runs folder for this test: ``ENERGYLENS_RUNS`` points at ``tmp_path / "runs"`` (not created; the job
    registry creates it on first use), so the real runs/ folder is never touched. Streamlit's data cache is cleared
    (a page must not show another test's jobs), and jobs the test left running are stopped at the end."""
    d = tmp_path / "runs"
    monkeypatch.setenv("ENERGYLENS_RUNS", str(d))
    if "streamlit" in sys.modules:  # no cache to clear before streamlit is imported
        sys.modules["streamlit"].cache_data.clear()
    yield d
    if d.is_dir():
        from core import jobs

        try:
            for info in jobs.list_jobs(d):
                if info.active:
                    jobs.stop_job(info.id, d, grace=5)
        except Exception:  # noqa: BLE001 - best-effort clean-up; the test's own result stands
            pass
