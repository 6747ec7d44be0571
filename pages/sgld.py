"""SGLD studio: generate images with a robust classifier read as an EBM (paper Eq. 7, Fig. 5e, Fig. 6)."""

import dataclasses
import functools
import io
import os
import time
from pathlib import Path

import common
import numpy as np
import streamlit as st

import figures as fig
import persist
import sgld_figures as sf
import slides
import tour
from core import sampling, sgld_cache
from core.errors import InputError

lm, meta, names, _ = common.require_model("SGLD studio")
tour.banner("sgld")
ref = st.session_state.get("model_ref")
model_key = f"{ref.key if ref is not None else meta.name}:{id(lm)}"
K = int(meta.num_classes)
if meta.method in ("plain", "nat", "standard"):
    st.warning("This model was not adversarially trained: its gradients are not perceptually aligned, so SGLD "
               "mostly produces adversarial noise. Choose a robust model (e.g. SAT) for recognisable images.")

with st.expander("What am I looking at?", expanded=False):
    st.markdown(
        r"""
A classifier with logits $f(x)$ defines the class-conditional energy $E(x,y) = -f(x)[y]$, so SGLD can *sample*
images of class $y$ from $p(x\mid y) \propto e^{-E(x,y)}$. The paper's sampler (Eq. 7) adds momentum:

$$v_{n+1} = \zeta v_n - \tfrac{1}{2}\eta\,\nabla_x E(x_n, y), \qquad x_{n+1} = x_n + v_{n+1} + \varepsilon,\quad
\varepsilon \sim \mathcal N(0, \gamma^2 I)$$

($\gamma$ is the noise **standard deviation**, as in the official code; images are kept in $[0,1]$.)
Where the chain starts matters (Fig. 6, bottom): **random** noise (JEM), a **Gaussian** per class, or the paper's
**PCA** start $x_0 = \mu_y + \sum_i \lambda_i \alpha_i U^y_i$ near the class manifold, with $\lambda_i$ the data's
standard deviation along component $i$ and $\alpha_i \sim \mathcal N(0, \sigma^2)$.

**Energy plot (Fig. 5e):** the target energy $E(x,y)$ falls towards the dashed level $\bar E(x,y)$ of real training
images of that class, while the energies $E(x,y')$ of the other classes rise.
"""
    )

ds_train = common.model_dataset(lm, "train", quiet=True)
if ds_train is None:  # e.g. the CIFAR-10 demo on a fresh clone: its training images are not shipped
    ds_train = common.model_dataset(lm, "test", quiet=True)
    if ds_train is not None:
        st.info(f"The training images of '{meta.dataset}' are not available here, so the class statistics (PCA and "
                f"Gaussian starts, the reference level Ē(x, y)) come from its {len(ds_train)} **test** images.")
    else:
        st.warning(f"No images of '{meta.dataset}' are available here: only the random initialisation can be used.")


@st.cache_resource(show_spinner="Computing per-class statistics (cached on disk)...", max_entries=4)
def _class_stats(dataset_name: str, n_images: int, _ds):
    return sampling.ClassStats(_ds)


def _stats():
    if ds_train is None:
        raise InputError(f"the training images of '{meta.dataset}' are not available, so only the random "
                         "initialisation can be used")
    return _class_stats(ds_train.name, len(ds_train), ds_train)


# per-class statistics and real-image energies of this (model, dataset): prepared once per server process in a
# background thread (core.sgld_cache) that every session shares; Initialise waits for it off the script thread
warm = None
if ds_train is not None:
    with common.guard("preparing the class statistics"):
        warm = sgld_cache.warm_up(lm, ds_train, _stats())


def _reference(classes) -> dict | None:
    """Reference energies of ``classes``, or None while the background preparation still computes them."""
    return sgld_cache.reference_energies_cached(lm, ds_train, list(classes), wait=warm is None or warm.done)


def _task_running(key: str) -> bool:
    t = st.session_state.get(key)
    return isinstance(t, common.Task) and not t.done


# ---------------------------------------------------------------- controls
INIT_LABELS = {"pca": "PCA per class (paper)", "gaussian": "Gaussian per class", "random": "random noise (JEM)"}
inits = ["pca", "gaussian", "random"] if ds_train is not None else ["random"]
c1, c2, c3 = st.columns([3, 1, 1])
# defaults through session state, never as default=/value= as well: the guided tour sets these keys (a widget given
# both logs Streamlit's "created with a default value but also had its value set via the Session State API")
common.widget_default("sgld_classes", list(range(min(K, 10))), scope=K)
common.widget_default("sgld_chains", 4)
sel = c1.multiselect("Classes", list(range(K)), format_func=lambda i: names[i], key="sgld_classes")
chains = int(c2.number_input("Chains per class", step=1, key="sgld_chains"))
INIT_HELP = ("PCA (the paper's start) begins near the class mean: good-looking images fast, but the chains of one "
             "class stay near-copies of each other (compare the within-class diversity with the real images' "
             "below). The paper's Table 2b shows the trade-off: the Gaussian start gets the better FID, PCA the "
             "better IS. Random noise (JEM) needs many more steps. docs/METHODS.md has the measurements.")
init = c3.selectbox("Initialisation", inits, format_func=lambda k: INIT_LABELS[k], key="sgld_init_kind",
                    help=INIT_HELP)
# η, ζ, γ, steps and the stopping rule start at the defaults of the model's dataset family
# (core.sampling.sgld_defaults); switching to a model of another family puts them back to that family's defaults,
# while edits within a family (and the values a shared link or the tour set) are kept
sg_def = sampling.sgld_defaults(lm)
for k in ("eta", "zeta", "gamma"):
    common.widget_default(f"sgld_{k}", float(sg_def[k]), scope=sg_def["family"])
common.widget_default("sgld_n", int(sg_def["steps"]), scope=sg_def["family"])
common.widget_default("sgld_stop", bool(sg_def["stop_at_reference"]), scope=sg_def["family"])
FAMILY_LABEL = {"digits": "digits", "cifar": "natural images (CIFAR-like)"}
c4, c5, c6, c7, c8 = st.columns(5)
eta = float(c4.number_input("Step size η", step=0.01, format="%.4f", key="sgld_eta",
                            help=f"default {sg_def['eta']:g} for {FAMILY_LABEL[sg_def['family']]}"))
zeta = float(c5.number_input("Momentum ζ", step=0.1, format="%.3f", key="sgld_zeta",
                             help=f"0 = plain SGLD; must be in [0, 1); default {sg_def['zeta']:g}"))
gamma = float(c6.number_input("Noise γ (std)", step=0.001, format="%.4f", key="sgld_gamma",
                              help=f"default {sg_def['gamma']:g}"))
n_run = int(c7.number_input("N (Run N steps)", step=50, key="sgld_n", help=f"default {sg_def['steps']}"))
seed = int(c8.number_input("Seed", value=0, step=1, key="sgld_seed"))
stop_rule = st.checkbox("Stop each chain where its E(x, y) reaches Ē(x, y) of real images", key="sgld_stop",
                        help="The paper's target level: past it the chains leave the real images' energy behind and "
                             "FID worsens. A stopped chain keeps its image; a run ends once every chain has stopped. "
                             f"Default: {'on' if sg_def['stop_at_reference'] else 'off'}.")
with st.expander("Initialisation and constraint settings"):
    e1, e2, e3, e4 = st.columns(4)
    pca_sigma = float(e1.number_input("PCA σ (in data stds)", value=sampling.DEFAULT_PCA_SIGMA, step=0.05,
                                      format="%.3f", key="sgld_pca_sigma",
                                      help="0.35 matches the official σ = 0.005 on the singular values of a "
                                           "5,000-image CIFAR-10 class (σ_official·√(n−1))"))
    pca_mode = e2.radio("PCA components by", ["retained variance", "count"], horizontal=True, key="sgld_pca_mode")
    if pca_mode == "retained variance":
        pca_var, pca_k = float(e3.number_input("Retained variance", value=0.95, step=0.01, format="%.3f",
                                               key="sgld_pca_var")), None
    else:
        pca_var, pca_k = None, int(e3.number_input("Components", value=20, step=1, key="sgld_pca_k"))
    ridge = float(e4.number_input("Gaussian ridge", value=sampling.DEFAULTS["gaussian_ridge"], format="%.1e",
                                  key="sgld_ridge"))
    b1, b2 = st.columns(2)
    bound_norm = b1.selectbox("Bound around x₀", ["none", "Linf", "L2"], key="sgld_bound_norm",
                              help="project the change x − x₀ onto a ball (the image itself is never rescaled)")
    bound_r = float(b2.number_input("Bound radius", value=0.1 if bound_norm != "L2" else 3.0, step=0.05,
                                    format="%.3f", key="sgld_bound_r"))
bound = None if bound_norm == "none" else (bound_norm, bound_r)

if warm is not None and warm.done and warm.error:
    st.warning(f"Preparing the PCA / Gaussian start statistics failed: {warm.error}")
elif warm is not None and not warm.done:
    @st.fragment(run_every=1.0)
    def _warm_status():
        if not warm.done:
            st.caption(f":material/hourglass_top: Preparing the PCA / Gaussian start statistics and the real-image "
                       f"energies in the background, once for this model and dataset ({warm.message}, "
                       f"{warm.fraction:.0%}); Initialise waits for them with a progress bar.")
        else:
            st.rerun(scope="app")   # ready: the Ē(x, y) level appears

    _warm_status()

busy = _task_running("sgld_task") or _task_running("sgld_cmp_task") or _task_running("sgld_init_task")
b = st.columns(5)
do_init = b[0].button("Initialise", type="primary", key="sgld_btn_init", disabled=busy)
do_1 = b[1].button("Step 1", key="sgld_btn_step1", disabled=busy)
do_10 = b[2].button("Step 10", key="sgld_btn_step10", disabled=busy)
do_run = b[3].button(f"Run {n_run} steps", key="sgld_btn_run", disabled=busy)
do_reset = b[4].button("Reset", key="sgld_btn_reset", disabled=busy, help="back to the initial images x₀")
if st.session_state.pop("sgld_autorun", False) and not busy:  # set by the guided tour
    do_init = True


def _check_settings(n_chains: int, init_kind: str) -> None:
    """Every rule on the settings (core.sampling.validate_sampler_settings), before any chain is built."""
    sampling.validate_sampler_settings(sel, n_chains, init=init_kind, eta=eta, zeta=zeta, gamma=gamma, bound=bound,
                                       seed=seed, pca_sigma=pca_sigma, pca_variance=pca_var, pca_components=pca_k,
                                       gaussian_ridge=ridge, max_per_class=sampling.MAX_INTERACTIVE_CHAINS)


def _new_sampler(init_kind: str, n_chains: int, stats=None):
    return _arm(sampling.SGLDSampler(
        lm, sel, n_chains, init=init_kind, eta=eta, zeta=zeta, gamma=gamma, bound=bound, seed=seed,
        stats=(stats or _stats()) if init_kind != "random" else None, pca_sigma=pca_sigma, pca_variance=pca_var,
        pca_components=pca_k, gaussian_ridge=ridge, stop_at_reference=stop_rule))


def _arm(s):
    """The stopping rule as the checkbox says, with Ē(x, y) once the background preparation has it."""
    s.stop_at_reference = stop_rule
    if stop_rule and ds_train is not None and s.stop_report()["rule"] != "on":
        r = _reference(s.classes)
        if r is not None:
            s.set_reference(r)
    return s


@st.cache_resource(show_spinner=False, max_entries=8)
def _real_diversity(dataset_name: str, n_images: int, classes: tuple, _ds) -> float:
    sel = np.flatnonzero(np.isin(_ds.y.numpy(), classes))
    return sampling.within_class_diversity(_ds.x[sel], _ds.y[sel])["mean"]


def _diversity_text(x, y, classes) -> str:
    """Within-class diversity of these images next to the real images' of the same classes."""
    d = sampling.within_class_diversity(x, y)["mean"]
    if not np.isfinite(d):
        return ""
    real = _real_diversity(ds_train.name, len(ds_train), tuple(sorted(classes)), ds_train) if ds_train is not None \
        else float("nan")
    return (f"within-class diversity (mean pairwise L2 between images of a class) {d:.1f}"
            + (f" vs {real:.1f} for real images" if np.isfinite(real) else ""))


def _initialised(sampler_, seconds: float) -> None:
    st.session_state["sgld_sampler"] = sampler_
    st.session_state["sgld_model_key"] = model_key
    st.session_state["sgld_last"] = f"initialised in {seconds:.2f} s"
    st.session_state["sgld_dirty"] = True


if do_init:
    with common.guard("initialising the chains"):
        _check_settings(chains, init)
        t_init = time.perf_counter()
        if init != "random" and warm is not None and not warm.done:
            warm.wait(timeout=1.0)           # nearly ready (a small dataset): answer in this run
        if init != "random" and warm is not None and not warm.done:
            # the class statistics are still being prepared: wait for them off the script thread, with progress
            build = functools.partial(_new_sampler, init, chains, _stats())   # the settings of this click

            def _init_job(task, warm=warm, build=build, t0=t_init):
                warm.wait(progress=lambda f, m: task.progress(0.95 * f, f"preparing the start statistics: {m}"))
                task.progress(0.95, "drawing the initial images")
                return build(), time.perf_counter() - t0

            task = common.start_task("sgld_init_task", "initialising the chains", _init_job)
            common.wait_briefly(task, 1.0)
        else:
            _initialised(_new_sampler(init, chains), time.perf_counter() - t_init)

common.task_panel("sgld_init_task", lambda task: _initialised(*task.result))

# the chains of this browser session survive a page reload, with the model they were made with
restored = persist.restore_with_model("sgld")
if restored is not None and "sgld_sampler" not in st.session_state:
    arr, smeta = restored
    if smeta.get("model") == (ref.key if ref is not None else meta.name):
        with common.guard("restoring the saved chains"):
            st.session_state["sgld_sampler"] = sampling.SGLDSampler.from_state(lm, arr, smeta)
            st.session_state["sgld_model_key"] = model_key
            st.session_state["sgld_last"] = f"restored at step {smeta.get('steps_done', '?')} after a reload"
persist.restored_note("sgld", "the SGLD chains")


def _keep_chains() -> None:
    smp = st.session_state.get("sgld_sampler")
    if smp is not None:
        arr, smeta = smp.state()
        persist.keep("sgld", arr, {**smeta, "model": ref.key if ref is not None else meta.name,
                                   "model_ref": persist.model_identity(ref)})


sampler = st.session_state.get("sgld_sampler")
if sampler is not None and st.session_state.get("sgld_model_key") != model_key:
    st.warning("The chains shown were started with another model. Press **Initialise** to start chains for "
               f"**{meta.name}**.")
    sampler = None


def _require_sampler():
    if sampler is None:
        raise InputError("press Initialise first")
    return sampler


for n, clicked in ((1, do_1), (10, do_10)):
    if clicked:
        with common.guard("stepping the chains"):
            s = _require_sampler()
            s.set_params(eta=eta, zeta=zeta, gamma=gamma)   # validated: nothing changes on a bad value
            out = _arm(s).step(n)
            st.session_state["sgld_last"] = f"{n} step{'s' if n > 1 else ''} in {out.seconds:.2f} s"
            st.session_state["sgld_dirty"] = True

if do_run:
    with common.guard("starting the run"):
        s = _require_sampler()
        steps = sampling.validate_steps(n_run)
        s.set_params(eta=eta, zeta=zeta, gamma=gamma)
        _arm(s)
        task = common.start_task("sgld_task", f"SGLD, {steps} steps", lambda t: s.step(steps, progress=t.progress))
        common.wait_briefly(task, 1.0)

if do_reset:
    with common.guard("resetting the chains"):
        _require_sampler().reset()
        st.session_state["sgld_last"] = "reset to x₀"
        st.session_state["sgld_dirty"] = True


def _run_done(task):
    out = task.result
    st.session_state["sgld_last"] = (f"run finished at step {out.steps_done} ({out.seconds:.1f} s)"
                                     + (": every chain had reached Ē(x, y)" if out.stopped_early else ""))
    st.session_state["sgld_dirty"] = True


common.task_panel("sgld_task", _run_done)
if st.session_state.pop("sgld_dirty", False):
    _keep_chains()
if st.session_state.get("sgld_task-error") == "Cancelled." and sampler is not None:
    st.caption(f"Cancelled: the chains keep the {sampler.steps_done} steps made so far.")
for note in getattr(sampler, "notes", None) or []:  # e.g. out of memory: fewer chains per pass
    st.warning(note)


# ---------------------------------------------------------------- results
def _npz_bytes(s) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **s.to_npz_dict())
    return buf.getvalue()


@st.cache_data(max_entries=8, show_spinner=False)
def _file_bytes(path: str, mtime: float) -> bytes:
    """A finished job's samples file (read once per file version, not on every poll of the job list)."""
    return Path(path).read_bytes()


def _grid_png(x: np.ndarray, ncol: int, classes=None) -> bytes:
    """The chains as a grid, one row per class labelled with its name when ``classes`` (one per row) is given."""
    labels = [names[int(c)] for c in classes] if classes is not None else None
    return fig.image_grid_png(x, ncol=max(1, ncol), scale=2 if x.shape[-1] <= 32 else 1, row_labels=labels)


def _row_classes(s):
    """The class of each grid row when every class has the same number of chains (one row per class), else None."""
    return list(s.classes) if len(set(s.counts)) == 1 else None


def _ref_for(s, classes=None):
    """Chain-weighted mean reference energies (joint, marginal) of the shown chains."""
    if ds_train is None:
        return None, None
    r = _reference(s.classes)
    if r is None:
        return None, None
    labels = s.labels.cpu().numpy()
    if classes is not None:
        labels = labels[np.isin(labels, classes)]
    if labels.size == 0:
        return None, None
    return (float(np.mean([r[int(c)]["joint"] for c in labels])),
            float(np.mean([r[int(c)]["marginal"] for c in labels])))


if sampler is None:
    st.info("Choose classes and press **Initialise**, then **Step** or **Run**. "
            + (f"The defaults for {FAMILY_LABEL[sg_def['family']]} (PCA start, η = {sg_def['eta']:g}, "
               f"ζ = {sg_def['zeta']:g}, γ = {sg_def['gamma']:g}) "
               + ("give recognisable digits after about 50 steps with the bundled robust model."
                  if sg_def["family"] == "digits" else
                  "improved the FID of PCA-started chains on CIFAR-10 over 100 steps, where the digits' η = 1 "
                  "made them worse (docs/METHODS.md)."))
            + (" Each chain stops where its E(x, y) reaches Ē(x, y) of real images (the checkbox above)."
               if sg_def["stop_at_reference"] else ""))
else:
    # the live view redraws while a run goes on, no more often than the progress bar polls (common.poll_every)
    _run = st.session_state.get("sgld_task")
    @st.fragment(run_every=max(1.0, common.poll_every(_run.elapsed)) if _task_running("sgld_task") else None)
    def _live():
        s = st.session_state.get("sgld_sampler")
        if s is None:
            return
        tr = s.trace
        summ = tr.summary()
        ref_j, _ = _ref_for(s)
        m = st.columns(5)
        m[0].metric("Steps", f"{s.steps_done}")
        rep = s.stop_report()
        m[4].metric("Stopped at Ē(x, y)", f"{rep['stopped']}/{rep['n_chains']}" if rep["rule"] == "on" else
                    "rule off" if rep["rule"] == "off" else "waiting for Ē",
                    help="chains whose E(x, y) reached their class's Ē(x, y); they keep that image"
                         + (f" (median step {rep['median_step']:g})" if rep["median_step"] is not None else ""))
        m[1].metric("mean E(x, y) now", f"{summ['target_mean'][-1]:.2f}",
                    delta=f"{summ['target_mean'][-1] - summ['target_mean'][0]:+.2f} since x₀", delta_color="off")
        m[2].metric("Ē(x, y) of real images", ("computing…" if warm is not None and not warm.done else "n/a")
                    if ref_j is None else f"{ref_j:.2f}")
        m[3].metric("Classified as target", f"{summ['target_hit'][-1]:.0%}")
        st.image(_grid_png(s.images().numpy(), s.counts[0] if len(set(s.counts)) == 1 else 8, _row_classes(s)),
                 caption=f"{s.n_chains} chains after {s.steps_done} steps — one row per class "
                         f"({', '.join(names[c] for c in s.classes)}); init {s.config()['init']}",
                 width="content")
        div = _diversity_text(s.images(), s.labels.cpu(), s.classes)
        if div:
            st.caption(div[0].upper() + div[1:] + ".")

    _live()
    if st.session_state.get("sgld_last"):
        st.caption(f"Last action: {st.session_state['sgld_last']}.")
        persist.clear_button("sgld", ("sgld_sampler", "sgld_model_key", "sgld_last"), "Clear the chains")
    persist.unsaved_notice("sgld")

    tr = sampler.trace
    pick = st.selectbox("Energy plot for", ["all chains"] + [names[c] for c in sampler.classes], key="sgld_plot_cls")
    sub = None if pick == "all chains" else [sampler.classes[[names[c] for c in sampler.classes].index(pick)]]
    with common.guard("drawing the energy plot"):
        ref_j, ref_m = _ref_for(sampler, sub)
        passed = None
        ref_all = _reference(sampler.classes) if ds_train is not None else None
        if ref_all is not None:
            passed = tr.passed_reference(ref_all, sub)
        st.plotly_chart(sf.energy_trend(tr.summary(sub), ref_j, ref_m,
                                        title=f"Energies along the chain — {pick} (Fig. 5e)",
                                        passed_at=passed["step"] if passed else None),
                        width="stretch", config=fig.PLOT_CONFIG, key="sgld_trend")
        if passed is not None and passed["step"] is not None:
            where = (f"below it in {passed['classes_below']}/{passed['n_classes']} classes"
                     if passed["n_classes"] > 1 else "below it" if passed["below_now"] else "back above it")
            st.caption(f"The mean target energy E(x, y) passed the real-image level Ē(x, y) at step {passed['step']}; "
                       f"now {where} (mean E(x, y) − Ē(x, y) = {passed['gap']:+.2f}). Far below Ē the chains are "
                       "past the energy of real images: a smaller η or fewer steps keeps them nearer the data.")
    with common.guard("preparing the downloads"):
        d1, d2, d3 = st.columns(3)
        ncol = sampler.counts[0] if len(set(sampler.counts)) == 1 else 8
        # the files' bytes are made in this run (never deferred callables: a deferred file is forgotten by the
        # next rerun, so quick successive clicks failed with "MediaFileStorageError: Deferred file ... not found"),
        # and a click does not rerun the page (on_click="ignore"), so the file served is the one on screen
        grid = _grid_png(sampler.images().numpy(), ncol, _row_classes(sampler))
        d1.download_button("Download grid (PNG)", grid,
                           file_name=f"sgld_{meta.name}_{sampler.steps_done}steps.png", mime="image/png",
                           key="sgld_dl_png", on_click="ignore")
        d2.download_button("Download samples (.npz)", _npz_bytes(sampler),
                           file_name=f"sgld_{meta.name}_{sampler.steps_done}steps.npz",
                           mime="application/octet-stream", key="sgld_dl_npz", on_click="ignore",
                           help="x (uint8, loadable as dataset npz:<file>), y, x0, x_float and the energy trace")
        d3.download_button("Download energy trace (CSV)", tr.to_energy_trace().to_csv(),
                           file_name="sgld_trace.csv", mime="text/csv", key="sgld_dl_csv", on_click="ignore")
        # for slides: the grid with its class labels and a caption strip (model, start, steps, η / ζ / γ)
        cap = slides.sgld_caption(meta.name, sampler.config(), names, sampler.n_chains)
        stem = slides.filename(f"sgld_{meta.name}_{sampler.steps_done}steps_slide")
        s1, s2, _ = st.columns(3)
        s1.download_button("Figure for slides (PNG with caption)", slides.captioned_png(grid, cap),
                           file_name=f"{stem}.png", mime="image/png", key="sgld_dl_slide_png", on_click="ignore")
        s2.download_button("Figure for slides (SVG with caption)", slides.captioned_svg(grid, cap),
                           file_name=f"{stem}.svg", mime="image/svg+xml", key="sgld_dl_slide_svg", on_click="ignore")

# ---------------------------------------------------------------- compare initialisations
st.divider()
st.subheader("Compare initialisations (Fig. 6, bottom)")
cmp_chains = min(chains, 4)
st.caption(f"Random noise, Gaussian per class and PCA per class, each with the classes, η, ζ, γ and seed above, "
           f"{cmp_chains} chain(s) per class and N = {n_run} steps.")
do_cmp = st.button("Run the three initialisations", key="sgld_btn_cmp", disabled=busy)


def _compare_job(task, samplers: dict, steps: int):
    out = {}
    for i, (name, s) in enumerate(samplers.items()):
        s.step(steps, progress=lambda f, m, i=i, name=name: task.progress((i + f) / len(samplers), f"{name}: {m}"))
        out[name] = {"x0": s.x0.cpu().numpy(), "x": s.images().numpy(), "summary": s.trace.summary(),
                     "ncol": s.counts[0], "classes": list(s.classes), "y": s.labels.cpu().numpy(),
                     "stop": s.stop_report()}
    return out


if do_cmp:
    with common.guard("starting the comparison"):
        _check_settings(cmp_chains, "random")
        steps = sampling.validate_steps(n_run)
        samplers = {k: _new_sampler(k, cmp_chains) for k in ("random", "gaussian", "pca")
                    if k == "random" or ds_train is not None}
        task = common.start_task("sgld_cmp_task", f"compare initialisations, {steps} steps",
                                 lambda t: _compare_job(t, samplers, steps))
        common.wait_briefly(task, 1.0)

common.task_panel("sgld_cmp_task", lambda t: st.session_state.__setitem__("sgld_compare", t.result))
cmp = st.session_state.get("sgld_compare")
if cmp:
    cols = st.columns(len(cmp))
    for col, (name, r) in zip(cols, cmp.items()):
        with col:
            st.markdown(f"**{INIT_LABELS[name]}**")
            st.image(_grid_png(r["x0"], r["ncol"]), caption="start x₀", width="stretch")
            st.image(_grid_png(r["x"], r["ncol"]),
                     caption=f"after {int(r['summary']['step'][-1])} steps — mean E(x, y) "
                             f"{r['summary']['target_mean'][-1]:.2f}", width="stretch")
            if "y" in r:
                st.caption(_diversity_text(r["x"], r["y"], r["classes"]))
    with common.guard("drawing the comparison"):
        first = next(iter(cmp.values()))
        rj = None
        if ds_train is not None:
            rr = _reference(first["classes"])
            rj = None if rr is None else float(np.mean([rr[c]["joint"] for c in first["classes"]]))
        st.plotly_chart(sf.compare_trend({k: v["summary"] for k, v in cmp.items()}, rj), width="stretch",
                        config=fig.PLOT_CONFIG, key="sgld_cmp_trend")

# ---------------------------------------------------------------- batch job + metrics
st.divider()
st.subheader("Batch generation and metrics (background job)")
try:
    from core import jobs
except ImportError:  # the jobs module ships separately
    jobs = None
from core import metrics as gm  # noqa: E402

if jobs is None:
    st.info("Background jobs are not available in this installation (core.jobs is missing).")
else:
    if ds_train is None:
        st.caption("Without the training images of this model's dataset a job can only generate samples "
                   "(random start); IS / FID / KID need real images and are skipped.")
    ok, why = gm.inception_status()
    st.caption(("Inception-v3 features available: " if ok else "") + why + ". Every result names its feature "
               "extractor; values from different extractors are not comparable.")
    from core.models.registry import list_bundled, list_local

    entries = list_bundled() + list_local()
    same_file = (lambda r: ref is not None and r.path is not None and ref.path is not None
                 and Path(r.path).resolve() == Path(ref.path).resolve())
    others = [(r, m) for r, m, err in entries if m is not None and not same_file(r)
              and list(m.input_shape or []) == list(meta.input_shape or [])]
    indep = gm.independent_classifier(meta, lm.path, entries)   # the default: never the generating model
    auto_label = (f"independent: {indep[1].name or indep[0].name} ({indep[1].method}, {indep[1].dataset})" if indep
                  else f"independent: none for {meta.dataset} (metrics skipped)")
    with st.form("sgld_job_form"):
        j1, j2, j3, j4 = st.columns(4)
        job_n = int(j1.number_input("Samples per class", value=100, step=50, key="sgld_job_n"))
        job_steps = int(j2.number_input("Steps", value=n_run, step=50, key="sgld_job_steps"))
        feats = j3.selectbox("Features", ["auto", "classifier", "inception"], key="sgld_job_feats",
                             help="auto = Inception-v3 when its weights are present, else a classifier")
        fm_labels = ([auto_label, "this model (optimistic)"]
                     + [f"{r.source}: {r.name} ({m.method}, {m.dataset})" for r, m in others])
        fm_i = j4.selectbox("Classifier for features", range(len(fm_labels)), format_func=lambda i: fm_labels[i],
                            key="sgld_job_fm",
                            help="the default is a classifier of the same data other than the generating model: "
                                 "SGLD optimises the samples for the generating model, which flatters its own "
                                 "features (a robust model's barely tell Gaussian blobs from real images)")
        j5, j6, j7 = st.columns(3)
        n_real = int(j5.number_input("Real images (0 = all of these classes)", value=0, step=500, key="sgld_job_real"))
        lpips = j6.checkbox("LPIPS (needs local AlexNet weights)", key="sgld_job_lpips")
        job_name = j7.text_input("Job name (optional)", key="sgld_job_name")
        submit = st.form_submit_button("Launch batch job", type="primary")
    if submit:
        with common.guard("launching the SGLD job"):
            if ref is None:
                raise InputError("no model selected")
            cfg = {"model": dataclasses.asdict(ref), "classes": list(sel), "n_per_class": job_n, "init": init,
                   "eta": eta, "zeta": zeta, "gamma": gamma, "steps": job_steps, "stop_at_reference": stop_rule,
                   "bound": list(bound) if bound else None, "seed": seed, "pca_sigma": pca_sigma,
                   "pca_variance": pca_var, "pca_components": pca_k, "gaussian_ridge": ridge,
                   "device": st.session_state.get("device", "auto"),
                   "metrics": {"enabled": ds_train is not None, "features": feats,
                               "feature_model": (None if fm_i == 0 else dataclasses.asdict(ref) if fm_i == 1
                                                 else dataclasses.asdict(others[fm_i - 2][0])),
                               "n_real": n_real or None, "lpips": bool(lpips)}}
            sampling.SGLDJobConfig.from_dict(cfg).validate()   # refuse bad settings before queueing
            info = jobs.submit("sgld", cfg, name=job_name.strip() or f"sgld {meta.name} {init} ×{job_n}/class",
                               device=st.session_state.get("device", "auto"))
            st.success(f"Queued SGLD job {info.id}.")

    def _show_sgld(j, c2, c3):
        m = j.result.get("metrics") or {}
        row = None
        if m:
            floor = m.get("FID_floor")
            floor_txt = (f" (real vs real: **{floor:.2f}** at n = {m.get('FID_floor_n')})" if floor is not None
                         else " (real-vs-real floor: n/a)")
            c2.markdown(f"IS **{m['IS']:.2f}** · FID **{m['FID']:.2f}**{floor_txt} · KID **{m['KID']:.4f}**"
                        + (f" · LPIPS **{m['LPIPS']:.3f}**" if m.get("LPIPS") is not None else "")
                        + (f"  \nwithin-class diversity **{m['diversity']:.1f}**"
                           + (f" (real images: {m['diversity_real']:.1f})" if m.get("diversity_real") is not None
                              else "") if m.get("diversity") is not None else "")
                        + f"  \nfeatures: `{m['features']}`"
                        + "".join(f"  \n{note}" for note in m.get("notes") or [] if "generating model" in note))
            row = {"job": j.name, "init": j.result["config"]["init"], "steps": j.result["config"]["steps"],
                   "N": j.result["n_samples"], "features": m["features"], "IS": m["IS"], "FID": m["FID"],
                   "FID real vs real": floor, "KID": m["KID"], "diversity": m.get("diversity"),
                   "diversity (real)": m.get("diversity_real"), "label agreement": m.get("label_agreement")}
        else:
            c2.markdown(f"{j.result.get('n_samples', '?')} samples (no metrics)"
                        + (f"  \n{j.result['metrics_note']}" if j.result.get("metrics_note") else ""))
        path = j.result.get("samples")
        if path and os.path.isfile(path):
            c3.download_button("npz", _file_bytes(path, os.path.getmtime(path)), file_name=f"{j.id}_samples.npz",
                               key=f"sgld_dl_{j.id}", on_click="ignore",
                               help="the generated samples (uint8 x, y, energies)")
        elif path:
            c3.caption("samples file missing")
        return row

    common.job_list("sgld", "sgld", _show_sgld, empty="No SGLD jobs yet.", limit=10, widths=(4, 5, 1))
