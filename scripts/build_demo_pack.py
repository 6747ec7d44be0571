"""Build the CIFAR-10 demo pack (see core/data/demo.py and checkpoints/demo/README.md).

    python scripts/build_demo_pack.py split     # checkpoints/demo/cifar10-demo-test.npz from the 5,085-image subset
    python scripts/build_demo_pack.py pack      # copy trained runs (runs/demo-pack/) into checkpoints/, measure them
    python scripts/build_demo_pack.py pack-fig3 # copy the Fig. 3 small-data runs (runs/demo-pack/fig3-*) in, measure
    python scripts/build_demo_pack.py table     # the README's tables: models from results.json, runs from their files
    python scripts/build_demo_pack.py readme    # write those tables into README.md (between its markers)

The models and recorded runs are trained by the project's own CLI: scripts/build_demo_models.sh (which calls both).
Robust models are taken from their recorded run at the epoch where the ΔE(x) phase detector (core.phase) places the
start of phase 3 (robust overfitting), or at the last epoch when it finds none: early stopping that reads only the
training probe set, never the test images.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.data import CIFAR10_CLASSES  # noqa: E402
from core.data.demo import (DEMO_TEST_FILE, DEMO_TRAIN_FILE, SHARED_SUBSET, SUBSET_ENV, cache_clear,  # noqa: E402
                            load_demo, load_subset, split_positions)
from core import overfitting  # noqa: E402
from core.rundir import RunDir  # noqa: E402
from core.storage import atomic_write, atomic_write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "demo-pack"
CKPT = REPO / "checkpoints"
ROBUST = ("sat", "trades", "weat-adv")
EPS, STEP = 8 / 255, 2 / 255


def build_split() -> None:
    """Both committed splits of the pack from the 5,085-image subset (never from the pack itself)."""
    if not os.environ.get(SUBSET_ENV) and SHARED_SUBSET.is_file():
        os.environ[SUBSET_ENV] = str(SHARED_SUBSET)   # read the source, not the files about to be rewritten
    x, y = load_subset()
    pos = split_positions(y)
    rest = np.setdiff1d(np.arange(len(y)), pos)
    for path, idx in ((DEMO_TEST_FILE, pos), (DEMO_TRAIN_FILE, rest)):
        arrays = {"x": x[idx], "y": y[idx].astype(np.int64), "subset_index": idx.astype(np.int64),
                  "class_names": np.array(CIFAR10_CLASSES)}
        atomic_write(path, lambda f, a=arrays: np.savez_compressed(f, **a))
    cache_clear()
    os.environ.pop(SUBSET_ENV, None)
    test, train = load_demo("test"), load_demo("train")
    print(f"wrote {DEMO_TRAIN_FILE} ({DEMO_TRAIN_FILE.stat().st_size / 1e6:.2f} MB) and "
          f"{DEMO_TEST_FILE} ({DEMO_TEST_FILE.stat().st_size / 1e6:.2f} MB): {len(test)} test images "
          f"({np.bincount(test.y.numpy()).tolist()} per class); {len(train)} training images remain "
          f"({np.bincount(train.y.numpy()).tolist()} per class)")


def _command(cfg: dict) -> str:
    flags = []
    for k, v in cfg.items():
        if v is None or k in ("resume",) or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        flags.append(flag if v is True else f"{flag} {v}")
    return "python -m core.train " + " ".join(flags)


def _selected_epoch(run: Path) -> tuple[int, str, float | None]:
    """(epoch, why, the detector's phase-3 start or None)."""
    from core import phase

    recs = RunDir(run).read_metrics()
    res = phase.detect_from_metrics(recs, "dE_mean")
    last = int(recs[-1]["epoch"])
    if res.phase3_start is not None:
        e = int(round(res.phase3_start))
        return e, f"epoch {e}: start of phase 3 (robust overfitting) found by the ΔE(x) detector", res.phase3_start
    return last, f"epoch {last}: the last epoch (the ΔE(x) detector finds no phase 3)", None


def copy_run(src: RunDir, dst: RunDir) -> None:
    """A recorded run: the config, the metrics, the probe snapshots and the command line; no optimizer state."""
    if dst.path.exists():
        shutil.rmtree(dst.path)
    dst.probe_dir.mkdir(parents=True)
    cfg = src.read_config()
    dst.write_config(cfg)
    shutil.copy2(src.metrics, dst.metrics)
    for e in src.probe_epochs():
        shutil.copy2(src.probe_file(e), dst.probe_file(e))
    dst.write_command(_command(cfg))


def measure(path: Path) -> dict:
    """Natural / PGD-10 accuracy and energy drift of a checkpoint on the 500 demo test images."""
    from core.attacks import AttackSpec, run_attack
    from core.models import load_checkpoint

    lm = load_checkpoint(path)
    ds = load_demo("test")
    x, y = ds.images(), ds.labels()
    pgd = run_attack(lm.model, x, y, AttackSpec("pgd", eps=EPS, step_size=STEP, steps=10, seed=0)).trace
    tgt = run_attack(lm.model, x, y, AttackSpec("pgd", eps=EPS, step_size=STEP, steps=10, targeted=True,
                                                seed=0)).trace
    apt = run_attack(lm.model, x, y, AttackSpec("apgd-t", eps=EPS, steps=10, seed=0)).trace
    d, dt, da = pgd.delta_marginal(), tgt.delta_marginal(), apt.delta_marginal()
    return {"natural": pgd.natural_accuracy(), "pgd10": pgd.robust_accuracy(), "dE_mean": float(d.mean()),
            "abs_dE_mean": float(np.abs(d).mean()), "share_lowered": float((d > 0).mean()),
            "dE_targeted_mean": float(dt.mean()), "share_lowered_targeted": float((dt > 0).mean()),
            "dE_apgdt_mean": float(da.mean()), "share_raised_apgdt": float((da < 0).mean()),
            "apgdt_acc": apt.robust_accuracy(), "epoch": lm.meta.epoch, "method": lm.meta.method,
            "size_mb": path.stat().st_size / 1e6}


def build_pack() -> None:
    from core.models import load_checkpoint, save_checkpoint

    results = {}
    plain = RunDir(RUNS / "plain").last
    targets = []
    if plain.is_file():
        lm = load_checkpoint(plain)
        lm.meta.name = "cifar10-demo-plain"
        lm.meta.hparams["selected"] = f"epoch {lm.meta.epoch}: the last epoch"
        targets.append(("plain", save_checkpoint(CKPT / "cifar10-demo-plain.safetensors", lm.model, lm.meta)))
    for m in ROBUST:
        run = RUNS / f"recorded-{m}"
        if not RunDir(run).metrics.is_file():
            print(f"skipping {m}: {run} has no metrics yet")
            continue
        epoch, why, p3 = _selected_epoch(run)
        src = RunDir(run).epoch_checkpoint(epoch)
        lm = load_checkpoint(src)
        lm.meta.name = f"cifar10-demo-{m}"
        lm.meta.hparams["selected"] = why
        targets.append((m, save_checkpoint(CKPT / f"cifar10-demo-{m}.safetensors", lm.model, lm.meta)))
        copy_run(RunDir(run), RunDir(CKPT / "runs" / f"cifar10-demo-{m}"))
        from core.phase import robust_peak

        recs = RunDir(run).read_metrics()
        peak_epoch, peak_pgd, end_pgd = robust_peak([r["epoch"] for r in recs], [r["pgd_acc"] for r in recs])
        results[f"run:{m}"] = {"epochs": len(recs), "peak_pgd": peak_pgd, "peak_epoch": peak_epoch,
                               "end_pgd": end_pgd, "end_nat": recs[-1]["nat_acc"], "end_dE": recs[-1]["dE_mean"],
                               "selected": why, "phase3_start": p3}
    for m, path in targets:
        results[m] = measure(path)
        print(m, results[m])
    atomic_write_json(CKPT / "demo" / "results.json", results)
    print(__import__("json").dumps(results, indent=2))


FIG3 = ("sat", "trades", "weat-adv")          # the small-data runs of Fig. 3 (scripts/build_demo_models.sh fig3)
FIG3_RUN = "cifar10-demo-2k-{}"                 # their names under checkpoints/runs/
SAT_PEAK, SAT_END = "cifar10-demo-2k-sat-peak", "cifar10-demo-2k-sat-end"


def _half(state: dict) -> dict:
    """Weights as float16 (half the size; they load into the float32 model unchanged up to rounding)."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def pack_fig3(source: Path) -> None:
    """Copy the Fig. 3 runs (``<source>/fig3-<method>``) into ``checkpoints/runs/`` and SAT's checkpoints at its
    robust-accuracy peak (best.safetensors) and at its end (last.safetensors) into ``checkpoints/``, then measure
    those two on the 500 demo test images."""
    from core.models import load_checkpoint, save_checkpoint

    results = json.loads((CKPT / "demo" / "results.json").read_text()) if (CKPT / "demo" / "results.json").is_file() \
        else {}
    for m in FIG3:
        src = RunDir(source / f"fig3-{m}")
        if not src.metrics.is_file():
            print(f"skipping {m}: {src.path} has no metrics")
            continue
        cfg = src.read_config()
        done = len(src.read_metrics())
        if done < int(cfg.get("epochs", 0)):
            print(f"skipping {m}: {src.path} has {done} of its {cfg.get('epochs')} epochs (still running?)")
            continue
        copy_run(src, RunDir(CKPT / "runs" / FIG3_RUN.format(m)))
        if m == "sat":
            for name, ck, what in ((SAT_PEAK, src.best, "the robust-accuracy peak"), (SAT_END, src.last, "the end")):
                lm = load_checkpoint(ck)
                lm.meta.name = name
                lm.meta.hparams["selected"] = f"epoch {lm.meta.epoch}: {what} of the Fig. 3 SAT run"
                path = save_checkpoint(CKPT / f"{name}.safetensors", _half(lm.model.state_dict()), lm.meta)
                results[name] = measure(path)
                print(name, results[name])
    atomic_write_json(CKPT / "demo" / "results.json", results)


def run_rows() -> list[tuple[str, dict, object]]:
    """(name, config, overfitting summary) of every shipped recorded run, computed from its files."""
    rows = []
    for folder in sorted((CKPT / "runs").iterdir()):
        run = RunDir(folder)
        if not run.metrics.is_file():
            continue
        cfg = run.read_config()
        o = overfitting.summarize(run.read_metrics(), cfg.get("method"), cfg.get("eval_samples"))
        if o is not None:
            rows.append((folder.name, cfg, o))
    return rows


def tables(results: dict) -> str:
    """Markdown tables of the bundled models and of the recorded runs, from ``results.json``."""
    rows = ["| model | selected epoch | natural | PGD-10 | mean ΔE(x), PGD-10 | share of E(x) lowered | mean \\|ΔE(x)\\| "
            "| APGD-T: mean ΔE(x) (share raised) | targeted PGD-10: mean ΔE(x) | size |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for m in ("plain", *ROBUST):
        r = results.get(m)
        if not r:
            continue
        rows.append(f"| cifar10-demo-{m} | {r['epoch']} | {r['natural']:.1%} | {r['pgd10']:.1%} | {r['dE_mean']:+.3f} "
                    f"| {r['share_lowered']:.0%} | {r['abs_dE_mean']:.3f} "
                    f"| {r['dE_apgdt_mean']:+.3f} ({r['share_raised_apgdt']:.0%}) | {r['dE_targeted_mean']:+.3f} "
                    f"| {r['size_mb']:.2f} MB |")
    runs = ["| recorded run | training images | epochs | robust test acc. peak (epoch) | at the end | drop (SE) "
            "| training probe, robust, at the end | ΔE(x) at the end | phase 3 from epoch (detector) |",
            "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, cfg, o in run_rows():
        p3 = "none" if o.phase3_start is None else f"{o.phase3_start:.0f}"
        tr = "–" if o.train_rob_end is None else f"{o.train_rob_end:.1%}"
        runs.append(f"| {name} | {overfitting.recipe(cfg)} | {o.epochs} | {o.peak_acc:.1%} ({o.peak_epoch}) "
                    f"| {o.end_acc:.1%} | {100 * o.drop:.1f} pts ({100 * o.drop_se:.1f}) | {tr} | {o.dE_end:+.3f} | {p3} |")
        notes.append(f"- **{name}**: {overfitting.sentence(o)}")
    for name in (SAT_PEAK, SAT_END):
        r = results.get(name)
        if r:
            rows.append(f"| {name} | {r['epoch']} | {r['natural']:.1%} | {r['pgd10']:.1%} | {r['dE_mean']:+.3f} "
                        f"| {r['share_lowered']:.0%} | {r['abs_dE_mean']:.3f} "
                        f"| {r['dE_apgdt_mean']:+.3f} ({r['share_raised_apgdt']:.0%}) | {r['dE_targeted_mean']:+.3f} "
                        f"| {r['size_mb']:.2f} MB |")
    return "\n".join(rows) + "\n\n" + "\n".join(runs) + "\n\n" + "\n".join(notes)


MARK_START, MARK_END = "<!-- demo-tables:start (python scripts/build_demo_pack.py readme) -->", "<!-- demo-tables:end -->"


def write_readme(results: dict, readme: Path = REPO / "README.md") -> None:
    """Replace the README's demo tables (between the two markers) with :func:`tables` of the shipped files."""
    text = readme.read_text()
    if MARK_START not in text or MARK_END not in text:
        raise SystemExit(f"{readme} lacks the markers {MARK_START!r} ... {MARK_END!r}")
    head, rest = text.split(MARK_START, 1)
    _, tail = rest.split(MARK_END, 1)
    atomic_write(readme, lambda f: f.write((head + MARK_START + "\n" + tables(results) + "\n" + MARK_END + tail)
                                           .encode()))



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=["split", "pack", "pack-fig3", "table", "readme"], help="what to build")
    p.add_argument("--from", dest="source", type=Path, default=RUNS,
                   help="pack-fig3: the folder holding fig3-<method>/ run folders (default runs/demo-pack)")
    args = p.parse_args(argv)
    if args.step == "split":
        build_split()
    elif args.step == "pack":
        build_pack()
    elif args.step == "pack-fig3":
        pack_fig3(args.source)
    elif args.step == "readme":
        write_readme(json.loads((CKPT / "demo" / "results.json").read_text()))
    else:
        print(tables(json.loads((CKPT / "demo" / "results.json").read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
