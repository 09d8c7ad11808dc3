"""Plans: the composition algebra, JSON round trips, and an error naming the field for every
malformed plan."""

import copy
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mka_core.compression.plan import (
    ModelRef,
    Plan,
    Step,
    check_fingerprint,
    compose,
    layers_to_remove,
    make_plan,
    protected_layers,
)
from mka_core.errors import MkaInputError

REF6 = ModelRef("tiny:llama", "LlamaForCausalLM", 6, "abc123")


def plan_of(*steps, ref=REF6):
    return make_plan(ref, steps, {"planner": "manual", "params": {"note": "test"}})


# ---------------------------------------------------------------------------------------------
# composition algebra


def test_identity_composition():
    assert compose(4, []) == [[(0, 1.0)], [(1, 1.0)], [(2, 1.0)], [(3, 1.0)]]
    p = Plan.identity(REF6)
    assert p.n_layers_out == 6 and p.n_removed == 0 and p.compression_ratio == 0.0
    assert p.layers == [[(i, 1.0)] for i in range(6)]


def test_chained_merge_follows_the_spec_rule():
    a1, a2 = 0.7, 0.4
    layers = compose(6, [Step.merge((2, 3), (a1, 1 - a1)), Step.merge((2, 4), (a2, 1 - a2))])
    assert [i for i, _ in layers[2]] == [2, 3, 4]
    assert [w for _, w in layers[2]] == pytest.approx([a2 * a1, a2 * (1 - a1), 1 - a2])
    assert len(layers) == 4 and layers[3] == [(5, 1.0)]


def test_any_member_names_its_group_and_order_of_listing_follows_weights():
    # 3 is inside the merged group (2, 3): naming it or 2 is the same
    first = Step.merge((2, 3), (0.5, 0.5))
    by_2 = compose(6, [first, Step.merge((2, 4), (0.25, 0.75))])
    by_3 = compose(6, [first, Step.merge((3, 4), (0.25, 0.75))])
    reversed_listing = compose(6, [first, Step.merge((4, 3), (0.75, 0.25))])
    assert by_2 == by_3 == reversed_listing
    assert by_2[2] == [(2, 0.125), (3, 0.125), (4, 0.75)]


def test_merge_across_a_dropped_layer_is_refused():
    with pytest.raises(
        MkaInputError, match=r"steps\[1\]\.layers: merge of 0, 2 would span layer 1"
    ):
        compose(4, [Step.drop((1,)), Step.merge((0, 2), (0.5, 0.5))])


def test_merge_with_the_group_below():
    layers = compose(6, [Step.merge((3, 4), (0.5, 0.5)), Step.merge((2, 3), (0.2, 0.8))])
    assert layers[2] == [(2, 0.2), (3, 0.4), (4, 0.4)]


def test_drop_and_counts():
    p = plan_of(Step.drop((1,)), Step.merge((3, 4), (0.9, 0.1)), Step.drop((5,)))
    assert p.layers == [[(0, 1.0)], [(2, 1.0)], [(3, 0.9), (4, pytest.approx(0.1))]]
    assert p.n_layers_out == 3 and p.n_removed == 3 and p.compression_ratio == 0.5


def test_dropping_a_merged_group_removes_all_its_sources():
    layers = compose(6, [Step.merge((1, 2), (0.5, 0.5)), Step.drop((2,))])
    assert [g[0][0] for g in layers] == [0, 3, 4, 5]
    with pytest.raises(
        MkaInputError, match=r"steps\[2\]\.layers\[0\]: layer 1 was already dropped"
    ):
        compose(6, [Step.merge((1, 2), (0.5, 0.5)), Step.drop((2,)), Step.drop((1,))])


def test_compression_ratio_is_removed_over_original():
    ref = ModelRef("x", "LlamaForCausalLM", 32, "")
    p = plan_of(Step.drop(tuple(range(10, 24))), ref=ref)  # 14 of 32, the paper's example
    assert p.compression_ratio == pytest.approx(0.4375)
    assert layers_to_remove(32, ratio=0.4375) == 14


def test_collapse_weights_are_laco():
    step = Step.collapse((2, 3, 4))
    assert step.weights == (-1.0, 1.0, 1.0)  # θ_2 + (θ_3 − θ_2) + (θ_4 − θ_2)
    layers = compose(6, [step])
    assert layers[2] == [(2, -1.0), (3, 1.0), (4, 1.0)] and len(layers) == 4
    assert Step.collapse((0, 1)).weights == (0.0, 1.0)


def test_collapse_errors():
    with pytest.raises(MkaInputError, match=r"steps\[1\]\.layers\[1\]: a collapse needs untouched"):
        compose(6, [Step.merge((2, 3), (0.5, 0.5)), Step.collapse((1, 2))])
    with pytest.raises(MkaInputError, match=r"step\.layers\[1\]: a collapse takes consecutive"):
        Step("collapse", (2, 4), (0.0, 1.0))
    with pytest.raises(MkaInputError, match=r"step\.weights: a collapse of 3 layers has weights"):
        Step("collapse", (2, 3, 4), (0.2, 0.4, 0.4))
    with pytest.raises(MkaInputError, match=r"step\.weights: missing"):
        Step("collapse", (2, 3))


def test_compose_errors_name_the_step():
    cases = [
        ([Step.merge((4, 6), (0.5, 0.5))], r"steps\[0\]\.layers\[1\]: layer 6 is out of range"),
        (
            [Step.merge((1, 3), (0.5, 0.5))],
            r"steps\[0\]\.layers: merge of non-adjacent layers 1, 3",
        ),
        (
            [Step.merge((1, 2), (0.5, 0.5)), Step.merge((1, 2), (0.5, 0.5))],
            r"steps\[1\]\.layers\[1\]: layer 2 is already part of the same output layer as layer 1",
        ),
        ([Step.drop(tuple(range(6)))], r"steps\[0\]: dropping these layers would leave no layers"),
        ([Step.drop((0,)), Step.drop((-1,))], r"steps\[1\]\.layers\[0\]: layer -1 is out of range"),
    ]
    for steps, pattern in cases:
        with pytest.raises(MkaInputError, match=pattern):
            compose(6, steps)
    with pytest.raises(MkaInputError, match="num_layers"):
        compose(0, [])
    with pytest.raises(MkaInputError, match=r"steps\[0\]: expected a Step"):
        compose(3, [{"op": "drop", "layers": [1]}])


def test_step_field_errors():
    cases = [
        (dict(op="fuse", layers=(1, 2)), r"step\.op: unknown op string 'fuse'"),
        (dict(op="merge", layers=(1,), weights=(1.0,)), r"step\.layers: a merge needs at least 2"),
        (dict(op="merge", layers=(1, 2)), r"step\.weights: missing"),
        (dict(op="merge", layers=(1, 2), weights=(0.5,)), r"step\.weights: 1 weights for 2 layers"),
        (dict(op="merge", layers=(1, 2), weights=(1.2, -0.2)), r"step\.weights\[1\]: .*>= 0"),
        (dict(op="merge", layers=(1, 2), weights=(0.5, 0.6)), r"step\.weights: .*sum to 1\.1"),
        (dict(op="drop", layers=(1,), weights=(1.0,)), r"step\.weights: a drop takes no weights"),
        (dict(op="drop", layers=(1, 1)), r"step\.layers\[1\]: layer 1 is repeated"),
        (dict(op="drop", layers=(True,)), r"step\.layers\[0\]: expected an integer.*boolean true"),
        (dict(op="drop", layers=(1.0,)), r"step\.layers\[0\]: expected an integer.*number 1\.0"),
        (dict(op="drop", layers=()), r"step\.layers: a drop needs at least 1 layer"),
        (dict(op="drop", layers=(1,), score=math.nan), r"step\.score: expected a finite number"),
    ]
    for kw, pattern in cases:
        with pytest.raises(MkaInputError, match=pattern):
            Step(**kw)


# ---------------------------------------------------------------------------------------------
# property-based: whatever valid steps a planner takes, the composition obeys the plan rules (README, "How it works")


@st.composite
def step_sequences(draw):
    n = draw(st.integers(2, 12))
    steps: list[Step] = []
    for _ in range(draw(st.integers(0, 8))):
        groups = compose(n, steps)
        if len(groups) < 2:
            break
        op = draw(st.sampled_from(["merge", "drop", "collapse"]))
        if op == "drop":
            k = draw(st.integers(1, len(groups) - 1))
            picks = draw(st.permutations(range(len(groups))))[:k]
            steps.append(Step.drop([draw(st.sampled_from(groups[g]))[0] for g in picks]))
        elif op == "merge":
            k = draw(st.integers(2, min(4, len(groups))))
            # only runs of output layers whose sources are consecutive originals (no drop between)
            starts = [
                lo
                for lo in range(len(groups) - k + 1)
                if all(groups[g + 1][0][0] == groups[g][-1][0] + 1 for g in range(lo, lo + k - 1))
            ]
            if not starts:
                continue
            lo = draw(st.sampled_from(starts))
            names = [draw(st.sampled_from(groups[g]))[0] for g in range(lo, lo + k)]
            raw = [draw(st.floats(0.0, 1.0)) for _ in range(k)]
            total = sum(raw)
            weights = [x / total for x in raw] if total > 0 else [1.0 / k] * k
            weights[-1] = 1.0 - math.fsum(weights[:-1])
            if weights[-1] < 0:
                weights[-1] = 0.0
            steps.append(Step.merge(names, weights))
        else:
            singles = [g[0][0] for g in groups if len(g) == 1]
            runs = [i for i in singles if i + 1 in singles]
            if runs:
                start = draw(st.sampled_from(runs))
                length = 2
                while start + length in singles and draw(st.booleans()):
                    length += 1
                steps.append(Step.collapse(range(start, start + length)))
    return n, steps


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(step_sequences())
def test_derived_composition_is_always_valid(case):
    n, steps = case
    layers = compose(n, steps)
    seen = [i for g in layers for i, _ in g]
    assert len(seen) == len(set(seen))  # each original at most once
    assert seen == sorted(seen)  # output layers keep the original order
    for g in layers:
        idx = [i for i, _ in g]
        assert idx == list(range(idx[0], idx[0] + len(idx)))  # consecutive sources
        assert math.fsum(w for _, w in g) == pytest.approx(1.0, abs=1e-6)
    has_collapse = any(s.op == "collapse" for s in steps)
    if not has_collapse:
        assert all(w >= 0 for g in layers for _, w in g)
    # and the plan made of them round-trips through JSON unchanged
    ref = ModelRef("x", "LlamaForCausalLM", n, "f")
    plan = make_plan(ref, steps, {"planner": "fuzz"})
    back = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back == plan and back.layers == layers


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 8),
    st.lists(
        st.fixed_dictionaries(
            {
                "op": st.sampled_from(["merge", "drop", "collapse", "x"]),
                "layers": st.lists(st.integers(-1, 8), max_size=4),
                "weights": st.none() | st.lists(st.floats(-0.5, 1.5), max_size=4),
            }
        ),
        max_size=5,
    ),
)
def test_random_steps_either_compose_validly_or_fail_with_our_error(n, raw):
    try:
        steps = [Step.from_dict(s, f"steps[{i}]") for i, s in enumerate(raw)]
        layers = compose(n, steps)
    except MkaInputError as e:
        assert "\n" not in str(e) and str(e).startswith(("steps[", "step"))
        return
    seen = [i for g in layers for i, _ in g]
    assert seen == sorted(set(seen)) and all(0 <= i < n for i in seen)
    assert all(math.fsum(w for _, w in g) == pytest.approx(1.0, abs=1e-5) for g in layers)


# ---------------------------------------------------------------------------------------------
# JSON


def sample_plan():
    return plan_of(
        Step.merge((2, 3), (0.93, 0.07), score=0.97),
        Step.collapse((4, 5)),
        Step.drop((1,), score=0.1),
    )


def test_to_dict_key_order_and_content():
    d = sample_plan().to_dict()
    assert list(d) == [
        "format",
        "version",
        "model",
        "method",
        "steps",
        "layers",
        "created_by",
        "created_at",
    ]
    assert d["format"] == "mka-plan" and d["version"] == 1
    assert d["model"] == {
        "source": "tiny:llama",
        "architecture": "LlamaForCausalLM",
        "num_layers": 6,
        "fingerprint": "abc123",
    }
    assert d["steps"][0] == {
        "op": "merge",
        "layers": [2, 3],
        "weights": [0.93, 0.07],
        "score": 0.97,
    }
    assert d["steps"][2] == {"op": "drop", "layers": [1], "score": 0.1}
    assert d["layers"] == [
        {"sources": [[0, 1.0]]},
        {"sources": [[2, 0.93], [3, 0.07]]},
        {"sources": [[4, 0.0], [5, 1.0]]},
    ]
    assert d["created_by"].startswith("mka-studio ")


def test_round_trip_dict_and_file(tmp_path):
    p = sample_plan()
    assert Plan.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    path = p.save(tmp_path / "sub" / "plan.json")
    assert [f.name for f in path.parent.iterdir()] == ["plan.json"]  # no temp file left
    back = Plan.load(path)
    assert back == p and back.layers == p.layers and back.method == p.method
    text = path.read_text()
    assert json.loads(text) == p.to_dict()
    assert list(json.loads(text)) == list(p.to_dict())
    assert '"sources": [[2, 0.93], [3, 0.07]]' in text  # compact pairs, readable
    # saving does not share mutable state with the plan
    d = p.to_dict()
    d["method"]["params"]["note"] = "changed"
    assert p.method["params"]["note"] == "test"


def test_round_trip_with_weights_at_the_tolerance():
    w = (0.5, 0.5 + 9e-7)  # sums to 1 within 1e-6; chained, the error grows
    p = plan_of(Step.merge((0, 1), w), Step.merge((0, 2), w), Step.merge((0, 3), w))
    assert math.fsum(x for _, x in p.layers[0]) > 1 + 1e-6
    assert Plan.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_load_errors(tmp_path):
    with pytest.raises(MkaInputError, match="plan file not found"):
        Plan.load(tmp_path / "nope.json")
    with pytest.raises(MkaInputError, match="is a folder"):
        Plan.load(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(MkaInputError, match=r"not valid JSON \(line 1, column 2"):
        Plan.load(bad)
    d = sample_plan().to_dict()
    d["steps"][0]["layers"][1] = 9
    bad.write_text(json.dumps(d))
    with pytest.raises(MkaInputError, match=r"^bad\.json: steps\[0\]\.layers\[1\]: layer 9"):
        Plan.load(bad)


def _set(path, value):
    """A mutation of the sample plan's dict: set (or with value=DELETE, remove) one field."""

    def mutate(d):
        *parents, last = path
        target = d
        for key in parents:
            target = target[key]
        if value is DELETE:
            del target[last]
        else:
            target[last] = value

    return mutate


DELETE = object()


def _dup_layers(d):
    d["layers"][1]["sources"] = [[2, 0.5], [2, 0.5]]


def _fewer_layers(d):
    d["layers"].pop()


MALFORMED = [
    (_set(["format"], DELETE), r"^format: missing"),
    (_set(["format"], "mergekit"), r"^format: string 'mergekit' is not an MKA Studio plan file"),
    (_set(["version"], DELETE), r"^version: missing"),
    (_set(["version"], 3), r"^version: unsupported version number 3"),
    (_set(["version"], 2), r"^refine: missing"),
    (_set(["version"], True), r"^version: unsupported version boolean true"),
    (_set(["extra"], 1), r"^unknown field 'extra' in the plan"),
    (_set(["model"], DELETE), r"^model: missing"),
    (_set(["model"], "tiny"), r"^model: expected a JSON object, got string"),
    (_set(["model", "num_layers"], "6"), r"^model\.num_layers: expected an integer, got string"),
    (_set(["model", "num_layers"], True), r"^model\.num_layers: expected an integer, got boolean"),
    (_set(["model", "num_layers"], 0), r"^model\.num_layers: expected at least 1 layer"),
    (_set(["model", "source"], None), r"^model\.source: expected a string, got null"),
    (_set(["model", "fingerprint"], DELETE), r"^model\.fingerprint: missing"),
    (_set(["model", "colour"], "red"), r"^model: unknown field 'colour'"),
    (_set(["method"], [1]), r"^method: expected a JSON object, got a list"),
    (_set(["method", "planner"], 3), r"^method\.planner: expected a string, got number 3"),
    (_set(["steps"], {}), r"^steps: expected a list of steps, got an object"),
    (_set(["steps", 0], "merge"), r"^steps\[0\]: expected a JSON object"),
    (_set(["steps", 0, "op"], "fuse"), r"^steps\[0\]\.op: unknown op string 'fuse'"),
    (_set(["steps", 0, "op"], DELETE), r"^steps\[0\]\.op: missing"),
    (_set(["steps", 0, "alpha"], 0.5), r"^steps\[0\]: unknown field 'alpha'"),
    (_set(["steps", 0, "layers"], "2,3"), r"^steps\[0\]\.layers: expected a list"),
    (_set(["steps", 0, "layers", 1], True), r"^steps\[0\]\.layers\[1\]: expected an integer"),
    (_set(["steps", 0, "layers", 1], 3.0), r"^steps\[0\]\.layers\[1\]: expected an integer"),
    (_set(["steps", 0, "layers", 1], 6), r"^steps\[0\]\.layers\[1\]: layer 6 is out of range"),
    (_set(["steps", 0, "layers", 1], 2), r"^steps\[0\]\.layers\[1\]: layer 2 is repeated"),
    (_set(["steps", 0, "layers"], [1, 3]), r"^steps\[0\]\.layers: merge of non-adjacent"),
    (_set(["steps", 0, "weights"], [1.07, -0.07]), r"^steps\[0\]\.weights\[1\]: .* >= 0"),
    (_set(["steps", 0, "weights"], [0.5, 0.6]), r"^steps\[0\]\.weights: .*sum to 1\.1"),
    (_set(["steps", 0, "weights"], [1.0]), r"^steps\[0\]\.weights: 1 weights for 2 layers"),
    (_set(["steps", 0, "weights"], ["a", 1]), r"^steps\[0\]\.weights\[0\]: expected a number"),
    (_set(["steps", 0, "weights"], None), r"^steps\[0\]\.weights: missing"),
    (_set(["steps", 0, "score"], "high"), r"^steps\[0\]\.score: expected a number"),
    (_set(["steps", 1, "weights"], [0.5, 0.5]), r"^steps\[1\]\.weights: a collapse of 2 layers"),
    (_set(["steps", 2, "weights"], [1.0]), r"^steps\[2\]\.weights: a drop takes no weights"),
    (_set(["steps", 2, "layers"], [2, 3]), r"^steps\[2\]\.layers\[1\]: layer 3 is already part"),
    (_set(["layers"], DELETE), r"^layers: missing"),
    (_set(["layers"], {}), r"^layers: expected a list of output layers"),
    (_set(["layers", 1], [[2, 0.93]]), r"^layers\[1\]: expected a JSON object"),
    (_set(["layers", 1, "sources"], []), r"^layers\[1\]\.sources: empty"),
    (_set(["layers", 1, "sources", 0], [2]), r"^layers\[1\]\.sources\[0\]: expected a \[layer"),
    (_set(["layers", 1, "sources", 0, 0], "2"), r"^layers\[1\]\.sources\[0\]\[0\]: expected an"),
    (_set(["layers", 1, "sources", 0, 1], None), r"^layers\[1\]\.sources\[0\]\[1\]: expected a"),
    (_set(["layers", 1, "sources", 0, 0], 7), r"^layers\[1\]\.sources\[0\]\[0\]: layer 7 is out"),
    (_dup_layers, r"^layers\[1\]\.sources\[1\]\[0\]: layer 2 is repeated \(also in layers\[1\]"),
    (
        _set(["layers", 1, "sources"], [[2, 0.5], [4, 0.5]]),
        r"^layers\[1\]\.sources\[1\]\[0\]: sources of one output layer must be consecutive",
    ),
    (
        _set(["layers", 0, "sources"], [[3, 1.0]]),
        r"^layers\[1\]\.sources\[0\]\[0\]: output layers must keep the original order",
    ),
    (_set(["layers", 1, "sources", 1, 1], 0.08), r"^layers\[1\]\.sources: weights sum to 1\.01"),
    (
        _set(["layers", 1, "sources"], [[2, 0.5], [3, 0.5]]),
        r"^layers\[1\]\.sources: \[\[2, 0\.5\], \[3, 0\.5\]\] differ from what the steps derive",
    ),
    (_fewer_layers, r"^layers: 2 output layers, but the steps derive 3"),
    (
        _set(["model", "num_layers"], 7),
        r"^layers: 3 output layers, but the steps derive 4 from mod",
    ),
    (_set(["created_by"], 1), r"^created_by: expected a string, got number 1"),
    (_set(["created_at"], "yesterday"), r"^created_at: 'yesterday' is not an ISO 8601 time"),
]


@pytest.mark.parametrize("mutate, pattern", MALFORMED, ids=[p for _, p in MALFORMED])
def test_malformed_plan_errors_name_the_field(mutate, pattern):
    d = copy.deepcopy(sample_plan().to_dict())
    mutate(d)
    with pytest.raises(MkaInputError, match=pattern) as info:
        Plan.from_dict(d)
    assert "\n" not in str(info.value)


def test_from_dict_rejects_non_objects():
    for value, kind in ((None, "null"), ([1], "a list"), ("plan", "string")):
        with pytest.raises(MkaInputError, match=f"^plan: expected a JSON object, got {kind}"):
            Plan.from_dict(value)


def test_created_at_accepts_z_suffix():
    d = sample_plan().to_dict()
    d["created_at"] = "2024-06-01T12:00:00Z"
    assert Plan.from_dict(d).created_at == "2024-06-01T12:00:00Z"


# ---------------------------------------------------------------------------------------------
# models, budgets


def test_model_ref_and_fingerprint_check(tiny, tiny_copy):
    ref = ModelRef.from_loaded(tiny)
    assert ref == ModelRef("tiny:llama", "LlamaForCausalLM", 6, tiny.fingerprint)
    assert ModelRef.from_loaded(tiny.model).fingerprint == tiny.fingerprint
    plan = Plan.identity(ref)
    assert check_fingerprint(plan, tiny) is None
    with __import__("torch").no_grad():
        tiny_copy.model.model.layers[0].self_attn.q_proj.weight.mul_(2)
    msg = check_fingerprint(plan, tiny_copy.model)
    assert msg and "differs from the plan's" in msg and tiny.fingerprint in msg
    other = Plan.identity(ModelRef("big", "LlamaForCausalLM", 30, "x"))
    assert check_fingerprint(other, tiny) == (
        "the plan was made for a 30-layer model (big), this model has 6 layers"
    )


def test_make_plan_accepts_step_dicts(tiny):
    p = make_plan(tiny, [{"op": "drop", "layers": [2]}], {"planner": "manual"})
    assert p.steps == (Step.drop((2,)),) and p.model.num_layers == 6
    assert p.created_at.endswith("+00:00")
    with pytest.raises(MkaInputError, match=r"steps\[0\]\.op: missing"):
        make_plan(tiny, [{"layers": [2]}], {"planner": "manual"})


def test_plan_constructor_validates():
    with pytest.raises(MkaInputError, match="method: must be plain JSON data"):
        make_plan(REF6, [], {"planner": "x", "f": object()})
    with pytest.raises(MkaInputError, match="model: expected a ModelRef"):
        Plan("tiny", {}, (), "a", "b")


def test_layers_to_remove():
    assert layers_to_remove(6, target_layers=4) == 2
    assert layers_to_remove(6, remove=3) == 3
    assert layers_to_remove(30, ratio=0.25) == 8  # 7.5 rounds to nearest, up
    assert layers_to_remove(30, ratio=0.0) == 0
    assert layers_to_remove(6, remove=4, protect_first=False) == 4
    cases = [
        (dict(), "give exactly one of target_layers, ratio or remove"),
        (dict(ratio=0.5, remove=1), r"got ratio, remove"),
        (dict(remove=4), "removing 4 of 6 layers leaves nothing but the 2 protected"),
        (dict(target_layers=2), "removing 4 of 6"),
        (dict(remove=-1), "negative"),
        (dict(ratio=1.0), r"ratio: expected removed/original in \[0, 1\)"),
        (dict(target_layers=7), r"target_layers: expected 1\.\.6"),
        (dict(remove=True), "remove: expected an integer, got boolean"),
    ]
    for kw, pattern in cases:
        with pytest.raises(MkaInputError, match=pattern):
            layers_to_remove(6, **kw)


def test_protected_layers():
    assert protected_layers(6) == {0, 5}
    assert protected_layers(6, protect_first=False) == {5}
    assert protected_layers(6, False, False) == set()
    assert protected_layers(1) == {0}
