"""Figures of TransAct and healing: unit scores per layer, the score mass kept, the heal loss."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from mka_core.figures.common import centred_title


def heal_loss_figure(rep) -> go.Figure:
    """The training loss of every heal step, with a running mean when there are many steps."""
    losses = np.asarray(rep.losses, dtype=float)  # (steps,)
    steps = np.arange(1, len(losses) + 1)
    fig = go.Figure(
        go.Scatter(
            x=steps,
            y=losses,
            mode="lines+markers" if len(losses) <= 60 else "lines",
            name="loss per step",
            line={"color": "#adb5bd" if len(losses) >= 10 else "#4c6ef5"},
            hovertemplate="step %{x}: loss %{y:.3f}<extra></extra>",
        )
    )
    if len(losses) >= 10:
        w = max(3, len(losses) // 10)
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        fig.add_trace(
            go.Scatter(
                x=steps[w - 1 :],
                y=smooth,
                mode="lines",
                name=f"mean of {w} steps",
                line={"color": "#4c6ef5", "width": 3},
                hovertemplate="step %{x}: mean loss %{y:.3f}<extra></extra>",
            )
        )
    fig.update_layout(
        title=centred_title("Training loss while healing"),
        height=320,
        margin={"l": 50, "r": 10, "t": 40, "b": 45},
        xaxis={"title": "step", "rangemode": "tozero"},
        yaxis={"title": "loss (nats per token)"},
        legend={"orientation": "h", "y": 1.0, "yanchor": "bottom", "x": 1, "xanchor": "right"},
    )
    return fig


def _kept_share(scores: np.ndarray, index: list, kept: list) -> float:
    """Share of a layer's score sum that the kept units carry."""
    total = float(scores.sum())
    return float(scores[np.isin(index, kept)].sum()) / total if total > 0 else 0.0


def _layer_rows_axis(n_layers: int) -> dict:
    """The y axis of a per-layer heatmap: layer 0 on top, every layer labelled while they fit."""
    return {"title": "layer", "autorange": "reversed", "dtick": 1 if n_layers <= 16 else 2}


def _mlp_scores_figure(rep, layers: list[int]) -> go.Figure:
    """MLP neuron scores sorted in each layer, as a share of the layer's top score, with the cut."""
    n_layers = len(layers)
    mlp = np.asarray(rep.mlp_scores, dtype=float)  # (n_layers, neurons scored in the last pass)
    ranked = -np.sort(-mlp, axis=1)  # each layer's scores, largest first
    top = np.maximum(ranked[:, :1], 1e-12)
    keep = rep.new_intermediate_size
    fig = go.Figure(
        go.Heatmap(
            z=np.round(ranked / top, 3),
            x=np.arange(1, ranked.shape[1] + 1),
            y=layers,
            customdata=np.round(ranked, 3),
            colorscale="Viridis",
            zmin=0,
            zmax=1,
            colorbar={"title": {"text": "÷ layer max", "side": "right"}, "thickness": 12},
            hovertemplate="layer %{y}, rank %{x}: score %{customdata} (%{z:.2f} of the "
            "layer's top)<extra></extra>",
        )
    )
    fig.add_vline(x=keep + 0.5, line_color="#ff3c3c", line_width=2)
    fig.add_annotation(  # above the plot, where the heatmap's colours cannot hide it
        x=keep + 0.5,
        y=1.0,
        yref="paper",
        yanchor="bottom",
        text=f"cut: keep the top {keep}",
        showarrow=False,
        font={"color": "#e03131", "size": 12},
    )
    fig.update_layout(
        title=centred_title("MLP neuron scores, sorted in each layer", 14),
        height=max(320, 16 * n_layers + 130),
        margin={"l": 50, "r": 10, "t": 60, "b": 45},
        xaxis={"title": "neuron rank in its layer"},
        yaxis=_layer_rows_axis(n_layers),
    )
    return fig


def _head_score_grid(rep, layers: list[int]) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
    """Head scores on the grid of the original heads: scores as a share of the layer's top, the
    raw scores, and a ✓ on every kept head. Heads pruned before the last pass stay NaN."""
    n_heads = rep.original_n_heads
    z = np.full((len(layers), n_heads), np.nan)  # (n_layers, original heads)
    raw = np.full((len(layers), n_heads), np.nan)
    marks = [[""] * n_heads for _ in layers]
    for i in layers:
        s = np.asarray(rep.head_scores[i], dtype=float)
        raw[i, rep.head_scores_index[i]] = s
        z[i, rep.head_scores_index[i]] = s / max(float(s.max()), 1e-12)
        for h in rep.heads_kept[i]:
            marks[i][h] = "✓"
    return z, raw, marks


def _head_scores_figure(rep, layers: list[int]) -> go.Figure:
    """Query head scores per layer, kept heads marked, KV groups separated by white lines."""
    n_layers = len(layers)
    n_heads, n_kv = rep.original_n_heads, rep.original_n_kv_heads
    per_group = n_heads // n_kv
    z, raw, marks = _head_score_grid(rep, layers)
    fig = go.Figure(
        go.Heatmap(
            z=np.round(z, 3),
            x=list(range(n_heads)),
            y=layers,
            text=marks,
            texttemplate="%{text}",
            textfont={"color": "#212529", "size": 13},  # kept heads are the bright cells
            customdata=np.round(raw, 3),
            colorscale="Viridis",
            zmin=0,
            zmax=1,
            colorbar={"title": {"text": "÷ layer max", "side": "right"}, "thickness": 12},
            hovertemplate="layer %{y}, head %{x}: score %{customdata}<extra></extra>",
        )
    )
    for g in range(1, n_kv):  # KV group boundaries
        fig.add_vline(x=g * per_group - 0.5, line_color="white", line_width=3)
    fig.update_layout(
        title=centred_title(f"Query head scores (✓ kept; {n_kv} KV groups of {per_group})", 14),
        height=max(320, 16 * n_layers + 130),
        margin={"l": 50, "r": 10, "t": 60, "b": 45},
        xaxis={"title": "query head", "dtick": 1},
        yaxis=_layer_rows_axis(n_layers),
        plot_bgcolor="#e9ecef",  # heads pruned in earlier shots show as grey
    )
    return fig


def _score_mass_figure(rep, layers: list[int]) -> go.Figure:
    """Per layer, the share of the score that the kept units carry, against the share of units
    kept (dashed): the gap is what scoring bought over keeping units at random."""
    fig = go.Figure()
    for name, scores, index, kept, color in (
        ("MLP neurons", rep.mlp_scores, rep.mlp_scores_index, rep.mlp_kept, "#4c6ef5"),
        ("attention heads", rep.head_scores, rep.head_scores_index, rep.heads_kept, "#e8590c"),
    ):
        share = len(kept[0]) / max(len(index[0]), 1)  # of the units scored in the last pass
        kept_mass = [
            100 * _kept_share(np.asarray(scores[i], dtype=float), index[i], kept[i]) for i in layers
        ]
        fig.add_trace(
            go.Scatter(
                x=layers,
                y=kept_mass,
                mode="lines+markers",
                name=f"{name}: score kept",
                line={"color": color},
                hovertemplate=f"layer %{{x}}: the kept {name} carry %{{y:.1f}} % of the "
                "score<extra></extra>",
            )
        )
        fig.add_trace(
            go.Scatter(
                x=[layers[0], layers[-1]],
                y=[100 * share, 100 * share],
                mode="lines",
                name=f"{name}: share of units kept",
                line={"color": color, "dash": "dash", "width": 1},
                hoverinfo="skip",
            )
        )
    fig.update_layout(
        title=centred_title(
            "Score mass kept per layer in the last shot (dashed: share of units kept)", 14
        ),
        height=340,
        margin={"l": 50, "r": 10, "t": 40, "b": 45},
        xaxis={"title": "layer", "dtick": 1 if len(layers) <= 32 else 2},
        yaxis={"title": "% of the layer's score", "range": [0, 105]},
        legend={"orientation": "h", "y": -0.25, "yanchor": "top"},
    )
    return fig


def transact_figures(rep) -> tuple[go.Figure, go.Figure, go.Figure]:
    """Three views of the last scoring pass of a prune: MLP neuron scores sorted per layer with
    the cut, head scores per layer with the kept heads marked, and the score mass kept per layer.

    The last pass scores the units that survived the earlier shots; units pruned before it have
    no score there."""
    layers = list(range(len(rep.mlp_scores)))
    return (
        _mlp_scores_figure(rep, layers),
        _head_scores_figure(rep, layers),
        _score_mass_figure(rep, layers),
    )
