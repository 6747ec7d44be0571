"""SGLD studio speed: 64 chains x 100 steps of Eq. 7 on the bundled robust model, and the overhead of
the step-wise API (SGLDSampler.step with its energy trace and NaN guard) over a bare loop doing the
same maths (same update, same noise stream, same per-step energies), timed alternately in one run.

    OMP_NUM_THREADS=1 python bench/bench_sgld.py [--chains 64] [--steps 100] [--reps 5] [--device cpu]

Targets: < 5 s for 64 x 100 on CPU; the API within 10 % of the bare loop. Writes
bench/results/sgld.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import _util  # noqa: F401  (puts the repo on sys.path)
import torch

from core.runtime import eval_mode
from core.data import load_dataset
from core.models import load_checkpoint
from core.sampling import ClassStats, SGLDSampler


def bare_loop(model, x0: torch.Tensor, y: torch.Tensor, steps: int, eta: float, zeta: float, gamma: float,
              gen: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Eq. 7 written out by hand: gradient at x, momentum update, noise, box projection, energies kept."""
    rows = []
    with eval_mode(model):
        x = x0.clone().requires_grad_(True)
        logits = model(x)
        (g,) = torch.autograd.grad(-logits.gather(1, y[:, None]).sum(), x)
        rows.append(logits.detach())
        v = torch.zeros_like(x0)
        x = x.detach()
        for _ in range(steps):
            v = v * zeta - 0.5 * eta * g
            x = x + v + gamma * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            x = x.clamp_(0.0, 1.0).requires_grad_(True)
            logits = model(x)
            (g,) = torch.autograd.grad(-logits.gather(1, y[:, None]).sum(), x)
            rows.append(logits.detach())
            x = x.detach()
    return x, rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chains", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--checkpoint", default=str(_util.REPO / "checkpoints" / "digits-sat.safetensors"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    lm = load_checkpoint(args.checkpoint, device=dev)
    stats = ClassStats(load_dataset("digits", "train"))
    k = lm.meta.num_classes
    per = max(1, args.chains // k)
    counts = [per + (1 if c < args.chains - per * k else 0) for c in range(k)]
    classes = [c for c, n in zip(range(k), counts) if n > 0]
    counts = [n for n in counts if n > 0]
    eta, zeta, gamma = 1.0, 0.5, 1e-3
    sampler = SGLDSampler(lm, classes, counts, init="pca", eta=eta, zeta=zeta, gamma=gamma, seed=0, device=dev,
                          stats=stats)
    n_chains = sampler.n_chains

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def run_api():
        sampler.reset()                 # restores x0 and the noise stream (one forward+backward, untimed)
        sync()
        t0 = time.perf_counter()
        sampler.step(args.steps)
        sync()
        return time.perf_counter() - t0

    def run_bare():
        gen = torch.Generator(device=dev).manual_seed(sampler._noise_seed)
        sync()
        t0 = time.perf_counter()
        x, _ = bare_loop(lm.model, sampler.x0, sampler.labels, args.steps, eta, zeta, gamma, gen)
        sync()
        run_bare.last = x
        return time.perf_counter() - t0

    # same maths: the same images up to rounding (the sampler differentiates through the BatchNorm-folded view)
    run_api()
    run_bare()
    same = float((sampler.x - run_bare.last).abs().max())
    api_t, bare_t = [], []
    for _ in range(args.reps):          # alternate, so that load changes hit both alike
        api_t.append(run_api())
        bare_t.append(run_bare())
    api, bare = statistics.median(api_t), statistics.median(bare_t)
    rows = [
        {"what": f"SGLDSampler.step({args.steps}), {n_chains} chains", "median_s": api,
         "per_step_ms": 1000 * api / args.steps, "target": "< 5 s" if dev.type == "cpu" else "",
         "ok": api < 5.0 if dev.type == "cpu" else None},
        {"what": "bare loop, same maths", "median_s": bare, "per_step_ms": 1000 * bare / args.steps,
         "target": "", "ok": None},
        {"what": "API / bare", "median_s": api / bare, "per_step_ms": None, "target": "<= 1.10",
         "ok": api / bare <= 1.10},
    ]
    _util.print_table(f"SGLD benchmark ({lm.meta.name}, {args.device}, {torch.get_num_threads()} thread(s), "
                      f"median of {args.reps}; max |x_api - x_bare| after {args.steps} steps: {same:.2g})", rows)
    print("written", _util.write_result("sgld", rows, {"max_abs_image_difference": same, "api_times_s": api_t,
                                                       "bare_times_s": bare_t, "chains": n_chains,
                                                       "steps": args.steps, "eta": eta, "zeta": zeta,
                                                       "gamma": gamma, "model": lm.meta.name}))


if __name__ == "__main__":
    main()
