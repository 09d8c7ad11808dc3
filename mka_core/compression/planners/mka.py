"""MKA (Liu et al. 2024, "Pruning via Merging: Compressing LLMs via Manifold Alignment Based
Layer Merging"): merge the adjacent pair of layers whose outputs share the most information
(NPIB), α by the chosen rule; and `mka-tail`, the rule of the paper's released code, which always
merges the last two unprotected layers."""

from __future__ import annotations

import copy

from mka_core.compression.plan import Step
from mka_core.compression.planners.registry import Planner, register
from mka_core.compression.planners.search import (
    _allowed,
    _alpha,
    _expand,
    _merge_search,
    _npib_of,
    _State,
    model_view,
)
from mka_core.compression.planners.settings import ALPHA_RULES, NPIB_KINDS, PlanJob, Planned
from mka_core.errors import MkaInputError, report


def plan_mka(job: PlanJob) -> Planned:
    s = job.settings
    sim = job.sim
    if s.npib == "bootstrap":
        if job.stability is None:
            raise MkaInputError("npib=bootstrap needs the analysis' stability (bootstrap) result")
        sim = copy.copy(sim)
        sim.matrices = {**sim.matrices, "npib": job.stability.npib_mean}
    if s.recompute and job.batch is None:
        raise MkaInputError("planner mka with recompute needs calibration data")
    loaded, protected, n_remove = job.loaded, job.protected, job.n_remove
    state = _State(loaded.n_layers, [])
    s_orig = sim.matrices["npib"]
    s_cur = None  # NPIB over the current output layers, when recomputing
    search = _merge_search(loaded, state, job.small) if s.alpha_rule == "search" else None
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
        x = _alpha(s.alpha_rule, s_for_alpha, a, b, s.alpha, search)
        x = min(max(x, 0.0), 1.0)
        state.steps.append(Step.merge([a[0], b[0]], [x, 1.0 - x], score=score))
        report(
            job.progress,
            (r + 1) / n_remove,
            f"mka: merged layers {a}+{b} (NPIB {score:.3f}, α {x:.2f})",
        )
        if s.recompute and r + 1 < n_remove:
            view = model_view(loaded.model, state.composition)
            s_cur = _npib_of(view, job.batch, sim)
    similarity = "npib" if s.npib == "single" else "npib-bootstrap"
    params = {"recompute": s.recompute, "npib": s.npib}
    return Planned(state.steps, similarity, s.alpha_rule, params)


def plan_tail(job: PlanJob) -> Planned:
    """The released MKA code's rule: merge the last two layers, again and again."""
    s, loaded = job.settings, job.loaded
    state = _State(loaded.n_layers, [])
    npib = job.sim.matrices["npib"]
    search = _merge_search(loaded, state, job.small) if s.alpha_rule == "search" else None
    for r in range(job.n_remove):
        groups = [g for g in state.groups if _allowed(g, job.protected)]
        if len(groups) < 2:
            raise MkaInputError(f"mka-tail: no two unprotected layers left after {r} merges")
        a, b = groups[-2], groups[-1]
        x = min(max(_alpha(s.alpha_rule, npib, a, b, s.alpha, search), 0.0), 1.0)
        score = float(npib[a[-1], b[-1]])
        state.steps.append(Step.merge([a[0], b[0]], [x, 1.0 - x], score=score))
        report(job.progress, (r + 1) / job.n_remove, f"mka-tail: merged layers {a}+{b} (α {x:.2f})")
    return Planned(state.steps, "npib", s.alpha_rule)


# compare's mka specs: each α rule; "drop", the same pairs with the second layer dropped (α = 1);
# "bootstrap", NPIB averaged over the bootstrap replicates
_RULE_SPECS = {rule: {"alpha_rule": rule} for rule in ALPHA_RULES}

register(
    Planner(
        name="mka",
        help="MKA (the paper): merge the adjacent pair with the highest NPIB, α by the chosen rule",
        source="Liu et al. 2024, Pruning via Merging",
        does=("merge",),
        run=plan_mka,
        alpha_rules=ALPHA_RULES,
        npib_kinds=NPIB_KINDS,
        spec_options={
            **_RULE_SPECS,
            "drop": {"alpha_rule": "fixed", "alpha": 1.0},
            "bootstrap": {"npib": "bootstrap"},
        },
        reads="npib",
        greedy_prefix=True,
    )
)
register(
    Planner(
        name="mka-tail",
        help="the released MKA code's rule: always merge the last two unprotected layers",
        source="the MKA authors' released code (Liu et al. 2024)",
        does=("merge",),
        run=plan_tail,
        alpha_rules=ALPHA_RULES,
        spec_options=_RULE_SPECS,
        reads="npib",
        greedy_prefix=True,
        in_compare_default=False,
    )
)
