"""Models: bundled and local checkpoints with their metadata, and the RobustBench zoo catalogue."""

import common
import streamlit as st

from core.errors import EnergyLensError
from core.models.registry import BUNDLED_DIR, LOCAL_DIR, list_bundled, list_local

st.title("Models")


def meta_rows(entries):
    rows = []
    for ref, meta, err in entries:
        if meta is None:
            rows.append({"name": ref.name, "file": ref.path, "status": f"unreadable: {err}"})
            continue
        m = meta.metrics or {}
        rows.append({"name": ref.name, "architecture": meta.arch, "dataset": meta.dataset, "classes": meta.num_classes,
                     "method": meta.method, "epoch": meta.epoch,
                     "natural acc": m.get("nat_acc"), "PGD acc": m.get("pgd_acc"), "ΔE(x)": m.get("dE_mean"),
                     "eps": (meta.hparams or {}).get("eps"), "file": ref.path})
    return rows


t1, t2, t3 = st.tabs(["Bundled", "Local checkpoints & runs", "RobustBench zoo"])
with t1:
    st.caption(f"Small models trained by `python -m core.train` on the embedded digits dataset, in `{BUNDLED_DIR}`.")
    with common.guard("listing bundled checkpoints"):
        st.dataframe(meta_rows(list_bundled()), width="stretch", hide_index=True)
with t2:
    st.caption(f"Checkpoints you put in `{LOCAL_DIR}` (EnergyLens `.safetensors`) and the best/last checkpoints of "
               "training runs in `runs/`.")
    with common.guard("listing local checkpoints"):
        rows = meta_rows(list_local())
        if rows:
            st.dataframe(rows, width="stretch", hide_index=True)
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
                   "unknown": "⚠ not a torch file", "safetensors": "⚠ unexpected format", "hub": "hub (download only)"}
    rows = [{"★ paper": "★" if e.paper_model else "", "name": e.name, "architecture": e.architecture,
             "clean acc": e.clean_acc, "AutoAttack acc": e.aa_acc,
             "file": status_text.get(e.file_status, e.file_status), "note": e.note}
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
        bad = [f for f in files if f.exists() and entry.file_status in ("html", "empty", "unknown")]
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
