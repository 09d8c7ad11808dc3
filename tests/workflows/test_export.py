"""Export: model folders that plain transformers reloads with the same logits, refusals to clobber
inputs or existing folders, and mergekit YAML."""

import json

import pytest
import torch
import yaml

from mka_core.compression.merge import apply_plan
from mka_core.compression.plan import ModelRef, Plan, Step, make_plan
from mka_core.errors import MkaInputError
from mka_core.files import write_text_atomic as save_text_atomic
from mka_core.workflows.export import mergekit_yaml, save_model

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64]])  # (1, 8) token ids


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny-model ops take microseconds; on a busy machine extra threads only wait on each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def logits(model):
    with torch.no_grad():
        return model(IDS).logits  # (1, 8, vocab)


def plan_for(loaded, *steps):
    return make_plan(loaded, steps, {"planner": "manual"})


@pytest.fixture(scope="module")
def merged(tiny):
    plan = plan_for(tiny, Step.merge((1, 2), (0.8, 0.2)), Step.drop((4,)))
    return apply_plan(tiny.model, plan), plan


def test_exported_folder_reloads_with_plain_transformers(tiny, merged, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, plan = merged
    out = save_model(model, tiny.tokenizer, tmp_path / "small", plan=plan)
    assert out == tmp_path / "small"
    names = {p.name for p in out.iterdir()}
    shards = {"model-00001-of-00001.safetensors", "model.safetensors.index.json"}
    assert {"config.json", "plan.json", "tokenizer.json"} | shards <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    assert [p.name for p in tmp_path.iterdir()] == ["small"]  # no temporary folder left

    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert back.config.num_hidden_layers == 4
    assert [b.self_attn.layer_idx for b in back.model.layers] == [0, 1, 2, 3]
    assert torch.equal(logits(back), logits(model))
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("hello world").input_ids == tiny.tokenizer("hello world").input_ids
    assert Plan.load(out / "plan.json") == plan
    with torch.no_grad():
        gen = back.generate(IDS[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 9)


def test_refuses_a_non_empty_folder_unless_overwrite(tiny, merged, tmp_path):
    model, plan = merged
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(MkaInputError, match=r"out exists and is not empty; .*overwrite=True"):
        save_model(model, tiny.tokenizer, target, plan=plan)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    save_model(model, tiny.tokenizer, target, plan=plan, overwrite=True)
    names = {p.name for p in target.iterdir()}
    assert "notes.txt" not in names and "model.safetensors.index.json" in names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no backup left behind

    empty = tmp_path / "empty"
    empty.mkdir()
    assert (save_model(model, None, empty) / "config.json").is_file()  # an empty folder is fine

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(MkaInputError, match="exists and is a file"):
        save_model(model, None, a_file, overwrite=True)


def test_refuses_the_folder_the_model_was_loaded_from(tiny, merged, tmp_path):
    model, plan = merged
    src = save_model(tiny.model, tiny.tokenizer, tmp_path / "orig")
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    for target in (src, src / "sub", tmp_path / "orig" / ".." / "orig"):
        with pytest.raises(MkaInputError, match="the folder the model was loaded from"):
            save_model(model, tiny.tokenizer, target, overwrite=True, loaded_from=str(src))
    with pytest.raises(MkaInputError, match="holds the model's source"):
        save_model(model, tiny.tokenizer, tmp_path, overwrite=True, loaded_from=src)
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == before
    # a source that is not a path (tiny:, bundled:) restricts nothing
    assert save_model(model, None, tmp_path / "other", loaded_from="tiny:llama").is_dir()


def test_quantization_config_is_not_exported_and_caller_keeps_it(tiny_copy, tmp_path):
    model = tiny_copy.model
    model.config.quantization_config = {"quant_method": "gguf"}
    out = save_model(model, None, tmp_path / "q")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 6
    assert model.config.quantization_config == {"quant_method": "gguf"}


def test_extra_files(tiny, merged, tmp_path):
    model, _ = merged
    out = save_model(model, None, tmp_path / "x", extra_files={"README.md": "# small\n"})
    assert (out / "README.md").read_text() == "# small\n"
    for name in ("../evil.txt", "a/b.txt", ""):
        with pytest.raises(MkaInputError, match="expected a plain file name"):
            save_model(model, None, tmp_path / "y", extra_files={name: "x"})
    with pytest.raises(MkaInputError, match="would replace a file of the saved model"):
        save_model(model, None, tmp_path / "z", extra_files={"config.json": "{}"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # failed saves leave nothing


def test_save_text_atomic(tmp_path):
    p = save_text_atomic(tmp_path / "a" / "r.json", '{"x": 1}\n')
    assert p.read_text() == '{"x": 1}\n'
    with pytest.raises(MkaInputError, match=r"r\.json already exists; pass overwrite=True"):
        save_text_atomic(p, "other")
    save_text_atomic(p, "new", overwrite=True)
    assert p.read_text() == "new" and [f.name for f in p.parent.iterdir()] == ["r.json"]
    with pytest.raises(MkaInputError, match="is a folder"):
        save_text_atomic(tmp_path, "x", overwrite=True)


def test_mergekit_yaml_for_a_drop_plan(tiny):
    plan = plan_for(tiny, Step.drop((1,)), Step.drop((3, 4)))
    text = mergekit_yaml(plan)
    cfg = yaml.safe_load(text)
    assert cfg["merge_method"] == "passthrough" and cfg["dtype"] == "float32"
    ranges = [s["sources"][0]["layer_range"] for s in cfg["slices"]]
    assert ranges == [[0, 1], [2, 3], [5, 6]]  # half-open: keeps 0, 2, 5
    assert sum(end - start for start, end in ranges) == plan.n_layers_out == 3
    assert all(len(s["sources"]) == 1 for s in cfg["slices"])
    assert {s["sources"][0]["model"] for s in cfg["slices"]} == {"path/to/model"}
    assert "tiny:llama is not a path mergekit reads" in text  # a comment says what to replace
    assert "# original layers kept: 0, 2, 5\n" in text
    assert "# original layers dropped: 1, 3-4\n" in text
    merged = mergekit_yaml(plan_for(tiny, Step.merge((1, 2), (0.25, 0.75))))
    assert "# merged (layer x weight): 1x0.25+2x0.75" in merged
    assert "# original layers kept: 0, 3-5" in merged

    named = yaml.safe_load(mergekit_yaml(plan, model_path="/models/smol"))
    assert named["slices"][0]["sources"][0]["model"] == "/models/smol"
    ident = yaml.safe_load(mergekit_yaml(Plan.identity(ModelRef("org/m", "X", 6, ""))))
    assert ident["slices"] == [{"sources": [{"model": "org/m", "layer_range": [0, 6]}]}]


def test_mergekit_yaml_for_a_merge_plan_is_linear_over_one_layer_slices(tiny):
    plan = plan_for(tiny, Step.drop((0,)), Step.merge((2, 3), (0.75, 0.25)))
    cfg = yaml.safe_load(mergekit_yaml(plan, out_dtype="bf16"))
    assert cfg["merge_method"] == "linear" and cfg["parameters"] == {"normalize": False}
    assert cfg["dtype"] == "float32" and cfg["out_dtype"] == "bfloat16"
    slices = [
        [(src["layer_range"], src["parameters"]["weight"]) for src in sl["sources"]]
        for sl in cfg["slices"]
    ]
    # kept 1, merged (2, 3), kept 4-5 as one run: every slice's sources have the same length
    assert slices == [[([1, 2], 1.0)], [([2, 3], 0.75), ([3, 4], 0.25)], [([4, 6], 1.0)]]
    # mergekit takes one model once per slice: the second source spells the folder differently
    assert [src["model"] for src in cfg["slices"][1]["sources"]] == [
        "path/to/model",
        "path/to/model/.",
    ]
    collapse = yaml.safe_load(mergekit_yaml(plan_for(tiny, Step.collapse((0, 1, 2)))))
    assert [len(sl["sources"]) for sl in collapse["slices"]] == [3, 1]
    with pytest.raises(MkaInputError, match="not a local folder"):
        mergekit_yaml(plan, model_path="org/hub-model")


def test_writing_beside_a_gguf_is_allowed_but_not_over_it(tiny, merged, tmp_path):
    model, _ = merged
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    out = save_model(model, None, tmp_path / "out" / "model", loaded_from=gguf)
    assert (out / "config.json").is_file()
    with pytest.raises(MkaInputError, match="holds the model's source"):
        save_model(model, None, gguf, overwrite=True, loaded_from=gguf)
    assert gguf.read_bytes() == b"GGUF"
