"""One settings object per planning request (`PlanSettings`), checked once where it is made and
passed whole from the app, the command line and `compare` down to the planner; and what a
planner function receives (`PlanJob`) and returns (`Planned`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mka_core.analysis.similarity import SimilarityResult
from mka_core.compression.plan import Step
from mka_core.compression.planners.registry import get, names
from mka_core.compression.refinement import Refine
from mka_core.data.corpus import CalibrationBatch
from mka_core.errors import MkaInputError, ProgressFn
from mka_core.jsonfields import is_number, kind, want_int, want_number, want_object
from mka_core.models.loading import LoadedModel

# How a merge of groups a and b gets its weight α (a's; 1 − α goes to b), and what each rule
# needs: "similarity" is the paper's α = S_ab, "rowmean" the released MKA code's sigmoid of the
# row means, "search" the α that minimises calibration loss.
ALPHA_RULES = ("similarity", "rowmean", "fixed", "search")
ALPHA_NEEDS = {"similarity": "analysis", "rowmean": "analysis", "fixed": None, "search": "batch"}
# NPIB as the analysis computed it (the paper), or averaged over its bootstrap replicates
NPIB_KINDS = ("single", "bootstrap")


@dataclass(frozen=True)
class PlanSettings:
    """Everything a planner is asked to do. Options a planner does not take are ignored by it
    (the α rule by a planner that drops layers), so one form or command line serves all."""

    planner: str = "mka"
    n_remove: int | None = None  # budget: layers removed ...
    ratio: float | None = None  # ... or removed / original layers (one of the two)
    alpha_rule: str = "similarity"  # of ALPHA_RULES, for planners that merge
    alpha: float = 0.5  # α of the "fixed" rule
    npib: str = "single"  # of NPIB_KINDS, for planners that rank by NPIB
    recompute: bool = False  # mka: recompute NPIB on the merged model after each merge
    protect_first: bool = True  # never touch layer 0
    protect_last: bool = True  # never touch the last layer
    laco_layers: int = 4  # laco: following layers collapsed into one per step
    laco_threshold: float = 0.65  # laco: least cosine of the final hidden states to accept
    loss_samples: int | None = None  # calibration samples loss-guided planners score with
    picks: tuple[dict, ...] | None = None  # manual: {"op": "merge"|"drop", "layers": [...]}
    merge_mode: str = "average"  # of refinement.MERGE_MODES: how merged layers are built
    compensation: str = "none"  # of refinement.COMPENSATIONS: what corrects each cut

    def __post_init__(self):
        planner = get(self.planner)
        Refine(self.merge_mode, self.compensation)  # checks both
        if self.merge_mode != "average" and "merge" not in planner.does:
            raise MkaInputError(
                f"planner {planner.name} does not merge layers ({', '.join(planner.does)}); merge "
                f"mode {self.merge_mode} is for {', '.join(names(lambda p: 'merge' in p.does))}"
            )
        if self.n_remove is not None:
            want_int(self.n_remove, "n_remove", "a number of layers")
        if self.ratio is not None:
            want_number(self.ratio, "ratio")
        if self.alpha_rule not in ALPHA_RULES:
            raise MkaInputError(
                f"unknown alpha rule {self.alpha_rule!r}; expected one of {', '.join(ALPHA_RULES)}"
            )
        if self.alpha_rule == "fixed" and not (is_number(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise MkaInputError(f"fixed alpha must be a number in [0, 1], got {self.alpha!r}")
        if self.npib not in NPIB_KINDS:
            raise MkaInputError(
                f"unknown NPIB kind {self.npib!r}; expected one of {', '.join(NPIB_KINDS)}"
            )
        for key in ("recompute", "protect_first", "protect_last"):
            if not isinstance(getattr(self, key), bool):
                raise MkaInputError(
                    f"{key}: expected true or false, got {kind(getattr(self, key))}"
                )
        if want_int(self.laco_layers, "laco_layers") < 1:
            raise MkaInputError(
                f"laco: layers merged per collapse must be >= 1, got {self.laco_layers}"
            )
        want_number(self.laco_threshold, "laco_threshold")
        if self.loss_samples is not None and want_int(self.loss_samples, "loss_samples") < 1:
            raise MkaInputError(f"loss_samples: expected at least 1, got {self.loss_samples}")
        self._check_picks(planner)

    def _check_picks(self, planner) -> None:
        if self.picks is not None:
            if not isinstance(self.picks, list | tuple):
                raise MkaInputError(
                    f"picks: expected a list of merges and drops, got {kind(self.picks)}"
                )
            object.__setattr__(self, "picks", tuple(self.picks))
        if planner.takes_picks and not self.picks:
            raise MkaInputError(f"{planner.name} plan: pick at least one merge or drop")
        if self.picks and not planner.takes_picks:
            raise MkaInputError(
                f"planner {planner.name} plans to a budget; picks are for "
                f"{', '.join(names(lambda p: p.takes_picks))}"
            )

    @classmethod
    def of(cls, spec: PlanSettings | str, **changes) -> PlanSettings:
        """`spec` with `changes`: a PlanSettings, or a planner name and the other fields."""
        if isinstance(spec, PlanSettings):
            return spec.replace(**changes) if changes else spec
        _check_fields(changes)
        return cls(planner=spec, **changes)

    def replace(self, **changes) -> PlanSettings:
        _check_fields(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)  # picks copied
        d["picks"] = list(d["picks"]) if d["picks"] is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PlanSettings:
        want_object(d, "plan settings", _FIELDS, ())
        return cls(**d)


_FIELDS = tuple(f.name for f in dataclasses.fields(PlanSettings))


def _check_fields(changes: dict) -> None:
    unknown = [k for k in changes if k not in _FIELDS]
    if unknown:
        raise MkaInputError(
            f"plan settings: unknown field {unknown[0]!r}; expected {', '.join(_FIELDS)}"
        )


@dataclass(frozen=True)
class PlanJob:
    """What a planner's `run` gets: the request and everything resolved for it."""

    loaded: LoadedModel
    settings: PlanSettings
    sim: SimilarityResult | None  # the analysis' similarity (None when none was given)
    stability: Any  # the analysis' stability.StabilityResult, or None
    batch: CalibrationBatch | None  # the whole calibration batch
    small: CalibrationBatch | None  # its first loss_samples samples, to score candidates on
    n_remove: int  # the budget in layers (0 for a planner that takes picks)
    protected: frozenset[int]  # layers it must leave alone
    progress: ProgressFn | None = None


@dataclass
class Planned:
    """A planner's answer: its steps and what the plan's `method` records about them."""

    steps: list[Step]
    similarity: str | None  # what chose the steps (method.similarity), e.g. "npib", "bi"
    alpha: str | None = None  # the α rule its merges used (method.alpha); None: no α rule
    params: dict = field(default_factory=dict)  # its own method.params (after the common ones)


__all__ = [
    "ALPHA_NEEDS",
    "ALPHA_RULES",
    "NPIB_KINDS",
    "PlanJob",
    "PlanSettings",
    "Planned",
]
