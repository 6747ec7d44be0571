"""Reading the charts of a Streamlit ``AppTest`` by what they show, not by one build's bytes.

A ``st.plotly_chart`` element carries its figure as the JSON text that plotly wrote
(``element.proto.spec``). That text differs between plotly releases for the same figure: plotly 6
and later escape non-ASCII characters (``"\\u0394E(x)"`` for ``"ΔE(x)"``) and write numeric arrays
as base64 typed arrays (``{"dtype": "f8", "bdata": "..."}``) where plotly 5 wrote JSON lists. So
tests never search the text; they decode it (``json.loads``) and look at the figure's parts:
title, axis titles, trace names, annotations (which hold subplot titles and ``add_vrect`` labels),
shape labels, colour-bar titles, and data arrays as numpy arrays.

    from apptest_helpers import charts
    fig = charts(at)[0]
    assert fig.title.startswith("PCA of") and {"ΔE(x)", "ΔE(x,y)"} <= set(fig.trace_names)

Pages are opened by their key in the dashboard's one page list (``dashboard/navigation.py``)::

    at = AppTest.from_file(HOME).run()
    open_page(at, "attack")
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Iterable

from pathlib import Path

import numpy as np
from navigation import page_file  # dashboard/ is on sys.path (tests/conftest.py)

__all__ = ["Chart", "charts", "decode_spec", "chart_with", "decode_array", "HOME", "open_page"]

#: The dashboard's entry script, which every AppTest starts from.
HOME = str(Path(__file__).resolve().parents[1] / "dashboard" / "Home.py")


def open_page(at, key: str):
    """Switch the AppTest ``at`` to the page ``key`` of ``navigation.PAGES`` and run it; returns ``at``."""
    return at.switch_page(page_file(key)).run()


def decode_array(value: Any) -> np.ndarray:
    """A trace array as numpy: a plotly >= 6 typed array ``{"dtype", "bdata"[, "shape"]}`` or a list."""
    if isinstance(value, dict) and "bdata" in value and "dtype" in value:
        arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]).newbyteorder("<"))
        shape = value.get("shape")
        if shape is not None:
            dims = [int(s) for s in str(shape).replace("[", "").replace("]", "").split(",") if s.strip()]
            arr = arr.reshape(dims)
        return arr.astype(arr.dtype.newbyteorder("="))
    return np.asarray(value)


def decode_spec(spec_json: str) -> dict:
    """The figure dict of a ``proto.spec`` string (``json.loads`` undoes any ``\\uXXXX`` escapes)."""
    spec = json.loads(spec_json)
    assert isinstance(spec, dict) and "data" in spec, f"not a plotly figure: {spec_json[:200]}"
    return spec


def _text(v: Any) -> str | None:
    """A plotly text property, given as a string or as ``{"text": ...}``."""
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("text"), str):
        return v["text"]
    return None


@dataclass(frozen=True)
class Chart:
    """One decoded plotly chart of an AppTest run."""

    spec: dict

    @property
    def layout(self) -> dict:
        return self.spec.get("layout") or {}

    @property
    def traces(self) -> list[dict]:
        return list(self.spec.get("data") or [])

    @property
    def title(self) -> str:
        return _text(self.layout.get("title")) or ""

    @property
    def trace_names(self) -> list[str]:
        return [t["name"] for t in self.traces if isinstance(t.get("name"), str)]

    @property
    def axis_titles(self) -> dict[str, str]:
        """``{"xaxis": ..., "yaxis": ..., "xaxis2": ...}`` for the axes that have a title."""
        out = {}
        for k, v in self.layout.items():
            if (k.startswith("xaxis") or k.startswith("yaxis")) and isinstance(v, dict):
                t = _text(v.get("title"))
                if t:
                    out[k] = t
        return out

    @property
    def annotations(self) -> list[str]:
        """Annotation texts: subplot titles, ``add_vrect``/``add_hline`` labels, free text."""
        return [t for t in (_text(a) for a in self.layout.get("annotations") or []) if t]

    def texts(self) -> list[str]:
        """Every human-readable label of the figure (not hover templates, not data)."""
        out = [self.title, *self.axis_titles.values(), *self.annotations, *self.trace_names]
        legend = self.layout.get("legend") or {}
        out.append(_text(legend.get("title")) or "")
        for shape in self.layout.get("shapes") or []:
            out.append(_text((shape or {}).get("label")) or "")
        for t in self.traces:
            for holder in (t, t.get("marker") or {}):
                bar = holder.get("colorbar") if isinstance(holder, dict) else None
                if isinstance(bar, dict):
                    out.append(_text(bar.get("title")) or "")
            out.append(_text(t.get("legendgrouptitle")) or "")
        return [s for s in out if s]

    def has_text(self, fragment: str) -> bool:
        """True when ``fragment`` occurs in one of the figure's labels (:meth:`texts`)."""
        return any(fragment in s for s in self.texts())

    def trace(self, name: str) -> dict:
        hits = [t for t in self.traces if t.get("name") == name]
        assert hits, f"no trace named {name!r}; traces: {self.trace_names}"
        return hits[0]

    def array(self, trace: dict, key: str) -> np.ndarray:
        assert key in trace, f"trace {trace.get('name')!r} has no {key!r}"
        return decode_array(trace[key])


def charts(at) -> list[Chart]:
    """The decoded plotly charts an AppTest run shows, in page order."""
    return [Chart(decode_spec(el.proto.spec)) for el in at.get("plotly_chart")]


def chart_with(items: Iterable[Chart] | Any, fragment: str) -> Chart:
    """The first chart with ``fragment`` in one of its labels (``items``: charts or an AppTest)."""
    found = list(items) if not hasattr(items, "get") else charts(items)
    for c in found:
        if c.has_text(fragment):
            return c
    raise AssertionError(f"no chart shows {fragment!r}; charts: {[c.title for c in found]}")
