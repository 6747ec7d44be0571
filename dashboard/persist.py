"""Results that survive a page reload: the last Attack Lab, SGLD and landscape results of a browser session.

The session id lives in the page URL (``?s=<id>``), so reloading the page finds the same folder
(:mod:`core.saved`). Each page calls :func:`restore` once per new Streamlit session and :func:`keep` after a new
result; :func:`clear_button` removes what was kept.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

import numpy as np
import streamlit as st

from core import saved
from core.errors import EnergyLensError

log = logging.getLogger("energylens.dashboard")
PARAM = "s"


def session_id() -> str:
    """This browser session's id: from the URL when it has a valid one (a reload), else a new one; kept in the URL."""
    sid = st.session_state.get("_persist_sid")
    if sid is None:
        q = st.query_params.get(PARAM)
        sid = q if isinstance(q, str) and saved.valid_session(q) else secrets.token_hex(12)
        st.session_state["_persist_sid"] = sid
        try:
            saved.prune()
        except OSError:
            pass
    if st.query_params.get(PARAM) != sid:
        st.query_params[PARAM] = sid  # page changes drop query parameters: put it back
    return sid


def keep(kind: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Save a result; a failure (disk full...) only logs: the result on screen is not affected."""
    try:
        saved.save(session_id(), kind, arrays, meta)
    except (EnergyLensError, OSError) as e:
        log.warning("could not keep the %s result: %s", kind, e)


def restore(kind: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The saved result of ``kind``, once per Streamlit session (later calls return None)."""
    flag = f"_persist_restored_{kind}"
    if st.session_state.get(flag):
        return None
    st.session_state[flag] = True
    try:
        return saved.load(session_id(), kind)
    except (EnergyLensError, OSError) as e:
        log.warning("could not restore the %s result: %s", kind, e)
        return None


def clear_button(kind: str, keys: tuple[str, ...], label: str = "Clear results") -> None:
    """A button that forgets the result of ``kind`` on screen (session-state ``keys``) and on disk."""
    if st.button(label, key=f"clear_{kind}", help="remove these results from the page and from the disk copy that "
                                                  "brings them back after a reload"):
        for k in keys:
            st.session_state.pop(k, None)
        try:
            saved.clear(session_id(), kind)
        except (EnergyLensError, OSError) as e:
            st.warning(f"Could not remove the saved copy: {e}")
        st.rerun()


# ------------------------------------------------------------------------------------------- Attack Lab
def pack_attack(r: dict, history: dict) -> tuple[dict[str, np.ndarray], dict]:
    """An Attack Lab result (and the step-curve history) as arrays + meta."""
    arrays = {f"a_{k}": v for k, v in r["trace"].to_npz_dict().items()}
    arrays.update({"x": np.asarray(r["x"]), "x_adv": np.asarray(r["x_adv"])})
    meta = {"spec": r["spec"].to_dict(), "model": r["model"], "seconds": r["seconds"], "notes": list(r.get("notes") or []),
            "trace_meta": r["trace"].meta, "history": {k: {kk: np.asarray(vv).tolist() for kk, vv in v.items()}
                                                       for k, v in history.items()}}
    b = r.get("b")
    if b:
        arrays.update({f"b_{k}": v for k, v in b["trace"].to_npz_dict().items()})
        arrays["b_x_adv"] = np.asarray(b["x_adv"])
        meta["b"] = {"model": b["model"], "method": b.get("method"), "seconds": b["seconds"],
                     "notes": list(b.get("notes") or []), "trace_meta": b["trace"].meta}
    return arrays, meta


def unpack_attack(arrays: dict, meta: dict) -> tuple[dict, dict]:
    from core.attacks import AttackSpec
    from core.drift import EnergyTrace

    def trace(prefix: str, tmeta: dict) -> EnergyTrace:
        return EnergyTrace.from_npz_dict({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}, tmeta)

    r = {"trace": trace("a_", meta.get("trace_meta") or {}), "spec": AttackSpec(**meta["spec"]),
         "model": meta["model"], "seconds": float(meta["seconds"]), "x": arrays["x"], "x_adv": arrays["x_adv"],
         "notes": meta.get("notes") or []}
    if "b" in meta:
        mb = meta["b"]
        r["b"] = {"trace": trace("b_", mb.get("trace_meta") or {}), "model": mb["model"], "method": mb.get("method"),
                  "seconds": float(mb["seconds"]), "x_adv": arrays["b_x_adv"], "notes": mb.get("notes") or []}
    history = {k: {kk: np.asarray(vv) for kk, vv in v.items()} for k, v in (meta.get("history") or {}).items()}
    return r, history
