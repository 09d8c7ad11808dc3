"""The workspace on disk that the app resumes from: names, state, the analysis, the plan."""

import json

import numpy as np
import pytest

from mka_core.errors import MkaInputError
from mka_core.workflows import workspace as W


@pytest.fixture()
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("MKA_STUDIO_WORKSPACES", str(tmp_path / "ws"))
    return tmp_path / "ws"


def test_names_made_in_the_same_second_differ(root):
    names = [W.new_name() for _ in range(5)]
    assert len(set(names)) == 5
    assert all((root / n).is_dir() for n in names)


@pytest.mark.parametrize("bad", ["", "a b", "../up", "x" * 65, "é"])
def test_bad_names_are_refused(root, bad):
    with pytest.raises(MkaInputError):
        W.Workspace(bad, create=True)


def test_an_unknown_or_broken_workspace_is_one_error(root):
    with pytest.raises(MkaInputError, match="no workspace named"):
        W.Workspace("nothing-here")
    ws = W.Workspace(W.new_name(), create=True)
    (ws.path / "state.json").write_text("{not json")
    with pytest.raises(MkaInputError, match="unreadable"):
        ws.load_state()
    (ws.path / "state.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(MkaInputError, match="not an"):
        ws.load_state()


def test_state_round_trip_and_listing(root):
    a = W.Workspace(W.new_name(), create=True)
    a.save_state({"model": {"source": "tiny:llama"}, "history": [{"run": 1}]})
    b = W.Workspace(W.new_name(), create=True)
    state = W.Workspace(a.name).load_state()
    assert state["model"]["source"] == "tiny:llama" and state["name"] == a.name
    listed = {w["name"]: w for w in W.list_workspaces()}
    assert set(listed) == {a.name, b.name}
    assert listed[a.name]["runs"] == 1 and listed[a.name]["model"] == "tiny:llama"
    b.delete()
    assert [w["name"] for w in W.list_workspaces()] == [a.name]


def test_analysis_and_plan_round_trip(root, tiny):
    from mka_core.workflows.pipeline import analyze, make_budget_plan

    analysis = analyze(tiny, n_samples=32, max_tokens=16, batch_size=16)
    plan = make_budget_plan(tiny, analysis, "shortgpt", n_remove=2)
    ws = W.Workspace(W.new_name(), create=True)
    ws.save_analysis(analysis)
    ws.save_plan(plan)
    again = W.Workspace(ws.name)
    restored = again.load_analysis(tiny)
    np.testing.assert_array_equal(restored.activations.states, analysis.activations.states)
    assert set(restored.similarity.matrices) == set(analysis.similarity.matrices)
    for name, matrix in analysis.similarity.matrices.items():
        np.testing.assert_allclose(restored.similarity.matrices[name], matrix)
    np.testing.assert_allclose(restored.similarity.bi, analysis.similarity.bi)
    assert again.load_plan() == plan
    ws.save_plan(None)
    assert again.load_plan() is None
