"""Results page: run the plan with progress, before/after numbers and text, the session's
history of runs, and export of the compressed model."""

import streamlit as st

from mka_core import ui
from mka_core.errors import MkaInputError

ui.page_setup("Results", ":material/monitoring:")
ui.explain(
    "Running a plan builds a **new** model (the original stays loaded for comparison) and "
    "scores both on the same held-out text. **Perplexity**: how surprised the model is by the "
    "text (lower is better). **KL divergence** and **top-1 agreement**: how closely the "
    "compressed model's next-token predictions follow the original's — fidelity without labels. "
    "**Size** and **speed** show what the compression saved. Every run is kept in the history "
    "below, so planners and budgets can be compared."
)
loaded = ui.require_model()
plan = st.session_state.get(ui.PLAN)
history = ui.history_frame()

if plan is None and history.empty:
    ui.require_plan()  # points to the Plan page and stops

if plan is not None:
    defaults = ui.eval_defaults(loaded)
    with st.form("run_form"):
        st.markdown(
            f"**Plan:** {plan.model.num_layers} → {plan.n_layers_out} layers "
            f"({st.session_state.get(ui.PLAN_ORIGIN, '')})"
        )
        c1, c2, c3, c4 = st.columns(4)
        budget = c1.number_input(
            "Evaluation tokens",
            256,
            65536,
            defaults["budget_tokens"],
            step=256,
            key="eval_budget",
            help="The same held-out windows score both models (the built-in corpus's evaluation half).",
        )
        window = c2.number_input(
            "Window (tokens)", 16, 4096, defaults["window"], step=16, key="eval_window"
        )
        with_speed = c3.checkbox(
            "Measure speed",
            defaults["with_speed"],
            key="eval_speed",
            help="Prefill and decode tokens/s of both models (takes a minute or two on a CPU).",
        )
        with_text = c4.checkbox("Sample generations", True, key="eval_generations")
        run_it = st.form_submit_button("Run the plan", type="primary", key="run_plan")
    if run_it:
        try:
            with ui.progress_status("Applying the plan and evaluating both models") as progress:
                ui.run_plan(
                    plan,
                    budget,
                    window,
                    with_speed=with_speed,
                    with_generations=with_text,
                    progress=progress,
                )
        except MkaInputError as e:
            st.error(str(e))

run = ui.latest_run()
if run is None:
    st.info("No run yet: press **Run the plan**.")
    st.stop()

st.subheader(f"Before / after — {run.label}")
c1, c2 = st.columns([3, 2])
with c1:
    st.table(ui.before_after_table(run), hide_index=True, border="horizontal")
with c2:
    st.plotly_chart(
        ui.before_after_figure(run), key="before_after_chart", config={"displayModeBar": False}
    )
o, c = run.original, run.compressed
m = st.columns(4)
m[0].metric(
    "Perplexity",
    ui.fmt_num(c.perplexity),
    ui.fmt_num(c.perplexity - o.perplexity),
    delta_color="inverse",
)
m[1].metric("Top-1 agreement", ui.fmt_pct(c.top1))
m[2].metric(
    "Parameters",
    ui.fmt_params(c.params),
    f"{100 * (c.params / o.params - 1):.1f} %",
    delta_color="inverse",
)
m[3].metric(
    "Decode speed", f"{ui.fmt_num(c.decode_tps, 1)} tok/s" if c.decode_tps else "not measured"
)

if o.generations and c.generations:
    st.subheader("Generations (greedy, same prompts)")
    left, right = st.columns(2)
    left.caption("original")
    right.caption(f"compressed ({c.n_layers} layers)")
    for a, b in zip(o.generations, c.generations):
        left, right = st.columns(2)
        left.container(border=True).text(a)
        right.container(border=True).text(b)

st.subheader("History of this session")
history = ui.history_frame()
st.plotly_chart(ui.history_figure(history), key="history_chart", config={"displayModeBar": False})
st.dataframe(
    history,
    hide_index=True,
    key="history_table",
    column_config={
        "params": st.column_config.NumberColumn("params", format="%d"),
        "params_removed_pct": st.column_config.NumberColumn("params removed %", format="%.1f"),
        "perplexity": st.column_config.NumberColumn("perplexity", format="%.2f"),
        "perplexity_original": st.column_config.NumberColumn("original ppl", format="%.2f"),
        "kl": st.column_config.NumberColumn("KL", format="%.4f"),
        "top1": st.column_config.NumberColumn("top-1", format="%.3f"),
        "decode_tps": st.column_config.NumberColumn("decode tok/s", format="%.1f"),
        "seconds": st.column_config.NumberColumn("seconds", format="%.1f"),
    },
)
st.download_button(
    "History (.csv)",
    history.to_csv(index=False),
    file_name="mka-history.csv",
    mime="text/csv",
    key="dl_history",
)

st.subheader("Export the compressed model")
st.caption(
    "A standard Hugging Face folder (safetensors, config, tokenizer) that plain transformers "
    "loads, with plan.json and mka-run.json (every number above) beside it."
)
runs = st.session_state[ui.RUNS]
with st.form("export_form"):
    c1, c2 = st.columns([1, 2])
    index = c1.selectbox(
        "Run",
        list(range(len(runs))),
        index=len(runs) - 1,
        format_func=lambda i: f"{i + 1}: {runs[i].label}",
        key="export_run",
    )
    folder = c2.text_input("Output folder", f"out/run-{len(runs)}", key="export_folder")
    overwrite = st.checkbox("Replace the folder if it exists", False, key="export_overwrite")
    do_export = st.form_submit_button("Export", key="export_submit")
if do_export:
    try:
        with st.spinner("Saving…"):
            path = ui.export_run(index, folder, overwrite=overwrite)
        st.success(f"Saved to {path}")
    except MkaInputError as e:
        st.error(str(e))
exports = st.session_state.get(ui.EXPORTS, {})
if index in exports:
    data = ui.folder_zip(exports[index])
    if data is None:
        st.caption("The folder is too large for a download here; copy it from the path above.")
    else:
        st.download_button(
            f"Download {exports[index]} as .zip ({ui.fmt_mb(len(data))})",
            data,
            file_name=f"{runs[index].label.replace(' ', '_')}.zip",
            mime="application/zip",
            key="dl_model_zip",
        )
