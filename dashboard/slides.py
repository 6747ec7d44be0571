"""Figures for slides: a slide-styled copy of a chart (white, large type, a caption line under the plot saying what it
shows) saved as PNG or SVG, and the SGLD image grid as a PNG / SVG with a caption strip.

A plotly chart is saved in the browser (the chart's camera button, set here to the chosen format and 1600 × 900):
rendering on the server needs kaleido and a Chrome, which most installations lack, so a server-made file is offered
only where both work. The image grids are made with PIL on the server.
"""

from __future__ import annotations

import base64
import io
import re
from html import escape

import plotly.graph_objects as go
import streamlit as st

WIDTH, HEIGHT = 1600, 900
FORMATS = ("png", "svg")
CAPTION_NAME = "slide-caption"


def slide_figure(fig: go.Figure, caption: str) -> go.Figure:
    """A copy of ``fig`` for a slide: white background, larger fonts, the legend above the plot and ``caption`` as
    one annotation line under it (named :data:`CAPTION_NAME`). The original is not changed."""
    out = go.Figure(fig)
    out.update_layout(template="plotly_white", paper_bgcolor="white", plot_bgcolor="white",
                      font=dict(size=20, color="#222"), title_font=dict(size=28), width=WIDTH, height=HEIGHT,
                      margin=dict(l=90, r=40, t=120, b=150),
                      legend=dict(orientation="h", x=0, xanchor="left", y=1.0, yanchor="bottom", font=dict(size=18)))
    out.update_xaxes(title_font=dict(size=22), tickfont=dict(size=18), showline=True, linecolor="#444")
    out.update_yaxes(title_font=dict(size=22), tickfont=dict(size=18), showline=True, linecolor="#444")
    out.add_annotation(text=escape(caption, quote=False), name=CAPTION_NAME, xref="paper", yref="paper", x=0, y=0,
                       xanchor="left", yanchor="top", yshift=-80, showarrow=False, align="left",
                       font=dict(size=18, color="#444"))
    return out


def filename(text: str) -> str:
    """A file name (without extension) made of ``text``: letters, digits, '-', '_' and '.' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:120] or "energylens"


def export_config(fmt: str, name: str) -> dict:
    """The chart config whose camera button saves a ``fmt`` file (PNG / SVG) of 1600 × 900 called ``name``."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    return {"displaylogo": False, "toImageButtonOptions": {"format": fmt, "filename": filename(name),
                                                           "width": WIDTH, "height": HEIGHT, "scale": 1}}


def server_image(fig: go.Figure, fmt: str) -> bytes | None:
    """The figure rendered on the server (kaleido + Chrome), or None when that is not possible here."""
    if not _can_render():
        return None
    try:
        return fig.to_image(format=fmt, width=WIDTH, height=HEIGHT, scale=1)
    except Exception:  # noqa: BLE001 - no Chrome, a kaleido that does not start: the camera button is the way
        return None


def _can_render() -> bool:
    """Whether kaleido is installed (it still needs a Chrome: :func:`server_image` says None when that fails)."""
    import importlib.util

    return importlib.util.find_spec("kaleido") is not None


def slide_panel(fig: go.Figure, caption: str, key: str, name: str) -> None:
    """A toggle "Figure for slides"; when on: format (PNG / SVG), the slide figure with its camera button set to that
    format, and a server-made file when kaleido can make one here. Off (the default), nothing is built or sent: the
    second copy of a chart is not paid on every rerun of the page (an expander would still build and send it)."""
    if not st.toggle("Figure for slides (PNG / SVG, with caption)", key=f"{key}_on"):
        return
    with st.container(border=True):
        fmt = st.radio("Format", FORMATS, format_func=str.upper, horizontal=True, key=f"{key}_fmt")
        sfig = slide_figure(fig, caption)
        st.plotly_chart(sfig, config=export_config(fmt, name), key=f"{key}_chart", width="stretch")
        st.caption(f"Use the chart's camera icon (top right, on hover) to save this figure as a {WIDTH} × {HEIGHT} "
                   f"{fmt.upper()} file with its caption.")
        if _can_render():
            if st.button(f"Make the {fmt.upper()} file on the server", key=f"{key}_render"):
                data = server_image(sfig, fmt)
                st.session_state[f"{key}_bytes"] = (fmt, caption, data)
            got = st.session_state.get(f"{key}_bytes")
            if got is not None and got[0] == fmt and got[1] == caption:
                if got[2] is None:
                    st.caption("The server could not render it (kaleido needs Chrome): use the camera icon.")
                else:
                    st.download_button(f"Download {fmt.upper()}", got[2], file_name=f"{filename(name)}.{fmt}",
                                       mime="image/png" if fmt == "png" else "image/svg+xml", key=f"{key}_dl",
                                       on_click="ignore")


# ------------------------------------------------------------------------------------------------ image grids
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def captioned_png(grid_png: bytes, caption: str, min_width: int = 640) -> bytes:
    """The PNG ``grid_png`` with a white caption strip under it (``caption``'s lines, wrapped to the width), on a
    canvas at least ``min_width`` pixels wide."""
    import textwrap

    from PIL import Image, ImageDraw

    grid = Image.open(io.BytesIO(grid_png)).convert("RGB")
    width = max(grid.width, min_width)
    size = 16
    font = _font(size)
    draw = ImageDraw.Draw(grid)
    per_line = max(20, int(width / max(draw.textlength("M", font=font) * 0.62, 1)))
    lines = [w for part in caption.split("\n") for w in (textwrap.wrap(part, per_line) or [""])]
    line_h = size + 6
    strip = 12 + line_h * len(lines)
    out = Image.new("RGB", (width + 16, grid.height + 16 + strip), "white")
    out.paste(grid, (8 + (width - grid.width) // 2, 8))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((8, grid.height + 16 + 4 + i * line_h), line, fill=(30, 30, 30), font=font)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def captioned_svg(grid_png: bytes, caption: str) -> bytes:
    """An SVG: the PNG ``grid_png`` embedded as an image, ``caption``'s lines as text under it."""
    from PIL import Image

    w, h = Image.open(io.BytesIO(grid_png)).size
    lines = caption.split("\n")
    height = h + 16 + 24 * len(lines)
    data = base64.b64encode(grid_png).decode("ascii")
    text = "".join(f'<text x="8" y="{h + 30 + 24 * i}" font-family="sans-serif" font-size="16" fill="#222">'
                   f"{escape(line)}</text>" for i, line in enumerate(lines))
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
           f'width="{max(w, 640) + 16}" height="{height + 8}">'
           f'<rect width="100%" height="100%" fill="white"/>'
           f'<image x="8" y="8" width="{w}" height="{h}" href="data:image/png;base64,{data}"/>{text}</svg>')
    return svg.encode("utf-8")


def sgld_caption(model: str, cfg: dict, class_names: list[str], n_images: int) -> str:
    """Two caption lines for an SGLD grid: what made it (model, start, steps, η / ζ / γ) and what it holds."""
    classes = ", ".join(class_names[int(c)] for c in cfg.get("classes") or [])
    return (f"SGLD samples (Eq. 7) of the classifier {model} read as an energy-based model — "
            f"init {cfg.get('init')}, {cfg.get('steps_done')} steps, η = {cfg.get('eta'):g}, "
            f"ζ = {cfg.get('zeta'):g}, γ = {cfg.get('gamma'):g}\n"
            f"{n_images} images, one row per class ({classes})")
