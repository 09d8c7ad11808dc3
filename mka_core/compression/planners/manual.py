"""The user's own picks, in order: merges (α by the chosen rule for two layers, uniform for more,
or the weights given) and drops, each checked against the steps before it."""

from __future__ import annotations

from mka_core.analysis.similarity import SimilarityResult
from mka_core.compression.plan import Plan, Step, compose
from mka_core.compression.planners.dispatch import plan_layers
from mka_core.compression.planners.registry import Planner, register
from mka_core.compression.planners.search import _alpha, _merge_search, _State
from mka_core.compression.planners.settings import ALPHA_RULES, PlanJob, Planned, PlanSettings
from mka_core.data.corpus import CalibrationBatch
from mka_core.errors import MkaInputError
from mka_core.models.loading import LoadedModel

MANUAL = "manual"


def plan_picks(job: PlanJob) -> Planned:
    """{"op": "merge"|"drop", "layers": [...], "weights": optional} for each pick. A merge of two
    groups without weights gets its α from the α rule (NPIB of the analysis); a merge of more
    groups without weights is uniform."""
    s, n = job.settings, job.loaded.n_layers
    state = _State(n, [])
    search = _merge_search(job.loaded, state, job.small) if s.alpha_rule == "search" else None
    npib = job.sim.matrices["npib"] if job.sim is not None else None
    for i, pick in enumerate(s.picks):
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
                x = min(max(_alpha(s.alpha_rule, npib, ga, gb, s.alpha, search), 0.0), 1.0)
                weights = [x, 1.0 - x]
            elif weights is None:
                weights = [1.0 / len(layers)] * len(layers)
            step = Step.merge(list(layers), list(weights))
        compose(n, state.steps + [step])  # validate now, naming the pick
        state.steps.append(step)
    return Planned(state.steps, "npib", s.alpha_rule, {"picks": [dict(p) for p in s.picks]})


def manual_plan(
    loaded: LoadedModel,
    sim: SimilarityResult | None,
    picks: list[dict],
    alpha_rule: str = "similarity",
    alpha: float = 0.5,
    batch: CalibrationBatch | None = None,
) -> Plan:
    """The plan of the user's picks (see `plan_picks`)."""
    settings = PlanSettings(planner=MANUAL, picks=picks, alpha_rule=alpha_rule, alpha=alpha)
    return plan_layers(loaded, sim, batch, settings)


register(
    Planner(
        name=MANUAL,
        help="your own picks of merges and drops, in order; α of a pair by the chosen rule",
        source="the user",
        does=("merge", "drop"),
        run=plan_picks,
        alpha_rules=ALPHA_RULES,
        takes_picks=True,
    )
)
