"""A link that reproduces the current view: page, model and the page's main settings, without the session id.

The URL of a session carries ``?s=<id>`` (:mod:`persist`), which points at that session's saved results on this
server: a link with it shares them. :func:`view_params` describes the view instead (``?page=attack&model=...&eps=8``)
and :func:`link_box` shows it in the sidebar. Opening such a link, :func:`apply_shared_view` (once per new session,
before any widget exists) checks every parameter, puts the good ones into the widgets' session-state keys (as the
guided tour does, so no widget is given a default as well) and names the ones it ignored in one line; the parameters
are then removed from the URL, which keeps only ``?s=``. Nothing is run: the page opens with its settings, and the
reader presses its button.
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import quote, urlencode

import streamlit as st

from navigation import PAGE_FILES

PAGE = "page"
SOURCES = {"bundled": "Bundled", "local": "Local checkpoints", "zoo": "RobustBench zoo"}
ZOO_DATASETS, ZOO_THREATS = ("cifar10", "cifar100"), ("Linf", "L2")
ZOO_CLASSES = {"cifar10": 10, "cifar100": 100}
ATTACK_PARAMS = ("attack", "norm", "eps", "steps", "n", "seed", "targeted", "target", "tclass", "vs")
SGLD_PARAMS = ("classes", "chains", "init", "steps")
TRAINING_PARAMS = ("run",)
MODEL_PARAMS = ("source", "model", "dataset", "threat")
#: every parameter this module reads (and removes from the URL once applied); never the session id ``s``
PARAMS = (PAGE, *MODEL_PARAMS, *ATTACK_PARAMS, *SGLD_PARAMS, *TRAINING_PARAMS)
SGLD_INITS = ("pca", "gaussian", "random")
APPLIED = "_share_applied"
NOTICE = "_share_notice"


class _Bad(ValueError):
    """A parameter that cannot be used; the message says why."""


# ------------------------------------------------------------------------------------------------ reading values
def _num(v: str, what: str, lo: float, hi: float) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise _Bad(f"{what} is not a number") from None
    if not math.isfinite(x) or not lo <= x <= hi:
        raise _Bad(f"{what} must lie in [{lo:g}, {hi:g}]")
    return x


def _int(v: str, what: str, lo: int, hi: int) -> int:
    try:
        x = int(str(v).strip())
    except (TypeError, ValueError):
        raise _Bad(f"{what} is not a whole number") from None
    if not lo <= x <= hi:
        raise _Bad(f"{what} must lie in [{lo}, {hi:,}]")
    return x


def _bool(v: str, what: str) -> bool:
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise _Bad(f"{what} must be 0 or 1")


def _choice(v: str, options, what: str) -> str:
    if v not in options:
        raise _Bad(f"unknown {what} (one of {', '.join(map(str, options))})")
    return v


def _shown(v: Any) -> str:
    s = str(v)
    return (s[:40] + "…") if len(s) > 40 else s


# ------------------------------------------------------------------------------------------------ models
def _entries(source: str) -> list:
    """(ModelRef, ModelMeta) of the readable bundled / local checkpoints."""
    from core.models.registry import list_bundled, list_local

    try:
        entries = list_bundled() if source == "bundled" else list_local()
    except Exception:  # noqa: BLE001 - an unreadable folder only means the name is not found
        return []
    return [(r, m) for r, m, err in entries if m is not None]


def _checkpoints(source: str) -> dict:
    """name -> ModelMeta of the readable bundled / local checkpoints."""
    return {r.name: m for r, m in _entries(source)}


def _default_model() -> tuple[dict, int]:
    """The model the sidebar opens on (common.model_picker): its identity and number of classes."""
    import common

    good = _entries("bundled")
    if not good:
        return {}, 1000
    r, m = good[common._default_bundled(good, common.demo_pack_problem())]
    return {"source": "bundled", "name": r.name}, int(m.num_classes)


def _model(q: dict, bad: list[str]) -> tuple[dict | None, int]:
    """The model the link asks for (a ModelRef as a dict, for persist.MODEL_REQUEST) and its number of classes;
    ``(None, classes of the default model)`` when it asks for none or for one that is not here."""
    name = q.get("model")
    source = q.get("source", "bundled")
    if name is None:
        for k in ("source", "dataset", "threat"):
            if k in q:
                bad.append(f"{k}={_shown(q[k])} (no model named)")
        return None, _default_model()[1]
    if source not in SOURCES:
        bad.append(f"source={_shown(source)} (unknown source; one of {', '.join(SOURCES)})")
        return None, _default_model()[1]
    if source in ("bundled", "local"):
        metas = _checkpoints(source)
        if name not in metas:
            bad.append(f"model={_shown(name)} (no {SOURCES[source].lower()} model of that name here)")
            return None, _default_model()[1]
        return {"source": source, "name": name}, int(metas[name].num_classes)
    ds, tm = q.get("dataset", "cifar10"), q.get("threat", "Linf")
    if ds not in ZOO_DATASETS or tm not in ZOO_THREATS:
        bad.append(f"dataset={_shown(ds)}, threat={_shown(tm)} (the zoo has {'/'.join(ZOO_DATASETS)} and "
                   f"{'/'.join(ZOO_THREATS)})")
        return None, _default_model()[1]
    try:
        from core import zoo

        known = {e.name for e in zoo.list_zoo(ds, tm)}
    except Exception:  # noqa: BLE001 - the zoo list could not be read: the name cannot be checked
        known = set()
    if name not in known:
        bad.append(f"model={_shown(name)} (not in the RobustBench {ds} {tm} list)")
        return None, _default_model()[1]
    return {"source": "zoo", "name": name, "dataset": ds, "threat_model": tm}, ZOO_CLASSES[ds]


# ------------------------------------------------------------------------------------------------ page settings
def _attack_values(q: dict, n_classes: int, bad: list[str]) -> dict:
    from core.attacks import ATTACKS
    from core.attacks.base import MAX_SEED, TARGET_MODES
    from core.attacks.budget import MAX_INTERACTIVE_IMAGES

    out: dict[str, Any] = {}

    def take(k: str, fn) -> None:
        if k in q:
            try:
                fn(q[k])
            except _Bad as e:
                bad.append(f"{k}={_shown(q[k])} ({e})")

    def attack(v):
        out["atk_name"] = _choice(v, list(ATTACKS), "attack")

    take("attack", attack)
    info = ATTACKS[out.get("atk_name", "pgd")]

    def norm(v):
        out["atk_norm"] = _choice(v, list(info.norms), f"norm for {info.label}")

    take("norm", norm)

    def eps(v):
        if out.get("atk_norm", "Linf") == "Linf":
            out["atk_eps255"] = _num(v, "ε (in units of 1/255)", 0.0, 255.0)
        else:
            out["atk_eps_l2"] = _num(v, "ε (L2)", 0.0, 64.0)

    take("eps", eps)
    take("steps", lambda v: out.__setitem__("atk_steps", _int(v, "steps", 1, info.max_steps)))
    take("n", lambda v: out.__setitem__("atk_n", _int(v, "the number of images", 1, MAX_INTERACTIVE_IMAGES)))
    take("seed", lambda v: out.__setitem__("atk_seed", _int(v, "the seed", 0, MAX_SEED)))
    take("targeted", lambda v: out.__setitem__("atk_targeted", _bool(v, "targeted")))
    take("target", lambda v: out.__setitem__("atk_tmode", _choice(v, TARGET_MODES, "target mode")))
    take("tclass", lambda v: out.__setitem__("atk_tclass", _int(v, "the target class", 0, n_classes - 1)))

    def vs(v):
        if v not in set(_checkpoints("bundled")) | set(_checkpoints("local")):
            raise _Bad("no checkpoint of that name here")
        out["atk_compare"], out["atk_model_b"] = True, v

    take("vs", vs)
    return out


def _sgld_values(q: dict, n_classes: int, bad: list[str]) -> dict:
    from core.sampling import MAX_INTERACTIVE_CHAINS, MAX_STEPS

    out: dict[str, Any] = {}
    if "classes" in q:
        try:
            parts = [p for p in str(q["classes"]).split(",") if p.strip()]
            cls = [_int(p, "a class", 0, n_classes - 1) for p in parts]
            if not cls:
                raise _Bad("no class given")
            out["sgld_classes"] = list(dict.fromkeys(cls))
        except _Bad as e:
            bad.append(f"classes={_shown(q['classes'])} ({e})")
    for k, key, fn in (("chains", "sgld_chains", lambda v: _int(v, "chains per class", 1, MAX_INTERACTIVE_CHAINS)),
                       ("init", "sgld_init_kind", lambda v: _choice(v, SGLD_INITS, "initialisation")),
                       ("steps", "sgld_n", lambda v: _int(v, "steps", 1, MAX_STEPS))):
        if k in q:
            try:
                out[key] = fn(q[k])
            except _Bad as e:
                bad.append(f"{k}={_shown(q[k])} ({e})")
    return out


def _training_values(q: dict, bad: list[str]) -> dict:
    run = q.get("run")
    if run is None:
        return {}
    if len(run) > 200 or not run.isprintable():
        bad.append(f"run={_shown(run)} (not a run id)")
        return {}
    return {"tr_view_request": run}    # the page checks it against its runs (and says so when it is not there)


# ------------------------------------------------------------------------------------------------ apply a link
def read(query: dict[str, str], current_page: str | None) -> tuple[str | None, dict | None, dict, list[str]]:
    """Check a link's parameters: ``(page to open or None, model identity or None, {widget key: value}, ignored)``,
    where ``ignored`` names each parameter that was not used and why. No Streamlit calls: testable on its own."""
    q = {k: v for k, v in query.items() if k in PARAMS}
    bad: list[str] = []
    page = q.get(PAGE)
    if page is not None and page not in PAGE_FILES:
        bad.append(f"page={_shown(page)} (no such page; one of {', '.join(PAGE_FILES)})")
        page = None
    where = page or current_page
    ident, n_classes = _model(q, bad)
    values: dict[str, Any] = {}
    own: tuple[str, ...] = ()
    if where == "attack":
        values, own = _attack_values(q, n_classes, bad), ATTACK_PARAMS
    elif where == "sgld":
        values, own = _sgld_values(q, n_classes, bad), SGLD_PARAMS
    elif where == "training":
        values, own = _training_values(q, bad), TRAINING_PARAMS
    for k in q:
        if k not in (PAGE, *MODEL_PARAMS, *own):
            bad.append(f"{k}={_shown(q[k])} (not a setting of the {where or 'home'} page)")
    return page, ident, values, bad


def apply_shared_view(current_page: str | None) -> None:
    """Once per new session, before any widget exists: the view a link describes (see the module docstring).
    ``current_page``: the key of the page the URL opened. Switches to the link's ``page`` when it is another one."""
    if st.session_state.get(APPLIED):
        return
    st.session_state[APPLIED] = True
    query = {k: st.query_params.get(k) for k in st.query_params.keys() if k in PARAMS}
    if not query:
        return
    try:
        page, ident, values, bad = read(query, current_page)
    except Exception as e:  # noqa: BLE001 - a link must never break the app
        page, ident, values, bad = None, None, {}, [f"the whole link ({type(e).__name__}: {e})"]
    if ident is not None:
        import persist

        st.session_state[persist.MODEL_REQUEST] = ident     # common.model_picker selects it in this run
    for key, value in values.items():
        st.session_state[key] = value
        st.session_state.pop(f"_default_scope_{key}", None)   # the link's value wins over a page default
    if bad:
        st.session_state[NOTICE] = ("Some settings of the link were ignored (the page's defaults are used instead): "
                                    + "; ".join(bad) + ".")
    for k in query:
        del st.query_params[k]
    if page is not None and page != current_page:
        st.switch_page(PAGE_FILES[page])


def notice() -> None:
    """The line naming what a link asked for and did not get (shown once, at the top of the page it opened)."""
    msg = st.session_state.pop(NOTICE, None)
    if msg:
        st.warning(msg, icon=":material/link_off:")



# ------------------------------------------------------------------------------------------------ describe a view
def view_params(page: str | None, state=None) -> dict[str, str]:
    """The query parameters of the current view (read from session state ``state``, by default Streamlit's):
    the page, the sidebar's model, and on the Attack Lab / SGLD studio / Training studio their main settings."""
    s = st.session_state if state is None else state
    out: dict[str, str] = {}
    if page:
        out[PAGE] = page
    ref = s.get("model_ref")
    if ref is not None and getattr(ref, "source", None) in SOURCES:
        if ref.source != "bundled":
            out["source"] = ref.source
        out["model"] = ref.name
        if ref.source == "zoo":
            out["dataset"], out["threat"] = str(ref.dataset), str(ref.threat_model)

    def put(param: str, key: str, fmt=str) -> None:
        if key in s and s[key] is not None:
            out[param] = fmt(s[key])

    def num(v) -> str:
        return f"{float(v):g}"

    if page == "attack":
        put("attack", "atk_name")
        put("norm", "atk_norm")
        put("eps", "atk_eps255" if s.get("atk_norm", "Linf") == "Linf" else "atk_eps_l2", num)
        put("steps", "atk_steps", lambda v: str(int(v)))
        put("n", "atk_n", lambda v: str(int(v)))
        put("seed", "atk_seed", lambda v: str(int(v)))
        if s.get("atk_targeted"):
            out["targeted"] = "1"
            put("target", "atk_tmode")
            if s.get("atk_tmode") == "chosen":
                put("tclass", "atk_tclass", lambda v: str(int(v)))
        if s.get("atk_compare") and s.get("atk_model_b"):
            out["vs"] = str(s["atk_model_b"])
    elif page == "sgld":
        put("classes", "sgld_classes", lambda v: ",".join(str(int(c)) for c in v))
        put("chains", "sgld_chains", lambda v: str(int(v)))
        put("init", "sgld_init_kind")
        put("steps", "sgld_n", lambda v: str(int(v)))
    elif page == "training":
        put("run", "tr_view")
    return out


def link(params: dict[str, str]) -> str:
    """``?page=attack&model=...``: the relative link of ``params`` (readable: ``,`` and ``:`` are left as they are)."""
    return "?" + urlencode(params, quote_via=lambda v, safe, enc, err: quote(v, safe=",:"))


def link_box(page: str | None) -> None:
    """Sidebar, at the bottom: the link to this view, relative and (when the browser told its address) in full."""
    rel = link(view_params(page))
    with st.sidebar.expander("Link to this view", icon=":material/link:"):
        st.code(rel, language=None)
        base = None
        try:
            base = st.context.url
        except Exception:  # noqa: BLE001 - older Streamlit, or no browser (tests): the relative link only
            base = None
        if base:
            st.code(base.split("?")[0] + rel, language=None)
        st.caption("Opens this page with this model and these settings (press the page's Run button to compute "
                   "the results). It holds no session id, so it does not share the results of this session.")
