"""Quality: every planner and TransAct at the same parameter counts, at each budget of layers
removed, with and without healing, on one calibration batch and one set of evaluation windows
(bench/results/quality.csv) — one call of the product's own `compare.compare_sweep`, the same
sweep `python -m mka_core compare` runs; this module only chooses the settings, adds the
analysis' stability and measured importance, and writes the files the report reads.

Rows: MKA with each α rule (and its *drop* control and its bootstrap-NPIB variant), mka-tail,
ShortGPT, angular, LaCo, SLEB, MKA by measured loss, and TransAct at the parameters of each
budget; the best merge, the best other planner and TransAct healed at the heal budgets.
"""

from __future__ import annotations

import time
from pathlib import Path

from .common import Measure, Settings, say, write_csv, write_json

COLUMNS = [
    "method",
    "alpha_rule",
    "layers_removed",
    "n_layers",
    "params",
    "params_removed_pct",
    "healed",
    "perplexity",
    "perplexity_half_a",
    "perplexity_half_b",
    "kl",
    "top1",
    "decode_tps",
    "alpha_mean",
    "intermediate_size",
    "plan_s",
    "build_s",
    "heal_s",
    "eval_s",
    "heal_from_perplexity",
    "steps",
]
BASELINES = ("mka-tail", "shortgpt", "angular", "laco", "sleb", "mka-loss")


def specs(settings: Settings) -> list[str]:
    """The compare planner specs of the quality table, in table order."""
    out = [f"mka:{r}" for r in settings.alpha_rules] + ["mka:bootstrap", "mka-tail"]
    return out + ["shortgpt", "angular", "laco", "sleb", "mka-loss", "transact"]


def _row(r: dict) -> dict:
    """A compare row in the report's vocabulary (method, alpha_rule)."""
    out = dict(r)
    out["method"] = r["planner"]
    out["alpha_rule"] = r.get("option")
    if r["planner"] == "mka-tail" and not r.get("option"):
        out["alpha_rule"] = "similarity"
    if r.get("error"):
        out["steps"] = r["error"]
        out["perplexity"] = None
    return out


def run(settings: Settings, out: Path) -> dict:
    from mka_core.compression.importance import proxy_vs_truth
    from mka_core.models.loading import load_model
    from mka_core.workflows import pipeline
    from mka_core.workflows.compare import compare_sweep

    t_section = time.perf_counter()
    say(f"quality: loading {settings.model}")
    loaded = load_model(settings.model)
    say(
        f"quality: analysing {settings.calib_samples} calibration samples x "
        f"<= {settings.calib_tokens} tokens, with stability and measured importance"
    )
    with Measure() as m_an:
        analysis = pipeline.analyze(
            loaded,
            n_samples=settings.calib_samples,
            max_tokens=settings.calib_tokens,
            importance=True,
            importance_samples=settings.importance_samples,
            progress=lambda f, msg: None,
        )
    sim, st, imp = analysis.similarity, analysis.stability, analysis.importance
    say(
        f"quality: analysis {m_an.seconds:.1f} s (stability {st.seconds:.1f} s, {st.n_boot} "
        f"replicates; importance {imp.seconds:.1f} s)"
    )
    last = [0.0]

    def progress(fraction: float, msg: str) -> None:
        if time.perf_counter() - last[0] > 15 or msg.startswith("compare:"):
            say(f"quality: {msg}")
            last[0] = time.perf_counter()

    result = compare_sweep(
        loaded,
        analysis,
        specs(settings),
        list(settings.budgets),
        eval_budget=settings.eval_tokens,
        eval_window=settings.eval_window,
        fixed_alpha=settings.fixed_alpha,
        with_speed=True,
        plan_limit_s=settings.plan_limit_s,
        loss_samples=settings.loss_samples,
        transact_samples=settings.transact_samples,
        transact_shots=settings.transact_shots,
        heal_steps=settings.heal_steps,
        heal_budgets=settings.heal_budgets,
        heal_batch=settings.heal_batch,
        heal_lr=settings.heal_lr,
        progress=progress,
    )
    rows = [_row(r) for r in result.rows]
    write_csv(out / "quality.csv", rows, COLUMNS)
    plans = [{"method": p["method"]["planner"], "alpha_rule": _rule(p), **p} for p in result.plans]
    write_json(out / "quality_plans.json", {"format": "mka-bench-plans", "plans": plans})
    write_json(
        out / "truth.json",
        {
            "stability": st.to_dict(),
            "importance": imp.to_dict(),
            "proxy_vs_truth": proxy_vs_truth(sim, imp),
            "analysis_s": round(m_an.seconds, 2),
            "analysis_timings": {k: round(v, 3) for k, v in sim.timings.items()},
        },
    )
    orig = rows[0]
    return {
        "wall_s": round(time.perf_counter() - t_section, 1),
        "analysis_s": round(m_an.seconds, 1),
        "analysis_timings": {k: round(v, 3) for k, v in sim.timings.items()},
        "calibration_tokens": analysis.batch.n_tokens,
        "eval_tokens": result.meta["eval_tokens"],
        "eval_positions": result.meta["eval_positions"],
        "original_perplexity": orig["perplexity"],
        "rows": len(rows),
    }


def _rule(plan: dict) -> str | None:
    config = plan.get("config", "")
    name = config.split(" ")[0]
    return name.split(":", 1)[1] if ":" in name else None
