"""Plans: what each layer of a compressed model is made of, as inert, validated data.

A plan holds *steps* (what a planner or the user did, in order, on original layer indices) and
derives from them the *composition*: the ordered output layers, each a list of
``(original layer index, weight)``. The composition is what ``merge.apply_plan`` builds; the steps
are what a reader edits. Nothing here touches weights.

Step semantics, applied in order to the identity composition ``[[(i, 1.0)] for i in range(n)]``;
every index names the *current output layer* that holds that original layer:

- ``merge``: 2+ indices naming distinct, adjacent output layers, one weight each (>= 0, sum 1). The
  merged layer's sources are the union, each source's weight times its group's weight, so merging
  (a, b) with (α₁, 1−α₁) and then (a, c) with (α₂, 1−α₂) gives (α₂α₁, α₂(1−α₁), 1−α₂).
- ``drop``: 1+ indices; each named output layer is removed.
- ``collapse`` (LaCo, Yang et al. 2024): consecutive untouched layers l, l+1, …, l+m become
  ``θ_l + Σ_k (θ_{l+k} − θ_l)``, i.e. weights (1−m, 1, …, 1) on the original weights (the only way
  a composition gets negative weights). Its ``weights`` are derived, stored and checked.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mka_core import __version__
from mka_core.compression.refinement import Refine
from mka_core.compression.steps import (
    WEIGHT_TOL,
    Composition,
    Step,
    compose,
)
from mka_core.errors import MkaInputError
from mka_core.files import write_text_atomic as save_text_atomic
from mka_core.jsonfields import (
    dumps_compact,
    is_int,
    kind,
    want_int,
    want_list,
    want_number,
    want_object,
    want_str,
)
from mka_core.models.loading import model_fingerprint, n_layers_of

log = logging.getLogger(__name__)

FORMAT = "mka-plan"
VERSION = 2  # 2 adds "refine" (merge mode, compensation); a plan without one is written as 1
VERSIONS = (1, 2)


_PLAN_KEYS = ("format", "version", "model", "method", "steps", "layers", "created_by", "created_at")
_PLAN_KEYS_2 = (*_PLAN_KEYS, "refine")
_MODEL_KEYS = ("source", "architecture", "num_layers", "fingerprint")


# ---------------------------------------------------------------------------------------------
# steps and the composition they derive


# ---------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class ModelRef:
    """Which model a plan was made for; the fingerprint lets a loader warn on a different one."""

    source: str
    architecture: str
    num_layers: int
    fingerprint: str

    def __post_init__(self):
        want_str(self.source, "model.source")
        want_str(self.architecture, "model.architecture")
        want_str(self.fingerprint, "model.fingerprint")
        n = want_int(self.num_layers, "model.num_layers")
        if n < 1:
            raise MkaInputError(f"model.num_layers: expected at least 1 layer, got {n}")

    @classmethod
    def from_loaded(cls, loaded) -> ModelRef:
        """The reference of a models.LoadedModel (or of a bare causal-LM module)."""

        model = _unwrap(loaded)
        archs = getattr(model.config, "architectures", None) or [type(model).__name__]
        fingerprint = getattr(loaded, "fingerprint", None) or model_fingerprint(model)
        source = getattr(loaded, "source", None) or getattr(model.config, "_name_or_path", "")
        return cls(str(source), str(archs[0]), n_layers_of(model), str(fingerprint))

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "architecture": self.architecture,
            "num_layers": self.num_layers,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_dict(cls, d: Any, path: str = "model") -> ModelRef:
        d = want_object(d, path, _MODEL_KEYS, _MODEL_KEYS)
        n = want_int(d["num_layers"], f"{path}.num_layers")
        if n < 1:
            raise MkaInputError(f"{path}.num_layers: expected at least 1 layer, got {n}")
        return cls(
            want_str(d["source"], f"{path}.source"),
            want_str(d["architecture"], f"{path}.architecture"),
            n,
            want_str(d["fingerprint"], f"{path}.fingerprint"),
        )


def _unwrap(loaded):
    """The module inside a models.LoadedModel; a bare module as is."""
    return loaded.model if hasattr(loaded, "tokenizer") and hasattr(loaded, "model") else loaded


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _created_by() -> str:

    return f"mka-studio {__version__}"


@dataclass(frozen=True)
class Plan:
    """A model reference, how the plan was made, and its steps; the composition is derived."""

    model: ModelRef
    method: dict
    steps: tuple[Step, ...]
    created_by: str
    created_at: str
    refine: Refine = field(default_factory=Refine)  # merge mode and compensation
    _layers: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.model, ModelRef):
            raise MkaInputError(f"model: expected a ModelRef, got {type(self.model).__name__}")
        if not isinstance(self.method, dict):
            raise MkaInputError(f"method: expected a JSON object, got {kind(self.method)}")
        if "planner" in self.method and not isinstance(self.method["planner"], str):
            raise MkaInputError(
                f"method.planner: expected a string, got {kind(self.method['planner'])}"
            )
        try:
            json.dumps(self.method, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise MkaInputError(f"method: must be plain JSON data ({e})") from None
        want_str(self.created_by, "created_by")
        want_str(self.created_at, "created_at")
        if not isinstance(self.refine, Refine):
            raise MkaInputError(f"refine: expected a Refine, got {type(self.refine).__name__}")
        steps = tuple(self.steps)
        object.__setattr__(self, "steps", steps)
        layers = compose(self.model.num_layers, steps)
        object.__setattr__(self, "_layers", tuple(tuple(g) for g in layers))

    # -- derived views
    @property
    def layers(self) -> Composition:
        """Output layers in order, each ``[(original layer index, weight), ...]`` (a fresh copy)."""
        return [list(g) for g in self._layers]

    @property
    def n_layers_out(self) -> int:
        return len(self._layers)

    @property
    def n_removed(self) -> int:
        return self.model.num_layers - len(self._layers)

    @property
    def compression_ratio(self) -> float:
        """Layers removed / original layers (the paper's definition: 14 of 32 = 43.75 %)."""
        return self.n_removed / self.model.num_layers

    @classmethod
    def identity(cls, model_ref: ModelRef) -> Plan:
        """The plan that changes nothing (applies to a bit-exact copy)."""
        return cls(model_ref, {"planner": "identity"}, (), _created_by(), _now_iso())

    # -- JSON
    def to_dict(self) -> dict:
        d = {
            "format": FORMAT,
            "version": 1 if self.refine.is_default else VERSION,
            "model": self.model.to_dict(),
            "method": json.loads(json.dumps(self.method)),  # a deep, plain copy
            "steps": [s.to_dict() for s in self.steps],
            "layers": [{"sources": [[i, w] for i, w in g]} for g in self._layers],
            "created_by": self.created_by,
            "created_at": self.created_at,
        }
        if not self.refine.is_default:
            d["refine"] = self.refine.to_dict()
        return d

    def with_refine(self, refine: Refine) -> Plan:
        """The same plan, built with another merge mode or compensation."""
        return dataclasses.replace(self, refine=refine)

    @property
    def needs_data(self) -> bool:
        """Whether applying it needs calibration data (flattening or compensation)."""
        return self.refine.needs_data(self.layers)

    def to_json(self) -> str:
        return dumps_compact(self.to_dict()) + "\n"

    @classmethod
    def from_dict(cls, d: Any) -> Plan:
        """Validate a parsed plan file; errors name the field path (``steps[2].layers[1]``)."""
        if not isinstance(d, dict):
            raise MkaInputError(f"plan: expected a JSON object, got {kind(d)}")
        if "format" not in d:
            raise MkaInputError(
                f"format: missing; expected {FORMAT!r} (is this an MKA Studio plan file?)"
            )
        if d["format"] != FORMAT:
            raise MkaInputError(
                f"format: {kind(d['format'])} is not an MKA Studio plan file; expected {FORMAT!r}"
            )
        if "version" not in d:
            raise MkaInputError(f"version: missing; expected {VERSION}")
        if not is_int(d["version"]) or d["version"] not in VERSIONS:
            raise MkaInputError(
                f"version: unsupported version {kind(d['version'])}; this mka-studio reads "
                f"versions {' and '.join(map(str, VERSIONS))}"
            )
        v2 = d["version"] == 2
        want_object(
            d, "plan", _PLAN_KEYS_2 if v2 else _PLAN_KEYS, _PLAN_KEYS_2 if v2 else _PLAN_KEYS
        )
        refine = Refine.from_dict(d["refine"]) if v2 else Refine()
        model = ModelRef.from_dict(d["model"])
        method = d["method"]
        if not isinstance(method, dict):
            raise MkaInputError(f"method: expected a JSON object, got {kind(method)}")
        raw_steps = want_list(d["steps"], "steps", "a list of steps")
        steps = tuple(Step.from_dict(s, f"steps[{i}]") for i, s in enumerate(raw_steps))
        derived = compose(model.num_layers, steps)
        _check_layers(d["layers"], derived, model.num_layers)
        created_by = want_str(d["created_by"], "created_by")
        created_at = want_str(d["created_at"], "created_at")
        try:
            datetime.fromisoformat(created_at.replace("Z", "+00:00"))  # 3.10
        except ValueError:
            raise MkaInputError(
                f"created_at: {created_at!r} is not an ISO 8601 time (e.g. 2024-06-01T12:00:00Z)"
            ) from None
        return cls(model, method, steps, created_by, created_at, refine)

    def save(self, path: str | os.PathLike, overwrite: bool = True) -> Path:
        """Write the plan JSON atomically (temporary file in the same folder, then rename)."""

        return save_text_atomic(path, self.to_json(), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        p = Path(path).expanduser()
        if not p.exists():
            raise MkaInputError(f"plan file not found: {p}")
        if p.is_dir():
            raise MkaInputError(f"{p} is a folder; expected a plan JSON file")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise MkaInputError(f"{p} is not a text file; expected a plan JSON file") from None
        except json.JSONDecodeError as e:
            raise MkaInputError(
                f"{p} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
            ) from None
        except OSError as e:
            raise MkaInputError(f"cannot read plan file {p}: {e.strerror}") from None
        try:
            return cls.from_dict(d)
        except MkaInputError as e:
            raise MkaInputError(f"{p.name}: {e}") from None


def _check_layers(raw: Any, derived: Composition, num_layers: int) -> None:
    """The stored `layers` must be well formed and equal what the steps derive."""
    layers = want_list(raw, "layers", "a list of output layers")
    seen: dict[int, int] = {}
    last = -1
    for g, entry in enumerate(layers):
        gp = f"layers[{g}]"
        entry = want_object(entry, gp, ("sources",), ("sources",))
        sources = want_list(entry["sources"], f"{gp}.sources", "a list of [layer, weight] pairs")
        if not sources:
            raise MkaInputError(f"{gp}.sources: empty; an output layer needs at least one source")
        total = 0.0
        for k, pair in enumerate(sources):
            sp = f"{gp}.sources[{k}]"
            pair = want_list(pair, sp, "a [layer, weight] pair")
            if len(pair) != 2:
                raise MkaInputError(f"{sp}: expected a [layer, weight] pair, got {len(pair)} items")
            layer = want_int(pair[0], f"{sp}[0]", "an integer layer index")
            total += want_number(pair[1], f"{sp}[1]")
            if not 0 <= layer < num_layers:
                raise MkaInputError(
                    f"{sp}[0]: layer {layer} is out of range for a {num_layers}-layer model "
                    f"(0..{num_layers - 1})"
                )
            if layer in seen:
                raise MkaInputError(
                    f"{sp}[0]: layer {layer} is repeated (also in layers[{seen[layer]}])"
                )
            if k > 0 and layer != last + 1:
                raise MkaInputError(
                    f"{sp}[0]: sources of one output layer must be consecutive layers in order; "
                    f"{layer} follows {last}"
                )
            if k == 0 and layer <= last:
                raise MkaInputError(
                    f"{sp}[0]: output layers must keep the original order; layer {layer} comes "
                    f"after layer {last}"
                )
            seen[layer] = g
            last = layer
        # looser than a step's tolerance: chained merges multiply their rounding
        if abs(total - 1.0) > 1e-4:
            raise MkaInputError(f"{gp}.sources: weights sum to {total:.9g}, expected 1")

    if len(layers) != len(derived):
        raise MkaInputError(
            f"layers: {len(layers)} output layers, but the steps derive {len(derived)} from "
            f"model.num_layers={num_layers}"
        )
    for g, (entry, want) in enumerate(zip(layers, derived, strict=True)):
        got = [(int(i), float(w)) for i, w in entry["sources"]]
        same = len(got) == len(want) and all(
            i == j and abs(w - v) <= WEIGHT_TOL for (i, w), (j, v) in zip(got, want, strict=True)
        )
        if not same:
            raise MkaInputError(
                f"layers[{g}].sources: {[list(p) for p in got]} differ from what the steps derive, "
                f"{[[i, round(w, 9)] for i, w in want]}"
            )


# ---------------------------------------------------------------------------------------------
# building plans, checking models, budgets


def make_plan(
    source, steps: Iterable[Step | dict], method: dict, refine: Refine | None = None
) -> Plan:
    """A Plan for a LoadedModel (or ModelRef) from steps (Step objects or step dicts)."""
    ref = source if isinstance(source, ModelRef) else ModelRef.from_loaded(source)
    parsed = tuple(
        s if isinstance(s, Step) else Step.from_dict(s, f"steps[{i}]") for i, s in enumerate(steps)
    )
    return Plan(ref, dict(method), parsed, _created_by(), _now_iso(), refine or Refine())


def check_fingerprint(plan: Plan, loaded) -> str | None:
    """A warning when `loaded` (a LoadedModel or a module) is not the model the plan is for."""

    model = _unwrap(loaded)
    n = n_layers_of(model)
    ref = plan.model
    if n != ref.num_layers:
        return (
            f"the plan was made for a {ref.num_layers}-layer model ({ref.source}), "
            f"this model has {n} layers"
        )
    fingerprint = getattr(loaded, "fingerprint", None) or model_fingerprint(model)
    if ref.fingerprint and fingerprint != ref.fingerprint:
        return (
            f"model fingerprint {fingerprint} differs from the plan's {ref.fingerprint} "
            f"({ref.source}): the plan may have been made for a different model"
        )
    return None


def protected_layers(
    n_layers: int, protect_first: bool = True, protect_last: bool = True
) -> set[int]:
    """Layers a planner must leave alone: by default the first and the last."""
    n = want_int(n_layers, "n_layers")
    if n < 1:
        raise MkaInputError(f"n_layers: expected at least 1, got {n}")
    out = set()
    if protect_first:
        out.add(0)
    if protect_last:
        out.add(n - 1)
    return out


def layers_to_remove(
    n_layers: int,
    *,
    target_layers: int | None = None,
    ratio: float | None = None,
    remove: int | None = None,
    protect_first: bool = True,
    protect_last: bool = True,
) -> int:
    """How many layers a budget removes; exactly one of target_layers (layers kept), ratio
    (removed / original, rounded to the nearest layer) or remove (a count) must be given."""
    n = want_int(n_layers, "n_layers")
    if n < 1:
        raise MkaInputError(f"n_layers: expected at least 1, got {n}")
    given = [
        k
        for k, v in (("target_layers", target_layers), ("ratio", ratio), ("remove", remove))
        if v is not None
    ]
    if len(given) != 1:
        raise MkaInputError(
            f"budget: give exactly one of target_layers, ratio or remove (got "
            f"{', '.join(given) or 'none'})"
        )
    if target_layers is not None:
        t = want_int(target_layers, "target_layers")
        if not 1 <= t <= n:
            raise MkaInputError(f"target_layers: expected 1..{n} for a {n}-layer model, got {t}")
        r = n - t
    elif ratio is not None:
        x = want_number(ratio, "ratio")
        if not 0.0 <= x < 1.0:
            raise MkaInputError(f"ratio: expected removed/original in [0, 1), got {x}")
        r = math.floor(x * n + 0.5)
    else:
        r = want_int(remove, "remove")
    if r < 0:
        raise MkaInputError(f"budget: cannot remove a negative number of layers ({r})")
    n_protected = len(protected_layers(n, protect_first, protect_last))
    if r > 0 and r >= n - n_protected:
        raise MkaInputError(
            f"budget: removing {r} of {n} layers leaves nothing but the {n_protected} protected "
            f"layer(s); remove at most {max(n - n_protected - 1, 0)}"
        )
    return r
