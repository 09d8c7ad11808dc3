"""Figures of per-layer manifolds: one layer's 2-D view, and an animation through the layers."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from mka_core.figures.common import centred_title

PROJECTION_NAMES = {"diffusion": "Diffusion map", "umap": "UMAP", "pca": "PCA"}


def row_colors(labels: list[str]) -> tuple[list[str], bool]:
    """Colour per row: the label (document / MMLU subject) when there are few, else a document
    number; second value True when the colours are categories."""
    labels = list(labels)
    distinct = list(dict.fromkeys(labels))
    if len(distinct) <= 12:
        return labels, True
    return [str(distinct.index(x)) for x in labels], False


def robust_range(values: np.ndarray, q: float = 0.01) -> tuple[float, float]:
    """An axis range that the bulk of the points fill: the q and 1 - q quantiles, widened by half
    the spread between them; a few outliers then sit at the edge instead of squashing the rest."""
    v = np.asarray(values, dtype=float)
    lo, hi = np.quantile(v, q), np.quantile(v, 1 - q)
    if hi - lo < 1e-12:
        lo, hi = float(v.min()), float(v.max())
    pad = 0.5 * (hi - lo) + 1e-9
    return max(float(v.min()), lo - pad) - 0.02 * pad, min(float(v.max()), hi + pad) + 0.02 * pad


def _clip(y: np.ndarray, rx, ry) -> tuple[np.ndarray, np.ndarray]:
    """The points drawn inside the ranges (outliers moved to the edge) and the outlier mask."""
    out = (y[:, 0] < rx[0]) | (y[:, 0] > rx[1]) | (y[:, 1] < ry[0]) | (y[:, 1] > ry[1])
    shown = np.c_[np.clip(y[:, 0], *rx), np.clip(y[:, 1], *ry)]
    return shown, out


def manifold_figure(y: np.ndarray, labels: list[str], title: str, height: int = 420) -> go.Figure:
    """One layer's rows in 2-D. The axes cover the bulk of the points (`robust_range`); points
    beyond them are drawn at the edge as open diamonds, and the title says how many."""
    labels = list(labels)
    colors, categorical = row_colors(labels)
    rx, ry = robust_range(y[:, 0]), robust_range(y[:, 1])
    shown, out = _clip(y, rx, ry)
    symbols = ["diamond-open" if o else "circle" for o in out]
    hover = [
        f"{lab}" + (f" (outlier at {y[i, 0]:.3g}, {y[i, 1]:.3g})" if out[i] else "")
        for i, lab in enumerate(labels)
    ]
    fig = go.Figure()
    if categorical:
        for name in dict.fromkeys(colors):
            idx = [i for i, c in enumerate(colors) if c == name]
            fig.add_trace(
                go.Scatter(
                    x=shown[idx, 0],
                    y=shown[idx, 1],
                    mode="markers",
                    name=name,
                    text=[hover[i] for i in idx],
                    hovertemplate="%{text}<extra></extra>",
                    marker={"size": 8, "opacity": 0.85, "symbol": [symbols[i] for i in idx]},
                )
            )
    else:
        fig.add_trace(
            go.Scatter(
                x=shown[:, 0],
                y=shown[:, 1],
                mode="markers",
                text=hover,
                hovertemplate="document: %{text}<extra></extra>",
                marker={
                    "size": 8,
                    "opacity": 0.85,
                    "symbol": symbols,
                    "color": [int(c) for c in colors],
                    "colorscale": "Turbo",
                    "colorbar": {"title": "doc #", "thickness": 10},
                },
                showlegend=False,
            )
        )
    n_out = int(out.sum())
    note = f" · {n_out} outlier{'s' if n_out != 1 else ''} at the edge (◇)" if n_out else ""
    fig.update_layout(
        title=centred_title(title + note, 14),
        height=height,
        margin={"l": 40, "r": 10, "t": 40, "b": 40},
        xaxis={"title": "dimension 1", "zeroline": False, "range": list(rx)},
        yaxis={"title": "dimension 2", "zeroline": False, "range": list(ry)},
        legend={"font": {"size": 10}},
    )
    return fig


def _color_codes(labels: list[str]) -> list[int]:
    """One number per row on the colour scale: its category's index when the colours are
    categories (`row_colors`), else its document number."""
    colors, categorical = row_colors(labels)
    if categorical:
        return [list(dict.fromkeys(colors)).index(c) for c in colors]
    return [int(c) for c in colors]


def _frame_scatter(y: np.ndarray, rx, ry, labels: list[str], codes: list[int]) -> go.Scatter:
    """One layer's rows, outliers moved to the edge of the fixed ranges."""
    y, _ = _clip(y, rx, ry)
    return go.Scatter(
        x=y[:, 0],
        y=y[:, 1],
        mode="markers",
        text=labels,
        hovertemplate="%{text}<extra></extra>",
        marker={"size": 8, "opacity": 0.85, "color": codes, "colorscale": "Turbo"},
    )


def _play_pause_menu() -> dict:
    """Play and pause buttons, left of the slider, not over its tick labels."""
    return {
        "type": "buttons",
        "direction": "left",
        "x": 0.0,
        "y": -0.16,
        "xanchor": "left",
        "yanchor": "top",
        "showactive": False,
        "buttons": [
            {
                "label": "▶ play",
                "method": "animate",
                "args": [None, {"frame": {"duration": 400, "redraw": True}, "fromcurrent": True}],
            },
            {
                "label": "❚❚ pause",
                "method": "animate",
                "args": [[None], {"mode": "immediate", "frame": {"duration": 0}}],
            },
        ],
    }


def _layer_slider(n_frames: int) -> dict:
    """A slider with one step per layer, jumping straight to that layer's frame."""
    steps = [
        {
            "label": str(i),
            "method": "animate",
            "args": [[str(i)], {"mode": "immediate", "frame": {"duration": 0, "redraw": True}}],
        }
        for i in range(n_frames)
    ]
    return {
        "active": 0,
        "currentvalue": {"prefix": "layer "},
        "x": 0.2,
        "len": 0.8,
        "y": -0.06,
        "yanchor": "top",
        "pad": {"t": 30},
        "steps": steps,
    }


def manifold_animation(frames: list[np.ndarray], labels: list[str], method: str) -> go.Figure:
    """All layers as animation frames with a play button and a layer slider; the axes are fixed
    across layers and cover the bulk of every layer's points (outliers at the edge)."""
    codes = _color_codes(labels)
    labels = list(labels)
    every = np.concatenate(frames)
    rx, ry = robust_range(every[:, 0]), robust_range(every[:, 1])
    fig = go.Figure(
        data=[_frame_scatter(frames[0], rx, ry, labels, codes)],
        frames=[
            go.Frame(data=[_frame_scatter(y, rx, ry, labels, codes)], name=str(i))
            for i, y in enumerate(frames)
        ],
    )
    fig.update_layout(
        title=centred_title(f"{PROJECTION_NAMES[method]} through the layers"),
        height=560,
        margin={"l": 40, "r": 10, "t": 40, "b": 110},
        xaxis={"range": list(rx), "title": "dimension 1"},
        yaxis={"range": list(ry), "title": "dimension 2"},
        updatemenus=[_play_pause_menu()],
        sliders=[_layer_slider(len(frames))],
    )
    return fig
