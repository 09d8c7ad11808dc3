"""Plans built beyond their composition: flattened merges (FlattenGPT) and compensated cuts (linear:
ReplaceMe; scale: Prune&Comp), on tiny random models in fp32. What is checked is the algebra each
method promises, not quality (random weights have none): the linear map never fits the teacher
worse than the plain cut; the scale form fused after the cut equals scaling the stream at the cut;
the wide block before pruning is exactly the layers side by side; the results are standard
configs that plain transformers reloads with the same logits, streamed and in memory alike."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from mka_core.cli.main import main
from mka_core.compression import flatten as fl
from mka_core.compression.compensate import spans
from mka_core.compression.merge import apply_plan
from mka_core.compression.plan import Plan, Step, compose, make_plan
from mka_core.compression.planners import PlanSettings, plan_layers
from mka_core.compression.planners.search import calibration_loss
from mka_core.compression.rebuild import refine
from mka_core.compression.refinement import Refine
from mka_core.data.corpus import builtin_corpus, make_calibration
from mka_core.engine.layerpass import LayerPass, as_stack
from mka_core.engine.weights import SafetensorsStore
from mka_core.errors import MkaInputError
from mka_core.models.loading import load_model
from mka_core.workflows.export import save_model
from mka_core.workflows.sweep import parse_planners

CALIB = ["--samples", "16", "--tokens", "32"]


def _load(arch: str):
    loaded = load_model(f"tiny:{arch}", dtype="fp32", offload=False)
    calib, _ = builtin_corpus()
    batch = make_calibration(loaded.tokenizer, calib, n_samples=12, max_tokens=32)
    return loaded, batch


@pytest.fixture(scope="module")
def tiny():
    return _load("llama")


def _states(stack, batch, stop=None):
    lp = LayerPass.start(stack, batch.input_ids, batch.attention_mask, 16)
    if stop is None:
        return lp.normed()
    return lp.run(stop=stop).hidden


def _err(a, b, batch):
    m = batch.attention_mask.bool()
    return sum(float((x - y)[m[: len(x)]].square().sum()) for x, y in zip(a, b, strict=True))


def test_plans_record_how_they_are_built_and_version_1_files_still_load(tiny):
    loaded, _ = tiny
    plain = make_plan(loaded, [Step.drop((2,))], {})
    d = plain.to_dict()
    assert d["version"] == 1 and "refine" not in d
    calib = {"data": "builtin", "samples": 16, "tokens": 32}
    built = plain.with_refine(Refine("average", "linear", calib))
    d = built.to_dict()
    assert d["version"] == 2 and d["refine"]["compensation"] == "linear"
    back = Plan.from_dict(json.loads(json.dumps(d)))
    assert back.refine == built.refine and back.needs_data and not plain.needs_data
    d["refine"]["merge"] = "blend"
    with pytest.raises(MkaInputError, match=r"^refine: merge mode 'blend'"):
        Plan.from_dict(d)


def test_linear_compensation_never_fits_the_teacher_worse_at_the_cut(tiny):
    loaded, batch = tiny
    base = as_stack(loaded.model)
    comp = [[(i, 1.0)] for i in (0, 1, 4, 5)]  # layers 2 and 3 removed: block 1 stands for 1..3
    plain = base.compose(comp)
    fixed, rep = refine(base, plain, comp, batch, compensation="linear")
    assert [c["block"] for c in rep.cuts] == [1] and rep.cuts[0]["through"] == 3
    teacher = _states(base, batch, stop=4)
    before = _err(_states(plain, batch, stop=2), teacher, batch)
    after = _err(_states(fixed, batch, stop=2), teacher, batch)
    assert after < before
    assert as_stack(fixed).n_layers == 4 and fixed.config.num_hidden_layers == 4


def test_scale_compensation_fused_after_the_cut_equals_scaling_the_stream_at_it(tiny):
    _, batch = tiny
    loaded = load_model("tiny:llama", dtype="fp32", offload=False)
    loaded.model.config.rms_norm_eps = 0.0  # exact scale invariance: RMSNorms without their ε
    for module in loaded.model.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 0.0
    base = as_stack(loaded.model)
    comp = [[(i, 1.0)] for i in (0, 1, 3, 4, 5)]  # layer 2 removed
    plain = base.compose(comp)
    fixed, rep = refine(base, plain, comp, batch, compensation="scale")
    (cut,) = rep.cuts
    assert cut["block"] == 1 and cut["scale"] != pytest.approx(1.0)
    lp = LayerPass.start(plain, batch.input_ids, batch.attention_mask, 16).run(stop=2)
    lp.hidden = [h * cut["scale"] for h in lp.hidden]  # the paper's form: the stream scaled
    expected = lp.normed()
    got = _states(fixed, batch)  # ours: what later blocks write divided instead
    real = batch.attention_mask.bool()
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a[real[: len(a)]], b[real[: len(b)]], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_the_wide_block_is_exactly_the_layers_side_by_side(tiny, arch):
    """Also for Phi-3's fused qkv_proj and gate_up_proj, split, laid side by side part by part
    and fused again."""
    loaded, batch = tiny if arch == "llama" else _load(arch)
    stack = as_stack(loaded.model)
    layers = loaded.model.model.layers
    states = [{k: v.detach() for k, v in layers[i].state_dict().items()} for i in (2, 3)]
    for s in states:  # norms that are not all ones, to see them folded
        s["input_layernorm.weight"] = s["input_layernorm.weight"] * 1.5
        s["post_attention_layernorm.weight"] = torch.linspace(
            0.5, 2, len(s["input_layernorm.weight"])
        )
    for i, s in zip((2, 3), states):
        layers[i].load_state_dict(s)
    cfg = stack.config
    offset = fl.norm_offset(type(layers[2].input_layernorm), cfg.hidden_size, cfg.rms_norm_eps)
    assert offset == 0.0
    hd = stack.recipe.head_dim
    sizes = fl.fused_sizes(
        cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.intermediate_size
    )
    fused = "self_attn.qkv_proj.weight" in states[0]
    assert fused == (arch == "phi3")
    wide_state = fl.wide_state([fl.unfuse(s, sizes) for s in states], offset)
    wide = fl.build_block(
        type(layers[2]),
        fl.wide_config(cfg, 2),
        2,
        fl.fuse(wide_state, fused),
        "cpu",
        torch.float32,
    )
    lp = LayerPass.start(stack, batch.input_ids, batch.attention_mask, 16).run(stop=2)
    h = lp.hidden[0]
    args, kwargs = lp.calls[0][2]
    with torch.no_grad():
        out = wide(h, *args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out

        def attn(layer, x):
            y = layer.self_attn(layer.input_layernorm(x), *args, **kwargs)
            return y[0]

        h1 = h + attn(layers[2], h) + attn(layers[3], h)
        mlp = [layer.mlp(layer.post_attention_layernorm(h1)) for layer in (layers[2], layers[3])]
        expected = h1 + mlp[0] + mlp[1]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_flatten_keeps_the_standard_config_and_plain_transformers_reloads_it(tiny, arch, tmp_path):
    loaded, batch = tiny if arch == "llama" else _load(arch)
    plan = make_plan(loaded, [Step.merge((2, 3), (0.5, 0.5))], {}, Refine("flatten", "linear"))
    model = apply_plan(loaded.model, plan, batch=batch)
    cfg, base = model.config, loaded.model.config
    assert cfg.num_hidden_layers == base.num_hidden_layers - 1
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "hidden_size"):
        assert getattr(cfg, key) == getattr(base, key), key
    save_model(model, loaded.tokenizer, tmp_path / "m")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    ids, mask = batch.input_ids[:4], batch.attention_mask[:4]
    with torch.inference_mode():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = back(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(MkaInputError, match="needs calibration data"):
        apply_plan(loaded.model, plan)


@pytest.mark.parametrize("arch", ["llama", "phi3", "mixtral"])
def test_refined_plans_stream_like_they_build_in_memory(arch, tmp_path):
    model = ["--model", f"tiny:{arch}", "--quiet", *CALIB]
    merge = "average" if arch == "mixtral" else "flatten"
    picks = "drop:2,3" if arch == "mixtral" else "merge:2,3;drop:4"
    args = ["plan", *model, "--picks", picks, "--alpha", "fixed", "--merge-mode", merge]
    assert main([*args, "--compensation", "linear", "--out", str(tmp_path / "p.json")]) == 0
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["refine"]["calibration"] == {"data": "builtin", "samples": 16, "tokens": 32}
    for mode in ("--offload", "--no-offload"):
        out = tmp_path / mode
        cmd = [
            "apply",
            str(tmp_path / "p.json"),
            "--quiet",
            "--dtype",
            "fp32",
            mode,
            "--out",
            str(out),
        ]
        assert main(cmd) == 0
    a, b = SafetensorsStore(tmp_path / "--offload"), SafetensorsStore(tmp_path / "--no-offload")
    assert set(a.names()) == set(b.names())
    for name in a.names():
        torch.testing.assert_close(a.get(name), b.get(name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compensation", ["none", "linear"])
def test_mka_loss_flattened_merges_the_pair_whose_built_merge_costs_least(tiny, compensation):
    """With --merge-mode flatten, mka-loss scores each pair flattened (and given its linear map)
    exactly as `refine` builds it on the fitting samples: the step's score is the built model's
    loss increase on the held-out samples, and no other pair's built merge costs less there."""
    loaded, batch = tiny
    settings = PlanSettings(
        "mka-loss", n_remove=1, merge_mode="flatten", compensation=compensation, loss_samples=8
    )
    plan = plan_layers(loaded, None, batch, settings)
    assert plan.method["alpha"] is None
    assert plan.method["params"]["scored"] == (
        "flatten+linear" if compensation == "linear" else "flatten"
    )
    fit, held = batch.subset(8), batch.subset(8, between=True)
    base, n = as_stack(loaded.model), loaded.n_layers

    def built_loss(a: int) -> float:
        comp = compose(n, [Step.merge((a, a + 1), (0.5, 0.5))])
        built, _ = refine(base, base.compose(comp), comp, fit, "flatten", compensation)
        return calibration_loss(built, held)

    (step,) = plan.steps
    losses = {a: built_loss(a) for a in range(1, n - 2)}  # the first and last layers protected
    assert losses[step.layers[0]] == pytest.approx(calibration_loss(base, held) + step.score)
    assert losses[step.layers[0]] == pytest.approx(min(losses.values()))


def test_what_cannot_be_built_is_refused_in_one_line(capsys, tmp_path):
    out = ["--out", str(tmp_path / "p.json")]
    cases = [
        (["--model", "tiny:olmo2", "--planner", "mka", "--merge-mode", "flatten"], "normalised"),
        (
            ["--model", "tiny:olmo2", "--planner", "mka-loss", "--merge-mode", "flatten"],
            "normalised",
        ),
        (
            ["--model", "tiny:llama", "--planner", "sleb", "--merge-mode", "flatten"],
            "does not merge",
        ),
        (
            ["--model", "tiny:olmo2", "--planner", "shortgpt", "--compensation", "scale"],
            "post_feedforward",
        ),
        (
            [
                "--model",
                "tiny:llama",
                "--picks",
                "drop:0",
                "--no-protect-first",
                "--compensation",
                "linear",
            ],
            "embeddings",
        ),
    ]
    for args, what in cases:
        code = main(["plan", *args, "--quiet", *CALIB, "--layers-to-remove", "2", *out])
        err = capsys.readouterr().err
        assert code == 2 and what in err, (args, err)
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    for spec, what in (
        ("transact+linear", "transact"),
        ("sleb:flatten", "does not merge"),
        ("sleb+fast", "expected"),
    ):
        with pytest.raises(MkaInputError, match=what):
            parse_planners(spec)
    assert spans([[(0, 1.0)], [(1, 0.5), (2, 0.5)], [(4, 1.0)]], 6) == (0, [0, 3, 5])
