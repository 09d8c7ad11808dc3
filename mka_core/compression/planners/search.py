"""Views of a model under a composition and the forward passes that score them: what every
planner that measures (α search, LaCo, SLEB, mka-loss) and measured importance share.

Planners only read the model (never change it): candidates are scored on views (`engine.Stack`
compositions) that share every unchanged block with the original model and build merged blocks
only when the engine reaches them, so they work on streamed models too.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from mka_core.analysis.activations import capture_activations
from mka_core.analysis.manifold import diffusion_maps
from mka_core.analysis.similarity import SimilarityResult, cluster_codes, npib_from_codes
from mka_core.compression.plan import Step, compose
from mka_core.data.corpus import CalibrationBatch
from mka_core.engine.layerpass import LayerPass, Stack, as_stack, causal_lm_loss
from mka_core.errors import report

log = logging.getLogger(__name__)


SEARCH_SAMPLES = 16  # calibration samples used to score α candidates and LaCo merges


def model_view(model, composition: list[list[tuple[int, float]]]) -> Stack:
    """`model` (in memory or streamed) under `composition`, for scoring: unchanged blocks are the
    model's own, merged ones are computed when the engine reaches them; `model` is not modified."""
    return as_stack(model).compose(composition)


def _subset(batch: CalibrationBatch, n: int) -> CalibrationBatch:
    return batch.subset(n)


def start_pass(model, batch: CalibrationBatch) -> LayerPass:
    return LayerPass.start(as_stack(model), batch.input_ids, batch.attention_mask)


def calibration_loss(model, batch: CalibrationBatch) -> float:
    """Mean next-token cross-entropy on the calibration samples (padding ignored)."""
    return causal_lm_loss(start_pass(model, batch))


def real_tokens(lp: LayerPass) -> torch.Tensor:
    """Final (normed) hidden states of the real tokens of a pass: (n_tokens, d_model) float32."""
    out = []
    for b, h in zip(lp.batches, lp.normed(), strict=True):
        out.append((h[b.mask.bool()] if b.mask is not None else h.reshape(-1, h.shape[-1])).float())
    return torch.cat(out)


def final_hidden(model, batch: CalibrationBatch) -> torch.Tensor:
    """Final (normed) hidden states of the real tokens: (n_tokens, d_model)."""
    return real_tokens(start_pass(model, batch))


def every_block_input(model, batch: CalibrationBatch) -> tuple[LayerPass, list[list]]:
    """One pass that keeps the input of every output layer (per batch): candidates that change
    layers from `pos` upwards continue from input `pos` and run only the rest."""
    lp = start_pass(model, batch)
    inputs = [list(lp.hidden)]
    lp.run(after_block=lambda j, hidden: inputs.append(list(hidden)))
    return lp, inputs


def continue_from(lp: LayerPass, view: Stack, pos: int, hidden: list) -> LayerPass:
    """A pass of `view` that starts at output layer `pos` with the given inputs."""
    return LayerPass(view, lp.batches, list(hidden), lp.calls, pos)


@dataclass
class _State:
    n_layers: int
    steps: list[Step]

    @property
    def groups(self) -> list[list[int]]:
        return [[i for i, _ in g] for g in compose(self.n_layers, self.steps)]

    @property
    def composition(self):
        return compose(self.n_layers, self.steps)


def _allowed(group: list[int], protected: set[int]) -> bool:
    return not protected.intersection(group)


def _alpha(
    rule: str,
    s: np.ndarray,
    a: list[int],
    b: list[int],
    fixed: float,
    search=None,
) -> float:
    """Weight of group a (1 − α goes to b). Groups are represented by their last layer."""
    la, lb = a[-1], b[-1]
    if rule == "similarity":
        return float(s[la, lb])
    if rule == "rowmean":
        ra, rb = s[la].mean(), s[lb].mean()
        return float(1.0 / (1.0 + math.exp(-(ra / (ra + rb)))))
    if rule == "fixed":
        return float(fixed)
    return float(search(a, b))


def _golden_search(f, lo: float = 0.0, hi: float = 1.0, tol: float = 0.05) -> tuple[float, float]:
    """Minimise f on [lo, hi] by golden-section, also trying both ends (α = 1 is dropping b, so
    the result is never worse than dropping on the data f measures). Returns (x, f(x))."""
    inv = (math.sqrt(5) - 1) / 2
    c, d = hi - inv * (hi - lo), lo + inv * (hi - lo)
    fc, fd = f(c), f(d)
    while hi - lo > tol:
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - inv * (hi - lo)
            fc = f(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + inv * (hi - lo)
            fd = f(d)
    best = min([(c, fc), (d, fd), (1.0, f(1.0)), (0.0, f(0.0))], key=lambda p: p[1])
    return best


def _merge_search(loaded, state: _State, small):
    """The α that minimises calibration loss for merging groups a and b given the steps so far.

    Every candidate shares the layers below the merge, so their output is computed once and only
    the layers from the merged one upwards run per candidate."""

    def search(a: list[int], b: list[int]) -> float:
        n = state.n_layers
        pos = next(i for i, g in enumerate(state.groups) if a[0] in g)
        prefix = start_pass(model_view(loaded.model, state.composition), small).run(stop=pos)

        def loss(x: float) -> float:
            steps = state.steps + [Step.merge([a[0], b[0]], [x, 1.0 - x])]
            view = model_view(loaded.model, compose(n, steps))
            return causal_lm_loss(prefix.fork(view))

        x, fx = _golden_search(loss)
        log.info("alpha search for %s+%s: alpha=%.3f loss=%.4f", a, b, x, fx)
        return x

    return search


def _npib_of(model, batch: CalibrationBatch, sim: SimilarityResult) -> np.ndarray:
    """NPIB recomputed on a (merged) model with the original analysis' settings."""
    p = sim.params
    acts = capture_activations(
        model, batch, pooling=p.get("pooling", "mean"), seed=p.get("seed", 0)
    )
    maps = diffusion_maps(
        acts.outputs, d=p.get("d", 4), t=p.get("t", 1.0), alpha=p.get("alpha", 0.5)
    )
    return npib_from_codes(cluster_codes([m.embedding for m in maps], k=p.get("k_requested", 8)))


def _expand(s_cur: np.ndarray, groups: list[list[int]], n: int) -> np.ndarray:
    """A recomputed group×group matrix indexed by original layers (each group by its members)."""
    out = np.zeros((n, n))
    for gi, a in enumerate(groups):
        for gj, b in enumerate(groups):
            out[np.ix_(a, b)] = s_cur[gi, gj]
    return out


def candidates_loss(model, composition, batch, changes, progress=None, label=""):
    """Calibration loss of each changed composition. changes: [(position, new composition)],
    each differing from `composition` only from output position `position` upwards."""
    lp, inputs = every_block_input(model_view(model, composition), batch)
    base = causal_lm_loss(lp)
    losses = []
    for i, (pos, comp) in enumerate(changes):
        losses.append(causal_lm_loss(continue_from(lp, model_view(model, comp), pos, inputs[pos])))
        report(progress, (i + 1) / len(changes), f"{label}{i + 1}/{len(changes)}")
    return base, losses


def sub_progress(progress, lo, hi):
    if progress is None:
        return None
    return lambda f, msg: progress(lo + (hi - lo) * f, msg)
