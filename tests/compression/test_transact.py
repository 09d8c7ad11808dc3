"""TransAct pruning on the tiny random Llama (6 layers, d_model 64, 4 query heads over 2 KV heads,
intermediate 128), and the cuts of other block layouts: fused projections, experts."""

import json

import numpy as np
import pytest
import torch

from mka_core.compression.transact import TransActReport, prune, score_units, target_shape
from mka_core.data.corpus import builtin_corpus, make_calibration
from mka_core.engine.adapters import Narrow, narrow, narrowed_shape
from mka_core.errors import MkaInputError
from mka_core.models.loading import count_params, get_layers, load_model


def _logits(model, batch, n=4):
    with torch.inference_mode():
        return model(input_ids=batch.input_ids[:n], attention_mask=batch.attention_mask[:n]).logits


def test_keep_all_is_identity_and_leaves_the_caller_alone(tiny, tiny_batch):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    ref = _logits(tiny.model, tiny_batch)
    out, rep = prune(tiny.model, tiny_batch, mlp_keep=1.0, heads_keep=1.0)
    assert out is not tiny.model
    assert torch.equal(_logits(out, tiny_batch), ref)
    assert rep.new_intermediate_size == rep.original_intermediate_size == 128
    assert (rep.new_n_heads, rep.new_n_kv_heads) == (4, 2)
    assert rep.params_after == rep.params_before
    # the caller's model is untouched by a real prune too
    prune(tiny.model, tiny_batch, mlp_keep=0.5, heads_keep=0.5, shots=2)
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert tiny.model.config.intermediate_size == 128


def test_scores_ignore_padding(tiny, tiny_batch):
    # the same samples padded wider (with a non-pad token id, to be sure) give the same scores
    b = tiny_batch
    wide = type(b)(
        torch.cat([b.input_ids, torch.full((b.n_samples, 7), 5)], dim=1),
        torch.cat([b.attention_mask, torch.zeros(b.n_samples, 7, dtype=torch.long)], dim=1),
        b.doc_index,
        b.labels,
    )
    s1, s2 = score_units(tiny.model, b), score_units(tiny.model, wide, batch_size=5)
    assert s1.mlp.shape == (6, 128) and s1.heads.shape == (6, 4)
    np.testing.assert_allclose(s1.mlp, s2.mlp, rtol=1e-4)
    np.testing.assert_allclose(s1.heads, s2.heads, rtol=1e-4)


def test_silenced_neuron_scores_lowest_and_goes_first(tiny_copy, tiny_batch):
    j = 37
    for layer in get_layers(tiny_copy.model):
        # act(gate)*up with gate row 0 and up row 0 is 0 on every token: neuron j never fires
        layer.mlp.gate_proj.weight.data[j] = 0
        layer.mlp.up_proj.weight.data[j] = 0
    scores = score_units(tiny_copy.model, tiny_batch)
    assert (scores.mlp.argmin(axis=1) == j).all()
    assert (scores.mlp[:, j] == 0).all()
    _, rep = prune(tiny_copy.model, tiny_batch, mlp_keep=127, shots=1)
    assert rep.new_intermediate_size == 127
    assert all(kept == [i for i in range(128) if i != j] for kept in rep.mlp_kept)


def test_silenced_head_ranks_last_and_is_pruned(tiny_copy, tiny_batch):
    # A single query head cannot be silenced through the weights under GQA: its output is
    # softmax(q k^T) v with v shared by the whole KV group, and zeroing its q rows only makes the
    # attention uniform (an average of v, not zero). So zero its slice of the o_proj input with a
    # pre-hook registered *before* prune's scoring hooks (hooks run in registration order; deepcopy
    # carries the hook along). Head 1 lives in KV group 0 (heads 0, 1 share KV head 0).
    h, hd = 1, 16

    def silence(module, args):
        x = args[0].clone()
        x[..., h * hd : (h + 1) * hd] = 0
        return (x,)

    for layer in get_layers(tiny_copy.model):
        layer.self_attn.o_proj.register_forward_pre_hook(silence)
    scores = score_units(tiny_copy.model, tiny_batch)
    assert (scores.heads.argmin(axis=1) == h).all()
    _, rep = prune(tiny_copy.model, tiny_batch, heads_keep=0.5, shots=1)
    # one head per KV group: group 0 keeps head 0, its silenced partner goes
    assert all(kept[0] == 0 and h not in kept for kept in rep.heads_kept)


def test_silenced_kv_group_is_pruned_as_a_whole(tiny_copy, tiny_batch):
    # zero values of KV head 1 silence both query heads of group 1 (heads 2, 3) exactly
    for layer in get_layers(tiny_copy.model):
        layer.self_attn.v_proj.weight.data[16:32] = 0
    out, rep = prune(tiny_copy.model, tiny_batch, heads_keep=0.25, shots=2)
    assert (rep.new_n_heads, rep.new_n_kv_heads) == (1, 1)
    assert all(kept in ([0], [1]) for kept in rep.heads_kept)
    attn = get_layers(out)[0].self_attn
    assert attn.k_proj.weight.shape == (16, 64) and attn.v_proj.weight.shape == (16, 64)
    assert attn.num_key_value_groups == 1


def test_shapes_config_and_gqa_after_pruning(tiny, tiny_batch):
    out, rep = prune(tiny.model, tiny_batch, mlp_keep=0.5, heads_keep=0.5, shots=4)
    cfg = out.config
    assert cfg.intermediate_size == 64 and rep.new_intermediate_size == 64
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (
        2,
        2,
        16,
    )
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    for i, layer in enumerate(get_layers(out)):
        mlp, attn = layer.mlp, layer.self_attn
        assert mlp.gate_proj.weight.shape == (64, 64) and mlp.up_proj.weight.shape == (
            64,
            64,
        )
        assert mlp.down_proj.weight.shape == (64, 64)
        assert attn.q_proj.weight.shape == (32, 64) and attn.o_proj.weight.shape == (
            64,
            32,
        )
        assert attn.k_proj.weight.shape == (32, 64)  # every KV group stays
        assert attn.num_key_value_groups == 1
        # one query head kept in each KV group (heads 0-1 -> group 0, heads 2-3 -> group 1)
        assert [k // 2 for k in rep.heads_kept[i]] == [0, 1]
    assert rep.params_after == count_params(out) < rep.params_before
    assert [s["intermediate_size"] for s in rep.shots] == [112, 96, 80, 64]
    assert np.asarray(rep.mlp_scores).shape == (
        6,
        80,
    )  # the last pass scored 80 neurons
    assert np.asarray(rep.mlp_scores_index).shape == (6, 80)


def test_generate_with_cache_and_absolute_counts(tiny, tiny_batch):
    out, rep = prune(tiny.model, tiny_batch, mlp_keep=48, heads_keep=2, shots=2)
    assert (rep.new_intermediate_size, rep.new_n_heads) == (48, 2)
    prompt = tiny_batch.input_ids[:2, :6]
    with torch.inference_mode():
        cached = out.generate(
            prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0
        )
        plain = out.generate(
            prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0
        )
    assert cached.shape == (2, 14)
    assert torch.equal(cached, plain)


def test_export_reloads_with_plain_transformers(tiny, tiny_batch, tmp_path):
    from transformers import AutoModelForCausalLM

    out, _ = prune(tiny.model, tiny_batch, mlp_keep=0.5, heads_keep=0.25, shots=2)
    out.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert back.config.num_attention_heads == 1 and back.config.intermediate_size == 64
    torch.testing.assert_close(
        _logits(back, tiny_batch), _logits(out, tiny_batch), atol=1e-5, rtol=1e-5
    )


def test_report_round_trips_through_json(tiny, tiny_batch):
    _, rep = prune(tiny.model, tiny_batch, mlp_keep=0.75, shots=2)
    back = TransActReport.from_dict(json.loads(json.dumps(rep.to_dict())))
    assert back == rep
    assert 0 < rep.param_reduction < 1
    with pytest.raises(MkaInputError, match="format"):
        TransActReport.from_dict({"format": "something-else"})


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"mlp_keep": 0}, "mlp_keep"),
        ({"mlp_keep": -0.5}, "-0.5"),
        ({"mlp_keep": 1.5}, "1.5"),
        ({"mlp_keep": 129}, "larger than the model's 128"),
        ({"heads_keep": 5}, "heads_keep = 5"),
        ({"heads_keep": True}, "True"),
        ({"heads_keep": "half"}, "'half'"),
        ({"mlp_keep": float("nan")}, "nan"),
        ({"shots": 0}, "shots"),
    ],
)
def test_invalid_keep_values(tiny, tiny_batch, kw, words):
    with pytest.raises(MkaInputError, match=words) as e:
        prune(tiny.model, tiny_batch, **kw)
    assert "\n" not in str(e.value)


def test_target_shape_matches_what_prune_gives(tiny, tiny_batch):
    for mlp_keep, heads_keep in ((0.5, 0.5), (100, 1.0), (0.3, 0.25)):
        t = target_shape(tiny.model, mlp_keep, heads_keep)
        model, _ = prune(tiny.model, tiny_batch, mlp_keep=mlp_keep, heads_keep=heads_keep, shots=1)
        cfg = model.config
        assert t["intermediate"] == (128, cfg.intermediate_size)
        assert t["n_heads"] == (4, cfg.num_attention_heads)
        assert t["n_kv_heads"] == (2, cfg.num_key_value_heads)


# ---------------------------------------------------------------------------------------------
# other block layouts (engine.adapters)


def test_fused_projections_are_cut_as_their_separate_parts_would_be():
    torch.manual_seed(0)
    hd, counts = 16, {"heads": 4, "kv": 2}
    q, k, v = torch.randn(4 * hd, 64), torch.randn(2 * hd, 64), torch.randn(2 * hd, 64)
    sel = {"heads": torch.tensor([1, 3]), "kv": torch.tensor([1]), "mlp": None}
    fused_rule = Narrow(0, ("heads", "kv", "kv"))
    cut = narrow(torch.cat([q, k, v]), fused_rule, sel, counts, hd)
    rows = {
        kind: narrow(t, Narrow(0, (kind,)), sel, counts, hd)
        for kind, t in (("heads", q), ("kv", k))
    }
    assert torch.equal(rows["heads"], torch.cat([q[16:32], q[48:64]]))
    assert torch.equal(rows["kv"], k[16:32])
    assert torch.equal(cut, torch.cat([rows["heads"], k[16:32], v[16:32]]))
    assert narrowed_shape((8 * hd, 64), fused_rule, sel, counts, hd) == cut.shape == (4 * hd, 64)
    # Phi-3's gate_up_proj: both halves keep the same neurons
    gate, up = torch.randn(128, 64), torch.randn(128, 64)
    keep = {"mlp": torch.tensor([0, 5, 127])}
    half = narrow(torch.cat([gate, up]), Narrow(0, ("mlp", "mlp")), keep, counts, hd)
    assert torch.equal(half, torch.cat([gate[[0, 5, 127]], up[[0, 5, 127]]]))
    # experts: each its own neurons, on the middle dimension
    experts = torch.randn(2, 2 * 8, 4)  # (n_experts, gate and up rows, d_model)
    own = {"mlp": torch.tensor([[0, 7], [3, 4]])}
    cut = narrow(experts, Narrow(1, ("mlp", "mlp"), experts=True), own, counts, hd)
    assert torch.equal(cut[1], experts[1][[3, 4, 11, 12]]) and cut.shape == (2, 4, 4)


def test_a_silenced_expert_neuron_goes_first_in_its_own_expert_only():
    loaded = load_model("tiny:mixtral", dtype="fp32")
    model = loaded.model
    batch = make_calibration(loaded.tokenizer, builtin_corpus()[0], n_samples=12, max_tokens=32)
    e, j, width = 1, 5, 32
    for layer in get_layers(model):
        # gate and up rows of neuron j of expert e: act(0) * 0 = 0 on every token routed there
        layer.mlp.experts.gate_up_proj.data[e, [j, width + j]] = 0
    scores = score_units(model, batch)
    assert scores.mlp.shape == (6, 4, width)
    assert (scores.mlp[:, e, j] == 0).all() and (scores.mlp[:, e].argmin(axis=1) == j).all()
    assert (scores.mlp[:, [0, 2, 3]] > 0).all()  # every expert gets calibration tokens here
    out, rep = prune(model, batch, mlp_keep=31, shots=1)
    assert rep.n_experts == 4 and rep.new_intermediate_size == 31
    for kept in rep.mlp_kept:  # units numbered expert * 32 + neuron
        assert len(kept) == 4 * 31 and e * width + j not in kept
        assert any(x * width + j in kept for x in (0, 2, 3))
    assert get_layers(out)[0].mlp.experts.down_proj.shape == (4, 64, 31)
    assert out.config.intermediate_size == 31 and model.config.intermediate_size == 32
