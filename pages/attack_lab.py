"""Attack Lab: attack a model and watch its energies drift (paper Fig. 1 and Fig. 2)."""

import common
import numpy as np
import streamlit as st
import torch

import figures as fig
import persist
import slides
import tour
from core.attacks import ATTACKS, AttackSpec, attack_slug, describe_attack, format_eps, interactive_batch_size, run_attack
from core.attacks import budget, pgd_step_size
from core.claims import RULE, marginal_claim
from core.data import PAPER_EPS
from core.drift import EnergyTrace, natural_trace
from core.energy import joint_energies, marginal_energy, typicality
from core.models import device_of

lm, meta, classes, default_eps = common.require_model("Attack Lab")
tour.banner("attack")
model_key = st.session_state["model_ref"].key
# the last result of this browser session survives a page reload, under the model that made it only
restored = persist.restore("attack", accept=lambda m: m.get("model_key") == model_key) \
    if "atk_result" not in st.session_state else None
if restored is not None:
    with common.guard("restoring the last result"):
        try:
            st.session_state["atk_result"], st.session_state["atk_history"] = persist.unpack_attack(
                *restored, num_classes=meta.num_classes)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            persist.discard("attack", str(e)[:200] or type(e).__name__)

with st.expander("What am I looking at?", expanded=False):
    st.markdown(
        r"""
Every image $x$ gets two energies from the logits $f(x)$: the **marginal** $E(x) = -\log\sum_k e^{f(x)[k]}$ and the
**joint** $E(x,y) = -f(x)[y]$ for its true label. Their difference is the cross-entropy, so all points lie above the
dashed line $E(x,y) = E(x)$ (zero loss).

* **Arrows (Fig. 1):** base = natural image, tip = adversarial image. The paper reports that on non-robust models
  untargeted PGD moves points *left* (lower $E(x)$: "more likely" for the model) and *up* (higher $E(x,y)$: less
  likely to be the true class), that targeted attacks move $E(x)$ to the right instead, and that robust models bend
  energies much less. The line under the arrows checks this claim on the model and images on screen.
* **Step curve (Fig. 1a):** mean $E(x)$ along the attack steps.
* **Histograms (Fig. 2):** the natural and adversarial energy distributions.
"""
    )

# ---------------------------------------------------------------- controls
others = common.comparable_models(meta)
cmp_cols = st.columns([1, 2])
compare = cmp_cols[0].toggle("Side by side with a second model", key="atk_compare", disabled=not others,
                             help="The same images and attack on a second model of the same dataset, on shared axes "
                                  "(e.g. the plain model next to the SAT model).")
ref_b = None
if compare and others:
    by_b = {r.name: r for r, _ in others}
    meta_b = {r.name: m for r, m in others}
    if st.session_state.get("atk_model_b") not in by_b:  # default: the first robust one (e.g. SAT next to plain)
        robust = [n for n, m in meta_b.items() if m.method not in ("plain", "unknown")]
        st.session_state["atk_model_b"] = robust[0] if robust else next(iter(by_b))
    name_b = cmp_cols[1].selectbox("Second model", list(by_b), key="atk_model_b",
                                   format_func=lambda n: f"{n} ({meta_b[n].method})")
    ref_b = by_b[name_b]
def decoded_upload():
    """The file in the uploader decoded for this model, once per (file, model): ``(file_id, x1, notes, error)``, or
    None when the uploader is empty. Decoded before the form is drawn, so that a refused file (error) leaves
    "Attack my uploaded image" disabled; a refused or new file clears the previous image's result."""
    up_ = st.session_state.get("atk_upload")
    if up_ is None:
        st.session_state.pop("atk_upload_result", None)
        return None
    fid = getattr(up_, "file_id", None) or f"{up_.name}:{up_.size}"
    key_ = (fid, st.session_state["model_ref"].key if st.session_state.get("model_ref") else meta.name)
    cached = st.session_state.get("_atk_upload_decoded")
    if cached is None or cached[0] != key_:
        from core.errors import EnergyLensError
        from core.uploads import decode_image

        shape_ = tuple(meta.input_shape[1:]) if meta.input_shape else (32, 32)
        notes_: list[str] = []  # what decoding changed: alpha on white, EXIF rotation, 16-bit, MPO
        try:
            out = (fid, decode_image(up_.getvalue(), size=shape_, notes=notes_), notes_, None)
        except EnergyLensError as e:
            out = (fid, None, [], str(e))
        except Exception as e:  # noqa: BLE001 - an odd file must never show a traceback
            out = (fid, None, [], f"could not read the image: {type(e).__name__}: {e}")
        cached = (key_, out)
        st.session_state["_atk_upload_decoded"] = cached
    if st.session_state.get("_atk_upload_result_for") != cached[0] or cached[1][3] is not None:
        st.session_state.pop("atk_upload_result", None)   # the result belongs to another (or a refused) image
    return cached[1]


upload = decoded_upload()
names = list(ATTACKS)
SQUARE_QUERIES = 300  # ~20 s on 64 digits images on a busy 2-core CPU (issue 13); AutoAttack uses 5,000
# defaults live in session state (the guided tour sets the same keys); ε follows the model's dataset
common.widget_default("atk_eps255", round(default_eps * 255, 2), scope=meta.dataset)
for k, v in {"atk_name": "pgd", "atk_norm": "Linf", "atk_eps_l2": 0.5, "atk_steps": 10, "atk_auto_step": True,
             "atk_step": pgd_step_size(PAPER_EPS),  # the paper's PGD step at its budget (2/255)
             "atk_n": 64, "atk_seed": 0, "atk_targeted": False, "atk_tmode": "random",
             "atk_queries": SQUARE_QUERIES, "atk_kappa": 0.0, "atk_targets": budget.INTERACTIVE_TARGETS}.items():
    common.widget_default(k, v)
with st.form("attack_form"):
    c1, c2, c3, c4 = st.columns(4)
    name = c1.selectbox("Attack", names, format_func=lambda k: ATTACKS[k].label, key="atk_name")
    norm = c2.selectbox("Norm", ["Linf", "L2"], key="atk_norm")
    if norm == "Linf":
        eps255 = c3.number_input("ε (× 1/255)", step=1.0, key="atk_eps255")
        eps = float(eps255) / 255
    else:
        eps = float(c3.number_input("ε (L2)", step=0.1, key="atk_eps_l2"))
    steps = int(c4.number_input("Steps", step=1, key="atk_steps", help="Square counts queries instead: below"))
    c5, c6, c7, c8 = st.columns(4)
    auto_step = c5.checkbox("Auto step size (2.5·ε/steps)", key="atk_auto_step")
    step_size = None if auto_step else float(c6.number_input("Step size", format="%.5f", key="atk_step"))
    n_samples = int(c7.number_input("Number of test images", step=16, key="atk_n"))
    seed = int(c8.number_input("Seed", step=1, key="atk_seed"))
    c9, c10, c11, c12 = st.columns(4)
    targeted = c9.checkbox("Targeted", key="atk_targeted",
                           help="PGD and CW only; APGD-T and FAB-T choose their targets themselves")
    tmode = c10.selectbox("Target", ["random", "chosen", "least-likely"], key="atk_tmode")
    tclass = c11.selectbox("Target class (for 'chosen')", range(len(classes)), format_func=lambda i: classes[i],
                           key="atk_tclass")
    queries = int(c12.number_input("Square: queries", step=100, key="atk_queries",
                                   help="Square is a black-box attack: each query is one forward pass of the images "
                                        "it has not broken yet. AutoAttack's standard evaluation uses 5,000 queries; "
                                        f"{SQUARE_QUERIES} answer in seconds on a CPU and already lower the accuracy, "
                                        "more keep lowering it."))
    if name == "square":
        steps = queries
    # always on screen: a form reruns the page only on submit, so a field shown only once CW is picked would appear late
    kcol, tgcol, _ = st.columns([1, 1, 2])
    kappa = float(kcol.number_input("CW confidence κ (CW only)", min_value=0.0, step=0.5, key="atk_kappa",
                                    help="CW's margin loss is capped at κ: with κ = 0 an image stops moving as soon as "
                                         "it is misclassified (Carlini-Wagner); a larger κ pushes it that far past the "
                                         "decision boundary"))
    n_tg = int(tgcol.number_input("APGD-T / FAB-T: target classes", step=1, key="atk_targets",
                                  help="Each image is attacked towards its most likely wrong classes, one after the "
                                       "other, until one succeeds. AutoAttack's standard evaluation uses 9; "
                                       f"{budget.INTERACTIVE_TARGETS} answer in seconds and keep the algorithm as "
                                       "defined (only the budget is smaller)."))
    b1, b2 = st.columns([1, 3])
    submitted = b1.form_submit_button("Run attack", type="primary")
    # form values reach the server only with a submit: attacking an upload needs its own submit button,
    # so that it uses the settings on screen
    upload_submitted = b2.form_submit_button("Attack my uploaded image (below) with these settings",
                                             disabled=upload is None or upload[3] is not None,
                                             help="Upload a PNG or JPEG under 'Your own image' first (a file "
                                                  "that was refused cannot be attacked)")

st.caption(ATTACKS[name].description)


def common_time(seconds: float) -> str:
    s = int(round(seconds))
    return f"{seconds:.1f} s" if seconds < 60 else f"{s // 60} min {s % 60:02d} s" if s < 3600 else \
        f"{s // 3600} h {(s % 3600) // 60:02d} min"


def chosen_images(ds, n: int, seed: int):
    """The n test images an attack with this seed runs on (the same draw for the preview and the run)."""
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return ds.images(idx), ds.labels(idx)


def model_identity(meta) -> dict:
    """What the claim check needs to know about a model: its training method, origin and name."""
    return {"method": meta.method, "source": meta.source, "model_name": meta.name}


def attack_job(task, x, y, spec, model_name, lm_b=None):
    share = 0.5 if lm_b is not None else 1.0
    res = run_attack(lm.model, x, y, spec, progress=lambda f, m: task.progress(f * share, m), should_stop=task.cancelled)
    keep = min(16, len(res.x_adv))  # a cancelled attack returns the images attacked so far
    out = {"trace": res.trace, "spec": spec, "model": model_name, "seconds": res.seconds, "who": model_identity(lm.meta),
           "x": x[:keep].cpu().numpy(), "x_adv": res.x_adv[:keep].cpu().numpy(), "notes": res.notes}
    if lm_b is not None and not res.partial:
        rb = run_attack(lm_b.model, x, y, spec, should_stop=task.cancelled,
                        progress=lambda f, m: task.progress(0.5 + 0.5 * f, f"{lm_b.meta.name}: {m}"))
        if rb.partial:  # side by side needs the same images on both models
            out["notes"] = list(res.notes) + [f"Cancelled while attacking {lm_b.meta.name}: only {model_name} is shown."]
        else:
            out["b"] = {"trace": rb.trace, "model": lm_b.meta.name, "method": lm_b.meta.method, "seconds": rb.seconds,
                        "who": model_identity(lm_b.meta),
                        "x_adv": rb.x_adv[:keep].cpu().numpy(), "notes": rb.notes}
    return out


def on_done(task):
    r = task.result
    st.session_state["atk_result"] = r
    hist = st.session_state.setdefault("atk_history", {})
    label = f"{r['model']} · {describe_attack(r['spec'], classes)} ({len(hist) + 1})"
    hist[label] = r["trace"].step_statistics("marginal")
    new = [label]
    if "b" in r:
        label_b = f"{r['b']['model']} · {describe_attack(r['spec'], classes)} ({len(hist) + 1})"
        hist[label_b] = r["b"]["trace"].step_statistics("marginal")
        new.append(label_b)
    # a new run is shown on the step curve; runs the user took off stay off (the selector is drawn after this)
    if "atk_curves" in st.session_state:
        st.session_state["atk_curves"] = [k for k in st.session_state["atk_curves"] if k in hist] + new
    persist.keep("attack", *persist.pack_attack(r, hist, model_key=model_key))


if st.session_state.pop("atk_autorun", False):  # set by the guided tour: run with the widgets it set
    submitted = True
if submitted:
    with common.guard("starting the attack"):
        ds = common.require_split(lm, "test", n_samples)
        spec = AttackSpec(name=name, norm=norm, eps=eps, steps=steps, step_size=step_size, targeted=targeted,
                          target_mode=tmode, target_class=int(tclass), seed=seed,
                          batch_size=interactive_batch_size(name), kappa=kappa,
                          extra={"targets": n_tg} if name in budget.TARGETED else {})
        spec.validate(meta.num_classes)
        x, y = chosen_images(ds, n_samples, seed)
        lm_b = common.load_ref(ref_b) if ref_b is not None else None
        what = f"{ATTACKS[name].label} on {n_samples} images" + (", two models" if lm_b is not None else "")
        task = common.start_task("atk_task", what, lambda t: attack_job(t, x, y, spec, meta.name, lm_b))
        common.wait_briefly(task, 1.5)

common.task_panel("atk_task", on_done)

# ---------------------------------------------------------------- results
r = st.session_state.get("atk_result")
atk_task = st.session_state.get("atk_task")
attacking = isinstance(atk_task, common.Task) and not atk_task.done
def natural_preview() -> None:
    """Where the chosen images start: their natural energies (tour step 1's scatter). Also loads the data and the
    chart library, so the first run only has to attack. Not while an attack runs: two threads computing at once
    only slow both down."""
    ds_prev = common.model_dataset(lm, "test")
    params = sum(p.numel() for p in lm.model.parameters())
    on_gpu = device_of(lm.model).type == "cuda"
    quick = on_gpu or params * n_samples <= 1e9  # ~ a ResNet-18 on 64 images: well under a second on a CPU
    if ds_prev is not None and quick and 0 < n_samples <= min(len(ds_prev), budget.MAX_INTERACTIVE_IMAGES):
        pkey = (st.session_state["model_ref"].key, lm.meta.dataset, n_samples, seed)
        if st.session_state.get("atk_preview", (None,))[0] != pkey:
            with common.guard("computing the natural energies"):
                xp, yp = chosen_images(ds_prev, n_samples, seed)
                st.session_state["atk_preview"] = (pkey, natural_trace(lm.model, xp, yp))
        prev = st.session_state.get("atk_preview", (None, None))
        if prev[0] == pkey:
            nat0 = prev[1].natural()
            st.plotly_chart(fig.natural_energies(nat0["marginal"], nat0["joint"],
                                                 [classes[int(i)] for i in prev[1].labels], class_order=classes,
                                                 preds=[classes[int(i)] for i in nat0["pred"]]),
                            width="stretch", config=fig.PLOT_CONFIG, key="fig_preview")


tour_step = tour.current("attack")
if r is not None and not attacking and tour_step is not None and tour_step.focus == "natural":
    # the tour's first step describes this scatter: show it even when the session already holds an attack result
    st.subheader("Natural energies of the chosen test images")
    natural_preview()
    st.caption("The last attack result of this session is below.")
if r is None and not attacking:
    st.info("Set the attack and press **Run attack**. The defaults run PGD-10 on 64 test images in "
            + common.time_promise(lm, 64, 1 + 10 * common.PASSES_PER_GRADIENT_STEP) + ".")
    natural_preview()
elif r is not None:
    s = r["spec"]
    tr: EnergyTrace = r["trace"]
    b = r.get("b")
    st.subheader(f"{describe_attack(s, classes)} — {r['model']}" + (f" and {b['model']}" if b else ""))
    runs = [(r["model"], tr, r["seconds"], r.get("notes") or [], r["x_adv"])]
    if b:
        runs.append((b["model"], b["trace"], b["seconds"], b.get("notes") or [], b["x_adv"]))
    # one axis range for every view of this result (side by side views are comparable)
    xr = fig.shared_range(*[t.marginal[[0, -1]] for _, t, *_ in runs])
    yr = fig.shared_range(*[t.joint[[0, -1]] for _, t, *_ in runs])
    both = fig.shared_range(xr, yr)
    # side by side, both drift colour bars share one scale (the longer run's longest arrow)
    drift_max = max(float(np.nanmax(np.hypot(t.marginal[-1] - t.marginal[0], t.joint[-1] - t.joint[0])))
                    for _, t, *_ in runs) if b else None
    whos = [r.get("who") or {}] + ([b.get("who") or {}] if b else [])
    cols = st.columns(len(runs))
    for col, who_, (model_name, t, secs, notes, _) in zip(cols, whos, runs):
        with col:
            if b:
                st.markdown(f"**{model_name}**")
            m1, m2, m3, m4 = st.columns(4)
            m1.metric("Natural accuracy", f"{t.natural_accuracy():.1%}")
            m2.metric("Robust accuracy", f"{t.robust_accuracy():.1%}",
                      delta=f"{t.robust_accuracy() - t.natural_accuracy():+.1%}")
            ds_ = t.delta_summary()   # over the images the attack changed (AutoAttack leaves some untouched)
            some = ds_["n_perturbed"] < ds_["n"]
            over = f" over {ds_['n_perturbed']}/{ds_['n']} perturbed" if some else ""
            m3.metric("mean ΔE(x) = E(x) − E(x*)" + over, "n/a" if not ds_["n_perturbed"] else f"{ds_['dE_mean']:+.3f}")
            ts = t.target_success()
            m4.metric("Target reached" if ts is not None else "mean ΔE(x,y)" + over,
                      f"{ts:.1%}" if ts is not None else "n/a" if not ds_["n_perturbed"] else f"{ds_['dEy_mean']:+.3f}")
            claim = marginal_claim(t, label=ATTACKS[s.name].label + (" (targeted)" if s.targeted else ""), **who_)
            (st.success if claim.holds else st.info if claim.holds is None else st.warning)(claim.text)
            st.caption(RULE)
            for note in notes:
                st.warning(note)
            full = budget.full_cost(s, secs, meta.num_classes)
            st.caption(f"{t.n_samples} images in {secs:.2f} s."
                       + (f" AutoAttack's {full['version']} setting for {ATTACKS[s.name].label} "
                          f"({full['setting']}) is {full['factor']:.3g}× this run's work: about "
                          f"{common_time(full['seconds'])} for these images on this machine, at most (AutoAttack "
                          "skips images already broken)." if full and full["factor"] > 1.001 else "")
                       + (f" ΔE over the {ds_['n_perturbed']} of {ds_['n']} images the attack changed; the others "
                          f"(misclassified already, or where the attack failed) are returned untouched. Over all "
                          f"{ds_['n']} images: mean ΔE(x) {ds_['dE_mean_all']:+.3f}, mean ΔE(x,y) "
                          f"{ds_['dEy_mean_all']:+.3f}." if some else ""))
            nat, fin = t.natural(), t.final()
            arrows = fig.energy_arrows(nat["marginal"], nat["joint"], fin["marginal"], fin["joint"],
                                       labels=[classes[int(i)] for i in t.labels],
                                       pred_nat=[classes[int(i)] for i in nat["pred"]],
                                       pred_adv=[classes[int(i)] for i in fin["pred"]], drift_max=drift_max,
                                       title=f"Energy drift — {model_name}" if b else
                                       "Energy drift: natural → adversarial",
                                       x_range=both if b else None, y_range=both if b else None)
            st.plotly_chart(arrows, width="stretch", config=fig.PLOT_CONFIG,
                            key=f"fig_arrows_{model_name}" if b else "fig_arrows")
            slides.slide_panel(arrows, f"Fig. 1 — energy drift, natural → adversarial · model {model_name} · "
                                       f"{describe_attack(s, classes)} · {t.n_samples} test images",
                               key=f"slide_arrows_{model_name}" if b else "slide_arrows",
                               name=f"fig1_{model_name}_{attack_slug(s)}")

    hist = st.session_state.get("atk_history", {})
    chosen = st.multiselect("Runs on the step curve", list(hist), key="atk_curves",
                            default=None if "atk_curves" in st.session_state else list(hist)[-3:])
    series = {k: hist[k] for k in chosen} or {"this run": tr.step_statistics("marginal")}
    st.plotly_chart(fig.step_curve(series), width="stretch", config=fig.PLOT_CONFIG, key="fig_steps")
    if not tr.meta.get("per_step", True):
        st.caption("This attack does not expose its iterates: only the natural and final points are traced.")
    hcols = st.columns(len(runs))
    ranges = {"marginal": xr, "joint": yr} if b else None
    for col, (model_name, t, *_rest) in zip(hcols, runs):
        with col:
            st.plotly_chart(fig.energy_histograms(t.natural(), t.final(), ranges=ranges,
                                                  title=f"Natural vs adversarial — {model_name}" if b else None),
                            width="stretch", config=fig.PLOT_CONFIG,
                            key=f"fig_hist_{model_name}" if b else "fig_hist")

    st.markdown("**Examples** — natural, adversarial, and the perturbation amplified to full range")
    nat, fin = tr.natural(), tr.final()
    k = min(6, len(r["x"]))
    cols = st.columns(k) if k else []
    for i in range(k):
        with cols[i]:
            st.image(fig.to_uint8_image(r["x"][i]), caption=f"true {classes[int(tr.labels[i])]} → pred "
                     f"{classes[int(nat['pred'][i])]}, E(x)={nat['marginal'][i]:.2f}", width="stretch")
            for model_name, t, _, _, xadv in runs:
                by = f"{model_name}: " if b else ""
                st.image(fig.to_uint8_image(xadv[i]), caption=f"{by}adv pred {classes[int(t.pred[-1][i])]}, "
                         f"E(x*)={t.marginal[-1][i]:.2f}", width="stretch")
            st.image(fig.to_uint8_image(fig.amplify(r["x_adv"][i] - r["x"][i])), caption="perturbation (amplified)",
                     width="stretch")
    persist.unsaved_notice("attack")
    d1, d2, d3 = st.columns(3)
    with d3:
        persist.clear_button("attack", ("atk_result", "atk_history", "atk_curves"))
    stem = f"{r['model']}_{attack_slug(s)}"
    context = {"model": r["model"], "attack": s.name, "norm": s.norm, "eps": s.eps,
               "eps_text": format_eps(s.eps, s.norm), "steps": s.steps, "targeted": s.targeted,
               "target_mode": s.target_mode if s.targeted else "", "seed": s.seed}
    d1.download_button("Download trace (CSV)", tr.to_csv(context), file_name=f"energy_trace_{stem}.csv",
                       mime="text/csv", key="dl_trace")
    nx = len(r["x"])
    grid = np.concatenate([r["x"], r["x_adv"], np.stack([fig.amplify(d) for d in r["x_adv"] - r["x"]])])
    d2.download_button("Download examples (PNG)",
                       fig.image_grid_png(grid, ncol=nx, row_labels=["natural", "adversarial", "perturbation (amplified)"]),
                       file_name=f"examples_{stem}.png", mime="image/png", key="dl_examples")
    st.caption("Each chart's camera icon saves it as PNG.")

# ---------------------------------------------------------------- upload
st.divider()
st.subheader("Your own image")
up = st.file_uploader("PNG or JPEG (at most 10 MB, 16 megapixels)", type=["png", "jpg", "jpeg"], key="atk_upload")
if up is not None and upload is not None and upload[3] is not None:
    st.error(upload[3])
    st.caption("The previous image's result was cleared; upload another PNG or JPEG to attack it.")
elif up is not None and upload is not None:
    with common.guard("reading the uploaded image"):
        shape = tuple(meta.input_shape[1:]) if meta.input_shape else (32, 32)
        x1, upload_notes = upload[1], upload[2]
        for note in upload_notes:
            st.info(f"Note: {note}.")
        dev = device_of(lm.model)
        with torch.no_grad():
            logits = lm.model.eval()(x1.to(dev)).cpu()
        pred = int(logits.argmax(1))
        c1, c2 = st.columns([1, 3])
        c1.image(fig.to_uint8_image(x1[0].numpy()), caption=f"as the model sees it ({shape[0]}×{shape[1]})", width=160)
        c1.metric("Prediction", classes[pred])
        e_up = float(marginal_energy(logits)[0])
        c1.metric("E(x)", f"{e_up:.3f}")
        ref_e = common.test_energies(lm)
        if ref_e is not None:
            ty = typicality(e_up, ref_e)
            line = (f"E(x) = {e_up:.2f} is higher than for {ty['percentile']:.0%} of this model's "
                    f"{ty['n_reference']} test images (their 99th percentile is {ty['threshold']:.2f})")
            if ty["out_of_distribution"]:
                c1.warning(f"{line}: to this model the image looks **out of distribution** (high energy = unlikely, "
                           "the paper's reading of E(x)), so treat the prediction with suspicion.")
            else:
                c1.caption(f"{line}: within the range of the data the model was tested on.")
        c2.plotly_chart(fig.class_energy_bars(joint_energies(logits)[0].numpy(), classes,
                                              float(marginal_energy(logits)[0]), "E(x, k) for every class"),
                        width="stretch", key="fig_upload_bars")
        true = st.selectbox("True label of this image", range(len(classes)), index=pred,
                            format_func=lambda i: classes[i], key="atk_upload_label")
        if upload_submitted:  # the form's values are the ones on screen
            spec = AttackSpec(name=name, norm=norm, eps=eps, steps=steps, step_size=step_size, targeted=targeted,
                              target_mode=tmode, target_class=int(tclass), seed=seed, kappa=kappa,
                              extra={"targets": n_tg} if name in budget.TARGETED else {})
            spec.validate(meta.num_classes)

            def _upload_job(task, x1=x1, y1=torch.tensor([true]), spec=spec, what=describe_attack(spec, classes)):
                res = run_attack(lm.model, x1, y1, spec, progress=task.progress, should_stop=task.cancelled)
                return x1.numpy(), res.x_adv.numpy(), res.trace, what

            # off the script thread: the page answers at once and shows progress with a Cancel button
            st.session_state["_atk_upload_result_for"] = st.session_state["_atk_upload_decoded"][0]
            common.wait_briefly(common.start_task("atk_upload_task", "attacking your image", _upload_job), 1.5)
        common.task_panel("atk_upload_task", lambda task: st.session_state.__setitem__("atk_upload_result", task.result))
        if not upload_submitted and st.session_state.get("atk_upload_result") is None:
            st.caption("Set the attack in the form above and press **Attack my uploaded image (below) with these "
                       "settings**.")
    ur = st.session_state.get("atk_upload_result")
    if ur is not None:
        x1n, xan, t, what = ur
        if what:
            st.markdown(f"**{what}**")
        c1, c2, c3 = st.columns(3)
        c1.image(fig.to_uint8_image(x1n[0]), caption=f"natural: pred {classes[int(t.pred[0, 0])]}, "
                 f"E(x)={t.marginal[0, 0]:.2f}, E(x,y)={t.joint[0, 0]:.2f}", width=180)
        c2.image(fig.to_uint8_image(xan[0]), caption=f"adversarial: pred {classes[int(t.pred[-1, 0])]}, "
                 f"E(x*)={t.marginal[-1, 0]:.2f}, E(x*,y)={t.joint[-1, 0]:.2f}", width=180)
        c3.image(fig.to_uint8_image(fig.amplify(xan[0] - x1n[0])), caption="perturbation (amplified)", width=180)
