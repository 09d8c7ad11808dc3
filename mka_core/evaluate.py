"""Evaluating an original model and a compressed one on the same data (SPEC §9).

What a compression cost: perplexity on the evaluation windows, and fidelity without labels (the KL
divergence of the compressed model's next-token distribution from the original's, and how often
both predict the same token), plus multiple-choice accuracy on an MMLU-format folder. What it saved:
parameters, bytes, layers, prefill and decode speed. And a few greedy generations side by side.

Every number is measured the same way for every model so that they compare: the same windows
(scored independently, no overlap), the same fixed prompt for speed, the same prompts for text.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MkaInputError, ProgressFn, report
from .models import count_bytes, count_params, get_layers

log = logging.getLogger(__name__)

FORMAT = "mka-eval"
VERSION = 1
DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "In Python, a list comprehension",
    "The theory of relativity",
)
LETTERS = ("A", "B", "C", "D")


# ---------------------------------------------------------------------------------------------
# helpers


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval_mode(*models: nn.Module):
    """Evaluate with dropout off, and give each model back in the mode it came in."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock times measure the computation."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _sub(progress: ProgressFn | None, start: float, end: float) -> ProgressFn | None:
    """A progress callback for one stage that fills [start, end] of the caller's bar."""
    if progress is None:
        return None
    return lambda f, msg: report(progress, start + (end - start) * f, msg)


def _vocab_size(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear):
        return int(head.out_features)
    return int(model.config.vocab_size)


def _max_positions(model: nn.Module) -> int | None:
    n = getattr(model.config, "max_position_embeddings", None)
    return int(n) if n else None


def _check_model(model: object, what: str = "model") -> None:
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise MkaInputError(f"{what} must be a transformers causal LM, got {type(model).__name__}")
    if next(model.parameters(), None) is None:
        raise MkaInputError(f"{what} has no parameters")


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise MkaInputError(f"batch size must be an integer >= 1, got {batch_size!r}")


def _check_windows(windows: object, *models: nn.Module) -> torch.Tensor:
    """Evaluation windows (n_windows, window) of token ids that every model can score."""
    if not isinstance(windows, torch.Tensor):
        raise MkaInputError(
            f"evaluation windows must be a tensor (n_windows, window), got {type(windows).__name__}"
        )
    if windows.dim() != 2:
        raise MkaInputError(
            f"evaluation windows must be 2-D (n_windows, window), got shape {tuple(windows.shape)}"
        )
    if windows.numel() == 0:
        raise MkaInputError(f"evaluation windows are empty (shape {tuple(windows.shape)})")
    if windows.dtype.is_floating_point or windows.dtype.is_complex or windows.dtype == torch.bool:
        raise MkaInputError(f"evaluation windows must hold integer token ids, got {windows.dtype}")
    window = int(windows.shape[1])
    if window < 2:
        raise MkaInputError(f"evaluation window must be >= 2 tokens to predict one, got {window}")
    lo, hi = int(windows.min()), int(windows.max())
    for m in models:
        max_pos = _max_positions(m)
        if max_pos is not None and window > max_pos:
            raise MkaInputError(
                f"evaluation window of {window} tokens is longer than the model's "
                f"max_position_embeddings ({max_pos}); use a smaller window"
            )
        n_emb = int(m.get_input_embeddings().num_embeddings)
        if lo < 0 or hi >= n_emb:
            raise MkaInputError(
                f"evaluation windows hold token ids in [{lo}, {hi}] but the model's vocabulary has "
                f"{n_emb} tokens; were they made with another tokenizer?"
            )
    return windows.long()


def _next_token_logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(B, T) token ids → (B, T-1, V) float32 log-probabilities of the next token."""
    logits = model(input_ids=ids.to(_device(model)), use_cache=False).logits  # (B, T, V)
    # float32 for the loss whatever the model's dtype; the last position predicts nothing we have
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


def _nll_sum(logp: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum of -log p(target) over all positions: logp (B, T-1, V), targets (B, T-1)."""
    picked = logp.gather(-1, targets.to(logp.device).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return float(-picked.double().sum())


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


# ---------------------------------------------------------------------------------------------
# perplexity and fidelity


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: ProgressFn | None = None,
) -> float:
    """exp(mean next-token NLL) over every predicted position of every window.

    windows: (n_windows, window) token ids, each window scored on its own (no overlap, no context
    carried over), so a window of T tokens gives T-1 predictions.
    """
    _check_model(model)
    _check_batch_size(batch_size)
    windows = _check_windows(windows, model)
    n, window = windows.shape
    total, count = 0.0, 0
    with _eval_mode(model), torch.inference_mode():
        for s in range(0, n, batch_size):
            ids = windows[s : s + batch_size]  # (B, T)
            logp = _next_token_logprobs(model, ids)  # (B, T-1, V)
            total += _nll_sum(logp, ids[:, 1:])
            count += ids.shape[0] * (window - 1)
            del logp
            done = min(s + batch_size, n)
            report(progress, done / n, f"perplexity: {done}/{n} windows")
    return _exp(total / count)


def fidelity(
    original: nn.Module,
    compressed: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: ProgressFn | None = None,
    reference_cache: dict | None = None,
) -> dict:
    """How closely `compressed` follows `original` on the windows, without labels.

    One forward pass of each model per batch gives everything: ``kl`` (mean over positions of
    KL(P_original || P_compressed), in nats), ``top1`` (share of positions where both argmaxes
    agree), and both perplexities (``perplexity_original``, ``perplexity_compressed``).
    Also ``n_positions``, the number of predicted positions scored.

    reference_cache: an optional dict that keeps the original model's log-probabilities. An empty
    dict is filled on the first call; later calls with the same dict, windows and batch size reuse
    them instead of running the original again (many compressed models against one original for
    the price of one pass; it holds n_windows x (window - 1) x vocab float32 values).
    """
    _check_model(original, "original model")
    _check_model(compressed, "compressed model")
    _check_batch_size(batch_size)
    v_orig, v_comp = _vocab_size(original), _vocab_size(compressed)
    if v_orig != v_comp:
        raise MkaInputError(
            f"vocabulary mismatch: the original model predicts {v_orig} tokens, the compressed one "
            f"{v_comp}; fidelity needs the same vocabulary"
        )
    windows = _check_windows(windows, original, compressed)
    n, window = windows.shape
    if reference_cache is not None:
        if not isinstance(reference_cache, dict):
            raise MkaInputError(
                f"reference_cache must be a dict, got {type(reference_cache).__name__}"
            )
        seen = reference_cache.setdefault("windows", windows.clone())
        if reference_cache.setdefault("batch_size", batch_size) != batch_size or not (
            seen.shape == windows.shape and torch.equal(seen, windows)
        ):
            raise MkaInputError(
                "reference_cache was filled for other windows or another batch size; "
                "use a new dict for these"
            )
    nll_o = nll_c = kl_sum = 0.0
    agree = count = 0
    with _eval_mode(original, compressed), torch.inference_mode():
        for s in range(0, n, batch_size):
            ids = windows[s : s + batch_size]  # (B, T)
            targets = ids[:, 1:]  # (B, T-1)
            if reference_cache is not None and s in reference_cache:
                logp_o = reference_cache[s]  # (B, T-1, V), the original's, from an earlier call
            else:
                logp_o = _next_token_logprobs(original, ids)  # (B, T-1, V)
                if reference_cache is not None:
                    reference_cache[s] = logp_o
            logp_c = _next_token_logprobs(compressed, ids).to(logp_o.device)  # (B, T-1, V)
            if logp_c.shape != logp_o.shape:  # e.g. a head that pads the vocabulary differently
                raise MkaInputError(
                    f"the models' logits differ in shape: original {tuple(logp_o.shape)}, "
                    f"compressed {tuple(logp_c.shape)}"
                )
            nll_o += _nll_sum(logp_o, targets)
            nll_c += _nll_sum(logp_c, targets)
            p_o = logp_o.exp()
            # p log(p/q), with 0·log 0 = 0 where the original gives a token no mass at all
            kl = torch.where(p_o > 0, p_o * (logp_o - logp_c), 0.0).sum(-1)  # (B, T-1)
            kl_sum += float(kl.double().sum())
            agree += int((logp_o.argmax(-1) == logp_c.argmax(-1)).sum())
            count += ids.shape[0] * (window - 1)
            del logp_o, logp_c, p_o, kl
            done = min(s + batch_size, n)
            report(progress, done / n, f"fidelity: {done}/{n} windows")
    return {
        "kl": max(kl_sum / count, 0.0),  # float rounding can leave -1e-9 for identical models
        "top1": agree / count,
        "perplexity_original": _exp(nll_o / count),
        "perplexity_compressed": _exp(nll_c / count),
        "n_positions": count,
    }


# ---------------------------------------------------------------------------------------------
# speed and text


def _generate(model: nn.Module, tokenizer, ids: torch.Tensor, new_tokens: int, min_new: int):
    """Greedy decoding with the KV cache; the same settings for every model."""
    from transformers import GenerationConfig

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
    from .data import builtin_corpus

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
    _check_model(model)
    for name, value, least in (
        ("prompt_tokens", prompt_tokens, 1),
        ("new_tokens", new_tokens, 2),
        ("repeats", repeats, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise MkaInputError(f"{name} must be an integer >= {least}, got {value!r}")
    max_pos = _max_positions(model)
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

    with _eval_mode(model), torch.inference_mode():

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
    _check_model(model)
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise MkaInputError("prompts must be a non-empty list of non-empty strings")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise MkaInputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    device = _device(model)
    out: list[str] = []
    with _eval_mode(model), torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]], dtype=torch.long, device=device)
            seq = _generate(model, tokenizer, ids, max_new_tokens, 0)  # (1, P + new)
            out.append(tokenizer.decode(seq[0, ids.shape[1] :].tolist(), skip_special_tokens=True))
    return out


# ---------------------------------------------------------------------------------------------
# multiple choice


def answer_token_ids(tokenizer) -> list[int]:
    """Token ids of the answer letters as they follow "Answer:" (with a space: " A" … " D")."""
    ids = []
    for letter in LETTERS:
        toks = tokenizer(" " + letter, add_special_tokens=False)["input_ids"]
        if not toks:
            raise MkaInputError(f"the tokenizer encodes {' ' + letter!r} as no tokens")
        ids.append(int(toks[-1]))
    if len(set(ids)) != len(ids):
        raise MkaInputError(f"the tokenizer gives the answer letters A-D non-distinct ids {ids}")
    return ids


def mmlu_accuracy(
    model: nn.Module,
    tokenizer,
    folder: str | Path,
    k_shot: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    progress: ProgressFn | None = None,
) -> dict:
    """Accuracy on an MMLU-format folder: argmax over the four answer letters' logits at the last
    position of each prompt (k-shot examples from dev/).

    limit: score only that many questions, spread evenly over the test split (so every subject
    keeps its share). Returns ``accuracy``, ``n``, ``k_shot`` and ``per_subject``
    ({subject: {"accuracy", "n"}}).
    """
    from .data import mmlu_prompts

    _check_model(model)
    _check_batch_size(batch_size)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise MkaInputError(f"limit must be an integer >= 1 or None, got {limit!r}")
    pairs = mmlu_prompts(folder, k_shot=k_shot)
    if limit is not None and limit < len(pairs):
        pairs = [pairs[(j * len(pairs)) // limit] for j in range(limit)]
    letter_ids = answer_token_ids(tokenizer)
    device = _device(model)
    max_pos = _max_positions(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_cut = 0
    correct: dict[str, list[int]] = {}  # subject -> [right, total]
    with _eval_mode(model), torch.inference_mode():
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s : s + batch_size]
            encoded = []
            for prompt, _ in chunk:
                ids = tokenizer(prompt)["input_ids"]
                if max_pos is not None and len(ids) > max_pos:
                    ids = ids[-max_pos:]  # keep the question; drop the oldest shots
                    n_cut += 1
                encoded.append(ids)
            width = max(len(e) for e in encoded)
            ids = torch.full((len(encoded), width), pad, dtype=torch.long)  # (B, T), right-padded
            mask = torch.zeros_like(ids)
            for r, e in enumerate(encoded):
                ids[r, : len(e)] = torch.tensor(e)
                mask[r, : len(e)] = 1
            logits = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                use_cache=False,
            ).logits  # (B, T, V)
            last = (mask.sum(1) - 1).to(device)  # (B,) the last real token of each prompt
            rows = torch.arange(len(encoded), device=device)
            picks = logits[rows, last][:, letter_ids].float().argmax(-1).tolist()  # (B,)
            for (_, item), pick in zip(chunk, picks, strict=True):
                tally = correct.setdefault(item.subject, [0, 0])
                tally[0] += int(LETTERS[pick] == item.answer)
                tally[1] += 1
            done = min(s + batch_size, len(pairs))
            report(progress, done / len(pairs), f"MMLU: {done}/{len(pairs)} questions")
    if n_cut:
        log.warning("%d MMLU prompts were longer than the model's context and were cut", n_cut)
    right = sum(t[0] for t in correct.values())
    n = sum(t[1] for t in correct.values())
    return {
        "accuracy": right / n,
        "n": n,
        "k_shot": k_shot,
        "per_subject": {
            subj: {"accuracy": t[0] / t[1], "n": t[1]} for subj, t in sorted(correct.items())
        },
    }


# ---------------------------------------------------------------------------------------------
# size


def size(model: nn.Module) -> dict:
    """Parameters (tied weights once), bytes in memory, and the shape that compression changes."""
    _check_model(model)
    cfg = model.config
    layers = get_layers(model)
    n_heads = int(cfg.num_attention_heads)
    return {
        "params": count_params(model),
        "bytes": count_bytes(model),
        "n_layers": len(layers),
        "intermediate_size": int(cfg.intermediate_size),
        "n_heads": n_heads,
        "n_kv_heads": int(getattr(cfg, "num_key_value_heads", None) or n_heads),
    }


def disk_bytes(path: str | Path) -> int:
    """Bytes on disk of a saved model: a file, or every file under a folder."""
    p = Path(path).expanduser()
    if p.is_file():
        return p.stat().st_size
    if not p.is_dir():
        raise MkaInputError(f"model path not found: {p}")
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class EvalResult:
    """Everything measured about one model. kl/top1 are None for the reference model itself."""

    label: str
    perplexity: float
    params: int
    bytes: int
    n_layers: int
    eval_tokens: int  # predicted positions scored for perplexity (and fidelity)
    kl: float | None = None  # mean KL(P_original || P_this), nats
    top1: float | None = None  # share of positions where the argmax agrees with the original
    disk_bytes: int | None = None  # after export (set with dataclasses.replace)
    intermediate_size: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    prefill_tps: float | None = None
    decode_tps: float | None = None
    generations: tuple[str, ...] = ()
    mmlu: dict | None = None  # mmlu_accuracy's dict
    meta: dict = field(default_factory=dict)  # data source, budget, window, device, ...

    def to_dict(self) -> dict:
        d = asdict(self)
        d["generations"] = list(self.generations)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EvalResult:
        if not isinstance(d, dict):
            raise MkaInputError(f"an evaluation result must be an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        required = {
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        }
        missing = sorted(required - d.keys())
        if missing:
            raise MkaInputError(f"evaluation result lacks the field(s) {', '.join(missing)}")
        kw = {k: v for k, v in d.items() if k in known}
        if not isinstance(kw["label"], str):
            raise MkaInputError(
                f"evaluation result field 'label' must be a string: {kw['label']!r}"
            )
        for key in ("perplexity", "kl", "top1", "prefill_tps", "decode_tps"):
            value = kw.get(key)
            if value is not None and (
                not isinstance(value, int | float) or isinstance(value, bool)
            ):
                raise MkaInputError(f"evaluation result field {key!r} must be a number: {value!r}")
        for key in ("params", "bytes", "n_layers", "eval_tokens", "disk_bytes"):
            value = kw.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise MkaInputError(
                    f"evaluation result field {key!r} must be an integer: {value!r}"
                )
        gens = kw.get("generations", ())
        if not isinstance(gens, list | tuple) or not all(isinstance(g, str) for g in gens):
            raise MkaInputError("evaluation result field 'generations' must be a list of strings")
        kw["generations"] = tuple(gens)
        for key in ("mmlu", "meta"):
            value = kw.get(key)
            if value is not None and not isinstance(value, dict):
                raise MkaInputError(f"evaluation result field {key!r} must be an object")
        if kw.get("meta") is None:
            kw["meta"] = {}
        return cls(**kw)


def save_results(path: str | Path, results: EvalResult | Sequence[EvalResult]) -> Path:
    """Write results as one JSON file (format mka-eval, version 1), atomically."""
    if isinstance(results, EvalResult):
        results = [results]
    if not all(isinstance(r, EvalResult) for r in results):
        raise MkaInputError("save_results expects EvalResult objects")
    p = Path(path).expanduser()
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "results": [r.to_dict() for r in results],
    }
    text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return p


def load_results(path: str | Path) -> list[EvalResult]:
    """Read a file written by save_results; a bad file gets a one-line MkaInputError."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise MkaInputError(f"results file not found: {p}")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MkaInputError(f"{p.name} is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise MkaInputError(f"{p.name} is not an MKA Studio evaluation file (format {FORMAT!r})")
    if doc.get("version") != VERSION:
        raise MkaInputError(
            f"{p.name} has evaluation format version {doc.get('version')!r}; expected {VERSION}"
        )
    items = doc.get("results")
    if not isinstance(items, list):
        raise MkaInputError(f"{p.name}: field 'results' must be a list")
    return [EvalResult.from_dict(d) for d in items]


# ---------------------------------------------------------------------------------------------
# one call for the app and the CLI


def _unpack(original) -> tuple[nn.Module, object]:
    """A LoadedModel (or anything with .model/.tokenizer), a (model, tokenizer) pair, or a model."""
    if isinstance(original, tuple) and len(original) == 2:
        return original[0], original[1]
    if hasattr(original, "model") and not isinstance(original, nn.Module):
        return original.model, getattr(original, "tokenizer", None)
    return original, None


def _result(
    model: nn.Module,
    tokenizer,
    label: str,
    ppl: float,
    n_positions: int,
    windows: torch.Tensor,
    *,
    kl: float | None,
    top1: float | None,
    with_speed: bool,
    with_generations: bool,
    gen_tokens: int,
    mmlu_folder: str | Path | None,
    mmlu_kw: dict,
    meta: dict | None,
    progress: ProgressFn | None,
) -> EvalResult:
    """Everything but the windows' scores (already computed) for one model."""
    sz = size(model)
    spd = None
    if with_speed:
        report(progress, 0.0, f"{label}: measuring speed")
        spd = speed(model, tokenizer)
    gens: tuple[str, ...] = ()
    if with_generations:
        report(progress, 0.3, f"{label}: sample generations")
        gens = tuple(generations(model, tokenizer, max_new_tokens=gen_tokens))
    mmlu = None
    if mmlu_folder is not None:
        mmlu = mmlu_accuracy(
            model, tokenizer, mmlu_folder, progress=_sub(progress, 0.4, 1.0), **mmlu_kw
        )
    p = next(model.parameters())
    info = {
        "window": int(windows.shape[1]),
        "n_windows": int(windows.shape[0]),
        "device": str(p.device),
        "dtype": str(p.dtype).replace("torch.", ""),
    }
    if spd is not None:
        info["speed"] = {
            k: spd[k] for k in ("prompt_tokens", "new_tokens", "prefill_s", "generate_s")
        }
    info.update(meta or {})
    return EvalResult(
        label=label,
        perplexity=ppl,
        kl=kl,
        top1=top1,
        params=sz["params"],
        bytes=sz["bytes"],
        n_layers=sz["n_layers"],
        intermediate_size=sz["intermediate_size"],
        n_heads=sz["n_heads"],
        n_kv_heads=sz["n_kv_heads"],
        prefill_tps=spd["prefill_tps"] if spd else None,
        decode_tps=spd["decode_tps"] if spd else None,
        generations=gens,
        mmlu=mmlu,
        eval_tokens=n_positions,
        meta=info,
    )


def _check_tokenizer(tokenizer, needed: bool) -> None:
    if needed and (tokenizer is None or not callable(tokenizer)):
        raise MkaInputError("a tokenizer is needed for speed, generations and MMLU; none was given")


def evaluate_model(
    model: nn.Module,
    tokenizer,
    windows: torch.Tensor,
    *,
    label: str = "model",
    batch_size: int = 4,
    with_speed: bool = True,
    with_generations: bool = True,
    gen_tokens: int = 32,
    mmlu_folder: str | Path | None = None,
    mmlu_k_shot: int = 0,
    mmlu_limit: int | None = None,
    meta: dict | None = None,
    progress: ProgressFn | None = None,
) -> EvalResult:
    """Evaluate one model on its own (no reference: kl and top1 are None).

    with_speed / with_generations (of `gen_tokens` new tokens each) / mmlu_folder choose the
    optional measurements; meta: extra facts to record with the result, e.g.
    {"data": "builtin", "budget": 8192}.
    """
    _check_model(model)
    _check_tokenizer(tokenizer, with_speed or with_generations or mmlu_folder is not None)
    windows = _check_windows(windows, model)
    ppl = perplexity(model, windows, batch_size=batch_size, progress=_sub(progress, 0.0, 0.6))
    n_positions = int(windows.shape[0]) * (int(windows.shape[1]) - 1)
    result = _result(
        model,
        tokenizer,
        label,
        ppl,
        n_positions,
        windows,
        kl=None,
        top1=None,
        with_speed=with_speed,
        with_generations=with_generations,
        gen_tokens=gen_tokens,
        mmlu_folder=mmlu_folder,
        mmlu_kw={"k_shot": mmlu_k_shot, "limit": mmlu_limit},
        meta=meta,
        progress=_sub(progress, 0.6, 1.0),
    )
    report(progress, 1.0, f"{label}: perplexity {ppl:.2f}")
    return result


def compare(
    original,
    compressed_model: nn.Module,
    windows: torch.Tensor,
    *,
    tokenizer=None,
    label: str = "compressed",
    original_label: str = "original",
    batch_size: int = 4,
    with_speed: bool = True,
    with_generations: bool = True,
    gen_tokens: int = 32,
    mmlu_folder: str | Path | None = None,
    mmlu_k_shot: int = 0,
    mmlu_limit: int | None = None,
    meta: dict | None = None,
    progress: ProgressFn | None = None,
    original_result: EvalResult | None = None,
    reference_cache: dict | None = None,
) -> tuple[EvalResult, EvalResult]:
    """Evaluate the original model and a compressed one on the same windows: (original, compressed).

    original_result: the original's result from an earlier compare with the same settings; it is
    returned as is, so the original's speed, generations and MMLU are not measured again.
    reference_cache: passed to `fidelity`, so the original's logits are computed once.

    original: a LoadedModel (or a (model, tokenizer) pair, or a bare model with `tokenizer=`).
    Perplexities and fidelity come from one forward pass of each model per window. The original's
    result has kl and top1 None; the compressed one's are measured against the original. Options
    as in `evaluate_model`.
    """
    orig_model, orig_tok = _unpack(original)
    tokenizer = tokenizer if tokenizer is not None else orig_tok
    _check_model(orig_model, "original model")
    _check_model(compressed_model, "compressed model")
    _check_tokenizer(tokenizer, with_speed or with_generations or mmlu_folder is not None)
    fid = fidelity(
        orig_model,
        compressed_model,
        windows,
        batch_size=batch_size,
        progress=_sub(progress, 0, 0.5),
        reference_cache=reference_cache,
    )
    common = {
        "with_speed": with_speed,
        "with_generations": with_generations,
        "gen_tokens": gen_tokens,
        "mmlu_folder": mmlu_folder,
        "mmlu_kw": {"k_shot": mmlu_k_shot, "limit": mmlu_limit},
        "meta": meta,
    }
    windows = windows.long()
    res_orig = original_result or _result(
        orig_model,
        tokenizer,
        original_label,
        fid["perplexity_original"],
        fid["n_positions"],
        windows,
        kl=None,
        top1=None,
        progress=_sub(progress, 0.5, 0.75),
        **common,
    )
    res_comp = _result(
        compressed_model,
        tokenizer,
        label,
        fid["perplexity_compressed"],
        fid["n_positions"],
        windows,
        kl=fid["kl"],
        top1=fid["top1"],
        progress=_sub(progress, 0.75, 1.0),
        **common,
    )
    report(
        progress,
        1.0,
        f"perplexity {res_orig.perplexity:.2f} -> {res_comp.perplexity:.2f}, "
        f"KL {fid['kl']:.4f}, top-1 agreement {fid['top1']:.1%}",
    )
    return res_orig, res_comp
