"""Plotly figures for the analysis pages (Fig. 4, Fig. 5 a-d, embeddings). Inputs are numpy arrays and
plain dicts computed by core.analysis / core.evaluation; only layout happens here."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import plotly.graph_objects as go
from axes import symlog, symlog_ticks
from plotly.subplots import make_subplots

MARG_COLOR = "#1f77b4"    # Delta E(x)
JOINT_COLOR = "#ff7f0e"   # Delta E(x, y)
GROUP_COLORS = {"natural": "#1f77b4", "adversarial": "#d62728", "generated": "#2ca02c"}
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
SUBSET_COLORS = {"high-energy": "#d62728", "low-energy": "#1f77b4", "misclassified": "#7f7f7f", "none": "#2ca02c"}


def _margin(fig: go.Figure, height: int, top: int = 60) -> go.Figure:
    fig.update_layout(height=height, margin=dict(l=10, r=10, t=top, b=10))
    return fig


# ---------------------------------------------------------------------------------------------
# Fig. 4
# ---------------------------------------------------------------------------------------------
def landscape_figure(results: Sequence[Any], c: float = 1.0, kind: str = "violin", per_row: int = 6,
                     show_points: bool = False) -> go.Figure:
    """Fig. 4: per model (sorted by robust accuracy), the signed Delta E(x) and Delta E(x, y)
    distributions side by side on a symmetric-log axis; each panel titled with its robust accuracy.

    ``results`` are LandscapeResult-like objects (name, delta_marginal, delta_joint, robust_accuracy,
    natural_accuracy).
    """
    res = sorted(results, key=lambda r: (r.robust_accuracy, r.natural_accuracy))
    m = len(res)
    cols = max(1, min(per_row, m))
    rows = max(1, -(-m // cols))
    titles = [f"<b>{r.name}</b><br>robust acc. {r.robust_accuracy:.1%}" for r in res]
    fig = make_subplots(rows=rows, cols=cols, shared_yaxes=True, subplot_titles=titles or None,
                        horizontal_spacing=0.02 if cols > 1 else 0.0, vertical_spacing=0.18 if rows > 1 else 0.0)
    allv = [np.concatenate([np.asarray(r.delta_marginal, float), np.asarray(r.delta_joint, float)]) for r in res]
    allv = np.concatenate(allv) if allv else np.zeros(1)
    allv = allv[np.isfinite(allv)] if allv.size else np.zeros(1)
    lo, hi = (float(allv.min()), float(allv.max())) if allv.size else (-1.0, 1.0)
    tickvals, ticktext = symlog_ticks(min(lo, 0.0), max(hi, 0.0), c)
    for i, r in enumerate(res):
        row, col = i // cols + 1, i % cols + 1
        for label, vals, color in (("ΔE(x)", r.delta_marginal, MARG_COLOR), ("ΔE(x,y)", r.delta_joint, JOINT_COLOR)):
            v = np.asarray(vals, float)
            t = symlog(v, c)
            common = dict(y=t, x=[label] * len(t), name=label, legendgroup=label, showlegend=i == 0,
                          marker_color=color, line_color=color,
                          customdata=v, hovertemplate=f"{r.name}<br>{label} = %{{customdata:.4g}}<extra></extra>")
            if kind == "box":
                fig.add_trace(go.Box(boxpoints="outliers" if not show_points else "all", **common), row=row, col=col)
            else:
                fig.add_trace(go.Violin(box_visible=True, meanline_visible=True, points="all" if show_points else False,
                                        spanmode="hard", scalemode="width", width=0.9, **common), row=row, col=col)
        fig.add_hline(y=0, line=dict(color="rgba(140,140,140,0.95)", width=1, dash="dot"), row=row, col=col)
    # an explicit range over every (transformed) value: the auto range clipped the top of a long violin
    t_all = symlog(allv, c) if allv.size else np.zeros(1)
    t_lo, t_hi = min(float(t_all.min()), 0.0), max(float(t_all.max()), 0.0)
    pad = 0.06 * max(t_hi - t_lo, 1e-3)
    fig.update_yaxes(tickvals=tickvals, ticktext=ticktext, zeroline=False, range=[t_lo - pad, t_hi + pad])
    fig.update_yaxes(title_text=f"signed ΔE (symmetric log, linear within ±{c:g})", row=1, col=1)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(violinmode="group" if kind == "violin" else None, boxmode="group" if kind == "box" else None,
                      legend=dict(orientation="h", y=-0.08), title="ΔE = E(natural) − E(adversarial), sorted by "
                      "robust accuracy")
    for a in fig.layout.annotations:
        a.font = dict(size=11)
    return _margin(fig, 360 * rows + 80, top=90)


def landscape_trend(rows: Sequence[dict]) -> go.Figure:
    """Mean |ΔE(x)| (± std of ΔE(x)) against robust accuracy, one point per model."""
    fig = go.Figure()
    if rows:
        x = [r["robust_acc"] for r in rows]
        # neighbours in x take turns above / below / beside their point, so close models' names do not overlap
        spots = ["top center", "bottom center", "middle right", "middle left", "top right", "bottom left"]
        order = sorted(range(len(rows)), key=lambda i: (x[i], rows[i]["dE_abs_mean"]))
        pos = [""] * len(rows)
        for rank, i in enumerate(order):
            pos[i] = spots[rank % len(spots)]
        fig.add_trace(go.Scatter(x=x, y=[r["dE_abs_mean"] for r in rows], mode="markers+text", name="mean |ΔE(x)|",
                                 text=[r["model"] for r in rows], textposition=pos, cliponaxis=False,
                                 error_y=dict(type="data", array=[r["dE_std"] for r in rows], visible=True),
                                 marker=dict(color=MARG_COLOR, size=10)))
        fig.add_trace(go.Scatter(x=x, y=[r["dEy_abs_mean"] for r in rows], mode="markers", name="mean |ΔE(x,y)|",
                                 marker=dict(color=JOINT_COLOR, size=9, symbol="diamond")))
    fig.update_layout(xaxis_title="robust accuracy", yaxis_title="mean |ΔE| (error bar: std of ΔE(x))",
                      xaxis_tickformat=".0%", legend=dict(orientation="h", y=-0.25))
    return _margin(fig, 360, top=30)


# ---------------------------------------------------------------------------------------------
# Fig. 5 b-d
# ---------------------------------------------------------------------------------------------
def pm_scatter(pm: np.ndarray, energy: np.ndarray, correct: np.ndarray, energy_label: str,
               corr: Any | None = None, max_points: int = 20000) -> go.Figure:
    """Fig. 5 b/c: probabilistic margin against an energy; colour = correctly / wrongly classified."""
    pm, energy, correct = np.asarray(pm)[:max_points], np.asarray(energy)[:max_points], np.asarray(correct)[:max_points]
    fig = go.Figure()
    for ok, name, col in ((True, "correctly classified", "#1f77b4"), (False, "misclassified", "#d62728")):
        s = correct == ok
        if s.any():
            fig.add_trace(go.Scattergl(x=energy[s], y=pm[s], mode="markers", name=name,
                                       marker=dict(color=col, size=4, opacity=0.55),
                                       hovertemplate=f"{energy_label} %{{x:.3f}}<br>PM %{{y:.3f}}<extra>{name}</extra>"))
    title = f"PM vs {energy_label}"
    if corr is not None:
        title += f" — Pearson {corr.pearson:+.2f}, Spearman {corr.spearman:+.2f}"
    fig.update_layout(title=title, xaxis_title=energy_label, yaxis_title="probabilistic margin: p(true class) − p(likeliest other class)",
                      legend=dict(orientation="h", y=-0.2))
    fig.update_yaxes(range=[-1.05, 1.05])
    return _margin(fig, 380, top=50)


def per_class_figure(rows: Sequence[dict], corr: dict | None = None) -> go.Figure:
    """Fig. 5d: per class (sorted by probabilistic error) error 1 − p(y|x), entropy and mean E(x)."""
    rows = sorted([r for r in rows if r["count"]], key=lambda r: r["prob_error"])
    names = [str(r["name"]) for r in rows]
    sub = ["probabilistic error 1 − p(y|x)", "entropy (nats)", "mean energy E(x)"]
    if corr:
        sub[1] += f" — vs error: Pearson {corr['error~entropy'].pearson:+.2f}"
        sub[2] += f" — vs error: Pearson {corr['error~energy'].pearson:+.2f}"
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, subplot_titles=sub, vertical_spacing=0.09)
    fig.add_trace(go.Bar(x=names, y=[r["prob_error"] for r in rows], marker_color="#d62728", name="error",
                         customdata=[r["hard_error"] for r in rows],
                         hovertemplate="class %{x}<br>1−p(y|x) %{y:.3f}<br>hard error %{customdata:.3f}<extra></extra>"),
                  row=1, col=1)
    fig.add_trace(go.Scatter(x=names, y=[r["entropy"] for r in rows], mode="lines+markers", marker_color="#9467bd",
                             name="entropy"), row=2, col=1)
    fig.add_trace(go.Scatter(x=names, y=[r["energy"] for r in rows], mode="lines+markers", marker_color=MARG_COLOR,
                             name="E(x)"), row=3, col=1)
    # one categorical axis for all three rows, in the same error order: numeric-looking class names ("0".."9")
    # would otherwise give the upper rows a linear axis sorted by value
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=names, showticklabels=True)
    fig.update_xaxes(title_text="class (sorted by error)", row=3, col=1)
    fig.update_layout(showlegend=False)
    for a in fig.layout.annotations:
        a.font = dict(size=12)
    return _margin(fig, 620, top=40)


# ---------------------------------------------------------------------------------------------
# Fig. 5a
# ---------------------------------------------------------------------------------------------
def subset_energy_figure(e_x: np.ndarray, indices: dict[str, np.ndarray]) -> go.Figure:
    """Where the three removed subsets sit in the training-set distribution of E(x)."""
    e = np.asarray(e_x, float)
    lo, hi = float(e.min()), float(e.max())
    size = (hi - lo) / 50 if hi > lo else 1.0
    xb = dict(start=lo, end=hi + size, size=size)
    fig = go.Figure(go.Histogram(x=e, name="all training samples", marker_color="#c7c7c7", xbins=xb))
    for name, idx in indices.items():
        fig.add_trace(go.Histogram(x=e[np.asarray(idx, int)], name=name, marker_color=SUBSET_COLORS.get(name),
                                   opacity=0.75, xbins=xb))
    fig.update_layout(barmode="overlay", xaxis_title="E(x) under the robust model", yaxis_title="count",
                      legend=dict(orientation="h", y=-0.25))
    return _margin(fig, 320, top=20)


def subset_comparison_figure(rows: Sequence[dict]) -> go.Figure:
    """Fig. 5a: PGD robust error after retraining without each subset (finished jobs only)."""
    done = [r for r in rows if r.get("rob_err") is not None]
    fig = go.Figure()
    if done:
        fig.add_trace(go.Bar(x=[r["label"] for r in done], y=[r["rob_err"] for r in done],
                             marker_color=[SUBSET_COLORS.get(r["subset"], "#7f7f7f") for r in done],
                             text=[f"{r['rob_err']:.1%}" + ("" if r.get("status") == "done" else f" (epoch {r.get('epoch')})")
                                   for r in done], textposition="outside",
                             name="PGD robust error"))
        lo = min(r["rob_err"] for r in done)
        hi = max(r["rob_err"] for r in done)
        pad = max(0.02, (hi - lo) * 0.5)
        fig.update_yaxes(range=[max(0.0, lo - pad), min(1.0, hi + pad)])
    fig.update_layout(xaxis_title="subset removed from training", yaxis_title="PGD robust error (test)",
                      yaxis_tickformat=".0%", showlegend=False)
    return _margin(fig, 360, top=20)


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------
def embedding_figure(coords: np.ndarray, color_by: str, *, energy: np.ndarray, labels: np.ndarray,
                     groups: np.ndarray, class_names: Sequence[str] | None = None, title: str = "") -> go.Figure:
    """2-D map; colour by 'energy' (continuous E(x)), 'class' or 'group' (natural / adversarial /
    generated). Every point carries its global index in ``customdata[0]`` for selections."""
    coords = np.asarray(coords, float)
    n = len(coords)
    idx = np.arange(n)
    names = list(class_names) if class_names else None

    def text(i):
        lab = int(labels[i])
        cl = names[lab] if names and lab < len(names) else str(lab)
        return f"#{i} · {groups[i]} · class {cl}<br>E(x) = {energy[i]:.3f}"

    hover = [text(i) for i in range(n)]
    fig = go.Figure()
    if color_by == "energy":
        fig.add_trace(go.Scattergl(x=coords[:, 0], y=coords[:, 1], mode="markers", name="E(x)",
                                   customdata=idx[:, None], text=hover, hovertemplate="%{text}<extra></extra>",
                                   marker=dict(color=energy, colorscale="Viridis", size=5, opacity=0.8,
                                               colorbar=dict(title="E(x)"))))
    else:
        keys = labels if color_by == "class" else groups
        uniq = list(dict.fromkeys(keys.tolist())) if color_by != "class" else sorted(set(int(k) for k in keys))
        for j, u in enumerate(uniq):
            s = keys == u
            if color_by == "class":
                nm = names[int(u)] if names and int(u) < len(names) else str(u)
                col = PALETTE[j % len(PALETTE)]
            else:
                nm, col = str(u), GROUP_COLORS.get(str(u), PALETTE[j % len(PALETTE)])
            fig.add_trace(go.Scattergl(x=coords[s, 0], y=coords[s, 1], mode="markers", name=nm,
                                       customdata=idx[s][:, None], text=[hover[i] for i in idx[s]],
                                       hovertemplate="%{text}<extra></extra>",
                                       marker=dict(color=col, size=5, opacity=0.75)))
    fig.update_layout(title=title, xaxis_title="dim 1", yaxis_title="dim 2", dragmode="lasso",
                      legend=dict(orientation="h", y=-0.15))
    return _margin(fig, 540, top=50)


def customdata_index(cd: Any) -> int | None:
    """``customdata[0]`` of one selected point, in every shape the Streamlit frontend sends it.

    * ``{"0": 28}``: Streamlit 1.67 with plotly.py >= 6 (numpy customdata travels as a typed array; plotly.js
      decodes an N x 1 array to one typed array per point, which JSON turns into an object with string index keys);
    * ``[28]``: customdata given as Python lists;
    * ``28`` (or ``"28"``): one-dimensional customdata.

    Returns None for anything else (no customdata, NaN, a non-integer).
    """
    if isinstance(cd, dict):
        cd = cd.get("0", cd.get(0)) if cd else None
    elif isinstance(cd, (list, tuple)):
        cd = cd[0] if cd else None
    if cd is None or isinstance(cd, bool):
        return None
    try:
        v = float(cd)
    except (TypeError, ValueError):
        return None
    return int(v) if np.isfinite(v) and v == int(v) else None


def selection_indices(event: Any) -> list[int]:
    """Global point indices (customdata[0]) of a ``st.plotly_chart(on_select=...)`` selection, sorted, unique."""
    sel = None
    try:
        sel = event.selection if hasattr(event, "selection") else (event or {}).get("selection")
    except Exception:  # noqa: BLE001
        sel = None
    pts = (sel or {}).get("points", []) if isinstance(sel, dict) else getattr(sel, "points", []) or []
    out = []
    for p in pts or []:
        i = customdata_index(p.get("customdata")) if isinstance(p, dict) else None
        if i is not None and i >= 0:
            out.append(i)
    return sorted(set(out))


# ---------------------------------------------------------------------------------------------
# Table 1
# ---------------------------------------------------------------------------------------------
def results_bars(rows: Sequence[dict]) -> go.Figure:
    """Natural / PGD / AA accuracy per method (mean, error bar = std over seeds)."""
    fig = go.Figure()
    names = [r["method"] + (f" ({r['dataset']})" if len({x['dataset'] for x in rows}) > 1 else "") for r in rows]
    for key, label, col in (("natural", "natural", "#1f77b4"), ("pgd", "PGD", "#ff7f0e"), ("aa", "AutoAttack", "#d62728")):
        ys = [r.get(f"{key}_mean") for r in rows]
        if all(v is None for v in ys):
            continue
        fig.add_trace(go.Bar(x=names, y=ys, name=label, marker_color=col,
                             error_y=dict(type="data", array=[r.get(f"{key}_std") or 0 for r in rows], visible=True)))
    fig.update_layout(barmode="group", yaxis_tickformat=".0%", yaxis_title="accuracy", legend=dict(orientation="h", y=-0.2))
    return _margin(fig, 360, top=20)
