"""Plotly figures of the SGLD studio (paper Fig. 5e energy trend, Fig. 6 comparisons).

Inputs are the plain arrays of ``SGLDTrace.summary()``; no maths beyond layout.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

TARGET_COLOR = "#1f77b4"
OTHERS_COLOR = "#d62728"
MARGINAL_COLOR = "#2ca02c"
INIT_COLORS = {"random": "#7f7f7f", "gaussian": "#ff7f0e", "pca": "#1f77b4"}


def _band(fig: go.Figure, x, mean, std, color: str, name: str, dash: str | None = None) -> None:
    x, mean, std = (np.asarray(a, float) for a in (x, mean, std))
    fig.add_trace(go.Scatter(x=np.concatenate([x, x[::-1]]), y=np.concatenate([mean + std, (mean - std)[::-1]]),
                             fill="toself", fillcolor=color, opacity=0.15, line=dict(width=0), hoverinfo="skip",
                             showlegend=False, legendgroup=name))
    fig.add_trace(go.Scatter(x=x, y=mean, mode="lines", name=name, line=dict(color=color, width=2, dash=dash),
                             legendgroup=name))


def energy_trend(summary: dict[str, np.ndarray], reference: float | None = None,
                 reference_marginal: float | None = None, title: str = "Energies along the SGLD chain",
                 passed_at: int | None = None) -> go.Figure:
    """Fig. 5e: mean E(x, y) of the target class (band = ±1 std over chains) falling towards the
    dashed reference Ē(x, y) of real images, the mean E(x, y') of the other classes rising, and E(x).
    ``passed_at``: the step at which the mean E(x, y) went below Ē(x, y) (``SGLDTrace.passed_reference``),
    marked by a vertical line and a point on the curve."""
    step = summary["step"]
    fig = go.Figure()
    _band(fig, step, summary["target_mean"], summary["target_std"], TARGET_COLOR, "target E(x, y)")
    _band(fig, step, summary["others_mean"], summary["others_std"], OTHERS_COLOR, "other classes E(x, y′)")
    _band(fig, step, summary["marginal_mean"], summary["marginal_std"], MARGINAL_COLOR, "marginal E(x)", dash="dot")
    if reference is not None and np.isfinite(reference):
        fig.add_trace(go.Scatter(x=[step[0], step[-1]] if len(step) > 1 else [0, 1], y=[reference, reference],
                                 mode="lines", name="Ē(x, y) of real images", line=dict(color=TARGET_COLOR, dash="dash")))
    if passed_at is not None and reference is not None and np.isfinite(reference):
        i = int(np.searchsorted(np.asarray(step), passed_at))
        i = min(i, len(step) - 1)
        fig.add_vline(x=float(passed_at), line=dict(color="black", dash="dot", width=1),
                      annotation_text=f"passed Ē(x, y) at step {passed_at}", annotation_position="top right")
        fig.add_trace(go.Scatter(x=[float(passed_at)], y=[float(np.asarray(summary["target_mean"])[i])], mode="markers",
                                 name=f"below Ē(x, y) from step {passed_at}",
                                 marker=dict(color=TARGET_COLOR, size=11, symbol="x")))
    if reference_marginal is not None and np.isfinite(reference_marginal):
        fig.add_trace(go.Scatter(x=[step[0], step[-1]] if len(step) > 1 else [0, 1],
                                 y=[reference_marginal, reference_marginal], mode="lines",
                                 name="Ē(x) of real images", line=dict(color=MARGINAL_COLOR, dash="dash", width=1)))
    fig.update_layout(title=title, xaxis_title="SGLD step", yaxis_title="energy", height=400,
                      margin=dict(l=10, r=10, t=50, b=10), legend=dict(orientation="h", y=-0.2))
    return fig


def compare_trend(summaries: dict[str, dict[str, np.ndarray]], reference: float | None = None) -> go.Figure:
    """Target E(x, y) along the chain for several initialisations (Fig. 6 bottom, quantified)."""
    fig = go.Figure()
    palette = list(INIT_COLORS.values())
    for i, (name, s) in enumerate(summaries.items()):
        c = INIT_COLORS.get(name, palette[i % len(palette)])
        _band(fig, s["step"], s["target_mean"], s["target_std"], c, f"{name}: E(x, y)")
    if reference is not None and np.isfinite(reference):
        xs = np.concatenate([s["step"] for s in summaries.values()]) if summaries else np.array([0, 1])
        fig.add_trace(go.Scatter(x=[float(xs.min()), float(xs.max())], y=[reference, reference], mode="lines",
                                 name="Ē(x, y) of real images", line=dict(color="black", dash="dash")))
    fig.update_layout(title="Target energy E(x, y) by initialisation", xaxis_title="SGLD step",
                      yaxis_title="E(x, y)", height=360, margin=dict(l=10, r=10, t=50, b=10),
                      legend=dict(orientation="h", y=-0.25))
    return fig
