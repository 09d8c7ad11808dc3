"""The Streamlit app through streamlit.testing.v1.AppTest: every page from a cold start, the happy
path on the tiny model, and bad inputs that must show a message in the page (never an exception).

Fast by design: the tiny random model, 16 samples × 32 tokens, a 512-token evaluation without
speed timing. Models and analyses are cached per process, so the sessions below share them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mka_core import ui

ROOT = Path(__file__).resolve().parents[2]
PAGES = {
    "home": "pages/0_Home.py",
    "model": "pages/1_Model.py",
    "similarity": "pages/2_Similarity.py",
    "manifold": "pages/3_Manifold.py",
    "plan": "pages/4_Plan.py",
    "results": "pages/5_Results.py",
    "transact": "pages/6_TransAct.py",
    "importance": "pages/7_Importance.py",
    "compare": "pages/8_Compare.py",
}
TIMEOUT = 120


def _app(page: str = "home"):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
    at.run()
    if page != "home":
        at.switch_page(PAGES[page]).run()
    return at


def _ok(at) -> None:
    """No uncaught exception in the page (an exception box is a bug, not a user error)."""
    assert not at.exception, [e.value for e in at.exception]


def _errors(at) -> list[str]:
    return [e.value for e in at.error if type(e).__name__ == "Error"]


def _warnings(at) -> list[str]:
    return [e.value for e in at.warning]


def _go(at, page: str):
    at.switch_page(PAGES[page]).run()
    _ok(at)
    return at


def _with_model(page: str = "model"):
    at = _app("model")
    at.radio(key="model_source_kind").set_value("Tiny random model (instant demo)").run()
    at.button(key="model_load").click().run()
    _ok(at)
    return _go(at, page) if page != "model" else at


def _with_analysis(page: str = "similarity"):
    at = _with_model("similarity")
    at.number_input(key="calib_samples").set_value(16)
    at.number_input(key="calib_tokens").set_value(32)
    at.button(key="capture_run").click().run()
    _ok(at)
    assert ui.ANALYSIS in at.session_state
    return _go(at, page) if page != "similarity" else at


def _with_plan(page: str = "plan"):
    at = _with_analysis("plan")
    at.slider(key="plan_n_remove").set_value(1)
    at.button(key="plan_make").click().run()
    _ok(at)
    assert ui.PLAN in at.session_state
    return _go(at, page) if page != "plan" else at


def _run_plan(at):
    at.number_input(key="eval_budget").set_value(512)
    at.number_input(key="eval_window").set_value(128)
    at.checkbox(key="eval_speed").uncheck()  # off by default on a CPU; make sure
    at.checkbox(key="eval_generations").uncheck()
    at.button(key="run_plan").click().run()
    _ok(at)
    return at


# ---------------------------------------------------------------------------------------------
# cold start: every page without a model points the user somewhere, no exception


@pytest.mark.parametrize("page", list(PAGES))
def test_cold_start(page):
    at = _app(page)
    _ok(at)
    text = " ".join(i.value for i in at.info) + " ".join(m.value for m in at.markdown)
    if page == "home":
        assert "Where you are" in " ".join(s.value for s in at.subheader)
        assert at.button(key="home_start_bundled") and at.button(key="home_start_tiny")
    elif page == "model":
        assert "No model loaded yet" in text
    else:
        assert "Model" in text and "No model loaded yet" in text
        assert not at.get("plotly_chart")  # nothing drawn without data


def test_home_one_click_start_reaches_heatmaps():
    at = _app("home")
    at.button(key="home_start_tiny").click().run()
    _ok(at)
    assert at.session_state[ui.MODEL_SPEC].source == "tiny:llama"
    assert ui.ANALYSIS in at.session_state
    # the button switches to the Similarity page: four heatmaps and the BI chart
    _go(at, "similarity")
    assert len(at.get("plotly_chart")) >= 5


# ---------------------------------------------------------------------------------------------
# model page


def test_model_page_loads_tiny_and_shows_summary():
    at = _with_model()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Layers"] == "6"
    assert metrics["Hidden size"] == "64"
    assert metrics["Heads (query / KV)"] == "4 / 2"
    assert metrics["Device"] == "cpu"
    assert metrics["Parameters"].endswith(" M")
    assert metrics["Memory"].endswith(" MB")
    assert any("CPU" in w.value for w in at.warning)  # the visible CPU notice


@pytest.mark.parametrize(
    "kind, path, message",
    [
        ("Local model folder", "/nonexistent/model-folder", "not found"),
        ("Local model folder", "", "type a folder path"),
        ("GGUF file", "/nonexistent/model.gguf", "GGUF file not found"),
        ("Local model folder", str(ROOT), "no config.json"),
    ],
)
def test_model_page_bad_source_shows_error(kind, path, message):
    at = _app("model")
    at.radio(key="model_source_kind").set_value(kind).run()
    if path:
        at.text_input(key=at.text_input[0].key).input(path)
    at.button(key="model_load").click().run()
    _ok(at)
    assert any(message in e for e in _errors(at)), _errors(at)
    assert ui.MODEL_SPEC not in at.session_state


# ---------------------------------------------------------------------------------------------
# similarity page


def test_similarity_happy_path_heatmaps_bi_and_downloads():
    at = _with_analysis()
    charts = at.get("plotly_chart")
    assert len(charts) == 5  # npib, cosine, angular, cka heatmaps + BI
    figures = [json.loads(c.proto.spec) for c in charts]
    titles = [f["layout"]["title"]["text"] for f in figures]
    assert titles[:4] == [ui.MEASURE_NAMES[m] for m in ui.MEASURES]
    heat = figures[0]
    assert heat["layout"]["xaxis"]["title"]["text"] == "layer"
    assert heat["layout"]["yaxis"]["title"]["text"] == "layer"
    assert "layer %{y} vs %{x}" in heat["data"][1]["hovertemplate"]
    assert figures[2]["data"][0]["colorscale"] != figures[0]["data"][0]["colorscale"]  # reversed
    sim = at.session_state[ui.ANALYSIS].similarity
    assert sim.n_layers == 6 and at.session_state[ui.ANALYSIS_INFO]["n_samples"] == 16
    assert len(at.get("download_button")) == 5  # 4 CSVs + the zip


def test_similarity_pair_selectors_feed_the_planner():
    at = _with_analysis()
    at.selectbox(key=ui.W_PAIR_A).set_value(2)
    at.selectbox(key=ui.W_PAIR_B).set_value(3).run()
    _ok(at)
    assert at.session_state[ui.PAIR] == (2, 3)
    at.button(key="add_pair_pick").click().run()
    _ok(at)
    assert at.session_state[ui.PICKS] == [{"op": "merge", "layers": [2, 3]}]
    assert "1 pick, no plan made yet" in " ".join(c.value for c in at.sidebar.caption)
    at.button(key="add_pair_pick").click().run()  # the same pick twice: a message, not a crash
    _ok(at)
    assert any("already in the list" in e for e in _errors(at))


def test_a_non_adjacent_pair_asks_what_is_meant():
    """Layers 2 and 4: a merge would take 2..4; the page asks first and adds only what is
    chosen (formerly a silent 3-layer merge)."""
    at = _with_analysis()
    at.selectbox(key=ui.W_PAIR_A).set_value(2)
    at.selectbox(key=ui.W_PAIR_B).set_value(4).run()
    at.button(key="add_pair_pick").click().run()
    _ok(at)
    assert at.session_state[ui.PICKS] == []  # nothing yet
    assert any("not neighbours" in m.value for m in at.markdown)
    at.button(key="pending_look").click().run()
    _ok(at)
    assert at.session_state[ui.PICKS] == [] and ui.PENDING_PAIR not in at.session_state
    at.button(key="add_pair_pick").click().run()
    at.button(key="pending_drop").click().run()
    _ok(at)
    assert at.session_state[ui.PICKS] == [{"op": "drop", "layers": [2, 3, 4]}]
    at.button(key="add_pair_pick").click().run()
    at.button(key="pending_merge").click().run()
    _ok(at)
    assert at.session_state[ui.PICKS][-1] == {"op": "merge", "layers": [2, 3, 4]}


def test_the_chosen_pair_is_kept_when_coming_back():
    at = _with_analysis()
    at.selectbox(key=ui.W_PAIR_A).set_value(1)
    at.selectbox(key=ui.W_PAIR_B).set_value(2).run()
    _go(at, "plan")
    _go(at, "similarity")
    assert at.selectbox(key=ui.W_PAIR_A).value == 1 and at.selectbox(key=ui.W_PAIR_B).value == 2


def test_similarity_uploaded_text_is_used():
    at = _with_model("similarity")
    at.radio(key="calib_kind").set_value("Upload a text file").run()
    text = "\n\n".join(f"Paragraph {i}: " + "the quick brown fox jumps. " * 12 for i in range(40))
    at.get("file_uploader")[0].set_value(("notes.txt", text.encode(), "text/plain"))
    at.number_input(key="calib_samples").set_value(16)
    at.number_input(key="calib_tokens").set_value(32)
    at.button(key="capture_run").click().run()
    _ok(at)
    assert not _errors(at)
    assert at.session_state[ui.ANALYSIS_INFO]["data"] == "upload"


@pytest.mark.parametrize(
    "kind, setup, message",
    [
        ("Upload a text file", None, "no file uploaded"),
        ("Upload a text file", ("empty.txt", b"  \n", "text/plain"), "is empty"),
        ("Upload a text file", ("bad.jsonl", b"{not json\n", "application/json"), "not valid JSON"),
        ("MMLU folder", "/nonexistent/mmlu", "MMLU folder not found"),
        ("MMLU folder", "", "path is empty"),
    ],
)
def test_similarity_bad_data_shows_error(kind, setup, message):
    at = _with_model("similarity")
    at.radio(key="calib_kind").set_value(kind).run()
    if isinstance(setup, tuple):
        at.get("file_uploader")[0].set_value(setup)
    elif setup:
        at.text_input(key="calib_mmlu").input(setup)
    at.button(key="capture_run").click().run()
    _ok(at)
    assert any(message in e for e in _errors(at)), _errors(at)
    assert ui.ANALYSIS not in at.session_state


def test_similarity_too_many_samples_shows_error():
    at = _with_model("similarity")
    at.number_input(key="calib_samples").set_value(1024)
    at.number_input(key="calib_tokens").set_value(1024)
    at.button(key="capture_run").click().run()
    _ok(at)
    assert any("samples requested" in e for e in _errors(at)), _errors(at)


# ---------------------------------------------------------------------------------------------
# manifold page


def test_manifold_views_and_animation():
    at = _with_analysis("manifold")
    assert len(at.get("plotly_chart")) == 3  # one layer, two side by side
    at.slider(key="manifold_layer").set_value(5).run()
    _ok(at)
    at.selectbox(key="manifold_method").set_value("pca").run()
    _ok(at)
    at.button(key="manifold_animate").click().run()
    _ok(at)
    anim = json.loads(at.get("plotly_chart")[-1].proto.spec)
    assert len(anim["frames"]) == 6  # one frame per layer


# ---------------------------------------------------------------------------------------------
# plan page


def test_plan_budget_makes_a_plan_that_the_cli_applies(tmp_path):
    at = _with_plan()
    plan = at.session_state[ui.PLAN]
    assert plan.model.num_layers == 6 and plan.n_layers_out == 5
    assert {m.label: m.value for m in at.metric}["Layers"] == "6 → 5"
    assert len(at.table) == 2  # output layers and steps
    # the downloaded plan JSON is what `python -m mka_core apply` reads
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    from mka_core.cli.main import main

    out = tmp_path / "model"
    assert main(["apply", str(path), "--model", "tiny:llama", "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 5


def test_plan_page_builds_flattened_and_compensated_plans_that_run():
    at = _with_analysis("plan")
    at.slider(key="plan_n_remove").set_value(1)
    at.radio(key="plan_merge_mode").set_value("flatten")
    at.radio(key="plan_compensation").set_value("linear")
    at.button(key="plan_make").click().run()
    _ok(at)
    plan = at.session_state[ui.PLAN]
    assert (plan.refine.merge, plan.refine.compensation) == ("flatten", "linear")
    assert any("flatten" in c.value and "linear" in c.value for c in at.caption)
    at = _run_plan(_go(at, "results"))
    history = at.session_state[ui.HISTORY]
    assert history[-1]["layers"] == 5 and ":flatten+linear" in history[-1]["label"]
    # a planner that only drops cannot flatten: the choice is there but off
    _go(at, "plan")
    at.selectbox(key="plan_planner").set_value("shortgpt").run()
    assert at.radio(key="plan_merge_mode").disabled


def test_plan_too_large_budget_shows_error():
    at = _with_analysis("plan")
    at.radio(key="plan_budget_kind").set_value("compression ratio").run()
    at.slider(key="plan_ratio").set_value(0.95)
    at.button(key="plan_make").click().run()
    _ok(at)
    assert any("budget" in e for e in _errors(at)), _errors(at)
    assert ui.PLAN not in at.session_state


def test_plan_manual_picks():
    at = _with_analysis("plan")
    at.selectbox(key="pick_op").set_value("merge")
    at.number_input(key="pick_first").set_value(2)
    at.number_input(key="pick_last").set_value(3)
    at.button(key="pick_add").click().run()
    at.selectbox(key="pick_op").set_value("drop")
    at.number_input(key="pick_first").set_value(4)
    at.number_input(key="pick_last").set_value(4)
    at.button(key="pick_add").click().run()
    _ok(at)
    assert at.session_state[ui.PICKS] == [
        {"op": "merge", "layers": [2, 3]},
        {"op": "drop", "layers": [4]},
    ]
    at.button(key="manual_make").click().run()
    _ok(at)
    plan = at.session_state[ui.PLAN]
    assert plan.n_layers_out == 4
    assert [i for i, _ in plan.layers[2]] == [2, 3]
    # a merge of one layer is refused with a message
    at.selectbox(key="pick_op").set_value("merge")
    at.number_input(key="pick_first").set_value(1)
    at.number_input(key="pick_last").set_value(1)
    at.button(key="pick_add").click().run()
    _ok(at)
    assert any("two different layers" in e for e in _errors(at))


def test_plan_import_good_and_bad_files():
    at = _with_plan()
    good = at.session_state[ui.PLAN].to_json().encode()
    at.session_state[ui.PLAN] = None
    cases = [
        (b"", "is empty"),
        (b"{oops", "not valid JSON"),
        (json.dumps({"format": "something-else"}).encode(), "not an MKA Studio plan file"),
        (good.replace(b'"num_layers": 6', b'"num_layers": 7'), "plan.json"),
    ]
    for content, message in cases:
        at.get("file_uploader")[0].set_value(("plan.json", content, "application/json")).run()
        at.button(key="plan_import").click().run()
        _ok(at)
        assert any(message in e for e in _errors(at)), (message, _errors(at))
    at.get("file_uploader")[0].set_value(("plan.json", good, "application/json")).run()
    at.button(key="plan_import").click().run()
    _ok(at)
    assert not _errors(at)
    assert at.session_state[ui.PLAN].n_layers_out == 5
    assert at.session_state[ui.PLAN_ORIGIN] == "imported: plan.json"


# ---------------------------------------------------------------------------------------------
# results page


def test_results_without_plan_points_to_plan_page():
    at = _with_model("results")
    assert any("No plan yet" in i.value for i in at.info)


def test_results_run_history_and_export(tmp_path):
    at = _run_plan(_with_plan("results"))
    table = at.table[0].value
    rows = dict(zip(table["metric"], zip(table["original"], table["compressed"])))
    assert rows["layers"] == ("6", "5")
    assert rows["parameters"][0].endswith(" M") and rows["size in memory"][1].endswith(" MB")
    ppl_o, ppl_c = rows["perplexity"]
    assert len(ppl_o.split(".")[-1]) == 2 and len(ppl_c.split(".")[-1]) == 2  # 2 decimals
    history = at.session_state[ui.HISTORY]
    assert len(history) == 1 and history[0]["layers"] == 5
    # `kind` tells MKA merges from TransAct (and healed) runs in one history
    assert history[0]["kind"] == "merge" and history[0]["planner"] == "mka"
    # a second run goes into the history too
    at.button(key="run_plan").click().run()
    _ok(at)
    assert len(at.session_state[ui.HISTORY]) == 2

    # export: bad folders get messages, a good one gets a folder and a zip download
    at.text_input(key="export_folder").input("")
    at.button(key="export_submit").click().run()
    _ok(at)
    assert any("output folder is empty" in e for e in _errors(at))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x.txt").write_text("x")
    at.text_input(key="export_folder").input(str(busy))
    at.button(key="export_submit").click().run()
    _ok(at)
    # the message names the page's own checkbox, not the command line's --overwrite
    assert any("not empty" in e and "Replace the folder" in e for e in _errors(at)), _errors(at)
    out = tmp_path / "exported"
    at.text_input(key="export_folder").input(str(out))
    at.button(key="export_submit").click().run()
    _ok(at)
    assert not _errors(at)
    assert (out / "config.json").is_file() and (out / "plan.json").is_file()
    assert any("zip" in b.proto.label for b in at.get("download_button"))
    # and as a GGUF file in the folder, which plain transformers reads back
    gguf_out = tmp_path / "with-gguf"
    at.text_input(key="export_folder").input(str(gguf_out))
    choice = next(c for c in at.selectbox(key="export_gguf").options if c.startswith("GGUF Q8_0"))
    at.selectbox(key="export_gguf").set_value(choice)
    at.button(key="export_submit").click().run()
    _ok(at)
    assert not _errors(at), _errors(at)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(gguf_out, gguf_file="model-Q8_0.gguf").num_hidden_layers == 5


# ---------------------------------------------------------------------------------------------
# TransAct page


def _figures(at) -> dict[str, dict]:
    """The page's plotly figures by title."""
    out = {}
    for chart in at.get("plotly_chart"):
        fig = json.loads(chart.proto.spec)
        title = fig["layout"].get("title", {}).get("text")
        if title:
            out[title] = fig
    return out


def _values(data) -> list:
    """A figure's data array: plotly writes numpy arrays as base64 ("bdata") with a dtype."""
    if isinstance(data, dict) and "bdata" in data:
        import base64

        import numpy as np

        return np.frombuffer(base64.b64decode(data["bdata"]), dtype=data["dtype"]).tolist()
    return list(data)


def _prune(at, mlp_keep=0.5, heads_keep=0.5, after_merge=False):
    at.slider(key="ta_mlp_keep").set_value(mlp_keep)
    at.slider(key="ta_heads_keep").set_value(heads_keep)
    if after_merge:
        at.checkbox(key="ta_after_merge").check()
    at.slider(key="ta_shots").set_value(2)
    at.number_input(key="ta_eval_budget").set_value(512)
    at.number_input(key="ta_eval_window").set_value(128)
    at.checkbox(key="ta_eval_speed").uncheck()
    at.checkbox(key="ta_eval_generations").uncheck()
    at.button(key="ta_run").click().run()
    _ok(at)
    return at


def test_transact_without_analysis_points_to_similarity():
    at = _with_model("transact")
    assert any("Similarity" in i.value and "No activations" in i.value for i in at.info)
    assert not at.get("plotly_chart") and not at.button


def test_transact_prune_then_heal_on_tiny():
    at = _with_analysis("transact")
    at.slider(key="ta_mlp_keep").set_value(0.5)
    at.slider(key="ta_heads_keep").set_value(0.5).run()
    _ok(at)
    # the live preview: tiny:llama has intermediate 128 and 4 query heads over 2 KV heads
    shape = " ".join(m.value for m in at.markdown if "Resulting shape" in m.value)
    assert "intermediate 128 → 64, heads 4 → 2 (1 per KV group)" in shape
    # half the neurons and half the heads: the page warns that this wrecks a model
    assert any("known to wreck" in w for w in _warnings(at)), _warnings(at)
    _prune(at)
    assert not _errors(at), _errors(at)
    row = at.session_state[ui.HISTORY][-1]
    assert row["kind"] == "transact" and row["layers"] == 6  # the layers all stay
    assert row["intermediate_size"] == 64 and row["n_heads"] == 2 and row["n_kv_heads"] == 2
    assert 30 < row["params_removed_pct"] < 60
    run = at.session_state[ui.RUNS][-1]
    assert run.model.config.intermediate_size == 64
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["MLP width"] == "128 → 64" and metrics["Query heads"] == "4 → 2"
    table = at.table[0].value
    rows = dict(zip(table["metric"], zip(table["original"], table["compressed"])))
    assert rows["MLP width (intermediate)"] == ("128", "64")
    assert rows["attention heads (query / KV)"] == ("4 / 2", "2 / 2")
    figures = _figures(at)
    heads = next(f for t, f in figures.items() if t.startswith("Query head scores"))
    marks = [m for row_ in heads["data"][0]["text"] for m in row_]
    assert marks.count("✓") == 6 * 2  # two kept heads in each of the six layers
    assert "MLP neuron scores, sorted in each layer" in figures
    comparison = figures["Perplexity against parameters removed (stars: healed)"]
    assert comparison["layout"]["xaxis"]["title"]["text"] == "parameters removed (%)"

    # heal the pruned model for three steps: a new run, perplexity before → after shown
    assert at.selectbox(key="heal_run").value == len(at.session_state[ui.RUNS]) - 1
    at.slider(key="heal_steps").set_value(3)
    at.button(key="heal_submit").click().run()
    _ok(at)
    assert not _errors(at), _errors(at)
    healed = at.session_state[ui.HISTORY][-1]
    assert healed["kind"] == "transact+heal" and healed["healed"]
    assert healed["healed_from"] == row["run"] and healed["heal_steps"] == 3
    assert healed["params"] == row["params"]  # healing trains, it does not resize
    assert len(at.session_state[ui.HEAL]["report"].losses) == 3
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Perplexity before healing"] == f"{row['perplexity']:,.2f}"
    assert metrics["Perplexity after healing"] == f"{healed['perplexity']:,.2f}"
    figures = _figures(at)
    loss = figures["Training loss while healing"]
    assert len(_values(loss["data"][0]["y"])) == 3
    comparison = figures["Perplexity against parameters removed (stars: healed)"]
    assert any(t.get("marker", {}).get("symbol") == "star" for t in comparison["data"])

    # the Results page shows the same history, the comparison chart first
    _go(at, "results")
    assert len(at.session_state[ui.HISTORY]) == 2
    assert "Perplexity against parameters removed (stars: healed)" in _figures(at)


def test_transact_after_a_merge():
    at = _run_plan(_with_plan("results"))
    _go(at, "transact")
    _prune(at, mlp_keep=0.75, heads_keep=1.0, after_merge=True)
    assert not _errors(at), _errors(at)
    row = at.session_state[ui.HISTORY][-1]
    assert row["kind"] == "merge+transact" and row["planner"] == "mka"
    assert row["layers"] == 5 and row["intermediate_size"] == 96 and row["n_heads"] == 4
    assert row["base_run"] == 1
    # the new run becomes the choice for healing and export (the merge was drawn there first)
    assert at.selectbox(key="heal_run").value == 1
    assert at.selectbox(key="ta_export_run").value == 1
    folder = at.text_input(key="ta_export_folder").value
    assert folder.endswith("/exports/run-2") and folder.startswith("/")  # in the workspace
    merge = at.session_state[ui.HISTORY][0]
    assert row["params_removed_pct"] > merge["params_removed_pct"]


def test_transact_bad_inputs_show_messages():
    at = _with_analysis("transact")
    # healing with no compressed model in the session
    assert at.selectbox(key="heal_run").value is None
    at.button(key="heal_submit").click().run()
    _ok(at)
    assert any("no compressed model in memory" in e for e in _errors(at)), _errors(at)
    # "after the current merge" with no merge run
    _prune(at, after_merge=True)
    assert any("no merge to prune after" in e for e in _errors(at)), _errors(at)
    assert not at.session_state[ui.HISTORY]


# ---------------------------------------------------------------------------------------------
# workspaces, what matters, compare


def test_a_new_session_resumes_the_workspace_from_the_url():
    at = _with_plan("plan")
    name = at.session_state[ui.WORKSPACE]
    assert name and at.query_params.get("ws") in (name, [name])
    from streamlit.testing.v1 import AppTest

    again = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
    again.query_params["ws"] = name
    again.run()
    _ok(again)
    assert again.session_state[ui.WORKSPACE] == name
    assert again.session_state[ui.MODEL_SPEC].source == "tiny:llama"
    assert again.session_state[ui.PLAN] == at.session_state[ui.PLAN]
    restored = again.session_state[ui.ANALYSIS]
    assert (
        restored.activations.states.shape == at.session_state[ui.ANALYSIS].activations.states.shape
    )
    # nothing of this workspace leaks into a new one
    again.button(key="home_new_ws").click().run()
    _ok(again)
    assert again.session_state[ui.WORKSPACE] != name
    assert ui.PLAN not in again.session_state and ui.ANALYSIS not in again.session_state


def test_what_matters_page_measures_the_damage():
    at = _with_analysis("importance")
    assert any("How far each measure" in h.value for h in at.subheader)
    at.number_input(key="imp_samples").set_value(4)
    at.button(key="imp_run").click().run()
    _ok(at)
    assert not _errors(at), _errors(at)
    assert at.session_state[ui.ANALYSIS].importance is not None
    assert any("Spearman" in m.label for m in at.metric)


def test_compare_page_runs_a_small_sweep():
    at = _with_analysis("compare")
    at.multiselect(key="cmp_planners").set_value(["shortgpt", "mka"])
    at.multiselect(key="cmp_quants").set_value(["Q4_0"])
    at.text_input(key="cmp_budgets").input("1")
    at.number_input(key="cmp_eval").set_value(512)
    at.number_input(key="cmp_window").set_value(128)
    at.button(key="cmp_run").click().run()
    _ok(at)
    assert not _errors(at), _errors(at)
    result = at.session_state[ui.COMPARE]
    assert [(r["config"], r.get("quant")) for r in result.rows] == [
        ("original", None),
        ("original", "Q4_0"),
        ("shortgpt -1", None),
        ("shortgpt -1", "Q4_0"),
        ("mka -1", None),
        ("mka -1", "Q4_0"),
        ("transact -1", None),
        ("transact -1", "Q4_0"),
    ]
    at.text_input(key="cmp_budgets").input("99")
    at.button(key="cmp_run").click().run()
    _ok(at)
    assert any("budget" in e for e in _errors(at)), _errors(at)


def test_heal_by_distillation_from_the_app():
    at = _run_plan(_with_plan("results"))
    merge = at.session_state[ui.HISTORY][-1]
    _go(at, "transact")
    assert at.selectbox(key="heal_run").value == 0
    assert at.radio(key="heal_loss_kind").value == "ce"  # the default: plain next-token
    at.radio(key="heal_loss_kind").set_value("kd")
    at.slider(key="heal_steps").set_value(2)
    at.button(key="heal_submit").click().run()
    _ok(at)
    assert not _errors(at), _errors(at)
    healed = at.session_state[ui.HISTORY][-1]
    assert healed["kind"] == "merge+heal" and healed["heal_loss"] == "kd"
    assert healed["label"].endswith("+heal2kd") and healed["healed_from"] == merge["run"]
    rep = at.session_state[ui.HEAL]["report"]
    assert rep.loss == "kd" and rep.top_k == 64 and len(rep.losses) == 2
    assert healed["kl"] is not None and healed["kl"] >= 0
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Perplexity after healing"] == f"{healed['perplexity']:,.2f}"


def test_results_page_scores_lm_eval_tasks_on_both_models(tmp_path):
    """A local lm-eval task typed into the evaluation form: both models scored, shown in a table."""
    import json

    import yaml

    rows = [("2 + 2 =", ["4", "5", "6", "7"], 0), ("3 + 3 =", ["5", "6", "7", "8"], 1)]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": q, "c": c, "a": a}) + "\n" for q, c, a in rows))
    task = {
        "task": "app_qa",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{q}}",
        "doc_to_choice": "{{c}}",
        "doc_to_target": "a",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    (tmp_path / "app_qa.yaml").write_text(yaml.safe_dump(task))
    at = _with_plan("results")
    at.text_input(key="eval_tasks").input("app_qa")
    at.text_input(key="eval_tasks_dir").input(str(tmp_path))
    at = _run_plan(at)
    assert not _errors(at), _errors(at)
    run = at.session_state[ui.RUNS][-1]
    assert run.original.tasks["tasks"]["app_qa"]["n"] == 2
    assert run.compressed.tasks["tasks"]["app_qa"]["metrics"]["acc"] in (0.0, 0.5, 1.0)
    assert any("lm-evaluation-harness" in m.value for m in at.markdown)
    at.text_input(key="eval_tasks").input("no_such_task_here")
    at = _run_plan(at)
    assert any("no_such_task_here" in e for e in _errors(at)), _errors(at)
