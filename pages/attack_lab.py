"""Attack Lab: attack a model and watch its energies drift (paper Fig. 1 and Fig. 2)."""

import common
import numpy as np
import streamlit as st
import torch

import figures as fig
from core.attacks import ATTACKS, AttackSpec, run_attack
from core.drift import EnergyTrace, natural_trace
from core.energy import joint_energies, marginal_energy
from core.models import device_of

lm, meta, classes, default_eps = common.require_model("Attack Lab")

with st.expander("What am I looking at?", expanded=False):
    st.markdown(
        r"""
Every image $x$ gets two energies from the logits $f(x)$: the **marginal** $E(x) = -\log\sum_k e^{f(x)[k]}$ and the
**joint** $E(x,y) = -f(x)[y]$ for its true label. Their difference is the cross-entropy, so all points lie above the
dashed line $E(x,y) = E(x)$ (zero loss).

* **Arrows (Fig. 1):** base = natural image, tip = adversarial image. Untargeted PGD moves points *left* (lower
  $E(x)$: "more likely" for the model) and *up* (higher $E(x,y)$: less likely to be the true class). Targeted attacks
  move $E(x)$ to the right instead. Robust models bend energies much less: the arrows are short.
* **Step curve (Fig. 1a):** mean $E(x)$ along the attack steps.
* **Histograms (Fig. 2):** the natural and adversarial energy distributions.
"""
    )

# ---------------------------------------------------------------- controls
names = list(ATTACKS)
with st.form("attack_form"):
    c1, c2, c3, c4 = st.columns(4)
    name = c1.selectbox("Attack", names, format_func=lambda k: ATTACKS[k].label, key="atk_name")
    norm = c2.selectbox("Norm", ["Linf", "L2"], key="atk_norm")
    if norm == "Linf":
        eps255 = c3.number_input("ε (× 1/255)", value=round(default_eps * 255, 2), step=1.0, key="atk_eps255")
        eps = float(eps255) / 255
    else:
        eps = float(c3.number_input("ε (L2)", value=0.5, step=0.1, key="atk_eps_l2"))
    steps = int(c4.number_input("Steps (Square: queries)", value=10, step=1, key="atk_steps"))
    c5, c6, c7, c8 = st.columns(4)
    auto_step = c5.checkbox("Auto step size (2.5·ε/steps)", value=True, key="atk_auto_step")
    step_size = None if auto_step else float(c6.number_input("Step size", value=2 / 255, format="%.5f", key="atk_step"))
    n_samples = int(c7.number_input("Number of test images", value=64, step=16, key="atk_n"))
    seed = int(c8.number_input("Seed", value=0, step=1, key="atk_seed"))
    c9, c10, c11, c12 = st.columns(4)
    targeted = c9.checkbox("Targeted", value=False, key="atk_targeted",
                           help="PGD and CW only; APGD-T and FAB-T choose their targets themselves")
    tmode = c10.selectbox("Target", ["random", "chosen", "least-likely"], key="atk_tmode")
    tclass = c11.selectbox("Target class (for 'chosen')", range(len(classes)), format_func=lambda i: classes[i],
                           key="atk_tclass")
    # always on screen: a form reruns the page only on submit, so a field shown only once CW is picked would appear late
    kappa = float(c12.number_input("CW confidence κ (CW only)", value=0.0, min_value=0.0, step=0.5, key="atk_kappa",
                                   help="CW's margin loss is capped at κ: with κ = 0 an image stops moving as soon as "
                                        "it is misclassified (Carlini-Wagner); a larger κ pushes it that far past the "
                                        "decision boundary"))
    submitted = st.form_submit_button("Run attack", type="primary")

st.caption(ATTACKS[name].description)


def chosen_images(ds, n: int, seed: int):
    """The n test images an attack with this seed runs on (the same draw for the preview and the run)."""
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return ds.images(idx), ds.labels(idx)


def attack_job(task, x, y, spec, model_name):
    res = run_attack(lm.model, x, y, spec, progress=task.progress)
    keep = min(16, len(x))
    return {"trace": res.trace, "spec": spec, "model": model_name, "seconds": res.seconds,
            "x": x[:keep].cpu().numpy(), "x_adv": res.x_adv[:keep].cpu().numpy(), "notes": res.notes}


def on_done(task):
    r = task.result
    st.session_state["atk_result"] = r
    hist = st.session_state.setdefault("atk_history", {})
    s = r["spec"]
    hist[f"{r['model']} · {ATTACKS[s.name].label} ε={s.eps:.4g} ({len(hist) + 1})"] = r["trace"].step_statistics("marginal")


if submitted:
    with common.guard("starting the attack"):
        ds = common.require_split(lm, "test", n_samples)
        spec = AttackSpec(name=name, norm=norm, eps=eps, steps=steps, step_size=step_size, targeted=targeted,
                          target_mode=tmode, target_class=int(tclass), seed=seed, batch_size=256, kappa=kappa)
        spec.validate(meta.num_classes)
        x, y = chosen_images(ds, n_samples, seed)
        task = common.start_task("atk_task", f"{ATTACKS[name].label} on {n_samples} images",
                                 lambda t: attack_job(t, x, y, spec, meta.name))
        common.wait_briefly(task, 1.5)

common.task_panel("atk_task", on_done)

# ---------------------------------------------------------------- results
r = st.session_state.get("atk_result")
if r is None:
    st.info("Set the attack and press **Run attack**. The defaults run PGD-10 on 64 test images in about a second on CPU.")
    # before any attack: where the chosen images start (this also loads the data and the chart library, so the
    # first run only has to attack)
    ds_prev = common.model_dataset(lm, "test")
    params = sum(p.numel() for p in lm.model.parameters())
    on_gpu = device_of(lm.model).type == "cuda"
    quick = on_gpu or params * n_samples <= 1e9  # ~ a ResNet-18 on 64 images: well under a second on a CPU
    if ds_prev is not None and quick and 0 < n_samples <= min(len(ds_prev), common.MAX_INTERACTIVE_IMAGES):
        pkey = (st.session_state["model_ref"].key, lm.meta.dataset, n_samples, seed)
        if st.session_state.get("atk_preview", (None,))[0] != pkey:
            with common.guard("computing the natural energies"):
                xp, yp = chosen_images(ds_prev, n_samples, seed)
                st.session_state["atk_preview"] = (pkey, natural_trace(lm.model, xp, yp))
        prev = st.session_state.get("atk_preview", (None, None))
        if prev[0] == pkey:
            nat0 = prev[1].natural()
            st.plotly_chart(fig.natural_energies(nat0["marginal"], nat0["joint"],
                                                 [classes[int(i)] for i in prev[1].labels], class_order=classes),
                            width="stretch", config=fig.PLOT_CONFIG, key="fig_preview")
else:
    tr: EnergyTrace = r["trace"]
    s = r["spec"]
    st.subheader(f"{ATTACKS[s.name].label}, {s.norm} ε = {s.eps:.4g}"
                 + (f" ({s.eps * 255:.1f}/255)" if s.norm == "Linf" else "") + f", {s.steps} steps — {r['model']}")
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("Natural accuracy", f"{tr.natural_accuracy():.1%}")
    m2.metric("Robust accuracy", f"{tr.robust_accuracy():.1%}",
              delta=f"{tr.robust_accuracy() - tr.natural_accuracy():+.1%}")
    ds_ = tr.delta_summary()   # over the images the attack changed (AutoAttack leaves some untouched) and over all
    some = ds_["n_perturbed"] < ds_["n"]
    over = f" over {ds_['n_perturbed']}/{ds_['n']} perturbed" if some else ""
    m3.metric("mean ΔE(x) = E(x) − E(x*)" + over, "n/a" if not ds_["n_perturbed"] else f"{ds_['dE_mean']:+.3f}")
    ts = tr.target_success()
    m4.metric("Target reached" if ts is not None else "mean ΔE(x,y)" + over,
              f"{ts:.1%}" if ts is not None else "n/a" if not ds_["n_perturbed"] else f"{ds_['dEy_mean']:+.3f}")
    for note in r.get("notes") or []:
        st.warning(note)
    st.caption(f"{tr.n_samples} images in {r['seconds']:.2f} s."
               + (f" ΔE over the {ds_['n_perturbed']} of {ds_['n']} images the attack changed; the others "
                  f"(misclassified already, or where the attack failed) are returned untouched. Over all {ds_['n']} "
                  f"images: mean ΔE(x) {ds_['dE_mean_all']:+.3f}, mean ΔE(x,y) {ds_['dEy_mean_all']:+.3f}." if some else ""))

    a, b = st.columns([3, 2])
    nat, fin = tr.natural(), tr.final()
    with a:
        st.plotly_chart(fig.energy_arrows(nat["marginal"], nat["joint"], fin["marginal"], fin["joint"],
                                          labels=[classes[int(i)] for i in tr.labels]),
                        width="stretch", config=fig.PLOT_CONFIG, key="fig_arrows")
    with b:
        hist = st.session_state.get("atk_history", {})
        chosen = st.multiselect("Runs on the step curve", list(hist), default=list(hist)[-3:], key="atk_curves")
        series = {k: hist[k] for k in chosen} or {"this run": tr.step_statistics("marginal")}
        st.plotly_chart(fig.step_curve(series), width="stretch", config=fig.PLOT_CONFIG, key="fig_steps")
        if not tr.meta.get("per_step", True):
            st.caption("This attack does not expose its iterates: only the natural and final points are traced.")
    st.plotly_chart(fig.energy_histograms(nat, fin), width="stretch", config=fig.PLOT_CONFIG, key="fig_hist")

    st.markdown("**Examples** — natural, adversarial, and the perturbation amplified to full range")
    k = min(6, len(r["x"]))
    cols = st.columns(k) if k else []
    for i in range(k):
        with cols[i]:
            st.image(fig.to_uint8_image(r["x"][i]), caption=f"true {classes[int(tr.labels[i])]} → pred "
                     f"{classes[int(nat['pred'][i])]}, E(x)={nat['marginal'][i]:.2f}", width="stretch")
            st.image(fig.to_uint8_image(r["x_adv"][i]), caption=f"adv pred {classes[int(fin['pred'][i])]}, "
                     f"E(x*)={fin['marginal'][i]:.2f}", width="stretch")
            st.image(fig.to_uint8_image(fig.amplify(r["x_adv"][i] - r["x"][i])), caption="perturbation (amplified)",
                     width="stretch")
    d1, d2 = st.columns(2)
    d1.download_button("Download trace (CSV)", tr.to_csv(), file_name="energy_trace.csv", mime="text/csv",
                       key="dl_trace")
    d2.download_button("Download examples (PNG)", fig.image_grid_png(np.concatenate([r["x"], r["x_adv"]])),
                       file_name="examples.png", mime="image/png", key="dl_examples")
    st.caption("Each chart's camera icon saves it as PNG.")

# ---------------------------------------------------------------- upload
st.divider()
st.subheader("Your own image")
up = st.file_uploader("PNG or JPEG (at most 10 MB, 16 megapixels)", type=["png", "jpg", "jpeg"], key="atk_upload")
if up is not None:
    with common.guard("reading the uploaded image"):
        from core.uploads import decode_image

        shape = tuple(meta.input_shape[1:]) if meta.input_shape else (32, 32)
        x1 = decode_image(up.getvalue(), size=shape)
        dev = device_of(lm.model)
        with torch.no_grad():
            logits = lm.model.eval()(x1.to(dev)).cpu()
        pred = int(logits.argmax(1))
        c1, c2 = st.columns([1, 3])
        c1.image(fig.to_uint8_image(x1[0].numpy()), caption=f"as the model sees it ({shape[0]}×{shape[1]})", width=160)
        c1.metric("Prediction", classes[pred])
        c1.metric("E(x)", f"{float(marginal_energy(logits)[0]):.3f}")
        c2.plotly_chart(fig.class_energy_bars(joint_energies(logits)[0].numpy(), classes,
                                              float(marginal_energy(logits)[0]), "E(x, k) for every class"),
                        width="stretch", key="fig_upload_bars")
        true = st.selectbox("True label of this image", range(len(classes)), index=pred,
                            format_func=lambda i: classes[i], key="atk_upload_label")
        if st.button("Attack this image with the settings above", key="atk_upload_run"):
            spec = AttackSpec(name=name, norm=norm, eps=eps, steps=steps, step_size=step_size, targeted=targeted,
                              target_mode=tmode, target_class=int(tclass), seed=seed, kappa=kappa)
            res = run_attack(lm.model, x1, torch.tensor([true]), spec)
            t = res.trace
            st.session_state["atk_upload_result"] = (x1.numpy(), res.x_adv.numpy(), t)
    ur = st.session_state.get("atk_upload_result")
    if ur is not None:
        x1n, xan, t = ur
        c1, c2, c3 = st.columns(3)
        c1.image(fig.to_uint8_image(x1n[0]), caption=f"natural: pred {classes[int(t.pred[0, 0])]}, "
                 f"E(x)={t.marginal[0, 0]:.2f}, E(x,y)={t.joint[0, 0]:.2f}", width=180)
        c2.image(fig.to_uint8_image(xan[0]), caption=f"adversarial: pred {classes[int(t.pred[-1, 0])]}, "
                 f"E(x*)={t.marginal[-1, 0]:.2f}, E(x*,y)={t.joint[-1, 0]:.2f}", width=180)
        c3.image(fig.to_uint8_image(fig.amplify(xan[0] - x1n[0])), caption="perturbation (amplified)", width=180)
