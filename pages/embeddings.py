"""Embedding explorer: penultimate features (or logits) of natural, adversarial and generated images,
mapped to 2-D with PCA (instant) or UMAP (background), coloured by energy, class or origin."""


import common
import numpy as np
import streamlit as st
import torch

import analysis_figures as af
import figures as fig
import persist
from core import analysis
from core.attacks import AttackSpec, run_attack
from core.errors import InputError
from core.models import device_of

lm, meta, classes, default_eps = common.require_model("Embedding explorer")
# the last features of this browser session survive a page reload, with the model they were made with
restored = persist.restore_with_model("embedding")
if restored is not None and "emb_data" not in st.session_state:
    with common.guard("restoring the last features"):
        st.session_state["emb_data"] = persist.unpack_embedding(*restored)
persist.restored_note("embedding", "the features")


# ---------------------------------------------------------------- UMAP warm-up, once per server process
# (the app starts it at launch, dashboard/Home.py; this covers a page opened before that ran)
WARMUP_ON = common.umap_warmup()
ust = analysis.umap_state()


def _promise(n: int | None = None) -> str:
    """The time UMAP will take, from what this machine measured (core.analysis.umap_estimate)."""
    est = analysis.umap_estimate(n or 1000)
    basis = "measured on this machine" if est["measured"] else "estimate for a busy 2-core CPU; measured after the first run"
    parts = []
    if est["warmup_s"] > 0:
        parts.append(f"warm-up ~{est['warmup_s']:.0f} s")
    if n:
        parts.append(f"{n:,} points ~{max(est['fit_s'], 0.1):.1f} s")
    return f"{', then '.join(parts)} ({basis})" if parts else ""


if ust["state"] == "warming" or (ust["state"] == "cold" and WARMUP_ON):
    st.caption(f":material/hourglass_top: warming up UMAP in the background ({_promise()}) — PCA works right away.")
elif ust["state"] == "cold":
    st.caption(f"UMAP compiles on first use ({_promise()}); PCA works right away.")
elif ust["state"] == "failed":
    st.caption(f"UMAP is unavailable ({ust['error']}); PCA works.")

with st.expander("What am I looking at?", expanded=False):
    st.markdown(
        r"""
Each point is an image, placed by a 2-D projection of the model's **penultimate features** (the input of its
last linear layer) or of its **logits**. Colour by the marginal energy $E(x)$, by class, or by origin: natural test
images, their **adversarial** versions (PGD at the model's ε) and **generated** images (SGLD samples you upload as
`.npz` with an array `x`). For robust models adversarial points stay near their natural class; for non-robust ones
they jump into other clusters while their energy drops. Select points (box or lasso) to see the images.
"""
    )

with st.form("emb_form"):
    c1, c2, c3, c4 = st.columns(4)
    split = c1.selectbox("Data", ["test", "train"], key="emb_split")
    n = int(c2.number_input("Natural images", value=300, step=100, key="emb_n"))
    with_adv = c3.checkbox("Add adversarial versions (PGD-10)", value=True, key="emb_adv")
    kind = c4.selectbox("Features", ["penultimate", "logits"], key="emb_kind")
    up = st.file_uploader("Generated images (optional .npz with x: N×C×H×W or N×H×W×C, values in [0,1] or uint8)",
                          type=["npz"], key="emb_upload")
    go = st.form_submit_button("Compute features", type="primary")


def _load_generated(data: bytes):
    import io
    import zipfile

    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as d:
            if "x" not in d:
                raise InputError("the .npz file must contain an array named 'x'")
            x = d["x"]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise InputError(f"could not read the .npz file: {e}") from e
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.dtype != torch.uint8:
        t = t.float()
    from core.data import validate_images

    return validate_images(t, expect_shape=tuple(meta.input_shape) if meta.input_shape else None, max_batch=5000)


def _features(task, x, y, gen, adv):
    groups = {"natural": x}
    labels = [y]
    if adv:
        spec = AttackSpec("pgd", eps=default_eps, steps=10, seed=0)
        xa = run_attack(lm.model, x, y, spec, record_trace=False,
                        progress=lambda f, m: task.progress(0.5 * f, m)).x_adv
        groups["adversarial"] = xa
        labels.append(y)
    if gen is not None:
        groups["generated"] = gen
        with torch.no_grad():  # generated images have no label: use the model's prediction
            dev = device_of(lm.model)
            labels.append(torch.cat([lm.model.eval()(gen[i:i + 256].to(dev)).argmax(1).cpu()
                                     for i in range(0, len(gen), 256)]))
    allx, grp = analysis.stack_groups(groups)
    ally = torch.cat(labels)
    task.progress(0.6, "features")
    feats = analysis.extract_features(lm.model, allx, kind=kind, progress=lambda f, m: task.progress(0.6 + 0.3 * f, m))
    stats = analysis.sample_stats_from_logits(analysis.model_logits(lm.model, allx), ally)
    task.progress(0.95, "PCA")
    return {"x": allx.numpy(), "y": ally.numpy(), "groups": grp, "features": feats, "energy": stats.e_x,
            "pred": stats.pred, "pca": analysis.pca_2d(feats), "umap": None, "model": meta.name, "kind": kind}


if go:
    with common.guard("computing features"):
        ds = common.require_split(lm, split, n)
        gen = _load_generated(up.getvalue()) if up is not None else None
        if gen is None and isinstance(st.session_state.get("generated_samples"), (np.ndarray, torch.Tensor)):
            gen = torch.as_tensor(st.session_state["generated_samples"]).float()
        from core.data import probe_indices

        idx = probe_indices(ds, n, seed=0)
        x, y = ds.images(idx), ds.labels(idx)
        task = common.start_task("emb_task", f"features of {n} images", lambda t: _features(t, x, y, gen, with_adv))
        common.wait_briefly(task, 2.0)
        st.session_state.pop("emb_umap_task", None)

def _keep_embedding(data: dict) -> None:
    arrays, emeta = persist.pack_embedding(data)
    persist.keep("embedding", arrays, {**emeta, "model_ref": persist.model_identity(st.session_state.get("model_ref"))})


def _emb_done(t) -> None:
    st.session_state["emb_data"] = t.result
    _keep_embedding(t.result)


common.task_panel("emb_task", _emb_done)

data = st.session_state.get("emb_data")
if not data or data.get("model") != meta.name:
    _passes = 2 + (10 * common.PASSES_PER_GRADIENT_STEP + 2 if with_adv else 0)
    st.info(f"Press **Compute features**. {n:,} {split} images{' plus their PGD versions' if with_adv else ''} take "
            f"{common.time_promise(lm, n, _passes)}; the PCA map appears at once.")
    st.stop()

c1, c2 = st.columns(2)
method = c1.radio("Projection", ["PCA", "UMAP"], horizontal=True, key="emb_method")
color = c2.radio("Colour by", ["energy", "class", "group"], horizontal=True, key="emb_color",
                 format_func=lambda k: {"energy": "E(x)", "class": "class", "group": "natural / adversarial / generated"}[k])


def _umap(task, feats):
    est = analysis.umap_estimate(len(feats))
    share = est["warmup_s"] / max(est["seconds"], 1e-9)   # the progress bar's split between warm-up and fit
    if analysis.umap_state()["state"] != "warm":
        task.progress(0.02, f"warming up UMAP (~{est['warmup_s']:.0f} s)")
        analysis.warm_umap()
    task.progress(share, f"UMAP of {len(feats):,} points (~{max(est['fit_s'], 0.1):.1f} s)")
    return analysis.umap_2d(feats, seed=0)


coords = data["pca"]
title = f"PCA of {data['kind']} features"
if method == "UMAP":
    if data.get("umap") is None:
        old = st.session_state.get("emb_umap_task")
        if old is None or not old.done:  # a failed UMAP is not retried on every rerun
            with common.guard("starting UMAP"):
                analysis.preimport_umap_dependencies()   # (before a thread imports umap: see there)
                task = common.start_task("emb_umap_task", "UMAP", lambda t: _umap(t, data["features"]))
                common.wait_briefly(task, 1.0)
        def _umap_done(t) -> None:
            data["umap"] = t.result
            _keep_embedding(data)

        common.task_panel("emb_umap_task", _umap_done)
        if data.get("umap") is None:
            st.caption(f"Showing PCA until UMAP is ready ({_promise(len(data['features']))}).")
    if data.get("umap") is not None:
        coords, title = data["umap"], f"UMAP of {data['kind']} features"

with common.guard("drawing the map"):
    figure = af.embedding_figure(coords, color, energy=data["energy"], labels=data["y"], groups=data["groups"],
                                 class_names=classes, title=title)
    event = st.plotly_chart(figure, width="stretch", key="emb_chart", on_select="rerun",
                            selection_mode=("points", "box", "lasso"), config={"displaylogo": False})
    counts = {g: int((data["groups"] == g).sum()) for g in dict.fromkeys(data["groups"].tolist())}
    st.caption(" · ".join(f"{g}: {k} points, mean E(x) {data['energy'][data['groups'] == g].mean():.2f}"
                          for g, k in counts.items()))
    sel = [i for i in af.selection_indices(event) if i < len(data["energy"])]  # a stale selection may index past the data
    if sel:
        st.markdown(f"**{len(sel)} selected** (showing up to 24) — mean E(x) {data['energy'][sel].mean():.3f}")
        shown = sel[:24]
        cols = st.columns(8)
        for j, i in enumerate(shown):
            lab, pred = int(data["y"][i]), int(data["pred"][i])
            cols[j % 8].image(fig.to_uint8_image(data["x"][i]), width="stretch",
                              caption=f"{data['groups'][i]} · y={classes[lab] if lab < len(classes) else lab} → "
                                      f"{classes[pred] if pred < len(classes) else pred} · E={data['energy'][i]:.2f}")
    else:
        st.caption("Select points with the box or lasso tool to see their images and energies.")
