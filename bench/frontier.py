"""The quality frontier: merges built by flattening (FlattenGPT) and removals that compensate
themselves (ReplaceMe's linear map, Prune&Comp's scale), at the quality section's budgets, on its
calibration batch and evaluation windows (bench/results/frontier.csv). One call of the product's
`compare.compare_sweep`; the rows it is read against (the plain drops and merges, ShortGPT,
TransAct at equal parameters) are the quality section's, the same settings and data.

``plan_s`` is the planner's time (shared by every way of building its plan); ``build_s`` is the
flattening and compensation pass plus building the model.
"""

from __future__ import annotations

import time
from pathlib import Path

from .common import Settings, loaded_analysis, say, sweep_progress, write_csv, write_json
from .quality import COLUMNS, _row

FRONTIER_COLUMNS = [*COLUMNS[:2], "merge_mode", "compensation", *COLUMNS[2:]]


def specs() -> list[str]:
    """Each drop planner with each compensation; each merge planner flattened, alone and with
    the linear map; MKA's own α-merges with the linear map."""
    drops = [f"{p}+{c}" for p in ("shortgpt", "angular", "sleb") for c in ("linear", "scale")]
    merges = ["mka:flatten", "mka:flatten+linear", "mka-loss:flatten", "mka-loss:flatten+linear"]
    return drops + merges + ["mka-loss+linear", "mka:search+linear"]


def run(settings: Settings, out: Path) -> dict:
    from mka_core.workflows.compare import compare_sweep

    t_section = time.perf_counter()
    loaded, analysis = loaded_analysis(settings)
    result = compare_sweep(
        loaded,
        analysis,
        specs(),
        list(settings.budgets),
        eval_budget=settings.eval_tokens,
        eval_window=settings.eval_window,
        fixed_alpha=settings.fixed_alpha,
        with_speed=False,
        plan_limit_s=settings.plan_limit_s,
        loss_samples=settings.loss_samples,
        progress=sweep_progress("frontier"),
    )
    rows = [_row(r) for r in result.rows]
    write_csv(out / "frontier.csv", rows, FRONTIER_COLUMNS)
    return {
        "wall_s": round(time.perf_counter() - t_section, 1),
        "calibration_tokens": analysis.batch.n_tokens,
        "original_perplexity": rows[0]["perplexity"],
        "rows": len(rows),
    }


def run_cost(settings: Settings, out: Path) -> dict:
    """What compensating and flattening cost against their budgets, timed alone on the quality
    section's calibration batch: one forward pass of the batch (block by block, as every stage
    runs), the linear and the scale compensation of ShortGPT's three cuts (target: at most two
    such passes plus the solves), flattening one pair (target: at most TransAct's scoring of one
    block, i.e. its whole-model scoring pass over the layer count)."""
    from mka_core.compression.plan import Step, make_plan
    from mka_core.compression.rebuild import refine
    from mka_core.compression.transact import score_units
    from mka_core.data.corpus import load_documents, make_calibration
    from mka_core.engine.layerpass import LayerPass, as_stack
    from mka_core.models.loading import load_model

    loaded = load_model(settings.model)
    docs = load_documents("builtin", "calibration")
    batch = make_calibration(loaded.tokenizer, docs, settings.calib_samples, settings.calib_tokens)
    base = as_stack(loaded.model)
    n = base.n_layers

    def timed(fn, repeats=3):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    forward = timed(lambda: LayerPass.start(base, batch.input_ids, batch.attention_mask).run())
    drops = [d for d in (3, 14, 25) if 0 < d < n - 1] or [n // 2]  # ShortGPT's at 3 removed
    comp = [[(i, 1.0)] for i in range(n) if i not in drops]
    linear = timed(lambda: refine(base, base.compose(comp), comp, batch, compensation="linear"))
    scale = timed(lambda: refine(base, base.compose(comp), comp, batch, compensation="scale"))
    pair = n // 2
    merged = make_plan(loaded, [Step.merge((pair, pair + 1), (0.5, 0.5))], {})
    rep = []

    def flatten():
        _, r = refine(base, base.compose(merged.layers), merged.layers, batch, merge="flatten")
        rep.append(r.flattened[0]["seconds"])

    timed(flatten)
    scoring = timed(lambda: score_units(loaded.model, batch), repeats=1)
    result = {
        "calibration_tokens": batch.n_tokens,
        "forward_s": round(forward, 2),
        "linear_s": round(linear, 2),
        "scale_s": round(scale, 2),
        "cuts": len(drops),
        "flatten_pair_s": round(min(rep), 2),
        "transact_scoring_s": round(scoring, 2),
        "transact_block_s": round(scoring / n, 2),
        "n_layers": n,
    }
    write_json(out / "frontier_cost.json", result)
    say(f"frontier cost: {result}")
    return result
