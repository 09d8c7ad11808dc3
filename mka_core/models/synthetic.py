"""Random-weight models of real shapes, written to disk tensor by tensor (never held whole).

For testing and benchmarking the streaming engine on model sizes that do not fit in memory: a
Llama-3-8B-shaped folder is 16 GB of bf16 on disk and at most one tensor in memory while it is
written. The weights are random (normal, std 0.02; norms 1), so perplexities are meaningless but
shapes, memory and speed are those of the real model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig

from mka_core.engine.layerpass import build_skeleton
from mka_core.engine.weights import TensorInfo, check_disk_space, write_shards
from mka_core.errors import MkaInputError, ProgressFn
from mka_core.files import atomic_dir

# (name, config) of the shapes the benchmark uses
SHAPES = {
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
    # Llama-3-70B's widths with 4 of its 80 layers (11 GB of bf16): one block (1.71 GB), the
    # embedding and the LM head (2.10 GB each) are 70B's own, so per-command memory is 70B's
    "llama3-70b-wide-4l": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=4,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
    "llama-1b": dict(  # TinyLlama-1.1B's shape, with the bundled tokenizer's vocabulary
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=49152,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
}


def llama_config(vocab_size: int | None = None, **overrides):

    cfg = LlamaConfig(**overrides)
    if vocab_size is not None:
        cfg.vocab_size = vocab_size
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = 0
    return cfg


def write_random_model(
    config,
    out: str | Path,
    tokenizer=None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> Path:
    """Write a random model of `config`'s shape as a sharded safetensors folder (plus the
    tokenizer, whose vocabulary must not exceed the config's)."""

    if tokenizer is not None and len(tokenizer) > int(config.vocab_size):
        raise MkaInputError(
            f"the tokenizer has {len(tokenizer)} tokens, more than the config's {config.vocab_size}"
        )
    config.dtype = dtype
    skeleton = build_skeleton(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    items = [
        TensorInfo(name, tuple(t.shape), dtype)
        for name, t in skeleton.state_dict().items()
        if not (tied and name == "lm_head.weight")
    ]
    out = Path(out).expanduser()
    check_disk_space(
        out.parent if out.parent.exists() else Path.cwd(), sum(i.nbytes for i in items)
    )
    gen = torch.Generator().manual_seed(seed)

    def produce(info: TensorInfo) -> torch.Tensor:
        if info.name.endswith("norm.weight") or len(info.shape) == 1:
            return torch.ones(info.shape, dtype=dtype)
        return (torch.randn(info.shape, generator=gen) * 0.02).to(dtype)

    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_shards(tmp, items, produce, progress=progress)
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out
