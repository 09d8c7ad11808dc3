"""One registry of methods: every planner is registered once, with its name, one-line help, the
paper or code it comes from, what it does, the options it takes and what it needs. The command
line's `--planner` choices and help, `compare`'s specs and the app's lists are read from here, so
adding a planner is one new file under `planners/` that calls `register` (and its import in
`planners/__init__`).

`Registry` is generic: later merge modes and compensations get a registry of their own records
the same way (`Registry("merge mode")`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from mka_core.errors import MkaInputError

T = TypeVar("T")

DOES = ("merge", "drop", "collapse")  # what a planner's steps do to the layers (plan step ops)


class Registry(Generic[T]):
    """Named records (anything with a `name`), in registration order."""

    def __init__(self, kind: str):
        self.kind = kind  # "planner": how error messages name a record
        self._items: dict[str, T] = {}

    def register(self, item: T) -> T:
        name = getattr(item, "name", None)
        if not isinstance(name, str) or not name or ":" in name or "," in name:
            raise MkaInputError(
                f"{self.kind} name: expected a non-empty string without ':' or ',', got {name!r}"
            )
        if name in self._items:
            raise MkaInputError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def unregister(self, name: str) -> T:
        """Remove a record (a test's or a plugin's); returns it."""
        return self._items.pop(self.get(name).name)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise MkaInputError(
                f"unknown {self.kind} {name!r}; expected one of {', '.join(self._items)}"
            ) from None

    def names(self, where: Callable[[T], bool] | None = None) -> tuple[str, ...]:
        return tuple(n for n, item in self._items.items() if where is None or where(item))

    def __iter__(self) -> Iterator[T]:
        return iter(tuple(self._items.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True, eq=False)
class Planner:
    """A planner: how it is named and described, what it takes and needs, and its function.

    `run` gets a `settings.PlanJob` (the model, the analysis, the PlanSettings and the budget in
    layers) and returns a `settings.Planned` (steps and what chose them)."""

    name: str
    help: str  # one line: the CLI's --help, the app's lists
    source: str  # the paper or code it comes from
    does: tuple[str, ...]  # of DOES: what its steps do
    run: Callable[..., Any]  # (PlanJob) -> Planned
    alpha_rules: tuple[str, ...] = ()  # the α rules its merges take (none: it sets its weights)
    npib_kinds: tuple[str, ...] = ()  # the NPIB kinds it ranks by (none: it does not read NPIB)
    # compare's `name:option` specs: option -> the PlanSettings fields it sets
    spec_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    reads: str | None = None  # the analysis' measure it ranks layers by (needs the analysis)
    needs_batch: bool = False  # scores candidates on calibration data (loss_samples of them)
    # greedy: its plan for b layers is the first b steps of its plan for more, so compare plans
    # once at the largest budget
    greedy_prefix: bool = False
    # what its search scores when the plan is built with (merge mode, compensation); None: the
    # same steps however they are built. Compare plans it once per distinct answer.
    scored: Callable[[str, str], str] | None = None
    takes_picks: bool = False  # plans the user's picks instead of a budget
    in_compare_default: bool = True  # one of compare's default planners

    def __post_init__(self):
        for key in ("help", "source"):
            text = getattr(self, key)
            if not isinstance(text, str) or not text or "\n" in text:
                raise MkaInputError(f"planner {self.name!r}: {key} must be one line of text")
        if not self.does or any(d not in DOES for d in self.does):
            raise MkaInputError(
                f"planner {self.name!r}: does must name some of {', '.join(DOES)}, got {self.does}"
            )
        if not callable(self.run):
            raise MkaInputError(f"planner {self.name!r}: run must be a function")
        object.__setattr__(
            self,
            "spec_options",
            MappingProxyType({k: MappingProxyType(dict(v)) for k, v in self.spec_options.items()}),
        )

    @property
    def needs_analysis(self) -> bool:
        return self.reads is not None


PLANNERS: Registry[Planner] = Registry("planner")

register = PLANNERS.register
unregister = PLANNERS.unregister
get = PLANNERS.get
names = PLANNERS.names


def budget_names() -> tuple[str, ...]:
    """The planners that plan to a budget: the app's list and compare's specs."""
    return names(lambda p: not p.takes_picks)
