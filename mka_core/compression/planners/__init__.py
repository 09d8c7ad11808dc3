"""Planners: from the analysis (and, for some, a few forward passes) to a Plan.

Each planner lives in its own module and registers itself (`registry`): its name, one-line help,
source, what it does, the options it takes and what it needs. `plan_layers` runs the one a
`PlanSettings` names; the command line, the app and `compare` read their lists from the registry.
Importing this package imports every planner module, so every planner is registered.

Planners only read the model (never change it): the `search` α rule, LaCo, SLEB and mka-loss score
candidates on views (`engine.Stack` compositions) that share every unchanged block with the
original model and build merged blocks only when the engine reaches them, so they work on
streamed models too (`search`).
"""

from __future__ import annotations

from mka_core.compression.plan import Plan

# Importing a planner module registers its planners; the lists show them in this order.
# isort: off
from mka_core.compression.planners import mka, scores, laco, loss, manual

# isort: on
from mka_core.compression.planners.dispatch import plan_layers
from mka_core.compression.planners.manual import MANUAL, manual_plan
from mka_core.compression.planners.registry import (
    PLANNERS,
    Planner,
    Registry,
    budget_names,
    get,
    names,
    register,
    unregister,
)
from mka_core.compression.planners.search import SEARCH_SAMPLES, model_view
from mka_core.compression.planners.settings import (
    ALPHA_NEEDS,
    ALPHA_RULES,
    NPIB_KINDS,
    PlanJob,
    Planned,
    PlanSettings,
)

PLANNER_MODULES = (mka, scores, laco, loss, manual)

__all__ = [
    "ALPHA_NEEDS",
    "ALPHA_RULES",
    "MANUAL",
    "NPIB_KINDS",
    "PLANNERS",
    "PLANNER_MODULES",
    "SEARCH_SAMPLES",
    "Plan",
    "PlanJob",
    "PlanSettings",
    "Planned",
    "Planner",
    "Registry",
    "budget_names",
    "get",
    "manual_plan",
    "model_view",
    "names",
    "plan_layers",
    "register",
    "unregister",
]
