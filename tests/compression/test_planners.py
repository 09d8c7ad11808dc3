"""Planners on the tiny model: what each one picks, α rules, budgets, and that planning never
changes the model."""

import numpy as np
import pytest
import torch

from mka_core.compression.merge import apply_plan
from mka_core.compression.plan import compose
from mka_core.compression.planners.search import _golden_search, calibration_loss, model_view
from mka_core.engine.layerpass import LayerPass, causal_lm_loss
from mka_core.errors import MkaInputError
from mka_core.models.loading import model_fingerprint
from mka_core.workflows.pipeline import analyze, make_budget_plan, make_manual_plan


@pytest.fixture(scope="module")
def analysis(tiny):
    return analyze(tiny, n_samples=32, max_tokens=32)


def test_mka_merges_the_most_similar_allowed_pair(tiny, analysis):
    s = analysis.similarity.matrices["npib"]
    plan = make_budget_plan(tiny, analysis, "mka", n_remove=1)
    (step,) = plan.steps
    a, b = step.layers
    candidates = {(i, i + 1): s[i, i + 1] for i in range(1, 4)}  # layers 0 and 5 protected
    assert (a, b) == max(candidates, key=candidates.get)
    assert step.weights[0] == pytest.approx(s[a, b])  # α = S_ab, the paper's rule
    assert plan.n_layers_out == 5 and plan.method["planner"] == "mka"


def test_protected_layers_are_never_touched(tiny, analysis):
    for planner in ("mka", "mka-tail", "shortgpt", "angular", "laco"):
        plan = make_budget_plan(tiny, analysis, planner, n_remove=3)
        touched = {i for st in plan.steps for i in st.layers}
        assert 0 not in touched and 5 not in touched, planner
        assert plan.n_layers_out == 3, planner


def test_shortgpt_drops_lowest_block_influence(tiny, analysis):
    bi = analysis.similarity.bi
    plan = make_budget_plan(tiny, analysis, "shortgpt", n_remove=2)
    dropped = [st.layers[0] for st in plan.steps]
    want = [i for i in np.argsort(bi) if i not in (0, 5)][:2]
    assert dropped == [int(i) for i in want]


def test_angular_drops_the_best_consecutive_block(tiny, analysis):
    plan = make_budget_plan(tiny, analysis, "angular", n_remove=2)
    (step,) = plan.steps
    scores = analysis.similarity.block_scores(2)
    best = min(range(1, 4), key=lambda i: scores[i])  # starts whose block avoids 0 and 5
    assert step.layers == (best, best + 1)


def test_mka_tail_merges_the_last_unprotected_layers(tiny, analysis):
    plan = make_budget_plan(tiny, analysis, "mka-tail", n_remove=2)
    assert [st.layers for st in plan.steps] == [(3, 4), (2, 3)]
    plan = make_budget_plan(tiny, analysis, "mka-tail", n_remove=1, protect_last=False)
    assert plan.steps[0].layers == (4, 5)  # the released code's rule: the last two layers


def test_alpha_rules(tiny, analysis):
    s = analysis.similarity.matrices["npib"]
    fixed = make_budget_plan(tiny, analysis, "mka", n_remove=1, alpha_rule="fixed", alpha=0.3)
    assert fixed.steps[0].weights == pytest.approx((0.3, 0.7))
    row = make_budget_plan(tiny, analysis, "mka", n_remove=1, alpha_rule="rowmean")
    a, b = row.steps[0].layers
    ra, rb = s[a].mean(), s[b].mean()
    assert row.steps[0].weights[0] == pytest.approx(1 / (1 + np.exp(-ra / (ra + rb))))
    with pytest.raises(MkaInputError, match="fixed alpha"):
        make_budget_plan(tiny, analysis, "mka", n_remove=1, alpha_rule="fixed", alpha=1.5)


def test_search_alpha_is_never_worse_than_dropping(tiny, analysis):
    plan = make_budget_plan(tiny, analysis, "mka", n_remove=1, alpha_rule="search")
    step = plan.steps[0]
    a, b = step.layers
    from mka_core.compression.planners.search import SEARCH_SAMPLES, _subset

    small = _subset(analysis.batch, SEARCH_SAMPLES)
    merged = calibration_loss(model_view(tiny.model, plan.layers), small)
    n = tiny.n_layers
    dropped_b = calibration_loss(model_view(tiny.model, compose(n, [_drop(b)])), small)
    assert merged <= dropped_b + 1e-6


def _drop(i):
    from mka_core.compression.plan import Step

    return Step.drop([i])


def test_golden_search_finds_the_minimum_and_checks_the_ends():
    x, fx = _golden_search(lambda a: (a - 0.3) ** 2)
    assert abs(x - 0.3) < 0.05
    x, fx = _golden_search(lambda a: -a)  # best at the end α = 1
    assert x == 1.0 and fx == -1.0


def test_laco_collapse_meets_the_budget_and_keeps_the_model(tiny, analysis):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    plan = make_budget_plan(tiny, analysis, "laco", n_remove=2)
    assert plan.n_removed == 2
    assert all(st.op == "collapse" for st in plan.steps)
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_planning_never_changes_the_model(tiny, analysis):
    fp = model_fingerprint(tiny.model)
    make_budget_plan(tiny, analysis, "mka", n_remove=2, alpha_rule="search")
    make_budget_plan(tiny, analysis, "mka", n_remove=2, recompute=True)
    assert model_fingerprint(tiny.model) == fp == tiny.fingerprint


def test_model_view_matches_apply_plan(tiny, analysis):
    plan = make_budget_plan(tiny, analysis, "mka", n_remove=2)
    ids = analysis.batch.input_ids[:2, :16]
    view = model_view(tiny.model, plan.layers)
    applied = apply_plan(tiny.model, plan)
    hidden = LayerPass.start(view, ids).normed()[0]  # (2, 16, d_model)
    with torch.no_grad(), view.head() as (_, logits):
        torch.testing.assert_close(logits(hidden), applied(ids).logits)


def test_recompute_changes_later_scores_only(tiny, analysis):
    plain = make_budget_plan(tiny, analysis, "mka", n_remove=2)
    again = make_budget_plan(tiny, analysis, "mka", n_remove=2, recompute=True)
    assert plain.steps[0] == again.steps[0]  # the first pick uses the same matrix
    assert again.method["params"]["recompute"] is True


def test_budget_by_ratio_and_errors(tiny, analysis):
    plan = make_budget_plan(tiny, analysis, "shortgpt", ratio=0.5)
    assert plan.n_removed == 3 and plan.compression_ratio == 0.5
    with pytest.raises(MkaInputError, match="leaves nothing but the 2 protected"):
        make_budget_plan(tiny, analysis, "mka", n_remove=4)
    with pytest.raises(MkaInputError, match="unknown planner"):
        make_budget_plan(tiny, analysis, "random", n_remove=1)


def test_manual_picks(tiny, analysis):
    s = analysis.similarity.matrices["npib"]
    plan = make_manual_plan(
        tiny, analysis, [{"op": "merge", "layers": [2, 3]}, {"op": "drop", "layers": [4]}]
    )
    assert plan.layers[2] == [(2, pytest.approx(s[2, 3])), (3, pytest.approx(1 - s[2, 3]))]
    assert plan.n_layers_out == 4
    group = make_manual_plan(tiny, None, [{"op": "merge", "layers": [1, 2, 3]}], alpha_rule="fixed")
    assert [w for _, w in group.layers[1]] == pytest.approx([1 / 3] * 3)
    with pytest.raises(MkaInputError, match="already dropped"):
        make_manual_plan(
            tiny, analysis, [{"op": "drop", "layers": [4]}, {"op": "drop", "layers": [4]}]
        )
    with pytest.raises(MkaInputError, match="at least one"):
        make_manual_plan(tiny, analysis, [])


def test_suffix_loss_equals_the_full_forward(tiny, analysis):
    """The α search and LaCo continue from cached states past the unchanged layers: the same loss
    and final states as a full pass, for less work."""
    from mka_core.compression.plan import Step
    from mka_core.compression.planners.search import (
        _subset,
        continue_from,
        every_block_input,
        final_hidden,
        real_tokens,
        start_pass,
    )

    small = _subset(analysis.batch, 8)
    before = [Step.drop([1])]
    prefix = start_pass(model_view(tiny.model, compose(6, before)), small).run(stop=2)
    lp, inputs = every_block_input(model_view(tiny.model, compose(6, before)), small)
    for x in (0.0, 0.4, 1.0):
        view = model_view(tiny.model, compose(6, [*before, Step.merge([3, 4], [x, 1 - x])]))
        full = calibration_loss(view, small)
        fast = causal_lm_loss(prefix.fork(view))
        assert fast == pytest.approx(full, rel=1e-6)
        for a, b in zip(inputs[2], prefix.hidden):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(
            real_tokens(continue_from(lp, view, 2, inputs[2])), final_hidden(view, small)
        )
