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


def mmlu_accuracy(
    model,
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

    check_model(model)
    check_batch_size(batch_size)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise MkaInputError(f"limit must be an integer >= 1 or None, got {limit!r}")
    pairs = mmlu_prompts(folder, k_shot=k_shot)
    if limit is not None and limit < len(pairs):
        pairs = [pairs[(j * len(pairs)) // limit] for j in range(limit)]
    letter_ids = torch.tensor(answer_token_ids(tokenizer))
    max_pos = max_positions(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_cut = 0
    encoded = []
    for prompt, _ in pairs:
        ids = tokenizer(prompt)["input_ids"]
        if max_pos is not None and len(ids) > max_pos:
            ids = ids[-max_pos:]  # keep the question; drop the oldest shots
            n_cut += 1
        encoded.append(ids)
    if n_cut:
        log.warning("%d MMLU prompts were longer than the model's context and were cut", n_cut)
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)  # (n, T), right-padded
    mask = torch.zeros_like(ids)
    for r, e in enumerate(encoded):
        ids[r, : len(e)] = torch.tensor(e)
        mask[r, : len(e)] = 1

    stack = as_stack(model)
    correct: dict[str, list[int]] = {}  # subject -> [right, total]
    with eval_mode(model), torch.inference_mode():
        lp = LayerPass.start(stack, ids, mask, batch_size=batch_size)
        lp.run(progress=progress, label="MMLU: ")
        hidden = lp.normed()
        picks: list[int] = []
        with stack.head() as (_, logits):
            for b, h in zip(lp.batches, hidden, strict=True):
                last = b.mask.sum(1) - 1  # (B,) the last real token of each prompt
                rows = torch.arange(h.shape[0], device=h.device)
                lg = logits(h[rows, last])  # (B, V)
                picks += lg[:, letter_ids.to(lg.device)].float().argmax(-1).tolist()
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
