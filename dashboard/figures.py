"""Plotly figures for the paper's views. Inputs are numpy arrays / EnergyTrace objects; no maths
beyond layout (all quantities come from core)."""

from __future__ import annotations

import io

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

NAT_COLOR = "#1f77b4"
ADV_COLOR = "#d62728"
# guide lines (zero loss, zero) in a mid grey: visible on the light and on the dark theme (black vanished on dark)
GUIDE_COLOR = "rgba(140,140,140,0.95)"
PLOT_CONFIG = {"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": 2, "filename": "energylens"}}


def _padded(*arrays, frac: float = 0.05) -> list[float]:
    """[lo, hi] of the finite values of ``arrays``, padded by ``frac`` of the span (at least 0.05)."""
    v = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays])
    v = v[np.isfinite(v)]
    if not v.size:
        return [-1.0, 1.0]
    lo, hi = float(v.min()), float(v.max())
    pad = max(frac * (hi - lo), 0.05)
    return [lo - pad, hi + pad]


def _zero_loss_line(fig: go.Figure, xr: list[float], yr: list[float]) -> None:
    """The dashed E(x,y) = E(x) line across the plot; the axes keep the data's own ranges, so a diagonal far
    from the points (e.g. at epoch 1, E(x,y) well above E(x)) no longer squashes them into a corner."""
    lo, hi = min(xr[0], yr[0]), max(xr[1], yr[1])
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="zero loss: E(x,y) = E(x)",
                             line=dict(color=GUIDE_COLOR, dash="dash", width=1.5)))
    fig.update_xaxes(range=xr)
    fig.update_yaxes(range=yr)


def energy_arrows(e_nat: np.ndarray, ey_nat: np.ndarray, e_adv: np.ndarray, ey_adv: np.ndarray,
                  title: str = "Energy drift: natural → adversarial", max_arrows: int = 2000, labels=None,
                  x_range: tuple[float, float] | None = None, y_range: tuple[float, float] | None = None,
                  pred_nat=None, pred_adv=None, drift_max: float | None = None) -> go.Figure:
    """Fig. 1 b-d: arrows in the (E(x), E(x,y)) plane, base natural, tip adversarial, coloured by
    drift length; dashed line E(x,y) = E(x) is zero cross-entropy (points live above it).
    ``x_range`` / ``y_range`` fix the axes and ``drift_max`` the colour scale (side-by-side views share them).
    Hovering a point shows its image number, true class (``labels``) and the predicted classes (``pred_nat`` /
    ``pred_adv``, names), so "misclassified images sit far above the line" can be checked on screen."""
    n = min(len(e_nat), max_arrows)
    e_nat, ey_nat, e_adv, ey_adv = (np.asarray(a[:n], dtype=float) for a in (e_nat, ey_nat, e_adv, ey_adv))
    length = np.hypot(e_adv - e_nat, ey_adv - ey_nat)
    fig = go.Figure()
    if n:
        qs = np.quantile(length, [0, 0.5, 0.8, 0.95, 1.0])
        shades = ["#c6dbef", "#6baed6", "#2171b5", "#08306b"]
        for k in range(4):
            sel = (length >= qs[k]) & ((length <= qs[k + 1]) if k == 3 else (length < qs[k + 1]))
            if not sel.any():
                continue
            xs = np.column_stack([e_nat[sel], e_adv[sel], np.full(sel.sum(), np.nan)]).ravel()
            ys = np.column_stack([ey_nat[sel], ey_adv[sel], np.full(sel.sum(), np.nan)]).ravel()
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=shades[k], width=1.2), hoverinfo="skip",
                                     showlegend=False))
        xs = np.column_stack([e_nat, e_adv]).ravel()
        ys = np.column_stack([ey_nat, ey_adv]).ravel()
        sym = np.tile(["circle", "arrow"], n)
        size = np.tile([4, 10], n)
        col = np.repeat(length, 2)
        def who(i: int) -> str:
            parts = [f"image {i}"]
            if labels is not None:
                parts.append(f"true {labels[i]}")
            if pred_nat is not None:
                parts.append(f"predicted {pred_nat[i]}" + (f" → {pred_adv[i]} after the attack"
                                                           if pred_adv is not None else ""))
            return " · ".join(parts)

        text = [f"{who(i)}<br>E(x): {e_nat[i]:.2f} → {e_adv[i]:.2f}<br>E(x,y): {ey_nat[i]:.2f} → {ey_adv[i]:.2f}"
                for i in np.repeat(np.arange(n), 2)]
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="markers", name="drift", customdata=np.repeat(np.arange(n), 2),
            marker=dict(symbol=sym, size=size, angleref="previous", color=col, colorscale="Blues", cmin=0,
                        cmax=drift_max if drift_max else None, colorbar=dict(title="drift"), line=dict(width=0)),
            text=text, hovertemplate="%{text}<extra></extra>", showlegend=False))
        _zero_loss_line(fig, _padded(e_nat, e_adv), _padded(ey_nat, ey_adv))
    fig.update_layout(title=title, xaxis_title="marginal energy E(x)", yaxis_title="joint energy E(x, y)",
                      height=480, margin=dict(l=10, r=10, t=50, b=10), legend=dict(orientation="h", y=-0.15))
    if x_range is not None:
        fig.update_xaxes(range=list(x_range))
    if y_range is not None:
        fig.update_yaxes(range=list(y_range))
    return fig


def shared_range(*arrays, pad: float = 0.05) -> tuple[float, float]:
    """One axis range covering every finite value of the arrays (with a small margin)."""
    vals = np.concatenate([np.asarray(a, float).ravel() for a in arrays]) if arrays else np.array([])
    vals = vals[np.isfinite(vals)]
    if not len(vals):
        return (0.0, 1.0)
    lo, hi = float(vals.min()), float(vals.max())
    m = pad * (hi - lo + 1e-6)
    return (lo - m, hi + m)


def natural_energies(e_nat: np.ndarray, ey_nat: np.ndarray, labels: list[str], class_order: list[str] | None = None,
                     title: str = "Natural energies of the chosen test images (the arrows start here)",
                     preds: list[str] | None = None) -> go.Figure:
    """The bases of Fig. 1's arrows before any attack: one point per image, coloured by class (legend in
    ``class_order``, else in order of appearance). Hover: image number, true and predicted class (``preds``)."""
    e_nat, ey_nat = np.asarray(e_nat, dtype=float), np.asarray(ey_nat, dtype=float)
    order = [c for c in (class_order or []) if c in set(labels)] or sorted(set(labels), key=labels.index)
    fig = go.Figure()
    for c in order:
        sel = np.array([lab == c for lab in labels])
        idx = np.flatnonzero(sel)
        pred = [preds[i] if preds is not None else "" for i in idx]
        wrong = [" (misclassified)" if preds is not None and preds[i] != labels[i] else "" for i in idx]
        fig.add_trace(go.Scatter(x=e_nat[sel], y=ey_nat[sel], mode="markers", name=str(c), marker=dict(size=6),
                                 customdata=np.column_stack([idx, pred, wrong]) if len(idx) else None,
                                 hovertemplate=f"image %{{customdata[0]}} · true {c}"
                                 + (" · predicted %{customdata[1]}%{customdata[2]}" if preds is not None else "")
                                 + "<br>E(x) %{x:.2f}<br>E(x,y) %{y:.2f}<extra></extra>"))
    if len(e_nat):
        _zero_loss_line(fig, _padded(e_nat), _padded(ey_nat))
    fig.update_layout(title=title, xaxis_title="marginal energy E(x)", yaxis_title="joint energy E(x, y)", height=420,
                      margin=dict(l=10, r=10, t=50, b=10))
    return fig


def step_curve(series: dict[str, dict[str, np.ndarray]], energy: str = "E(x)") -> go.Figure:
    """Fig. 1a: mean energy (band = ±1 std) against the attack step, one line per run/model."""
    fig = go.Figure()
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    # a query-based run (Square: hundreds of queries) and an iteration-based one (10 steps) do not share an x axis:
    # when both are shown, x is the fraction of each run's budget
    units = {name: ("queries" if "queries" in name else "steps") for name in series}
    mixed = len(set(units.values())) > 1
    for i, (name, s) in enumerate(series.items()):
        c = palette[i % len(palette)]
        x, m, sd = np.asarray(s["step"], dtype=float), s["mean"], s["std"]
        if mixed:
            x = x / max(float(np.nanmax(x)) if len(x) else 1.0, 1.0)
        fig.add_trace(go.Scatter(x=np.concatenate([x, x[::-1]]), y=np.concatenate([m + sd, (m - sd)[::-1]]),
                                 fill="toself", fillcolor=c, opacity=0.15, line=dict(width=0), hoverinfo="skip",
                                 showlegend=False))
        fig.add_trace(go.Scatter(x=x, y=m, mode="lines+markers", name=name, line=dict(color=c)))
    xtitle = ("share of each run's budget (its steps, or its queries for a query-based attack)" if mixed else
              "query" if units and all(u == "queries" for u in units.values()) else "attack step")
    fig.update_layout(title=f"{energy} along the attack (mean ± std)", xaxis_title=xtitle,
                      yaxis_title=f"mean {energy}", height=380, margin=dict(l=10, r=10, t=50, b=10),
                      legend=dict(orientation="h", y=-0.2))
    if mixed:
        fig.update_xaxes(tickformat=".0%", range=[0, 1.02])
    return fig


def energy_histograms(nat: dict[str, np.ndarray], adv: dict[str, np.ndarray], bins: int = 40,
                      ranges: dict[str, tuple[float, float]] | None = None, title: str | None = None) -> go.Figure:
    """Fig. 2: natural vs adversarial distributions of E(x) (left) and E(x, y) (right). ``ranges`` (per
    'marginal' / 'joint') fixes bins and axes, so side-by-side views are comparable."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("marginal energy E(x)", "joint energy E(x, y)"))
    for col, key in ((1, "marginal"), (2, "joint")):
        a, b = np.asarray(nat[key], float), np.asarray(adv[key], float)
        if ranges and key in ranges:
            lo, hi = (float(v) for v in ranges[key])
            fig.update_xaxes(range=[lo, hi], row=1, col=col)
        else:
            lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
        size = (hi - lo) / bins if hi > lo else 1.0
        xb = dict(start=lo, end=hi + size, size=size)
        fig.add_trace(go.Histogram(x=a, name="natural", marker_color=NAT_COLOR, opacity=0.6, xbins=xb,
                                   legendgroup="nat", showlegend=col == 1), row=1, col=col)
        fig.add_trace(go.Histogram(x=b, name="adversarial", marker_color=ADV_COLOR, opacity=0.6, xbins=xb,
                                   legendgroup="adv", showlegend=col == 1), row=1, col=col)
    fig.update_layout(barmode="overlay", height=360, margin=dict(l=10, r=10, t=70 if title else 50, b=10),
                      legend=dict(orientation="h", y=-0.2), title=title)
    fig.update_yaxes(title_text="count", row=1, col=1)
    return fig


def class_energy_bars(joint: np.ndarray, class_names: list[str], marginal: float, title: str) -> go.Figure:
    """Per-class joint energies E(x, k) of one image, with E(x) as a reference line."""
    fig = go.Figure(go.Bar(x=[str(c) for c in class_names], y=joint, marker_color=NAT_COLOR, name="E(x, k)"))
    fig.add_hline(y=marginal, line_dash="dash", annotation_text=f"E(x) = {marginal:.2f}")
    fig.update_layout(title=title, yaxis_title="joint energy E(x, k)", height=300, margin=dict(l=10, r=10, t=40, b=10))
    return fig


def to_uint8_image(x: np.ndarray) -> np.ndarray:
    """C x H x W float [0,1] -> H x W x C uint8."""
    x = np.asarray(x)
    if x.ndim == 3 and x.shape[0] in (1, 3):
        x = x.transpose(1, 2, 0)
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def amplify(delta: np.ndarray) -> np.ndarray:
    """Perturbation scaled to fill [0, 1] for display (0.5 = no change)."""
    m = float(np.abs(delta).max()) or 1.0
    return 0.5 + 0.5 * delta / m


def image_grid_png(images: np.ndarray, ncol: int = 8, scale: int = 2, row_labels: list[str] | None = None) -> bytes:
    """N x C x H x W float [0,1] -> PNG bytes of a grid, ``ncol`` images per row. With ``row_labels`` each
    grid row gets its label written in a white strip on the left (e.g. natural / adversarial / perturbation)."""
    from PIL import Image, ImageDraw, ImageFont

    n = len(images)
    if n == 0:
        return b""
    c, h, w = images.shape[1:]
    nrow = (n + ncol - 1) // ncol
    grid = np.ones((nrow * (h + 2), ncol * (w + 2), 3), dtype=np.uint8) * 255
    for i, im in enumerate(images):
        r, q = divmod(i, ncol)
        u = to_uint8_image(im)
        if u.shape[2] == 1:
            u = np.repeat(u, 3, axis=2)
        grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, q * (w + 2) + 1:q * (w + 2) + 1 + w] = u
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    if row_labels:
        row_h = (h + 2) * scale
        try:
            font = ImageFont.load_default(size=max(10, min(16, row_h // 3)))
        except TypeError:  # Pillow < 10.1: the fixed bitmap font
            font = ImageFont.load_default()
        draw = ImageDraw.Draw(img)
        strip = 8 + max(int(draw.textlength(str(t), font=font)) for t in row_labels)
        out = Image.new("RGB", (img.width + strip, img.height), "white")
        out.paste(img, (strip, 0))
        draw = ImageDraw.Draw(out)
        for r, label in enumerate(row_labels[:nrow]):
            top, bottom = draw.textbbox((0, 0), str(label), font=font)[1::2]
            draw.text((4, r * row_h + (row_h - (bottom - top)) // 2 - top), str(label), fill=(0, 0, 0), font=font)
        img = out
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
