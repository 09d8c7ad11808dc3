"""Integration tests on the real bundled SmolLM2-135M (30 layers, d_model 576, 9/3 heads)."""

import math

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def analysis(bundled):
    from mka_core.workflows.pipeline import analyze

    return analyze(bundled, n_samples=32, max_tokens=64)


def _greedy(loaded, model, prompt, n=12):
    ids = loaded.tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return loaded.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_bundled_model_loads_and_knows_paris(bundled):
    from mka_core.models.loading import summarize

    s = summarize(bundled)
    assert (s.n_layers, s.d_model, s.n_heads, s.n_kv_heads) == (30, 576, 9, 3)
    assert s.architecture == "LlamaForCausalLM"
    assert 130e6 < s.n_params < 140e6
    assert "Paris" in _greedy(bundled, bundled.model, "The capital of France is")


def test_bundled_perplexity_is_plausible(bundled):
    from mka_core.evaluation.evaluate import perplexity
    from mka_core.workflows.pipeline import eval_windows

    ppl = perplexity(bundled.model, eval_windows(bundled, budget_tokens=2048, window=512))
    assert math.isfinite(ppl) and 3 < ppl < 60, ppl


def test_bundled_analysis_gives_30_by_30_matrices(analysis):
    sim = analysis.similarity
    for name in ("npib", "cosine", "angular", "cka"):
        m = sim.matrices[name]
        assert m.shape == (30, 30) and np.isfinite(m).all()
        np.testing.assert_allclose(m, m.T, atol=1e-9)
    np.testing.assert_allclose(np.diag(sim.matrices["npib"]), 1.0)
    assert sim.bi.shape == (30,)
    # the first and last blocks change the residual stream most (ShortGPT's observation)
    assert sim.bi[0] > np.median(sim.bi) and sim.bi[-1] > np.median(sim.bi)


def test_mka_plan_removing_six_layers_applies_generates_evaluates_exports(
    bundled, analysis, tmp_path
):
    from transformers import AutoModelForCausalLM

    from mka_core.workflows.pipeline import EvalSettings, export_run, make_budget_plan, run_plan

    plan = make_budget_plan(bundled, analysis, "mka", n_remove=6)
    assert plan.n_layers_out == 24 and plan.compression_ratio == pytest.approx(0.2)
    run = run_plan(bundled, plan, EvalSettings(budget_tokens=1024, window=512, with_speed=False))
    assert run.compressed.n_layers == 24
    assert run.compressed.params < run.original.params
    assert math.isfinite(run.compressed.perplexity) and run.compressed.kl > 0
    assert 0 < run.compressed.top1 < 1
    assert len(_greedy(bundled, run.model, "Python is a programming language", 8)) > 0
    out = export_run(run, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert plain.config.num_hidden_layers == 24
    ids = torch.tensor([[1, 504, 3458, 314, 2286, 28]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, run.model(ids).logits)
