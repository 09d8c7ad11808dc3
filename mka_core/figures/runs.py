"""Figures of compression runs: before/after, the history of a session, and merging against
pruning at equal parameters."""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mka_core.figures.common import centred_title

CAP = 1000  # perplexities beyond this multiple of the original's are drawn at the chart's edge


def history_figure(df: pd.DataFrame) -> go.Figure:
    """Perplexity against layers removed, one series per planner (and kind), original at 0."""
    fig = go.Figure()
    for name, part in df.groupby(
        df["kind"].astype(str) + ": " + df["planner"].astype(str), sort=True
    ):
        part = part.sort_values("layers_removed")
        # every series starts at the original model (0 layers removed)
        xs = [0, *part["layers_removed"]]
        ys = [float(part["perplexity_original"].iloc[0]), *part["perplexity"]]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines+markers",
                name=name.replace("merge: ", ""),
                text=["original", *_made(part, part["label"])],
                hovertemplate="%{text}<br>%{x} removed: perplexity %{y:.2f}<extra></extra>",
            )
        )
    base = df["perplexity_original"].iloc[-1]
    fig.add_hline(y=base, line_dash="dot", line_color="#868e96", annotation_text="original")
    fig.update_layout(
        height=360,
        margin={"l": 50, "r": 10, "t": 30, "b": 45},
        xaxis={"title": "layers removed", "dtick": 1},
        yaxis={"title": "perplexity"},
        legend={"title": "planner"},
    )
    return fig


def _made(part: pd.DataFrame, labels) -> list[str]:
    """Labels with what produced each result (data, windows, dtype, versions) below."""
    if "provenance" not in part:
        return list(labels)
    return [
        f"{lab}<br>{p}" if isinstance(p, str) else lab for lab, p in zip(labels, part["provenance"])
    ]


def before_after_figure(run) -> go.Figure:
    """Compressed against the original, on two scales: the perplexity as a multiple of the
    original's (log once it passes 10×: a collapse would hide everything else), and size and
    speed as % of the original."""

    o, c = run.original, run.compressed
    items = [
        ("parameters", o.params, c.params),
        ("size (MB)", o.bytes, c.bytes),
        ("prefill tok/s", o.prefill_tps, c.prefill_tps),
        ("decode tok/s", o.decode_tps, c.decode_tps),
    ]
    items = [(n, a, b) for n, a, b in items if a and b is not None][::-1]  # top to bottom
    ratio = c.perplexity / o.perplexity if o.perplexity and c.perplexity else None
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.35, 0.65],
        horizontal_spacing=0.18,
        subplot_titles=("perplexity, × original", "size and speed, % of original"),
    )
    if ratio is not None:
        fig.add_trace(
            go.Bar(
                y=["perplexity"],
                x=[ratio],
                orientation="h",
                text=[f"{ratio:.2f}×"],
                textposition="outside",
                cliponaxis=False,
                marker_color="#e8590c",
                hovertemplate="perplexity %{x:.3f}× the original's<extra></extra>",
            ),
            row=1,
            col=1,
        )
        log = ratio > 10
        fig.update_xaxes(
            type="log" if log else "linear",
            range=[0, max(1.0, ratio) * 1.3] if not log else None,
            row=1,
            col=1,
        )
        fig.add_vline(x=1, line_dash="dot", line_color="#868e96", row=1, col=1)
    colors = {"parameters": "#4c6ef5", "size (MB)": "#4c6ef5"}
    if items:
        fig.add_trace(
            go.Bar(
                y=[n for n, _, _ in items],
                x=[100 * b / a for _, a, b in items],
                orientation="h",
                text=[f"{100 * b / a:.0f} %" for _, a, b in items],
                textposition="outside",
                cliponaxis=False,
                marker_color=[colors.get(n, "#37b24d") for n, _, _ in items],
                hovertemplate="%{y}: %{x:.1f} % of the original<extra></extra>",
            ),
            row=1,
            col=2,
        )
        top = max([100 * b / a for _, a, b in items] + [100])
        fig.update_xaxes(range=[0, top * 1.25], ticksuffix=" %", row=1, col=2)
        fig.add_vline(x=100, line_dash="dot", line_color="#868e96", row=1, col=2)
    fig.update_layout(
        height=300,
        showlegend=False,
        margin={"l": 90, "r": 40, "t": 40, "b": 40},
    )
    fig.update_annotations(font={"size": 13})
    return fig


def _series_name(kind: str, planner: str) -> str:
    """The comparison chart's series of a run: the method, whether or not it was healed."""
    kind = kind.replace("+heal", "")
    if kind == "merge":
        return f"merge: {planner}"
    if kind == "transact":
        return "TransAct"
    if kind == "merge+transact":
        return f"merge ({planner}) + TransAct"
    return f"{kind}: {planner}"


SERIES_COLORS = ("#4c6ef5", "#e8590c", "#37b24d", "#ae3ec9", "#1098ad", "#f59f00", "#d6336c")
_RUN_HOVER = "%{text}<br>%{x:.1f} % of the parameters removed: perplexity %{y:.2f}<extra></extra>"


def _run_names(runs: pd.DataFrame) -> list[str]:
    """'run N: label' for each row, the hover text of a point."""
    names = [f"run {r}: {lab}" for r, lab in zip(runs["run"], runs["label"])]
    if "provenance" not in runs:
        return names
    made = ["<br>" + (p if isinstance(p, str) else "") for p in runs["provenance"]]
    return [n + m for n, m in zip(names, made)]


def _unhealed_series(plain: pd.DataFrame, name: str, color: str) -> go.Scatter:
    """A method's runs that were not healed, as a line starting at the original (0 % removed)."""
    return go.Scatter(
        x=[0.0, *plain["params_removed_pct"]],
        y=[float(plain["perplexity_original"].iloc[0]), *plain["perplexity"]],
        mode="lines+markers",
        name=name,
        legendgroup=name,
        line={"color": color},
        marker={"size": 9},
        text=["original", *_run_names(plain)],
        hovertemplate=_RUN_HOVER,
    )


def _add_healed_runs(
    fig: go.Figure, df: pd.DataFrame, cured: pd.DataFrame, name: str, color: str
) -> None:
    """A method's healed runs as stars, each joined by a dotted line to the run it healed (when
    that run is in `df`)."""
    for _, row in cured.iterrows():
        src = df[df["run"] == row.get("healed_from")] if "healed_from" in df else df.iloc[:0]
        if not src.empty:
            fig.add_trace(
                go.Scatter(
                    x=[float(src["params_removed_pct"].iloc[0]), row["params_removed_pct"]],
                    y=[float(src["perplexity"].iloc[0]), row["perplexity"]],
                    mode="lines",
                    line={"color": color, "dash": "dot"},
                    hoverinfo="skip",
                    showlegend=False,
                    legendgroup=name,
                )
            )
    fig.add_trace(
        go.Scatter(
            x=cured["params_removed_pct"],
            y=cured["perplexity"],
            mode="markers",
            name=f"{name}, healed",
            legendgroup=name,
            marker={"size": 15, "symbol": "star", "color": color, "line": {"width": 1}},
            text=_run_names(cured),
            hovertemplate=_RUN_HOVER,
        )
    )


def _off_chart_markers(df: pd.DataFrame, cap: float) -> go.Scatter:
    """Runs whose perplexity passes `cap`, drawn at the chart's top edge, their value on hover."""
    over = df[df["perplexity"].astype(float) > cap]
    return go.Scatter(
        x=over["params_removed_pct"],
        y=[cap] * len(over),
        mode="markers",
        name=f"beyond {CAP:g}× the original",
        marker={"symbol": "triangle-up", "size": 13, "color": "#fa5252"},
        text=_run_names(over),
        customdata=over["perplexity"],
        hovertemplate="%{text}<br>perplexity %{customdata:.3g} (off the chart)<extra></extra>",
    )


def _perplexity_axis(ppl: pd.Series, cap: float) -> dict:
    """The y axis for perplexities `ppl`: log scale when they span more than 20×, since a
    collapse would flatten the rest; the range stops at `cap`."""
    log_y = bool(ppl.min() > 0 and ppl.max() / ppl.min() > 20)
    top = min(float(ppl.max()), cap)
    return {
        "title": "perplexity" + (" (log scale)" if log_y else ""),
        "type": "log" if log_y else "linear",
        "range": (
            [math.log10(float(ppl.min()) / 1.3), math.log10(top * 1.5)] if log_y else [0, top * 1.1]
        ),
        "exponentformat": "power",
    }


def comparison_figure(df: pd.DataFrame) -> go.Figure:
    """Perplexity against parameters removed (%): layer merging and intra-module pruning on one
    axis, so runs of equal size can be compared. One series per method (each starts at the
    original model, 0 % removed); healed runs are stars joined to the run they healed."""
    fig = go.Figure()
    df = df.copy()
    df["series"] = [_series_name(str(k), str(p)) for k, p in zip(df["kind"], df["planner"])]
    healed = df["healed"].astype(bool) if "healed" in df else pd.Series(False, index=df.index)
    for i, (name, part) in enumerate(df.groupby("series", sort=True)):
        color = SERIES_COLORS[i % len(SERIES_COLORS)]
        plain = part[~healed[part.index]].sort_values("params_removed_pct")
        if not plain.empty:
            fig.add_trace(_unhealed_series(plain, name, color))
        cured = part[healed[part.index]]
        if not cured.empty:
            _add_healed_runs(fig, df, cured, name, color)
    base = float(df["perplexity_original"].iloc[-1])
    fig.add_hline(y=base, line_dash="dot", line_color="#868e96", annotation_text="original")
    ppl = pd.concat([df["perplexity"], df["perplexity_original"]]).astype(float)
    cap = CAP * base
    if float(ppl.max()) > cap:  # a wrecked model
        fig.add_trace(_off_chart_markers(df, cap))
    fig.update_layout(
        title=centred_title("Perplexity against parameters removed (stars: healed)", 14),
        height=400,
        margin={"l": 60, "r": 10, "t": 40, "b": 45},
        xaxis={"title": "parameters removed (%)", "rangemode": "tozero", "ticksuffix": " %"},
        yaxis=_perplexity_axis(ppl, cap),
        legend={"title": "method"},
        showlegend=True,  # name the method even when there is one series
    )
    return fig
