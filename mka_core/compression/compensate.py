"""Compensation of a removal, training-free and fused into the weights, so the result is a plain
checkpoint of the same family.

When a run of blocks is removed (or two blocks are merged into one), the block just below the cut
now has to stand for everything down to the next kept block. Two fusable corrections are
estimated on calibration text, in one sequential pass that runs the original model (the
*teacher*) and the compressed one (the *student*) side by side, block by block, so it streams
like every other stage:

- ``linear`` (ReplaceMe, Shopkhoev et al. 2025, arXiv 2505.02819): the MLP output ``M`` of the
  block below the cut is mapped by a d×d matrix ``T`` chosen by least squares so that
  ``Y + M·T`` (``Y``: that block's output without its MLP) matches the teacher's hidden state
  after the removed run. The statistics ``MᵀM`` and ``Mᵀ(L − Y)`` are accumulated in float64 over
  the real (unpadded) tokens past the first position (LMs put "massive activations", norms 10–100×
the rest, on position 0; counted, that one position sets the map, and a 10-layer run of the
bundled model compensated with it reached perplexity 1186 instead of 55); a ridge term pulls ``T`` towards the identity (the plain removal),
  ``T = (MᵀM + λI)⁻¹ (Mᵀ(L − Y) + λI)``, ``λ = RIDGE · tr(MᵀM)/d``. ``T`` is fused into the MLP's
  down projection, ``W ← Tᵀ W`` (for experts, into every expert: their outputs are summed).
- ``scale`` (Prune&Comp, AAAI 2026): removing blocks shrinks the residual stream, and the blocks
  after the cut read a stream smaller than they were trained on. The shrink is measured as the
  ratio ``s`` of the teacher's and the student's mean hidden-state norms at the cut. The paper
  multiplies everything written to the stream before the cut by ``s``; since every block reads the
  stream through a scale-invariant RMSNorm, and so does the LM head, dividing everything written
  *after* the cut by ``s`` gives the same model up to one global factor the final norm removes.
  That form never touches the embeddings, so a tied LM head is safe.

The student runs the corrected block before going on, so each cut is corrected for the error
of the cuts above it. Cost: one pass of the teacher and one of the student over the calibration
set, plus one d×d solve per cut. Layouts that normalise the block outputs before adding them to the
stream (OLMo-2, Gemma-2/3) are refused: a scale or map on the writing projection is undone by that
norm.
"""

from __future__ import annotations

import torch

from mka_core.errors import MkaInputError

RIDGE = 1e-3  # λ relative to the mean diagonal of MᵀM: towards the plain removal


def spans(composition, n_base: int) -> tuple[int, list[int]]:
    """The first base layer the first output block reads, and for each output block the last
    base layer its output stands for (the layer before the next block's first source)."""
    firsts = [min(s for s, _ in g) for g in composition]
    lasts = [max(s for s, _ in g) for g in composition]
    for p in range(len(composition) - 1):
        if lasts[p] >= firsts[p + 1]:
            raise MkaInputError(
                f"output layer {p} reads base layer {lasts[p]}, after output layer {p + 1}'s "
                f"first source {firsts[p + 1]}: compensation needs layers kept in order"
            )
    ends = [firsts[p + 1] - 1 for p in range(len(composition) - 1)] + [n_base - 1]
    return firsts[0], ends


def is_cut(group, end: int) -> bool:
    """Whether an output block stands for more than its one source (a merge, or removed blocks
    after it)."""
    return not (len(group) == 1 and group[0][0] == end)


class CutStats:
    """float64 statistics of one cut over the calibration tokens that count."""

    def __init__(self, d: int, device):
        self.mm = torch.zeros(d, d, dtype=torch.float64, device=device)  # MᵀM
        self.mt = torch.zeros(d, d, dtype=torch.float64, device=device)  # Mᵀ(L − Y)

    @torch.no_grad()
    def add(self, m, y, target, real) -> None:
        """m: MLP output, y: block output without it, target: the teacher's hidden state; all
        (B, T, d); real (B, T): 1 on the tokens that count (no padding, no first position)."""
        d = m.shape[-1]
        keep = real.reshape(-1).bool()
        m, y, target = (x.reshape(-1, d)[keep].double() for x in (m, y, target))
        self.mm += m.T @ m
        self.mt += m.T @ (target - y)

    def linear_map(self) -> torch.Tensor:
        """T = (MᵀM + λI)⁻¹ (Mᵀ(L − Y) + λI), float32."""
        d = self.mm.shape[0]
        eye = torch.eye(d, dtype=torch.float64, device=self.mm.device)
        lam = RIDGE * float(self.mm.diagonal().mean()) + 1e-12
        t = torch.linalg.solve(self.mm + lam * eye, self.mt + lam * eye)
        return t.float()
