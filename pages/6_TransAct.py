"""TransAct page: prune MLP neurons and attention heads inside every block (keep ratios, shots),
the unit scores per layer, the same before/after evaluation and export as a merge, and healing
of any compressed model of the session."""

import streamlit as st

from mka_core import ui
from mka_core.errors import MkaInputError
from mka_core.figures.runs import comparison_figure
from mka_core.figures.transact import heal_loss_figure, transact_figures

ui.page_setup("TransAct", ":material/content_cut:")
ui.explain(
    "Layer merging (MKA) removes **whole layers**. **TransAct** (Shen et al. 2024, *Search for "
    "Efficient LLMs*) keeps every layer and the hidden size and makes each block **narrower**. "
    "It scores units by their *transitional activations* on the calibration text: an **MLP "
    "neuron** by the size (L2 norm over all tokens) of its input to `down_proj`, "
    "`act(gate(x)) · up(x)`; an **attention head** by the size of its slice of the input to "
    "`o_proj`. Small activations everywhere = the unit adds little to the residual stream, so "
    "it goes first. Every layer keeps the same sizes, so the result is a standard model that "
    "plain transformers loads. With grouped-query attention, each KV group keeps the same "
    "number of query heads. Pruning runs in **shots**: a few smaller cuts, re-scoring the "
    "partly pruned model before each, instead of one big cut.\n\n"
    "**Healing** (below) is a short fine-tune of any compressed model of this session — merged "
    "or pruned — on the calibration text, to let the remaining weights fit together again."
)
loaded = ui.require_model()
analysis = ui.require_analysis()
info = st.session_state[ui.ANALYSIS_INFO]
st.caption(
    f"Scoring and healing use the calibration batch of the current analysis: "
    f"{info['n_samples']} samples × ≤{info['max_tokens']} tokens from **{info['data']}**."
)

st.subheader("Prune")
c1, c2, c3 = st.columns(3)
mlp_keep = c1.slider(
    "MLP neurons to keep",
    0.05,
    1.0,
    0.9,
    step=0.05,
    key="ta_mlp_keep",
    help="Share of each layer's intermediate (MLP) neurons that stays.",
)
heads_keep = c2.slider(
    "Attention heads to keep",
    0.05,
    1.0,
    1.0,
    step=0.05,
    key="ta_heads_keep",
    help="Share of the query heads that stays, rounded up to a valid shape: the same number "
    "of query heads in every KV group, or whole KV groups once fewer than one per group is left.",
)
merge_index = ui.latest_merge_index()
after_merge = c3.checkbox(
    "TransAct after the current merge",
    False,
    key="ta_after_merge",
    help="Prune the newest merged model of this session (Results page) instead of the original: "
    "both methods together.",
)
if after_merge and merge_index is not None:
    c3.caption(f"base: run {merge_index + 1}, {st.session_state[ui.RUNS][merge_index].label}")
elif after_merge:
    c3.caption(":orange[no merged model in memory yet: run a plan on the Results page]")
try:
    preview = ui.transact_preview(
        mlp_keep, heads_keep, merge_index if after_merge and merge_index is not None else None
    )
    st.markdown(
        f"**Resulting shape:** {preview['text']} — about **{preview['params_removed_pct']:.1f} %** "
        f"of the original parameters removed (the size of ≈{preview['layers_equivalent']:.1f} "
        f"whole layers, for comparing with a merge)."
    )
except MkaInputError as e:
    st.error(str(e))


def shots_input():
    return st.slider(
        "Shots",
        1,
        8,
        4,
        key="ta_shots",
        help="Prune in this many steps on a linear ramp, re-scoring before each.",
    )


settings, prune, shots = ui.eval_settings_form(
    "ta_", "Prune and evaluate", "ta_run", extra=shots_input
)
warning = ui.transact_warning(mlp_keep, heads_keep, shots)
if warning:
    st.warning(warning, icon=":material/warning:")
ui.estimate_caption(settings)
if prune:
    try:
        with ui.progress_status("Scoring, pruning and evaluating both models") as progress:
            ui.run_transact(
                mlp_keep, heads_keep, shots, settings, after_merge=after_merge, progress=progress
            )
    except MkaInputError as e:
        st.error(str(e))

latest = st.session_state.get(ui.TRANSACT)
if latest is None:
    st.info("No TransAct run yet: choose the keep ratios and press **Prune and evaluate**.")
else:
    run, rep = st.session_state[ui.RUNS][latest["run"]], latest["report"]
    st.subheader(f"Before / after — {run.label}")
    m = st.columns(4)
    m[0].metric("MLP width", f"{rep.original_intermediate_size} → {rep.new_intermediate_size}")
    m[1].metric("Query heads", f"{rep.original_n_heads} → {rep.new_n_heads}")
    m[2].metric("KV heads", f"{rep.original_n_kv_heads} → {rep.new_n_kv_heads}")
    m[3].metric("Pruning time", f"{rep.seconds:.1f} s", help=f"{len(rep.shots)} shot(s)")
    ui.before_after_section(run, key="ta_")
    st.markdown("**Unit scores** (the last scoring pass, before the final cut)")
    mlp_fig, heads_fig, mass_fig = transact_figures(rep)
    c1, c2 = st.columns([3, 2])
    c1.plotly_chart(mlp_fig, key="ta_mlp_scores", config={"displayModeBar": False})
    c2.plotly_chart(heads_fig, key="ta_head_scores", config={"displayModeBar": False})
    st.plotly_chart(mass_fig, key="ta_score_mass", config={"displayModeBar": False})
    st.caption(
        "Scores are divided by each layer's largest, so layers compare. When the kept units "
        "carry much more of the score than their share of the units (solid line above dashed), "
        "the activations are concentrated in few units and pruning costs little."
    )

st.subheader("Heal")
st.caption(
    "A short fine-tune (AdamW, all weights, cosine learning rate) of a compressed model on the "
    "calibration text, then the same evaluation as its run. On a CPU each step of the bundled "
    "135M model takes several seconds (a batch of calibration samples, forward and backward), "
    "so start with a few dozen steps; on a GPU a few hundred are quick."
)
candidates = ui.heal_candidates()
runs = st.session_state[ui.RUNS]
heal_defaults = ui.heal_defaults(loaded)
ui.follow_newest("heal_run", candidates)  # a new run (a prune, a merge) becomes the choice
with st.form("heal_form"):
    c1, c2, c3 = st.columns([2, 1, 1])
    heal_index = c1.selectbox(
        "Compressed model",
        candidates,
        format_func=lambda i: f"run {i + 1}: {runs[i].label}",
        key="heal_run",
        placeholder="no compressed model in memory yet",
        help=f"Runs whose model is still in memory (the newest {ui.KEEP_MODELS}).",
    )
    steps = c2.slider("Steps", 1, 500, heal_defaults["steps"], key="heal_steps")
    lr = c3.select_slider(
        "Learning rate",
        ui.HEAL_LRS,
        heal_defaults["lr"],
        format_func=lambda x: f"{x:.0e}",
        key="heal_lr",
    )
    heal_loss = st.radio(
        "Loss",
        ["ce", "kd"],
        index=["ce", "kd"].index(heal_defaults["loss"]),
        format_func={
            "ce": "next-token (plain)",
            "kd": "distillation from the original (KD)",
        }.get,
        horizontal=True,
        key="heal_loss_kind",
    )
    st.caption(
        "Next-token trains on the calibration text's own tokens; distillation trains the "
        "compressed model to match the original's whole next-token distribution (its top 64 "
        "tokens per position, computed once), which usually recovers more (Hinton et al. 2015; "
        "Minitron, arXiv 2407.14679)."
    )
    do_heal = st.form_submit_button("Heal and evaluate", type="primary", key="heal_submit")
if do_heal:
    try:
        with ui.progress_status("Healing and evaluating") as progress:
            ui.run_heal(heal_index, steps, lr, progress=progress, loss=heal_loss)
    except MkaInputError as e:
        st.error(str(e))

healed = st.session_state.get(ui.HEAL)
if healed is not None:
    run, source, rep = runs[healed["run"]], runs[healed["from"]], healed["report"]
    before, after = source.compressed.perplexity, run.compressed.perplexity
    m = st.columns(4)
    m[0].metric("Perplexity before healing", ui.fmt_num(before), help=source.label)
    m[1].metric(
        "Perplexity after healing",
        ui.fmt_num(after),
        ui.fmt_num(after - before),
        delta_color="inverse",
        help=f"{run.label}; the original model: {ui.fmt_num(run.original.perplexity)}",
    )
    many = len(rep.losses) >= 10  # a single step's loss is noisy: average five when there are
    m[2].metric(
        "Training loss",
        f"{rep.first_loss:.3f} → {rep.last_loss:.3f}"
        if many
        else f"{rep.losses[0]:.3f} → {rep.losses[-1]:.3f}",
        help=(
            "mean of the first five steps → mean of the last five"
            if many
            else "first step → last step"
        )
        + ("; KL from the original (nats)" if rep.loss == "kd" else "; next-token loss (nats)"),
    )
    m[3].metric("Healing time", f"{rep.seconds:.1f} s", help=f"{rep.steps} steps at lr {rep.lr:g}")
    st.caption(
        f"Healed run {healed['from'] + 1} ({source.label}) into run {healed['run'] + 1}; the "
        f"original model's perplexity on the same text: {ui.fmt_num(run.original.perplexity)}."
    )
    st.plotly_chart(heal_loss_figure(rep), key="heal_loss", config={"displayModeBar": False})

history = ui.history_frame()
if not history.empty:
    st.subheader("Merging vs pruning at equal size")
    st.plotly_chart(
        comparison_figure(history), key="ta_comparison", config={"displayModeBar": False}
    )
    st.caption(
        "Every run of this session. Compare methods at the same x: which loses less perplexity "
        "for the same parameters removed? The Results page has the full history table."
    )
    st.subheader("Export a compressed model")
    latest_index = latest["run"] if latest is not None else None
    ui.export_section(key="ta_", default_index=latest_index)
    st.download_button(
        "History (.csv)",
        history.to_csv(index=False),
        file_name="mka-history.csv",
        mime="text/csv",
        key="ta_dl_history",
    )
