"""Plotly figures of the Training studio: Fig. 3 (ΔE per epoch with the three phases), WEAT weights,
and run comparisons (Table 2a). Inputs are numpy arrays and a core.phase.PhaseResult; no maths
beyond layout (smoothing and phase detection happen in core.phase)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

DE_COLOR = "#2ca02c"        # ΔE(x), green as in the paper's figure
DEY_COLOR = "#98df8a"       # ΔE(x, y), light green
ROB_COLOR = "#1f77b4"       # robust test error, blue as in the paper's figure
NAT_COLOR = "#7f7f7f"       # natural test error
PHASE_COLORS = ("rgba(31,119,180,0.07)", "rgba(44,160,44,0.07)", "rgba(214,39,40,0.10)")
# the paper's names of the three phases of ΔE(x) on the training data (Sec. 3.2, Fig. 3)
PHASE_NAMES = ("phase 1 · initial transient", "phase 2 · plateau", "phase 3 · steep fall")


def phase_sentence(res) -> str:
    """What the ΔE(x) detector (core.phase) found, as the paper names the phases, and nothing else: whether the run
    overfits is said once, by the robust test accuracy (core.overfitting.sentence), never here."""
    if res is None:
        return "Too few epochs to place the phases of ΔE(x)."
    p1 = (f"phase 1 (initial transient) ends at epoch {res.phase1_end:g}" if res.phase1_end is not None
          else "no distinct phase 1 (initial transient)")
    if res.phase3_start is not None:
        return (f"ΔE(x) of the training data: {p1}; phase 2 (plateau) until epoch {res.phase3_start:g}; phase 3 "
                f"(steep fall, the paper's mark of robust overfitting) from epoch {res.phase3_start:g} "
                f"(detector confidence {res.confidence:.0%}).")
    why = ""
    expl = str(getattr(res, "explanation", "") or "")
    if "fall after a plateau (" in expl:   # the detector's first failed test, e.g. "the last piece does not fall"
        tail = expl.split("fall after a plateau (", 1)[1]
        for stop in (". Phase 1", ". No distinct"):
            tail = tail.split(stop, 1)[0]
        why = ": " + (tail[:-1] if tail.endswith(")") else tail)
    return f"ΔE(x) of the training data: {p1}; no phase 3 (no steep sustained fall after the plateau{why})."
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
LAYOUT = dict(margin=dict(l=10, r=10, t=50, b=10), legend=dict(orientation="h", y=-0.2))


def _finite(a) -> bool:
    a = np.asarray(a, dtype=float)
    return bool(a.size) and bool(np.isfinite(a).any())


def phase_figure(epochs: np.ndarray, curves: dict[str, tuple[np.ndarray, np.ndarray | None]],
                 errors: dict[str, np.ndarray], phase=None, title: str = "ΔE(x) during training (Fig. 3)",
                 height: int = 460) -> go.Figure:
    """Fig. 3: energy gaps per epoch (left axis) and test errors (right axis), phases shaded.

    ``curves``: label -> (raw, smoothed or None); the raw line is drawn faint when a smoothed one
    is given. ``errors``: label -> values in [0, 1]. ``phase``: a core.phase.PhaseResult or None.
    """
    epochs = np.asarray(epochs, dtype=float)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    colors = [DE_COLOR, DEY_COLOR, "#17becf", "#bcbd22"]
    for i, (label, (raw, smoothed)) in enumerate(curves.items()):
        c = colors[i % len(colors)]
        raw = np.asarray(raw, dtype=float)
        if smoothed is not None:
            fig.add_trace(go.Scatter(x=epochs, y=raw, mode="lines", name=f"{label} (raw)", line=dict(color=c, width=1),
                                     opacity=0.3, legendgroup=label, showlegend=False,
                                     hovertemplate=f"{label} raw: %{{y:.4g}}<extra></extra>"), secondary_y=False)
            fig.add_trace(go.Scatter(x=epochs, y=np.asarray(smoothed, dtype=float), mode="lines+markers", name=label,
                                     line=dict(color=c, width=2.5), marker=dict(size=4), legendgroup=label),
                          secondary_y=False)
        else:
            fig.add_trace(go.Scatter(x=epochs, y=raw, mode="lines+markers", name=label, line=dict(color=c, width=2.5),
                                     marker=dict(size=4)), secondary_y=False)
    if phase is not None and getattr(phase, "fit_epochs", None):
        fig.add_trace(go.Scatter(x=phase.fit_epochs, y=phase.fit_values, mode="lines", name="phase fit",
                                 line=dict(color="black", width=1, dash="dot"), hoverinfo="skip"), secondary_y=False)
    for j, (label, vals) in enumerate(errors.items()):
        vals = np.asarray(vals, dtype=float)
        if not _finite(vals):
            continue
        c = ROB_COLOR if j == 0 else NAT_COLOR
        # evaluated every k epochs (TrainConfig.measure_every): the epochs between are NaN, joined over
        fig.add_trace(go.Scatter(x=epochs, y=vals, mode="lines+markers", name=label, connectgaps=True,
                                 marker=dict(size=4, color=c),
                                 line=dict(color=c, width=1.8, dash="solid" if j == 0 else "dash"),
                                 hovertemplate=f"{label}: %{{y:.1%}}<extra></extra>"), secondary_y=True)
    # phases are shaded only when the detector found a boundary: with too few epochs (or no distinct phase 1
    # and no phase 3) the caption says it cannot tell, and the plot must not claim a "phase 2"
    if epochs.size and phase is not None and (phase.phase1_end is not None or phase.phase3_start is not None):
        x0, x1 = float(epochs.min()), float(epochs.max())
        p1 = phase.phase1_end if phase.phase1_end is not None else x0
        p3 = phase.phase3_start if phase.phase3_start is not None else x1
        spans = [(PHASE_NAMES[0], x0, p1), (PHASE_NAMES[1], p1, p3), (PHASE_NAMES[2], p3, x1)]
        for (label, a, b), color in zip(spans, PHASE_COLORS):
            if b > a:
                fig.add_vrect(x0=a, x1=b, fillcolor=color, line_width=0, layer="below",
                              annotation_text=label, annotation_position="top left",
                              annotation=dict(font_size=11, font_color="#555"))
        if phase.phase3_start is not None:
            fig.add_vline(x=phase.phase3_start, line=dict(color="#d62728", width=2, dash="dash"),
                          annotation_text=f"steep fall from epoch {phase.phase3_start:g}",
                          annotation_position="bottom right", annotation_font_color="#d62728")
    fig.update_layout(title=title, height=height, hovermode="x unified", **LAYOUT)
    fig.update_xaxes(title_text="epoch")
    fig.update_yaxes(title_text="energy gap (training probe set)", secondary_y=False)
    fig.update_yaxes(title_text="test error", tickformat=".0%", secondary_y=True, showgrid=False,
                     **error_axis([v for v in errors.values()]))
    return fig


def error_axis(series) -> dict:
    """Round ticks for an error axis in [0, 1]: a range on multiples of 5, 10 or 20 % that covers the finite
    values, ticks on those multiples (plotly's own choice on a secondary axis gives ticks like 89 %, 74 %, 58 %)."""
    vals = np.concatenate([np.asarray(v, dtype=float).ravel() for v in series]) if len(series) else np.zeros(0)
    vals = vals[np.isfinite(vals)]
    if not vals.size:
        return dict(range=[0.0, 1.0], tickmode="linear", tick0=0.0, dtick=0.2)
    lo, hi = max(0.0, float(vals.min())), min(1.0, float(vals.max()))
    span = hi - lo
    dtick = 0.05 if span <= 0.25 else 0.1 if span <= 0.6 else 0.2
    a = max(0.0, np.floor(lo / dtick + 1e-9) * dtick)
    b = min(1.0, np.ceil(hi / dtick - 1e-9) * dtick)
    if b - a < dtick:
        b = min(1.0, a + dtick) if a + dtick <= 1.0 else b
        a = b - dtick
    return dict(range=[round(float(a), 4), round(float(b), 4)], tickmode="linear", tick0=0.0, dtick=dtick)


def weight_figure(w_probe: np.ndarray | None, epoch: int | None, epochs: np.ndarray | None = None,
                  stats: dict[str, np.ndarray] | None = None, height: int = 360) -> go.Figure:
    """WEAT weights: histogram of w = 1/softplus(|E(x)|) on the probe set at one epoch (left) and,
    when the method weights its loss, the per-epoch mean/min/max of the training weights (right)."""
    has_stats = stats is not None and epochs is not None and any(_finite(v) for v in stats.values())
    fig = make_subplots(rows=1, cols=2 if has_stats else 1, subplot_titles=(
        (f"WEAT weight of the probe samples, epoch {epoch}" if epoch is not None else "WEAT weight of the probe samples",)
        + (("training-batch weights per epoch",) if has_stats else ())))
    if w_probe is not None and len(w_probe):
        fig.add_trace(go.Histogram(x=np.asarray(w_probe, dtype=float), nbinsx=40, marker_color=DE_COLOR, opacity=0.8,
                                   name="w(x) = 1/softplus(|E(x)|)"), row=1, col=1)
    if has_stats:
        ep = np.asarray(epochs, dtype=float)
        if "w_min" in stats and "w_max" in stats and _finite(stats["w_min"]):
            lo, hi = np.asarray(stats["w_min"], float), np.asarray(stats["w_max"], float)
            fig.add_trace(go.Scatter(x=np.concatenate([ep, ep[::-1]]), y=np.concatenate([hi, lo[::-1]]), fill="toself",
                                     fillcolor="rgba(44,160,44,0.15)", line=dict(width=0), name="min–max",
                                     hoverinfo="skip"), row=1, col=2)
        if "w_mean" in stats and _finite(stats["w_mean"]):
            m = np.asarray(stats["w_mean"], float)
            fig.add_trace(go.Scatter(x=ep, y=m, mode="lines+markers", name="mean", line=dict(color=DE_COLOR)),
                          row=1, col=2)
            if "w_std" in stats and _finite(stats["w_std"]):
                sd = np.asarray(stats["w_std"], float)
                fig.add_trace(go.Scatter(x=ep, y=m + sd, mode="lines", name="mean ± std",
                                         line=dict(color=DE_COLOR, dash="dot", width=1)), row=1, col=2)
                fig.add_trace(go.Scatter(x=ep, y=m - sd, mode="lines", showlegend=False,
                                         line=dict(color=DE_COLOR, dash="dot", width=1)), row=1, col=2)
        fig.update_xaxes(title_text="epoch", row=1, col=2)
        fig.update_yaxes(title_text="weight", row=1, col=2)
    fig.update_xaxes(title_text="weight w(x)", row=1, col=1)
    fig.update_yaxes(title_text="count", row=1, col=1)
    fig.update_layout(height=height, bargap=0.02, **LAYOUT)
    return fig


def compare_curves(series: dict[str, tuple[np.ndarray, np.ndarray]], phases: dict | None = None,
                   ylabel: str = "ΔE(x) = E(x) − E(x*)", title: str = "ΔE(x) per epoch, several runs") -> go.Figure:
    """ΔE curves of several runs overlaid (label -> (epochs, values)); a run's detected phase-3
    epoch (``phases[label]``) is marked with a diamond on its curve."""
    fig = go.Figure()
    for i, (label, (ep, val)) in enumerate(series.items()):
        c = PALETTE[i % len(PALETTE)]
        ep, val = np.asarray(ep, float), np.asarray(val, float)
        fig.add_trace(go.Scatter(x=ep, y=val, mode="lines+markers", name=label, line=dict(color=c, width=2),
                                 marker=dict(size=3)))
        p3 = (phases or {}).get(label)
        if p3 is not None and ep.size:
            k = int(np.argmin(np.abs(ep - p3)))
            fig.add_trace(go.Scatter(x=[ep[k]], y=[val[k]], mode="markers", showlegend=False,
                                     marker=dict(symbol="diamond", size=12, color=c, line=dict(color="black", width=1)),
                                     hovertemplate=f"{label}: phase 3 from epoch {p3:g}<extra></extra>"))
    fig.add_hline(y=0, line=dict(color="black", width=1, dash="dot"))
    fig.update_layout(title=title, xaxis_title="epoch", yaxis_title=ylabel, height=420, hovermode="x unified", **LAYOUT)
    return fig


def final_bars(rows: list[dict], key: str = "dE_mean", label: str = "final ΔE(x)") -> go.Figure:
    """Table 2a as bars: one bar per run (``rows``: dicts with 'run', 'method' and ``key``),
    coloured by method, with the robust accuracy in the hover text when present."""

    def val(r, k):
        v = r.get(k)
        return float(v) if isinstance(v, (int, float)) and np.isfinite(v) else None

    fig = go.Figure()
    methods = list(dict.fromkeys(r.get("method", "?") for r in rows))
    for i, m in enumerate(methods):
        sel = [r for r in rows if r.get("method", "?") == m]
        ys = [val(r, key) for r in sel]
        hover = []
        for r, y in zip(sel, ys):
            h = f"{r['run']} ({m})<br>{label} " + ("–" if y is None else f"{y:+.4f}")
            if val(r, "pgd_acc") is not None:
                h += f"<br>PGD acc {val(r, 'pgd_acc'):.1%}"
            hover.append(h)
        fig.add_trace(go.Bar(x=[r["run"] for r in sel], y=ys, name=m, marker_color=PALETTE[i % len(PALETTE)],
                             text=["" if y is None else f"{y:+.4f}" for y in ys], textposition="outside",
                             hovertext=hover, hoverinfo="text"))
    fig.add_hline(y=0, line=dict(color="black", width=1))
    fig.update_layout(title=f"{label} at the last epoch (Table 2a)", yaxis_title=label, height=380, barmode="group",
                      **LAYOUT)
    return fig


def batch_loss_figure(records: list[dict], title: str = "Training loss by batch (live)") -> go.Figure:
    """The batch-level training loss of a running job (``batches.jsonl`` records: epoch, batch, batches, loss),
    x in epochs (fractional), so its first points appear long before the first epoch's ΔE record."""
    x = np.asarray([(r["epoch"] - 1) + r["batch"] / max(r.get("batches") or 1, 1) for r in records], float)
    y = np.asarray([r.get("loss", np.nan) for r in records], float)
    fig = go.Figure(go.Scatter(x=x, y=y, mode="lines+markers", name="training loss", line=dict(color=ROB_COLOR),
                               marker=dict(size=4)))
    fig.update_layout(title=title, xaxis_title="epoch (fraction done)", yaxis_title="loss of the batch", height=260,
                      **LAYOUT)
    return fig


def overfitting_story_figure(runs: dict[str, dict], phase=None, phase_run: str | None = None,
                             height: int = 640) -> go.Figure:
    """Fig. 3 for several runs on shared axes: ΔE(x) of the training probe set (top, left axis) with the robust test
    error (top, right axis, dotted), and robust accuracy on the training probe vs the test images (bottom: the gap that
    memorisation opens). ``runs``: label -> {"epochs", "dE", "rob_err", "train_rob", "test_rob"} arrays. The phases
    of ``phase`` (a core.phase.PhaseResult of ``phase_run``) are shaded."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.6, 0.4],
                        specs=[[{"secondary_y": True}], [{"secondary_y": False}]],
                        subplot_titles=("ΔE(x) = E(x) − E(x*) on training images, and robust test error",
                                        "Robust accuracy: training probe (solid) vs test images (dotted)"))
    all_err = []
    for i, (label, r) in enumerate(runs.items()):
        c = PALETTE[i % len(PALETTE)]
        ep = np.asarray(r["epochs"], dtype=float)
        fig.add_trace(go.Scatter(x=ep, y=np.asarray(r["dE"], dtype=float), mode="lines+markers", name=f"{label}: ΔE(x)",
                                 line=dict(color=c, width=2.5), marker=dict(size=4), legendgroup=label,
                                 hovertemplate=f"{label} ΔE(x): %{{y:+.3f}}<extra></extra>"), row=1, col=1,
                      secondary_y=False)
        err = np.asarray(r["rob_err"], dtype=float)
        all_err.append(err)
        fig.add_trace(go.Scatter(x=ep, y=err, mode="lines", name=f"{label}: robust test error",
                                 line=dict(color=c, width=1.5, dash="dot"), legendgroup=label,
                                 hovertemplate=f"{label} robust test error: %{{y:.1%}}<extra></extra>"), row=1, col=1,
                      secondary_y=True)
        if _finite(r.get("train_rob", [])):
            fig.add_trace(go.Scatter(x=ep, y=np.asarray(r["train_rob"], dtype=float), mode="lines",
                                     name=f"{label}: robust acc., training probe", line=dict(color=c, width=2),
                                     legendgroup=label, showlegend=False,
                                     hovertemplate=f"{label} training probe: %{{y:.1%}}<extra></extra>"), row=2, col=1)
        fig.add_trace(go.Scatter(x=ep, y=np.asarray(r["test_rob"], dtype=float), mode="lines",
                                 name=f"{label}: robust acc., test", line=dict(color=c, width=1.5, dash="dot"),
                                 legendgroup=label, showlegend=False,
                                 hovertemplate=f"{label} test: %{{y:.1%}}<extra></extra>"), row=2, col=1)
    if phase is not None and runs:
        ep = np.concatenate([np.asarray(r["epochs"], dtype=float) for r in runs.values()])
        x0, x1 = float(ep.min()), float(ep.max())
        p1 = phase.phase1_end if phase.phase1_end is not None else x0
        p3 = phase.phase3_start if phase.phase3_start is not None else x1
        who = f" ({phase_run})" if phase_run else ""
        for (label, a, b), color in zip(((PHASE_NAMES[0], x0, p1), (PHASE_NAMES[1], p1, p3),
                                         (f"{PHASE_NAMES[2]}{who}", p3, x1)), PHASE_COLORS):
            if b > a:
                fig.add_vrect(x0=a, x1=b, fillcolor=color, line_width=0, layer="below", row="all", col=1,
                              annotation_text=label if label != PHASE_NAMES[0] or b - a > 2 else "",
                              annotation_position="top left", annotation=dict(font_size=11, font_color="#555"))
    fig.update_layout(height=height, hovermode="x unified", **LAYOUT)
    fig.update_xaxes(title_text="epoch", row=2, col=1)
    fig.update_yaxes(title_text="ΔE(x)", row=1, col=1, secondary_y=False)
    fig.update_yaxes(title_text="robust test error", tickformat=".0%", row=1, col=1, secondary_y=True,
                     showgrid=False, **error_axis(all_err))
    fig.update_yaxes(title_text="robust accuracy", tickformat=".0%", row=2, col=1, range=[0, 1])
    return fig
