"""Shared pieces of the benchmark report: the order and names of stages and methods, number
formatting, reading result files, and the figure collector (PNG + interactive HTML)."""

from __future__ import annotations

import math
from pathlib import Path

from .common import read_csv, write_atomic

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
