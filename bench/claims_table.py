"""The verdict each page prints: core.claims.marginal_claim for the four demo models under six attacks.

For cifar10-demo's plain / SAT / TRADES / WEAT-ADV checkpoints, PGD-10, APGD-T, CW, CW-T (targeted CW, random
targets), FAB and Square, with the Attack Lab's default settings (the dataset's ε, 10 steps, step size 2.5·ε/steps,
seed 0, the first ``--n`` images of the seed-0 permutation of the test split, 3 target classes for APGD-T, 300
queries for Square), prints one row per (model, attack): the claim checked, the outcome of the effect-size rule,
d with its 95 % interval, and whether the claim holds -- the sentence the Attack Lab shows, as a table.

    python bench/claims_table.py [--n 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import _util
import torch

from core.attacks import AttackSpec, budget, interactive_batch_size, run_attack
from core.claims import marginal_claim
from core.data import load_dataset
from core.evaluation import default_eps
from core.models import load_checkpoint

MODELS = ("plain", "sat", "trades", "weat-adv")
SQUARE_QUERIES = 300   # the Attack Lab's default (pages/attack_lab.py)
# (label, attack, targeted)
ATTACKS = (("PGD-10", "pgd", False), ("APGD-T", "apgd-t", False), ("CW", "cw", False), ("CW-T", "cw", True),
           ("FAB", "fab", False), ("Square", "square", False))


def attack_lab_spec(name: str, targeted: bool, eps: float) -> AttackSpec:
    """The Attack Lab's defaults for this attack (pages/attack_lab.py's widget defaults)."""
    return AttackSpec(name=name, norm="Linf", eps=eps, steps=SQUARE_QUERIES if name == "square" else 10,
                      step_size=None, targeted=targeted, target_mode="random", target_class=0, seed=0,
                      batch_size=interactive_batch_size(name), kappa=0.0,
                      extra={"targets": budget.INTERACTIVE_TARGETS} if name in budget.TARGETED else {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=128, help="test images (the Attack Lab's draw with seed 0)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--dataset", default="cifar10-demo")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = load_dataset(args.dataset, "test")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:args.n]
    x, y = ds.images(idx), ds.labels(idx)
    rows = []
    for m in MODELS:
        lm = load_checkpoint(_util.REPO / "checkpoints" / f"{args.dataset}-{m}.safetensors")
        meta = lm.meta
        eps = default_eps(meta, "Linf")
        for label, name, targeted in ATTACKS:
            t0 = time.perf_counter()
            res = run_attack(lm.model, x, y, attack_lab_spec(name, targeted, eps))
            c = marginal_claim(res.trace, method=meta.method, source=meta.source, model_name=meta.name)
            sh = c.shift
            rows.append({"model": m, "attack": label, "kind": c.kind or "?", "claim": c.source or "none",
                         "expected": c.expected or "-", "outcome": sh.outcome if sh else "-",
                         "d": sh.d if sh else None, "ci": f"[{sh.lo:+.2f}, {sh.hi:+.2f}]" if sh else "",
                         "holds": {True: "yes", False: "no", None: "-"}[c.holds], "changed": c.n,
                         "rob_acc": float(res.trace.robust_accuracy()), "s": round(time.perf_counter() - t0, 1)})
            print(f"{m:9s} {label:7s} {rows[-1]['outcome']:9s} d={rows[-1]['d']} holds={rows[-1]['holds']}  "
                  f"({rows[-1]['s']} s)\n    {c.text}", flush=True)
    _util.print_table(f"marginal_claim verdicts, {args.dataset}, {args.n} test images, Attack Lab defaults", rows)
    print("written", _util.write_result("claims_table", rows))


if __name__ == "__main__":
    main()
