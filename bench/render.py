"""Regenerate BENCHMARKS.md and its figures from the result files alone:
`python -m bench.render [--out bench/results] [--md BENCHMARKS.md]`.

Every number in the report, the written reading included, is computed here from quality.csv,
cost.csv, cost_layers.csv, app.csv and machine.json, so text and files cannot disagree. Figures:
PNG (matplotlib) next to the results in figures/, and one self-contained interactive HTML
(plotly, with plotly.js inlined: it works offline) as figures.html.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from .common import COMMAND, DEFAULT_OUT, REPO, machine_line, read_csv, read_json, write_atomic
from .render_scale import dtype_section, scale_section
from .render_truth import method_section, truth_section

STAGE_ORDER = ("capture", "diffusion", "npib", "other_measures", "plan", "apply")
ANALYSIS_STAGES = ("capture", "diffusion", "npib", "other_measures")
STAGE_NAMES = {
    "load_cold": "load (cold: empty cache; the GGUF is dequantised and cached)",
    "load_cached": "load (cached conversion)",
    "capture": "capture (forward passes)",
    "diffusion": "diffusion maps",
    "npib": "NPIB (k-means + mutual information)",
    "other_measures": "cosine, angular, CKA, Block Influence",
    "plan": "planning (mka, α = similarity)",
    "apply": "applying the plan",
    "evaluate": "evaluating (original vs compressed)",
}
METHOD_ORDER = (
    "original",
    "mka",
    "mka-loss",
    "mka-tail",
    "shortgpt",
    "angular",
    "laco",
    "sleb",
    "transact",
)
RULE_ORDER = ("similarity", "rowmean", "fixed", "search", "drop", "bootstrap")


# ---------------------------------------------------------------------------------------------
# small helpers


def _num(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, str):
        return x
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}" if digits <= 2 else f"{x:.1f}"
    return f"{x:.{digits}f}"


def _ppl(x) -> str:
    """A perplexity: 2 decimals when small, grouped digits, scientific past a million."""
    if x is None:
        return "—"
    return f"{x:.3g}" if x >= 1e6 else _num(x)


def _mparams(n) -> str:
    return f"{n / 1e6:.2f}" if n else "—"


def _ratio(x: float) -> str:
    if x >= 1e6:
        return f"{x:.2g}×"
    return f"{x:,.0f}×" if x >= 100 else (f"{x:.1f}×" if x >= 10 else f"{x:.2f}×")


def _pct(a: float, b: float) -> float:
    """How much higher a is than b, in percent of b."""
    return 100.0 * (a / b - 1.0)


def _label(row: dict, fixed_alpha=None) -> str:
    m, r = row["method"], row.get("alpha_rule")
    if m in ("mka", "mka-tail") and r:
        if r == "fixed":
            return f"{m} · fixed α {fixed_alpha:g}" if fixed_alpha is not None else f"{m} · fixed"
        if r == "drop":
            return f"{m} · drop (α = 1)"
        if r == "bootstrap":
            return f"{m} · bootstrap NPIB"
        return f"{m} · {r}"
    return m


def _sort_key(row: dict):
    m = row["method"]
    r = row.get("alpha_rule") or ""
    return (
        METHOD_ORDER.index(m) if m in METHOD_ORDER else 99,
        RULE_ORDER.index(r) if r in RULE_ORDER else 99,
    )


def _fit_exponent(xs: list[float], ys: list[float]) -> float | None:
    """Slope of log y on log x (cost ∝ x^slope); None with fewer than two usable points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def _nan(x) -> float:
    return float("nan") if x is None else float(x)


def _read(path: Path) -> list[dict]:
    return read_csv(path) if path.is_file() else []


# ---------------------------------------------------------------------------------------------
# figures


class Figures:
    """PNG figures (matplotlib) and interactive ones (plotly), each captioned with the command,
    the machine and the date."""

    def __init__(self, out: Path, caption: str):
        self.dir = out / "figures"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.caption = caption
        self.html: list = []  # plotly figures for figures.html
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            self.plt = plt
        except ImportError:
            self.plt = None
        self.pngs: dict[str, str] = {}

    def new(self, ncols: int = 1, width: float = 7.5, height: float = 4.2):
        fig, axes = self.plt.subplots(1, ncols, figsize=(width, height), squeeze=False)
        return fig, list(axes[0])

    def save(self, fig, name: str, title: str) -> None:
        fig.suptitle(title, fontsize=11)
        fig.text(0.01, 0.005, self.caption, fontsize=6.5, color="0.35", ha="left", va="bottom")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        buf = __import__("io").BytesIO()
        fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
        self.plt.close(fig)
        write_atomic(self.dir / f"{name}.png", buf.getvalue())
        self.pngs[name] = f"figures/{name}.png"

    def add_html(self, fig, title: str) -> None:
        fig.update_layout(
            title=title,
            template="plotly_white",
            annotations=[
                dict(
                    text=self.caption,
                    xref="paper",
                    yref="paper",
                    x=0,
                    y=-0.22,
                    showarrow=False,
                    font=dict(size=10, color="#666"),
                )
            ],
            margin=dict(b=90),
        )
        self.html.append(fig)

    def write_html(self, path: Path) -> bool:
        if not self.html:
            return False
        parts = [
            "<!DOCTYPE html><html><head><meta charset='utf-8'><title>MKA Studio benchmarks</title>"
            "</head><body style='font-family:sans-serif'><h1>MKA Studio benchmarks</h1>"
            f"<p>{self.caption}</p>"
        ]
        for i, fig in enumerate(self.html):
            parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
        parts.append("</body></html>")
        write_atomic(path, "\n".join(parts))
        return True


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
        from mka_core.figures import compare_figure
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


def _reading_quality(rows: list[dict], budgets: list[int], fixed_alpha) -> list[str]:
    out: list[str] = []
    orig = next((r for r in rows if r["method"] == "original"), None)
    if orig is None:
        return out
    p0 = orig["perplexity"]

    def lab(r):
        return f"**{_label(r, fixed_alpha)}**"

    for n in budgets:
        plain = [
            r for r in rows if r["layers_removed"] == n and not r["healed"] and r["perplexity"]
        ]
        failed = [
            r for r in rows if r["layers_removed"] == n and not r["healed"] and not r["perplexity"]
        ]
        if not plain:
            continue
        plain.sort(key=lambda r: r["perplexity"])
        best = plain[0]
        pct_params = 100 * n / orig["n_layers"]
        s = (
            f"- **{n} layer{'s' if n != 1 else ''} removed** ({pct_params:.0f} % of the layers, "
            f"{best['params_removed_pct']:.1f} % of the parameters): the lowest perplexity is "
            f"{lab(best)} at {_ppl(best['perplexity'])} ({best['perplexity'] / p0:.2f}× the "
            f"original's {_num(p0)})"
        )
        if len(plain) > 1:
            second = plain[1]
            s += (
                f"; next {lab(second)} at {_ppl(second['perplexity'])} "
                f"({_pct(second['perplexity'], best['perplexity']):+.1f} %)"
            )
        worst = plain[-1]
        s += f"; the worst is {lab(worst)} at {_ppl(worst['perplexity'])}."
        merges = [r for r in plain if r["method"] == "mka" and r["alpha_rule"] != "drop"]
        others = [r for r in plain if r["method"] != "mka"]
        if merges and others:
            bm = min(merges, key=lambda r: r["perplexity"])
            bo = min(others, key=lambda r: r["perplexity"])
            d = _pct(bm["perplexity"], bo["perplexity"])
            if d < 0:
                s += (
                    f" MKA's merging wins against every other method: its best α rule "
                    f"({bm['alpha_rule']}, {_ppl(bm['perplexity'])}) is {d:+.1f} % against the "
                    f"best other, {lab(bo)} ({_ppl(bo['perplexity'])})."
                )
            else:
                s += (
                    f" MKA's merging loses here: its best α rule ({bm['alpha_rule']}) gives "
                    f"{_ppl(bm['perplexity'])}, {d:+.1f} % against {lab(bo)} "
                    f"({_ppl(bo['perplexity'])})."
                )
        if best["method"] == "mka" and best["alpha_rule"] == "drop":
            s += (
                " The lowest of all is the *drop* control (MKA's pairs, the second layer dropped "
                "instead of merged)."
            )
        sg = next((r for r in plain if r["method"] == "shortgpt"), None)
        if sg is not None and sg is not best:
            s += (
                f" Against ShortGPT ({_ppl(sg['perplexity'])}) the winner is "
                f"{_pct(best['perplexity'], sg['perplexity']):+.1f} %."
            )
        kl_best = min(plain, key=lambda r: r["kl"])
        t1_best = max(plain, key=lambda r: r["top1"])
        s += (
            f" Closest to the original: lowest KL {lab(kl_best)} ({kl_best['kl']:.3f} nats), "
            f"highest top-1 agreement {lab(t1_best)} ({100 * t1_best['top1']:.1f} %)."
        )
        ta = next((r for r in plain if r["method"] == "transact"), None)
        layer_rows = [r for r in plain if r["method"] != "transact"]
        if ta is not None and layer_rows:
            bl = min(layer_rows, key=lambda r: r["perplexity"])
            word = "better" if ta["perplexity"] < bl["perplexity"] else "worse"
            s += (
                f" TransAct at the same parameter count ({ta['params'] / 1e6:.1f} M vs "
                f"{bl['params'] / 1e6:.1f} M) reaches {_ppl(ta['perplexity'])}: {word} than the "
                f"best layer removal ({_pct(ta['perplexity'], bl['perplexity']):+.1f} %)."
            )
        if failed:
            s += " Not measured: " + ", ".join(
                f"{_label(r, fixed_alpha)} ({r['steps']})" for r in failed
            )
            s += "."
        out.append(s)
    return out


def _merge_alphas(steps: str) -> list[float]:
    """The α (first weight) of every merge in a row's steps text, e.g. "merge 2+3 (0.95/0.05)"."""
    import re

    return [float(m) for m in re.findall(r"merge [\d+]+ \(([\d.]+)/", steps)]


def _reading_merge_vs_drop(rows: list[dict], budgets: list[int], fixed_alpha) -> list[str]:
    out = []
    for n in budgets:
        plain = {
            r["alpha_rule"]: r
            for r in rows
            if r["method"] == "mka" and r["layers_removed"] == n and not r["healed"]
        }
        drop = plain.get("drop")
        if drop is None or not drop["perplexity"]:
            continue
        parts = []
        for rule in ("similarity", "rowmean", "fixed", "search"):
            r = plain.get(rule)
            if r is None or not r["perplexity"]:
                continue
            d = _pct(r["perplexity"], drop["perplexity"])
            alphas = _merge_alphas(r.get("steps") or "")
            n_real = sum(1 for a in alphas if 0.02 < a < 0.98)
            if alphas and n_real == 0:
                verdict = (
                    "every α is ≤ 0.02 or ≥ 0.98: no real merge, one layer of each pair is kept"
                )
            else:
                verdict = "helps" if d < -1 else ("hurts" if d > 1 else "no clear difference")
                verdict = f"merging {verdict}"
                if alphas and n_real < len(alphas) / 2:
                    verdict = (
                        f"mostly not a merge: only {n_real} of {len(alphas)} merges have "
                        "0.02 < α < 0.98, the others keep one layer of the pair"
                    )
                elif alphas and n_real < len(alphas):
                    verdict += f"; {n_real} of {len(alphas)} merges have 0.02 < α < 0.98"
            a = f", mean α {r['alpha_mean']:.2f}" if r.get("alpha_mean") is not None else ""
            parts.append(
                f"{_label(r, fixed_alpha).split(' · ', 1)[1]} {_ppl(r['perplexity'])} "
                f"({d:+.1f} %{a}: {verdict})"
            )
        out.append(
            f"- {n} removed: dropping the second layer of each MKA pair gives "
            f"{_ppl(drop['perplexity'])}; merging instead: " + "; ".join(parts) + "."
        )
    return out


def _reading_alpha(plans: list[dict], rows: list[dict]) -> list[str]:
    out = []
    by_rule = defaultdict(list)
    for p in plans:
        if p.get("method") == "mka" and p.get("alpha_rule") not in (None, "drop"):
            ws = [s["weights"][0] for s in p.get("steps", []) if s.get("op") == "merge"]
            by_rule[p["alpha_rule"]].append((p.get("layers_removed"), ws))
    for rule in ("similarity", "rowmean", "fixed", "search"):
        if rule not in by_rule:
            continue
        n, ws = max(by_rule[rule], key=lambda t: t[0] or 0)
        if not ws:
            continue
        extreme = sum(1 for w in ws if w <= 0.02 or w >= 0.98)
        s = (
            f"- **{rule}**: at {n} removed the α of the {len(ws)} merges range from "
            f"{min(ws):.2f} to {max(ws):.2f} (mean {sum(ws) / len(ws):.2f})"
        )
        if extreme:
            s += f"; {extreme} of them are ≤ 0.02 or ≥ 0.98, i.e. effectively keep one layer"
        out.append(s + ".")
    return out


def _reading_speed(rows: list[dict], budgets: list[int], fixed_alpha) -> list[str]:
    orig = next((r for r in rows if r["method"] == "original"), None)
    if orig is None or not orig.get("decode_tps") or not budgets:
        return []
    out = []
    for n in budgets:
        plain = [
            r for r in rows if r["layers_removed"] == n and not r["healed"] and r.get("decode_tps")
        ]
        lr = [r["decode_tps"] for r in plain if r["method"] != "transact"]
        ta = next((r["decode_tps"] for r in plain if r["method"] == "transact"), None)
        if not lr:
            continue
        s = (
            f"- {n} removed: layer removal decodes at {_num(min(lr), 1)}–{_num(max(lr), 1)} "
            f"tokens/s (median {_num(statistics.median(lr), 1)}, "
            f"{_pct(statistics.median(lr), orig['decode_tps']):+.0f} % vs the original's "
            f"{_num(orig['decode_tps'], 1)})"
        )
        if ta:
            s += f"; TransAct at the same parameter count {_num(ta, 1)}"
        out.append(s + ".")
    return out


def _reading_heal(rows: list[dict], fixed_alpha) -> list[str]:
    out = []
    for r in rows:
        if not r["healed"] or not r.get("heal_from_perplexity") or not r["perplexity"]:
            continue
        out.append(
            f"- {r['layers_removed']} removed, **{_label(r, fixed_alpha)}**: "
            f"{_num(r['heal_from_perplexity'])} → {_ppl(r['perplexity'])} "
            f"({_pct(r['perplexity'], r['heal_from_perplexity']):+.1f} %) in "
            f"{_num(r.get('heal_s'), 0)} s of healing"
        )
    return out


# ---------------------------------------------------------------------------------------------
# the report


def _laco_notes(plans: list[dict]) -> dict[int, str]:
    """For each budget, how LaCo met it: collapses forced below its cosine threshold."""
    out = {}
    for p in plans:
        params = (p.get("method") or {}).get("params") or {}
        if (p.get("method") or {}).get("planner") != "laco" or "laco_forced" not in params:
            continue
        n_collapse = sum(1 for s in p.get("steps", []) if s.get("op") == "collapse")
        out[p.get("layers_removed")] = (
            f"{params['laco_forced']} of {n_collapse} collapses below the cosine threshold "
            f"{params.get('laco_threshold')} (taken as the best candidate of their pass), "
            f"{params.get('laco_candidates', '?')} candidates scored"
        )
    return out


def _quality_table(
    rows: list[dict], n: int, fixed_alpha, p0: float, notes: dict | None = None
) -> list[str]:
    sel = [r for r in rows if r["layers_removed"] == n]
    sel.sort(key=lambda r: (r["perplexity"] is None, r["perplexity"] or 0, r["healed"]))
    lines = [
        "| method | healed | params (M) | perplexity | halves | vs original | KL (nats) | "
        "top-1 | decode tok/s | plan s | steps |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in sel:
        ppl = r["perplexity"]
        lines.append(
            f"| {_label(r, fixed_alpha)} | {'yes' if r['healed'] else ''} | "
            f"{_mparams(r['params'])} | {_ppl(ppl)} | "
            f"{_ppl(r.get('perplexity_half_a'))} / {_ppl(r.get('perplexity_half_b'))} | "
            f"{_ratio(ppl / p0) if ppl else '—'} | {_num(r['kl'], 3)} | "
            f"{_num(100 * r['top1'], 1) + ' %' if r['top1'] is not None else '—'} | "
            f"{_num(r['decode_tps'], 1)} | {_num(r.get('plan_s'), 1)} | "
            f"{(r.get('steps') or '').replace('|', '/')}"
            f"{'; ' + notes[n] if notes and r['method'] == 'laco' and n in notes else ''} |"
        )
    return lines


def render(out: Path = DEFAULT_OUT, md: Path | None = None, figures: bool = True) -> Path:
    out = Path(out)
    md = Path(md) if md is not None else REPO / "BENCHMARKS.md"
    run = read_json(out / "machine.json", {}) or {}
    m = run.get("machine", {})
    settings = run.get("settings", {})
    sections = run.get("sections", {})
    quality = _read(out / "quality.csv")
    plans = (read_json(out / "quality_plans.json", {}) or {}).get("plans", [])
    cost = _read(out / "cost.csv")
    layers = _read(out / "cost_layers.csv")
    app = _read(out / "app.csv")
    fixed_alpha = settings.get("fixed_alpha")
    budgets = sorted({r["layers_removed"] for r in quality if r["layers_removed"]})
    command = run.get("command", "python -m bench.run")
    caption = f"{command} · {machine_line(m)}"
    figs = Figures(out, caption)
    if not figures:
        figs.plt = None
    _quality_figures(figs, quality, budgets, fixed_alpha) if quality else None
    cfit = _cost_figures(figs, cost, layers) if cost else {"fits": {}, "layer_fits": {}}
    app_summary = _app_figures(figs, app) if app else []
    has_html = figs.write_html(out / "figures.html") if figures else (out / "figures.html").exists()
    rel = _relpath(out, md.parent)

    def img(name: str, alt: str) -> list[str]:
        path = out / "figures" / f"{name}.png"
        return [f"![{alt}]({rel}/figures/{name}.png)", ""] if path.exists() else []

    L: list[str] = []
    L += [
        "# MKA Studio benchmarks",
        "",
        f"<!-- generated by `python -m bench.render` from {rel}/; edit bench/render.py, not this "
        "file -->",
        "",
        "Compression quality of every method side by side, the cost of each analysis stage, and "
        f"the app's responsiveness, on `{settings.get('model', '?')}`. Every number and "
        "figure here is "
        f"regenerated by **`{COMMAND}`** (results in `{rel}/`: `quality.csv`, `cost.csv`, "
        "`cost_layers.csv`, `app.csv`, `machine.json`; interactive figures in "
        f"`{rel}/figures.html`). `python -m bench.render` rebuilds this file from those files "
        "alone; `python -m bench.run --quick` smoke-tests the whole pipeline on a tiny random "
        "model in about two minutes; `--only quality|cost|app` runs one section.",
        "",
        "## This run",
        "",
        f"- command: `{command}`; date {m.get('date', '?')}; git commit "
        f"`{(m.get('git_commit') or '?')[:12]}`{' (with uncommitted changes)' if m.get('git_dirty') else ''}",
        f"- machine: {m.get('cpu', '?')} ({', '.join(m.get('cpu_flags', [])) or 'no AVX flags'}),"
        f" {m.get('cores', '?')} cores, {m.get('memory_mb', 0) / 1024:.0f} GiB, device "
        f"**{m.get('device', '?')}**, torch {m.get('torch', '?')} ({m.get('torch_threads', '?')}"
        f" threads), transformers {m.get('transformers', '?')}, Python {m.get('python', '?')}",
    ]
    L.append(
        "- sections, each as last run: "
        + "; ".join(
            f"{k} {v.get('seconds', 0) / 60:.1f} min on {str(v.get('date', '?'))[:10]} "
            f"(`{v.get('command', '?')}`)"
            for k, v in sections.items()
        )
    )
    if run.get("wall_s"):
        L.append(
            f"- wall time of the whole run: **{run['wall_s'] / 60:.1f} min** ("
            + ", ".join(f"{k} {v.get('seconds', 0) / 60:.1f} min" for k, v in sections.items())
            + ", the rest loading and rendering)"
            + (f"; {run['wall_note']}" if run.get("wall_note") else "")
        )
    loads = [m.get("load_average_start"), m.get("load_average_end")]
    L.append(
        f"- load average (1, 5, 15 min) at the start {loads[0]} and the end {loads[1]}: other "
        "processes on this machine share its cores, and every time here is wall-clock, so a "
        "busy machine inflates the seconds (not the quality numbers)."
    )
    L.append("")
    if settings:
        L += method_section(settings, sections)

    # -- quality
    if quality:
        orig = next((r for r in quality if r["method"] == "original"), None)
        p0 = orig["perplexity"] if orig else float("nan")
        L += ["## Quality", ""]
        L += ["### Reading", ""]
        L += _reading_quality(quality, budgets, fixed_alpha)
        mvd = _reading_merge_vs_drop(quality, budgets, fixed_alpha)
        if mvd:
            L += [
                "",
                "**Merging vs dropping the same layers.** MKA picks pairs of adjacent layers; "
                "the *drop* row removes the second layer of each pair instead of merging it "
                "(α = 1), so the difference is what the merge itself does (a difference under 1 % is "
                "called no clear difference):",
                "",
                *mvd,
            ]
        al = _reading_alpha(plans, quality)
        if al:
            L += ["", "**What the α rules change** (α = weight of the first layer):", "", *al]
        sp = _reading_speed(quality, budgets, fixed_alpha)
        if sp:
            L += [
                "",
                "**Decode speed** (batch 1; wall-clock on a shared machine, so only large "
                "differences mean something):",
                "",
                *sp,
            ]
        hl = _reading_heal(quality, fixed_alpha)
        if hl:
            L += [
                "",
                "**Healing** (the same short fine-tune for each healed row; perplexity before → "
                "after):",
                "",
                *hl,
            ]
        if orig:
            L += [
                "",
                f"Reference: the original model has perplexity **{_num(orig['perplexity'])}**, "
                f"{orig['params'] / 1e6:.2f} M parameters, {orig['n_layers']} layers and decodes "
                f"{_num(orig['decode_tps'], 1)} tokens/s here.",
            ]
        L += [
            "",
            f"**Limits of these numbers.** One small model ({_mparams((orig or {}).get('params'))}"
            " M parameters) and one corpus; the papers evaluate models of 7 B parameters and "
            "more, which are not tested here. The evaluation is "
            f"{sections.get('quality', {}).get('eval_positions', '?')} predicted positions, so "
            "rows within a "
            "few percent of each other could swap places on other text. The heal is a few "
            "steps, not a fine-tune. Decode speeds are wall-clock on a shared 2-core CPU.",
        ]
        L.append("")
        for n in budgets:
            pct = 100 * n / orig["n_layers"] if orig else 0
            L += [f"### {n} layers removed ({pct:.0f} %)", ""]
            L += _quality_table(quality, n, fixed_alpha, p0, _laco_notes(plans))
            L.append("")
        L += img("quality_perplexity", "perplexity by method and budget")
        L += img("quality_fidelity", "KL and top-1 agreement")
        L += img("quality_size_speed", "parameters and decode speed")

    # -- cost
    if cost:
        L += _cost_section(cost, layers, cfit, quality, settings, fixed_alpha)
        L += img("cost_stages", "analysis cost by stage")
        L += img("cost_layers_memory", "growth with depth and peak memory")

    # -- app
    if app:
        a = sections.get("app", {})
        L += [
            "## App responsiveness",
            "",
            f"`streamlit.testing.v1.AppTest` drives `app.py` and `pages/` in-process (no browser:"
            f" these are the server-side script times a user waits before the page draws), on "
            f"`{a.get('model', settings.get('model', '?'))}` with a "
            f"{a.get('calibration', '?')} capture. Medians over the repeats; a page's first visit"
            " is listed apart because it may compute figures that later visits take from the "
            "cache. A figure, not a test threshold.",
            "",
            "| action · page | median s | runs |",
            "|---|---:|---:|",
        ]
        L += [f"| {k} | {v:.3f} | {c} |" for k, v, c in app_summary]
        runs = a.get("run_plan_s") or {}
        if runs:
            target = a.get("run_plan_target_s", 30)
            worst = max(runs.values())
            L += [
                "",
                "**Run the plan at the app's own defaults** (Results page, CPU defaults: "
                "1024 evaluation tokens, no speed timing, two-model sample generations of 16 "
                "tokens): "
                + ", ".join(f"{k.split('(')[-1].rstrip(')')} {v:.1f} s" for k, v in runs.items())
                + f" — target ≤ {target} s: "
                + ("met." if worst <= target else f"missed by {worst - target:.1f} s."),
            ]
        exc = [r for r in app if r.get("exception")]
        if exc:
            L += ["", f"**{len(exc)} render(s) raised an exception**: {exc[0]['exception']}"]
        rr = [v for k, v, _ in app_summary if k.startswith("re-render")]
        sw = [v for k, v, _ in app_summary if k.startswith("switch to") and "first" not in k]
        if rr and sw:
            L += [
                "",
                f"Re-rendering the similarity page from the cache takes {rr[0]:.2f} s; switching "
                f"to a page already visited takes {min(sw):.2f}–{max(sw):.2f} s (median per "
                "page).",
            ]
        L.append("")
        L += img("app_timing", "app responsiveness")

    L += truth_section(out, quality)
    L += dtype_section(out)
    L += scale_section(out)

    if has_html:
        L += [
            f"Interactive versions of the figures: `{rel}/figures.html`, written by every run "
            "(self-contained, works offline; git-ignored, as it carries 5 MB of plotly.js).",
            "",
        ]
    write_atomic(md, "\n".join(L).rstrip() + "\n")
    return md


def _relpath(target: Path, start: Path) -> str:
    import os

    return Path(os.path.relpath(Path(target).resolve(), Path(start).resolve())).as_posix()


def _baseline(cost: list[dict]) -> float:
    vals = [r["peak_mb"] - r["added_mb"] for r in cost if r["n_samples"]]
    return statistics.median(vals) if vals else 0.0


def _cost_section(cost, layers, cfit, quality, settings, fixed_alpha) -> list[str]:
    L = ["## Analysis cost", ""]
    by = defaultdict(dict)
    for r in cost:
        by[r["stage"]][r["n_samples"]] = r
    ns = sorted({r["n_samples"] for r in cost if r["n_samples"]})
    once = [r for r in cost if not r["n_samples"]]
    T = settings.get("cost_tokens")
    L += [
        f"Calibration samples of at most {T} tokens (so N = {ns[-1] if ns else '?'} is "
        f"{by.get('capture', {}).get(ns[-1], {}).get('tokens', '?') if ns else '?'} tokens)"
        ", the full model, mean pooling. Stages that do not depend on N were measured once. "
        "Each cell: seconds · memory added during the stage (the peak resident memory of the "
        "benchmark process during the stage minus its resident memory at the stage's start; "
        f"the process holds about {_num(_baseline(cost), 0)} MB before, the loaded model "
        "included).",
        "",
        "| stage | " + " | ".join(f"N = {n}" for n in ns) + " | grows as |",
        "|---|" + "---:|" * len(ns) + "---|",
    ]
    for s in STAGE_ORDER:
        if s not in by:
            continue
        cells = [
            f"{by[s][n]['seconds']:.2f} s · +{by[s][n]['added_mb']:.0f} MB" if n in by[s] else "—"
            for n in ns
        ]
        f = cfit["fits"].get(s)
        L.append(
            f"| {STAGE_NAMES.get(s, s)} | "
            + " | ".join(cells)
            + f" | {'N^' + format(f, '.2f') if f is not None else '—'} |"
        )
    L.append("")
    if once:
        L += [
            "| stage (once) | seconds | peak MB | added MB | detail |",
            "|---|---:|---:|---:|---|",
        ]
        for r in once:
            L.append(
                f"| {STAGE_NAMES.get(r['stage'], r['stage'])} | {r['seconds']:.2f} | "
                f"{r['peak_mb']:.0f} | {r['added_mb']:.0f} | {r.get('detail') or ''}"
                f"{', ' + str(r['tokens']) + ' tokens' if r.get('tokens') else ''} |"
            )
        L.append("")
    # forward-pass share
    ev = next((r["seconds"] for r in once if r["stage"] == "evaluate"), 0.0)
    ld = next((r["seconds"] for r in once if r["stage"] == "load_cached"), 0.0)
    L += [
        "**Share of the forward passes.** In the analysis (capture + similarity), and end to "
        "end (cached load + analysis + planning + applying + evaluating, where the evaluation's "
        "forward passes are counted as forward passes too):",
        "",
        "| N | analysis s | capture share of the analysis | end-to-end s | forward share end "
        "to end |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n in ns:
        get = {s: by[s].get(n, {}).get("seconds", 0.0) for s in STAGE_ORDER if s in by}
        analysis = sum(get.get(s, 0.0) for s in ("capture", "diffusion", "npib", "other_measures"))
        total = ld + sum(get.values()) + ev
        fwd = get.get("capture", 0.0) + ev
        L.append(
            f"| {n} | {analysis:.1f} | {100 * get.get('capture', 0) / analysis:.1f} % | "
            f"{total:.1f} | {100 * fwd / total:.1f} % |"
            if analysis and total
            else f"| {n} | — | — | — | — |"
        )
    L.append("")
    fits = cfit["fits"]
    if fits:
        L.append(
            "Fitted growth with N (slope of log seconds on log N over the sweep): "
            + ", ".join(f"{s} N^{v:.2f}" for s, v in fits.items() if v is not None)
            + ". The similarity stages work on (N × N) matrices per layer, the forward passes "
            "on N samples; the table shows which dominates at each N."
        )
        L.append("")
    if layers:
        lby = defaultdict(dict)
        for r in layers:
            lby[r["stage"]][r["n_layers"]] = r
        ls = sorted({r["n_layers"] for r in layers})
        n0 = layers[0]["n_samples"]
        L += [
            f"**Growth with the number of layers** (the first L blocks of the same model, "
            f"N = {n0}):",
            "",
            "| stage | " + " | ".join(f"L = {n}" for n in ls) + " | grows as |",
            "|---|" + "---:|" * len(ls) + "---|",
        ]
        for s in STAGE_ORDER:
            if s not in lby:
                continue
            f = cfit["layer_fits"].get(s)
            L.append(
                f"| {STAGE_NAMES.get(s, s)} | "
                + " | ".join(f"{lby[s][n]['seconds']:.2f} s" if n in lby[s] else "—" for n in ls)
                + f" | {'L^' + format(f, '.2f') if f is not None else '—'} |"
            )
        L.append("")
    plan_rows = [r for r in quality if not r["healed"] and r.get("plan_s") is not None]
    if plan_rows:
        budgets = sorted({r["layers_removed"] for r in plan_rows})
        labels = []
        for r in sorted(plan_rows, key=_sort_key):
            lab = _label(r, fixed_alpha)
            if lab not in labels:
                labels.append(lab)
        L += [
            "**Planning time by planner** (from the quality run, on its calibration batch):",
            "",
            "| planner | " + " | ".join(f"-{b}" for b in budgets) + " |",
            "|---|" + "---:|" * len(budgets),
        ]
        for lab in labels:
            cells = []
            for b in budgets:
                r = next(
                    (
                        r
                        for r in plan_rows
                        if _label(r, fixed_alpha) == lab and r["layers_removed"] == b
                    ),
                    None,
                )
                cells.append(f"{r['plan_s']:.1f} s" if r else "—")
            L.append(f"| {lab} | " + " | ".join(cells) + " |")
        L.append("")
    return L


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.render", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    ap.add_argument("--md", type=Path, default=None, help="report path (default BENCHMARKS.md)")
    args = ap.parse_args(argv)
    md = render(args.out, args.md)
    print(md, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
