"""Training speed and logging overhead.

    python bench/bench_train.py [--reps 3] [--device cpu|cuda] [--quick]

(a) steps/s of WEAT_ADV and TRADES through ``core.train.train_step`` (attack in eval mode, train-mode
    forwards, outer loss, backward, SGD) vs ``reference_official_loop.reference_step`` (the
    official code's structure: natural logits recomputed at every attack step, fp32) — same model,
    weights, batch, device, attack (10 KL sign steps, eps 8/255, step 2/255); median of ``--reps``
    timed steps after one warm-up step, for smallcnn and resnet18.
(b) the per-epoch cost of what EnergyLens adds to an epoch — the Delta E probe attack, metric
    statistics, probe snapshot, metrics line — measured inside a real ``core.train.train`` epoch
    (TRADES, 2,048 CIFAR images: the shared real subset when present, else random CIFAR-shaped
    data; the default probe size -- auto, 3% of the training set -- and the former fixed 256), as a % of
    that epoch's time; the per-epoch PGD validation and the
    checkpoints, which the official code has too, are reported separately. Target < 5 %.
(c) CUDA only: bf16 autocast + channels_last through ``train_step`` vs the fp32 reference loop
    (target >= 2x), ResNet-18 at batch 128 and 512, with the peak GPU memory of a step and the model FLOP
    utilisation (FLOPs of a step from torch's FlopCounterMode / time / the device's dense bf16 peak); on a
    machine without a GPU it prints "skipped: no GPU". (a) reports the achieved GFLOP/s too.

Results go to bench/results/train.json (device, torch version, date included).
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import _util
import numpy as np
import torch

import core.train as T
from core.attacks import AttackSpec
from core.losses import method_config
from core.models import build_model
from reference_official_loop import reference_step

EPS, STEP, STEPS, BETA = 8 / 255, 2 / 255, 10, 6.0
SHARED = _util.REPO.parent / "shared" / "data" / "cifar10_train_subset.npz"


def _batch(n: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if SHARED.is_file():
        with np.load(SHARED) as d:
            x = torch.from_numpy(d["x"][:n]).float() / 255
            y = torch.from_numpy(d["y"][:n])
    else:
        x, y = torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    return x.to(device), y.to(device)


def _time_steps(step_fn, reps: int) -> float:
    step_fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step_fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _ours(model, method: str, x, y, *, amp=False, channels_last=False):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    lcfg = method_config(method)
    spec = AttackSpec("pgd", eps=EPS, step_size=STEP, steps=STEPS, random_start=True)
    g = torch.Generator().manual_seed(0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        model.train()
        T.train_step(model, opt, lcfg, x, y, spec, generator=g, amp=amp)
    return step


def _reference(model, method: str, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)

    def step():
        model.train()
        reference_step(model, opt, x, y, loss=method, beta=BETA, eps=EPS, step_size=STEP, steps=STEPS, generator=g)
    return step


def step_setups(device, batches: dict[str, int]):
    """(arch, batch, freshly initialised model (seed 0), images, labels) for each architecture."""
    for arch, bs in batches.items():
        torch.manual_seed(0)
        yield (arch, bs, build_model(arch, 10).to(device), *_batch(bs, device))


def bench_steps(device, reps: int, batches: dict[str, int]) -> list[dict]:
    rows = []
    for arch, bs, base, x, y in step_setups(device, batches):
        for method in ("weat-adv", "trades"):
            ours = _ours(copy.deepcopy(base), method, x, y)
            t_ours = _time_steps(ours, reps)
            flops = step_flops(base, x)
            t_ref = _time_steps(_reference(copy.deepcopy(base), method, x, y), reps)
            rows.append({"arch": arch, "method": method, "batch": bs, "ours_steps_per_s": 1 / t_ours,
                         "reference_steps_per_s": 1 / t_ref, "speedup": t_ref / t_ours,
                         "ours_gflops_per_s": flops / t_ours / 1e9})
            print(f"  {arch:9s} {method:9s} batch {bs:4d}: ours {1 / t_ours:7.3f} steps/s, reference "
                  f"{1 / t_ref:7.3f} steps/s, ratio {t_ref / t_ours:.2f}x", flush=True)
    return rows


class _Timer:
    """Accumulates the wall time spent in wrapped functions of core.train during one run."""

    def __init__(self):
        self.t: dict[str, float] = {}

    def wrap(self, name: str, key: str, owner=None):
        owner = T if owner is None else owner
        real = getattr(owner, name)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return real(*a, **kw)
            finally:
                self.t[key] = self.t.get(key, 0.0) + time.perf_counter() - t0
        setattr(owner, name, timed)
        return real


def bench_overhead(device, arch: str, n: int, probe_size: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        x, y = _batch(n, "cpu")
        path = Path(tmp) / "data.npz"
        np.savez(path, x=(x * 255).round().to(torch.uint8).numpy(), y=y.numpy())
        cfg = T.TrainConfig(method="trades", dataset=f"npz:{path}", arch=arch, epochs=1, batch_size=128,
                            eps=EPS, step_size=STEP, attack_steps=STEPS, eval_steps=20, eval_samples=256,
                            probe_size=probe_size, val_fraction=0.05, out_dir=str(Path(tmp) / "run"),
                            device=str(device))
        timer = _Timer()
        originals = {name: timer.wrap(name, key) for name, key in (
            ("evaluate", "pgd_validation"), ("probe_energies", "probe_attack"), ("_stats", "statistics"),
            ("save_checkpoint", "checkpoints"), ("atomic_torch_save", "checkpoints"), ("_write_progress", "progress_file"))}
        # the run folder's own writes (core.rundir.RunDir): the metrics line and the probe snapshot
        from core.rundir import RunDir

        run_originals = {name: timer.wrap(name, key, owner=RunDir) for name, key in (
            ("append_metrics", "metrics_line"), ("write_probe", "probe_snapshot"))}
        try:
            t0 = time.perf_counter()
            rec = T.train(cfg)
            total = time.perf_counter() - t0
        finally:
            for name, real in originals.items():
                setattr(T, name, real)
            for name, real in run_originals.items():
                setattr(RunDir, name, real)
    ours = sum(timer.t.get(k, 0.0) for k in ("probe_attack", "statistics", "probe_snapshot", "metrics_line"))
    n_train = n - max(1, int(n * 0.05))
    per_sample = rec["train_time"] / ((n_train // 128) * 128)
    row = {"arch": arch, "train_images": n_train, "probe_size": rec["probe_size"],
           "probe_size_setting": "auto" if probe_size is None else probe_size, "epoch_s": total,
           "train_s": rec["train_time"], **{f"{k}_s": v for k, v in sorted(timer.t.items())},
           "energylens_overhead_s": ours, "energylens_overhead_pct": 100 * ours / total,
           "pgd_validation_pct": 100 * timer.t.get("pgd_validation", 0.0) / total,
           # same probe cost on a full CIFAR-10 epoch (50,000 images, same per-image training cost)
           "overhead_pct_at_50k_images": 100 * ours / (per_sample * 50_000 + ours)}
    return row


# dense bf16 tensor-core peaks (TFLOP/s) for model FLOP utilisation; other devices report achieved TFLOP/s only
PEAK_BF16_TFLOPS = {"H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0,
                    "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0, "4090": 165.0}


def step_flops(model, x) -> float:
    """Model FLOPs of one TRADES / WEAT_ADV step on batch ``x``, the usual MFU convention.

    F = FLOPs of one forward (torch's FlopCounterMode; it cannot follow the attack's autograd.grad, so the
    step is composed): the KL attack's natural forward (F) + 10 steps of forward and input-gradient
    backward (2F each) + the natural and adversarial training forwards with full backward (3F each) = 27F.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    model.train(was)
    return float(fc.get_total_flops()) * (1 + 2 * STEPS + 2 * 3)


def bench_amp(device, reps: int, batch: int) -> list[dict]:
    rows = []
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    for arch in ("resnet18",):
        torch.manual_seed(0)
        base = build_model(arch, 10).to(device)
        for bs in (batch, 512):
            x, y = _batch(bs, device)
            for method in ("weat-adv", "trades"):
                fast = copy.deepcopy(base).to(memory_format=torch.channels_last)
                step = _ours(fast, method, x, y, amp=True, channels_last=True)
                torch.cuda.reset_peak_memory_stats(device)
                t_fast = _time_steps(step, reps)
                peak_mem = torch.cuda.max_memory_allocated(device) / 2 ** 30
                flops = step_flops(base, x)
                t_ref = _time_steps(_reference(copy.deepcopy(base), method, x, y), reps)
                tflops = flops / t_fast / 1e12
                rows.append({"arch": arch, "method": method, "batch": bs, "bf16_cl_steps_per_s": 1 / t_fast,
                             "reference_fp32_steps_per_s": 1 / t_ref, "speedup": t_ref / t_fast,
                             "peak_gpu_mem_gib": peak_mem, "achieved_tflops": tflops,
                             "mfu": tflops / peak if peak else None})
                print(f"  {arch} {method} batch {bs}: bf16+channels_last {1 / t_fast:.2f} steps/s vs fp32 reference "
                      f"{1 / t_ref:.2f} steps/s: {t_ref / t_fast:.2f}x (target >= 2x); peak GPU memory "
                      f"{peak_mem:.2f} GiB; {tflops:.1f} TFLOP/s" + (f" = MFU {tflops / peak:.1%} of {peak:.0f}"
                                                                    if peak else ""), flush=True)
    return rows


def step_batches(device: torch.device, quick: bool = False) -> dict[str, int]:
    """Batch size per architecture for step timings (ResNet-18 TRADES at 128 takes minutes per step on a CPU)."""
    if device.type == "cuda":
        return {"smallcnn": 128, "resnet18": 128}
    return {"smallcnn": 32 if quick else 128, "resnet18": 4 if quick else 8}


def main() -> None:
    ap = _util.bench_parser(3)
    ap.add_argument("--quick", action="store_true", help="smaller batches / dataset (a smoke run)")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batches = step_batches(device, args.quick)
    extra: dict = {"settings": {"eps": EPS, "step_size": STEP, "attack_steps": STEPS, "beta": BETA,
                                "reps": args.reps, "real_cifar": SHARED.is_file()}}

    print("(a) training step: core.train.train_step vs the official-style reference loop (fp32)")
    rows = bench_steps(device, args.reps, batches)

    print("(b) per-epoch overhead of Delta E probing + metrics logging inside core.train.train")
    arch_b = "resnet18" if gpu else "smallcnn"  # a resnet18 epoch over 2,048 images takes ~1 h on this CPU
    extra["overhead"] = []
    for probe in (None, 256):  # the default (auto) and the former fixed default
        ov = bench_overhead(device, arch_b, 512 if args.quick else 2048, probe)
        print(f"  {ov['arch']}, {ov['train_images']} training images, probe {ov['probe_size_setting']} = "
              f"{ov['probe_size']} images: epoch {ov['epoch_s']:.1f} s (training {ov['train_s']:.1f} s, PGD-20 "
              f"validation {ov.get('pgd_validation_s', 0):.1f} s, checkpoints {ov.get('checkpoints_s', 0):.2f} s)")
        print(f"    EnergyLens additions (probe attack {ov.get('probe_attack_s', 0):.2f} s, statistics "
              f"{ov.get('statistics_s', 0):.3f} s, snapshot {ov.get('probe_snapshot_s', 0):.3f} s, metrics line "
              f"{ov.get('metrics_line_s', 0):.3f} s) = {ov['energylens_overhead_pct']:.1f} % of the epoch (target "
              f"< 5 %); {ov['overhead_pct_at_50k_images']:.2f} % for a 50,000-image epoch with this probe")
        extra["overhead"].append(ov)

    print("(c) bf16 autocast + channels_last vs the fp32 reference loop")
    if gpu:
        extra["amp"] = bench_amp(device, args.reps, 128)
    else:
        print("  skipped: no GPU")
        extra["amp"] = "skipped: no GPU"

    path = _util.write_result("train", rows, extra)
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
