"""Evaluation: natural / PGD-20 / AutoAttack accuracy as background jobs, and a Table-1 style summary."""

import dataclasses
import time

import common
import streamlit as st

import analysis_figures as af
from core import evaluation
from core.errors import InputError

st.title("Evaluation")
st.caption("Paper Table 1: natural accuracy, PGD-20 and AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square). Each "
           "evaluation is a resumable background job; runs of one method that differ only in the seed are averaged.")

from core import jobs  # noqa: E402

# ---------------------------------------------------------------- launch
ref = st.session_state.get("model_ref")
lm = common.current_model() if ref is not None else None
with st.form("eval_form"):
    st.markdown(f"**Model:** {ref.name if ref else '— choose one in the sidebar —'}")
    meta = lm.meta if lm is not None else None
    default_eps = evaluation.default_eps(meta, "Linf")  # the dataset's budget (core.data.DatasetSpec.default_eps)
    test_ds = common.model_dataset(lm, "test", quiet=True) if lm is not None else None
    D = evaluation.EVAL_DEFAULTS  # every default below is core's
    c1, c2, c3, c4 = st.columns(4)
    n_test = len(test_ds) if test_ds is not None else None
    n = int(c1.number_input("Test images (N)", value=evaluation.default_n(n_test), step=100, key="ev_n"))
    norm = c2.selectbox("Norm", ["Linf", "L2"], index=["Linf", "L2"].index(D["norm"]), key="ev_norm")
    if norm == "Linf":
        eps = float(c3.number_input("ε (× 1/255)", value=round(default_eps * 255, 2), step=1.0, key="ev_eps")) / 255
    else:
        eps = float(c3.number_input("ε (L2)", value=evaluation.default_eps(meta, "L2"), step=0.1, key="ev_eps_l2"))
    steps = int(c4.number_input("PGD steps", value=int(D["pgd_steps"]), step=1, key="ev_steps"))
    c5, c6, c7, c8 = st.columns(4)
    aa = c5.selectbox("AutoAttack", ["standard", "fast (APGD-CE + APGD-T)", "off"], key="ev_aa",
                      help="standard is the RobustBench protocol; on CPU it takes minutes per hundred images")
    chunk = int(c6.number_input("Chunk size (resume unit)", value=int(D["chunk_size"]), step=50, key="ev_chunk"))
    seed = int(c7.number_input("Seed", value=int(D["seed"]), step=1, key="ev_seed"))
    name = c8.text_input("Job name (optional)", key="ev_name")
    go = st.form_submit_button("Launch evaluation job", type="primary")

if go:
    with common.guard("launching the evaluation"):
        if ref is None:
            raise InputError("no model selected: choose a model in the sidebar")
        if lm is None:
            raise InputError(f"model '{ref.name}' could not be loaded (see the message above)")
        ds = common.model_dataset(lm, "test")
        if ds is None:
            raise InputError(f"the test images of '{lm.meta.dataset}' are not available")
        cfg = {"model": dataclasses.asdict(ref), "n": n, "norm": norm, "eps": eps, "pgd_steps": steps,
               "autoattack": aa != "off", "aa_version": "custom" if aa.startswith("fast") else "standard",
               "aa_attacks": ["apgd-ce", "apgd-t"] if aa.startswith("fast") else None, "chunk_size": chunk,
               "batch_size": min(chunk, D["batch_size"]), "seed": seed,
               "device": st.session_state.get("device", "auto")}
        evaluation.resolve_config(cfg, lm.meta, n_available=len(ds))  # every rule, before anything is queued
        info = jobs.submit("eval", cfg, name=name.strip() or f"eval {ref.name} ({aa} AA, N={n})",
                           device=st.session_state.get("device", "auto"))
        st.success(f"Queued evaluation job {info.id}.")

# ---------------------------------------------------------------- jobs
def _show_evaluation(j, c2, c3):
    r = j.result
    c2.markdown(f"natural **{r['natural_acc']:.1%}** · PGD-{r['config']['pgd_steps']} **{r['pgd_acc']:.1%}**"
                + (f" · AA **{r['aa_acc']:.1%}**" if r.get("aa_acc") is not None else "") + f" · N={r['n']}")
    if c3.button("Delete", key=f"ev_del_{j.id}"):
        with common.guard("deleting the job"):
            jobs.delete_job(j.id)
            st.rerun()


all_jobs = common.job_list("eval", "ev", _show_evaluation, heading="Jobs", empty="No evaluation jobs yet.",
                           resumable=True)

# ---------------------------------------------------------------- Table 1
st.subheader("Results (Table 1 style)")
records = [j.result for j in all_jobs if j.status == "done" and j.result]
if not records:
    st.info("Finished evaluations appear here, one row per method (mean ± std over seeds).")
else:
    with common.guard("building the table"):
        table = evaluation.results_table(records)
        st.dataframe([{"Method": r["method"], "Dataset": r["dataset"], "Arch": r["arch"], "ε": r["eps"],
                       "Runs": r["runs"], "Natural": r["natural"], "PGD": r["pgd"], "AA": r["aa"]} for r in table],
                     hide_index=True, width="stretch")
        d1, d2 = st.columns(2)
        stamp = time.strftime("%Y%m%d")
        d1.download_button("Download CSV", table.to_csv(), file_name=f"energylens_table_{stamp}.csv", mime="text/csv",
                           key="ev_csv")
        d2.download_button("Download Markdown", table.to_markdown(), file_name=f"energylens_table_{stamp}.md",
                           mime="text/markdown", key="ev_md")
        st.plotly_chart(af.results_bars(table.rows), width="stretch", key="ev_bars")
        with st.expander("Markdown"):
            st.code(table.to_markdown(), language="markdown")
