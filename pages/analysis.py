"""Sample analysis (paper Fig. 5 a-d): margins vs energies, per-class error / entropy / energy, and the
subset-removal experiment."""

import dataclasses

import common
import streamlit as st

import analysis_figures as af
import persist
from core import analysis
from core.attacks import AttackSpec
from core.errors import EnergyLensError, InputError

lm, meta, classes, default_eps = common.require_model("Sample analysis")
# the last analysis of this browser session survives a page reload, with the model it was made with
restored = persist.restore_with_model("analysis")
if restored is not None and "ana_result" not in st.session_state:
    with common.guard("restoring the last analysis"):
        st.session_state["ana_result"] = persist.unpack_analysis(*restored)
persist.restored_note("analysis", "the sample analysis")

tab_b, tab_a = st.tabs(["Margins, entropy and energy (Fig. 5 b–d)", "Removing subsets (Fig. 5a)"])

# =============================================================================================
with tab_b:
    with st.expander("What am I looking at?", expanded=False):
        st.markdown(
            r"""
* **Fig. 5 b/c** — the probabilistic margin $PM = p(y|x) - \max_{k\neq y} p(k|x)$ (used by MAIL to weight samples)
  against the joint energy $E(x,y)$ and against the marginal energy $E(x)$. The paper finds a good correlation with
  $E(x,y)$ and a weaker one with $E(x)$: weighting by $E(x)$ (WEAT) is *not* the same as weighting by PM.
  MAIL computes PM on adversarial points: tick *adversarial inputs* to do the same.
* **Fig. 5d** — per class, the probabilistic error $1 - p(y|x)$, the entropy of $p(\cdot|x)$ and the mean $E(x)$:
  classes that are hard to classify have high entropy *and* high energy.
"""
        )
    with st.form("ana_form"):
        c1, c2, c3, c4 = st.columns(4)
        split = c1.selectbox("Data", ["train", "test"], key="ana_split")
        n = int(c2.number_input("Images (N, 0 = all)", value=0, step=100, key="ana_n"))
        adv = c3.checkbox("Adversarial inputs (PGD-10 at the model's ε)", value=False, key="ana_adv")
        seed = int(c4.number_input("Seed", value=0, step=1, key="ana_seed"))
        go = st.form_submit_button("Analyse", type="primary")

    def _run(task, x, y, spec):
        st_ = analysis.sample_stats(lm.model, x, y, attack=spec, progress=task.progress)
        return {"stats": st_, "split": split, "adv": spec is not None, "model": meta.name}

    if go:
        with common.guard("analysing samples"):
            ds = common.model_dataset(lm, split)
            if ds is None:
                raise InputError(f"the {split} images of '{meta.dataset}' are not available")
            from core.data import check_image_count, probe_indices

            check_image_count(n, len(ds), split=split, dataset=meta.dataset, allow_all=True)

            idx = probe_indices(ds, n or len(ds), seed=seed)
            x, y = ds.images(idx), ds.labels(idx)
            spec = AttackSpec("pgd", eps=default_eps, steps=10, seed=seed) if adv else None
            task = common.start_task("ana_task", f"statistics of {len(idx)} {split} images",
                                     lambda t: _run(t, x, y, spec))
            common.wait_briefly(task, 2.0)

    def _ana_done(t) -> None:
        st.session_state["ana_result"] = t.result
        arrays, ameta = persist.pack_analysis(t.result)
        persist.keep("analysis", arrays,
                     {**ameta, "model_ref": persist.model_identity(st.session_state.get("model_ref"))})

    common.task_panel("ana_task", _ana_done)

    r = st.session_state.get("ana_result")
    if r is None or r.get("model") != meta.name:
        ds_hint = common.model_dataset(lm, split, quiet=True)
        n_hint = (n or len(ds_hint)) if ds_hint is not None else n
        st.info("Press **Analyse**. " + (
            f"The {split} images of **{meta.dataset}** are not available here; choose the other split."
            if ds_hint is None else
            f"{'All ' if not n else ''}{n_hint:,} {split} images of **{meta.dataset}** take "
            + common.time_promise(lm, n_hint, 1 + (10 * common.PASSES_PER_GRADIENT_STEP if adv else 0)) + "."))
    else:
        s = r["stats"]
        with common.guard("drawing the analysis"):
            corr = analysis.margin_correlations(s)
            pcs = analysis.per_class_stats(s, classes)
            where = f"{'adversarial' if r['adv'] else 'natural'} {r['split']} images"
            m1, m2, m3, m4 = st.columns(4)
            m1.metric("Images", f"{s.n}", help=where)
            m2.metric("Accuracy", f"{s.correct.mean():.1%}")
            m3.metric("Pearson(PM, E(x,y))", f"{corr['E(x,y)'].pearson:+.3f}",
                      help=f"Spearman {corr['E(x,y)'].spearman:+.3f}")
            m4.metric("Pearson(PM, E(x))", f"{corr['E(x)'].pearson:+.3f}", help=f"Spearman {corr['E(x)'].spearman:+.3f}")
            a, b = st.columns(2)
            a.plotly_chart(af.pm_scatter(s.pm, s.e_xy, s.correct, "E(x, y)", corr["E(x,y)"]), width="stretch",
                           key="ana_pm_joint")
            b.plotly_chart(af.pm_scatter(s.pm, s.e_x, s.correct, "E(x)", corr["E(x)"]), width="stretch",
                           key="ana_pm_marg")
            a, b = st.columns([3, 2])
            a.plotly_chart(af.per_class_figure(pcs.rows, pcs.correlations), width="stretch", key="ana_classes")
            with b:
                st.markdown("**Per class**")
                st.dataframe([{"class": q["name"], "n": q["count"], "1 − p(y|x)": round(q["prob_error"], 4),
                               "hard error": round(q["hard_error"], 4), "entropy": round(q["entropy"], 4),
                               "mean E(x)": round(q["energy"], 3), "mean E(x,y)": round(q["joint_energy"], 3)}
                              for q in pcs.rows], hide_index=True, width="stretch")
                st.markdown("**Correlations across classes**")
                st.dataframe([{"pair": k, "Pearson": round(v.pearson, 3), "Spearman": round(v.spearman, 3)}
                              for k, v in pcs.correlations.items()], hide_index=True, width="stretch")

# =============================================================================================
with tab_a:
    st.markdown(
        "Start from a **robust** model and pick three same-size subsets of its *training* set: high-energy correctly "
        "classified, low-energy correctly classified, and misclassified samples. The same network is retrained from "
        "scratch without each subset (one training job each) and the PGD robust error is compared. The paper finds "
        "that removing high-energy samples hurts robustness about as much as removing misclassified ones.")
    if meta.method in ("plain", "zoo"):
        st.warning("This model is not adversarially trained (or is a zoo model): pick a robust bundled or local model "
                   "(SAT / TRADES / WEAT) in the sidebar for the experiment the paper describes.")
    hp = meta.hparams or {}
    with st.form("subset_form"):
        c1, c2, c3, c4 = st.columns(4)
        size = int(c1.number_input("Subset size (0 = largest possible)", value=0, step=10, key="sub_size"))
        epochs = int(c2.number_input("Epochs of each retraining", value=int(hp.get("epochs") or 10), step=1,
                                     key="sub_epochs"))
        sseed = int(c3.number_input("Selection seed", value=0, step=1, key="sub_seed"))
        baseline = c4.checkbox("Also retrain without removing anything", value=False, key="sub_baseline")
        p1, p2 = st.columns(2)
        preview = p1.form_submit_button("Preview the subsets")
        launch = p2.form_submit_button("Launch the retraining jobs", type="primary")

    def _check_request() -> dict:
        """Every rule on the experiment's settings (core.analysis.validate_subset_request); its training config."""
        ref_ = st.session_state.get("model_ref")
        return analysis.validate_subset_request(lm, source=getattr(ref_, "source", None), size=size or None,
                                                seed=sseed, train={"epochs": epochs})

    def _selection(task, base):
        return analysis.compute_subset_selection(lm, size or None, train_config=base, seed=sseed,
                                                 progress=task.progress), base

    if preview:
        with common.guard("selecting the subsets"):
            base = _check_request()
            task = common.start_task("sub_task", "energies of the training set", lambda t: _selection(t, base))
            common.wait_briefly(task, 2.0)

    def _sel_done(t):
        sel, base = t.result
        st.session_state["sub_preview"] = {"sel": sel, "model": meta.name}

    common.task_panel("sub_task", _sel_done)
    pv = st.session_state.get("sub_preview")
    if pv and pv["model"] == meta.name:
        sel = pv["sel"]
        st.markdown(f"**Selection**: {sel.size} samples per subset out of {sel.n_train} training images "
                    f"({sel.n_misclassified} misclassified). Mean E(x): " + ", ".join(
                        f"{k} {v:.2f}" for k, v in sel.mean_energy.items()) + f" (all: {sel.mean_energy_all:.2f}).")
        if sel.e_x is not None:
            with common.guard("drawing the subsets"):
                st.plotly_chart(af.subset_energy_figure(sel.e_x, sel.indices), width="stretch", key="sub_preview_fig")

    if launch:
        with common.guard("launching the subset experiment"):
            ref = st.session_state.get("model_ref")
            if ref is None:
                raise InputError("choose a model in the sidebar first")
            _check_request()  # rejects bad settings before submitting
            from core import jobs

            cfg = {"model": dataclasses.asdict(ref), "size": size or None, "seed": sseed, "train": {"epochs": epochs},
                   "include_baseline": bool(baseline), "device": st.session_state.get("device", "auto")}
            info = jobs.submit("subset", cfg, name=f"subset removal: {meta.name}",
                               device=st.session_state.get("device", "auto"))
            st.session_state["sub_job"] = info.id
            st.success(f"Started job {info.id}: it selects the subsets, then queues "
                       f"{3 + bool(baseline)} training jobs ({epochs} epochs each).")

    # ---- experiments and their comparison
    try:
        from core import jobs

        exps = jobs.list_jobs(kind="subset")
    except EnergyLensError as e:
        st.error(str(e))
        exps = []
    if exps:
        ids = [j.id for j in exps]
        default = ids.index(st.session_state["sub_job"]) if st.session_state.get("sub_job") in ids else 0
        pick = st.selectbox("Experiment", ids, index=default, key="sub_pick",
                            format_func=lambda i: next(f"{j.name} — {j.status} ({j.id})" for j in exps if j.id == i))

        def _children_active(info) -> bool:
            children = (info.result or {}).get("jobs") or {}
            try:
                return any(jobs.get_job(c).active for c in children.values())
            except EnergyLensError:
                return False

        def _show_experiment(info):
            if not info.result:
                st.warning("The subset job finished without a result.")
                return
            res = info.result
            rows = analysis.subset_comparison(res.get("jobs") or {})
            sel = res.get("selection") or {}
            st.caption(f"{sel.get('size')} samples per subset removed out of {sel.get('n_train')}.")
            for row in rows:
                if row["status"] == "failed":
                    st.error(f"Retraining without '{row['label']}' failed: {row['error'] or 'no error message'}")
                    with st.expander(f"Log tail of {row['job']}"):
                        st.code(jobs.read_log_tail(row["job"], 40) or "(empty)")
            st.dataframe([{"removed": r_["label"], "job": r_["job"], "status": r_["status"],
                           "progress": f"{r_['progress']:.0%}", "epoch": r_["epoch"],
                           "PGD robust error": None if r_["rob_err"] is None else round(r_["rob_err"], 4),
                           "natural error": None if r_["nat_err"] is None else round(r_["nat_err"], 4)}
                          for r_ in rows], hide_index=True, width="stretch")
            if any(r_["rob_err"] is not None for r_ in rows):
                st.plotly_chart(af.subset_comparison_figure(rows), width="stretch", key="sub_fig")
                if not all(r_["status"] == "done" for r_ in rows):
                    st.caption("Some retrainings are still running: bars show their latest epoch.")
            else:
                st.info("The retraining jobs have not finished an epoch yet.")

        common.job_panel(pick, "Subset job", _show_experiment, every=3.0, busy=_children_active)
    else:
        st.caption("No subset experiment yet.")
