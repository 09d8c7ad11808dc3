"""Planners that drop layers by a score the analysis already holds: ShortGPT's Block Influence
(Men et al. 2024) and the angular distance between a run's input and output (Gromov et al. 2024,
"The Unreasonable Ineffectiveness of the Deeper Layers")."""

from __future__ import annotations

import numpy as np

from mka_core.compression.plan import Step
from mka_core.compression.planners.registry import Planner, register
from mka_core.compression.planners.settings import PlanJob, Planned
from mka_core.errors import MkaInputError


def plan_shortgpt(job: PlanJob) -> Planned:
    bi = job.sim.bi
    order = [i for i in np.argsort(bi, kind="stable") if int(i) not in job.protected]
    picked = sorted(order[: job.n_remove], key=lambda i: bi[i])
    return Planned([Step.drop([int(i)], score=float(bi[i])) for i in picked], "bi")


def plan_angular(job: PlanJob) -> Planned:
    n_remove, protected = job.n_remove, job.protected
    if n_remove == 0:
        return Planned([], "angular")
    scores = job.sim.block_scores(n_remove)
    starts = [i for i in range(len(scores)) if not protected.intersection(range(i, i + n_remove))]
    if not starts:
        raise MkaInputError(f"angular: no run of {n_remove} unprotected consecutive layers")
    best = min(starts, key=lambda i: scores[i])
    step = Step.drop(list(range(best, best + n_remove)), score=float(scores[best]))
    return Planned([step], "angular")


register(
    Planner(
        name="shortgpt",
        help="ShortGPT: drop the layers with the lowest Block Influence",
        source="Men et al. 2024, ShortGPT",
        does=("drop",),
        run=plan_shortgpt,
        reads="bi",
        greedy_prefix=True,
    )
)
register(
    Planner(
        name="angular",
        help="Gromov et al.: drop the run of layers whose input and output differ least",
        source="Gromov et al. 2024, The Unreasonable Ineffectiveness of the Deeper Layers",
        does=("drop",),
        run=plan_angular,
        reads="angular",
    )
)
