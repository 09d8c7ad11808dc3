"""Which layers really matter: stability of the measures, measured importance, the loss-guided
planners (sleb, mka-loss, mka with bootstrap NPIB) and the compare sweep, on the tiny model."""

import json

import numpy as np
import pytest
import torch

from mka_core.analysis.stability import StabilityResult, compute_stability, spearman
from mka_core.compression.importance import ImportanceResult, measure_importance, proxy_vs_truth
from mka_core.compression.plan import Step, compose
from mka_core.compression.planners.search import calibration_loss, model_view
from mka_core.errors import MkaInputError
from mka_core.workflows.compare import compare_sweep
from mka_core.workflows.pipeline import analyze, make_budget_plan
from mka_core.workflows.sweep import parse_planners


@pytest.fixture(scope="module")
def analysis(tiny):
    return analyze(tiny, n_samples=48, max_tokens=32, n_boot=4)


def test_stability_is_measured_and_round_trips(analysis, tmp_path):
    st = analysis.stability
    assert isinstance(st, StabilityResult) and st.n_boot == 4
    for m in ("npib", "cosine", "angular", "cka", "bi"):
        assert set(st.split_half[m]) == {"all", "adjacent"}
        rho = st.split_half[m]["all"]
        assert rho is None or -1.0 <= rho <= 1.0
        assert st.spread[m].shape == ((6,) if m == "bi" else (6, 6))
        assert "reproducible" in st.reading(m) or "undefined" in st.reading(m)
    assert st.split_half["bi"]["adjacent"] is None  # BI has no pairs
    assert np.all(st.spread["cosine"] >= 0) and st.npib_mean.shape == (6, 6)
    st.save(tmp_path)
    back = StabilityResult.load(tmp_path)
    assert back.split_half == st.split_half and back.n_boot == st.n_boot
    np.testing.assert_array_equal(back.spread["npib"], st.spread["npib"])
    np.testing.assert_array_equal(back.npib_mean, st.npib_mean)


def test_identical_halves_agree_perfectly(analysis):
    """A capture whose two halves (by document) hold the same rows reproduces exactly."""
    from mka_core.analysis.activations import Activations

    acts = analysis.activations
    half = acts.n_rows // 2
    x = acts.states[:, :half]  # (L+1, half, H)
    states = np.repeat(x, 2, axis=1)  # rows 2i and 2i+1 are the same row
    labels = [f"{side}{i}" for i in range(half) for side in ("a", "b")]  # a0 b0 a1 b1 ...
    twin = Activations(states, np.arange(2 * half), labels, acts.pooling, acts.meta)
    st = compute_stability(twin, analysis.similarity.params, n_boot=2)
    assert st.params["split"] == "documents"
    for m in ("cosine", "angular", "cka", "npib", "bi"):
        assert st.split_half[m]["all"] == pytest.approx(1.0), m


def test_spearman_edge_cases():
    assert spearman(np.array([1, 2, 3]), np.array([3, 2, 1])) == pytest.approx(-1.0)
    assert spearman(np.array([1, 1, 1]), np.array([1, 2, 3])) is None
    assert spearman(np.array([1, 2]), np.array([1, 2])) is None


def test_importance_is_the_real_loss_increase(tiny, analysis, tmp_path):
    imp = measure_importance(tiny, analysis.batch, analysis.similarity, n_samples=8)
    assert len(imp.drop) == 6 and len(imp.merge) == 5 and len(imp.merge_alpha) == 5
    small = analysis.batch.subset(8)
    # the prefix-reusing measurement equals a full forward pass of the changed model
    full_drop = calibration_loss(model_view(tiny.model, compose(6, [Step.drop([3])])), small)
    assert imp.base_loss + imp.drop[3] == pytest.approx(full_drop, rel=1e-5)
    a = imp.merge_alpha[2]
    merged = compose(6, [Step.merge([2, 3], [a, 1 - a])])
    full_merge = calibration_loss(model_view(tiny.model, merged), small)
    assert imp.base_loss + imp.merge[2] == pytest.approx(full_merge, rel=1e-5)
    assert a == pytest.approx(analysis.similarity.matrices["npib"][2, 3])
    table = proxy_vs_truth(analysis.similarity, imp)
    assert set(table) == {"bi", "angular", "cosine", "cka", "npib"}
    for v in table.values():
        assert v["drop"] is None or -1 <= v["drop"] <= 1
    imp.save(tmp_path)
    assert ImportanceResult.load(tmp_path) == imp
    with pytest.raises(MkaInputError, match="alpha rule"):
        measure_importance(tiny, analysis.batch, analysis.similarity, alpha_rule="search")


def test_sleb_drops_the_cheapest_layer_first(tiny, analysis):
    plan = make_budget_plan(tiny, analysis, "sleb", n_remove=2)
    assert plan.method["planner"] == "sleb" and plan.n_layers_out == 4
    first = plan.steps[0].layers[0]
    small = analysis.batch.subset(16)
    losses = {
        i: calibration_loss(model_view(tiny.model, compose(6, [Step.drop([i])])), small)
        for i in range(1, 5)
    }
    assert first == min(losses, key=losses.get)  # the greedy choice, measured directly
    assert {i for st in plan.steps for i in st.layers}.isdisjoint({0, 5})


def test_mka_loss_merges_and_is_never_worse_than_dropping_the_pair(tiny, analysis):
    plan = make_budget_plan(tiny, analysis, "mka-loss", n_remove=1)
    (step,) = plan.steps
    assert step.op == "merge" and plan.method["alpha"] == "search"
    a, b = step.layers
    small = analysis.batch.subset(16)
    merged = calibration_loss(model_view(tiny.model, plan.layers), small)
    for drop in (a, b):
        dropped = calibration_loss(model_view(tiny.model, compose(6, [Step.drop([drop])])), small)
        assert merged <= dropped + 1e-6


def test_mka_with_bootstrap_npib(tiny, analysis):
    plan = make_budget_plan(tiny, analysis, "mka", n_remove=1, npib="bootstrap")
    assert plan.method["similarity"] == "npib-bootstrap"
    s = analysis.stability.npib_mean
    a, b = plan.steps[0].layers
    assert plan.steps[0].weights[0] == pytest.approx(s[a, b])
    no_stab = type(analysis)(analysis.batch, analysis.activations, analysis.similarity)
    with pytest.raises(MkaInputError, match="stability"):
        make_budget_plan(tiny, no_stab, "mka", n_remove=1, npib="bootstrap")


def test_compare_sweep_table(tiny, analysis, tmp_path):
    res = compare_sweep(
        tiny,
        analysis,
        "mka,shortgpt,sleb",
        "1,2",
        transact=True,
        eval_budget=512,
        eval_window=128,
    )
    rows = res.rows
    assert rows[0]["config"] == "original" and rows[0]["kl"] == 0.0
    configs = [r["config"] for r in rows[1:]]
    assert configs == [
        "mka -1",
        "shortgpt -1",
        "sleb -1",
        "mka -2",
        "shortgpt -2",
        "sleb -2",
        "transact -1",
        "transact -2",
    ]
    for r in rows[1:]:
        assert r["perplexity"] > 0 and 0 <= r["top1"] <= 1 and r["kl"] >= 0
        assert r["perplexity_half_a"] > 0 and r["perplexity_half_b"] > 0
    by = {r["config"]: r for r in rows}
    # TransAct matches the parameters of the layer-removed rows of its budget (to a neuron)
    per_neuron = 6 * 3 * 64
    assert abs(by["transact -2"]["params"] - by["shortgpt -2"]["params"]) <= per_neuron
    out = res.save(tmp_path / "cmp")
    assert {"compare.csv", "compare.json", "plans.json", "compare.html"} <= {
        p.name for p in out.iterdir()
    }
    doc = json.loads((out / "compare.json").read_text())
    assert doc["format"] == "mka-compare" and len(doc["rows"]) == 9
    assert len(json.loads((out / "plans.json").read_text())["plans"]) == 6


def test_compare_bad_input_is_refused_before_running(tiny, analysis):
    with pytest.raises(MkaInputError, match="unknown planner 'nope'"):
        parse_planners("mka,nope")
    with pytest.raises(MkaInputError, match="takes one of"):
        parse_planners("mka:sometimes")
    with pytest.raises(MkaInputError, match="budget"):
        compare_sweep(tiny, analysis, "shortgpt", "9", eval_budget=512, eval_window=128)
    with pytest.raises(MkaInputError, match="does not answer"):
        compare_sweep(
            tiny, analysis, "shortgpt", "1", executor="ray", address="127.0.0.1:1", eval_budget=512
        )


def test_ray_executor_gives_the_local_table(tiny, analysis):
    pytest.importorskip("ray", reason="ray is an optional extra (requirements.txt installs it)")
    kw = dict(eval_budget=512, eval_window=128)
    local = compare_sweep(tiny, analysis, "shortgpt,mka", "1", **kw)
    remote = compare_sweep(tiny, analysis, "shortgpt,mka", "1", executor="ray", **kw)
    assert [r["config"] for r in remote.rows] == [r["config"] for r in local.rows]
    for a, b in zip(local.rows, remote.rows):
        for key in ("perplexity", "kl", "top1", "params"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["config"], key)
    assert torch.get_num_threads() >= 1


def test_greedy_plans_are_prefixes_so_compare_plans_once(tiny, analysis):
    """compare plans sleb / mka / shortgpt once at the largest budget and takes prefixes: the
    prefix is what planning the smaller budget directly gives."""
    from mka_core.workflows.sweep import Config, _Planned

    planned = _Planned(tiny, analysis, 0.5, None, None)
    for name in ("sleb", "mka", "shortgpt", "mka-loss"):
        small, _ = planned.get(Config(name, None, 1), [1, 2])
        direct = make_budget_plan(tiny, analysis, name, n_remove=1)
        assert small.steps == direct.steps, name
        assert small.method["params"]["note"].startswith("the first 1 steps")


def test_mka_loss_is_planned_once_per_what_its_search_scores(tiny, analysis):
    """compare shares one mka-loss run between the specs whose search is the same (α-merges with
    any compensation; flatten alone and with scale) and plans again when it scores otherwise
    (flattened merges; flattened merges with their linear maps)."""
    from mka_core.compression.refinement import Refine
    from mka_core.workflows.sweep import Config, _Planned

    planned = _Planned(tiny, analysis, 0.5, None, None)
    got = {
        r: planned.get(Config("mka-loss", None, 1, Refine(*r.split("+"))), [1])[0]
        for r in (
            "average+none",
            "average+linear",
            "flatten+none",
            "flatten+scale",
            "flatten+linear",
        )
    }
    assert len(planned.runs) == 3
    assert got["average+linear"].steps == got["average+none"].steps
    assert got["average+none"].method["alpha"] == "search"
    assert got["flatten+scale"].steps == got["flatten+none"].steps
    assert got["flatten+scale"].refine == Refine("flatten", "scale")
    assert got["flatten+none"].method["params"]["scored"] == "flatten"
    assert got["flatten+linear"].method["params"]["scored"] == "flatten+linear"
