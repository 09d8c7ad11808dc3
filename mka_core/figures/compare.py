"""Figures: plain functions from results to plotly figures, with no Streamlit, shared by the app,
the command line and the benchmark."""

from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

PALETTE = {
    "mka": "#3b5bdb",
    "mka-loss": "#1c7ed6",
    "mka-tail": "#748ffc",
    "shortgpt": "#e8590c",
    "angular": "#f08c00",
    "laco": "#2b8a3e",
    "sleb": "#c2255c",
    "transact": "#7048e8",
    "original": "#495057",
}


def _color(planner: str) -> str:
    return PALETTE.get(planner, "#868e96")


def compare_figure(rows: list[dict]) -> go.Figure:
    """Perplexity (log scale), KL and top-1 agreement against the share of parameters removed,
    one line per config series (planner and option), healed rows dashed, quantized ones dotted
    (the original quantized alone is a point at 0 %); TransAct sits at the
    parameters of the layer-removed rows of its budget."""
    fig = make_subplots(
        rows=1,
        cols=3,
        subplot_titles=("perplexity (log)", "KL to the original (nats)", "top-1 agreement"),
        horizontal_spacing=0.08,
    )
    series: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("error") or r.get("perplexity") is None:
            continue
        key = (r.get("planner"), r.get("option"), bool(r.get("healed")), r.get("quant"))
        series.setdefault(key, []).append(r)
    orig = next((r for r in rows if r.get("planner") == "original" and not r.get("quant")), None)
    for (planner, option, healed, quant), rs in series.items():
        if planner == "original" and not quant:
            continue
        rs = sorted(rs, key=lambda r: r.get("params_removed_pct") or 0)
        x = [r.get("params_removed_pct") for r in rs]
        name = f"{planner}{':' + option if option else ''}{' + heal' if healed else ''}"
        name += f" @{quant}" if quant else ""
        dash = "dash" if healed else "dot" if quant else "solid"
        for col, key in ((1, "perplexity"), (2, "kl"), (3, "top1")):
            y = [r.get(key) for r in rs]
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=y,
                    mode="lines+markers",
                    name=name,
                    legendgroup=name,
                    showlegend=col == 1,
                    line={"color": _color(planner), "dash": dash},
                    hovertemplate=f"{name}<br>%{{x:.1f}} % of parameters removed<br>"
                    f"{key} %{{y:.4g}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
    if orig is not None and _finite(orig.get("perplexity")):
        fig.add_hline(
            y=orig["perplexity"],
            line={"color": _color("original"), "dash": "dot"},
            annotation_text="original",
            row=1,
            col=1,
        )
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_yaxes(range=[0, 1], row=1, col=3)
    fig.update_xaxes(title_text="parameters removed (%)")
    fig.update_layout(
        height=420,
        margin={"l": 40, "r": 10, "t": 40, "b": 40},
        legend={"orientation": "h", "y": -0.25},
    )
    return fig


def _finite(x) -> bool:
    return isinstance(x, float | int) and math.isfinite(x)
