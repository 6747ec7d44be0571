"""EnergyLens entry point: `streamlit run dashboard/Home.py`."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `common` when run by file path
import common  # noqa: E402  (also puts the repo root on sys.path for `core`)

import streamlit as st  # noqa: E402

HERE = Path(__file__).resolve().parent
# A local file: a ":material/...:" page icon makes the browser fetch the favicon from fonts.gstatic.com.
st.set_page_config(page_title="EnergyLens", page_icon=str(HERE / "assets" / "favicon.svg"), layout="wide")

PAGES = [
    ("home", "Home", ":material/home:", True),
    ("models", "Models", ":material/inventory_2:", False),
    ("attack", "Attack Lab", ":material/target:", False),
    ("training", "Training studio", ":material/fitness_center:", False),
    ("sgld", "SGLD studio", ":material/palette:", False),
    ("landscape", "Energy landscape", ":material/landscape:", False),
    ("analysis", "Sample analysis", ":material/biotech:", False),
    ("embeddings", "Embedding explorer", ":material/scatter_plot:", False),
    ("evaluation", "Evaluation", ":material/table_chart:", False),
]

pages = [st.Page(common.PAGE_FILES[k], title=t, icon=i, default=d) for k, t, i, d in PAGES
         if (HERE / common.PAGE_FILES[k]).resolve().is_file()]
nav = st.navigation(pages)
import persist  # noqa: E402

common.umap_warmup()  # numba's first UMAP compile, off every page's clock
persist.session_id()  # keeps ?s=<id> in the URL on every page, so a reload finds this session's results
common.model_picker()
nav.run()
