"""Evaluating an original model and a compressed one on the same data.

What a compression cost: perplexity on the evaluation windows, and fidelity without labels (the KL
divergence of the compressed model's next-token distribution from the original's, and how often
both predict the same token), plus multiple-choice accuracy on an MMLU-format folder. What it saved:
parameters, bytes, layers, prefill and decode speed. And a few greedy generations side by side.

Every number is measured the same way for every model so that they compare: the same windows
(scored independently, no overlap), the same fixed prompt for speed, the same prompts for text.

Scores run on the layer-by-layer engine, in memory or streamed, in bounded memory: the LM head is
applied a few hundred positions at a time, so tokens × vocabulary is never held whole, and the
original's reference for KL is its final hidden states (tokens × d_model), kept once per session.
Speed and generations need a model in memory; on a streamed one they are skipped, and said so.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mka_core.engine.layerpass import LayerPass, Stack, as_stack, logit_chunk, next_token_nll
from mka_core.errors import MkaInputError, ProgressFn, report
from mka_core.evaluation.generation import (
    STREAMED_SKIP,
    check_batch_size,
    check_model,
    eval_mode,
    generations,
    max_positions,
    speed,
    sub_progress,
)
from mka_core.evaluation.mmlu import LETTERS, answer_token_ids, mmlu_accuracy  # noqa: F401
from mka_core.evaluation.results import EvalResult, disk_bytes, load_results, save_results, size  # noqa: F401

log = logging.getLogger(__name__)

PASS_ELEMENTS = 64 * 1024**2  # hidden-state values one pass holds (256 MB in fp32)


# ---------------------------------------------------------------------------------------------
# helpers


def _vocab_size(model) -> int:
    if isinstance(model, Stack):
        return int(model.config.vocab_size)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear):
        return int(head.out_features)
    return int(model.config.vocab_size)


def _n_embeddings(model) -> int:
    if isinstance(model, Stack):
        return int(model.config.vocab_size)
    return int(model.get_input_embeddings().num_embeddings)


def _check_windows(windows: object, *models) -> torch.Tensor:
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
        max_pos = max_positions(m)
        if max_pos is not None and window > max_pos:
            raise MkaInputError(
                f"evaluation window of {window} tokens is longer than the model's "
                f"max_position_embeddings ({max_pos}); use a smaller window"
            )
        n_emb = _n_embeddings(m)
        if lo < 0 or hi >= n_emb:
            raise MkaInputError(
                f"evaluation windows hold token ids in [{lo}, {hi}] but the model's vocabulary has "
                f"{n_emb} tokens; were they made with another tokenizer?"
            )
    return windows.long()


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _groups(n_rows: int, tokens_per_row: int, d_model: int) -> list[range]:
    """Rows per pass so one pass holds at most PASS_ELEMENTS hidden values (each pass reads every
    block once; a larger budget of text takes more passes, not more memory)."""
    per = max(1, PASS_ELEMENTS // max(tokens_per_row * d_model, 1))
    return [range(s, min(s + per, n_rows)) for s in range(0, n_rows, per)]


def final_states(model, windows: torch.Tensor, batch_size: int, progress=None, label=""):
    """The final (normed) hidden states of every window, per batch: [(B, T, d_model), ...]."""
    stack = as_stack(model)
    out = []
    groups = _groups(int(windows.shape[0]), int(windows.shape[1]), int(stack.config.hidden_size))
    for gi, g in enumerate(groups):
        lp = LayerPass.start(stack, windows[g.start : g.stop], None, batch_size=batch_size)
        lp.run(
            progress=sub_progress(progress, gi / len(groups), (gi + 1) / len(groups)), label=label
        )
        out += lp.normed()
    return out


def _stats(logp_o, logp_c, targets) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """Per-position NLL of both models (float64), KL(P_o || P_c) summed and top-1 agreements,
    for one chunk."""
    nll_o = -logp_o.gather(-1, targets[:, None]).squeeze(-1).double()
    nll_c = -logp_c.gather(-1, targets[:, None]).squeeze(-1).double()
    p_o = logp_o.exp()
    # p log(p/q), with 0·log 0 = 0 where the original gives a token no mass at all
    kl = float(torch.where(p_o > 0, p_o * (logp_o - logp_c), 0.0).sum(-1).double().sum())
    agree = int((logp_o.argmax(-1) == logp_c.argmax(-1)).sum())
    return nll_o, nll_c, kl, agree


# ---------------------------------------------------------------------------------------------
# perplexity and fidelity


def perplexity(
    model,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: ProgressFn | None = None,
) -> float:
    """exp(mean next-token NLL) over every predicted position of every window.

    windows: (n_windows, window) token ids, each window scored on its own (no overlap, no context
    carried over), so a window of T tokens gives T-1 predictions.
    """
    check_model(model)
    check_batch_size(batch_size)
    windows = _check_windows(windows, model)
    stack = as_stack(model)
    chunk = logit_chunk(_vocab_size(model))
    total, count = 0.0, 0
    with eval_mode(model), torch.inference_mode():
        hidden = final_states(
            stack, windows, batch_size, sub_progress(progress, 0, 0.9), "perplexity: "
        )
        with stack.head() as (_, logits):
            for s, h in zip(range(0, len(windows), batch_size), hidden, strict=True):
                ids = windows[s : s + batch_size].to(h.device)
                s_, c_ = next_token_nll(logits, h, ids, None, chunk)
                total += s_
                count += c_
    report(progress, 1.0, f"perplexity: {len(windows)} windows")
    return _exp(total / count)


def _reference(original, windows, batch_size, reference_cache, progress):
    """The original's final hidden states, from the cache when it holds them for these windows."""
    if reference_cache is None:
        return final_states(original, windows, batch_size, progress, "original: ")
    if not isinstance(reference_cache, dict):
        raise MkaInputError(f"reference_cache must be a dict, got {type(reference_cache).__name__}")
    seen = reference_cache.setdefault("windows", windows.clone())
    if reference_cache.setdefault("batch_size", batch_size) != batch_size or not (
        seen.shape == windows.shape and torch.equal(seen, windows)
    ):
        raise MkaInputError(
            "reference_cache was filled for other windows or another batch size; "
            "use a new dict for these"
        )
    if "hidden" not in reference_cache:
        reference_cache["hidden"] = final_states(
            original, windows, batch_size, progress, "original: "
        )
    return reference_cache["hidden"]


def fidelity(
    original,
    compressed,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: ProgressFn | None = None,
    reference_cache: dict | None = None,
) -> dict:
    """How closely `compressed` follows `original` on the windows, without labels.

    ``kl`` (mean over positions of KL(P_original || P_compressed), in nats), ``top1`` (share of
    positions where both argmaxes agree), both perplexities (``perplexity_original``,
    ``perplexity_compressed``), ``n_positions``, the number of predicted positions scored, and
    each window's summed NLL (``window_nll_original``, ``window_nll_compressed``; every window
    scores window - 1 positions).

    reference_cache: an optional dict that keeps the original model's final hidden states
    (n_windows × window × d_model, in the compute dtype). An empty dict is filled on the first
    call; later calls with the same dict, windows and batch size reuse them instead of running the
    original again (many compressed models against one original for the price of one pass).
    """
    check_model(original, "original model")
    check_model(compressed, "compressed model")
    check_batch_size(batch_size)
    v_orig, v_comp = _vocab_size(original), _vocab_size(compressed)
    if v_orig != v_comp:
        raise MkaInputError(
            f"vocabulary mismatch: the original model predicts {v_orig} tokens, the compressed one "
            f"{v_comp}; fidelity needs the same vocabulary"
        )
    windows = _check_windows(windows, original, compressed)
    so, sc = as_stack(original), as_stack(compressed)
    chunk = logit_chunk(v_orig)
    n_windows, width = int(windows.shape[0]), int(windows.shape[1])
    win_o = torch.zeros(n_windows, dtype=torch.float64)  # NLL summed per window
    win_c = torch.zeros(n_windows, dtype=torch.float64)
    kl_sum = 0.0
    agree = count = 0
    with eval_mode(original, compressed), torch.inference_mode():
        ref = _reference(so, windows, batch_size, reference_cache, sub_progress(progress, 0, 0.4))
        comp = final_states(
            sc, windows, batch_size, sub_progress(progress, 0.4, 0.9), "compressed: "
        )
        with so.head() as (_, logits_o), sc.head() as (_, logits_c):
            for s, h_o, h_c in zip(range(0, len(windows), batch_size), ref, comp, strict=True):
                ids = windows[s : s + batch_size]
                targets = ids[:, 1:].reshape(-1)
                ho = h_o[:, :-1].reshape(-1, h_o.shape[-1])
                hc = h_c[:, :-1].reshape(-1, h_c.shape[-1]).to(ho.device)
                for c in range(0, ho.shape[0], chunk):
                    lo = F.log_softmax(logits_o(ho[c : c + chunk]).float(), dim=-1)  # (chunk, V)
                    lc = F.log_softmax(logits_c(hc[c : c + chunk].to(h_c.device)).float(), dim=-1)
                    lc = lc.to(lo.device)
                    if lc.shape != lo.shape:  # e.g. a head that pads the vocabulary differently
                        raise MkaInputError(
                            f"the models' logits differ in shape: original {tuple(lo.shape)}, "
                            f"compressed {tuple(lc.shape)}"
                        )
                    a, b, k, g = _stats(lo, lc, targets[c : c + chunk].to(lo.device))
                    rows = s + torch.arange(c, c + len(a)) // (width - 1)  # window of each position
                    win_o.index_add_(0, rows, a.cpu())
                    win_c.index_add_(0, rows, b.cpu())
                    kl_sum, agree = kl_sum + k, agree + g
                count += ids.shape[0] * (ids.shape[1] - 1)
    nll_o, nll_c = float(win_o.sum()), float(win_c.sum())
    report(progress, 1.0, f"fidelity: {len(windows)} windows")
    return {
        "kl": max(kl_sum / count, 0.0),  # float rounding can leave -1e-9 for identical models
        "top1": agree / count,
        "perplexity_original": _exp(nll_o / count),
        "perplexity_compressed": _exp(nll_c / count),
        "n_positions": count,
        # per window: perplexities of any subset of windows follow without another pass
        "window_nll_original": win_o.tolist(),
        "window_nll_compressed": win_c.tolist(),
    }


# ---------------------------------------------------------------------------------------------
# one call for the app and the CLI


def _unpack(original) -> tuple[object, object]:
    """A LoadedModel (or anything with .model/.tokenizer), a (model, tokenizer) pair, or a model."""
    if isinstance(original, tuple) and len(original) == 2:
        return original[0], original[1]
    if hasattr(original, "model") and not isinstance(original, nn.Module | Stack):
        return original.model, getattr(original, "tokenizer", None)
    return original, None


def _result(
    model,
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
    stack = as_stack(model)
    skipped = {}
    spd = None
    if with_speed and stack.streamed:
        skipped["speed"] = STREAMED_SKIP
    elif with_speed:
        report(progress, 0.0, f"{label}: measuring speed")
        spd = speed(model, tokenizer)
    gens: tuple[str, ...] = ()
    if with_generations and stack.streamed:
        skipped["generations"] = STREAMED_SKIP
    elif with_generations:
        report(progress, 0.3, f"{label}: sample generations")
        gens = tuple(generations(model, tokenizer, max_new_tokens=gen_tokens))
    mmlu = None
    if mmlu_folder is not None:
        mmlu = mmlu_accuracy(
            model, tokenizer, mmlu_folder, progress=sub_progress(progress, 0.4, 1.0), **mmlu_kw
        )
    info = {
        "window": int(windows.shape[1]),
        "n_windows": int(windows.shape[0]),
        "device": str(stack.device),
        "dtype": str(stack.dtype).replace("torch.", ""),
        "streamed": stack.streamed,
    }
    if skipped:
        info["skipped"] = skipped
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
    model,
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
    check_model(model)
    _check_tokenizer(tokenizer, with_speed or with_generations or mmlu_folder is not None)
    windows = _check_windows(windows, model)
    ppl = perplexity(
        model, windows, batch_size=batch_size, progress=sub_progress(progress, 0.0, 0.6)
    )
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
        progress=sub_progress(progress, 0.6, 1.0),
    )
    report(progress, 1.0, f"{label}: perplexity {ppl:.2f}")
    return result


def compare(
    original,
    compressed_model,
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
    check_model(orig_model, "original model")
    check_model(compressed_model, "compressed model")
    _check_tokenizer(tokenizer, with_speed or with_generations or mmlu_folder is not None)
    fid = fidelity(
        orig_model,
        compressed_model,
        windows,
        batch_size=batch_size,
        progress=sub_progress(progress, 0, 0.5),
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
        progress=sub_progress(progress, 0.5, 0.75),
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
        progress=sub_progress(progress, 0.75, 1.0),
        **common,
    )
    report(
        progress,
        1.0,
        f"perplexity {res_orig.perplexity:.2f} -> {res_comp.perplexity:.2f}, "
        f"KL {fid['kl']:.4f}, top-1 agreement {fid['top1']:.1%}",
    )
    return res_orig, res_comp
