"""Energy landscape across models (paper Fig. 4): signed ΔE(x) and ΔE(x, y) per model."""

import dataclasses

import common
import numpy as np
import streamlit as st

import analysis_figures as af
import persist
from core import analysis, evaluation
from core.attacks import ATTACKS, AttackSpec
from core.errors import EnergyLensError

st.title("Energy landscape across models")
st.caption("Paper Fig. 4: the more robust a model, the closer ΔE(x) = E(x) − E(x*) stays to zero and the narrower "
           "its spread — adversarial points keep the energy of the natural data.")

with st.expander("What am I looking at?", expanded=False):
    st.markdown(
        r"""
Every selected model is attacked on **the same test images**. For each image we record the signed drifts
$\Delta E(x) = E(x) - E(x^*)$ (marginal) and $\Delta E(x,y) = E(x,y) - E(x^*,y)$ (joint). Untargeted attacks make
$\Delta E(x)$ positive for non-robust models (the adversarial point gets a *lower* energy) and $\Delta E(x,y)$
negative (the true class becomes less likely). The panels are sorted by robust accuracy (under the attack chosen
here) and use a **symmetric-log axis**: linear within ±c, logarithmic beyond, so both tiny and huge drifts are
visible. Results are cached per (model file hash, attack, N, seed): re-running is instant, and a retrained
checkpoint is never confused with its old version.
"""
    )

# ---------------------------------------------------------------- model choice
from core.models.registry import ModelRef, list_bundled, list_local  # noqa: E402

options: dict[str, ModelRef] = {}
labels: dict[str, str] = {}
for src, entries in (("bundled", list_bundled()), ("local", list_local())):
    for r, m, err in entries:
        if m is None:
            continue
        options[r.key] = r
        labels[r.key] = f"{r.name} ({m.method}, {m.dataset}{', ' + src if src != 'bundled' else ''})"
try:
    from core import zoo

    for e in zoo.list_zoo("cifar10", "Linf") + zoo.list_zoo("cifar10", "L2"):
        if e.downloaded:
            r = ModelRef("zoo", e.name, dataset=e.dataset, threat_model=e.threat_model)
            options[r.key] = r
            labels[r.key] = f"{e.name} (RobustBench {e.threat_model}, {e.dataset})"
except EnergyLensError:
    pass

_bundled = [(r, m) for r, m, _ in list_bundled() if m is not None]
bundled_keys = [r.key for r, m in _bundled if m.dataset == _bundled[0][1].dataset] if _bundled else []
chosen = st.multiselect("Models to compare (bundled, your checkpoints and runs, downloaded RobustBench models)",
                        list(options), default=bundled_keys[:4], format_func=lambda k: labels.get(k, k),
                        key="land_models")
if not any(r.source == "zoo" for r in options.values()):
    st.caption("No RobustBench weights are downloaded yet; the Models page explains where to put them.")

first_meta = None
if chosen:
    try:
        first_meta = analysis.describe_ref(options[chosen[0]])
    except EnergyLensError:
        first_meta = None
default_eps = evaluation.default_eps(first_meta, "Linf")

with st.form("land_form"):
    c1, c2, c3, c4 = st.columns(4)
    n = int(c1.number_input("Images (N)", value=128, step=32, key="land_n"))
    split = c2.selectbox("Split", ["test", "train"], key="land_split")
    atk = c3.selectbox("Attack", [k for k in ATTACKS if k in ("pgd", "trades-kl", "cw", "apgd-ce", "apgd-dlr")],
                       format_func=lambda k: ATTACKS[k].label, key="land_attack")
    steps = int(c4.number_input("Steps", value=10, step=1, key="land_steps"))
    c5, c6, c7 = st.columns(3)
    eps255 = float(c5.number_input("ε (× 1/255, L∞)", value=round(default_eps * 255, 2), step=1.0, key="land_eps"))
    seed = int(c6.number_input("Seed", value=0, step=1, key="land_seed"))
    mode = c7.selectbox("Run as", ["auto", "in the dashboard (thread)", "background job"], key="land_mode",
                        help="auto: a thread for small bundled models, a background job for zoo models or big N")
    go = st.form_submit_button("Compute landscape", type="primary")


def _compute(task, refs, spec, n, seed, split, device):
    from core.models.registry import load_model_ref

    models = []
    for i, r in enumerate(refs):
        task.progress(0.02 + 0.08 * i / len(refs), f"loading {r.name}")
        models.append(load_model_ref(r, device=device))
    return analysis.landscape(models, None, None, spec, n=n, seed=seed, split=split, names=[r.name for r in refs],
                              progress=lambda f, m: task.progress(0.1 + 0.9 * f, m))


def _on_done(task):
    st.session_state["land_results"] = task.result
    _keep(task.result)


def _keep(results) -> None:
    arrays = {"count": np.asarray(len(results))}
    for i, r in enumerate(results):
        arrays.update(r.to_arrays(prefix=f"m{i}_"))
    persist.keep("landscape", arrays, {})


restored = persist.restore("landscape")  # the last result of this browser session survives a page reload
if restored is not None and not st.session_state.get("land_results"):
    with common.guard("restoring the last landscape"):
        arr = restored[0]
        st.session_state["land_results"] = [analysis.LandscapeResult.from_arrays(arr, prefix=f"m{i}_")
                                            for i in range(int(arr["count"]))]


if go:
    with common.guard("computing the landscape"):
        refs = [options[k] for k in chosen if k in options]
        analysis.validate_landscape_request(refs, n, split)
        spec = AttackSpec(atk, eps=eps255 / 255, steps=steps, seed=seed, batch_size=128)
        spec.validate()
        device = common.resolve_device(st.session_state.get("device", "auto"))
        big = any(r.source == "zoo" for r in refs) or n * len(refs) > 4096
        use_job = mode == "background job" or (mode == "auto" and big)
        if use_job:
            from core import jobs

            cfg = {"models": [dataclasses.asdict(r) for r in refs], "n": n, "seed": seed, "split": split,
                   "attack": spec.to_dict(), "device": st.session_state.get("device", "auto")}
            info = jobs.submit("landscape", cfg, name=f"landscape: {len(refs)} models × {n}",
                               device=st.session_state.get("device", "auto"))
            st.session_state["land_job"] = info.id
            st.session_state.pop("land_job_loaded", None)
            st.success(f"Started background job {info.id}; its progress shows below.")
        else:
            task = common.start_task("land_task", f"ΔE of {len(refs)} models on {n} images",
                                     lambda t: _compute(t, refs, spec, n, seed, split, device))
            common.wait_briefly(task, 2.0)

common.task_panel("land_task", _on_done)

# ---------------------------------------------------------------- background job (big models)
job_id = st.session_state.get("land_job")
if job_id:
    def _load_results(info):
        if st.session_state.get("land_job_loaded") != info.id:
            with common.guard("loading the job's results"):
                st.session_state["land_results"] = analysis.load_landscape_results(info.run_dir)
                st.session_state["land_job_loaded"] = info.id
                _keep(st.session_state["land_results"])
                st.rerun()

    common.job_panel(job_id, "Landscape job", _load_results)

# ---------------------------------------------------------------- results
results = st.session_state.get("land_results")
if not results:
    promise = ""
    if chosen and chosen[0] in options:
        try:
            promise = (f" With {options[chosen[0]].name}, {n:,} images and {steps} attack steps take "
                       + common.time_promise(common.load_ref(options[chosen[0]]), n,
                                             2 + steps * common.PASSES_PER_GRADIENT_STEP) + " per model.")
        except EnergyLensError:
            promise = ""
    st.info("Choose two or more models and press **Compute landscape**." + promise)
    st.stop()

c1, c2, c3 = st.columns(3)
c = float(c1.select_slider("Linear range ±c of the symmetric-log axis", [0.01, 0.1, 1.0, 10.0], value=1.0,
                           key="land_c"))
kind = c2.radio("Plot", ["violin", "box"], horizontal=True, key="land_kind")
pts = c3.checkbox("Show points", value=False, key="land_pts")
with c3:
    persist.clear_button("landscape", ("land_results", "land_job", "land_job_loaded"))
persist.unsaved_notice("landscape")
with common.guard("drawing the landscape"):
    st.plotly_chart(af.landscape_figure(results, c=c, kind=kind, show_points=pts), width="stretch",
                    key="land_fig", config={"displaylogo": False})
    table = analysis.landscape_table(results)
    trend = analysis.robustness_trend(results)
    a, b = st.columns([3, 2])
    with a:
        st.markdown("**The numbers behind the plot** (sorted by robust accuracy)")
        show = [{"model": r["model"], "method": r["method"], "natural acc.": f"{r['natural_acc']:.1%}",
                 "robust acc.": f"{r['robust_acc']:.1%}", "mean ΔE(x)": round(r["dE_mean"], 4),
                 "mean |ΔE(x)|": round(r["dE_abs_mean"], 4), "std ΔE(x)": round(r["dE_std"], 4),
                 "IQR ΔE(x)": round(r["dE_iqr"], 4), "mean ΔE(x,y)": round(r["dEy_mean"], 4),
                 "std ΔE(x,y)": round(r["dEy_std"], 4), "N": r["n"], "cached": r["cached"]} for r in table]
        st.dataframe(show, width="stretch", hide_index=True)
        import csv
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(table[0].keys()))
        w.writeheader()
        w.writerows(table)
        st.download_button("Download table (CSV)", buf.getvalue(), file_name="landscape.csv", mime="text/csv",
                           key="land_dl")
    with b:
        st.plotly_chart(af.landscape_trend(table), width="stretch", key="land_trend", config={"displaylogo": False})
        # the verdict is computed by core (rank correlation, permutation p-value, bootstrap interval over images)
        st.caption(trend["text"], help=trend["rule"])
        if trend["robust"]["n"] >= 2:
            st.caption(trend["robust"]["text"])
