"""Plan steps and the composition they derive: what each output layer of a compressed model is
made of, as ``(original layer index, weight)`` lists. Pure data, no weights (see `plan` for the
step semantics and the file format that holds them)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from mka_core.errors import MkaInputError
from mka_core.jsonfields import is_int, kind, want_int, want_list, want_number, want_object

OPS = ("merge", "drop", "collapse")
WEIGHT_TOL = 1e-6  # how far merge weights may sum from 1, and stored weights from derived ones

Composition = list[list[tuple[int, float]]]

_STEP_KEYS = ("op", "layers", "weights", "score")


def _derived_collapse_weights(n: int) -> tuple[float, ...]:
    """LaCo's θ_l + Σ_k (θ_{l+k} − θ_l) over n = m + 1 layers: (1 − m, 1, …, 1)."""
    return (float(1 - (n - 1)),) + (1.0,) * (n - 1)


def _check_step_fields(op, layers, weights, score, path: str):
    """Context-free checks of one step (types, arity, weights); returns normalised fields."""
    if not isinstance(op, str) or op not in OPS:
        raise MkaInputError(f"{path}.op: unknown op {kind(op)}; expected one of {', '.join(OPS)}")
    if isinstance(layers, str):
        raise MkaInputError(f"{path}.layers: expected a list of layer indices, got {kind(layers)}")
    layers = want_list(layers, f"{path}.layers", "a list of layer indices")
    layers = tuple(
        want_int(x, f"{path}.layers[{j}]", "an integer layer index") for j, x in enumerate(layers)
    )
    for j, x in enumerate(layers):
        if x in layers[:j]:
            raise MkaInputError(f"{path}.layers[{j}]: layer {x} is repeated")
    least = 1 if op == "drop" else 2
    if len(layers) < least:
        raise MkaInputError(
            f"{path}.layers: a {op} needs at least {least} layer{'s' if least > 1 else ''}, "
            f"got {len(layers)}"
        )

    if weights is not None:
        if isinstance(weights, str):
            raise MkaInputError(f"{path}.weights: expected a list of numbers, got {kind(weights)}")
        weights = want_list(weights, f"{path}.weights", "a list of numbers or null")
        weights = tuple(want_number(w, f"{path}.weights[{j}]") for j, w in enumerate(weights))
    if op == "drop":
        if weights is not None:
            raise MkaInputError(f"{path}.weights: a drop takes no weights, got {list(weights)}")
    else:
        if weights is None:
            raise MkaInputError(f"{path}.weights: missing; a {op} needs one weight per layer")
        if len(weights) != len(layers):
            raise MkaInputError(
                f"{path}.weights: {len(weights)} weights for {len(layers)} layers; "
                f"expected one weight per layer"
            )
    if op == "merge":
        for j, w in enumerate(weights):
            if w < 0:
                raise MkaInputError(f"{path}.weights[{j}]: merge weights must be >= 0, got {w}")
        total = math.fsum(weights)
        if abs(total - 1.0) > WEIGHT_TOL:
            raise MkaInputError(f"{path}.weights: merge weights sum to {total:.9g}, expected 1")
    if op == "collapse":
        for j in range(1, len(layers)):
            if layers[j] != layers[0] + j:
                raise MkaInputError(
                    f"{path}.layers[{j}]: a collapse takes consecutive layers in order; "
                    f"expected {layers[0] + j}, got {layers[j]}"
                )
        derived = _derived_collapse_weights(len(layers))
        if any(abs(w - d) > WEIGHT_TOL for w, d in zip(weights, derived, strict=True)):
            raise MkaInputError(
                f"{path}.weights: a collapse of {len(layers)} layers has weights "
                f"{list(derived)} (θ_l + Σ(θ_l+k − θ_l)), got {list(weights)}"
            )
        weights = derived

    if score is not None:
        score = want_number(score, f"{path}.score")
    return op, layers, weights, score


@dataclass(frozen=True)
class Step:
    """One planner or user action on ORIGINAL layer indices (see the module docstring)."""

    op: str
    layers: tuple[int, ...]
    weights: tuple[float, ...] | None = None
    score: float | None = None

    def __post_init__(self):
        _, layers, weights, score = _check_step_fields(
            self.op, self.layers, self.weights, self.score, "step"
        )
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "score", score)

    @classmethod
    def merge(cls, layers: Sequence[int], weights: Sequence[float], score: float | None = None):
        return cls("merge", tuple(layers), tuple(weights), score)

    @classmethod
    def drop(cls, layers: Sequence[int], score: float | None = None):
        return cls("drop", tuple(layers), None, score)

    @classmethod
    def collapse(cls, layers: Sequence[int], score: float | None = None):
        """LaCo: layers l..l+m into one; the weights are derived."""
        layers = tuple(layers)
        return cls("collapse", layers, _derived_collapse_weights(len(layers)), score)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"op": self.op, "layers": list(self.layers)}
        if self.weights is not None:
            d["weights"] = list(self.weights)
        if self.score is not None:
            d["score"] = self.score
        return d

    @classmethod
    def from_dict(cls, d: Any, path: str = "step") -> Step:
        d = want_object(d, path, _STEP_KEYS, ("op", "layers"))
        op, layers, weights, score = _check_step_fields(
            d["op"], d["layers"], d.get("weights"), d.get("score"), path
        )
        return cls(op, layers, weights, score)


def compose(num_layers: int, steps: Iterable[Step]) -> Composition:
    """The composition the steps derive on a model of `num_layers` layers, or MkaInputError
    naming the step (``steps[i]``) and what is wrong with it."""
    if not is_int(num_layers) or num_layers < 1:
        raise MkaInputError(f"num_layers: expected a positive integer, got {kind(num_layers)}")
    groups: Composition = [[(i, 1.0)] for i in range(num_layers)]
    dropped: dict[int, int] = {}  # original layer -> the step that removed it

    for s, step in enumerate(steps):
        path = f"steps[{s}]"
        if not isinstance(step, Step):
            raise MkaInputError(f"{path}: expected a Step, got {type(step).__name__}")
        where: dict[int, int] = {src: g for g, grp in enumerate(groups) for src, _ in grp}
        positions: list[int] = []
        for j, layer in enumerate(step.layers):
            lp = f"{path}.layers[{j}]"
            if not 0 <= layer < num_layers:
                raise MkaInputError(
                    f"{lp}: layer {layer} is out of range for a {num_layers}-layer model "
                    f"(0..{num_layers - 1})"
                )
            if layer in dropped:
                raise MkaInputError(
                    f"{lp}: layer {layer} was already dropped by steps[{dropped[layer]}]"
                )
            g = where[layer]
            if g in positions:
                other = step.layers[positions.index(g)]
                raise MkaInputError(
                    f"{lp}: layer {layer} is already part of the same output layer as layer {other}"
                )
            positions.append(g)

        if step.op == "drop":
            if len(positions) >= len(groups):
                raise MkaInputError(f"{path}: dropping these layers would leave no layers at all")
            for g in positions:
                for src, _ in groups[g]:
                    dropped[src] = s
            groups = [grp for g, grp in enumerate(groups) if g not in positions]
            continue

        lo, hi = min(positions), max(positions)
        if hi - lo + 1 != len(positions):
            gap = next(g for g in range(lo, hi + 1) if g not in positions)
            between = ", ".join(str(src) for src, _ in groups[gap])
            raise MkaInputError(
                f"{path}.layers: {step.op} of non-adjacent layers "
                f"{', '.join(map(str, step.layers))}: layer {between} lies between them"
            )
        if step.op == "collapse":
            for j, g in enumerate(positions):
                if len(groups[g]) != 1:
                    srcs = ", ".join(str(src) for src, _ in groups[g])
                    raise MkaInputError(
                        f"{path}.layers[{j}]: a collapse needs untouched layers, but layer "
                        f"{step.layers[j]} was already merged (with layers {srcs})"
                    )
            merged = [(layer, w) for layer, w in zip(step.layers, step.weights, strict=True)]
        else:
            weight_of = dict(zip(positions, step.weights, strict=True))
            merged = [(src, w * weight_of[g]) for g in range(lo, hi + 1) for src, w in groups[g]]
            for (a, _), (b, _) in zip(merged, merged[1:]):
                if b != a + 1:  # a dropped layer lies between: sources must stay consecutive
                    raise MkaInputError(
                        f"{path}.layers: merge of {', '.join(map(str, step.layers))} would span "
                        f"layer {a + 1}, dropped by steps[{dropped[a + 1]}]; sources of one "
                        f"output layer must be consecutive layers"
                    )
        groups = groups[:lo] + [merged] + groups[hi + 1 :]
    return groups
