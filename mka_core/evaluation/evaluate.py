"""Evaluating an original model and a compressed one on the same data.

What a compression cost: perplexity on the evaluation windows, and fidelity without labels (the KL
divergence of the compressed model's next-token distribution from the original's, and how often
both predict the same token), plus multiple-choice accuracy on an MMLU-format folder. What it saved:
parameters, bytes, layers, prefill and decode speed. And a few greedy generations side by side.

Every number is measured the same way for every model so that they compare: the same windows
(scored independently, no overlap), the same fixed prompt for speed, the same prompts for text.

Scores run on the layer-by-layer engine, in memory or streamed, in bounded memory: the LM head is
applied a slice of the vocabulary at a time (`Stack.logit_slices`; streamed, each slice is read from
disk and dropped, so no head is held whole: Llama-3-70B's is 2.1 GB of bf16, and fidelity reads
two), with each position's log-sum-exp, target logit, argmax and KL kept as running sums across the
slices, so tokens × vocabulary is never held whole either. The original's reference for KL is its
final hidden states (tokens × d_model in the compute dtype), kept once per session.
Speed and generations need a model in memory; on a streamed one they are skipped, and said so.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from mka_core.engine.layerpass import LayerPass, Stack, as_stack, head_slice_rows
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
from mka_core.evaluation.provenance import versions
from mka_core.evaluation.results import EvalResult, disk_bytes, load_results, save_results, size  # noqa: F401

log = logging.getLogger(__name__)

PASS_ELEMENTS = 64 * 1024**2  # hidden-state values one pass holds (256 MB in fp32)
SCAN_ELEMENTS = 4 * 1024**2  # logits per (positions × vocabulary slice) step: 16 MB in fp32


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


def _positions(hidden: list[torch.Tensor]) -> torch.Tensor:
    """Every predicting position of every batch, in window order: (n_positions, d_model)."""
    return torch.cat([h[:, :-1].reshape(-1, h.shape[-1]) for h in hidden])


class _Running:
    """One model's next-token statistics per position, accumulated over vocabulary slices:
    log-sum-exp (a running max and the sum of exp(logit - max)), the target's logit, the argmax
    (the first id of the largest logit, as `argmax` over the whole row gives)."""

    def __init__(self, n: int, device):
        self.max = torch.full((n,), -math.inf, device=device)  # float32, as the logits
        self.sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.target = torch.zeros(n, dtype=torch.float64, device=device)
        self.arg = torch.zeros(n, dtype=torch.long, device=device)

    def add(self, p: slice, z: torch.Tensor, v0: int, targets: torch.Tensor) -> torch.Tensor:
        """Logits z (P, R) of ids v0..v0+R-1 at positions p; returns exp(z - new max) (P, R)
        and leaves the factor the old sums were rescaled by in `self.rescale`."""
        top, arg = z.max(dim=-1)  # (P,), the first id of the largest logit in this slice
        old = self.max[p].clone()
        better = top > old  # strictly: an earlier slice keeps a tie
        self.arg[p] = torch.where(better, arg + v0, self.arg[p])
        new_max = torch.maximum(old, top)
        self.rescale = torch.where(old == -math.inf, 0.0, torch.exp(old - new_max)).double()
        e = torch.exp(z - new_max[:, None])  # (P, R)
        self.sum[p] = self.sum[p] * self.rescale + e.sum(dim=-1).double()
        self.max[p] = new_max
        local = targets - v0
        inside = (local >= 0) & (local < z.shape[1])
        picked = z.gather(-1, local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(-1).double()
        self.target[p] = torch.where(inside, picked, self.target[p])
        return e

    def logsumexp(self) -> torch.Tensor:
        return self.max.double() + self.sum.log()

    def nll(self) -> torch.Tensor:
        """−log p(target) per position (float64)."""
        return self.logsumexp() - self.target


def _scan(stacks: list[Stack], positions: list[torch.Tensor], targets: torch.Tensor, progress):
    """Run every position of every model through its LM head, slice by slice in step: the
    running statistics per model and, for two models, KL(P_0 || P_1) per position (float64)."""
    d_model = max(int(h.shape[-1]) for h in positions)
    rows = head_slice_rows(_vocab_size(stacks[0]), d_model)
    n = int(targets.shape[0])
    device = positions[0].device
    targets = targets.to(device)
    runs = [_Running(n, device) for _ in stacks]
    kl_part = torch.zeros(n, dtype=torch.float64, device=device)  # Σ exp(z0 - max0)·(z0 - z1)
    step = max(1, SCAN_ELEMENTS // rows)  # positions per step
    n_slices = -(-_vocab_size(stacks[0]) // rows)
    for k, sliced in enumerate(zip(*(s.logit_slices(rows) for s in stacks), strict=True)):
        v0 = sliced[0][0]
        for p0 in range(0, n, step):
            p = slice(p0, min(p0 + step, n))
            z = [fn(h[p].to(device)).float() for (_, fn), h in zip(sliced, positions)]
            if any(zi.shape != z[0].shape for zi in z):  # e.g. a head padding the vocabulary
                raise MkaInputError(
                    f"the models' logits differ in shape at vocabulary id {v0}: "
                    f"{', '.join(str(tuple(zi.shape)) for zi in z)}"
                )
            e = [r.add(p, zi, v0, targets[p]) for r, zi in zip(runs, z)]
            if len(z) == 2:
                # p log(p/q) summed as exp(z0 - max0)·(z0 - z1), 0·log 0 = 0 where p has no mass
                part = torch.where(e[0] > 0, e[0] * (z[0] - z[1]), 0.0).sum(dim=-1).double()
                kl_part[p] = kl_part[p] * runs[0].rescale + part
        report(progress, (k + 1) / n_slices, f"LM head: slice {k + 1}/{n_slices}")
    kl = None
    if len(stacks) == 2:  # E_p[z0 - z1] - (lse0 - lse1)
        kl = kl_part / runs[0].sum - (runs[0].logsumexp() - runs[1].logsumexp())
    return runs, kl


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
    with eval_mode(model), torch.inference_mode():
        hidden = final_states(
            stack, windows, batch_size, sub_progress(progress, 0, 0.9), "perplexity: "
        )
        targets = windows[:, 1:].reshape(-1)  # (n_positions,), in the order of _positions
        (run,), _ = _scan([stack], [_positions(hidden)], targets, sub_progress(progress, 0.9, 1.0))
        nll = run.nll().cpu()
    report(progress, 1.0, f"perplexity: {len(windows)} windows")
    return _exp(float(nll.sum()) / len(nll))


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
    n_windows, width = int(windows.shape[0]), int(windows.shape[1])
    with eval_mode(original, compressed), torch.inference_mode():
        ref = _reference(so, windows, batch_size, reference_cache, sub_progress(progress, 0, 0.4))
        comp = final_states(
            sc, windows, batch_size, sub_progress(progress, 0.4, 0.8), "compressed: "
        )
        targets = windows[:, 1:].reshape(-1)  # (n_positions,), in the order of _positions
        (run_o, run_c), kl = _scan(
            [so, sc], [_positions(ref), _positions(comp)], targets, sub_progress(progress, 0.8, 1)
        )
        agree = int((run_o.arg == run_c.arg.to(run_o.arg.device)).sum())
        # NLL summed per window: (n_windows,)
        win_o = run_o.nll().cpu().view(n_windows, width - 1).sum(dim=1)
        win_c = run_c.nll().cpu().view(n_windows, width - 1).sum(dim=1)
        kl_sum = float(kl.sum())
    count = n_windows * (width - 1)
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
        "versions": versions(),
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
