"""Where SGLD should stop: FID, IS and within-class diversity of SGLD samples along the chain, per initialisation,
without and with the stopping rule (stop each chain where E(x, y) reaches its class's Ē(x, y)).

The bundled cifar10-demo SAT model generates (η, ζ, γ at core's defaults); the class statistics and Ē(x, y) come
from the demo's training images; FID / IS use the *plain* demo model's penultimate features and logits, against the
held-out test split (never seen by either model). ``--chains`` chains per class x 10 classes per initialisation.

    python bench/sgld_stop.py [--chains 8] [--steps 25 50 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import _util
import numpy as np
import torch

from core import sampling
from core.data import load_dataset
from core.metrics import ClassifierFeatures, fid_from_features, inception_score_from_logits, real_fid_floor
from core.models import load_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100])
    ap.add_argument("--inits", nargs="+", default=list(sampling.INITS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ck = _util.REPO / "checkpoints"
    gen = load_checkpoint(ck / "cifar10-demo-sat.safetensors")
    scorer = load_checkpoint(ck / "cifar10-demo-plain.safetensors")
    train, test = load_dataset("cifar10-demo", "train"), load_dataset("cifar10-demo", "test")
    classes = list(range(int(gen.meta.num_classes)))
    stats = sampling.ClassStats(train)
    ref = sampling.reference_energies(gen, train, classes)
    ext = ClassifierFeatures(scorer.model, scorer.meta.name, "cpu")
    f_real, _ = ext.extract(test.images(torch.arange(len(test))))
    n_fake = args.chains * len(classes)
    floor, floor_n = real_fid_floor(f_real, n_fake, args.seed)
    div_real = sampling.within_class_diversity(test.x, test.y)["mean"]
    d = sampling.sgld_defaults(gen)
    print(f"defaults {d}; Ē(x,y) per class {[round(ref[c]['joint'], 2) for c in classes]}")
    print(f"real test images: within-class diversity {div_real:.2f}; FID real vs real at n = {floor_n}: {floor:.2f}")
    rows = []

    def score(x, y, init, rule, steps, extra=None):
        f, lg = ext.extract(x)
        is_m, _ = inception_score_from_logits(lg, splits=1)
        rows.append({"init": init, "rule": rule, "steps": steps, "FID": fid_from_features(f_real, f), "IS": is_m,
                     "diversity": sampling.within_class_diversity(x, y)["mean"], "real_div": div_real,
                     **(extra or {})})
        print(rows[-1], flush=True)

    for init in args.inits:
        t0 = time.perf_counter()
        s = sampling.SGLDSampler(gen, classes, args.chains, init=init, seed=args.seed, stats=stats,
                                 stop_at_reference=False)
        y = s.labels.cpu()
        score(s.images(), y, init, "start", 0)
        done = 0
        for k in sorted(args.steps):
            s.step(k - done)
            done = k
            p = s.trace.passed_reference(ref)
            gap = float(s.trace.reference_gap(ref)[-1])
            score(s.images(), y, init, "no stop", k, {"mean E-Ē": gap, "mean crossed at": p["step"]})
        # per-chain crossing steps of the unstopped run (what the rule will use)
        tr = s.trace
        level = np.array([ref[int(c)]["joint"] for c in tr.labels])
        below = tr.joint <= level[None, :]
        first = np.where(below.any(axis=0), tr.steps[below.argmax(axis=0)], -1)
        print(f"{init}: per-chain crossing step median {np.median(first[first >= 0]) if (first >= 0).any() else None}"
              f", {int((first >= 0).sum())}/{len(first)} chains cross within {done} steps", flush=True)
        for cap in sorted(args.steps):
            r = sampling.SGLDSampler(gen, classes, args.chains, init=init, seed=args.seed, stats=stats,
                                     reference=ref, stop_at_reference=True)
            out = r.step(cap)
            rep = r.stop_report()
            score(r.images(), y, init, f"stop at Ē (cap {cap})", out.steps_done,
                  {"stopped": f"{rep['stopped']}/{rep['n_chains']}", "median stop": rep["median_step"],
                   "mean E-Ē": float(r.trace.reference_gap(ref)[-1])})
        print(f"{init}: {time.perf_counter() - t0:.0f} s", flush=True)
    _util.print_table(f"SGLD on cifar10-demo (SAT generator, plain features vs {len(test)} test images, "
                      f"{n_fake} samples; real within-class diversity {div_real:.2f}, FID floor {floor:.2f})", rows)
    print("written", _util.write_result("sgld_stop", rows, {"real_diversity": div_real, "fid_floor": floor}))


if __name__ == "__main__":
    main()
