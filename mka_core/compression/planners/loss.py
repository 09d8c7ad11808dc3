"""Planners that choose by the measured calibration loss: SLEB (Song et al. 2024, "SLEB:
Streamlining LLMs through Redundancy Verification and Elimination of Transformer Blocks"), which
drops blocks, and mka-loss, MKA's merges chosen by the loss they cost (BENCHMARKS.md, "Planners")."""

from __future__ import annotations

import numpy as np

from mka_core.compression.plan import Step, compose
from mka_core.compression.planners.registry import Planner, register
from mka_core.compression.planners.search import (
    _golden_search,
    _State,
    candidates_loss,
    continue_from,
    every_block_input,
    model_view,
    sub_progress,
)
from mka_core.compression.planners.settings import PlanJob, Planned
from mka_core.engine.layerpass import causal_lm_loss
from mka_core.errors import MkaInputError, report


def plan_sleb(loaded, small, n_remove: int, protected: set[int], progress=None) -> list[Step]:
    """SLEB: n_remove times, drop the block whose removal raises the calibration loss least,
    measured on the model as it is after the removals so far."""
    state = _State(loaded.n_layers, [])
    for r in range(n_remove):
        groups = state.groups
        cand = [p for p, g in enumerate(groups) if not protected.intersection(g)]
        if not cand:
            raise MkaInputError(f"sleb: no unprotected layer left after {r} removals")
        changes = [(p, compose(state.n_layers, state.steps + [Step.drop(groups[p])])) for p in cand]
        base, losses = candidates_loss(
            loaded.model,
            state.composition,
            small,
            changes,
            sub_progress(progress, r / n_remove, (r + 1) / n_remove),
            f"sleb {r + 1}/{n_remove}: candidate ",
        )
        best = int(np.argmin(losses))
        p = cand[best]
        state.steps.append(Step.drop(groups[p], score=float(losses[best] - base)))
        report(
            progress,
            (r + 1) / n_remove,
            f"sleb: dropped layer {groups[p]} (loss +{losses[best] - base:.3f})",
        )
    return state.steps


def plan_mka_loss(loaded, small, n_remove: int, protected: set[int], progress=None) -> list[Step]:
    """MKA by measured merge loss: n_remove times, merge the adjacent pair whose merge (at
    α = 0.5, a first look) raises the calibration loss least, then give that merge the α that
    minimises the loss (golden-section with both ends checked: never worse, on this data, than
    dropping either layer of the pair)."""
    state = _State(loaded.n_layers, [])
    n = state.n_layers
    for r in range(n_remove):
        groups = state.groups
        pairs = [
            p
            for p in range(len(groups) - 1)
            if not protected.intersection(groups[p]) and not protected.intersection(groups[p + 1])
        ]
        if not pairs:
            raise MkaInputError(f"mka-loss: no mergeable adjacent pair left after {r} merges")

        def merged(p: int, x: float, groups=groups):
            pair = [groups[p][0], groups[p + 1][0]]
            return compose(n, state.steps + [Step.merge(pair, [x, 1 - x])])

        lp, inputs = every_block_input(model_view(loaded.model, state.composition), small)
        base = causal_lm_loss(lp)
        half = []
        for i, p in enumerate(pairs):
            view = model_view(loaded.model, merged(p, 0.5))
            half.append(causal_lm_loss(continue_from(lp, view, p, inputs[p])))
            report(
                progress,
                (r + i / len(pairs)) / n_remove,
                f"mka-loss {r + 1}/{n_remove}: pair {i + 1}/{len(pairs)}",
            )
        p = pairs[int(np.argmin(half))]

        def loss(x: float, p=p, lp=lp, inputs=inputs) -> float:
            view = model_view(loaded.model, merged(p, x))
            return causal_lm_loss(continue_from(lp, view, p, inputs[p]))

        x, fx = _golden_search(loss)
        a, b = groups[p], groups[p + 1]
        state.steps.append(Step.merge([a[0], b[0]], [x, 1.0 - x], score=float(fx - base)))
        report(
            progress,
            (r + 1) / n_remove,
            f"mka-loss: merged layers {a}+{b} (α {x:.2f}, loss +{fx - base:.3f})",
        )
    return state.steps


def _run_sleb(job: PlanJob) -> Planned:
    steps = plan_sleb(job.loaded, job.small, job.n_remove, job.protected, job.progress)
    return Planned(steps, "calibration-loss", None, {"loss_samples": job.small.n_samples})


def _run_mka_loss(job: PlanJob) -> Planned:
    steps = plan_mka_loss(job.loaded, job.small, job.n_remove, job.protected, job.progress)
    return Planned(steps, "calibration-loss", "search", {"loss_samples": job.small.n_samples})


register(
    Planner(
        name="sleb",
        help="SLEB: drop, one at a time, the layer whose removal raises calibration loss least",
        source="Song et al. 2024, SLEB",
        does=("drop",),
        run=_run_sleb,
        needs_batch=True,
        greedy_prefix=True,
    )
)
register(
    Planner(
        name="mka-loss",
        help="MKA by measured loss: merge the pair whose merge raises the loss least, α searched",
        source="this project: MKA's merges chosen by measured loss (BENCHMARKS.md)",
        does=("merge",),
        run=_run_mka_loss,
        needs_batch=True,
        greedy_prefix=True,
    )
)
