"""Training studio: launch -> first live point, as the page's default run (the CIFAR-10 demo, demonet, SAT).

Submits the page's default training job through core.jobs (what the Launch button does) and polls the run folder
as the page does (every 0.5 s): seconds until the first batch counter with an ETA (progress.json), the first point
of the batch-level loss plot (batches.jsonl: what the page draws since issue 17) and the first per-epoch ΔE
record (metrics.jsonl: the page's only live point before). The job is stopped after the first epoch record (or
--max-s). Also prints the ETA the trainer promised at its first batch next to the measured epoch time.

    OMP_NUM_THREADS=1 python bench/bench_training_live.py [--dataset cifar10-demo] [--max-s 900]

Writes bench/results/training_live.json. Seconds on a loaded machine compare only within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import _util


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="cifar10-demo")
    ap.add_argument("--arch", default=None)
    ap.add_argument("--max-s", type=float, default=900)
    args = ap.parse_args()
    os.environ["ENERGYLENS_RUNS"] = tempfile.mkdtemp(prefix="bench-train-live-")
    from core import jobs
    from core.rundir import RunDir

    arch = args.arch or {"cifar10-demo": "demonet", "digits": "smallcnn"}.get(args.dataset, "resnet18")
    cfg = {"method": "sat", "dataset": args.dataset, "arch": arch, "epochs": 15, "batch_size": 128, "lr": 0.1,
           "device": "cpu"}
    t0 = time.time()
    info = jobs.submit("train", cfg, name="bench live", device="cpu")
    run = Path(info.run_dir)
    seen: dict[str, float] = {}
    first_eta = None
    try:
        while time.time() - t0 < args.max_s:
            p = RunDir(run).read_progress()
            if p and p.get("batch") and "first batch counter + ETA" not in seen and p.get("eta_s") is not None:
                seen["first batch counter + ETA"] = time.time() - t0
                first_eta = p["eta_s"] / max(cfg["epochs"], 1)   # the promise for one epoch, at batch 1
            if "first batch-loss point" not in seen and RunDir(run).read_batches():
                seen["first batch-loss point"] = time.time() - t0
            if (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().strip():
                seen["first per-epoch ΔE record"] = time.time() - t0
                break
            if not jobs.get_job(info.id).active:
                break
            time.sleep(0.5)
    finally:
        jobs.stop_job(info.id, grace=5.0)
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()] \
        if (run / "metrics.jsonl").exists() else []
    epoch_s = (recs[0]["train_time"] + recs[0]["probe_time"]) if recs else None
    rows = [{"what": k, "seconds_after_launch": v} for k, v in seen.items()]
    if first_eta is not None:
        rows.append({"what": "ETA per epoch promised at batch 1 (total ETA / epochs)", "seconds_after_launch": first_eta})
    if epoch_s is not None:
        rows.append({"what": "epoch 1 measured (train + evaluation/probe)", "seconds_after_launch": epoch_s})
    _util.print_table(f"Training studio, {cfg['method']} on {cfg['dataset']} ({arch}, batch {cfg['batch_size']}): "
                      "launch -> first live point", rows)
    print("written", _util.write_result("training_live", rows, {"config": cfg}))


if __name__ == "__main__":
    main()
