"""The dashboard's one page list: every page's key, file, title and icon, in sidebar order.

Adding a page is two edits: write ``pages/<name>.py`` and add one :class:`PageSpec` to :data:`PAGES`.
``dashboard/Home.py`` builds the sidebar from this list, the guided tour (``tour.py``) and
``st.switch_page`` calls open pages by key through :data:`PAGE_FILES`, and the tests open pages by key
too (``tests/apptest_helpers.py``); tests/test_pages.py checks that this list and ``pages/`` agree.

How the dashboard modules find each other: Streamlit puts the entry script's folder (``dashboard/``) on
``sys.path`` while it runs the app (``streamlit run dashboard/Home.py`` and ``AppTest.from_file`` alike),
so Home, the pages and these modules import one another by plain name (``import common``); ``core`` is
installed (``pip install -e .``, see requirements.txt). The tests get ``dashboard/`` from
``tests/conftest.py``. No module of the app edits ``sys.path``.

This module imports nothing from Streamlit, so the list can be read anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PageSpec", "PAGES", "PAGE_FILES", "page_file"]


@dataclass(frozen=True)
class PageSpec:
    key: str                 # the name tests, the tour and st.switch_page use
    file: str                # relative to dashboard/ (st.Page resolves it from the entry script's folder)
    title: str
    icon: str
    default: bool = False    # the page the app opens on


PAGES: tuple[PageSpec, ...] = (
    PageSpec("home", "../pages/home.py", "Home", ":material/home:", default=True),
    PageSpec("models", "../pages/models.py", "Models", ":material/inventory_2:"),
    PageSpec("attack", "../pages/attack_lab.py", "Attack Lab", ":material/target:"),
    PageSpec("training", "../pages/training.py", "Training studio", ":material/fitness_center:"),
    PageSpec("sgld", "../pages/sgld.py", "SGLD studio", ":material/palette:"),
    PageSpec("landscape", "../pages/landscape.py", "Energy landscape", ":material/landscape:"),
    PageSpec("analysis", "../pages/analysis.py", "Sample analysis", ":material/biotech:"),
    PageSpec("embeddings", "../pages/embeddings.py", "Embedding explorer", ":material/scatter_plot:"),
    PageSpec("evaluation", "../pages/evaluation.py", "Evaluation", ":material/table_chart:"),
)

#: key -> file, for ``st.switch_page(PAGE_FILES[key])``.
PAGE_FILES: dict[str, str] = {p.key: p.file for p in PAGES}


def page_file(key: str) -> str:
    """The file of the page ``key`` (for ``st.switch_page`` / ``AppTest.switch_page``); KeyError naming the keys."""
    try:
        return PAGE_FILES[key]
    except KeyError:
        raise KeyError(f"no page {key!r}; pages: {', '.join(PAGE_FILES)}") from None
