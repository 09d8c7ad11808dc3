"""Loading models from every source: tiny models, devices, bad sources, folders, dtypes."""

from pathlib import Path

import pytest
import torch

from mka_core.errors import MkaInputError
from mka_core.models.loading import get_layers, load_model, pick_device, summarize

ROOT = Path(__file__).resolve().parents[2]


# --- models ---------------------------------------------------------------------------------


def test_tiny_model_is_deterministic_and_summarised(tiny):
    again = load_model("tiny:llama", device="cpu", dtype="fp32", seed=0)
    other = load_model("tiny:llama", device="cpu", dtype="fp32", seed=1)
    a, b, c = (m.model.model.layers[0].mlp.up_proj.weight for m in (tiny, again, other))
    assert torch.equal(a, b) and not torch.equal(a, c)
    s = summarize(tiny)
    assert (s.n_layers, s.d_model, s.n_heads, s.n_kv_heads, s.head_dim) == (6, 64, 4, 2, 16)
    assert s.device == "cpu" and s.dtype == "float32"
    assert s.n_params == sum(p.numel() for p in tiny.model.parameters())
    assert tiny.fingerprint == again.fingerprint != other.fingerprint


def test_device_choice_prefers_cuda_then_cpu():
    assert pick_device() == ("cuda" if torch.cuda.is_available() else pick_device("cpu"))
    with pytest.raises(MkaInputError, match="unknown device"):
        pick_device("tpu")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("/no/such/path", "not found"),
        ("/no/such/model.gguf", "GGUF file not found"),
        ("tiny:gpt5", "unknown tiny model"),
        ("bundled:llama-70b", "unknown bundled model"),
        ("", "empty"),
    ],
)
def test_bad_sources_give_one_line_errors(source, message):
    with pytest.raises(MkaInputError, match=message) as e:
        load_model(source)
    assert "\n" not in str(e.value)


def test_folder_without_config_or_safetensors_is_refused(tmp_path):
    with pytest.raises(MkaInputError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MkaInputError, match="safetensors"):
        load_model(str(tmp_path))


def test_hub_id_offline_says_how_to_use_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MkaInputError, match="copy its folder"):
        load_model("no-such-org/no-such-model-xyz")


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(MkaInputError, match="GPT2LMHeadModel.*found module lists: transformer.h"):
        get_layers(gpt2)


def test_local_folder_loads_with_same_logits(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path), device="cpu", dtype="fp32")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(tiny.model(ids).logits, again.model(ids).logits)
    assert again.fingerprint == tiny.fingerprint


def test_cpu_default_dtype_is_bf16_and_loading_keeps_rotary_in_fp32(tmp_path):
    """bf16 on this CPU: 2.6-2.9x faster, perplexity within 0.05 % (BENCHMARKS.md, dtype). Only
    the weights are cast: the rotary frequencies stay fp32, as transformers keeps them."""
    from mka_core.models.loading import pick_dtype

    assert pick_dtype("cpu") == torch.bfloat16
    loaded = load_model("tiny:llama", device="cpu")
    assert loaded.dtype == torch.bfloat16
    assert loaded.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert loaded.model.model.rotary_emb.inv_freq.dtype == torch.float32
    same = load_model("tiny:llama", device="cpu", dtype="fp32")
    assert loaded.fingerprint == same.fingerprint  # weights rounded to bf16 hash the same
