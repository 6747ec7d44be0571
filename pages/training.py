"""Training studio: adversarial-training jobs with live ΔE(x) (paper Sec. 3.2: Fig. 3, Fig. 1 b-d, Table 2a)."""

import dataclasses
import json
import shlex

import common
import numpy as np
import streamlit as st

import figures as fig
import slides
import tour
import training_figures as tfig
from core import jobs, phase
from core import overfitting
from core.paths import BUNDLED_DIR
from core.recorded import CONTRAST_RUNS, FIG3_RUNS, list_recorded, read_recorded_metrics, story
from core.data import DATASETS, PAPER_EPS, TrainingRecipe
from core.errors import EnergyLensError
from core.losses import INNERS, METHODS, OUTERS, WEIGHTINGS
from core.models import ARCHITECTURES
from core.train import SCHEDULES, TrainConfig
from core.training.measure import measurement_cost
from core.rundir import RunDir

st.title("Training studio")
tour.banner("training")
# the tour's Fig. 3 step lands on the chart: the story block is drawn here, under the banner, instead of below the
# launch form and the run list (about 2,400 px further down)
_step = tour.current("training")
story_slot = st.container() if _step is not None and _step.focus == "fig3" else None
st.caption("Train SAT / TRADES / MART / MAIL / WEAT models as background jobs and watch the energy gap "
           "ΔE(x) = E(x) − E(x*) of training samples: its steep fall marks robust overfitting (paper Fig. 3).")

with st.expander("What am I looking at?", expanded=False):
    st.markdown(
        r"""
Every epoch the trainer attacks a fixed **probe set of training images** with the training attack and records the
natural and adversarial energies. $\Delta E(x) = E(x) - E(x^*)$ is the marginal-energy gap and
$\Delta E(x,y) = E(x,y) - E(x^*,y)$ the joint one (their means are plotted; quantiles are in `metrics.jsonl`).

* **Three phases (Fig. 3):** with SAT, $\Delta E(x)$ first settles (phase 1), stays on a plateau (phase 2), then falls
  steeply (phase 3) while the robust test error rises: **robust overfitting**. TRADES keeps it almost flat. The
  phases are found by `core.phase.detect_phases`: a piecewise-linear change-point fit of the raw series with
  noise-relative tests (steep, sustained, significant); the smoothing slider only changes the display.
* **Arrow snapshots (Fig. 1 b–d):** the probe samples in the $(E(x), E(x,y))$ plane at one epoch, arrow from the
  natural to the adversarial point.
* **WEAT weights:** $w(x) = 1/\log(1+e^{|E(x)|})$ of the probe samples at that epoch, and the mean/min/max of the
  weights the loss actually used (WEAT and the other weighting methods).
* **Compare runs (Table 2a):** ΔE curves of several runs overlaid and the final ΔE per run.

Jobs run in their own processes and keep running when you close the tab; this page re-attaches to them from the
job registry on disk. Plots refresh every 2 s while a run is running.
"""
    )

DEFAULT = "(method default)"
BASE = TrainConfig()


def dataset_defaults(name: str) -> dict:
    """The form's starting values for a dataset: its training recipe and budget (core.data.DatasetSpec); an npz
    file gets the default recipe and the paper's budget."""
    spec = DATASETS.get(name)
    d = dataclasses.asdict(spec.recipe if spec is not None else TrainingRecipe())
    d["eps255"] = round((spec.default_eps if spec is not None else PAPER_EPS) * 255, 2)
    return d


def device_options() -> list[str]:
    import torch

    return ["auto", "cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def cli_text(cfg: dict, name: str | None, device: str) -> str:
    body = json.dumps(cfg, indent=2)
    folder = "runs/" + "".join(c if c.isalnum() or c in "-_" else "-" for c in (name or "my-run")).strip("-")
    name_flag = f" --name {shlex.quote(name)}" if name else ""
    return (f"cat > train_config.json <<'EOF'\n{body}\nEOF\n"
            f"# as a background job (same registry as this page):\n"
            f"python -m core.jobs submit train --config train_config.json{name_flag} --device {device}\n"
            f"# or in the foreground, without the job registry:\n"
            f"python -m core.train --config train_config.json --out-dir {shlex.quote(folder)}")


# ============================================================================= launch form
st.subheader("New training run")
ver = st.session_state.setdefault("tr_form_ver", 0)
pre: dict = st.session_state.get("tr_prefill") or {}
if pre:
    st.info(f"Form prefilled from run **{st.session_state.get('tr_prefill_name', '?')}**: change what you want and "
            "launch. The copy starts from scratch in a new folder.")
    if st.button("Clear the prefilled values", key=f"tr_clear_prefill_{ver}"):
        st.session_state.pop("tr_prefill", None)
        st.session_state["tr_form_ver"] = ver + 1
        st.rerun()

NPZ = "npz"  # the choice "your own .npz file": the dataset is then "npz:<path>"
methods, datasets = list(METHODS), list(DATASETS) + [NPZ]
pre_ds = pre.get("dataset")
pre_choice = NPZ if isinstance(pre_ds, str) and pre_ds.startswith("npz:") else pre_ds
c1, c2 = st.columns(2)
method = c1.selectbox("Method", methods, index=methods.index(pre["method"]) if pre.get("method") in methods else
                      methods.index("sat"), key=f"tr_method_{ver}",
                      help="Table 1c: SAT = PGD-CE, TRADES = CE + β·KL, MART, MAIL-TRADES, WEAT (energy weights)")
from core.data.demo import train_available  # noqa: E402

default_ds = "cifar10-demo" if train_available() else "digits"  # the demo's training images may be absent (fresh clone)
choice = c2.selectbox("Dataset", datasets, index=datasets.index(pre_choice) if pre_choice in datasets
                      else datasets.index(default_ds), key=f"tr_dataset_{ver}",
                      format_func=lambda d: "your own .npz file (npz:<path>)" if d == NPZ else
                      f"{d} — {DATASETS[d].description}")
if choice == NPZ:
    npz_path = c2.text_input("Path of the .npz file", value=pre_ds[4:] if pre_choice == NPZ else "",
                             key=f"tr_npz_{ver}", placeholder="/data/my_images.npz",
                             help="Arrays x (N×H×W×3 or N×3×H×W, uint8 or floats in [0, 1]) and y (integer labels); "
                                  "a fixed slice of it is held out for evaluation")
    dataset = f"npz:{npz_path.strip()}"
else:
    dataset = choice
if dataset == "cifar10-demo" and not train_available():
    st.warning("The CIFAR-10 demo's 4,585 training images are not on this machine (they are rebuilt from the 5,085-image "
               "CIFAR-10 subset or a full CIFAR-10; see checkpoints/demo/README.md). Its recorded runs below show what "
               "training on it looks like; to train here, choose digits or put CIFAR-10 in data/.")
dd = dataset_defaults(dataset)
P = pre if pre.get("dataset") == dataset else {}    # prefill only applies to the run's own dataset


def pv(name, default):
    """Prefilled value of a config field, else the default."""
    v = P.get(name)
    return default if v is None else v


sfx = f"{ver}_{choice}"  # not the npz path: typing it must not reset the form
lcfg = METHODS[method]
with st.form(f"tr_form_{ver}"):
    a1, a2, a3 = st.columns([2, 1, 1])
    run_name = a1.text_input("Run name (optional)", value=str(P.get("name") or ""), key=f"tr_name_{sfx}")
    archs = list(ARCHITECTURES)
    arch = a2.selectbox("Architecture", archs, index=archs.index(pv("arch", dd["arch"])) if pv("arch", dd["arch"]) in
                        archs else 0, key=f"tr_arch_{sfx}")
    devs = device_options()
    device = a3.selectbox("Device", devs, index=devs.index(P["device"]) if P.get("device") in devs else 0,
                          key=f"tr_device_{sfx}", help="auto = CUDA when a GPU is present, else CPU")
    b1, b2, b3, b4 = st.columns(4)
    eps255 = b1.number_input("ε (× 1/255, L∞)", value=float(round(pv("eps", dd["eps255"] / 255) * 255, 2)), step=1.0,
                             key=f"tr_eps_{sfx}")
    steps = b2.number_input("Attack steps", value=int(pv("attack_steps", BASE.attack_steps)), step=1,
                            key=f"tr_steps_{sfx}")
    beta = b3.number_input("β (KL weight)", value=float(pv("beta", lcfg.beta) if P.get("method") == method else lcfg.beta),
                           step=0.5, key=f"tr_beta_{sfx}_{method}",
                           help="TRADES / MART / MAIL / WEAT weight of the KL term; 0 disables it")
    seed = b4.number_input("Seed", value=int(pv("seed", 0)), step=1, key=f"tr_seed_{sfx}")
    d1, d2, d3, d4 = st.columns(4)
    epochs = d1.number_input("Epochs", value=int(pv("epochs", dd["epochs"])), step=1, key=f"tr_epochs_{sfx}")
    lr = d2.number_input("Learning rate", value=float(pv("lr", dd["lr"])), step=0.01, format="%.4f", key=f"tr_lr_{sfx}")
    schedule = d3.selectbox("LR schedule", SCHEDULES, index=SCHEDULES.index(pv("schedule", "onecycle")) if
                            pv("schedule", "onecycle") in SCHEDULES else 0, key=f"tr_sched_{sfx}")
    batch = d4.number_input("Batch size", value=int(pv("batch_size", dd["batch_size"])), step=16, key=f"tr_bs_{sfx}")

    with st.expander("Advanced: ablations (Table 1c), evaluation and probe sizes", expanded=False):
        e1, e2, e3 = st.columns(3)
        inner = e1.selectbox("Inner loss (attack)", [DEFAULT, *INNERS], index=([DEFAULT, *INNERS].index(P["inner"]) if
                             P.get("inner") in INNERS else 0), key=f"tr_inner_{sfx}",
                             help=f"'{method}' uses {lcfg.inner}")
        outer = e2.selectbox("Outer CE term", [DEFAULT, *OUTERS], index=([DEFAULT, *OUTERS].index(P["outer"]) if
                             P.get("outer") in OUTERS else 0), key=f"tr_outer_{sfx}",
                             help=f"'{method}' uses {lcfg.outer}")
        weighting = e3.selectbox("Sample weighting", [DEFAULT, *WEIGHTINGS],
                                 index=([DEFAULT, *WEIGHTINGS].index(P["weighting"]) if P.get("weighting") in WEIGHTINGS
                                        else 0), key=f"tr_weighting_{sfx}", help=f"'{method}' uses {lcfg.weighting}")
        f1, f2, f3, f4 = st.columns(4)
        wnorm = f1.selectbox("Weight normalisation", ["batch", "sum"], index=["batch", "sum"].index(pv("weight_norm", "batch"))
                             if pv("weight_norm", "batch") in ("batch", "sum") else 0, key=f"tr_wnorm_{sfx}",
                             help="energy weights: divide by the batch size (official WEAT code) or by Σw")
        wlog = f2.selectbox("Weight logits", ["train", "eval"], index=["train", "eval"].index(pv("weight_logits", "train"))
                            if pv("weight_logits", "train") in ("train", "eval") else 0, key=f"tr_wlog_{sfx}",
                            help="energy weights from the train-mode forward (official) or an extra eval-mode forward")
        step255 = f3.number_input("Attack step size (× 1/255; 0 = ε/4)", value=float(round((P.get("step_size") or 0) * 255, 3)),
                                  step=0.5, key=f"tr_step_{sfx}")
        burn_in = f4.number_input("Burn-in epochs (MAIL; 0 = none)", value=int(P.get("burn_in") or 0), step=1,
                                  key=f"tr_burn_{sfx}")
        g1, g2, g3, g4 = st.columns(4)
        eval_samples = g1.number_input("Test images per evaluation", value=int(pv("eval_samples", BASE.eval_samples)),
                                       step=64, key=f"tr_evaln_{sfx}")
        eval_steps = g2.number_input("PGD steps of the evaluation", value=int(pv("eval_steps", BASE.eval_steps)), step=1,
                                     key=f"tr_evals_{sfx}")
        probe_size = g3.number_input("Probe set (training images; 0 = auto)", value=int(pv("probe_size", 0) or 0),
                                     min_value=0, step=64, key=f"tr_probe_{sfx}",
                                     help="Fixed training images on which ΔE(x) is measured each epoch. Auto: 3% of "
                                          "the training set (at least 4 per class, at most 256), which keeps the probe "
                                          "near 3% of the epoch time.")
        snap = g4.number_input("Arrow snapshot every N epochs", value=int(pv("snapshot_every", 1)), step=1,
                               key=f"tr_snap_{sfx}")
        measure_every = g1.number_input(
            "Evaluate every N epochs (0 = auto)", value=int(pv("measure_every", 0) or 0), min_value=0, step=1,
            key=f"tr_measure_{sfx}",
            help="The held-out PGD evaluation (natural / robust test accuracy) runs every N epochs and at the last; "
                 "the probe ΔE(x) of Fig. 3 is measured every epoch. Auto: N is chosen after the first epoch from "
                 "its training and probe times, so that measuring costs at most 25% of an epoch.")
        h1, h2, h3, h4 = st.columns(4)
        train_limit = h1.number_input("Training images (0 = all)", value=int(P.get("train_limit") or 0), step=256,
                                      key=f"tr_limit_{sfx}")
        wd = h2.number_input("Weight decay", value=float(pv("weight_decay", BASE.weight_decay)), format="%.5f",
                             step=1e-4, key=f"tr_wd_{sfx}")
        momentum = h3.number_input("Momentum", value=float(pv("momentum", BASE.momentum)), step=0.05, key=f"tr_mom_{sfx}")
        augment = h4.checkbox("Augment (crop, flip)", value=bool(pv("augment", True)), key=f"tr_aug_{sfx}")
        amp = h4.checkbox("bf16 autocast (CUDA)", value=bool(pv("amp", False)), key=f"tr_amp_{sfx}")
        compile_ = h4.checkbox("torch.compile", value=bool(pv("compile", False)), key=f"tr_compile_{sfx}",
                               help="Compile the training forwards (a minute of compiling first; faster steps on a "
                                    "GPU). If compiling fails, the run continues without it and says so.")
    s1, s2, _ = st.columns([1, 1, 3])
    launch = s1.form_submit_button("Launch", type="primary", key=f"tr_launch_{ver}")
    check = s2.form_submit_button("Check & show CLI", key=f"tr_check_{ver}")


def form_config() -> dict:
    cfg = {"method": method, "dataset": dataset, "arch": arch, "epochs": int(epochs), "batch_size": int(batch),
           "lr": float(lr), "momentum": float(momentum), "weight_decay": float(wd), "schedule": schedule,
           "eps": float(eps255) / 255, "attack_steps": int(steps), "seed": int(seed), "device": device,
           "weight_norm": wnorm, "weight_logits": wlog, "eval_steps": int(eval_steps), "eval_samples": int(eval_samples),
           "snapshot_every": int(snap), "augment": bool(augment), "amp": bool(amp)}
    if probe_size:  # 0 = auto: left out, so the trainer sizes the probe set to the training set
        cfg["probe_size"] = int(probe_size)
    if measure_every:  # 0 = auto: left out, so the trainer chooses the period from the first epoch's costs
        cfg["measure_every"] = int(measure_every)
    if compile_:
        cfg["compile"] = True
    if float(beta) != lcfg.beta:
        cfg["beta"] = float(beta)
    for k, v in (("inner", inner), ("outer", outer), ("weighting", weighting)):
        if v != DEFAULT:
            cfg[k] = v
    if float(step255) != 0:
        cfg["step_size"] = float(step255) / 255
    if int(burn_in) != 0:
        cfg["burn_in"] = int(burn_in)
    if int(train_limit) != 0:
        cfg["train_limit"] = int(train_limit)
    if run_name.strip():
        cfg["name"] = run_name.strip()
    return cfg


def validate(cfg: dict) -> TrainConfig:
    """TrainConfig.validate (every rule lives there) with the real training-set size; raises EnergyLensError."""
    tc = TrainConfig.from_dict({**cfg, "out_dir": "runs/check"})
    tc.validate()                       # cheap checks first: no dataset load for an obviously bad form
    ds = common.load_dataset_cached(dataset, "train")
    n_train = min(len(ds), cfg["train_limit"]) if cfg.get("train_limit") else len(ds)
    return tc.validate(n_train)


if launch or check:
    with common.guard("checking the training settings"):
        cfg = form_config()
        validate(cfg)
        name = cfg.get("name")
        if launch:
            info = jobs.submit("train", cfg, name=name, device=device)
            st.session_state["tr_view_request"] = info.id
            st.session_state.pop("tr_prefill", None)
            st.success(f"Started training job **{common.plain(info.name)}** ({info.id}, status {info.status}). "
                       "It runs in the background; its progress and plots show below.")
        else:
            st.success("The settings are valid.")
        with st.expander("Equivalent command line", expanded=bool(check)):
            st.code(cli_text(cfg, name, device), language="bash")

# ============================================================================= sweeps (dashboard/sweep_panel.py)
st.divider()
import sweep_panel  # noqa: E402

sweep_panel.render()

# ============================================================================= run list
st.divider()
st.subheader("Runs")


def list_train_jobs():
    try:
        return jobs.list_jobs(kind="train")
    except EnergyLensError as e:
        st.error(f"Cannot read the job registry: {e}")
        return []


all_jobs = list_train_jobs()
active_ids = sorted(j.id for j in all_jobs if j.active)


def fmt_time(seconds) -> str:
    if seconds is None:
        return "–"
    s = int(seconds)
    return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# Material icons (as the sidebar uses): emoji render as empty boxes in a browser without an emoji font
STATUS_ICON = {"queued": ":material/hourglass_empty:", "running": ":material/directions_run:",
               "done": ":material/check_circle:", "failed": ":material/error:", "stopped": ":material/stop_circle:"}


def run_actions(info) -> None:
    """Buttons of one run: stop / resume / duplicate / delete (with confirmation)."""
    confirming = st.session_state.get("tr_confirm_delete") == info.id and info.status != "running"
    cols = iter(st.columns([1, 1, 1, 1, 3] if not confirming else [1, 1, 2, 1, 1, 1]))
    if info.active:
        if next(cols).button("Stop", key=f"tr_stop_{info.id}"):
            with common.guard(f"stopping {info.id}"):
                jobs.stop_job(info.id, grace=5.0)
                st.rerun(scope="app")
    elif info.status in ("stopped", "failed"):
        if next(cols).button("Resume", key=f"tr_resume_{info.id}", help="continue from the last completed epoch"):
            with common.guard(f"resuming {info.id}"):
                jobs.resume_job(info.id)
                st.session_state["tr_view_request"] = info.id
                st.rerun(scope="app")
    if next(cols).button("Duplicate", key=f"tr_dup_{info.id}", help="open the form prefilled with this run's settings"):
        st.session_state["tr_prefill"] = {k: v for k, v in (info.config or {}).items() if k not in ("resume", "out_dir")}
        st.session_state["tr_prefill_name"] = info.name
        st.session_state["tr_form_ver"] = st.session_state.get("tr_form_ver", 0) + 1
        st.rerun(scope="app")
    if info.status == "running":
        return
    if confirming:
        next(cols).warning("Delete the run and its folder?")
        if next(cols).button("Yes, delete", key=f"tr_del_yes_{info.id}", type="primary"):
            with common.guard(f"deleting {info.id}"):
                jobs.delete_job(info.id)
                st.session_state.pop("tr_confirm_delete", None)
                st.rerun(scope="app")
        if next(cols).button("Cancel", key=f"tr_del_no_{info.id}"):
            st.session_state.pop("tr_confirm_delete", None)
            st.rerun(scope="app")
    elif next(cols).button("Delete", key=f"tr_del_{info.id}"):
        st.session_state["tr_confirm_delete"] = info.id
        st.rerun(scope="app")


@st.fragment(run_every=2.0 if active_ids else None)
def runs_panel() -> None:
    with common.guard("listing the runs"):
        cur = list_train_jobs()
        if sorted(j.id for j in cur if j.active) != active_ids:
            st.rerun(scope="app")          # a run started or ended: refresh everything (and stop polling)
        common.registry_warning()          # the registry was rebuilt from the run folders
        if not cur:
            st.info("No training runs of yours yet. Launch one above, or open a recorded run below to see Fig. 3 at "
                    "once.")
            return
        for info in cur[:30]:
            with st.container(border=True):
                cfg = info.config or {}
                c1 = st.container()
                c1.markdown(f"{STATUS_ICON.get(info.status, '')} **{common.plain(info.name)}** · `{info.id}` · "
                            f"{info.status}  \n"
                            f"{cfg.get('method', '?')} · {cfg.get('dataset', '?')} · {cfg.get('arch', '?')} · "
                            f"{cfg.get('epochs', '?')} epochs · device {info.device} · "
                            + ("waiting for a free slot" if info.status == "queued"
                               else f"running time {fmt_time(info.duration)}"))
                c1.progress(max(0.0, min(1.0, float(info.progress or 0.0))), text=info.message or info.status)
                run_actions(info)
                if info.status == "failed" and info.error:
                    st.error(f"Failed: {info.error.splitlines()[0] if info.error else ''}")
                    with st.expander("Error and log tail"):
                        st.code(info.error)
                        st.code(jobs.read_log_tail(info.id, 30) or "(empty log)")
        if len(cur) > 30:
            st.caption(f"{len(cur) - 30} older runs are not shown (delete some, or use `python -m core.jobs list`).")


runs_panel()

recorded = list_recorded()
if recorded:
    with st.expander(f"Recorded runs ({len(recorded)}): real training runs shipped with EnergyLens, read-only",
                     expanded=not all_jobs):
        st.caption("Made by the project's own training CLI on the CIFAR-10 demo pack (the 500 demo test images held "
                   "out), same seed and budget for every method of a group: the cifar10-demo-2k runs on 2,000 "
                   "training images without augmentation (Fig. 3 above), the others on all 4,585 with augmentation. "
                   "Open one below to see its plots, or compare it with your own runs.")
        for rr in recorded:
            cfg = rr.config or {}
            line = (f":material/history: **{rr.name}** · {cfg.get('method', '?')} · {cfg.get('dataset', '?')} "
                    f"({overfitting.recipe(cfg)}) · {cfg.get('arch', '?')} · {cfg.get('epochs', '?')} epochs")
            if rr.error:
                st.markdown(line)
                st.error(f"Cannot open this recorded run: {rr.error}")
                continue
            c1, c2 = st.columns([5, 1])
            c1.markdown(line + (f"  \n`{rr.command}`" if rr.command else ""))
            if c2.button("Open", key=f"tr_open_{rr.name}"):
                st.session_state["tr_view_request"] = rr.id


# ============================================================================= Fig. 3, told on the recorded runs
@st.cache_data(max_entries=4, show_spinner=False)
def recorded_story(names: tuple[str, ...], stamp: tuple) -> dict:
    return story([r for r in recorded if r.name in names])


def story_block() -> None:
    fig3 = [r for r in recorded if r.name in FIG3_RUNS and not r.error]
    if not fig3:
        return
    stamp = tuple((r.name, RunDir(r.run_dir).metrics.stat().st_mtime_ns) for r in recorded if not r.error)
    data = recorded_story(tuple(r.name for r in recorded), stamp)
    runs = {n: data[n] for n in FIG3_RUNS if n in data}
    if not runs:
        return
    st.divider()
    st.subheader("Fig. 3 on real images: the three phases of robust overfitting")
    first = next(iter(runs.values()))
    st.caption(f"Recorded runs on CIFAR-10 demo training images — {first['recipe']} — (DemoNet, L∞ ε = 8/255, PGD-5 "
               "with step 2/255 inside training, 40 epochs, learning rate ×0.1 at epochs 20 and 30), measured on the "
               "500 demo test images with PGD-10 after every epoch. Phases are detected from SAT's ΔE(x) alone "
               "(core.phase), never from the test accuracy.")
    sat = next((n for n in runs if runs[n]["method"] == "sat"), None)
    res = runs[sat]["summary"] if sat else None      # its phase boundaries come from ΔE(x) alone (core.phase)
    labels = {n: runs[n]["method"].upper() for n in runs}
    st.plotly_chart(tfig.overfitting_story_figure({labels[n]: runs[n] for n in runs}, res,
                                                  labels.get(sat) if sat else None),
                    key="tr_story_fig", width="stretch")
    for n, r in runs.items():
        st.markdown(f"- {overfitting.sentence(r['summary'])}")
    sums = {r["method"]: r["summary"] for r in runs.values()}
    if "sat" in sums and "trades" in sums and sums["sat"].dE_end is not None and sums["trades"].dE_end is not None:
        ratio = abs(sums["trades"].dE_end) / max(abs(sums["sat"].dE_end), 1e-12)
        st.markdown(f"TRADES keeps ΔE(x) at {sums['trades'].dE_end:+.3f} where SAT's falls to {sums['sat'].dE_end:+.3f} "
                    f"({ratio:.0%} of it): the paper's claim that TRADES does not let the energy gap open. "
                    + ("Its robust accuracy fell less, " if sums["trades"].drop < sums["sat"].drop else
                       "Yet its robust accuracy fell as far, ")
                    + f"{100 * sums['trades'].drop:.1f} points against SAT's {100 * sums['sat'].drop:.1f}.")
    contrast = [data[n] for n in CONTRAST_RUNS if n in data]
    if contrast:
        with st.expander(f"The contrast: the same methods on {contrast[0]['recipe']} images"):
            for r in contrast:
                st.markdown(f"- {overfitting.sentence(r['summary'])}")
    if sat and all((BUNDLED_DIR / f"{n}.safetensors").is_file() for n in (tour.SAT_PEAK, tour.SAT_END)):
        st.button(f"Compare the peak (epoch {runs[sat]['summary'].peak_epoch}) and the end in the Attack Lab",
                  key="tr_peak_vs_end", on_click=tour.open_step, args=(tour.PEAK_VS_END,),
                  help="Opens the Attack Lab side by side on SAT's checkpoint at its robust-accuracy peak and at "
                       "its last epoch: the same images, the same PGD-10, arrows and ΔE(x) for both.")


if story_slot is not None:
    with story_slot:
        story_block()
else:
    story_block()


def run_metrics(info) -> list:
    """Per-epoch records of a job or of a recorded run."""
    if getattr(info, "recorded", False):
        return read_recorded_metrics(info)
    return jobs.read_metrics(info.id)


# ============================================================================= live plots of one run
viewable = [j for j in all_jobs] + [r for r in recorded if not r.error]
if not viewable:
    st.stop()
st.divider()
st.subheader("Energy dynamics of a run")
ids = [j.id for j in viewable]
by_id = {j.id: j for j in viewable}
# widget keys are only written here, before their widgets exist in this run (buttons inside the
# fragments leave a request instead)
req = st.session_state.pop("tr_view_request", None)
if req in ids:
    st.session_state["tr_view"] = req
elif req is not None:   # only a shared link asks for a run that is not here
    st.info(f"The run {common.plain(req)} of the link is not here: another run is shown.")
if "tr_compare" in st.session_state:
    st.session_state["tr_compare"] = [i for i in st.session_state["tr_compare"] if i in ids]
if st.session_state.get("tr_view") not in ids:
    st.session_state["tr_view"] = next((j.id for j in viewable if j.active), ids[0])
def run_label(i: str) -> str:
    info = by_id[i]
    if getattr(info, "recorded", False):
        return f"{info.name} (recorded run, {(info.config or {}).get('method', '?')})"
    return f"{info.name} ({(info.config or {}).get('method', '?')}, {i})"


view_id = st.selectbox("Run", ids, key="tr_view",   # no status in the label: a keyed widget keeps its old labels
                       format_func=run_label)
v1, v2, v3 = st.columns([2, 1, 1])
smooth_w = v1.slider("Smoothing (display only; the raw line stays faint)", 0.0, 0.95, 0.0, 0.05, key="tr_smooth")
stat = v2.radio("Statistic over the probe set", ["mean", "median"], horizontal=True, key="tr_stat")
show_joint = v3.checkbox("Also ΔE(x, y)", value=True, key="tr_joint")
skey = "q50" if stat == "median" else "mean"


@st.cache_data(max_entries=64, show_spinner=False)
def detect_cached(epochs: tuple, values: tuple) -> phase.PhaseResult:
    return phase.detect_phases(np.asarray(values, float), np.asarray(epochs, float))


def series(recs, key):
    return phase.metric_series(recs, key)


num = overfitting.finite_number   # a finite number from a metrics record, else None (missing, text, NaN)


def fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def measuring_caption(cfg: dict, recs) -> None:
    """The evaluation period (set or auto) and what measuring costs the run."""
    mc = measurement_cost(recs)
    if not mc or not mc["every"]:
        return
    k = mc["every"]
    how = "set" if cfg.get("measure_every") else "auto"
    text = f"Test accuracy evaluated every {k} epoch{'s' if k > 1 else ''} ({how}) and at the last; ΔE every epoch."
    per = mc["eval_s"] if mc["eval_s"] is not None else mc["eval_estimate_s"]
    if per is not None and mc["train_s"]:
        text += (f" One evaluation {'takes' if mc['eval_s'] is not None else 'should take (estimate)'} "
                 f"{per:.1f} s = {per / mc['train_s']:.2f}× a training epoch ({mc['train_s']:.1f} s)")
        if mc["share"] is not None:
            text += f"; measuring (evaluation ÷ {k} + probe) is {mc['share']:.0%} of an average epoch"
        text += "."
    st.caption(text)


def fig3_block(info, recs) -> None:
    ep, de = series(recs, f"dE_{skey}")
    _, dey = series(recs, f"dEy_{skey}")
    _, rob = series(recs, "rob_err")
    _, nat = series(recs, "nat_err")
    res = detect_cached(tuple(ep.tolist()), tuple(de.tolist()))
    sm = (lambda v: phase.smooth(v, smooth_w)) if smooth_w > 0 else (lambda v: None)
    curves = {"ΔE(x)": (de, sm(de))}
    if show_joint:
        curves["ΔE(x, y)"] = (dey, sm(dey))
    good = [r for r in recs if isinstance(r, dict) and num(r, f"dE_{skey}") is not None]
    last = good[-1] if good else recs[-1]
    m1, m2, m3, m4 = st.columns(4)
    cfg = info.config or {}
    m1.metric("Epoch", f"{fmt(num(last, 'epoch') or len(recs), '.0f')} / {cfg.get('epochs', '?')}")
    m2.metric("Natural accuracy", fmt(num(last, "nat_acc"), ".1%"))
    m3.metric("PGD accuracy", fmt(num(last, "pgd_acc"), ".1%"))
    m4.metric(f"ΔE(x) ({stat})", fmt(num(last, f"dE_{skey}"), "+.4f"))
    f3 = tfig.phase_figure(ep, curves, {"robust test error": rob, "natural test error": nat}, res,
                           title=f"ΔE during training — {info.name} ({cfg.get('method', '?')})")
    st.plotly_chart(f3, width="stretch", config=fig.PLOT_CONFIG, key="tr_fig3")
    n_probe = num(last, "probe_size") or cfg.get("probe_size")
    slides.slide_panel(f3, f"Fig. 3 — ΔE(x) = E(x) − E(x*) of the probe training images ({stat}) during training · "
                           f"run {info.name} · method {cfg.get('method', '?')}"
                           + (f" · {int(n_probe)} probe images" if n_probe else "") + " · error rates on test images",
                       key="slide_fig3", name=f"fig3_{info.name}")
    measuring_caption(cfg, recs)
    # one verdict: whether the run overfits is judged by its robust test accuracy (core.overfitting: a drop beyond
    # SIGNIFICANT_SE standard errors); the ΔE(x) phases are described under it, named as the paper names them
    o = overfitting.summarize(recs, cfg.get("method"), cfg.get("eval_samples"), key=f"dE_{skey}")
    if o is not None:
        verdict = overfitting.sentence(o)
        if o.significant:
            has_best = RunDir(info.run_dir).best.is_file() if info.run_dir else False
            st.warning(verdict + (f" The best checkpoint (`best.safetensors`, highest PGD accuracy) is from epoch "
                                  f"{o.peak_epoch}." if has_best else ""))
        else:
            st.info(verdict)
    st.caption(tfig.phase_sentence(res))


def arrows_block(info, recs) -> None:
    eps_avail = RunDir(info.run_dir).probe_epochs()
    if not eps_avail:
        st.info("No probe snapshot yet: they are written at the end of each snapshot epoch.")
        return
    follow = info.active and st.checkbox("Follow the latest epoch", value=True, key=f"tr_follow_{info.id}")
    if follow or len(eps_avail) == 1:
        epoch = eps_avail[-1]
        st.caption(f"Epoch {epoch}" + (" (latest)" if follow else ""))
    else:
        epoch = st.select_slider("Epoch of the snapshot", options=eps_avail, value=eps_avail[-1],
                                 key=f"tr_arrow_epoch_{info.id}")
    pr = RunDir(info.run_dir).load_probe(epoch)
    c1, c2 = st.columns([3, 2])
    with c1:
        st.plotly_chart(fig.energy_arrows(pr["e_nat"], pr["ej_nat"], pr["e_adv"], pr["ej_adv"],
                                          title=f"Probe samples, epoch {epoch}: natural → adversarial (Fig. 1 b–d)",
                                          labels=pr.get("labels")),
                        width="stretch", config=fig.PLOT_CONFIG, key="tr_arrows")
    with c2:
        d = pr["e_nat"] - pr["e_adv"]
        dj = pr["ej_nat"] - pr["ej_adv"]
        st.metric("mean ΔE(x) at this epoch", f"{float(np.mean(d)):+.4f}")
        st.metric("mean ΔE(x, y) at this epoch", f"{float(np.mean(dj)):+.4f}")
        if "correct_nat" in pr and "correct_adv" in pr:
            cfg = info.config or {}
            kl = cfg.get("inner") == "kl" or (cfg.get("inner") in (None, "default")
                                             and str(cfg.get("method", "")).startswith(("trades", "mail-trades")))
            eps = cfg.get("eps")
            measured = (f"{'TRADES-KL' if kl else 'PGD'}-{cfg.get('attack_steps', '?')}"
                        + (f" at ε = {float(eps) * 255:.0f}/255" if isinstance(eps, (int, float)) else "")
                        + ", the run's training attack")
            st.metric("probe accuracy natural → adversarial",
                      f"{float(np.mean(pr['correct_nat'])):.1%} → {float(np.mean(pr['correct_adv'])):.1%}",
                      help=f"adversarial = under {measured}")
            st.caption(f"Adversarial probe accuracy measured with {measured}.")
        st.caption("Short arrows = natural and adversarial energies stay aligned (what TRADES and WEAT aim for); "
                   "long leftward arrows = adversarial points look *more* likely to the model than the data.")
    st.session_state["tr_probe_epoch"] = epoch


def weights_block(info, recs) -> None:
    eps_avail = RunDir(info.run_dir).probe_epochs()
    epoch = st.session_state.get("tr_probe_epoch")
    if epoch not in eps_avail:
        epoch = eps_avail[-1] if eps_avail else None
    w = RunDir(info.run_dir).load_probe(epoch).get("w_probe") if epoch is not None else None
    ep, _ = series(recs, "epoch")
    stats = {k: series(recs, k)[1] for k in ("w_mean", "w_std", "w_min", "w_max")}
    st.plotly_chart(tfig.weight_figure(w, epoch, ep, stats), width="stretch", config=fig.PLOT_CONFIG, key="tr_weights")
    if not any(np.isfinite(v).any() for v in stats.values()):
        st.caption(f"'{(info.config or {}).get('method', '?')}' does not weight its loss: only the probe weights (what "
                   "WEAT would use) are shown.")


@st.fragment(run_every=2.0 if by_id[view_id].active else None)
def live_view(job_id: str, was_active: bool) -> None:
    with common.guard("drawing the run"):
        info = by_id[job_id] if getattr(by_id[job_id], "recorded", False) else jobs.get_job(job_id)
        if was_active and not info.active:
            st.rerun(scope="app")
        recs = run_metrics(info)
        if info.active:
            st.progress(max(0.0, min(1.0, float(info.progress or 0))), text=f"{info.status}: {info.message}")
            batch_log = [] if getattr(info, "recorded", False) else RunDir(info.run_dir).read_batches()
            if batch_log:
                with st.expander("Training loss by batch (live)", expanded=not recs):
                    st.plotly_chart(tfig.batch_loss_figure(batch_log), width="stretch", config=fig.PLOT_CONFIG,
                                    key="tr_batch_loss")
        if not recs:
            st.info("Waiting for the first epoch to finish: ΔE(x) is measured on the probe set at the end of each "
                    "epoch (the batch counter and ETA above move meanwhile)." if info.active else
                    "This run has no recorded epoch.")
            return
        # stacked, not in tabs: a fragment that re-renders every 2 s would reset the selected tab
        fig3_block(info, recs)
        st.markdown("##### Arrow snapshots of the probe set (Fig. 1 b–d)")
        with common.guard("drawing the arrow snapshot"):
            arrows_block(info, recs)
        st.markdown("##### WEAT weights")
        with common.guard("drawing the weights"):
            weights_block(info, recs)
        if getattr(info, "recorded", False):
            with st.expander("The command that made this run"):
                st.code(info.command or "(no COMMAND file)", language="bash")
        else:
            with st.expander("Log tail"):
                st.code(jobs.read_log_tail(job_id, 30) or "(empty log)")
        st.download_button("Download metrics (JSON lines)", "".join(json.dumps(r) + "\n" for r in recs),
                           file_name=f"{job_id}_metrics.jsonl", mime="application/json", key="tr_dl_metrics")


live_view(view_id, by_id[view_id].active)

# ============================================================================= comparison
st.divider()
st.subheader("Compare runs (Table 2a)")
default_cmp = ([j.id for j in viewable if j.status == "done"][:4]
               or [r.id for r in recorded if not r.error and r.name in FIG3_RUNS]
               or [r.id for r in recorded if not r.error][:4] or ids[:2])
chosen = st.multiselect("Runs to compare", ids, key="tr_compare",
                        default=None if "tr_compare" in st.session_state else [i for i in default_cmp if i in ids],
                        format_func=run_label)


@st.fragment(run_every=2.0 if any(by_id[i].active for i in chosen) else None)
def compare_view(chosen_ids: list) -> None:
    if not chosen_ids:
        st.info("Pick runs to overlay their ΔE curves.")
        return
    with common.guard("comparing runs"):
        curves, marks, rows = {}, {}, []
        for i in chosen_ids:
            info = by_id[i]
            recs = run_metrics(info)
            if not recs:
                continue
            method = (info.config or {}).get("method", "?")
            label = f"{info.name} ({method})"
            ep, de = series(recs, f"dE_{skey}")
            curves[label] = (ep, phase.smooth(de, smooth_w) if smooth_w > 0 else de)
            res = detect_cached(tuple(ep.tolist()), tuple(de.tolist()))
            if res.phase3_start is not None:
                marks[label] = res.phase3_start
            # the final value = the last finite one (a torn or partial last record is skipped)
            fin = np.isfinite(de)
            k = int(np.nonzero(fin)[0][-1]) if fin.any() else len(recs) - 1
            _, dey = series(recs, f"dEy_{skey}")
            _, nat = series(recs, "nat_acc")
            _, pgd = series(recs, "pgd_acc")

            def at(v):
                return float(v[k]) if k < len(v) and np.isfinite(v[k]) else None

            rows.append({"run": label, "method": method, "epochs": int(ep[k]) if len(ep) else 0,
                         "dE_mean": at(de), "dEy_mean": at(dey), "nat_acc": at(nat), "pgd_acc": at(pgd),
                         "phase 3 from": res.phase3_start})
        if not curves:
            st.info("The chosen runs have no recorded epoch yet.")
            return
        a, b = st.columns([3, 2])
        with a:
            st.plotly_chart(tfig.compare_curves(curves, marks, ylabel=f"ΔE(x) ({stat})"), width="stretch",
                            config=fig.PLOT_CONFIG, key="tr_cmp_curves")
        with b:
            st.plotly_chart(tfig.final_bars(rows, "dE_mean", f"final ΔE(x) ({stat})"), width="stretch",
                            config=fig.PLOT_CONFIG, key="tr_cmp_bars")
        st.dataframe([{"run": r["run"], "epochs": r["epochs"], f"ΔE(x) {stat}": r["dE_mean"],
                       f"ΔE(x,y) {stat}": r["dEy_mean"], "natural acc.": fmt(r["nat_acc"], ".1%"),
                       "PGD acc.": fmt(r["pgd_acc"], ".1%"),
                       "phase 3 from epoch": "–" if r["phase 3 from"] is None else f"{r['phase 3 from']:g}"}
                      for r in rows], width="stretch", hide_index=True)
        st.caption("Diamonds mark a detected phase-3 start. In the paper's Table 2a the final ΔE(x) of WEAT stays closest "
                   "to 0, then MAIL-TRADES and TRADES, with SAT far below.")


compare_view(chosen)
