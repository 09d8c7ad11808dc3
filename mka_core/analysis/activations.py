"""Capturing every layer's activations in one pass over the data.

The engine runs block by block over all samples (`engine.LayerPass`); each block's output is pooled
as soon as it is produced, so memory stays O(n_layers · n_rows · d_model) plus one set of hidden
states: the full (batch, seq, d_model) tensors are never kept for all layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from mka_core.data.corpus import CalibrationBatch
from mka_core.engine.layerpass import LayerPass, as_stack
from mka_core.errors import MkaInputError, ProgressFn, report

log = logging.getLogger(__name__)

POOLINGS = ("mean", "last", "tokens")


@dataclass
class Activations:
    """Pooled hidden states of every layer boundary, rows paired across layers.

    states[0] is the input of block 0 (the embeddings as the blocks see them); states[l + 1] is the
    output of block l. So block l maps states[l] to states[l + 1].
    """

    states: np.ndarray  # (n_layers + 1, n_rows, d_model) float32
    sample_ids: np.ndarray  # (n_rows,) which calibration sample each row came from
    labels: list[str]  # (n_rows,) the document label of each row
    pooling: str
    meta: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.states.shape[0] - 1

    @property
    def n_rows(self) -> int:
        return self.states.shape[1]

    @property
    def outputs(self) -> np.ndarray:
        """(n_layers, n_rows, d_model): A[l] of the spec, the output of block l."""
        return self.states[1:]

    @property
    def inputs(self) -> np.ndarray:
        """(n_layers, n_rows, d_model): the input of block l."""
        return self.states[:-1]


def _token_positions(lengths: list[int], k: int, seed: int) -> list[np.ndarray]:
    """k random real-token positions per sample, drawn once so every layer uses the same ones."""
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(n, size=min(k, n), replace=False)) for n in lengths]


def _check_capture_args(pooling: str, batch_size: int, tokens_per_sample: int) -> None:
    if pooling not in POOLINGS:
        raise MkaInputError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
    if batch_size < 1:
        raise MkaInputError(f"batch size must be >= 1, got {batch_size}")
    if pooling == "tokens" and tokens_per_sample < 1:
        raise MkaInputError(f"tokens per sample must be >= 1, got {tokens_per_sample}")


def _batch_pickers(
    lp: LayerPass, positions: list[np.ndarray] | None, starts: np.ndarray, batch_size: int, device
) -> list[tuple[int, int, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]]:
    """Per engine batch: the rows of `states` it fills (r0, r1), its attention mask, and for
    ``tokens`` pooling the (sample in batch, position) index of every row."""
    pickers = []
    for bi, b in enumerate(lp.batches):
        b0 = bi * batch_size
        b1 = b0 + b.ids.shape[0]
        mask = b.mask if b.mask is not None else torch.ones_like(b.ids)
        if positions is not None:
            r = np.concatenate([np.full(len(positions[i]), i - b0) for i in range(b0, b1)])
            t = np.concatenate([positions[i] for i in range(b0, b1)])
            idx = (torch.as_tensor(r, device=device), torch.as_tensor(t, device=device))
        else:
            idx = None
        pickers.append((int(starts[b0]), int(starts[b1]), mask, idx))
    return pickers


def _pool(h: torch.Tensor, mask: torch.Tensor, idx, pooling: str, first: int) -> np.ndarray:
    """Pool one batch of hidden states into rows; `first` leading positions are left out of
    ``mean`` (``tokens`` positions are already past them)."""
    h = h.float()  # (B, T, H)
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(h.dtype).clone()
        m[:, :first] = 0
        out = (h * m).sum(1) / m.sum(1).clamp_min(1)  # (B, H)
    elif pooling == "last":
        last = mask.sum(1) - 1  # right padding: last real token
        out = h[torch.arange(h.shape[0], device=h.device), last]  # (B, H)
    else:
        out = h[idx[0], idx[1]]  # (sum k_i, H)
    return out.cpu().numpy()


def capture_activations(
    model,
    batch: CalibrationBatch,
    pooling: str = "mean",
    batch_size: int = 16,
    tokens_per_sample: int = 8,
    seed: int = 0,
    skip_first: bool = True,
    progress: ProgressFn | None = None,
) -> Activations:
    """Run the calibration batch through `model` once, block by block, and pool every boundary.

    model: a causal LM in memory, or a streamed `engine.Stack` (each block is read once).
    pooling: ``mean`` over real tokens, ``last`` real token, or ``tokens`` (``tokens_per_sample``
    random positions per sample, the same for every layer).
    skip_first: leave position 0 out of ``mean`` and ``tokens`` pooling. Models put "massive
    activations" (an attention sink, norms 10-100x the rest) on the first token; left in, that one
    position dominates every pooled statistic and makes most layers look identical.
    """
    _check_capture_args(pooling, batch_size, tokens_per_sample)
    stack = as_stack(model)
    n_layers = stack.n_layers
    lengths = batch.attention_mask.sum(dim=1).tolist()
    first = 1 if skip_first and min(lengths) > 1 else 0
    positions = None
    if pooling == "tokens":
        positions = [
            p + first
            for p in _token_positions([n - first for n in lengths], tokens_per_sample, seed)
        ]

    n = batch.n_samples
    rows_of = [len(positions[i]) if positions else 1 for i in range(n)]
    n_rows = sum(rows_of)
    starts = np.concatenate([[0], np.cumsum(rows_of)])
    d_model = int(stack.config.hidden_size)
    states = np.zeros((n_layers + 1, n_rows, d_model), dtype=np.float32)  # (L+1, rows, H)

    report(progress, 0.0, f"embedding {n} samples")
    lp = LayerPass.start(stack, batch.input_ids, batch.attention_mask, batch_size=batch_size)
    pickers = _batch_pickers(lp, positions, starts, batch_size, stack.device)

    def store(slot: int, hidden: list[torch.Tensor]) -> None:
        for (r0, r1, mask, idx), h in zip(pickers, hidden, strict=True):
            states[slot, r0:r1] = _pool(h, mask, idx, pooling, first)

    store(0, lp.hidden)
    lp.run(
        after_block=lambda j, hidden: store(j + 1, hidden),
        progress=progress,
        label="capture: ",
    )

    sample_ids = np.repeat(np.arange(n), rows_of)
    labels = [batch.labels[i] for i in sample_ids]
    meta = {
        "n_samples": n,
        "max_tokens": int(batch.input_ids.shape[1]),
        "n_tokens": batch.n_tokens,
        "pooling": pooling,
        "tokens_per_sample": tokens_per_sample if pooling == "tokens" else None,
        "seed": seed,
        "skip_first": bool(first),
    }
    if not np.isfinite(states).all():
        log.warning("non-finite activations captured; the model may overflow in this dtype")
    return Activations(states, sample_ids, labels, pooling, meta)
