"""GGUF export: every family written reads back in plain transformers (an independent reader) as
the model our own quantization round trip gives, with its config and tokenizer; a pruned model
exports with its fewer layers; bad input is one line and leaves no file behind."""

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGUFReader
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from mka_core.cli.main import main
from mka_core.engine.quant import round_trip, storage_type
from mka_core.errors import MkaInputError
from mka_core.models.cache import bundled_gguf_path
from mka_core.models.tiny import tiny_config, tiny_tokenizer
from mka_core.workflows import gguf_export
from mka_core.workflows.export import save_model
from mka_core.workflows.gguf_export import export_gguf, write_gguf_beside
from mka_core.workflows.gguf_layout import llama3_rope_factors

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "  layers 12 and 345 <|endoftext|>"]


def _config(family: str):
    """A small random config of each family, in the shapes transformers' GGUF reader can rebuild
    from the file (it reads fewer keys than llama.cpp)."""
    vocab = len(tiny_tokenizer())
    if family in ("qwen3", "gemma3_text"):
        kw = dict(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=1024,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        if family == "qwen3":
            # transformers' GGUF reader takes Qwen3's default head_dim (128, every Qwen3's), not
            # the attention.key_length llama.cpp reads
            kw.update(head_dim=128)
        if family == "gemma3_text":
            # llama.cpp scales Gemma-3 queries by head_dim; transformers' GGUF reader takes the
            # config default query_pre_attn_scalar (256): a head_dim of 256 satisfies both
            kw.update(head_dim=256, sliding_window=8)
        cfg = AutoConfig.for_model(family, **kw)
        cfg.architectures = ["Qwen3ForCausalLM" if family == "qwen3" else "Gemma3ForCausalLM"]
        return cfg
    cfg = tiny_config(family, vocab_size=vocab)
    if family == "qwen3_moe":
        cfg.norm_topk_prob = True  # what llama.cpp computes (and Qwen3-MoE checkpoints use)
        # the reader does not read expert_feed_forward_length: it takes the default (768,
        # Qwen3-30B-A3B's)
        cfg.moe_intermediate_size = 768
    if family == "qwen2":
        cfg.tie_word_embeddings = False  # an LM head of its own: output.weight
    return cfg


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> a random fp32 model folder, every tensor perturbed (norms and biases too, so a
    missed Gemma norm shift or bias permutation shows)."""
    made = {}

    def get(family: str) -> Path:
        if family not in made:
            torch.manual_seed(7)
            model = AutoModelForCausalLM.from_config(_config(family), dtype=torch.float32).eval()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            root = tmp_path_factory.mktemp(family)
            made[family] = save_model(model, tiny_tokenizer(), root / "model")
        return made[family]

    return get


def _reference(folder: Path, quant: str):
    """The folder's model with every weight through the product's quantization round trip."""
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(round_trip(p, quant))
    return model


def _from_gguf(path: Path):
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


def _logits(model, n_vocab: int) -> torch.Tensor:
    ids = torch.randint(0, n_vocab, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _assert_same_model(path: Path, folder: Path, quant: str) -> None:
    ref = _reference(folder, quant)
    got = _from_gguf(path)
    for key in (
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_size",
        "intermediate_size",
        "vocab_size",
    ):
        assert getattr(got.config, key) == getattr(ref.config, key), key
    assert _head_dim(got.config) == _head_dim(ref.config)
    a, b = _logits(got, ref.config.vocab_size), _logits(ref, ref.config.vocab_size)
    # Gemma's norms go through 1 + w and back in float32: equal to rounding
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


CASES = [
    ("llama", "F16"),
    ("llama", "Q8_0"),
    ("llama", "Q4_0"),
    ("mistral", "Q8_0"),
    ("mistral", "Q4_0"),
    ("qwen2", "F16"),
    ("qwen2", "Q8_0"),
    ("qwen3", "Q8_0"),
    ("qwen3", "Q4_0"),
    ("qwen3_moe", "Q8_0"),
    ("qwen3_moe", "Q4_0"),
    ("phi3", "F16"),
    ("phi3", "Q8_0"),
    ("gemma3_text", "F16"),
    ("gemma3_text", "Q8_0"),
    ("gemma3_text", "Q4_0"),
]


@pytest.mark.parametrize("family,quant", CASES)
def test_family_reads_back_as_the_round_trip_model(folders, tmp_path, family, quant):
    folder = folders(family)
    out = tmp_path / "model.gguf"
    summary = export_gguf(folder, out, quant)
    assert summary["path"] == str(out) and summary["bytes"] == out.stat().st_size
    assert summary["quant"] == quant and summary["tokenizer"] == "tokenizer.json"
    # every matrix in the chosen type (the tiny widths are whole blocks), norms/biases in F32
    reader = GGUFReader(str(out))
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        assert t.tensor_type == storage_type(shape, quant), t.name
    assert set(summary["tensor_types"]) == {"F32", quant}
    assert sum(summary["tensor_types"].values()) == len(reader.tensors)
    _assert_same_model(out, folder, quant)
    tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    want = tiny_tokenizer()
    for s in SENTENCES:
        assert tok(s).input_ids == want(s).input_ids


def test_written_layout_follows_llama_cpp(folders, tmp_path):
    """Independent of any reader: the Llama q/k rows are permuted, Gemma norms stored as 1 + w,
    experts stacked per layer, and the keys llama.cpp reads are there."""
    folder = folders("llama")
    out = tmp_path / "l.gguf"
    export_gguf(folder, out, "F32")
    reader = GGUFReader(str(out))
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    sd = {}
    for f in folder.glob("*.safetensors"):
        sd.update(load_file(f))
    q = sd["model.layers.0.self_attn.q_proj.weight"].numpy()  # (4 heads * 16, 64)
    head0 = q[:16]
    stored0 = tensors["blk.0.attn_q.weight"][:16]
    assert not np.array_equal(stored0, head0)
    assert np.array_equal(stored0[0::2], head0[:8]) and np.array_equal(stored0[1::2], head0[8:])
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 6
    assert (
        fields["llama.attention.head_count_kv"] == 2 and fields["llama.rope.dimension_count"] == 16
    )
    assert fields["general.file_type"] == 0 and "output.weight" not in tensors  # tied

    gemma, moe = folders("gemma3_text"), folders("qwen3_moe")
    export_gguf(gemma, tmp_path / "g.gguf", "F32")
    export_gguf(moe, tmp_path / "m.gguf", "F32")
    g = {t.name: np.asarray(t.data) for t in GGUFReader(str(tmp_path / "g.gguf")).tensors}
    gsd = load_file(next(gemma.glob("*.safetensors")))
    norm = gsd["model.layers.0.post_feedforward_layernorm.weight"].numpy()
    np.testing.assert_allclose(g["blk.0.post_ffw_norm.weight"], norm + 1, rtol=0, atol=1e-7)
    m = {t.name: t for t in GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert tuple(m["blk.0.ffn_gate_exps.weight"].shape.tolist()) == (64, 768, 4)  # ggml order
    assert tuple(m["blk.0.ffn_down_exps.weight"].shape.tolist()) == (768, 64, 4)


def test_fused_experts_are_written_as_per_expert_ones(folders, tmp_path):
    """A folder holding transformers 5's fused experts (gate_up_proj, down_proj: 3-D) gives the
    tensors of the same model stored one tensor per expert."""
    moe = folders("qwen3_moe")
    fused = tmp_path / "fused"
    shutil.copytree(moe, fused)
    (fused / "model.safetensors.index.json").unlink()
    weights = {}
    for f in sorted(fused.glob("*.safetensors")):
        weights.update(load_file(f))
        f.unlink()
    for layer in range(6):
        p = f"model.layers.{layer}.mlp.experts"
        gate, up, down = (
            [weights.pop(f"{p}.{e}.{w}.weight") for e in range(4)]
            for w in ("gate_proj", "up_proj", "down_proj")
        )
        weights[f"{p}.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])
        weights[f"{p}.down_proj"] = torch.stack(down)
    save_file(weights, fused / "model.safetensors")
    export_gguf(moe, tmp_path / "experts.gguf", "F32")
    export_gguf(fused, tmp_path / "fused.gguf", "F32")
    a = {t.name: np.asarray(t.data) for t in GGUFReader(str(tmp_path / "experts.gguf")).tensors}
    b = {t.name: np.asarray(t.data) for t in GGUFReader(str(tmp_path / "fused.gguf")).tensors}
    assert sorted(a) == sorted(b) and "blk.5.ffn_up_exps.weight" in a
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def test_matrices_encoded_a_slice_at_a_time_give_the_same_file(folders, tmp_path, monkeypatch):
    """Unchanged matrices are read and quantized a range of rows at a time (memory: one slice,
    not the tensor in float32); the bytes are those of the whole tensor encoded at once."""
    folder = folders("qwen2")  # an untied LM head: two big matrices
    monkeypatch.setattr(gguf_export, "CHUNK_VALUES", 10**9)
    export_gguf(folder, tmp_path / "whole.gguf", "Q4_1")
    monkeypatch.setattr(gguf_export, "CHUNK_VALUES", 3 * 64)  # three rows of 64
    export_gguf(folder, tmp_path / "sliced.gguf", "Q4_1")
    assert (tmp_path / "whole.gguf").read_bytes() == (tmp_path / "sliced.gguf").read_bytes()


def test_llama3_rope_factors_match_transformers():
    """The rope_freqs tensor written for Llama-3 scaling is transformers' own scaling."""
    scaling = dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    )
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=1024,
        rope_scaling=scaling,
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, 16, 2).float() / 16))
    factors = llama3_rope_factors(cfg)
    assert (factors > 1).any() and (factors == 1).any()  # the test spans both regimes
    torch.testing.assert_close(base / factors, scaled.float(), rtol=1e-5, atol=0)


def test_pruned_model_exports_with_fewer_layers(tmp_path, capsys):
    pruned = tmp_path / "pruned"
    args = ["plan", "--model", "tiny:llama", "--planner", "shortgpt", "--layers-to-remove", "2"]
    args += ["--samples", "16", "--tokens", "32", "--quiet", "--out", str(tmp_path / "p.json")]
    assert main([*args, "--apply", str(pruned)]) == 0
    capsys.readouterr()
    out = tmp_path / "pruned-q8.gguf"
    cmd = ["export-gguf", "--model", str(pruned), "--quant", "q8_0", "--out", str(out)]
    assert main([*cmd, "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_layers"] == 4 and summary["quant"] == "Q8_0"
    assert _from_gguf(out).config.num_hidden_layers == 4
    _assert_same_model(out, pruned, "Q8_0")
    # the function apply --gguf calls: OUT/model-<quant>.gguf beside the folder's weights
    beside = write_gguf_beside(pruned, "q4_0")
    assert beside == pruned / "model-Q4_0.gguf" and beside.is_file()
    _assert_same_model(beside, pruned, "Q4_0")


def _no_leftovers(folder: Path, allowed=()):
    left = sorted(p.name for p in folder.iterdir() if p.name not in allowed)
    assert left == [], left


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--quant", "Q3_X"], "unknown quantization type 'Q3_X'; choose one of F32, F16"),
        (["--quant", "Q4_K"], "Q4_K: the gguf package reads this k-quant but cannot write it"),
        (["--model", "/no/such/model"], "model source not found: /no/such/model"),
        (["--model", "tiny:olmo2"], "GGUF export of olmo2 models is not offered"),
        (["--model", "tiny:qwen3_moe"], "Qwen3-MoE with norm_topk_prob false"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, fragment):
    out = tmp_path / "x.gguf"
    argv = ["export-gguf", "--model", "tiny:llama", "--quant", "Q8_0", "--out", str(out)]
    for i in range(0, len(args), 2):  # the case's flags replace the defaults
        argv[argv.index(args[i]) + 1] = args[i + 1]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    _no_leftovers(tmp_path)


def test_unnamed_family_and_bad_folders(folders, tmp_path):
    fake = tmp_path / "fake"
    shutil.copytree(folders("llama"), fake)
    config = json.loads((fake / "config.json").read_text())
    (fake / "config.json").write_text(json.dumps({**config, "model_type": "fakeformer"}))
    with pytest.raises(MkaInputError, match="model type 'fakeformer'.*writes llama, mistral"):
        export_gguf(fake, tmp_path / "f.gguf", "Q8_0")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text(json.dumps(config))
    (garbage / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MkaInputError) as e:
        export_gguf(garbage, tmp_path / "g.gguf", "Q8_0")
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MkaInputError, match="has no config.json"):
        export_gguf(tmp_path / "empty", tmp_path / "e.gguf", "Q8_0")
    with pytest.raises(MkaInputError, match="ending in .gguf"):
        export_gguf(folders("llama"), tmp_path / "model.bin", "Q8_0")
    _no_leftovers(tmp_path, allowed={"fake", "garbage", "empty"})


def test_gemma3_with_layers_removed_is_refused(folders, tmp_path):
    """llama.cpp places Gemma-3's global layers every sixth layer: a config whose pattern moved
    (layers dropped) would be computed differently, so it is refused."""
    gemma = tmp_path / "gemma"
    shutil.copytree(folders("gemma3_text"), gemma)
    config = json.loads((gemma / "config.json").read_text())
    config["layer_types"] = (
        config["layer_types"][:2] + config["layer_types"][3:] + ["sliding_attention"]
    )
    (gemma / "config.json").write_text(json.dumps(config))
    with pytest.raises(MkaInputError, match="fixed pattern of five sliding layers"):
        export_gguf(gemma, tmp_path / "g.gguf", "Q8_0")
    _no_leftovers(tmp_path, allowed={"gemma"})


def test_existing_output_and_a_failure_midway(folders, tmp_path, monkeypatch):
    folder = folders("llama")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(MkaInputError, match="already exists; pass overwrite=True"):
        export_gguf(folder, out, "Q8_0")
    assert out.read_bytes() == b"keep me"
    # a failure after some tensors were written: the old file stays, no temporary is left
    calls, real = [], gguf_export.encode

    def failing(t, qtype):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk went away")
        return real(t, qtype)

    monkeypatch.setattr(gguf_export, "encode", failing)
    with pytest.raises(RuntimeError, match="disk went away"):
        export_gguf(folder, out, "Q8_0", overwrite=True)
    assert out.read_bytes() == b"keep me" and len(calls) == 5
    _no_leftovers(tmp_path, allowed={"m.gguf"})
    monkeypatch.undo()
    export_gguf(folder, out, "Q8_0", overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"
    _no_leftovers(tmp_path, allowed={"m.gguf"})


def test_tokenizer_copied_from_the_gguf_a_model_came_from(folders, tmp_path, monkeypatch):
    """A .gguf source, or a folder whose plan names one, keeps that file's tokenizer fields
    (llama.cpp's pre-tokenizer name, chat template) rather than rebuilding them; a file with
    another vocabulary is not copied."""
    monkeypatch.setenv("MKA_STUDIO_CACHE", str(tmp_path / "cache"))  # .gguf sources convert once
    folder = folders("llama")
    first = tmp_path / "first.gguf"
    export_gguf(folder, first, "F32")
    # mark the origin's tokenizer with fields tokenizer.json cannot produce
    marked = tmp_path / "marked.gguf"
    reader = GGUFReader(str(first))
    w = gguf.GGUFWriter(marked, "llama")
    for key, field in reader.fields.items():
        if key.startswith(("general.", "llama.")) and key != "general.architecture":
            w.add_key_value(key, field.contents(), field.types[0], sub_type=field.types[-1])
        elif key.startswith("tokenizer."):
            value = "smollm" if key == "tokenizer.ggml.pre" else field.contents()
            w.add_key_value(key, value, field.types[0], sub_type=field.types[-1])
    w.add_chat_template("{{ marked }}")
    for t in reader.tensors:
        w.add_tensor(t.name, np.asarray(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    summary = export_gguf(str(marked), tmp_path / "from-gguf.gguf", "Q8_0")
    assert summary["tokenizer"] == "marked.gguf"
    fields = GGUFReader(str(tmp_path / "from-gguf.gguf")).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert fields["tokenizer.chat_template"].contents() == "{{ marked }}"
    _assert_same_model(tmp_path / "from-gguf.gguf", folder, "Q8_0")

    derived = tmp_path / "derived"
    shutil.copytree(folder, derived)
    (derived / "plan.json").write_text(json.dumps({"model": {"source": str(marked)}}))
    summary = export_gguf(derived, tmp_path / "derived.gguf", "Q8_0")
    assert summary["tokenizer"] == "marked.gguf"
    # a folder whose vocabulary is not the origin's (here: a padded embedding) is rebuilt
    config = json.loads((derived / "config.json").read_text())
    weights = load_file(derived / "model-00001-of-00001.safetensors")
    emb = weights["model.embed_tokens.weight"]
    weights["model.embed_tokens.weight"] = torch.cat([emb, emb[:8]])
    save_file(weights, derived / "model-00001-of-00001.safetensors")
    (derived / "config.json").write_text(json.dumps({**config, "vocab_size": emb.shape[0] + 8}))
    summary = export_gguf(derived, tmp_path / "padded.gguf", "F16")
    assert summary["tokenizer"] == "tokenizer.json"
    tokens = GGUFReader(str(tmp_path / "padded.gguf")).fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == emb.shape[0] + 8 and tokens[-1] == f"[PAD{emb.shape[0] + 7}]"


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_llama_cpp_runs_the_file(folders, tmp_path, family):
    """llama.cpp itself (llama-cpp-python) gives the round-trip model's next-token logits."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    folder = folders(family)
    out = tmp_path / "m.gguf"
    export_gguf(folder, out, "F32")
    ref = _reference(folder, "F32")
    ids = torch.randint(1, ref.config.vocab_size, (12,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    llm = llama_cpp.Llama(model_path=str(out), logits_all=True, n_ctx=64, verbose=False)
    llm.eval(ids.tolist())
    got = torch.tensor(np.asarray(llm.scores[: len(ids)]), dtype=torch.float32)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


def _raw_field(reader: GGUFReader, key: str) -> bytes:
    """A metadata field's bytes as stored (key, type and value): equal bytes, equal field."""
    field = reader.fields[key]
    return bytes(reader.data[field.offset : field.offset + sum(p.nbytes for p in field.parts)])


@pytest.mark.integration
def test_bundled_model_q8_0(tmp_path):
    """The real SmolLM2-135M: its tokenizer copied field by field from the original file
    (llama.cpp's own pre-tokenizer name, flags and chat template), its shape in llama.cpp's keys,
    and the last token's logits, read by transformers from the file, those of the round-trip
    model."""
    out = tmp_path / "smol-q8.gguf"
    summary = export_gguf("bundled:smollm2-135m", out, "Q8_0")
    assert summary["tokenizer"] == bundled_gguf_path().name and summary["n_layers"] == 30
    assert summary["tensor_types"] == {"F32": 61, "Q8_0": 211}
    original, written = GGUFReader(str(bundled_gguf_path())), GGUFReader(str(out))
    keys = [k for k in original.fields if k.startswith("tokenizer.")]
    assert "tokenizer.ggml.merges" in keys and "tokenizer.chat_template" in keys
    for key in keys:
        assert _raw_field(written, key) == _raw_field(original, key), key
    for key in ("block_count", "embedding_length", "feed_forward_length", "context_length"):
        assert (
            written.fields[f"llama.{key}"].contents() == original.fields[f"llama.{key}"].contents()
        )
    del original, written
    folder, origin = gguf_export.resolve_source("bundled:smollm2-135m")
    assert origin == bundled_gguf_path()
    ref = _reference(folder, "Q8_0")
    # the config is the folder's (transformers' parse of the file's 49 152 tokens for the config
    # alone takes 10 s on one core); the tensors and their names are read from the file
    got = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=out.name, config=ref.config, dtype=torch.float32
    ).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = torch.tensor([tok("The capital of France is").input_ids])
    with torch.no_grad():
        a, b = got(ids).logits[0, -1], ref(ids).logits[0, -1]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert a.argmax() == b.argmax()
