"""Planners: from similarity (and, for some, a few forward passes) to a Plan.

| planner   | picks                                                | does              |
|-----------|------------------------------------------------------|-------------------|
| mka       | adjacent pair of groups with the highest NPIB       | merge (α rule)    |
| mka-tail  | always the last two (unprotected) layers             | merge (α rule)    |
| shortgpt  | lowest Block Influence                               | drop              |
| angular   | n consecutive layers with the smallest angular dist. | drop              |
| laco      | top-down RDSC collapse kept while cos(final h) ≥ T   | collapse          |
| manual    | the user's picks                                     | merge / drop      |

Planners only read the model (never change it): the `search` α rule and LaCo score candidates on
views (`engine.Stack` compositions) that share every unchanged block with the original model and
build merged blocks only when the engine reaches them, so they work on streamed models too.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch

from mka_core.analysis.similarity import SimilarityResult
from mka_core.compression.plan import (
    Plan,
    Step,
    compose,
    layers_to_remove,
    make_plan,
    protected_layers,
)
from mka_core.compression.planners.loss import plan_mka_loss, plan_sleb
from mka_core.compression.planners.search import (
    SEARCH_SAMPLES,
    _allowed,
    _alpha,
    _expand,
    _merge_search,
    _npib_of,
    _State,
    _subset,
    continue_from,
    every_block_input,
    final_hidden,
    model_view,
    real_tokens,
)
from mka_core.data.corpus import CalibrationBatch
from mka_core.errors import MkaInputError, ProgressFn, report
from mka_core.models.loading import LoadedModel

log = logging.getLogger(__name__)

PLANNERS = ("mka", "mka-tail", "shortgpt", "angular", "laco", "sleb", "mka-loss")
PLANNER_HELP = {
    "mka": "MKA (the paper): merge the adjacent pair with the highest NPIB, α by the chosen rule",
    "mka-tail": "the released MKA code's rule: always merge the last two unprotected layers",
    "shortgpt": "ShortGPT: drop the layers with the lowest Block Influence",
    "angular": "Gromov et al.: drop the run of layers whose input and output differ least",
    "laco": "LaCo: collapse following layers into one while the final states stay close",
    "sleb": "SLEB: drop, one at a time, the layer whose removal raises calibration loss least",
    "mka-loss": "MKA by measured loss: merge the pair whose merge raises the loss least, α searched",
}
NPIB_KINDS = ("single", "bootstrap")
ALPHA_RULES = ("similarity", "rowmean", "fixed", "search")


# ---------------------------------------------------------------------------------------------
# views of a model under a composition, and the forward passes that score them


# ---------------------------------------------------------------------------------------------
# groups (the current output layers as lists of original indices)


# ---------------------------------------------------------------------------------------------
# the planners


def _check_common(loaded: LoadedModel, sim: SimilarityResult, alpha_rule: str, alpha: float):
    n = loaded.n_layers
    if sim.n_layers != n:
        raise MkaInputError(
            f"the similarity result covers {sim.n_layers} layers but the model has {n}: "
            f"capture activations on this model first"
        )
    if alpha_rule not in ALPHA_RULES:
        raise MkaInputError(
            f"unknown alpha rule {alpha_rule!r}; expected one of {', '.join(ALPHA_RULES)}"
        )
    if alpha_rule == "fixed" and not (isinstance(alpha, int | float) and 0.0 <= alpha <= 1.0):
        raise MkaInputError(f"fixed alpha must be a number in [0, 1], got {alpha!r}")


def plan_layers(
    loaded: LoadedModel,
    sim: SimilarityResult,
    batch: CalibrationBatch | None,
    planner: str = "mka",
    n_remove: int = 1,
    alpha_rule: str = "similarity",
    alpha: float = 0.5,
    protect_first: bool = True,
    protect_last: bool = True,
    recompute: bool = False,
    laco_layers: int = 4,
    laco_threshold: float = 0.65,
    progress: ProgressFn | None = None,
    npib: str = "single",
    stability=None,
    loss_samples: int = SEARCH_SAMPLES,
) -> Plan:
    """Plan the removal of `n_remove` layers with one of PLANNERS (see the module docstring).

    npib: for mka, "single" (the analysis' NPIB, as the paper) or "bootstrap" (NPIB averaged
    over the bootstrap replicates of `stability`, steadier). loss_samples: calibration samples
    the loss-guided planners (sleb, mka-loss, laco, α search) score with."""
    if planner not in PLANNERS:
        raise MkaInputError(f"unknown planner {planner!r}; expected one of {', '.join(PLANNERS)}")
    if npib not in NPIB_KINDS:
        raise MkaInputError(f"unknown NPIB kind {npib!r}; expected one of {', '.join(NPIB_KINDS)}")
    if npib == "bootstrap":
        if stability is None:
            raise MkaInputError("npib=bootstrap needs the analysis' stability (bootstrap) result")
        sim = copy.copy(sim)
        sim.matrices = {**sim.matrices, "npib": stability.npib_mean}
    _check_common(loaded, sim, alpha_rule, alpha)
    n = loaded.n_layers
    n_remove = layers_to_remove(
        n, remove=n_remove, protect_first=protect_first, protect_last=protect_last
    )
    needs_batch = (
        alpha_rule == "search"
        or planner in ("laco", "sleb", "mka-loss")
        or (planner == "mka" and recompute)
    )
    if needs_batch and batch is None:
        raise MkaInputError(
            f"planner {planner} with alpha rule {alpha_rule} needs calibration data"
        )
    protected = protected_layers(n, protect_first, protect_last)
    small = _subset(batch, loss_samples) if batch is not None else None
    params = {
        "n_remove": n_remove,
        "protect_first": protect_first,
        "protect_last": protect_last,
        "similarity_params": {
            k: sim.params.get(k) for k in ("n_samples", "max_tokens", "pooling", "k", "d")
        },
    }
    if alpha_rule == "fixed":
        params["alpha"] = alpha
    if planner == "mka":
        params.update(recompute=recompute, npib=npib)
        steps = _plan_mka(
            loaded, sim, small, n_remove, alpha_rule, alpha, protected, recompute, batch, progress
        )
        similarity = "npib" if npib == "single" else "npib-bootstrap"
    elif planner in ("sleb", "mka-loss"):
        params["loss_samples"] = small.n_samples
        fn = plan_sleb if planner == "sleb" else plan_mka_loss
        steps = fn(loaded, small, n_remove, protected, progress)
        similarity = "calibration-loss"
        alpha_rule = "search" if planner == "mka-loss" else None
    elif planner == "mka-tail":
        steps = _plan_tail(loaded, sim, small, n_remove, alpha_rule, alpha, protected, progress)
        similarity = "npib"
    elif planner == "shortgpt":
        steps = _plan_shortgpt(sim, n_remove, protected)
        similarity, alpha_rule = "bi", None
    elif planner == "angular":
        steps = _plan_angular(sim, n_remove, protected)
        similarity, alpha_rule = "angular", None
    else:
        params.update(laco_layers=laco_layers, laco_threshold=laco_threshold)
        steps, info = _plan_laco(
            loaded, small, n_remove, protected, laco_layers, laco_threshold, progress
        )
        params.update(laco_forced=info["forced"], laco_candidates=info["candidates"])
        similarity, alpha_rule = "final-hidden-cosine", None
    report(progress, 1.0, f"{planner}: plan removes {n_remove} of {n} layers")
    method = {"planner": planner, "similarity": similarity, "alpha": alpha_rule, "params": params}
    return make_plan(loaded, steps, method)


def _plan_mka(loaded, sim, small, n_remove, rule, fixed, protected, recompute, batch, progress):
    state = _State(loaded.n_layers, [])
    s_orig = sim.matrices["npib"]
    s_cur = None  # NPIB over the current output layers, when recomputing
    search = _merge_search(loaded, state, small) if rule == "search" else None
    for r in range(n_remove):
        groups = state.groups
        best = None
        for j in range(len(groups) - 1):
            a, b = groups[j], groups[j + 1]
            if not (_allowed(a, protected) and _allowed(b, protected)):
                continue
            score = s_cur[j, j + 1] if s_cur is not None else s_orig[a[-1], b[-1]]
            if best is None or score > best[0]:
                best = (float(score), j, a, b)
        if best is None:
            raise MkaInputError(f"mka: no mergeable adjacent pair left after {r} merges")
        score, j, a, b = best
        s_for_alpha = s_orig if s_cur is None else _expand(s_cur, groups, loaded.n_layers)
        x = _alpha(rule, s_for_alpha, a, b, fixed, search)
        x = min(max(x, 0.0), 1.0)
        state.steps.append(Step.merge([a[0], b[0]], [x, 1.0 - x], score=score))
        report(
            progress,
            (r + 1) / n_remove,
            f"mka: merged layers {a}+{b} (NPIB {score:.3f}, α {x:.2f})",
        )
        if recompute and r + 1 < n_remove:
            view = model_view(loaded.model, state.composition)
            s_cur = _npib_of(view, batch, sim)
    return state.steps


def _plan_tail(loaded, sim, small, n_remove, rule, fixed, protected, progress):
    """The released MKA code's rule: merge the last two layers, again and again."""
    state = _State(loaded.n_layers, [])
    s = sim.matrices["npib"]
    search = _merge_search(loaded, state, small) if rule == "search" else None
    for r in range(n_remove):
        groups = [g for g in state.groups if _allowed(g, protected)]
        if len(groups) < 2:
            raise MkaInputError(f"mka-tail: no two unprotected layers left after {r} merges")
        a, b = groups[-2], groups[-1]
        x = min(max(_alpha(rule, s, a, b, fixed, search), 0.0), 1.0)
        state.steps.append(Step.merge([a[0], b[0]], [x, 1.0 - x], score=float(s[a[-1], b[-1]])))
        report(progress, (r + 1) / n_remove, f"mka-tail: merged layers {a}+{b} (α {x:.2f})")
    return state.steps


def _plan_shortgpt(sim, n_remove, protected):
    order = [i for i in np.argsort(sim.bi, kind="stable") if int(i) not in protected][:n_remove]
    return [
        Step.drop([int(i)], score=float(sim.bi[i])) for i in sorted(order, key=lambda i: sim.bi[i])
    ]


def _plan_angular(sim, n_remove, protected):
    if n_remove == 0:
        return []
    scores = sim.block_scores(n_remove)
    starts = [i for i in range(len(scores)) if not protected.intersection(range(i, i + n_remove))]
    if not starts:
        raise MkaInputError(f"angular: no run of {n_remove} unprotected consecutive layers")
    best = min(starts, key=lambda i: scores[i])
    return [Step.drop(list(range(best, best + n_remove)), score=float(scores[best]))]


def _plan_laco(loaded, small, n_remove, protected, m_layers, threshold, progress):
    """Layer Collapse (Yang et al. 2024), top down: try collapsing the m following layers into
    layer l (θ_l + Σ(θ_{l+k} − θ_l), original weights), keep it when the cosine of the final
    hidden states to the original model's stays ≥ threshold, then continue below the collapsed
    range. LaCo itself may stop short of a budget; to compare at equal budgets, a full pass that
    accepts nothing takes its best candidate anyway (counted as `forced` in the plan)."""
    if n_remove == 0:
        return [], {"forced": 0, "candidates": 0}
    if m_layers < 1:
        raise MkaInputError(f"laco: layers merged per collapse must be >= 1, got {m_layers}")
    n = loaded.n_layers
    ref = final_hidden(loaded.model, small)
    steps: list[Step] = []
    removed = tries = forced = 0
    while removed < n_remove:
        # Candidates only change layers from their start upwards, and within a pass every
        # accepted collapse lies above the next start: the layers below are computed once.
        base = compose(n, steps)
        lp, inputs = every_block_input(model_view(loaded.model, base), small)
        pos_of = {i: p for p, g in enumerate(base) for i, _ in g}
        used = {i for st in steps for i in st.layers}
        best = None
        accepted = False
        start = n - 2
        while start >= 0 and removed < n_remove:
            m = min(m_layers, n_remove - removed)
            rng = list(range(start, start + m + 1))
            if rng[-1] >= n or protected.intersection(rng) or used.intersection(rng):
                start -= 1
                continue
            cand = steps + [Step.collapse(rng)]
            pos = pos_of[start]
            view = model_view(loaded.model, compose(n, cand))
            h = real_tokens(continue_from(lp, view, pos, inputs[pos]))
            cos = float(torch.nn.functional.cosine_similarity(h, ref, dim=-1).mean())
            tries += 1
            if best is None or cos > best[0]:
                best = (cos, rng)
            report(progress, removed / n_remove, f"laco: layers {rng[0]}-{rng[-1]} cos {cos:.3f}")
            if cos >= threshold:
                steps = steps + [Step.collapse(rng, score=cos)]
                used.update(rng)
                removed += m
                accepted = True
                start = rng[0] - 1  # continue below the collapsed range
            else:
                start -= 1
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
    return steps, {"forced": forced, "candidates": tries}


def manual_plan(
    loaded: LoadedModel,
    sim: SimilarityResult | None,
    picks: list[dict],
    alpha_rule: str = "similarity",
    alpha: float = 0.5,
    batch: CalibrationBatch | None = None,
) -> Plan:
    """The user's picks, in order: {"op": "merge"|"drop", "layers": [...], "weights": optional}.

    A merge of two groups without weights gets its α from `alpha_rule` (NPIB of the analysis);
    a merge of more groups without weights is uniform."""
    if not isinstance(picks, list) or not picks:
        raise MkaInputError("manual plan: pick at least one merge or drop")
    n = loaded.n_layers
    if alpha_rule in ("similarity", "rowmean"):
        if sim is None:
            raise MkaInputError(
                f"alpha rule {alpha_rule} needs a similarity analysis of this model"
            )
        _check_common(loaded, sim, alpha_rule, alpha)
    elif alpha_rule not in ALPHA_RULES:
        raise MkaInputError(
            f"unknown alpha rule {alpha_rule!r}; expected one of {', '.join(ALPHA_RULES)}"
        )
    state = _State(n, [])
    search = None
    if alpha_rule == "search":
        if batch is None:
            raise MkaInputError("alpha rule search needs calibration data")
        search = _merge_search(loaded, state, _subset(batch, SEARCH_SAMPLES))
    for i, pick in enumerate(picks):
        if not isinstance(pick, dict) or pick.get("op") not in ("merge", "drop"):
            raise MkaInputError(f"picks[{i}]: expected {{'op': 'merge'|'drop', 'layers': [...]}}")
        layers = pick.get("layers")
        if not isinstance(layers, list | tuple) or not layers:
            raise MkaInputError(f"picks[{i}].layers: expected a non-empty list of layer indices")
        if pick["op"] == "drop":
            step = Step.drop(list(layers))
        else:
            if len(layers) < 2:
                raise MkaInputError(f"picks[{i}]: a merge needs at least two layers")
            weights = pick.get("weights")
            if weights is None and len(layers) == 2:
                ga = next(g for g in state.groups if layers[0] in g)
                gb = next(g for g in state.groups if layers[1] in g)
                s = sim.matrices["npib"] if sim is not None else None
                x = _alpha(alpha_rule, s, ga, gb, alpha, search)
                weights = [min(max(x, 0.0), 1.0), 1.0 - min(max(x, 0.0), 1.0)]
            elif weights is None:
                weights = [1.0 / len(layers)] * len(layers)
            step = Step.merge(list(layers), list(weights))
        compose(n, state.steps + [step])  # validate now, naming the pick
        state.steps.append(step)
    params = {"picks": picks}
    if alpha_rule == "fixed":
        params["alpha"] = alpha
    method = {"planner": "manual", "similarity": "npib", "alpha": alpha_rule, "params": params}
    return make_plan(loaded, state.steps, method)


__all__ = ["PLANNERS", "ALPHA_RULES", "plan_layers", "manual_plan", "model_view", "Plan"]
