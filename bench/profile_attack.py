"""Where the time of PGD-10 + energy trace goes: torch.profiler's top CPU ops, per architecture.

    python bench/profile_attack.py [--arch resnet18 wrn-28-10 demonet] [--n 32] [--top 12]

Prints, for each architecture, EnergyLens' run_attack (trace on) and torchattacks' PGD (when installed) side by
side: the ops with the largest self CPU time. Random-init models (eval mode); images uniform in [0, 1].
"""

from __future__ import annotations

import argparse

import _util  # noqa: F401  (puts the repo on sys.path)
import torch
from torch.profiler import ProfilerActivity, profile

from core.attacks import AttackSpec, run_attack
from core.models import build_model

EPS, STEPS = 8 / 255, 10
SIZES = {"demonet": 128, "resnet18": 32, "wrn-28-10": 8}


def top_ops(fn, top: int) -> str:
    fn()  # warm-up (folding view built, allocator warm)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", nargs="*", default=list(SIZES))
    ap.add_argument("--n", type=int, default=None, help="images (default: per architecture)")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    for arch in args.arch:
        torch.manual_seed(0)
        model = build_model(arch, 10).eval()
        n = args.n or SIZES.get(arch, 32)
        x, y = torch.rand(n, 3, 32, 32), torch.randint(0, 10, (n,))
        spec = AttackSpec("pgd", eps=EPS, step_size=EPS / 4, steps=STEPS, batch_size=n, seed=0)
        print(f"\n===== {arch}, {n} images: EnergyLens PGD-{STEPS} + trace")
        print(top_ops(lambda: run_attack(model, x, y, spec), args.top))
        try:
            import torchattacks  # lazy: optional, benchmark only
        except ImportError:
            print("torchattacks not installed: pip install --no-deps torchattacks")
            continue
        ta = torchattacks.PGD(model, eps=EPS, alpha=EPS / 4, steps=STEPS, random_start=True)
        print(f"\n===== {arch}, {n} images: torchattacks PGD-{STEPS}")
        print(top_ops(lambda: ta(x, y), args.top))


if __name__ == "__main__":
    main()
