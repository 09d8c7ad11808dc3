"""Multiple-choice accuracy on an MMLU-format folder (README, "The command line"), on the layer-by-layer engine,
so a streamed model is scored the same way as one in memory."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mka_core.data.corpus import mmlu_prompts
from mka_core.engine.layerpass import LayerPass, as_stack
from mka_core.errors import MkaInputError, ProgressFn, report
from mka_core.evaluation.generation import check_batch_size, check_model, eval_mode, max_positions

log = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")


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


def continuations(tokenizer) -> list[list[int]]:
    """The tokens of " A" … " D" as they follow "Answer:" — one each for most tokenizers; a
    tokenizer may split off the space (then each letter is two tokens, scored together)."""
    out = []
    for letter in LETTERS:
        toks = tokenizer(" " + letter, add_special_tokens=False)["input_ids"]
        if not toks:
            raise MkaInputError(f"the tokenizer encodes {' ' + letter!r} as no tokens")
        out.append(list(toks))
    if len({tuple(c) for c in out}) != len(out):
        raise MkaInputError(f"the tokenizer gives the answer letters A-D the same tokens {out}")
    return out


def _padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (n, T), right-padded
    mask = torch.zeros_like(ids)
    for r, e in enumerate(rows):
        ids[r, : len(e)] = torch.tensor(e)
        mask[r, : len(e)] = 1
    return ids, mask


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _run(model, tokenizer, rows, batch_size, progress):
    """(stack, pass): `rows` of token ids, right-padded, run through every block of `model`."""
    ids, mask = _padded(rows, _pad_id(tokenizer))
    stack = as_stack(model)
    lp = LayerPass.start(stack, ids, mask, batch_size=batch_size)
    return stack, lp.run(progress=progress, label="MMLU: ")


def _last_logits(model, tokenizer, encoded, letter_ids, batch_size, progress) -> torch.Tensor:
    """(n_questions, 4): the letters' logits after each prompt."""
    stack, lp = _run(model, tokenizer, encoded, batch_size, progress)
    out = []
    with stack.head() as (_, logits):
        for b, h in zip(lp.batches, lp.normed(), strict=True):
            last = b.mask.sum(1) - 1  # (B,) the last real token of each prompt
            lg = logits(h[torch.arange(h.shape[0], device=h.device), last])  # (B, V)
            out.append(lg[:, torch.tensor(letter_ids, device=lg.device)].float().cpu())
    return torch.cat(out)


def _continuation_logprobs(model, tokenizer, encoded, conts, batch_size, progress):
    """(n_questions, 4): log p(letter's tokens | prompt), summed over its tokens — one row per
    question and letter (what lm-eval's multiple-choice accuracy compares)."""
    rows = [e + c[:-1] for e in encoded for c in conts]
    targets = [(len(e) - 1, c) for e in encoded for c in conts]
    stack, lp = _run(model, tokenizer, rows, batch_size, progress)
    scores = []
    with stack.head() as (_, logits):
        r = 0
        for h in lp.normed():
            for i in range(h.shape[0]):
                start, cont = targets[r]
                lg = logits(h[i, start : start + len(cont)]).float().log_softmax(-1)  # (k, V)
                picked = lg[torch.arange(len(cont)), torch.tensor(cont, device=lg.device)]
                scores.append(float(picked.sum()))
                r += 1
    return torch.tensor(scores).view(len(encoded), len(conts))


def mmlu_accuracy(
    model,
    tokenizer,
    folder: str | Path,
    k_shot: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    progress: ProgressFn | None = None,
) -> dict:
    """Accuracy on an MMLU-format folder: the answer letter the model finds most likely after
    each prompt (k-shot examples from dev/) — the argmax of the letters' log-likelihoods, as
    lm-eval's multiple-choice accuracy; when each letter is one token, of their logits.

    limit: score only that many questions, spread evenly over the test split (so every subject
    keeps its share). Returns ``accuracy``, ``n``, ``k_shot`` and ``per_subject``
    ({subject: {"accuracy", "n"}}).
    """

    check_model(model)
    check_batch_size(batch_size)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise MkaInputError(f"limit must be an integer >= 1 or None, got {limit!r}")
    pairs = mmlu_prompts(folder, k_shot=k_shot)
    if limit is not None and limit < len(pairs):
        pairs = [pairs[(j * len(pairs)) // limit] for j in range(limit)]
    conts = continuations(tokenizer)
    max_pos = max_positions(model)
    longest = max(len(c) for c in conts)
    n_cut = 0
    encoded = []
    for prompt, _ in pairs:
        ids = tokenizer(prompt)["input_ids"]
        room = None if max_pos is None else max_pos - longest + 1
        if room is not None and len(ids) > room:
            ids = ids[-room:]  # keep the question; drop the oldest shots
            n_cut += 1
        encoded.append(ids)
    if n_cut:
        log.warning("%d MMLU prompts were longer than the model's context and were cut", n_cut)
    with eval_mode(model), torch.inference_mode():
        if longest == 1:  # one token per letter: one row per question, the letters' logits
            scores = _last_logits(
                model, tokenizer, encoded, [c[0] for c in conts], batch_size, progress
            )
        else:
            scores = _continuation_logprobs(model, tokenizer, encoded, conts, batch_size, progress)
    picks = scores.argmax(-1).tolist()  # (n_questions,)
    correct: dict[str, list[int]] = {}  # subject -> [right, total]
    for (_, item), pick in zip(pairs, picks, strict=True):
        tally = correct.setdefault(item.subject, [0, 0])
        tally[0] += int(LETTERS[pick] == item.answer)
        tally[1] += 1
    report(progress, 1.0, f"MMLU: {len(pairs)} questions")
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
