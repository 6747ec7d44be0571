"""Results that survive a page reload: the last Attack Lab, SGLD and landscape results of a browser session.

The session id lives in the page URL (``?s=<id>``), so reloading the page finds the same folder
(:mod:`core.saved`). Each page calls :func:`restore` once per new Streamlit session and :func:`keep` after a new
result; :func:`clear_button` removes what was kept.
"""

from __future__ import annotations

import contextlib
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


def keep(kind: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> bool:
    """Save a result; a failure (disk full...) does not affect the result on screen, but the page says that it was not
    saved (a one-line warning, shown until the next result is saved). Returns whether it was saved."""
    flag = f"_persist_unsaved_{kind}"
    try:
        saved.save(session_id(), kind, arrays, meta)
    except (EnergyLensError, OSError) as e:
        log.warning("could not keep the %s result: %s", kind, e)
        st.session_state[flag] = f"This result is shown but was not saved, so a page reload will not bring it back: " \
                                 f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}"
        st.warning(st.session_state[flag])
        return False
    st.session_state.pop(flag, None)
    return True


def unsaved_notice(kind: str) -> None:
    """Repeat, on later reruns, that the result on screen was not saved (see :func:`keep`)."""
    msg = st.session_state.get(f"_persist_unsaved_{kind}")
    if msg:
        st.warning(msg)


def restore(kind: str, accept=None) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The saved result of ``kind``, once per Streamlit session (later calls return None).

    ``accept(meta)`` False (a result of another model): None, and the result stays on disk for a later rerun under
    the right model. A saved file that cannot be read is removed, with a one-line notice."""
    flag = f"_persist_restored_{kind}"
    if st.session_state.get(flag):
        return None
    problems: list[str] = []
    try:
        res = saved.load(session_id(), kind, problems)
    except (EnergyLensError, OSError) as e:
        log.warning("could not restore the %s result: %s", kind, e)
        res = None
    for p in problems:
        st.warning(f"Note: {p}.")
    if res is not None and accept is not None and not accept(res[1]):
        return None
    st.session_state[flag] = True
    return res


def discard(kind: str, why: str) -> None:
    """Remove a saved result that could be read but not used (it would crash the page), with a one-line notice."""
    with contextlib.suppress(EnergyLensError, OSError):
        saved.clear(session_id(), kind)
    st.warning(f"Note: the saved {kind} result could not be used ({why}) and was removed.")


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


# ------------------------------------------------------------------------------------------- the model of a result
MODEL_REQUEST = "_model_request"   # read by common.model_picker at the start of the next run


def model_identity(ref) -> dict[str, Any] | None:
    """What a saved result stores about the model it was made with (a ModelRef as a dict)."""
    if ref is None:
        return None
    return {"source": ref.source, "name": ref.name, "path": ref.path, "dataset": ref.dataset,
            "threat_model": ref.threat_model}


def _ref_key(ident: dict) -> str:
    from core.models.registry import ModelRef

    return ModelRef(**{k: ident.get(k) for k in ("source", "name", "path", "dataset", "threat_model")}).key


def restore_with_model(kind: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """:func:`restore`, and a reload brings back the model too: when the saved result (its meta's ``model_ref``,
    :func:`model_identity`) was made with another model than the sidebar's, the sidebar is switched to that model
    (one more run, :data:`MODEL_REQUEST`) and the result is handed to the page on that run."""
    pending = f"_persist_pending_{kind}"
    if pending in st.session_state:
        return st.session_state.pop(pending)
    got = restore(kind)
    if got is None:
        return None
    ident = got[1].get("model_ref")
    cur = st.session_state.get("model_ref")
    if isinstance(ident, dict) and ident.get("source") and ident.get("name") and (
            cur is None or _ref_key(ident) != cur.key):
        st.session_state[pending] = got
        st.session_state[MODEL_REQUEST] = ident
        st.session_state["_model_switched_for"] = (kind, ident.get("name"))
        st.rerun()
    return got


def restored_note(kind: str, what: str) -> None:
    """Say once that a reload switched the sidebar to the model a restored result was made with."""
    sw = st.session_state.get("_model_switched_for")
    if isinstance(sw, tuple) and sw[0] == kind:
        st.session_state.pop("_model_switched_for", None)
        st.info(f"Restored {what} of this session after a reload, with the model they were made with "
                f"(**{sw[1]}**, now chosen in the sidebar).")


# ------------------------------------------------------------------------------------------- Embedding / analysis
def pack_embedding(data: dict) -> tuple[dict[str, np.ndarray], dict]:
    x = np.asarray(data["x"])
    arrays = {"x_u8": np.clip(np.rint(x * 255), 0, 255).astype(np.uint8),  # images are only shown
              "y": np.asarray(data["y"]), "groups": np.asarray(data["groups"]).astype(str),
              "features": np.asarray(data["features"], dtype=np.float32), "energy": np.asarray(data["energy"]),
              "pred": np.asarray(data["pred"]), "pca": np.asarray(data["pca"])}
    if data.get("umap") is not None:
        arrays["umap"] = np.asarray(data["umap"])
    return arrays, {"model": data["model"], "kind": data["kind"]}


def unpack_embedding(arrays: dict, meta: dict) -> dict:
    return {"x": arrays["x_u8"].astype(np.float32) / 255, "y": arrays["y"], "groups": arrays["groups"].astype(object),
            "features": arrays["features"], "energy": arrays["energy"], "pred": arrays["pred"], "pca": arrays["pca"],
            "umap": arrays.get("umap"), "model": meta["model"], "kind": meta["kind"]}


def pack_analysis(r: dict) -> tuple[dict[str, np.ndarray], dict]:
    import dataclasses

    s = r["stats"]
    arrays = {f"s_{f.name}": np.asarray(getattr(s, f.name)) for f in dataclasses.fields(s)
              if isinstance(getattr(s, f.name), np.ndarray)}
    scalars = {f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f"s_{f.name}" not in arrays}
    return arrays, {"split": r["split"], "adv": bool(r["adv"]), "model": r["model"], "scalars": scalars}


def unpack_analysis(arrays: dict, meta: dict) -> dict:
    from core.analysis import SampleStats

    fields = {k[2:]: v for k, v in arrays.items() if k.startswith("s_")}
    return {"stats": SampleStats(**fields, **meta["scalars"]), "split": meta["split"], "adv": meta["adv"],
            "model": meta["model"]}


# ------------------------------------------------------------------------------------------- Attack Lab
def pack_attack(r: dict, history: dict, model_key: str | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """An Attack Lab result (and the step-curve history) as arrays + meta; ``model_key`` (the sidebar's model
    identity) is stored with it, so that it is restored only under that model."""
    arrays = {f"a_{k}": v for k, v in r["trace"].to_npz_dict().items()}
    arrays.update({"x": np.asarray(r["x"]), "x_adv": np.asarray(r["x_adv"])})
    meta = {"spec": r["spec"].to_dict(), "model": r["model"], "seconds": r["seconds"], "notes": list(r.get("notes") or []),
            "model_key": model_key, "num_classes": r.get("num_classes"),
            "trace_meta": r["trace"].meta, "history": {k: {kk: np.asarray(vv).tolist() for kk, vv in v.items()}
                                                       for k, v in history.items()}}
    b = r.get("b")
    if b:
        arrays.update({f"b_{k}": v for k, v in b["trace"].to_npz_dict().items()})
        arrays["b_x_adv"] = np.asarray(b["x_adv"])
        meta["b"] = {"model": b["model"], "method": b.get("method"), "seconds": b["seconds"],
                     "notes": list(b.get("notes") or []), "trace_meta": b["trace"].meta}
    return arrays, meta


def _check_trace(t, n_classes: int | None, what: str) -> None:
    """A restored trace the page can draw: consistent shapes, labels and predictions within the model's classes."""
    m = t.marginal
    if m.ndim != 2 or m.shape[0] < 1 or m.shape[1] < 1:
        raise ValueError(f"{what}: energies of shape {m.shape}")
    s1, n = m.shape
    for name, a, shape in (("joint", t.joint, (s1, n)), ("pred", t.pred, (s1, n)), ("loss", t.loss, (s1, n)),
                           ("labels", t.labels, (n,)), ("steps", t.steps, (s1,)), ("targets", t.targets, (n,)),
                           ("joint_target", t.joint_target, (s1, n)), ("perturbed", t.perturbed, (n,))):
        if a is not None and tuple(a.shape) != shape:
            raise ValueError(f"{what}: {name} of shape {tuple(a.shape)}, expected {shape}")
    for name, a in (("labels", t.labels), ("pred", t.pred), ("targets", t.targets)):
        if a is None:
            continue
        if a.dtype.kind not in "iu":
            raise ValueError(f"{what}: {name} are not class indices")
        if a.size and (a.min() < 0 or (n_classes is not None and a.max() >= n_classes)):
            raise ValueError(f"{what}: {name} outside the model's {n_classes} classes")
    for name, a in (("marginal", t.marginal), ("joint", t.joint)):
        if a.dtype.kind != "f":
            raise ValueError(f"{what}: {name} energies are not numbers")


def unpack_attack(arrays: dict, meta: dict, num_classes: int | None = None) -> tuple[dict, dict]:
    """The Attack Lab result packed by :func:`pack_attack`; ValueError when it is inconsistent (shapes, labels
    outside ``num_classes``, fields of the wrong kind), so that the page never draws it."""
    try:
        return _unpack_attack(arrays, meta, num_classes)
    except (AttributeError, TypeError, KeyError, IndexError, OverflowError, EnergyLensError) as e:  # wrong kind
        raise ValueError(f"{type(e).__name__}: {str(e)[:150]}") from e


def _unpack_attack(arrays: dict, meta: dict, num_classes: int | None) -> tuple[dict, dict]:
    from core.attacks import AttackSpec  # lazy: the attacks (torch) are loaded by the page that restores
    from core.drift import EnergyTrace  # lazy: as above

    def trace(prefix: str, tmeta: dict) -> EnergyTrace:
        t = EnergyTrace.from_npz_dict({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}, tmeta)
        _check_trace(t, num_classes, "the saved trace" if prefix == "a_" else "the second model's saved trace")
        return t

    r = {"trace": trace("a_", meta.get("trace_meta") or {}), "spec": AttackSpec(**meta["spec"]),
         "model": meta["model"], "seconds": float(meta["seconds"]), "x": arrays["x"], "x_adv": arrays["x_adv"],
         "notes": meta.get("notes") or []}
    if "b" in meta:
        mb = meta["b"]
        r["b"] = {"trace": trace("b_", mb.get("trace_meta") or {}), "model": mb["model"], "method": mb.get("method"),
                  "seconds": float(mb["seconds"]), "x_adv": arrays["b_x_adv"], "notes": mb.get("notes") or []}
    for part in [r] + ([r["b"]] if "b" in r else []):
        if not isinstance(part["model"], str) or not isinstance(part["notes"], list) or \
                not all(isinstance(n, str) for n in part["notes"]):
            raise ValueError("the saved model name or notes are not text")
    r["spec"].validate(num_classes)  # a spec the page can describe (InputError: ValueError above)
    n = r["trace"].n_samples
    x = np.asarray(r["x"])
    if x.ndim != 4 or x.shape[0] > n or np.asarray(r["x_adv"]).shape != x.shape or \
            ("b" in r and (np.asarray(r["b"]["x_adv"]).shape != x.shape or r["b"]["trace"].n_samples != n)):
        raise ValueError("the saved images do not match the saved trace")
    history = {}
    for k, v in (meta.get("history") or {}).items():  # step curves of earlier runs: the ones that can be drawn
        try:
            h = {kk: np.asarray(v[kk], dtype=float) for kk in ("step", "mean", "std")}
        except (KeyError, TypeError, ValueError):
            continue
        if all(a.ndim == 1 for a in h.values()) and len({len(a) for a in h.values()}) == 1:
            history[str(k)] = {**{kk: np.asarray(vv) for kk, vv in v.items()}, **h}
    return r, history
