"""Tables and number formatting for results: plain pandas, no Streamlit, shared by the app and
reports."""

from __future__ import annotations

import pandas as pd


def fmt_params(n) -> str:
    return "–" if n is None else f"{n / 1e6:,.2f} M"


def fmt_mb(n) -> str:
    return "–" if n is None else f"{n / 2**20:,.1f} MB"


def fmt_num(x, digits: int = 2) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def fmt_pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def before_after_table(run) -> pd.DataFrame:
    """Metric | original | compressed | change, formatted for reading."""
    o, c = run.original, run.compressed

    def change(a, b, lower_is_better=True):
        if a in (None, 0) or b is None:
            return "–"
        r = b / a - 1
        arrow = "↑" if r > 0 else "↓" if r < 0 else "="
        return f"{arrow} {abs(r) * 100:.1f} %"

    gone = o.n_layers - c.n_layers
    rows = [
        ("layers", str(o.n_layers), str(c.n_layers), f"−{gone}" if gone else "="),
    ]
    if o.intermediate_size and c.intermediate_size:
        rows.append(
            (
                "MLP width (intermediate)",
                str(o.intermediate_size),
                str(c.intermediate_size),
                change(o.intermediate_size, c.intermediate_size),
            )
        )
    if o.n_heads and c.n_heads:
        rows.append(
            (
                "attention heads (query / KV)",
                f"{o.n_heads} / {o.n_kv_heads}",
                f"{c.n_heads} / {c.n_kv_heads}",
                change(o.n_heads, c.n_heads),
            )
        )
    rows += [
        ("parameters", fmt_params(o.params), fmt_params(c.params), change(o.params, c.params)),
        ("size in memory", fmt_mb(o.bytes), fmt_mb(c.bytes), change(o.bytes, c.bytes)),
        (
            "perplexity",
            fmt_num(o.perplexity),
            fmt_num(c.perplexity),
            change(o.perplexity, c.perplexity),
        ),
        ("KL from original (nats)", "0", fmt_num(c.kl, 4), ""),
        ("top-1 agreement", "100.0 %", fmt_pct(c.top1), ""),
        (
            "prefill (tokens/s)",
            fmt_num(o.prefill_tps, 0),
            fmt_num(c.prefill_tps, 0),
            change(o.prefill_tps, c.prefill_tps),
        ),
        (
            "decode (tokens/s)",
            fmt_num(o.decode_tps, 1),
            fmt_num(c.decode_tps, 1),
            change(o.decode_tps, c.decode_tps),
        ),
    ]
    if o.mmlu and c.mmlu:
        rows.append(
            ("MMLU accuracy", fmt_pct(o.mmlu.get("accuracy")), fmt_pct(c.mmlu.get("accuracy")), "")
        )
    return pd.DataFrame(rows, columns=["metric", "original", "compressed", "change"])


def plan_table(plan) -> pd.DataFrame:
    rows = []
    for g, group in enumerate(plan.layers):
        sources = [i for i, _ in group]
        rows.append(
            {
                "output layer": g,
                "original layers": ", ".join(map(str, sources)),
                "weights": ", ".join(f"{w:.3f}" for _, w in group),
                "what": "kept" if len(group) == 1 else f"merge of {len(group)}",
            }
        )
    return pd.DataFrame(rows)


def steps_table(plan) -> pd.DataFrame:
    rows = []
    for s, step in enumerate(plan.steps):
        rows.append(
            {
                "step": s + 1,
                "op": step.op,
                "layers": ", ".join(map(str, step.layers)),
                "weights": ", ".join(f"{w:.3f}" for w in step.weights) if step.weights else "",
                "score": f"{step.score:.4f}" if step.score is not None else "",
            }
        )
    return pd.DataFrame(rows, columns=["step", "op", "layers", "weights", "score"])


def history_frame(rows: list[dict]) -> pd.DataFrame:
    """The history of runs as a table, the identifying columns first."""
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    front = [
        c
        for c in ("run", "time", "kind", "planner", "label", "layers", "layers_removed")
        if c in df
    ]
    return df[front + [c for c in df.columns if c not in front]]


def task_table(original, compressed):
    """lm-eval scores of both models, one row per task and metric (stderr beside)."""
    rows = []
    for name, t in (compressed.tasks or {}).get("tasks", {}).items():
        before = ((original.tasks or {}).get("tasks", {}).get(name) or {}).get("metrics", {})
        for metric, value in t.get("metrics", {}).items():
            if "stderr" in metric or value is None:
                continue
            rows.append(
                {
                    "task": f"{name} ({t.get('n')} examples)",
                    "metric": metric,
                    "original": fmt_num(before.get(metric), 4),
                    "compressed": fmt_num(value, 4),
                    "± (compressed)": fmt_num(t["metrics"].get(f"{metric}_stderr"), 4),
                }
            )
    return pd.DataFrame(rows)
