"""The Training studio's sweep section: submit a grid of runs, watch its progress grid, read its Table 1.

Widgets only; the sweep itself (expansion, submission, status, Table 1) is core.sweep, the backends
core.jobs (local, slurm). ``render()`` is called by pages/training.py.
"""

from __future__ import annotations

import streamlit as st

import common
from core import evaluation, sweep
from core.data import DATASETS
from core.errors import EnergyLensError, InputError

STATUS_MARK = {"queued": "⏳", "running": "▶", "done": "✔", "failed": "✖", "stopped": "■"}
DEFAULT_DATASET = "digits"   # the form's and the example's dataset: embedded, so a sweep runs on any machine


def eval_defaults() -> dict:
    """The evaluation the form and the example start from: core's (core.evaluation.EVAL_DEFAULTS), the number of
    images capped at the default dataset's test set."""
    D = evaluation.EVAL_DEFAULTS
    n_test = len(common.load_dataset_cached(DEFAULT_DATASET, "test"))
    return {"n": evaluation.default_n(n_test), "pgd_steps": int(D["pgd_steps"]),
            "autoattack": bool(D["autoattack"])}


def example() -> str:
    return f"""name: my-sweep
base:
  dataset: {DEFAULT_DATASET}
  arch: {DATASETS[DEFAULT_DATASET].recipe.arch}
  epochs: 5
grid:
  method: [sat, trades]
  seed: [0, 1, 2]
evaluate:
  n: {eval_defaults()["n"]}
backend: local
"""


def _seeds(text: str) -> list[int]:
    out = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part[1:]:
            a, b = part.split("-", 1)
            if not (a.strip().isdigit() and b.strip().isdigit()) or int(b) < int(a):
                raise InputError(f"seeds: '{part}' is not a range like 0-4")
            out.extend(range(int(a), int(b) + 1))
        elif part.isdigit():
            out.append(int(part))
        else:
            raise InputError(f"seeds must be integers or ranges, e.g. '0, 1, 2' or '0-4'; got '{part}'")
    if not out:
        raise InputError("give at least one seed")
    return sorted(set(out))


def _form_spec() -> dict | str:
    """The sweep the widgets describe (a dict), or the pasted file (text)."""
    from core.losses import METHODS

    mode = st.radio("Describe the sweep", ["with the form", "as a sweep file (YAML or JSON)"], horizontal=True,
                    key="sw_mode")
    if mode != "with the form":
        text = st.text_area("Sweep file", value=example(), height=260, key="sw_text",
                            help="The same file `python -m core.jobs sweep FILE.yaml` takes: base (training options), "
                                 "grid (lists to combine), evaluate, backend. See examples/table1a_cifar10.yaml.")
        st.checkbox("I mean to run the shell lines of backend 'setup'", value=False, key="sw_allow_setup",
                    help="A Slurm backend's `setup` lines are arbitrary shell commands, run on every cluster node "
                         "before each run, with your account's rights. A sweep file that has them is refused unless "
                         "this is ticked: read them first.")
        st.caption("⚠ `backend.setup` is arbitrary shell, run on the cluster nodes: only tick the box above for lines "
                   "you wrote or have read.")
        return text
    c1, c2, c3 = st.columns(3)
    methods = c1.multiselect("Methods", list(METHODS), default=["sat", "trades"], key="sw_methods")
    datasets = c2.multiselect("Datasets", list(DATASETS), default=[DEFAULT_DATASET], key="sw_datasets")
    seeds = c3.text_input("Seeds", value="0, 1, 2", key="sw_seeds", help="e.g. '0, 1, 2' or '0-4'")
    c4, c5, c6, c7 = st.columns(4)
    epochs = c4.number_input("Epochs", 1, 10_000, 5, key="sw_runepochs")
    arch = c5.text_input("Architecture", value=DATASETS[DEFAULT_DATASET].recipe.arch, key="sw_arch",
                         help="smallcnn / demonet for the small datasets, resnet18 as in the paper")
    limit = c6.number_input("Training images (0 = all)", 0, 10_000_000, 0, key="sw_trainimages")
    ev = eval_defaults()
    n_eval = c7.number_input("Test images evaluated", 1, 100_000, ev["n"], key="sw_evalimages",
                             help="natural / PGD-20 / AutoAttack on the first n test images of each finished run")
    c8, c9, c10 = st.columns(3)
    aa = c8.checkbox("AutoAttack (standard)", value=ev["autoattack"], key="sw_aa")
    pgd_steps = c9.number_input("PGD steps (evaluation)", 1, 1000, ev["pgd_steps"], key="sw_evalsteps")
    name = c10.text_input("Sweep name", value="sweep", key="sw_name")
    backend = st.radio("Backend", ["local", "slurm"], horizontal=True, key="sw_backend",
                       help="local: this machine's job queue (one run per GPU). slurm: a cluster through submitit "
                            "(run the dashboard on a login node; the runs folder must be on a shared filesystem)")
    spec: dict = {"name": name, "base": {"arch": arch.strip(), "epochs": int(epochs)},
                  "grid": {"method": methods, "dataset": datasets, "seed": _seeds(seeds)},
                  "evaluate": {"n": int(n_eval), "autoattack": bool(aa), "pgd_steps": int(pgd_steps)}}
    if not methods or not datasets:
        raise InputError("choose at least one method and one dataset")
    if limit:
        spec["base"]["train_limit"] = int(limit)
    if backend == "slurm":
        s1, s2, s3 = st.columns(3)
        part = s1.text_input("Partition", value="", key="sw_partition")
        gpus = s2.number_input("GPUs per run", 0, 64, 1, key="sw_gpusperrun")
        tlim = s3.text_input("Time limit per run", value="04:00:00", key="sw_time", help="minutes or [D-]HH:MM:SS")
        spec["backend"] = {"name": "slurm", "gpus_per_job": int(gpus), "time": tlim.strip()}
        if part.strip():
            spec["backend"]["partition"] = part.strip()
    else:
        spec["backend"] = {"name": "local"}
    return spec


def _submit_block() -> None:
    with st.expander("New sweep: methods × seeds × datasets (× any training option)", expanded=False):
        st.caption("Every combination becomes an ordinary training job (listed under Runs, with its Fig. 3); when it "
                   "finishes, its best checkpoint is evaluated (natural / PGD / AutoAttack) and the sweep's Table 1 "
                   "below fills in.")
        spec = None
        with common.guard("reading the sweep settings"):
            spec = _form_spec()
        b1, b2, _ = st.columns([1, 1, 3])
        go = b1.button("Submit sweep", type="primary", key="sw_submit")
        check = b2.button("Check", key="sw_check")
        if spec is None or not (go or check):
            return
        with common.guard("submitting the sweep" if go else "checking the sweep"):
            allow = bool(st.session_state.get("sw_allow_setup")) and not isinstance(spec, dict)
            parsed = sweep.parse_spec(spec, allow_setup=False) if isinstance(spec, dict) else \
                sweep.parse_spec(spec, fmt="yaml", source="the sweep file", allow_setup=allow)
            runs = sweep.expand(parsed)
            if check:
                st.success(f"The sweep is valid: {len(runs)} runs on the {parsed.backend['name']} backend.")
                return
            rec = sweep.submit_sweep(parsed, allow_setup=allow)
            st.session_state["sw_view_request"] = rec["id"]
            st.success(f"Submitted sweep **{common.plain(rec['name'])}** ({rec['id']}): {len(rec['cells'])} runs on the "
                       f"{rec['backend']['name']} backend.")


def _fmt_cell(c: dict) -> str:
    s = c["status"]
    mark = STATUS_MARK.get(s, "?")
    if s == "done" and c.get("aa") is not None:
        return f"{mark} nat {100 * c['natural']:.1f} · AA {100 * c['aa']:.1f}"
    if s == "done" and c.get("pgd") is not None:
        return f"{mark} nat {100 * c['natural']:.1f} · PGD {100 * c['pgd']:.1f}"
    if s == "running":
        return f"{mark} {c['progress']:.0%}"
    return f"{mark} {s}"


def _grid_table(st_: dict) -> list[dict]:
    g = st_["grid"]
    rows = []
    for r in g["rows"]:
        row = {a: str(v) for a, v in r["axes"].items()}
        for s in g["seeds"]:
            c = r["cells"].get(s)
            row["run" if s is None else f"seed {s}"] = _fmt_cell(c) if c else "—"
        rows.append(row)
    return rows


def _sweep_view(sweep_id: str) -> None:
    s = sweep.status(sweep_id)
    rec = s["sweep"]
    active = any(c["status"] in ("queued", "running") for c in s["cells"])
    counts = ", ".join(f"{n} {k}" for k, n in sorted(s["counts"].items()))
    st.markdown(f"**{common.plain(rec['name'])}** · `{rec['id']}` · backend {rec['backend']['name']} · "
                f"{len(s['cells'])} runs: {counts}")
    st.dataframe(_grid_table(s), hide_index=True, width="stretch")
    failed = [c for c in s["cells"] if c["status"] == "failed"]
    for c in failed[:5]:
        st.error(f"{c['job_id']}: {c['message']}")
    if active and st.button("Stop the sweep's queued and running jobs", key=f"sw_stop_{sweep_id}"):
        with common.guard("stopping the sweep"):
            n = sweep.stop_sweep(sweep_id)
            st.success(f"Stopped {n} jobs.")
    tab = sweep.table(sweep_id)
    st.markdown("**Table 1** (mean ± std over seeds, %; built from each run's evaluation record)")
    if not len(tab):
        st.info("No run has finished its evaluation yet: the table fills in as runs finish.")
        return
    st.dataframe([{k: r[k] for k in ("method", "dataset", "arch", "eps", "runs", "natural", "pgd", "aa")} for r in tab],
                 hide_index=True, width="stretch")
    d1, d2, _ = st.columns([1, 1, 3])
    d1.download_button("Download CSV", tab.to_csv(), file_name=f"{sweep_id}_table1.csv", mime="text/csv",
                       key=f"sw_csv_{sweep_id}")
    d2.download_button("Download Markdown", tab.to_markdown(), file_name=f"{sweep_id}_table1.md", mime="text/markdown",
                       key=f"sw_md_{sweep_id}")


def render() -> None:
    """The whole section: submit form, sweep picker, progress grid and Table 1 (polls while runs are active)."""
    st.subheader("Sweeps (Table 1 in one go)")
    _submit_block()
    try:
        sweeps = sweep.list_sweeps()
    except EnergyLensError as e:
        st.error(f"Cannot read the sweeps: {e}")
        return
    if not sweeps:
        st.caption("No sweeps yet. The command line does the same: `python -m core.jobs sweep examples/"
                   "table1a_cifar10.yaml` (see the README's cluster section).")
        return
    ids = [r["id"] for r in sweeps]
    req = st.session_state.pop("sw_view_request", None)
    if req in ids:
        st.session_state["sw_view"] = req
    if st.session_state.get("sw_view") not in ids:
        st.session_state["sw_view"] = ids[0]
    names = {r["id"]: r.get("name", "?") for r in sweeps}
    view = st.selectbox("Sweep", ids, key="sw_view", format_func=lambda i: f"{names[i]} ({i})")
    active = _is_active(view)

    @st.fragment(run_every=3.0 if active else None)
    def live() -> None:
        with common.guard("reading the sweep"):
            _sweep_view(view)
            if active and not _is_active(view):
                st.rerun(scope="app")  # everything finished: stop polling

    live()


def _is_active(sweep_id: str) -> bool:
    try:
        return any(c["status"] in ("queued", "running") for c in sweep.status(sweep_id)["cells"])
    except EnergyLensError:
        return False

