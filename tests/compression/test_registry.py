"""One registry of planners: a planner defined and registered in one place (here, a test-only
one) is in the command line's choices, compare's specs and the app's list, and plan_layers runs
it; and the one settings object every caller passes (PlanSettings)."""

import contextlib
import json

import pytest

from mka_core.cli.main import build_parser, main
from mka_core.compression.plan import Step
from mka_core.compression.planners import (
    PLANNERS,
    Planned,
    Planner,
    PlanSettings,
    Registry,
    budget_names,
    names,
    plan_layers,
    register,
    unregister,
)
from mka_core.errors import MkaInputError
from mka_core.ui import plans as ui_plans
from mka_core.workflows.pipeline import analyze, make_budget_plan
from mka_core.workflows.sweep import Config, _Planned, default_specs, parse_planners

TOY = "toy-first"


def _plan_first(job) -> Planned:
    """Drop the lowest unprotected layers, one step each (greedy: prefixes are valid)."""
    free = [i for i in range(job.loaded.n_layers) if i not in job.protected]
    steps = [Step.drop([i], score=float(i)) for i in free[: job.n_remove]]
    return Planned(steps, "position", None, {"toy": True})


def _toy_planner(**kw) -> Planner:
    fields = dict(
        name=TOY,
        help="test only: drop the lowest unprotected layers",
        source="tests/compression/test_registry.py",
        does=("drop",),
        run=_plan_first,
        greedy_prefix=True,
    )
    return Planner(**{**fields, **kw})


@contextlib.contextmanager
def registered(planner: Planner):
    register(planner)
    try:
        yield planner
    finally:
        unregister(planner.name)


@pytest.fixture()
def toy():
    with registered(_toy_planner()) as planner:
        yield planner


@pytest.fixture(scope="module")
def analysis(tiny):
    return analyze(tiny, n_samples=32, max_tokens=32)


def test_a_registered_planner_is_in_every_list(toy):
    assert TOY in names() and TOY in budget_names()
    # the command line: --planner choices and help
    parser = build_parser()
    args = parser.parse_args(["plan", "--planner", TOY, "--layers-to-remove", "1"])
    assert args.planner == TOY
    plan_parser = parser._subparsers._group_actions[0].choices["plan"]
    assert f"{TOY}: {toy.help}" in " ".join(plan_parser.format_help().split())
    # compare's specs and defaults
    assert [tuple(p)[:2] for p in parse_planners(f"{TOY},mka:search")] == [
        (TOY, None),
        ("mka", "search"),
    ]
    assert TOY in default_specs().split(",")
    with pytest.raises(MkaInputError, match=f"{TOY} takes no option"):
        parse_planners(f"{TOY}:fast")
    # the app's planner list and help
    listed, _ = ui_plans.planners()
    assert listed[-1] == TOY and ui_plans.planner_help(TOY) == toy.help


def test_an_unregistered_planner_is_in_no_list():
    with registered(_toy_planner()):
        assert TOY in names()
    assert TOY not in names() and TOY not in ui_plans.planners()[0]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["plan", "--planner", TOY])
    with pytest.raises(MkaInputError, match=f"unknown planner '{TOY}'"):
        parse_planners(TOY)
    with pytest.raises(MkaInputError, match=f"unknown planner '{TOY}'; expected one of mka, "):
        PlanSettings(planner=TOY)


def test_plan_layers_runs_a_registered_planner(toy, tiny, analysis):
    plan = make_budget_plan(tiny, analysis, TOY, n_remove=2)
    assert [st.layers for st in plan.steps] == [(1,), (2,)]  # layer 0 is protected
    assert plan.method["planner"] == TOY and plan.method["similarity"] == "position"
    assert plan.method["params"]["n_remove"] == 2 and plan.method["params"]["toy"] is True
    # protection is the settings', not the planner's business
    plan = make_budget_plan(tiny, analysis, TOY, n_remove=1, protect_first=False)
    assert plan.steps[0].layers == (0,)
    # compare plans a greedy planner once and takes prefixes
    small, _ = _Planned(tiny, analysis).get(Config(TOY, None, 1), [1, 2])
    assert small.steps == make_budget_plan(tiny, analysis, TOY, n_remove=1).steps


def test_the_cli_plans_with_a_registered_planner(toy, tmp_path, capsys):
    out = tmp_path / "p.json"
    args = ["plan", "--model", "tiny:llama", "--quiet", "--samples", "24", "--tokens", "32"]
    assert main([*args, "--planner", TOY, "--layers-to-remove", "2", "--out", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["method"]["planner"] == TOY
    assert [s["layers"] for s in plan["steps"]] == [[1], [2]]
    assert json.loads(capsys.readouterr().out)["layers_removed"] == 2


def test_what_a_planner_needs_is_checked_before_it_runs(tiny, analysis):
    calls = []

    def run(job):
        calls.append(job)
        return Planned([], "none")

    needy = _toy_planner(run=run, reads="npib", needs_batch=True)
    with registered(needy):
        settings = PlanSettings(planner=TOY, n_remove=1)
        with pytest.raises(MkaInputError, match=f"planner {TOY} needs a similarity analysis"):
            plan_layers(tiny, None, analysis.batch, settings)
        with pytest.raises(MkaInputError, match=f"planner {TOY} needs calibration data"):
            plan_layers(tiny, analysis.similarity, None, settings)
        plan_layers(tiny, analysis.similarity, analysis.batch, settings.replace(loss_samples=5))
    (job,) = calls
    assert job.small.n_samples == 5 and job.n_remove == 1 and job.protected == {0, 5}


def test_registry_refuses_bad_records_and_names_the_known_ones():
    reg = Registry("merge mode")
    reg.register(_toy_planner(name="a"))
    with pytest.raises(MkaInputError, match="merge mode 'a' is already registered"):
        reg.register(_toy_planner(name="a"))
    with pytest.raises(MkaInputError, match=r"unknown merge mode 'b'; expected one of a$"):
        reg.get("b")
    with pytest.raises(MkaInputError, match="without ':'"):
        reg.register(_toy_planner(name="a:b"))
    with pytest.raises(MkaInputError, match="does must name some of merge, drop, collapse"):
        _toy_planner(does=("prune",))
    with pytest.raises(MkaInputError, match="help must be one line"):
        _toy_planner(help="two\nlines")
    assert [p.name for p in PLANNERS][:3] == ["mka", "mka-tail", "shortgpt"]  # the lists' order


def test_plan_settings_check_their_values_and_round_trip():
    s = PlanSettings(planner="mka", n_remove=3, alpha_rule="fixed", alpha=0.3, npib="bootstrap")
    assert PlanSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    picks = PlanSettings(planner="manual", picks=[{"op": "drop", "layers": [2]}])
    assert PlanSettings.from_dict(picks.to_dict()) == picks
    assert PlanSettings.of("sleb", ratio=0.25) == PlanSettings(planner="sleb", ratio=0.25)
    assert PlanSettings.of(s, n_remove=1).n_remove == 1 and s.n_remove == 3  # frozen
    for bad, match in [
        (dict(alpha_rule="fixed", alpha=1.5), "fixed alpha must be a number in"),
        (dict(alpha_rule="median"), "unknown alpha rule 'median'"),
        (dict(npib="triple"), "unknown NPIB kind 'triple'"),
        (dict(laco_layers=0), "laco: layers merged per collapse must be >= 1"),
        (dict(loss_samples=0), "loss_samples: expected at least 1"),
        (dict(recompute="yes"), "recompute: expected true or false"),
        (dict(n_remove=2.5), "n_remove: expected a number of layers"),
        (dict(picks=[{"op": "drop", "layers": [1]}]), "planner mka plans to a budget"),
        (dict(planner="manual"), "manual plan: pick at least one merge or drop"),
    ]:
        with pytest.raises(MkaInputError, match=match):
            PlanSettings(**bad)
    with pytest.raises(MkaInputError, match="unknown field 'budget'"):
        PlanSettings.from_dict({"planner": "mka", "budget": 3})
    with pytest.raises(MkaInputError, match="unknown field 'budget'"):
        s.replace(budget=3)
    with pytest.raises(MkaInputError, match="unknown field 'budget'"):
        PlanSettings.of("mka", budget=3)


def test_options_a_planner_does_not_take_are_ignored(tiny, analysis):
    plain = make_budget_plan(tiny, analysis, "shortgpt", n_remove=2)
    other = make_budget_plan(
        tiny, analysis, "shortgpt", n_remove=2, alpha_rule="search", npib="bootstrap"
    )
    assert other.steps == plain.steps and other.method["alpha"] is None
