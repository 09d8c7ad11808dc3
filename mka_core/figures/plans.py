"""The plan as a layer diagram: which original layers flow into which output layer."""

from __future__ import annotations

import plotly.graph_objects as go

from mka_core.compression.compensate import is_cut, spans


def plan_figure(plan) -> go.Figure:
    """Which original layers flow into which output layer, line width ∝ weight."""
    n_in, n_out = plan.model.num_layers, plan.n_layers_out
    used = {i for group in plan.layers for i, _ in group}
    scale = (n_in - 1) / max(n_out - 1, 1)  # spread the output column over the same height
    fig = go.Figure()
    for g, group in enumerate(plan.layers):
        merged = len(group) > 1
        for i, w in group:
            fig.add_trace(
                go.Scatter(
                    x=[0, 1],
                    y=[i, g * scale],
                    mode="lines",
                    line={"width": 1 + 7 * abs(w), "color": "#e8590c" if merged else "#adb5bd"},
                    hovertemplate=f"layer {i} → output {g}: weight {w:.3f}<extra></extra>",
                    showlegend=False,
                )
            )
    kept = [i for i in range(n_in) if i in used]
    dropped = [i for i in range(n_in) if i not in used]
    fig.add_trace(
        go.Scatter(
            x=[0] * len(kept),
            y=kept,
            mode="markers+text",
            text=[str(i) for i in kept],
            textposition="middle left",
            marker={"size": 11, "color": "#4c6ef5"},
            name="original layer",
            hovertemplate="original layer %{y}<extra></extra>",
        )
    )
    if dropped:
        fig.add_trace(
            go.Scatter(
                x=[0] * len(dropped),
                y=dropped,
                mode="markers+text",
                text=[f"{i} dropped" for i in dropped],
                textposition="middle left",
                marker={"size": 12, "color": "#fa5252", "symbol": "x"},
                name="dropped",
                hovertemplate="layer %{y}: dropped<extra></extra>",
            )
        )
    merged_out = [g for g, group in enumerate(plan.layers) if len(group) > 1]
    flat = plan.refine.merge == "flatten"
    comp = plan.refine.compensation
    fig.add_trace(
        go.Scatter(
            x=[1] * n_out,
            y=[g * scale for g in range(n_out)],
            mode="markers+text",
            text=[str(g) for g in range(n_out)],
            textposition="middle right",
            marker={
                "size": 11,
                "color": ["#e8590c" if g in merged_out else "#37b24d" for g in range(n_out)],
            },
            name=f"output layer (orange: merged{', flattened' if flat else ''})",
            customdata=[
                _made_of(group, flat, comp if cut else "none")
                for group, cut in zip(plan.layers, _cuts(plan), strict=True)
            ],
            hovertemplate="output layer %{text} = %{customdata}<extra></extra>",
        )
    )
    fig.update_layout(
        height=max(320, 22 * n_in + 80),
        margin={"l": 20, "r": 20, "t": 40, "b": 20},
        xaxis={
            "tickvals": [0, 1],
            "ticktext": [f"original ({n_in} layers)", f"compressed ({n_out} layers)"],
            "range": [-0.45, 1.3],
            "side": "top",
            "showgrid": False,
            "zeroline": False,
        },
        yaxis={"autorange": "reversed", "visible": False},
        legend={"orientation": "h", "y": -0.02, "yanchor": "top"},
        plot_bgcolor="white",
    )
    return fig


def _made_of(group, flat: bool, comp: str) -> str:
    """What an output layer is made of, for its hover text."""
    if flat and len(group) > 1:
        text = "L" + " ∥ L".join(str(i) for i, _ in group) + " flattened, pruned back"
    else:
        text = " + ".join(f"{w:.2f}·L{i}" for i, w in group)
    return text + (f"; {comp} compensation of the cut" if comp != "none" else "")


def _cuts(plan) -> list[bool]:
    """Whether each output layer stands for more than its one source (a compensated cut)."""
    _, ends = spans(plan.layers, plan.model.num_layers)
    return [is_cut(g, e) for g, e in zip(plan.layers, ends, strict=True)]
