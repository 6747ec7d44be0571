"""Energy landscape and embedding-map speed on CPU, plus the Fig. 4 evidence for the bundled models.

* landscape (Fig. 4): 3 bundled models x 512 images, PGD-10 at the dataset's epsilon, cold (no cache)
  and again from the disk cache. Target: < 20 s cold on CPU. The digits test split has only 359
  images, so the 512 are drawn from the training split.
* PCA map of 2,000 points: penultimate features of the 1,797 digits images plus 203 adversarial ones,
  then ``pca_2d``. Target: < 2 s.
* evidence: for every bundled model, mean |Delta E(x)| and its spread against robust accuracy on the
  full digits test set (does Delta E shrink as robustness grows?).

    python bench/bench_landscape.py [--n 512] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import _util  # noqa: F401  (puts the repo on sys.path)
import torch

from core import analysis
from core.attacks import AttackSpec
from core.data import load_dataset
from core.models.registry import list_bundled, load_model_ref


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    refs = [r for r, m, _ in list_bundled() if m is not None]
    models = [load_model_ref(r) for r in refs]
    if len(models) < 3:
        print(f"note: only {len(models)} bundled models; the landscape timing uses those")
    three = models[:3]
    spec = AttackSpec("pgd", eps=16 / 255, steps=10, seed=0, batch_size=128)
    rows = []

    # ---- landscape, cold and cached
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        analysis.landscape(three, n=args.n, seed=0, split="train", spec=spec, cache_dir=cache)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = analysis.landscape(three, n=args.n, seed=0, split="train", spec=spec, cache_dir=cache)
        warm = time.perf_counter() - t0
        assert all(r.cached for r in res)
    rows.append({"task": f"landscape {len(three)} models x {args.n} (PGD-10, cold)", "seconds": cold, "target_s": 20.0,
                 "ok": cold < 20.0})
    rows.append({"task": f"landscape {len(three)} models x {args.n} (disk cache)", "seconds": warm, "target_s": 1.0,
                 "ok": warm < 1.0})

    # ---- PCA map of 2000 points
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    x = torch.cat([tr.images(), te.images()])  # 1,797 natural images ...
    from core.attacks import run_attack

    extra = 2000 - len(x)  # ... + adversarial versions of the first ones, as the embedding page shows them
    x = torch.cat([x, run_attack(models[0].model, x[:extra], torch.cat([tr.labels(), te.labels()])[:extra], spec,
                                 record_trace=False).x_adv])
    t0 = time.perf_counter()
    feats = analysis.extract_features(models[0].model, x)
    t1 = time.perf_counter()
    z = analysis.pca_2d(feats)
    t2 = time.perf_counter()
    assert z.shape == (2000, 2)
    rows.append({"task": f"PCA map of 2000 points (features {feats.shape[1]}-d + PCA)", "seconds": t2 - t0,
                 "target_s": 2.0, "ok": t2 - t0 < 2.0})
    rows.append({"task": "pca_2d alone (2000 points)", "seconds": t2 - t1, "target_s": 2.0, "ok": t2 - t1 < 2.0})
    _util.print_table("Landscape / embedding speed", rows)

    # ---- Fig. 4 evidence on the full test set, every bundled model
    ev_res = analysis.landscape(models, n=len(te), seed=0, split="test", spec=spec)
    table = analysis.landscape_table(ev_res)
    trend = analysis.robustness_trend(ev_res)
    evidence = [{"model": r["model"], "method": r["method"], "natural_acc": r["natural_acc"],
                 "robust_acc": r["robust_acc"], "mean_dE": r["dE_mean"], "mean_abs_dE": r["dE_abs_mean"],
                 "std_dE": r["dE_std"], "iqr_dE": r["dE_iqr"], "mean_dEy": r["dEy_mean"], "std_dEy": r["dEy_std"]}
                for r in table]
    _util.print_table(f"Fig. 4 evidence: digits test set ({len(te)} images), PGD-10 eps 16/255, sorted by robust acc.",
                      evidence)
    print(f"\nSpearman(robust acc, mean |dE(x)|) = {trend['dE_abs_mean']['spearman']:+.3f}; "
          f"Spearman(robust acc, std dE(x)) = {trend['dE_std']['spearman']:+.3f} over {trend['n_models']} models")
    path = _util.write_result("landscape", rows, {"evidence": evidence, "trend": trend})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
