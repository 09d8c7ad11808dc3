"""Tiny random models for tests and instant demos (``tiny:<arch>``): built in code from a
config, deterministic under a seed, with a small byte-level BPE tokenizer trained on the built-in
corpus; written once as a folder when they are to be streamed like any other model."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from mka_core.data.corpus import builtin_corpus
from mka_core.errors import MkaInputError
from mka_core.files import temp_dir
from mka_core.models.cache import cache_dir, into_cache

log = logging.getLogger(__name__)

TINY_ARCHS = ("llama", "mistral", "qwen2", "phi3", "mixtral", "qwen3_moe", "olmo2")
# what each family adds to the common shape: mixtures of experts get 4 experts of width 32,
# 2 routed per token (small, like the rest, yet enough for routing to matter)
_EXTRA = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    "qwen3_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
}


def tiny_folder(arch: str, seed: int) -> Path:
    """A tiny random model written once as a folder, so that it can be streamed like any other."""
    target = cache_dir() / f"tiny-{arch}-seed{seed}-v1"

    def write(tmp: Path) -> None:
        model, tokenizer = build_tiny_model(arch, seed=seed)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return into_cache(target, write, f"tiny:{arch}")


def tiny_tokenizer():
    """A small byte-level BPE tokenizer trained on the built-in corpus (deterministic, offline)."""
    target = cache_dir() / "tiny-tokenizer-v1"

    if (target / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(target))

    calib, _ = builtin_corpus()
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([d.text for d in calib[:200]], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(target.parent, ".tmp-")
        fast.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError as e:
        log.warning("could not cache the tiny tokenizer: %s", e)
    return fast


def tiny_config(arch: str = "llama", n_layers: int = 6, d_model: int = 64, vocab_size: int = 512):
    """Config of a small random model: 4 query heads over 2 KV groups, head_dim 16; MLP width
    2 * d_model, or 4 experts of width 32 (top-2) for the mixtures of experts."""

    if arch not in TINY_ARCHS:
        raise MkaInputError(f"unknown tiny model 'tiny:{arch}'; available: {', '.join(TINY_ARCHS)}")
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=d_model // 4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    kw.update(_EXTRA.get(arch, {}))
    cfg = AutoConfig.for_model(arch, **kw)
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    return cfg


def build_tiny_model(arch: str = "llama", seed: int = 0, n_layers: int = 6, d_model: int = 64):
    """A randomly initialised tiny model and its tokenizer; same seed, same weights."""

    tokenizer = tiny_tokenizer()
    cfg = tiny_config(arch, n_layers=n_layers, d_model=d_model, vocab_size=len(tokenizer))
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(gen_state)
    return model, tokenizer
