"""Models: bundled and local checkpoints with their metadata, and the RobustBench zoo catalogue."""

from pathlib import Path

import common
import streamlit as st

from core.attacks import format_eps
from core.errors import EnergyLensError
from core.models.registry import BUNDLED_DIR, LOCAL_DIR, list_bundled, list_local

st.title("Models")

DRIFT_COL = "mean |ΔE(x)| (PGD-10, test)"


def pct(v) -> str:
    return "–" if not isinstance(v, (int, float)) else f"{v:.1%}"


def zoo_pct(v) -> str:
    """The leaderboard's accuracies are in percent already."""
    return "–" if not isinstance(v, (int, float)) else f"{v:.2f}%"


def signed(v) -> str:
    return "–" if not isinstance(v, (int, float)) else f"{v:+.3f}"


def _drift_key(ref) -> str:
    p = Path(ref.path) if ref.path else None
    return f"{ref.key}@{p.stat().st_mtime if p is not None and p.exists() else 0}"


def meta_rows(entries):
    drift = st.session_state.get("models_drift", {})
    rows = []
    for ref, meta, err in entries:
        if meta is None:
            rows.append({"name": ref.name, "file": ref.path, "status": f"unreadable: {err}"})
            continue
        m = meta.metrics or {}
        hp = meta.hparams or {}
        eps = hp.get("eps")
        d = drift.get(_drift_key(ref))
        rows.append({"name": ref.name, "architecture": meta.arch, "dataset": meta.dataset, "classes": meta.num_classes,
                     "method": meta.method, "epoch": "–" if meta.epoch is None else str(meta.epoch),
                     "natural acc.": pct(m.get("nat_acc")), "PGD acc.": pct(m.get("pgd_acc")),
                     "training ε": "–" if not isinstance(eps, (int, float)) else format_eps(eps, hp.get("norm", "Linf")),
                     DRIFT_COL: "–" if d is None else f"{d['dE_abs_mean']:.2f} (N = {d['n']})",
                     "ΔE(x) in training (probe, signed mean)": signed(m.get("dE_mean")), "file": ref.path})
    return rows


def _measure(task, entries):
    from core.analysis import drift_summary
    from core.models.registry import load_model_ref

    out = {}
    good = [(r, m) for r, m, _ in entries if m is not None]
    for i, (ref, _) in enumerate(good):
        def sub(f, msg="", i=i):
            task.progress((i + f) / len(good), msg)

        lm = load_model_ref(ref, device=common.resolve_device(st.session_state.get("device", "auto")))
        out[_drift_key(ref)] = drift_summary(lm, progress=sub)
    return out


def models_table(entries, what: str) -> None:
    key = f"models_drift_task_{what}"
    if st.button("Measure mean |ΔE(x)|", key=f"models_measure_{what}",
                 disabled=not any(m is not None for _, m, _ in entries),
                 help="PGD-10 on the test set of every model listed here, in the background"):
        with common.guard("measuring the drift"):
            task = common.start_task(key, f"PGD-10 drift of {len(entries)} models", lambda t: _measure(t, entries))
            common.wait_briefly(task, 1.5)
    common.task_panel(key, lambda t: st.session_state.setdefault("models_drift", {}).update(t.result))
    st.dataframe(meta_rows(entries), width="stretch", hide_index=True)
    st.caption(f"**{DRIFT_COL}**: the drift of the README's table and the Energy landscape page, ΔE(x) = E(x) − E(x*) "
               "under PGD-10 at the dataset's L∞ budget on the test set (all of it, at most 1,000 images); press "
               "**Measure** (results are cached on disk). **ΔE(x) in training** is what the trainer recorded at its "
               "last epoch: the signed mean over its training probe set under the training attack.")


t1, t2, t3 = st.tabs(["Bundled", "Local checkpoints & runs", "RobustBench zoo"])
with t1:
    st.caption(f"Small models trained by `python -m core.train`, in `{BUNDLED_DIR}`: `cifar10-demo-*` on 4,585 real "
               "CIFAR-10 images (the CIFAR-10 demo pack; tested on its 500 shipped test images), `digits-*` on the "
               "embedded 8×8 digits. Rebuild: `bash scripts/build_demo_models.sh all` and "
               "`bash scripts/build_bundled.sh`.")
    with common.guard("listing bundled checkpoints"):
        models_table(list_bundled(), "bundled")
with t2:
    st.caption(f"Checkpoints you put in `{LOCAL_DIR}` (EnergyLens `.safetensors`) and the best/last checkpoints of "
               "training runs in `runs/`.")
    with common.guard("listing local checkpoints"):
        local = list_local()
        if local:
            models_table(local, "local")
        else:
            st.info("No local checkpoints yet. Train one on the Training page or copy a `.safetensors` file there.")
with t3:
    from core import zoo

    c1, c2, c3 = st.columns(3)
    ds = c1.selectbox("Dataset", ["cifar10", "cifar100"], key="models_zoo_ds")
    tm = c2.selectbox("Threat model", ["Linf", "L2"], key="models_zoo_tm")
    only_paper = c3.checkbox("Only models from the paper", value=False, key="models_zoo_paper")
    try:
        entries = zoo.list_zoo(ds, tm)
    except EnergyLensError as e:
        st.error(str(e))
        entries = []
    status_text = {"ok": "✓ downloaded", "missing": "", "html": "⚠ HTML page, not weights", "empty": "⚠ empty file",
                   "unknown": "⚠ not a torch file", "safetensors": "⚠ unexpected format", "hub": "hub (download only)",
                   "unsafe": "⚠ refused: would run code", "refused": "⚠ refused when loaded (corrupt or unsafe)"}
    rows = [{"★ paper": "★" if e.paper_model else "", "name": e.name, "architecture": e.architecture,
             "clean acc.": zoo_pct(e.clean_acc), "AutoAttack acc.": zoo_pct(e.aa_acc),
             "ε": format_eps(e.eps, e.threat_model),
             "file": status_text.get(e.file_status, e.file_status), "note": e.note or ""}
            for e in entries if e.paper_model or not only_paper]
    st.dataframe(rows, width="stretch", hide_index=True)
    st.markdown("**Get a zoo model**")
    by_name = {e.name: e for e in entries}
    if by_name:
        name = st.selectbox("Model", list(by_name), key="models_zoo_name")
        entry = by_name[name]
        files = zoo.zoo_files(entry)
        where = "\n".join(f"`{f}`" for f in files)
        if not files:  # timm-hosted: no file of its own
            st.markdown("*Online only:* this model is hosted on the Hugging Face hub via timm, so there is no file to "
                        "put in place; pick it in the sidebar under **RobustBench zoo** and tick **Allow download**, or "
                        "press the button below.")
        else:
            st.markdown(
                f"*Online:* pick it in the sidebar under **RobustBench zoo**, tick **Allow download**, or press the "
                f"button below; it is fetched into `{files[0].parent}`.  \n*Offline:* put the weights file"
                f"{'s' if len(files) > 1 else ''} at exactly:\n\n{where}")
        if entry.urls:
            st.caption("Download link(s): " + ", ".join(entry.urls))
        bad = [f for f in files if f.exists() and entry.file_status in ("html", "empty", "unknown", "unsafe", "refused")]
        if bad:
            st.warning(f"`{bad[0].name}` is not a valid weights file ({status_text.get(entry.file_status)}): "
                       "usually a failed Google-Drive download. Move it aside and download again.")
            if st.button("Move the bad file aside", key="models_zoo_quarantine"):
                with common.guard("moving the bad file aside"):
                    for f in bad:
                        moved = zoo.quarantine(f)
                        st.success(f"Moved to `{moved.name}`; nothing was deleted.")
        if st.button("Download now", key="models_zoo_download", help="Needs internet access"):
            with common.guard(f"downloading {name}"), st.spinner(f"Downloading {name}..."):
                zoo.load_zoo_model(name, ds, tm, allow_download=True)
                st.success(f"{name} is downloaded and loads correctly.")
