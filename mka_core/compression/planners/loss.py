"""Planners that choose by the measured calibration loss: SLEB (Song et al. 2024, "SLEB:
Streamlining LLMs through Redundancy Verification and Elimination of Transformer Blocks"), which
drops blocks, and mka-loss, MKA's merges chosen by the loss they cost (BENCHMARKS.md, "Planners").

mka-loss scores the merges it will build: averaged merges at their best α by default; with the
merge mode ``flatten``, each candidate pair flattened (FlattenGPT) on the scoring samples, and,
with the ``linear`` compensation too, given its least-squares map (ReplaceMe) towards the
original's hidden state, as `rebuild.refine` will build it."""

from __future__ import annotations

import dataclasses

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
from mka_core.compression.rebuild import check_refinement, flatten_block, linear_at, with_blocks
from mka_core.engine.layerpass import as_stack, causal_lm_loss
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


def _mergeable(groups: list[list[int]], protected: set[int], done: int) -> list[int]:
    """The output positions p whose group and the next one are both unprotected (refused in one
    line when there are none, after `done` merges)."""
    pairs = [
        p
        for p in range(len(groups) - 1)
        if not protected.intersection(groups[p]) and not protected.intersection(groups[p + 1])
    ]
    if not pairs:
        raise MkaInputError(f"mka-loss: no mergeable adjacent pair left after {done} merges")
    return pairs


def plan_mka_loss(loaded, small, n_remove: int, protected: set[int], progress=None) -> list[Step]:
    """MKA by measured merge loss: n_remove times, merge the adjacent pair whose merge (at
    α = 0.5, a first look) raises the calibration loss least, then give that merge the α that
    minimises the loss (golden-section with both ends checked: never worse, on this data, than
    dropping either layer of the pair)."""
    state = _State(loaded.n_layers, [])
    n = state.n_layers
    for r in range(n_remove):
        groups = state.groups
        pairs = _mergeable(groups, protected, r)

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


def plan_mka_flat(
    loaded, fit, held, n_remove: int, protected: set[int], compensation="none", progress=None
) -> list[Step]:
    """mka-loss for flattened merges: n_remove times, flatten every adjacent pair of the model as
    it stands (its earlier merges flattened, and compensated when asked) on the samples `fit`,
    and merge the pair whose flattened merge raises the loss on the samples `held` least. With
    compensation ``linear`` each candidate is also given its least-squares map towards the
    original's hidden state after its last layer (``scale`` is applied at build time only).

    Scored on other samples than it is fitted on: a d×d map fitted on a few thousand tokens
    lowers their own loss below the original's, and a search that believes it picks badly (on
    the bundled model, 3 layers, built with the linear map on the whole batch: perplexity 19.2
    when fitted and scored on the same 16 samples, 16.4 when scored on 16 others)."""
    base = as_stack(loaded.model)
    n = base.n_layers
    free = [i for i in range(n) if i not in protected]
    if len(free) > 1:  # refuse before any search what the layout cannot take
        whole = [[(i, 1.0)] for i in range(free[0])] + [[(i, 1.0 / len(free)) for i in free]]
        whole += [[(i, 1.0)] for i in range(free[-1] + 1, n)]
        check_refinement(base, whole, "flatten", compensation)
    teacher = every_block_input(base, fit)[1] if compensation == "linear" else None
    built: dict[tuple, object] = {}  # the chosen merges' blocks, by their layers
    steps: list[Step] = []
    for r in range(n_remove):
        comp = compose(n, steps)
        groups = [[i for i, _ in g] for g in comp]
        pairs = _mergeable(groups, protected, r)
        now = _flat_view(base, comp, built)
        fitting, fit_in = every_block_input(now, fit)
        scoring, held_in = every_block_input(now, held)
        base_loss = causal_lm_loss(scoring)
        best = None
        for i, p in enumerate(pairs):
            step = Step.merge([groups[p][0], groups[p + 1][0]], [0.5, 0.5])
            cand = compose(n, steps + [step])
            view = _flat_view(base, cand, built)
            run = continue_from(fitting, view, p, fit_in[p])
            blocks = list(view.recipe.blocks)
            blocks[p] = (flatten_block(run, p, cand[p]),)
            if teacher is not None:
                run.stack = with_blocks(view, blocks)
                last = max(s for s, _ in cand[p])
                blocks[p] = (blocks[p][0].corrected(mlp_map=linear_at(teacher[last + 1], run, p)),)
            run = continue_from(scoring, with_blocks(view, blocks), p, held_in[p])
            loss = causal_lm_loss(run)
            if best is None or loss < best[0]:
                best = (loss, step, tuple(groups[p] + groups[p + 1]), blocks[p][0])
            report(
                progress,
                (r + (i + 1) / len(pairs)) / n_remove,
                f"mka-loss {r + 1}/{n_remove}: flattened pair {i + 1}/{len(pairs)}",
            )
        loss, step, layers, term = best
        built[layers] = term
        steps.append(dataclasses.replace(step, score=float(loss - base_loss)))
        report(
            progress,
            (r + 1) / n_remove,
            f"mka-loss: merged layers {list(layers)} flattened (loss +{loss - base_loss:.3f})",
        )
    return steps


def _flat_view(base, composition, built: dict):
    """`base` under `composition`, its merged groups replaced by their flattened blocks."""
    view = base.compose(composition)
    blocks = list(view.recipe.blocks)
    for p, g in enumerate(composition):
        key = tuple(s for s, _ in g)
        if key in built:
            blocks[p] = (built[key],)
    return with_blocks(view, blocks)


def _run_sleb(job: PlanJob) -> Planned:
    steps = plan_sleb(job.loaded, job.small, job.n_remove, job.protected, job.progress)
    return Planned(steps, "calibration-loss", None, {"loss_samples": job.small.n_samples})


def _run_mka_loss(job: PlanJob) -> Planned:
    params = {"loss_samples": job.small.n_samples}
    s = job.settings
    if s.merge_mode == "flatten":
        comp = s.compensation if s.compensation == "linear" else "none"
        held = job.batch.subset(job.small.n_samples, between=True)
        steps = plan_mka_flat(
            job.loaded, job.small, held, job.n_remove, job.protected, comp, job.progress
        )
        scored = _scored(s.merge_mode, s.compensation)
        return Planned(steps, "calibration-loss", None, {**params, "scored": scored})
    steps = plan_mka_loss(job.loaded, job.small, job.n_remove, job.protected, job.progress)
    return Planned(steps, "calibration-loss", "search", params)


def _scored(merge_mode: str, compensation: str) -> str:
    """What mka-loss's search scores when its plan is built so (method.params.scored)."""
    if merge_mode != "flatten":
        return "average"
    return "flatten+linear" if compensation == "linear" else "flatten"


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
        help="MKA by measured loss: merge the pair whose merge raises the loss least (α searched; "
        "flattened merges scored as built with --merge-mode flatten)",
        source="this project: MKA's merges chosen by measured loss (BENCHMARKS.md)",
        does=("merge",),
        run=_run_mka_loss,
        needs_batch=True,
        greedy_prefix=True,
        scored=_scored,
    )
)
