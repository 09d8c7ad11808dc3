"""Figures of the similarity analysis: heatmaps of every measure, Block Influence, and how far
each measure can be trusted (spread maps) and what it predicts (proxy against measured damage)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from mka_core.figures.common import centred_title

MEASURE_NAMES = {
    "npib": "NPIB (MKA)",
    "cosine": "Cosine similarity",
    "angular": "Angular distance",
    "cka": "Linear CKA",
}


def _scale_for(measure: str, m: np.ndarray) -> dict:
    if measure == "angular":
        return {"colorscale": "Viridis_r", "zmin": 0.0, "zmax": max(0.5, float(np.nanmax(m)))}
    if measure == "cosine":
        return {"colorscale": "Viridis", "zmin": min(0.0, float(np.nanmin(m))), "zmax": 1.0}
    return {"colorscale": "Viridis", "zmin": 0.0, "zmax": 1.0}


def heatmap_figure(measure: str, m: np.ndarray, layers: list[int], pair=None) -> go.Figure:
    """A square heatmap of one (L, L) measure, "layer i vs j: value" on hover.

    Plotly cannot select cells of a heatmap, so a grid of invisible markers lies over the cells:
    clicking a cell selects its marker, which Streamlit reports as the chosen layer pair."""
    n = len(layers)
    tick = max(1, -(-n // 16))  # at most ~16 labelled layers per axis
    fig = go.Figure()
    fig.add_trace(
        go.Heatmap(
            z=m,
            x=layers,
            y=layers,
            hoverinfo="skip",
            colorbar={"thickness": 12, "len": 0.9},
            **_scale_for(measure, m),
        )
    )
    xs, ys = np.meshgrid(layers, layers)  # row = y, column = x
    fig.add_trace(
        go.Scatter(
            x=xs.ravel(),
            y=ys.ravel(),
            mode="markers",
            marker={
                "size": max(5, min(28, 340 // max(n, 1))),
                "color": "rgba(0,0,0,0)",
                "symbol": "square",
            },
            customdata=np.asarray(m).ravel(),
            hovertemplate="layer %{y} vs %{x}: %{customdata:.3f}<extra></extra>",
            selected={"marker": {"color": "rgba(255,60,60,0.9)"}},
            unselected={"marker": {"opacity": 0}},
            showlegend=False,
        )
    )
    if pair is not None:
        a, b = pair
        for x, y in ((a, b), (b, a)):
            fig.add_shape(
                type="rect",
                x0=x - 0.5,
                x1=x + 0.5,
                y0=y - 0.5,
                y1=y + 0.5,
                line={"color": "#ff3c3c", "width": 2},
            )
    fig.update_layout(
        title=centred_title(MEASURE_NAMES[measure]),
        height=430,
        margin={"l": 50, "r": 10, "t": 40, "b": 45},
        xaxis={"title": "layer", "range": [-0.5, n - 0.5], "constrain": "domain", "dtick": tick},
        yaxis={
            "title": "layer",
            "dtick": tick,
            "range": [n - 0.5, -0.5],  # layer 0 at the top, like a matrix
            "scaleanchor": "x",
            "constrain": "domain",
        },
        dragmode=False,
        hovermode="closest",
    )
    return fig


def bi_figure(bi: np.ndarray, layers: list[int], pair=None) -> go.Figure:
    """Block Influence per layer; the lowest fifth (ShortGPT's first candidates) in orange. When
    one layer (usually layer 0) dwarfs the others, the axis is logarithmic, said in its title."""
    bi = np.asarray(bi, dtype=float)
    order = np.argsort(bi)
    colors = ["#4c6ef5"] * len(layers)
    for i in order[: max(1, len(layers) // 5)]:
        colors[i] = "#fab005"
    if pair is not None:
        for i in pair:
            if 0 <= i < len(colors):
                colors[i] = "#ff3c3c"
    positive = bi[bi > 0]
    log = bool(positive.size and bi.max() > 10 * np.median(positive) and (bi > 0).all())
    fig = go.Figure(
        go.Bar(
            x=layers,
            y=bi,
            marker_color=colors,
            hovertemplate="layer %{x}: BI %{y:.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        height=300,
        margin={"l": 50, "r": 10, "t": 30, "b": 45},
        xaxis={"title": "layer", "dtick": 1 if len(layers) <= 32 else None},
        yaxis={
            "title": "Block Influence" + (" (log scale)" if log else ""),
            "type": "log" if log else "linear",
        },
        title=centred_title(
            (
                "Block Influence per layer (low = the block changes little)"
                + (" · log scale: one layer is >10× the median" if log else "")
            ),
            14,
        ),
    )
    return fig


def spread_figure(measure: str, spread: np.ndarray, layers: list[int]) -> go.Figure:
    """How much each cell of a measure moves between bootstrap resamples (standard deviation)."""
    fig = go.Figure(
        go.Heatmap(
            z=spread,
            x=layers,
            y=layers,
            colorscale="Reds",
            zmin=0.0,
            colorbar={"thickness": 12, "len": 0.9, "title": {"text": "std", "side": "right"}},
            hovertemplate="layer %{y} vs %{x}: std %{z:.3f}<extra></extra>",
        )
    )
    n = len(layers)
    tick = max(1, -(-n // 16))
    fig.update_layout(
        title=centred_title(f"{MEASURE_NAMES.get(measure, measure)}: spread over resamples"),
        height=430,
        margin={"l": 50, "r": 10, "t": 40, "b": 45},
        xaxis={"title": "layer", "dtick": tick, "constrain": "domain"},
        yaxis={"title": "layer", "dtick": tick, "autorange": "reversed", "scaleanchor": "x"},
    )
    return fig


def importance_figure(
    drop: list[float], proxy: np.ndarray | None, layers: list[int], name: str
) -> go.Figure:
    """The measured damage of dropping each layer (bars, log scale) beside a measure's prediction
    (line, its own axis), both ranked the same way when the measure is a good proxy."""
    drop = np.asarray(drop, dtype=float)
    fig = go.Figure(
        go.Bar(
            x=layers,
            y=np.maximum(drop, 1e-4),
            name="measured: loss increase when dropped (nats)",
            marker_color="#e8590c",
            customdata=drop,
            hovertemplate="layer %{x}: +%{customdata:.3f} nats<extra></extra>",
        )
    )
    if proxy is not None:
        fig.add_trace(
            go.Scatter(
                x=layers[1:],
                y=proxy,
                name=f"predicted by {name}",
                mode="lines+markers",
                yaxis="y2",
                line={"color": "#3b5bdb"},
                hovertemplate="layer %{x}: %{y:.4f}<extra></extra>",
            )
        )
    fig.update_layout(
        height=340,
        margin={"l": 50, "r": 50, "t": 40, "b": 45},
        title=centred_title("Real damage per layer against the prediction", 14),
        xaxis={"title": "layer", "dtick": 1 if len(layers) <= 32 else None},
        yaxis={"title": "loss increase (nats, log)", "type": "log"},
        yaxis2={"title": name, "overlaying": "y", "side": "right", "showgrid": False},
        legend={"orientation": "h", "y": -0.25},
    )
    return fig
