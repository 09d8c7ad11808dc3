"""Results page: run the plan with progress, before/after numbers and text, the history of runs
in this workspace, and export of the compressed model."""

import streamlit as st

from mka_core import ui
from mka_core.errors import MkaInputError
from mka_core.figures.runs import comparison_figure, history_figure

ui.page_setup("Results", ":material/monitoring:")
ui.explain(
    "Running a plan builds a **new** model (the original stays loaded for comparison) and "
    "scores both on the same held-out text. **Perplexity**: how surprised the model is by the "
    "text (lower is better). **KL divergence** and **top-1 agreement**: how closely the "
    "compressed model's next-token predictions follow the original's — fidelity without labels. "
    "**Size** and **speed** show what the compression saved. The original is measured once and "
    "reused by every later run with the same settings. Every run is kept in the history below "
    "(and in the workspace), so planners and budgets can be compared."
)
loaded = ui.require_model()
plan = st.session_state.get(ui.PLAN)
history = ui.history_frame()

if plan is None and history.empty:
    ui.require_plan()  # points to the Plan page and stops

if plan is not None:
    st.markdown(
        f"**Plan:** {plan.model.num_layers} → {plan.n_layers_out} layers "
        f"({st.session_state.get(ui.PLAN_ORIGIN, '')})"
    )
    settings, run_it, _ = ui.eval_settings_form("", "Run the plan", "run_plan")
    ui.estimate_caption(settings)
    if run_it:
        try:
            with ui.progress_status("Applying the plan and evaluating both models") as progress:
                ui.run_plan(plan, settings, progress=progress)
        except MkaInputError as e:
            st.error(str(e))

run = ui.latest_run()
if run is None:
    st.info("No run yet: press **Run the plan**.")
    st.stop()

st.subheader(f"Before / after — {run.label}")
ui.before_after_section(run)

st.subheader("History of this workspace")
history = ui.history_frame()
tab_params, tab_layers = st.tabs(["Perplexity vs parameters removed", "vs layers removed"])
with tab_params:
    st.plotly_chart(
        comparison_figure(history), key="history_params_chart", config={"displayModeBar": False}
    )
    st.caption(
        "Merges (Results) and TransAct prunes (TransAct page) on one axis: compare methods at "
        "equal parameter counts. Stars: healed runs, joined to the run they healed."
    )
with tab_layers:
    st.plotly_chart(history_figure(history), key="history_chart", config={"displayModeBar": False})
ui.rows_table(history, key="history_table")
st.download_button(
    "History (.csv)",
    history.to_csv(index=False),
    file_name="mka-history.csv",
    mime="text/csv",
    key="dl_history",
)

st.subheader("Export the compressed model")
st.caption(
    "A standard Hugging Face folder (safetensors shards, config, tokenizer) that plain "
    "transformers loads, with plan.json and mka-run.json (every number above) beside it."
)
ui.export_section()
