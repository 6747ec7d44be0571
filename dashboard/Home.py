"""EnergyLens entry point: `streamlit run dashboard/Home.py`."""

from __future__ import annotations

from pathlib import Path

import common  # `dashboard/` is on sys.path while Streamlit runs this script (see navigation.py)
import streamlit as st
from navigation import PAGES

HERE = Path(__file__).resolve().parent
# A local file: a ":material/...:" page icon makes the browser fetch the favicon from fonts.gstatic.com.
st.set_page_config(page_title="EnergyLens", page_icon=str(HERE / "assets" / "favicon.svg"), layout="wide")

pages = {p.key: st.Page(p.file, title=p.title, icon=p.icon, default=p.default) for p in PAGES
         if (HERE / p.file).resolve().is_file()}
nav = st.navigation(list(pages.values()))
page_key = next((k for k, pg in pages.items() if pg.url_path == nav.url_path), None)
import persist  # noqa: E402
import share  # noqa: E402

common.umap_warmup()  # numba's first UMAP compile, off every page's clock
persist.session_id()  # keeps ?s=<id> in the URL on every page, so a reload finds this session's results
share.apply_shared_view(page_key)  # a shared link (?page=...&model=...): its settings, before any widget exists
share.notice()
common.model_picker()
nav.run()
share.link_box(page_key)  # sidebar, at the bottom: the link to this view (no session id)
