"""Multi-process training (``torchrun --nproc_per_node 2 -m core.train``) with gloo on the CPU.

What is guaranteed, and tested here:
* the run works through the ordinary CLI and only rank 0 writes files;
* every process holds the same parameters after every step (same start, averaged gradients, same
  optimizer) — but BatchNorm running statistics are per process, since each sees its own half of
  every batch (rank 0's are the ones saved);
* for a model without BatchNorm and a method without random attack noise, 2 processes with half
  batches each give the same weights as 1 process with the whole batch, up to float rounding:
  mean-of-half-means equals the full mean and the augmentation is drawn for the global batch.
  With BatchNorm (batch statistics over 32 instead of 64 images) or an attack's random start
  (drawn per process) the runs legitimately differ, so that is not asserted;
* a non-finite loss on one process stops every process cleanly (no hang, same message).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

COMMON = ["--dataset", "digits", "--batch-size", "64", "--train-limit", "256", "--attack-steps", "1",
          "--eval-samples", "32", "--eval-steps", "1", "--probe-size", "16", "--lr", "0.05", "--device", "cpu",
          "--measure-every", "1"]  # every epoch evaluated (auto would choose the period from timings)

# Entry point for the runs that need to look inside the processes: registers a BatchNorm-free
# architecture, optionally makes the loss NaN on one rank, and dumps each rank's final state.
ENTRY = r'''
import os, sys
import torch
import torch.nn as nn
import core.train as T
import core.training.step as S
from core.models.architectures import ARCHITECTURES


class NoBN(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.net(x)


ARCHITECTURES["nobn-test"] = NoBN
seen = {}
real_allreduce = S._allreduce_grads


def spy(model, world, loss=None):
    seen["model"] = model
    return real_allreduce(model, world, loss)


S._allreduce_grads = spy
nan_rank = os.environ.get("EL_NAN_RANK")
if nan_rank is not None:
    real_loss = S.outer_loss

    def nan_loss(cfg, ln, la, y, *, epoch=0, **kw):
        lt = real_loss(cfg, ln, la, y, epoch=epoch, **kw)
        if epoch == 1 and int(os.environ.get("RANK", 0)) == int(nan_rank):
            lt.loss = lt.loss * float("nan")
        return lt

    S.outer_loss = nan_loss
if __name__ == "__main__":
    rc = T.main(sys.argv[1:])
    if "model" in seen:
        torch.save(seen["model"].state_dict(), os.path.join(os.environ["EL_DUMP"], f"rank{os.environ['RANK']}.pt"))
    sys.exit(rc)
'''


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "CUDA_VISIBLE_DEVICES")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", **extra})
    return env


def _torchrun(args: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=timeout)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture
def entry(tmp_path) -> Path:
    p = tmp_path / "ddp_entry.py"
    p.write_text(ENTRY)
    return p


def test_torchrun_cli_two_processes(tmp_path):
    out = tmp_path / "run"
    p = _torchrun(["-m", "core.train", "--method", "sat", "--epochs", "2", *COMMON, "--out-dir", str(out)])
    assert p.returncode == 0, p.stderr[-4000:]
    summaries = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert len(summaries) == 1 and json.loads(summaries[0])["epoch"] == 2  # rank 1 prints nothing
    recs = _lines(out / "metrics.jsonl")
    assert [r["epoch"] for r in recs] == [1, 2]                          # one line per epoch, not per rank
    assert all(0 <= r["pgd_acc"] <= r["nat_acc"] <= 1 and r["train_loss"] > 0 for r in recs)
    assert _files(out) == {"config.json", "metrics.jsonl", "progress.json", "batches.jsonl", "last.safetensors",
                           "best.safetensors", "state.pt", "probe/epoch_0001.npz", "probe/epoch_0002.npz"}
    steps = [r["step"] for r in _lines(out / "batches.jsonl")]
    assert steps == sorted(set(steps))                                   # the batch log too: rank 0 only


def test_two_processes_equal_one_process_without_batchnorm(tmp_path, entry):
    args = ["--arch", "nobn-test", "--method", "plain", "--epochs", "2", *COMMON]
    dump2 = tmp_path / "dump2"
    dump2.mkdir()
    p2 = _torchrun([str(entry), *args, "--out-dir", str(tmp_path / "two")], env=_env(EL_DUMP=str(dump2)))
    assert p2.returncode == 0, p2.stderr[-4000:]
    p1 = subprocess.run([sys.executable, str(entry), *args, "--out-dir", str(tmp_path / "one")], cwd=REPO,
                        env=_env(EL_DUMP=str(tmp_path)), capture_output=True, text=True, timeout=600)
    assert p1.returncode == 0, p1.stderr[-4000:]

    r0, r1 = torch.load(dump2 / "rank0.pt"), torch.load(dump2 / "rank1.pt")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)                   # replicas stay identical
    two, one = _load(tmp_path / "two" / "last.safetensors"), _load(tmp_path / "one" / "last.safetensors")
    assert all(torch.equal(two[k], r0[k]) for k in two)                 # rank 0 saved its weights
    init = _initial_weights(entry)
    moved = max(float((one[k] - init[k]).abs().max()) for k in one)
    diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    print(f"\n[ddp] max |w_2proc - w_1proc| = {diff:.2e}, max |w - w_init| = {moved:.3f}")
    assert moved > 1e-3                                                 # training changed the weights ...
    assert diff < 1e-3 * moved                                          # ... identically in both set-ups
    for a, b in zip(_lines(tmp_path / "one" / "metrics.jsonl"), _lines(tmp_path / "two" / "metrics.jsonl")):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def _initial_weights(entry: Path) -> dict[str, torch.Tensor]:
    """The untrained weights both runs start from (train() seeds with cfg.seed = 0, then builds)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_ddp_entry", entry)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines NoBN; the run itself is under __main__
    try:
        torch.manual_seed(0)
        return {k: v.detach().clone() for k, v in mod.NoBN(10).state_dict().items()}
    finally:
        mod.S._allreduce_grads = mod.real_allreduce  # undo the spy in this process
        from core.models.architectures import ARCHITECTURES

        ARCHITECTURES.pop("nobn-test", None)


def test_nan_on_one_rank_stops_all_and_ranks_stay_in_sync(tmp_path, entry):
    dump = tmp_path / "dump"
    dump.mkdir()
    out = tmp_path / "run"
    p = _torchrun([str(entry), "--method", "sat", "--epochs", "3", *COMMON, "--out-dir", str(out)],
                  env=_env(EL_DUMP=str(dump), EL_NAN_RANK="1"), timeout=300)
    assert p.returncode != 0
    assert p.stderr.count("error: the loss became nan at epoch 2, batch 1") == 2, p.stderr[-4000:]  # both ranks
    assert [r["epoch"] for r in _lines(out / "metrics.jsonl")] == [1]
    from core.models import read_metadata

    assert read_metadata(out / "last.safetensors").epoch == 1
    r0, r1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    params = [k for k in r0 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(r0[k], r1[k]) for k in params)               # identical replicas
    # BN running statistics are per process: they differ, which also shows the ranks saw different images
    stats = [k for k in r0 if k.endswith("running_mean")]
    assert stats and any(not torch.allclose(r0[k], r1[k]) for k in stats)


def test_batch_not_divisible_by_processes_is_rejected(tmp_path):
    p = _torchrun(["-m", "core.train", "--method", "plain", "--epochs", "1", *COMMON, "--batch-size", "63",
                   "--out-dir", str(tmp_path / "o")], timeout=300)
    assert p.returncode != 0
    assert "batch size 63 must be divisible by the number of processes (2)" in p.stderr
