"""Each training fast path of this device, measured off and on, side by side in one process.

    python bench/bench_fastpaths.py [--reps 5] [--device cpu|cuda] [--no-compile]

* BatchNorm folding of the inner attack (core.models.folding): ``core.train.train_step`` with the folded
  view vs with the module as it is (TRADES and SAT, smallcnn batch 128 / resnet18 batch 8 on a CPU).
* torch.compile of the training forwards (``--compile``): eager vs compiled steps/s after compiling
  (compile time reported separately).
* Background batch loading (``--loader-workers``): the training part of a real epoch (TRADES, smallcnn,
  2,048 CIFAR images: the shared real subset when present) with 0 vs 2 loader threads.

Medians of interleaved repetitions after warm-up. Results: bench/results/fastpaths.json.
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
from bench_train import EPS, STEP, STEPS, _batch, step_batches, step_setups
from core.attacks import AttackSpec
from core.losses import method_config
from core.models import build_model


def _step_fn(model, method, x, y, *, fold=True, net=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    lcfg = method_config(method)
    spec = AttackSpec("pgd", eps=EPS, step_size=STEP, steps=STEPS, random_start=True)
    g = torch.Generator().manual_seed(0)

    def step():
        model.train()
        real = T.folded
        if not fold:
            T.folded = lambda m, *a, **k: m  # the module as it is
        try:
            T.train_step(model, opt, lcfg, x, y, spec, generator=g, net=net)
        finally:
            T.folded = real
    return step


def bench_folding(device, reps, batches) -> list[dict]:
    rows = []
    for arch, bs, base, x, y in step_setups(device, batches):
        for method in ("trades", "sat"):
            t = _util.interleaved_medians({
                "off": _step_fn(copy.deepcopy(base), method, x, y, fold=False),
                "on": _step_fn(copy.deepcopy(base), method, x, y, fold=True)}, reps=reps)
            rows.append({"fast path": "BatchNorm folding (inner attack)", "setting": f"{arch} {method} batch {bs}",
                         "off_s": t["off"], "on_s": t["on"], "speedup": t["off"] / t["on"]})
            print(f"  folding {arch} {method} batch {bs}: {t['off']:.3f} s -> {t['on']:.3f} s per step "
                  f"({t['off'] / t['on']:.2f}x)", flush=True)
    return rows


def bench_compile(device, reps) -> list[dict]:
    torch.manual_seed(0)
    base = build_model("smallcnn", 10).to(device)
    x, y = _batch(128, device)
    m_c = copy.deepcopy(base)
    net = T.CompiledForward(m_c)
    t0 = time.perf_counter()
    _step_fn(m_c, "trades", x, y, net=net)()  # compiles
    compile_s = time.perf_counter() - t0
    t = _util.interleaved_medians({"off": _step_fn(copy.deepcopy(base), "trades", x, y),
                                   "on": _step_fn(m_c, "trades", x, y, net=net)}, reps=reps)
    row = {"fast path": "torch.compile (training forwards)", "setting": f"smallcnn trades batch 128 ({net.note})",
           "off_s": t["off"], "on_s": t["on"], "speedup": t["off"] / t["on"], "compile_s": compile_s}
    print(f"  compile: {t['off']:.3f} s -> {t['on']:.3f} s per step ({t['off'] / t['on']:.2f}x) after "
          f"{compile_s:.0f} s of compiling; {net.note}", flush=True)
    return [row]


def bench_loader(device, reps) -> list[dict]:
    x, y = _batch(2048, "cpu")
    times: dict[int, list[float]] = {0: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.npz"
        np.savez(path, x=(x * 255).round().to(torch.uint8).numpy(), y=y.numpy())
        for r in range(reps):
            for w in (0, 2) if r % 2 == 0 else (2, 0):
                cfg = T.TrainConfig(method="trades", dataset=f"npz:{path}", arch="smallcnn", epochs=1, batch_size=128,
                                    eps=EPS, step_size=STEP, attack_steps=STEPS, eval_steps=1, eval_samples=32,
                                    probe_size=16, val_fraction=0.05, loader_workers=w, device=str(device),
                                    out_dir=str(Path(tmp) / f"run{w}_{r}"))
                times[w].append(T.train(cfg)["train_time"])
    off, on = float(np.median(times[0])), float(np.median(times[2]))
    print(f"  loader: epoch training {off:.2f} s (inline) -> {on:.2f} s (2 threads): {off / on:.3f}x", flush=True)
    return [{"fast path": "background batch loading", "setting": "smallcnn trades, 1,945 images, 0 vs 2 threads",
             "off_s": off, "on_s": on, "speedup": off / on}]


def main() -> None:
    ap = _util.bench_parser(5)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (it compiles for ~30 s on a CPU)")
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = bench_folding(device, args.reps, step_batches(device))
    if not args.no_compile:
        rows += bench_compile(device, args.reps)
    rows += bench_loader(device, max(2, args.reps // 2))
    _util.print_table("Fast paths, off vs on (speedup > 1: the fast path helps)", rows)
    print("written", _util.write_result("fastpaths", rows))


if __name__ == "__main__":
    main()
