"""Attack speed: EnergyLens PGD-10 with the energy trace vs torchattacks' PGD-10 (same model, images, batch,
device, eps 8/255, step eps/4, random start) and the trace's own cost, on DemoNet, ResNet-18 and WRN-28-10.

    python bench/bench_attack.py [--reps 5] [--pairs 11] [--arch demonet resnet18 wrn-28-10]

Random-init models in eval mode (speed does not depend on the weights' values), images uniform in [0, 1]; small
batches so that a loaded 2-core CPU gets through (DemoNet 128, ResNet-18 32, WRN-28-10 8 images). Every row is a
ratio time(ours) / time(reference) -- min and median over interleaved repeats (``--reps``) or back-to-back pairs
(``--pairs``, order alternating) -- with the reference's median time beside it:

* vs torchattacks: EnergyLens PGD-10 + trace / torchattacks PGD-10 (no trace; target <= 1/1.2 = 0.83 on the
  ResNets);
* trace cost: PGD-10 + trace / the same PGD-10 without it (target <= 1.05);
* BN folding: PGD-10 + trace / the same with ``fold_bn=False``.

torchattacks is only needed here (``pip install --no-deps torchattacks`` into the venv: its
metadata pins an old ``requests``); without it that row says so.
"""

from __future__ import annotations

import statistics
import time

import _util
import torch

from core.attacks import AttackSpec, run_attack
from core.models import build_model

EPS, STEPS = 8 / 255, 10
SIZES = {"demonet": 128, "resnet18": 32, "wrn-28-10": 8}


def interleaved(cands: dict, reps: int) -> dict[str, list[float]]:
    for fn in cands.values():  # warm-up: folded view built, allocator and oneDNN kernels warm
        fn()
    times: dict[str, list[float]] = {k: [] for k in cands}
    for i in range(reps):
        order = list(cands) if i % 2 == 0 else list(reversed(list(cands)))
        for k in order:
            t0 = time.perf_counter()
            cands[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def row(what: str, arch: str, n: int, ratios: list[float], ref_name: str, ref_times: list[float], target=None,
        note: str = "") -> dict:
    return {"what": what, "model": arch, "images": n, "reference": ref_name,
            "reference_median_s": statistics.median(ref_times), "ratio_min": min(ratios),
            "ratio_median": statistics.median(ratios), "repeats": len(ratios), "target": target, "note": note}


def main() -> None:
    ap = _util.bench_parser(5, __doc__)
    ap.add_argument("--pairs", type=int, default=11, help="back-to-back pairs for the trace cost")
    ap.add_argument("--arch", nargs="*", default=list(SIZES))
    args = ap.parse_args()
    dev = torch.device(args.device)
    try:
        import torchattacks  # lazy: optional, benchmark only
    except ImportError:
        torchattacks = None
        print("torchattacks is not installed: the comparison with it is skipped "
              "(pip install --no-deps torchattacks)")
    rows = []
    for arch in args.arch:
        torch.manual_seed(0)
        model = build_model(arch, 10).to(dev).eval()
        n = SIZES.get(arch, 32)
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(n, 3, 32, 32, generator=g).to(dev), torch.randint(0, 10, (n,), generator=g).to(dev)
        spec = AttackSpec("pgd", eps=EPS, step_size=EPS / 4, steps=STEPS, batch_size=n, seed=0)
        ours = lambda: run_attack(model, x, y, spec)  # noqa: E731
        cands = {"ours": ours, "no_fold": lambda: run_attack(model, x, y, spec, fold_bn=False)}
        if torchattacks is not None:
            ta = torchattacks.PGD(model, eps=EPS, alpha=EPS / 4, steps=STEPS, random_start=True)
            cands["torchattacks"] = lambda: ta(x, y)
        print(f"{arch}, {n} images ...", flush=True)
        t = interleaved(cands, args.reps)
        r = lambda a, b: [p / q for p, q in zip(t[a], t[b])]  # noqa: E731  (same repeat, back to back)
        if torchattacks is not None:
            rows.append(row("EnergyLens PGD-10 + trace vs torchattacks PGD-10", arch, n, r("ours", "torchattacks"),
                            "torchattacks PGD-10 (no trace)", t["torchattacks"],
                            target="<= 0.83" if arch != "demonet" else None))
        else:
            rows.append({"what": "EnergyLens PGD-10 + trace vs torchattacks PGD-10", "model": arch, "images": n,
                         "note": "skipped: torchattacks is not installed (pip install --no-deps torchattacks)"})
        rows.append(row("BN folding on vs off (both + trace)", arch, n, r("ours", "no_fold"),
                        "EnergyLens PGD-10 + trace, fold_bn=False", t["no_fold"]))
        # the trace costs a few % while this machine's speed drifts by more between repetitions: back-to-back pairs
        pr = _util.paired_ratios(ours, lambda: run_attack(model, x, y, spec, record_trace=False), args.pairs)
        rows.append(row("trace cost: PGD-10 + trace vs PGD-10 without it", arch, n, pr,
                        "EnergyLens PGD-10, no trace", [statistics.median(t["ours"]) / statistics.median(pr)],
                        target="<= 1.05"))
        _util.print_table(f"{arch}", rows[-3:])
    _util.print_table("Attack benchmark (ratio: time(ours) / time(reference); < 1 means ours is faster)", rows)
    print("written", _util.write_result("attack", rows, {"settings": {"eps": EPS, "step_size": EPS / 4, "steps": STEPS,
                                                                      "images": SIZES, "reps": args.reps,
                                                                      "pairs": args.pairs}}))


if __name__ == "__main__":
    main()
