"""A measured SAT epoch of the trainer vs a minimal hand-written loop, side by side in one run (issue 25).

    python bench/bench_epoch.py [--epochs 8] [--reps 3] [--images 1024]

Both: DemoNet (width 32), SAT (PGD-5 cross-entropy, eps 8/255, step eps/4, random start, eval-mode attack),
batch 128, the first ``--images`` cifar10-demo training images, no augmentation, SGD (lr 0.1, momentum 0.9,
weight decay 5e-4) at a constant learning rate, this process's threads.

* reference: the hand loop -- shuffle, PGD-5, a train-mode forward / backward, SGD step; nothing else.
* ours: ``core.train.train`` for ``--epochs`` epochs with its defaults for everything it measures: the held-out
  evaluation (PGD-20 on the 500 cifar10-demo test images) every k epochs and at the last, k chosen automatically
  (``measure_every`` unset: measuring at most 25% of an epoch), the probe Delta E every epoch, metrics, checkpoints.
  Timed as the whole call (setup included), divided by the epochs.

The two alternate (interleaved repeats); each row gives time(ours) / time(hand loop) as the min and median over
the repeats' paired ratios. Rows: the whole trainer epoch (the target: <= 1.3x), its training part alone, and,
from the same runs' records, an epoch that would evaluate every epoch (measure_every=1).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import _util
import torch
import torch.nn.functional as F

from core.data import load_dataset
from core.models import build_model
from core.train import TrainConfig, train

EPS, STEPS, BATCH, LR = 8 / 255, 5, 128, 0.1


def hand_loop(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0) -> float:
    """The minimal SAT loop; returns its wall time (model built and data in memory beforehand)."""
    torch.manual_seed(seed)
    model = build_model("demonet", 10)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    alpha, n = EPS / 4, len(y)
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(n)
        for b in range(n // BATCH):
            idx = perm[b * BATCH:(b + 1) * BATCH]
            xb, yb = x[idx], y[idx]
            model.eval()
            xa = (xb + (torch.rand_like(xb) * 2 - 1) * EPS).clamp(0, 1)
            for _ in range(STEPS):
                xa.requires_grad_(True)
                (g,) = torch.autograd.grad(F.cross_entropy(model(xa), yb), xa)
                xa = torch.min(torch.max(xa.detach() + alpha * g.sign(), xb - EPS), xb + EPS).clamp(0, 1)
            model.train()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xa), yb).backward()
            opt.step()
    return time.perf_counter() - t0


def trainer(images: int, epochs: int, out: Path) -> tuple[float, list[dict]]:
    cfg = TrainConfig(method="sat", dataset="cifar10-demo", arch="demonet", epochs=epochs, batch_size=BATCH,
                      train_limit=images, attack_steps=STEPS, eps=EPS, augment=False, lr=LR, schedule="constant",
                      out_dir=str(out))
    t0 = time.perf_counter()
    train(cfg)
    total = time.perf_counter() - t0
    recs = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines() if s.strip()]
    return total, recs


def main() -> None:
    ap = _util.bench_parser(3, __doc__)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--images", type=int, default=1024)
    args = ap.parse_args()
    ds = load_dataset("cifar10-demo", "train")
    idx = torch.arange(args.images)
    x, y = ds.images(idx), ds.labels(idx)
    hand_loop(x, y, 1)  # warm-up (allocator, oneDNN kernels)
    ratios: dict[str, list[float]] = {"epoch": [], "train": [], "every1": []}
    hand_s, ours_s, ks, shares = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            pair = {}
            for who in (("hand", "ours") if rep % 2 == 0 else ("ours", "hand")):
                if who == "hand":
                    pair["hand"] = hand_loop(x, y, args.epochs)
                else:
                    pair["ours"], recs = trainer(args.images, args.epochs, Path(tmp) / f"run{rep}")
            hand_e = pair["hand"] / args.epochs
            ours_e = pair["ours"] / args.epochs
            train_e = statistics.mean(r["train_time"] for r in recs)
            eval_s = [r["eval_time"] for r in recs if "eval_time" in r]
            probe_e = statistics.mean(r["probe_time"] - r.get("eval_time", 0.0) for r in recs)
            ratios["epoch"].append(ours_e / hand_e)
            ratios["train"].append(train_e / hand_e)
            # every epoch evaluated: the same run's other costs plus one (measured) evaluation per epoch
            ratios["every1"].append((ours_e + statistics.mean(eval_s) * (1 - len(eval_s) / args.epochs)) / hand_e)
            hand_s.append(hand_e)
            ours_s.append(ours_e)
            ks.append(recs[0]["measure_every"])
            shares.append((ours_e - train_e) / ours_e)
            print(f"  rep {rep + 1}: hand loop {hand_e:.2f} s/epoch, trainer {ours_e:.2f} s/epoch "
                  f"({ours_e / hand_e:.2f}x; training part {train_e / hand_e:.2f}x), k = {ks[-1]}, evaluated epochs "
                  f"{[r['epoch'] for r in recs if 'eval_time' in r]}, probe {probe_e:.2f} s/epoch", flush=True)
    ref = f"hand-written SAT loop, {statistics.median(hand_s):.2f} s/epoch (median)"
    what = f"DemoNet SAT PGD-5, {args.images} cifar10-demo images, batch {BATCH}, {args.epochs}-epoch run"
    rows = [
        {"what": f"trainer epoch, default measurement (auto k = {statistics.median(ks):g}; {what})",
         "reference": ref, "ratio_min": min(ratios["epoch"]), "ratio_median": statistics.median(ratios["epoch"]),
         "repeats": args.reps, "target": "<= 1.3"},
        {"what": "trainer epoch, training part only (same runs)", "reference": ref, "ratio_min": min(ratios["train"]),
         "ratio_median": statistics.median(ratios["train"]), "repeats": args.reps},
        {"what": "trainer epoch if it evaluated every epoch (measure_every=1; same runs' measured evaluation)",
         "reference": ref, "ratio_min": min(ratios["every1"]), "ratio_median": statistics.median(ratios["every1"]),
         "repeats": args.reps},
    ]
    _util.print_table("Trainer epoch vs hand loop (ratio: time(ours) / time(hand loop); < 1 means ours is faster)",
                      rows)
    extra = {"settings": {"images": args.images, "epochs": args.epochs, "batch": BATCH, "attack_steps": STEPS,
                          "eps": EPS, "eval": "PGD-20 on 500 cifar10-demo test images (TrainConfig defaults)"},
             "measurement_share_median": statistics.median(shares), "chosen_k": ks,
             "hand_s_per_epoch": hand_s, "ours_s_per_epoch": ours_s}
    print("written", _util.write_result("epoch", rows, extra))


if __name__ == "__main__":
    main()
