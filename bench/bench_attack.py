"""Attack Lab speed: PGD-10 with the energy trace vs the same attack without it, vs torchattacks'
PGD and pyautoattack's APGD-CE at equal iterations — same model, images, batch, device, in one run.
The BatchNorm-folding fast path (core.models.folding) is measured on and off.

    python bench/bench_attack.py [--n 256] [--reps 5]

torchattacks is only needed here: `pip install --no-deps torchattacks` (its metadata pins an old
`requests`; --no-deps avoids downgrading it). Missing references are reported as skipped.
"""

from __future__ import annotations

import argparse

import _util  # noqa: F401  (puts the repo on sys.path)
import torch

from core.attacks import AttackSpec, run_attack
from core.data import load_dataset
from core.models import build_model, load_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=21, help="back-to-back pairs for the trace overhead")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    ds = load_dataset("digits", "test")
    n = min(args.n, len(ds))
    x, y = ds.images(torch.arange(n)).to(dev), ds.labels(torch.arange(n)).to(dev)
    eps, steps = 16 / 255, 10
    alpha = 2.5 * eps / steps
    models = {"bundled smallcnn (digits-plain)": load_checkpoint(_util.REPO / "checkpoints/digits-plain.safetensors").model}
    torch.manual_seed(0)
    models["resnet18 (random init, 16 images)"] = build_model("resnet18", 10).eval()
    rows = []
    for mname, model in models.items():
        model = model.to(dev).eval()
        xs, ys = (x, y) if "resnet" not in mname else (x[:16], y[:16])
        spec = AttackSpec("pgd", eps=eps, steps=steps, step_size=alpha, batch_size=len(xs), seed=0)
        cands = {
            "EnergyLens PGD-10 + trace": lambda: run_attack(model, xs, ys, spec),
            "EnergyLens PGD-10, no trace": lambda: run_attack(model, xs, ys, spec, record_trace=False),
            "EnergyLens PGD-10 + trace, BN folding off": lambda: run_attack(model, xs, ys, spec, fold_bn=False),
        }
        try:
            import torchattacks

            ta = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
            cands["torchattacks PGD-10 (no trace)"] = lambda: ta(xs, ys)
        except ImportError:
            rows.append({"model": mname, "method": "torchattacks PGD-10", "median_s": None,
                         "note": "skipped: pip install --no-deps torchattacks"})
        from pyautoattack.autopgd_base import APGDAttack

        apgd = APGDAttack(model, n_iter=steps, norm="Linf", eps=eps, loss="ce", n_restarts=1, seed=0, device=dev)
        cands["pyautoattack APGD-CE-10 (no trace)"] = lambda: apgd.perturb(xs, ys)
        times = _util.interleaved_medians(cands, reps=args.reps)
        ref = times["EnergyLens PGD-10 + trace"]
        for k, t in times.items():
            rows.append({"model": mname, "images": len(xs), "method": k, "median_s": t,
                         "speed vs ours+trace": t / ref})
        # the trace's cost is a few % while this machine's speed drifts by more between repetitions: measure
        # it as the median ratio of back-to-back pairs (with / without), not as a difference of medians
        pr = _util.paired_ratio(cands["EnergyLens PGD-10 + trace"], cands["EnergyLens PGD-10, no trace"],
                                pairs=args.pairs)
        rows.append({"model": mname, "images": len(xs), "method": "trace overhead (paired)",
                     "median_s": ref - ref / pr["median"], "speed vs ours+trace": None,
                     "note": f"{100 * (pr['median'] - 1):+.1f}% (quartiles {100 * (pr['q25'] - 1):+.1f}% .. "
                             f"{100 * (pr['q75'] - 1):+.1f}%, {args.pairs} pairs; target < 10%)"})
    _util.print_table("Attack benchmark (speed column: reference time / ours; > 1 means ours is faster)", rows)
    print("written", _util.write_result("attack", rows))


if __name__ == "__main__":
    main()
