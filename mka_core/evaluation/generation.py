"""Speed and sample text: prefill and decode throughput, and greedy generations from fixed prompts.

These need the model in memory (transformers' `generate` with its KV cache): decoding with weights
read from disk for every token measures the disk, not the model, so a streamed model is refused
here and its evaluation says that it skipped them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence

import torch
from torch import nn
from transformers import GenerationConfig

from mka_core.data.corpus import builtin_corpus
from mka_core.engine.layerpass import Stack
from mka_core.errors import MkaInputError, ProgressFn, report

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "In Python, a list comprehension",
    "The theory of relativity",
)
STREAMED_SKIP = "skipped: the model is streamed from disk (decoding would time the disk)"


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(*models):
    """Evaluate with dropout off, and give each model back in the mode it came in."""
    models = [m for m in models if isinstance(m, nn.Module)]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


def sub_progress(progress: ProgressFn | None, start: float, end: float) -> ProgressFn | None:
    """A progress callback for one stage that fills [start, end] of the caller's bar."""
    if progress is None:
        return None
    return lambda f, msg: report(progress, start + (end - start) * f, msg)


def max_positions(model) -> int | None:
    n = getattr(model.config, "max_position_embeddings", None)
    return int(n) if n else None


def check_model(model: object, what: str = "model") -> None:
    """A causal LM in memory, or a streamed engine.Stack."""

    if isinstance(model, Stack):
        return
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise MkaInputError(f"{what} must be a transformers causal LM, got {type(model).__name__}")
    if next(model.parameters(), None) is None:
        raise MkaInputError(f"{what} has no parameters")


def check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise MkaInputError(f"batch size must be an integer >= 1, got {batch_size!r}")


def _resident(model, what: str) -> nn.Module:
    check_model(model)
    if not isinstance(model, nn.Module):
        raise MkaInputError(f"{what} needs the model in memory; this one is streamed from disk")
    return model


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock times measure the computation."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _generate(model: nn.Module, tokenizer, ids: torch.Tensor, new_tokens: int, min_new: int):
    """Greedy decoding with the KV cache; the same settings for every model."""

    cfg = model.config
    eos = getattr(cfg, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    gen = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=new_tokens,
        min_new_tokens=min_new,
        use_cache=True,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    mask = torch.ones_like(ids)
    return model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)


def speed_prompt(tokenizer, prompt_tokens: int = 128) -> torch.Tensor:
    """A fixed prompt of exactly `prompt_tokens` tokens from the built-in evaluation split: (1, P)."""

    _, evaluation = builtin_corpus()
    ids: list[int] = []
    for doc in evaluation:
        ids.extend(tokenizer(doc.text + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= prompt_tokens:
            break
    if len(ids) < prompt_tokens:
        raise MkaInputError(
            f"the built-in corpus gives only {len(ids)} tokens, fewer than {prompt_tokens}"
        )
    return torch.tensor([ids[:prompt_tokens]], dtype=torch.long)


def speed(
    model: nn.Module,
    tokenizer,
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    repeats: int = 3,
) -> dict:
    """Prefill and decode throughput, measured the same way for every model.

    prefill: one forward pass over a fixed prompt of `prompt_tokens` tokens (built-in evaluation
    text), best of `repeats` after one warm-up. decode: greedy `generate` of exactly `new_tokens`
    tokens with the KV cache, and of 1 token (best of `repeats` each); the one-token run holds the
    prefill and generate's own overhead, so decode speed = (new_tokens - 1) / (t_generate(N) -
    t_generate(1)). (Subtracting a plain forward pass instead would under-count: `generate` computes
    logits at the last position only.) Returns ``prefill_tps``, ``decode_tps`` and raw seconds.
    """
    model = _resident(model, "speed")
    for name, value, least in (
        ("prompt_tokens", prompt_tokens, 1),
        ("new_tokens", new_tokens, 2),
        ("repeats", repeats, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise MkaInputError(f"{name} must be an integer >= {least}, got {value!r}")
    max_pos = max_positions(model)
    if max_pos is not None and prompt_tokens + new_tokens > max_pos:
        raise MkaInputError(
            f"prompt_tokens + new_tokens = {prompt_tokens + new_tokens} exceeds the model's "
            f"max_position_embeddings ({max_pos})"
        )
    device = _device(model)
    ids = speed_prompt(tokenizer, prompt_tokens).to(device)  # (1, P)

    def timed(fn) -> float:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t0

    with eval_mode(model), torch.inference_mode():

        def prefill():
            model(input_ids=ids, use_cache=True)

        def generate():
            out = _generate(model, tokenizer, ids, new_tokens, new_tokens)
            # min_new_tokens guarantees the count; anything else means the timing is not comparable
            assert out.shape[1] == prompt_tokens + new_tokens, out.shape

        def generate_one():
            _generate(model, tokenizer, ids, 1, 1)

        prefill()  # warm-up: kernels, allocator, lazy init
        t_prefill = min(timed(prefill) for _ in range(repeats))
        generate()
        t_generate = min(timed(generate) for _ in range(repeats))
        t_first = min(timed(generate_one) for _ in range(repeats))
    t_decode = max(t_generate - t_first, 1e-9)
    result = {
        "prefill_tps": prompt_tokens / max(t_prefill, 1e-9),
        "decode_tps": (new_tokens - 1) / t_decode,
        "prefill_s": t_prefill,
        "generate_s": t_generate,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "device": str(device),
    }
    log.info(
        "speed on %s: prefill %.1f tok/s, decode %.1f tok/s",
        device,
        result["prefill_tps"],
        result["decode_tps"],
    )
    return result


def generations(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    max_new_tokens: int = 32,
) -> list[str]:
    """Greedy continuations of fixed prompts, one per prompt; only the new text is returned."""
    model = _resident(model, "generation")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise MkaInputError("prompts must be a non-empty list of non-empty strings")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise MkaInputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    device = _device(model)
    out: list[str] = []
    with eval_mode(model), torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]], dtype=torch.long, device=device)
            seq = _generate(model, tokenizer, ids, max_new_tokens, 0)  # (1, P + new)
            out.append(tokenizer.decode(seq[0, ids.shape[1] :].tolist(), skip_special_tokens=True))
    return out
