"""The app's plan actions: make a plan by budget or from picks, import a plan file, keep the
session's plan (and its workspace copy), and the plan's mergekit YAML and file name."""

from __future__ import annotations

import json

import streamlit as st

from mka_core.compression.plan import Plan, check_fingerprint
from mka_core.compression.planners import (
    ALPHA_RULES,
    NPIB_KINDS,
    PLANNERS,
    Planner,
    PlanSettings,
    budget_names,
)
from mka_core.compression.refinement import COMPENSATION_HELP, MERGE_HELP
from mka_core.errors import MkaInputError, ProgressFn
from mka_core.ui import guards, session
from mka_core.ui import state as S
from mka_core.ui.resources import current_model
from mka_core.workflows import pipeline
from mka_core.workflows.export import mergekit_yaml as _yaml


def planners() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the planners that plan to a budget, the α rules), as the registry lists them."""
    return budget_names(), ALPHA_RULES


def planner_help(name: str) -> str:

    return PLANNERS.get(name).help if name in PLANNERS else ""


def planner_info(name: str) -> Planner:
    """The registry's record: what the planner takes (α rules, NPIB kinds) and needs."""
    return PLANNERS.get(name)


def npib_kinds() -> tuple[str, ...]:
    return NPIB_KINDS


ALPHA_HELP = {
    "similarity": "α = NPIB of the pair (the paper)",
    "rowmean": "α = sigmoid of the row means of S (the released code)",
    "fixed": "α = the value you choose",
    "search": "α in [0, 1] that minimises calibration loss (slower)",
}


# how merged layers are built and what corrects each cut, with the paper each comes from
MERGE_MODES = MERGE_HELP
COMPENSATIONS = COMPENSATION_HELP


def make_budget_plan(settings: PlanSettings, progress: ProgressFn | None = None):
    """The plan `settings` asks for, on the current model and the session's analysis."""

    plan = pipeline.make_budget_plan(
        current_model(), st.session_state[S.ANALYSIS], settings, progress=progress
    )
    set_plan(plan, f"budget: {settings.planner}")
    return plan


def make_manual_plan(
    picks: list[dict],
    alpha_rule: str = "similarity",
    alpha: float = 0.5,
    merge_mode: str = "average",
    compensation: str = "none",
):

    plan = pipeline.make_manual_plan(
        current_model(),
        st.session_state.get(S.ANALYSIS),
        list(picks),
        alpha_rule=alpha_rule,
        alpha=alpha,
        merge_mode=merge_mode,
        compensation=compensation,
    )
    set_plan(plan, "manual")
    return plan


def import_plan(uploaded) -> tuple[object, str | None]:
    """A Plan from an uploaded JSON file, validated; plus a warning when it names another model."""

    if uploaded is None:
        raise MkaInputError("no plan file uploaded")
    raw = uploaded.getvalue()
    if not raw.strip():
        raise MkaInputError(f"{uploaded.name} is empty")
    try:
        d = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise MkaInputError(f"{uploaded.name} is not a text file; expected a plan JSON") from None
    except json.JSONDecodeError as e:
        raise MkaInputError(
            f"{uploaded.name} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from None
    try:
        plan = Plan.from_dict(d)
    except MkaInputError as e:
        raise MkaInputError(f"{uploaded.name}: {e}") from None
    loaded = current_model()
    if plan.model.num_layers != loaded.n_layers:
        raise MkaInputError(
            f"{uploaded.name}: the plan is for a {plan.model.num_layers}-layer model "
            f"({plan.model.source}), the loaded model has {loaded.n_layers} layers"
        )
    set_plan(plan, f"imported: {uploaded.name}")
    return plan, check_fingerprint(plan, loaded)


def set_plan(plan, origin: str) -> None:
    st.session_state[S.PLAN] = plan
    st.session_state[S.PLAN_ORIGIN] = origin
    session.save_plan(plan)
    guards.sidebar_status()


def mergekit_yaml(plan) -> tuple[str | None, str | None]:
    """(yaml, None), or (None, why mergekit cannot express the plan)."""

    try:
        return _yaml(plan), None
    except MkaInputError as e:
        return None, str(e)


def plan_filename(plan, ext: str = "json") -> str:
    src = plan.model.source.replace(":", "-").replace("/", "-")
    return f"plan-{src}-{plan.method.get('planner', 'plan')}-{plan.n_layers_out}L.{ext}"
