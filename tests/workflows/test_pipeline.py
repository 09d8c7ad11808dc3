"""The user-level actions of mka_core.workflows.pipeline on the tiny model."""

import pytest

from mka_core.workflows.pipeline import (
    EvalSettings,
    analyze,
    make_budget_plan,
    run_plan,
    run_transact,
)


@pytest.fixture(scope="module")
def analysis(tiny):
    return analyze(tiny, n_samples=24, max_tokens=32)


EVAL = {
    "settings": EvalSettings(
        budget_tokens=1024, window=256, with_speed=False, with_generations=False
    )
}


def test_runs_reuse_the_original_evaluation(tiny, analysis):
    cache = {}
    first = run_plan(
        tiny,
        make_budget_plan(tiny, analysis, "shortgpt", n_remove=2),
        **EVAL,
        reference_cache=cache,
    )
    assert cache  # the original's log-probabilities are kept
    plan = make_budget_plan(tiny, analysis, "mka", n_remove=2)
    reused = run_plan(tiny, plan, **EVAL, original=first.original, reference_cache=cache)
    fresh = run_plan(tiny, plan, **EVAL)
    assert reused.original is first.original
    assert reused.compressed.kl == pytest.approx(fresh.compressed.kl, rel=1e-9)
    assert reused.compressed.perplexity == pytest.approx(fresh.compressed.perplexity, rel=1e-9)
    row = reused.to_row()
    assert row["layers_removed"] == 2 and row["kind"] == "merge" and row["planner"] == "mka"
    # what produced the numbers: data and split, windows, dtype and device, versions
    meta = reused.compressed.meta
    assert meta["split"] == "evaluation" and meta["budget_tokens"] == 1024
    assert {"mka_core", "torch", "transformers"} <= set(meta["versions"])
    made = row["provenance"]
    assert "builtin (evaluation split)" in made and "4 windows × 256 tokens" in made
    assert "float32 on cpu" in made and "torch " in made
    import pandas as pd

    from mka_core.figures.runs import history_figure

    fig = history_figure(pd.DataFrame([row]))
    assert "evaluation split" in fig.data[0].text[1]  # the hover says it


def test_transact_after_a_merge_records_both_stages(tiny, analysis):
    merged = run_plan(tiny, make_budget_plan(tiny, analysis, "mka", n_remove=1), **EVAL)
    run, report = run_transact(tiny, analysis.batch, mlp_keep=0.5, shots=1, base=merged, **EVAL)
    assert run.kind == "merge+transact"
    assert [s["stage"] for s in run.stages] == ["merge", "transact"]
    assert run.compressed.n_layers == 5 and run.compressed.intermediate_size == 64
    assert run.original.n_layers == 6  # always compared with the original model
    assert report.new_intermediate_size == 64
