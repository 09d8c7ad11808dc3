"""Families beyond Llama: Phi-3 (fused qkv_proj and gate_up_proj), Mixtral and Qwen3-MoE (mixtures of
experts), OLMo-2 (norms after attention and MLP, q/k norms over every head), as tiny random models.

Every command works on each (analyze, every planner, apply, evaluate, TransAct, export), in memory
and streamed alike; merging mixture-of-experts layers is refused in one line; a block layout no
adapter knows is refused in one line by TransAct, and nothing else needs an adapter."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from mka_core.cli.main import main
from mka_core.compression.merge import apply_plan
from mka_core.compression.plan import Step, make_plan
from mka_core.compression.transact import prune
from mka_core.data.corpus import builtin_corpus, make_calibration
from mka_core.engine.adapters import block_adapter
from mka_core.engine.weights import SafetensorsStore
from mka_core.errors import MkaInputError
from mka_core.models.loading import get_layers, load_model
from mka_core.models.tiny import tiny_config, tiny_folder, tiny_tokenizer
from mka_core.workflows.export import save_model
from mka_core.workflows.pipeline import analyze

FAMILIES = ["phi3", "mixtral", "qwen3_moe", "olmo2"]
MOE = {"mixtral", "qwen3_moe"}
CALIB = ["--samples", "16", "--tokens", "32"]
EVAL = ["--budget", "256", "--window", "64", "--no-speed", "--no-generations"]


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request):
    """(arch, in memory, streamed, calibration batch), computing in fp32: the two paths must agree
    bit for bit."""
    arch = request.param
    resident = load_model(f"tiny:{arch}", dtype="fp32", offload=False)
    streamed = load_model(f"tiny:{arch}", dtype="fp32", offload=True)
    calib, _ = builtin_corpus()
    batch = make_calibration(resident.tokenizer, calib, n_samples=12, max_tokens=32)
    return arch, resident, streamed, batch


def _logits(model, batch, n=4):
    with torch.inference_mode():
        return model(input_ids=batch.input_ids[:n], attention_mask=batch.attention_mask[:n]).logits


def _same_exports(a, b) -> SafetensorsStore:
    sa, sb = SafetensorsStore(a), SafetensorsStore(b)
    assert set(sa.names()) == set(sb.names())
    for name in sa.names():
        assert torch.equal(sa.get(name), sb.get(name)), name
    assert json.loads((a / "config.json").read_text()) == json.loads(
        (b / "config.json").read_text()
    )
    return sa


def _reloads_like(folder, model, batch):
    """Plain transformers loads the folder, its logits are `model`'s, and it generates (with the
    KV cache as without)."""
    back = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(back, batch), _logits(model, batch), atol=1e-5, rtol=1e-5)
    prompt = batch.input_ids[:2, :6]
    with torch.inference_mode():
        cached = back.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        plain = back.generate(
            prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0
        )
    assert cached.shape == (2, 12) and torch.equal(cached, plain)
    return back


def test_analysis_is_the_same_streamed(fam):
    arch, resident, streamed, _ = fam
    assert streamed.streamed and not resident.streamed
    assert streamed.fingerprint == resident.fingerprint
    a = analyze(resident, n_samples=16, max_tokens=32, stability=False)
    b = analyze(streamed, n_samples=16, max_tokens=32, stability=False)
    assert a.activations.states.shape[0] == 7  # the embeddings, then each of the 6 blocks
    np.testing.assert_array_equal(a.activations.states, b.activations.states)
    for name, m in a.similarity.matrices.items():
        np.testing.assert_allclose(m, b.similarity.matrices[name], rtol=0, atol=1e-12, err_msg=name)


def test_transact_is_the_same_streamed_and_reloads(fam, tmp_path):
    arch, resident, streamed, batch = fam
    a, rep_a = prune(resident.model, batch, mlp_keep=0.5, heads_keep=0.5, shots=2)
    b, rep_b = prune(streamed.model, batch, mlp_keep=0.5, heads_keep=0.5, shots=2)
    assert rep_a.mlp_kept == rep_b.mlp_kept and rep_a.heads_kept == rep_b.heads_kept
    assert rep_a.params_after == rep_b.params_after < rep_a.params_before
    assert (rep_a.new_n_heads, rep_a.new_n_kv_heads) == (2, 2)
    exported = _same_exports(
        save_model(a, resident.tokenizer, tmp_path / "a"),
        save_model(b, streamed.tokenizer, tmp_path / "b"),
    )
    # the layout save_pretrained writes (experts one tensor per expert), names and all
    assert set(exported.names()) == set(SafetensorsStore(tiny_folder(arch, 0)).names())
    back = _reloads_like(tmp_path / "b", a, batch)
    cfg, layer = back.config, get_layers(back)[0]
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 2, 16)
    if arch == "phi3":  # q rows of 2 heads, k and v rows of 2 groups; gate and up halves of 64
        assert layer.self_attn.qkv_proj.weight.shape == (6 * 16, 64)
        assert layer.mlp.gate_up_proj.weight.shape == (2 * 64, 64)
        assert cfg.intermediate_size == 64
    if arch == "olmo2":  # q/k norms span every kept head
        assert layer.self_attn.q_norm.weight.shape == layer.self_attn.k_norm.weight.shape == (32,)
    if arch in MOE:
        _check_experts(arch, resident, a, back, rep_a)


def _check_experts(arch, resident, pruned, back, rep):
    """Every expert keeps 16 of its 32 neurons, its own best by the last scores; the router (all 4
    experts) is untouched."""
    key = "moe_intermediate_size" if arch == "qwen3_moe" else "intermediate_size"
    assert getattr(back.config, key) == 16 and rep.new_intermediate_size == 16
    assert rep.n_experts == 4
    for i in range(6):
        old, new = get_layers(resident.model)[i].mlp, get_layers(back)[i].mlp
        assert torch.equal(new.gate.weight, old.gate.weight)
        assert new.experts.gate_up_proj.shape == (4, 32, 64)
        assert new.experts.down_proj.shape == (4, 64, 16)
        # the flat units of the last scoring pass, expert by expert: the kept are each one's top 16
        scores = np.asarray(rep.mlp_scores[i]).reshape(4, -1)
        index = np.asarray(rep.mlp_scores_index[i]).reshape(4, -1)
        kept = np.asarray(rep.mlp_kept[i]).reshape(4, 16)
        for e in range(4):
            top = index[e][np.argsort(-scores[e], kind="stable")[:16]]
            assert sorted(top) == sorted(kept[e]), (i, e)
    within = [np.asarray(rep.mlp_kept[0]).reshape(4, 16)[e] - 32 * e for e in range(4)]
    assert len({tuple(w) for w in within}) > 1  # each expert its own neurons, not one index set
    # the pruned model in memory uses the same weights as the one reloaded
    assert torch.equal(
        get_layers(pruned)[0].mlp.experts.down_proj, get_layers(back)[0].mlp.experts.down_proj
    )


def test_plans_apply_alike_in_memory_and_streamed(fam, tmp_path):
    """A drop works everywhere; a merge works on dense blocks and is refused, in one line, on
    mixture-of-experts blocks, in memory and streamed."""
    arch, resident, streamed, batch = fam
    merge = make_plan(resident, [Step.merge((2, 3), (0.6, 0.4))], {})
    if arch in MOE:
        for model in (resident.model, streamed.model):
            with pytest.raises(
                MkaInputError, match="cannot merge layers 2 and 3: they are mix"
            ) as e:
                apply_plan(model, merge)
            assert "\n" not in str(e.value)
        plan = make_plan(resident, [Step.drop((2,)), Step.drop((4,))], {})
    else:
        plan = make_plan(resident, [merge.steps[0], Step.drop((4,))], {})
    a = apply_plan(resident.model, plan)
    b = apply_plan(streamed.model, plan)
    _same_exports(save_model(a, None, tmp_path / "a"), save_model(b, None, tmp_path / "b"))
    back = _reloads_like(tmp_path / "b", a, batch)
    assert back.config.num_hidden_layers == 4


def test_every_command_on_the_command_line(fam, tmp_path, capsys):
    arch = fam[0]
    model = ["--model", f"tiny:{arch}", "--quiet"]
    assert main(["analyze", *model, *CALIB, "--no-stability", "--out", str(tmp_path / "an")]) == 0
    capsys.readouterr()
    reuse = [*model, *CALIB, "--analysis", str(tmp_path / "an"), "--loss-samples", "4"]
    planners = ["mka", "mka-tail", "shortgpt", "angular", "laco", "sleb", "mka-loss", "manual"]
    applied = {}
    for planner in planners:
        plan = tmp_path / f"{planner}.json"
        args = ["plan", *reuse, "--planner", planner, "--layers-to-remove", "1"]
        if planner == "manual":
            args += ["--picks", "drop:3", "--alpha", "fixed"]
        code = main([*args, "--out", str(plan)])
        err = capsys.readouterr().err
        if code == 2:  # a planner that merges refuses mixture-of-experts layers up front
            assert arch in MOE and planner in ("mka", "mka-tail", "laco", "mka-loss"), err
            assert "mixture-of-experts" in err and len(err.strip().splitlines()) == 1
            continue
        assert code == 0, (planner, err)
        d = json.loads(plan.read_text())
        assert len(d["layers"]) == 5, planner
        code = main(["apply", str(plan), "--quiet", "--out", str(tmp_path / f"m-{planner}")])
        assert code == 0, (planner, capsys.readouterr().err)
        capsys.readouterr()
        applied[planner] = tmp_path / f"m-{planner}"
    if arch in MOE:  # a merge picked by hand is refused when planned, too
        args = ["plan", *reuse, "--planner", "manual", "--picks", "merge:2,3", "--alpha", "fixed"]
        assert main([*args, "--out", str(tmp_path / "merge.json")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "mixture-of-experts" in err
        assert not (tmp_path / "merge.json").exists()
    if arch in MOE:
        assert set(applied) == {"shortgpt", "angular", "sleb", "manual"}
    else:
        assert set(applied) == set(planners)
    assert main(["evaluate", "--model", str(applied["sleb"]), "--json", "--quiet", *EVAL]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_layers"] == 5 and result["original"]["n_layers"] == 6
    assert np.isfinite(result["perplexity"]) and result["kl"] >= 0
    pruned = tmp_path / "pruned"
    args = ["transact", *model, *CALIB, "--offload", "--mlp-keep", "0.5", "--heads-keep", "0.5"]
    assert main([*args, "--shots", "1", "--out", str(pruned)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["new_n_heads"] == 2 and report["new_intermediate_size"] == (
        16 if arch in MOE else 64
    )
    assert AutoModelForCausalLM.from_pretrained(pruned).config.num_attention_heads == 2


# ---------------------------------------------------------------------------------------------
# layouts no adapter knows, layer-placement fields, models that are not decoders


def test_an_unknown_block_layout_is_one_line():
    shapes = {
        "input_layernorm.weight": (64,),
        "self_attn.Wqkv.weight": (192, 64),
        "self_attn.out_proj.weight": (64, 64),
        "mlp.fc1.weight": (128, 64),
        "mlp.fc2.weight": (64, 128),
    }
    with pytest.raises(MkaInputError) as e:
        block_adapter(shapes)
    msg = str(e.value)
    assert msg.startswith(
        "no adapter for block layout: self_attn has Wqkv/out_proj, mlp has fc1/fc2; known layouts: "
    )
    assert "qkv_proj" in msg and "experts" in msg and "\n" not in msg


def test_a_family_without_adapter_still_drops_and_transact_says_why():
    """Qwen2-MoE adds a shared expert beside the routed ones: generic commands work, TransAct
    refuses in one line naming what it found."""
    cfg = AutoConfig.for_model(
        "qwen2_moe",
        vocab_size=len(tiny_tokenizer()),
        hidden_size=64,
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    calib, _ = builtin_corpus()
    batch = make_calibration(tiny_tokenizer(), calib, n_samples=4, max_tokens=16)
    with pytest.raises(MkaInputError) as e:
        prune(model, batch, mlp_keep=0.5)
    assert str(e.value).startswith(
        "no adapter for block layout: self_attn has k_proj/o_proj/q_proj/v_proj, mlp has "
        "experts/gate/shared_expert/shared_expert_gate; known layouts:"
    )
    dropped = apply_plan(model, make_plan(model, [Step.drop((1,))], {}))
    assert len(get_layers(dropped)) == 3 and _logits(dropped, batch).shape[:2] == (4, 16)


def test_sparse_layer_placement_follows_the_plan(tmp_path):
    """Qwen3-MoE places its MoE layers by index (every 2nd layer, minus mlp_only_layers): after a
    drop the config says the same of the new layers, in memory, streamed and once reloaded."""
    cfg = tiny_config("qwen3_moe", vocab_size=len(tiny_tokenizer()))
    cfg.decoder_sparse_step, cfg.mlp_only_layers = 2, [3]  # sparse: 1 and 5; dense: 0, 2, 3, 4
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    src = save_model(model, tiny_tokenizer(), tmp_path / "src")
    resident = load_model(str(src), dtype="fp32", offload=False)
    streamed = load_model(str(src), dtype="fp32", offload=True)
    calib, _ = builtin_corpus()
    batch = make_calibration(resident.tokenizer, calib, n_samples=4, max_tokens=16)
    with pytest.raises(MkaInputError, match="one block layout in every layer"):
        prune(resident.model, batch, mlp_keep=0.5)
    plan = make_plan(resident, [Step.drop((2,))], {})  # sources 0, 1, 3, 4, 5
    a = apply_plan(resident.model, plan)
    b = apply_plan(streamed.model, plan)
    _same_exports(save_model(a, None, tmp_path / "a"), save_model(b, None, tmp_path / "b"))
    back = _reloads_like(tmp_path / "b", a, batch)
    assert (back.config.decoder_sparse_step, back.config.mlp_only_layers) == (1, [0, 2, 3])
    sparse = [hasattr(layer.mlp, "experts") for layer in get_layers(back)]
    assert sparse == [False, True, False, False, True]


def test_a_model_without_decoder_layers_is_refused_in_one_line(tmp_path):
    cfg = AutoConfig.for_model("gpt2", vocab_size=len(tiny_tokenizer()), n_embd=32, n_layer=2)
    cfg.n_head = 2
    folder = save_model(AutoModelForCausalLM.from_config(cfg), tiny_tokenizer(), tmp_path / "g")
    for offload in (False, True):
        with pytest.raises(MkaInputError, match="blocks in model.layers") as e:
            load_model(str(folder), offload=offload)
        assert "\n" not in str(e.value)
    # an encoder-decoder is no causal LM at all
    cfg = AutoConfig.for_model("t5", vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2)
    AutoModelForSeq2SeqLM.from_config(cfg).save_pretrained(tmp_path / "t5")
    with pytest.raises(MkaInputError, match="model type 't5' is not a causal LM") as e:
        load_model(str(tmp_path / "t5"))
    assert "\n" not in str(e.value)
