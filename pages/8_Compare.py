"""Compare: several planners at several budgets (and TransAct at equal parameters) on the same
analysis and the same evaluation of the original, in one table and one chart."""

import pandas as pd
import streamlit as st

from mka_core import ui
from mka_core.errors import MkaInputError
from mka_core.figures.compare import compare_figure

ui.page_setup("Compare planners", ":material/compare_arrows:")
ui.explain(
    "One table for the question *which method should I use?*: every chosen planner removes the "
    "same numbers of layers from the same model, each result is scored on the same held-out "
    "text against the same original (measured once). TransAct prunes inside the layers until "
    "the model has as many parameters as the layer-removed ones. The perplexity on the two "
    "halves of the evaluation text shows which differences are larger than the text's own "
    "noise. The same sweep runs from the command line, locally or on a Ray cluster: "
    "`python -m mka_core compare --planners … --budgets … [--executor ray]`."
)
analysis = ui.require_analysis()
loaded = ui.require_model()
planners, _ = ui.planners()
n = loaded.n_layers

with st.form("compare_form"):
    chosen = st.multiselect(
        "Planners",
        list(planners),
        default=[p for p in planners if ui.planner_info(p).in_compare_default],
        key="cmp_planners",
        format_func=lambda p: f"{p} — {ui.planner_help(p)}",
    )
    variants = st.multiselect(
        "Also built as",
        ["+linear", "+scale", ":flatten", ":flatten+linear"],
        key="cmp_variants",
        help="Each chosen planner again with its cuts compensated (+linear: ReplaceMe's map, "
        "+scale: Prune&Comp's rescaling) or its merges flattened (:flatten, FlattenGPT; planners "
        "that merge): see the Plan page.",
    )
    quants = st.multiselect(
        "Also measured quantized",
        ["Q8_0", "Q5_0", "Q4_0"],
        key="cmp_quants",
        help="Every row, and the original alone, again after its weights are quantized and read "
        "back with the GGUF export's quantizers (Q8_0: 8.5 bits per weight, Q4_0: 4.5): layer "
        "removal and quantization together against quantization alone, with each GGUF's size.",
    )
    c1, c2, c3, c4 = st.columns(4)
    budgets = c1.text_input(
        "Layers removed", ",".join(str(b) for b in (1, 2) if b < n - 2) or "1", key="cmp_budgets"
    )
    transact = c2.checkbox("TransAct at equal parameters", True, key="cmp_transact")
    d = ui.eval_defaults(loaded)
    budget = c3.number_input(
        "Evaluation tokens", 256, 65536, d["budget_tokens"], 256, key="cmp_eval"
    )
    window = c4.number_input("Window", 16, 4096, d["window"], 16, key="cmp_window")
    go = st.form_submit_button("Run the comparison", type="primary", key="cmp_run")
if go:
    try:
        settings = ui.eval_settings(budget, window, False, False)
        with ui.progress_status("Planning, compressing and evaluating every config") as progress:
            specs = list(chosen) + [
                f"{p}{v}"
                for p in chosen
                for v in variants
                if not v.startswith(":flatten") or "merge" in ui.planner_info(p).does
            ]
            ui.run_compare(specs, budgets, transact, settings, progress=progress, quants=quants)
    except MkaInputError as e:
        st.error(str(e))

result = st.session_state.get(ui.COMPARE)
if result is None:
    st.info("Choose planners and budgets and press **Run the comparison**.")
    st.stop()
st.plotly_chart(compare_figure(result.rows), key="cmp_chart", config={"displayModeBar": False})
cols = [
    "config",
    "quant",
    "layers_removed",
    "params_removed_pct",
    "perplexity",
    "perplexity_half_a",
    "perplexity_half_b",
    "kl",
    "top1",
    "gguf_bytes",
    "plan_s",
    "steps",
    "error",
]
df = pd.DataFrame(result.rows)
ui.rows_table(df[[c for c in cols if c in df]], key="cmp_table")
st.caption(
    f"{result.meta['eval_tokens']} evaluation tokens, {result.meta['seconds']:.0f} s in all. "
    "Greedy planners are planned once at the largest budget; smaller budgets take their first "
    "steps."
)
st.download_button(
    "Table (.csv)", ui.compare_csv(), file_name="mka-compare.csv", mime="text/csv", key="cmp_dl"
)
