"""Attack Lab per attack family: click -> result drawn in a headless session (Streamlit AppTest) next to the same
attack run directly through core, in one run, on the default model (the CIFAR-10 demo) and 64 test images.

For every family the page's interactive setting (10 iterations; APGD-T / FAB-T against 3 target classes; Square
300 queries; batches of 16 for the AutoAttack components) is timed, the time AutoAttack's own setting would take
is scaled from it (core.attacks.budget.full_cost), and for APGD-T and FAB-T the previous page setting (9 targets,
one batch) is timed too. --check-full also runs AutoAttack's APGD-T setting (9 targets x 100 iterations) on the
same images, to compare the estimate with a measurement.

    OMP_NUM_THREADS=1 python bench/bench_attack_lab.py [--n 64] [--check-full]

Writes bench/results/attack_lab.json. Seconds on a loaded machine compare only within one run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import _util  # noqa: F401  (puts the repo on sys.path)
import torch

FAMILIES = [("pgd", 10), ("apgd-ce", 10), ("apgd-t", 10), ("fab", 10), ("fab-t", 10), ("square", 300)]


def _spec(name, steps, eps, targets=3, batch=None):
    from core.attacks import AttackSpec, budget

    return AttackSpec(name=name, eps=eps, steps=steps, seed=0,
                      batch_size=batch or budget.interactive_batch_size(name),
                      extra={"targets": targets} if name in budget.TARGETED else {})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--check-full", action="store_true")
    ap.add_argument("--robust", default=str(_util.REPO / "checkpoints" / "cifar10-demo-sat.safetensors"),
                    help="a robust checkpoint on which 3 vs 9 targets are timed through core ('' to skip)")
    args = ap.parse_args()
    os.environ.setdefault("ENERGYLENS_RUNS", tempfile.mkdtemp(prefix="bench-atk-"))
    from streamlit.testing.v1 import AppTest

    from core.attacks import budget, run_attack

    at = AppTest.from_file(str(_util.REPO / "dashboard" / "Home.py"), default_timeout=600)
    at.run()
    at.switch_page("../pages/attack_lab.py").run()
    ref = at.session_state["model_ref"]
    from core.data import load_dataset
    from core.models import load_checkpoint

    lm = load_checkpoint(ref.path)
    ds = load_dataset(lm.meta.dataset, "test")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:args.n]   # the page's draw (seed 0)
    x, y = ds.images(idx), ds.labels(idx)
    eps = float(at.number_input(key="atk_eps255").value) / 255
    k = lm.meta.num_classes
    rows = []

    def core_time(spec):
        t0 = time.perf_counter()
        res = run_attack(lm.model, x, y, spec)
        return time.perf_counter() - t0, float(res.trace.robust_accuracy())

    def ui_time(name, steps):
        at.selectbox(key="atk_name").set_value(name)
        at.number_input(key="atk_n").set_value(args.n)
        if name == "square":
            at.number_input(key="atk_queries").set_value(steps)
        else:
            at.number_input(key="atk_steps").set_value(steps)
        before = len(at.session_state["atk_history"]) if "atk_history" in at.session_state else 0
        t0 = time.perf_counter()
        next(b for b in at.button if b.label == "Run attack").click().run()
        answered = time.perf_counter() - t0
        while len(at.session_state["atk_history"] if "atk_history" in at.session_state else {}) <= before:
            assert not at.exception, [e.message for e in at.exception]
            time.sleep(0.1)
            at.run()
        return answered, time.perf_counter() - t0

    for name, steps in FAMILIES:
        spec = _spec(name, steps, eps)
        c_s, rob = core_time(spec)
        answered, drawn = ui_time(name, steps)
        full = budget.full_cost(spec, c_s, k)
        row = {"attack": name, "setting": f"{steps} {'queries' if name == 'square' else 'iterations'}"
               + (" x 3 targets" if name in budget.TARGETED else ""), "core_s": c_s, "ui_answers_s": answered,
               "ui_drawn_s": drawn, "ui/core": drawn / c_s, "robust_acc": rob,
               "full_autoattack": full["setting"] if full else "", "full_est_s": full["seconds"] if full else None}
        rows.append(row)
        if name in budget.TARGETED:
            old, rob9 = core_time(_spec(name, steps, eps, targets=9, batch=256))
            rows.append({"attack": name, "setting": f"{steps} iterations x 9 targets, one batch (before)",
                         "core_s": old, "ui_answers_s": None, "ui_drawn_s": None, "ui/core": None,
                         "robust_acc": rob9, "full_autoattack": "", "full_est_s": None})
    if args.check_full:
        spec = _spec("apgd-t", 100, eps, targets=9, batch=256)
        t_full, rob_full = core_time(spec)
        est = next(r for r in rows if r["attack"] == "apgd-t")["full_est_s"]
        rows.append({"attack": "apgd-t", "setting": "AutoAttack standard: 100 iterations x 9 targets (measured)",
                     "core_s": t_full, "ui_answers_s": None, "ui_drawn_s": None, "ui/core": None,
                     "robust_acc": rob_full, "full_autoattack": f"estimate was {est:.1f} s", "full_est_s": est})
    if args.robust and os.path.exists(args.robust):
        # on a robust model images survive the first targets, which is where fewer targets save time
        lm_r = load_checkpoint(args.robust)
        for name in budget.TARGETED:
            for t in (3, 9):
                spec = _spec(name, 10, eps, targets=t)
                t0 = time.perf_counter()
                res = run_attack(lm_r.model, x, y, spec)
                secs = time.perf_counter() - t0
                rows.append({"attack": name, "setting": f"{lm_r.meta.name}: 10 iterations x {t} targets", "core_s": secs,
                             "ui_answers_s": None, "ui_drawn_s": None, "ui/core": None,
                             "robust_acc": float(res.trace.robust_accuracy()), "full_autoattack": "",
                             "full_est_s": budget.full_cost(spec, secs, k)["seconds"]})
    _util.print_table(f"Attack Lab on {lm.meta.name}, {args.n} images, eps {eps * 255:g}/255: UI vs core in one run",
                      rows)
    print("written", _util.write_result("attack_lab", rows, {"model": lm.meta.name, "n": args.n}))


if __name__ == "__main__":
    main()
