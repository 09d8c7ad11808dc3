"""`plan_layers`: a PlanSettings to a Plan through the registered planner. What every planner
shares happens here once: the analysis must be this model's, what the planner and its α rule
need must be there, the budget must fit; then the planner's own function runs, and the plan's
`method` records the settings that made it."""

from __future__ import annotations

from mka_core.analysis.similarity import SimilarityResult
from mka_core.compression.plan import Plan, layers_to_remove, make_plan, protected_layers
from mka_core.compression.planners.registry import Planner, get
from mka_core.compression.planners.search import SEARCH_SAMPLES
from mka_core.compression.planners.settings import ALPHA_NEEDS, PlanJob, PlanSettings
from mka_core.compression.rebuild import check_refinement
from mka_core.compression.refinement import Refine
from mka_core.data.corpus import CalibrationBatch
from mka_core.engine.layerpass import as_stack
from mka_core.errors import MkaInputError, ProgressFn, report
from mka_core.models.loading import LoadedModel

# the analysis settings a plan records (what its similarity was computed from)
SIMILARITY_PARAMS = ("n_samples", "max_tokens", "pooling", "k", "d")


def plan_layers(
    loaded: LoadedModel,
    sim: SimilarityResult | None,
    batch: CalibrationBatch | None,
    settings: PlanSettings,
    progress: ProgressFn | None = None,
    stability=None,
) -> Plan:
    """Plan with `settings.planner` (see `registry`; `python -m mka_core plan --help` lists them).

    sim: the analysis' similarity; batch: its calibration data; stability: its bootstrap result
    (for NPIB averaged over replicates). Planning only reads the model."""
    if not isinstance(settings, PlanSettings):
        raise MkaInputError(f"settings: expected PlanSettings, got {type(settings).__name__}")
    planner = get(settings.planner)
    _check_needs(planner, settings, loaded, sim, batch)
    n = loaded.n_layers
    n_remove = 0
    if not planner.takes_picks:
        n_remove = layers_to_remove(
            n,
            remove=settings.n_remove,
            ratio=settings.ratio,
            protect_first=settings.protect_first,
            protect_last=settings.protect_last,
        )
    job = PlanJob(
        loaded=loaded,
        settings=settings,
        sim=sim,
        stability=stability,
        batch=batch,
        small=batch.subset(settings.loss_samples or SEARCH_SAMPLES) if batch is not None else None,
        n_remove=n_remove,
        protected=frozenset(protected_layers(n, settings.protect_first, settings.protect_last)),
        progress=progress,
    )
    stack = as_stack(loaded.model)
    if {"merge", "collapse"} & set(planner.does) and not planner.takes_picks:
        # refuse before any search: merging mixture-of-experts blocks is refused at apply anyway
        stack.recipe.check_composition([[(i, 0.5), (i + 1, 0.5)] for i in range(n - 1)])
    planned = planner.run(job)
    fixed = {"alpha": settings.alpha} if settings.alpha_rule == "fixed" else {}
    if planner.takes_picks:
        params = {**planned.params, **fixed}
    else:
        params = {**_budget_params(job), **fixed, **planned.params}
        report(progress, 1.0, f"{planner.name}: plan removes {n_remove} of {n} layers")
    method = {
        "planner": planner.name,
        "similarity": planned.similarity,
        "alpha": planned.alpha,
        "params": params,
    }
    refine = Refine(settings.merge_mode, settings.compensation)
    plan = make_plan(loaded, planned.steps, method, refine)
    check_refinement(stack, plan.layers, refine.merge, refine.compensation)  # layout refusals
    stack.recipe.check_composition(plan.layers)  # a manual merge of MoE layers, refused now
    return plan


def _budget_params(job: PlanJob) -> dict:
    params = {
        "n_remove": job.n_remove,
        "protect_first": job.settings.protect_first,
        "protect_last": job.settings.protect_last,
    }
    if job.sim is not None:
        params["similarity_params"] = {k: job.sim.params.get(k) for k in SIMILARITY_PARAMS}
    return params


def _check_needs(planner: Planner, s: PlanSettings, loaded, sim, batch) -> None:
    """The options this planner takes, and what it (and its α rule) needs, are there."""
    rule = s.alpha_rule if planner.alpha_rules else None
    if rule is not None and rule not in planner.alpha_rules:
        raise MkaInputError(
            f"planner {planner.name} takes alpha rule {', '.join(planner.alpha_rules)}, not {rule}"
        )
    if planner.npib_kinds and s.npib not in planner.npib_kinds:
        raise MkaInputError(
            f"planner {planner.name} takes NPIB {', '.join(planner.npib_kinds)}, not {s.npib}"
        )
    if sim is not None and sim.n_layers != loaded.n_layers:
        raise MkaInputError(
            f"the similarity result covers {sim.n_layers} layers but the model has "
            f"{loaded.n_layers}: capture activations on this model first"
        )
    if sim is None and (planner.needs_analysis or ALPHA_NEEDS.get(rule) == "analysis"):
        who = f"planner {planner.name}" if planner.needs_analysis else f"alpha rule {rule}"
        raise MkaInputError(f"{who} needs a similarity analysis of this model")
    if batch is None and planner.needs_batch:
        raise MkaInputError(f"planner {planner.name} needs calibration data")
    if batch is None and ALPHA_NEEDS.get(rule) == "batch":
        raise MkaInputError(f"planner {planner.name} with alpha rule {rule} needs calibration data")
