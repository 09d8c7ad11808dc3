"""The report's figures (matplotlib PNGs and their plotly twins): quality, analysis cost, app
responsiveness."""

from __future__ import annotations

import statistics
from collections import defaultdict

from .render_common import (
    ANALYSIS_STAGES,
    STAGE_NAMES,
    STAGE_ORDER,
    Figures,
    _fit_exponent,
    _label,
    _nan,
    _sort_key,
)


def _plain_log_ticks(ax) -> None:
    """Tick labels like 20 and 30 on a log axis, not 2×10¹."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    lo, hi = ax.get_ylim()
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(fmt)
    if hi / max(lo, 1e-300) < 100:  # a narrow range: label the minor ticks too
        ax.yaxis.set_minor_formatter(fmt)
        ax.tick_params(axis="y", which="minor", labelsize=7)
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())


def _quality_figures(figs: Figures, rows: list[dict], budgets: list[int], fixed_alpha) -> None:
    orig = next((r for r in rows if r["method"] == "original"), None)
    series = defaultdict(dict)  # label -> {(n, healed): row}
    for r in rows:
        if r["method"] == "original" or r.get("perplexity") is None:
            continue
        series[_label(r, fixed_alpha)][(r["layers_removed"], bool(r["healed"]))] = r
    labels = sorted(series, key=lambda lab: _sort_key(next(iter(series[lab].values()))))
    if figs.plt is not None:
        cmap = figs.plt.get_cmap("tab10")
        colors = {lab: cmap(i % 10) for i, lab in enumerate(labels)}
        # left: every row; right: the same, zoomed on perplexities up to 10x the original's
        fig, axes = figs.new(ncols=2, width=12, height=5)
        for zoom, ax in enumerate(axes):
            for lab in labels:
                pts = sorted((n, r["perplexity"]) for (n, h), r in series[lab].items() if not h)
                if orig is not None:
                    pts = [(0, orig["perplexity"])] + pts
                ax.plot(*zip(*pts), marker="o", label=lab, color=colors[lab])
                hp = sorted((n, r["perplexity"]) for (n, h), r in series[lab].items() if h)
                if hp:
                    ax.scatter(*zip(*hp), marker="*", s=130, color=colors[lab], edgecolor="k")
            ax.set_yscale("log")
            if zoom and orig is not None:
                ax.set_ylim(orig["perplexity"] * 0.9, orig["perplexity"] * 10)
                ax.set_title("zoom: up to 10× the original's perplexity", fontsize=9)
            else:
                ax.set_title("all rows", fontsize=9)
            _plain_log_ticks(ax)
            ax.set_xticks([0] + budgets)
            ax.set_xlabel(f"layers removed (of {orig['n_layers'] if orig else '?'})")
            ax.set_ylabel("evaluation perplexity (log scale)")
            ax.grid(alpha=0.3, which="both")
        axes[1].scatter([], [], marker="*", s=130, color="white", edgecolor="k", label="healed")
        axes[1].legend(fontsize=7.5, ncol=2, loc="upper left")
        figs.save(fig, "quality_perplexity", "Perplexity by method and budget (lower is better)")

        fig, (a1, a2) = figs.new(ncols=2, width=11, height=4.5)
        for lab in labels:
            pts = sorted((n, r) for (n, h), r in series[lab].items() if not h)
            xs = [n for n, _ in pts]
            a1.plot(xs, [_nan(r["kl"]) for _, r in pts], marker="o", label=lab, color=colors[lab])
            a2.plot(xs, [_nan(r["top1"]) for _, r in pts], marker="o", label=lab, color=colors[lab])
        a1.set_yscale("log")
        a1.set_ylabel("KL(original ‖ compressed), nats/token")
        a2.set_ylabel("top-1 agreement with the original")
        for a in (a1, a2):
            a.set_xticks(budgets)
            a.set_xlabel("layers removed")
            a.grid(alpha=0.3)
        a2.legend(fontsize=7, ncol=1)
        figs.save(fig, "quality_fidelity", "Fidelity to the original (no labels needed)")

        fig, (a1, a2) = figs.new(ncols=2, width=11, height=4.5)
        for lab in labels:
            pts = [r for (n, h), r in series[lab].items() if not h]
            a1.scatter(
                [r["params"] / 1e6 for r in pts],
                [r["perplexity"] for r in pts],
                label=lab,
                color=colors[lab],
            )
            pts = sorted(pts, key=lambda r: r["layers_removed"])
            a2.plot(
                [r["layers_removed"] for r in pts],
                [_nan(r["decode_tps"]) for r in pts],
                marker="o",
                label=lab,
                color=colors[lab],
            )
        if orig is not None:
            a1.scatter([orig["params"] / 1e6], [orig["perplexity"]], marker="X", s=80, color="k")
            if orig.get("decode_tps"):
                a2.axhline(orig["decode_tps"], color="k", ls="--", lw=1, label="original")
        a1.set_yscale("log")
        _plain_log_ticks(a1)
        a1.set_xlabel("parameters (millions)")
        a1.set_ylabel("perplexity (log)")
        a2.set_xlabel("layers removed")
        a2.set_ylabel("decode tokens/s (batch 1, greedy)")
        a2.set_xticks(budgets)
        for a in (a1, a2):
            a.grid(alpha=0.3)
        a2.legend(fontsize=7)
        figs.save(fig, "quality_size_speed", "What it saves: parameters and decode speed")

    # the interactive figure is the product's own (`mka_core.figures.compare_figure`): the same
    # one `python -m mka_core compare` writes and the app's Compare page shows
    try:
        from mka_core.figures.compare import compare_figure
    except ImportError:
        return
    cmp_rows = [
        {**r, "planner": r["method"], "option": r.get("alpha_rule")}
        for r in rows
        if r.get("perplexity") is not None
    ]
    figs.add_html(compare_figure(cmp_rows), "Perplexity, KL and top-1 by method and budget")


def _cost_figures(figs: Figures, cost: list[dict], layers: list[dict]) -> dict:
    by_stage = defaultdict(dict)
    for r in cost:
        if r["n_samples"]:
            by_stage[r["stage"]][r["n_samples"]] = r
    ns = sorted({r["n_samples"] for r in cost if r["n_samples"]})
    fits = {  # planning and applying do not depend on N: no fit
        s: _fit_exponent(ns, [by_stage[s].get(n, {}).get("seconds") for n in ns])
        for s in by_stage
        if s in ANALYSIS_STAGES
    }
    lby = defaultdict(dict)
    for r in layers:
        lby[r["stage"]][r["n_layers"]] = r
    ls = sorted({r["n_layers"] for r in layers})
    lfits = {s: _fit_exponent(ls, [lby[s].get(n, {}).get("seconds") for n in ls]) for s in lby}
    stages = [s for s in STAGE_ORDER if s in by_stage]
    if figs.plt is not None and ns:
        fig, (a1, a2) = figs.new(ncols=2, width=11, height=4.5)
        bottom = [0.0] * len(ns)
        for s in stages:
            vals = [by_stage[s].get(n, {}).get("seconds") or 0.0 for n in ns]
            a1.bar([str(n) for n in ns], vals, bottom=bottom, label=STAGE_NAMES.get(s, s))
            bottom = [b + v for b, v in zip(bottom, vals)]
            a2.plot(ns, [v if v > 0 else None for v in vals], marker="o", label=s)
        a1.set_xlabel("calibration samples N")
        a1.set_ylabel("seconds")
        a1.legend(fontsize=7)
        a2.set_xscale("log", base=2)
        a2.set_yscale("log")
        a2.set_xlabel("calibration samples N (log)")
        a2.set_ylabel("seconds (log)")
        a2.legend(
            [f"{s} ∝ N^{fits[s]:.2f}" if fits.get(s) is not None else s for s in stages],
            fontsize=7,
        )
        for a in (a1, a2):
            a.grid(alpha=0.3)
        figs.save(fig, "cost_stages", "Analysis cost by stage and number of samples")

        fig, (a1, a2) = figs.new(ncols=2, width=11, height=4.5)
        for s in [s for s in STAGE_ORDER if s in lby]:
            a1.plot(ls, [lby[s].get(n, {}).get("seconds") for n in ls], marker="o", label=s)
        a1.set_xlabel("number of layers L")
        a1.set_ylabel("seconds")
        a1.set_yscale("log")
        a1.legend(
            [
                f"{s} ∝ L^{lfits[s]:.2f}" if lfits.get(s) is not None else s
                for s in STAGE_ORDER
                if s in lby
            ],
            fontsize=7,
        )
        for s in stages:
            a2.plot(ns, [by_stage[s].get(n, {}).get("added_mb") for n in ns], marker="o", label=s)
        a2.set_xscale("log", base=2)
        a2.set_xlabel("calibration samples N (log)")
        a2.set_ylabel("memory added during the stage (peak RSS − start), MB")
        a2.legend(fontsize=7)
        for a in (a1, a2):
            a.grid(alpha=0.3)
        figs.save(fig, "cost_layers_memory", "Growth with depth; peak memory by stage")
    try:
        import plotly.graph_objects as go
    except ImportError:
        return {"fits": fits, "layer_fits": lfits}
    if ns:
        fig = go.Figure()
        for s in stages:
            fig.add_trace(
                go.Bar(
                    x=[str(n) for n in ns],
                    y=[by_stage[s].get(n, {}).get("seconds") for n in ns],
                    name=STAGE_NAMES.get(s, s),
                )
            )
        fig.update_layout(barmode="stack")
        fig.update_xaxes(title="calibration samples N")
        fig.update_yaxes(title="seconds")
        figs.add_html(fig, "Analysis cost by stage")
    return {"fits": fits, "layer_fits": lfits}


def _app_figures(figs: Figures, app: list[dict]) -> list[tuple[str, float, int]]:
    groups = defaultdict(list)
    for r in app:
        key = f"{r['action']} · {r['page']}"
        if r["action"] == "switch to" and r["repeat"] == 0:
            key += " (first visit)"
        groups[key].append(r["seconds"])
    summary = [(k, statistics.median(v), len(v)) for k, v in groups.items()]
    if figs.plt is not None and summary:
        fig, (ax,) = figs.new(width=8.5, height=0.32 * len(summary) + 1.5)
        ax.barh([k for k, _, _ in summary], [m for _, m, _ in summary], color="tab:blue")
        for i, (_, m, _) in enumerate(summary):
            ax.text(m, i, f" {m:.2f} s", va="center", fontsize=7)
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_xlabel("seconds (median over repeats, log scale), server-side script time")
        ax.tick_params(axis="y", labelsize=7.5)
        ax.grid(alpha=0.3, axis="x")
        figs.save(fig, "app_timing", "App responsiveness (streamlit AppTest)")
    try:
        import plotly.graph_objects as go

        if summary:
            fig = go.Figure(
                go.Bar(
                    y=[k for k, _, _ in summary],
                    x=[m for _, m, _ in summary],
                    orientation="h",
                )
            )
            fig.update_yaxes(autorange="reversed")
            fig.update_xaxes(title="seconds (median)")
            figs.add_html(fig, "App responsiveness")
    except ImportError:
        pass
    return summary


# ---------------------------------------------------------------------------------------------
# the written reading, from the numbers
