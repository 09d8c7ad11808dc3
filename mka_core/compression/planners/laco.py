"""LaCo (Yang et al. 2024, "LaCo: Large Language Model Pruning via Layer Collapse"): collapse the
following layers into one, top down, while the final hidden states stay close to the original's."""

from __future__ import annotations

import logging

import torch

from mka_core.compression.plan import Step, compose
from mka_core.compression.planners.registry import Planner, register
from mka_core.compression.planners.search import (
    continue_from,
    every_block_input,
    final_hidden,
    model_view,
    real_tokens,
)
from mka_core.compression.planners.settings import PlanJob, Planned
from mka_core.errors import MkaInputError, report

log = logging.getLogger(__name__)


def plan_laco(job: PlanJob) -> Planned:
    """Layer Collapse, top down: try collapsing the m following layers into layer l
    (θ_l + Σ(θ_{l+k} − θ_l), original weights), keep it when the cosine of the final hidden
    states to the original model's stays ≥ threshold, then continue below the collapsed range.
    LaCo itself may stop short of a budget; to compare at equal budgets, a full pass that accepts
    nothing takes its best candidate anyway (counted as `forced` in the plan)."""
    s = job.settings
    params = {"laco_layers": s.laco_layers, "laco_threshold": s.laco_threshold}
    n_remove, threshold = job.n_remove, s.laco_threshold
    if n_remove == 0:
        params.update(laco_forced=0, laco_candidates=0)
        return Planned([], "final-hidden-cosine", None, params)
    ref = final_hidden(job.loaded.model, job.small)
    steps: list[Step] = []
    removed = tries = forced = 0
    while removed < n_remove:
        steps, accepted, best, tried = _pass(job, steps, removed, ref)
        tries += tried
        removed = sum(len(st.layers) - 1 for st in steps)
        if removed < n_remove and not accepted:
            if best is None:
                raise MkaInputError(f"laco: no unprotected range left to reach {n_remove} layers")
            cos, rng = best
            log.info(
                "laco: no candidate reached %.2f; taking layers %s (cos %.3f)", threshold, rng, cos
            )
            steps.append(Step.collapse(rng, score=cos))
            removed += len(rng) - 1
            forced += 1
    log.info("laco: %d candidates tried, %d collapses below the threshold", tries, forced)
    params.update(laco_forced=forced, laco_candidates=tries)
    return Planned(steps, "final-hidden-cosine", None, params)


def _pass(job: PlanJob, steps: list[Step], removed: int, ref: torch.Tensor):
    """One top-down pass: (steps, whether one was accepted, the best candidate, candidates)."""
    n, n_remove = job.loaded.n_layers, job.n_remove
    m_layers, threshold = job.settings.laco_layers, job.settings.laco_threshold
    # Candidates only change layers from their start upwards, and within a pass every accepted
    # collapse lies above the next start: the layers below are computed once.
    base = compose(n, steps)
    lp, inputs = every_block_input(model_view(job.loaded.model, base), job.small)
    pos_of = {i: p for p, g in enumerate(base) for i, _ in g}
    used = {i for st in steps for i in st.layers}
    best = None
    accepted = False
    tries = 0
    start = n - 2
    while start >= 0 and removed < n_remove:
        m = min(m_layers, n_remove - removed)
        rng = list(range(start, start + m + 1))
        if rng[-1] >= n or job.protected.intersection(rng) or used.intersection(rng):
            start -= 1
            continue
        pos = pos_of[start]
        view = model_view(job.loaded.model, compose(n, steps + [Step.collapse(rng)]))
        h = real_tokens(continue_from(lp, view, pos, inputs[pos]))
        cos = float(torch.nn.functional.cosine_similarity(h, ref, dim=-1).mean())
        tries += 1
        if best is None or cos > best[0]:
            best = (cos, rng)
        report(job.progress, removed / n_remove, f"laco: layers {rng[0]}-{rng[-1]} cos {cos:.3f}")
        if cos >= threshold:
            steps = steps + [Step.collapse(rng, score=cos)]
            used.update(rng)
            removed += m
            accepted = True
            start = rng[0] - 1  # continue below the collapsed range
        else:
            start -= 1
    return steps, accepted, best, tries


register(
    Planner(
        name="laco",
        help="LaCo: collapse following layers into one while the final states stay close",
        source="Yang et al. 2024, LaCo: Large Language Model Pruning via Layer Collapse",
        does=("collapse",),
        run=plan_laco,
        needs_batch=True,
    )
)
