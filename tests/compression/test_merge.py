"""Applying plans: the weights each output block gets, a consistent config and KV cache, and the
caller's model left alone."""

import logging

import pytest
import torch

from mka_core.compression.merge import apply_plan
from mka_core.compression.plan import ModelRef, Plan, Step, make_plan
from mka_core.errors import MkaInputError
from mka_core.models.loading import get_layers
from mka_core.models.tiny import tiny_config


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """A tiny model's ops take microseconds: extra threads only add hand-offs, and on a busy
    machine OpenMP's waiting turns a 3 ms forward into a second."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11]])  # (1, 10) token ids


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits  # (batch, seq, vocab)


def plan_for(model, *steps):
    return make_plan(ModelRef.from_loaded(model), steps, {"planner": "manual"})


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def block_param(model, layer, name="self_attn.q_proj.weight"):
    return dict(get_layers(model)[layer].named_parameters())[name]


def test_identity_plan_is_bit_exact(tiny):
    out = apply_plan(tiny.model, Plan.identity(ModelRef.from_loaded(tiny)))
    assert out is not tiny.model
    assert torch.equal(logits(out), logits(tiny.model))
    ref = tiny.model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in out.state_dict().items())


def test_callers_model_is_untouched(tiny):
    before = snapshot(tiny.model)
    plan = plan_for(
        tiny.model, Step.merge((1, 2), (0.3, 0.7)), Step.collapse((3, 4)), Step.drop((5,))
    )
    out = apply_plan(tiny.model, plan)
    after = tiny.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(get_layers(tiny.model)) == 6 and tiny.model.config.num_hidden_layers == 6
    assert [b.self_attn.layer_idx for b in get_layers(tiny.model)] == list(range(6))
    assert len(get_layers(out)) == 3


def test_merged_block_is_the_weighted_sum_of_every_tensor(tiny):
    alpha = 0.3
    out = apply_plan(tiny.model, plan_for(tiny.model, Step.merge((1, 2), (alpha, 1 - alpha))))
    a, b = get_layers(tiny.model)[1], get_layers(tiny.model)[2]
    merged = dict(get_layers(out)[1].named_parameters())
    names = dict(a.named_parameters())
    assert len(names) == 9  # q k v o, gate up down, two norms
    for name, pa in names.items():
        pb = dict(b.named_parameters())[name]
        torch.testing.assert_close(merged[name], alpha * pa + (1 - alpha) * pb)
    # the untouched neighbours are copied bit for bit
    assert torch.equal(block_param(out, 0), block_param(tiny.model, 0))
    assert torch.equal(block_param(out, 2), block_param(tiny.model, 3))


def test_chained_merge_and_collapse_weights(tiny):
    a1, a2 = 0.6, 0.25
    out = apply_plan(
        tiny.model,
        plan_for(
            tiny.model,
            Step.merge((1, 2), (a1, 1 - a1)),
            Step.merge((1, 3), (a2, 1 - a2)),
            Step.collapse((4, 5)),
        ),
    )
    w = [block_param(tiny.model, i) for i in range(6)]
    want = a2 * a1 * w[1] + a2 * (1 - a1) * w[2] + (1 - a2) * w[3]
    torch.testing.assert_close(block_param(out, 1), want)
    torch.testing.assert_close(block_param(out, 2), w[4] + (w[5] - w[4]))  # LaCo
    assert len(get_layers(out)) == 3


def test_merging_identical_layers_equals_dropping_one(tiny_copy):
    model = tiny_copy.model
    layers = get_layers(model)
    layers[3].load_state_dict(layers[2].state_dict())  # layer 3 := layer 2
    dropped = logits(apply_plan(model, plan_for(model, Step.drop((3,)))))
    assert not torch.allclose(dropped, logits(model))  # dropping does change the model
    for alpha in (0.0, 0.3, 0.5, 0.91, 1.0):
        merged = apply_plan(model, plan_for(model, Step.merge((2, 3), (alpha, 1 - alpha))))
        torch.testing.assert_close(logits(merged), dropped, atol=1e-6, rtol=1e-5)


def test_alpha_one_equals_dropping_b_and_zero_dropping_a(tiny):
    m = tiny.model
    for weights, drop in (((1.0, 0.0), 3), ((0.0, 1.0), 2)):
        merged = apply_plan(m, plan_for(m, Step.merge((2, 3), weights)))
        dropped = apply_plan(m, plan_for(m, Step.drop((drop,))))
        torch.testing.assert_close(logits(merged), logits(dropped), atol=1e-6, rtol=1e-5)
    half = apply_plan(m, plan_for(m, Step.merge((2, 3), (0.5, 0.5))))
    assert (logits(half) - logits(dropped)).abs().max() > 1e-4  # α matters in between


def test_layer_idx_and_config_are_consistent(tiny):
    plan = plan_for(tiny.model, Step.drop((0,)), Step.merge((2, 3), (0.5, 0.5)), Step.drop((5,)))
    out = apply_plan(tiny.model, plan)
    blocks = get_layers(out)
    assert len(blocks) == 3 == out.config.num_hidden_layers == plan.n_layers_out
    assert [b.self_attn.layer_idx for b in blocks] == [0, 1, 2]
    assert out.model.config is out.config
    assert out.config.architectures == ["LlamaForCausalLM"]


def test_per_layer_config_lists_take_the_first_source(tiny_copy):
    model = tiny_copy.model
    model.config.layer_marks = [10, 11, 12, 13, 14, 15]
    model.config.layer_names = ("a", "b", "c", "d", "e", "f")
    plan = plan_for(model, Step.merge((2, 3), (0.5, 0.5)), Step.drop((5,)))
    out = apply_plan(model, plan)
    assert out.config.layer_marks == [10, 11, 12, 14]
    assert out.config.layer_names == ("a", "b", "c", "e")
    assert model.config.layer_marks == [10, 11, 12, 13, 14, 15]  # the caller's config too


def test_qwen2_sliding_layer_types_trimmed_and_generate_runs():
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("qwen2")
    cfg.use_sliding_window, cfg.sliding_window = True, 4
    cfg.layer_types = ["full_attention", "sliding_attention"] * 3
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    plan = plan_for(model, Step.drop((1, 2)), Step.merge((3, 4), (0.4, 0.6)))
    out = apply_plan(model, plan)
    assert out.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert out.config.num_hidden_layers == 3
    assert [b.self_attn.sliding_window for b in get_layers(out)] == [None, 4, 4]
    with torch.no_grad():
        cached = out.generate(IDS[:, :6], max_new_tokens=8, do_sample=False, pad_token_id=0)
        plain = out.generate(
            IDS[:, :6], max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0
        )
    assert cached.shape == (1, 14) and torch.equal(cached, plain)


def test_generate_with_cache_matches_without(tiny):
    plan = plan_for(
        tiny.model, Step.merge((1, 2), (0.7, 0.3)), Step.collapse((3, 4)), Step.drop((5,))
    )
    out = apply_plan(tiny.model, plan)
    prompt = IDS[:, :5]
    with torch.no_grad():
        cached = out.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
        plain = out.generate(
            prompt, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0
        )
    assert cached.shape == (1, 17)
    assert torch.equal(cached, plain)
    assert torch.equal(cached[:, :5], prompt)


def test_bfloat16_merge_is_computed_in_fp32_and_cast_back(tiny_copy):
    model = tiny_copy.model.to(torch.bfloat16)
    alpha = 0.37
    out = apply_plan(model, plan_for(model, Step.merge((2, 3), (alpha, 1 - alpha))))
    a, b = block_param(model, 2), block_param(model, 3)
    got = block_param(out, 2)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, (alpha * a.float() + (1 - alpha) * b.float()).to(torch.bfloat16))
    assert torch.equal(block_param(out, 3), block_param(model, 4))  # single source: bit exact


def test_inplace_changes_and_returns_the_given_model(tiny_copy):
    model = tiny_copy.model
    out = apply_plan(model, plan_for(model, Step.drop((1,))), inplace=True)
    assert out is model and len(get_layers(model)) == 5 and model.config.num_hidden_layers == 5


def test_wrong_model_for_the_plan(tiny, tiny_copy, caplog):
    big = Plan.identity(ModelRef("big", "LlamaForCausalLM", 30, "x"))
    with pytest.raises(
        MkaInputError, match="plan is for a 30-layer model .big., but this model has 6"
    ):
        apply_plan(tiny.model, big)
    with pytest.raises(MkaInputError, match="needs a Plan"):
        apply_plan(tiny.model, {"steps": []})
    plan = plan_for(tiny.model, Step.drop((1,)))
    with torch.no_grad():
        get_layers(tiny_copy.model)[0].self_attn.q_proj.weight.add_(1.0)
    with caplog.at_level(logging.WARNING, logger="mka_core.compression.merge"):
        apply_plan(tiny_copy.model, plan)
    assert any("differs from the plan's" in r.getMessage() for r in caplog.records)


def test_accepts_a_loaded_model(tiny):
    out = apply_plan(tiny, plan_for(tiny.model, Step.drop((4,))))
    assert len(get_layers(out)) == 5 and len(get_layers(tiny.model)) == 6
