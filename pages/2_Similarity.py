"""Similarity page: calibration data → one capture pass → heatmaps of every measure with how far
each can be trusted, Block Influence, downloads."""

import streamlit as st

from mka_core import ui
from mka_core.errors import MkaInputError
from mka_core.figures.similarity import bi_figure, heatmap_figure, spread_figure

ui.page_setup("Layer similarity", ":material/grid_on:")
ui.explain(
    "We run a few calibration texts through the model **once** and keep what every layer "
    "outputs (pooled per sample). Then every pair of layers is compared. Bright cells off the "
    "diagonal mean two layers represent the samples alike, so merging them should cost little. "
    "**NPIB** (the MKA paper) embeds each layer's outputs with a *diffusion map*, clusters them "
    "and measures how much the clusterings of two layers agree (mutual information, 0–1). "
    "**Block Influence** (ShortGPT) says how much each block changes its input: low = removable.\n\n"
    "**Stability**: each measure is recomputed on two halves of the calibration documents and on "
    "bootstrap resamples of the samples (no extra forward pass). If the ranking of the adjacent "
    "pairs changes between halves, the heatmap's brightest neighbours are noise, not a property "
    "of the model — check this before trusting a merge choice."
)
loaded = ui.require_model()

DATA = {
    "Built-in corpus (Python docs)": "builtin",
    "Upload a text file": "upload",
    "MMLU folder": "mmlu",
}
defaults = ui.analysis_defaults(loaded)
data_kind = DATA[st.radio("Calibration data", list(DATA), key="calib_kind", horizontal=True)]
upload, folder = None, ""
if data_kind == "upload":  # outside the form: a new file replaces the old one's messages at once
    upload = st.file_uploader(
        "Text file (.txt: documents separated by blank lines; .jsonl: a 'text' field per line)",
        type=["txt", "jsonl"],
        key="calib_upload",
    )
with st.form("capture_form"):
    if data_kind == "mmlu":
        folder = st.text_input(
            "MMLU folder (with test/ and dev/ sub-folders of CSVs)",
            key="calib_mmlu",
            placeholder="~/data/mmlu",
        )
    c1, c2, c3 = st.columns(3)
    n_samples = c1.number_input(
        "Samples", 16, 1024, defaults["n_samples"], step=16, key="calib_samples"
    )
    max_tokens = c2.number_input(
        "Tokens per sample", 8, 1024, defaults["max_tokens"], step=8, key="calib_tokens"
    )
    pooling = c3.selectbox(
        "Pooling",
        ["mean", "last", "tokens"],
        key="calib_pooling",
        help="mean over tokens, the last token, or 8 random token positions per sample",
    )
    submitted = st.form_submit_button("Capture activations", type="primary", key="capture_run")

if submitted:
    try:
        if data_kind == "upload":
            data, data_key = ui.calibration_from_upload(upload)
        elif data_kind == "mmlu":
            data, data_key = ui.calibration_from_folder(folder)
        else:
            data, data_key = "builtin", "builtin"
        with ui.progress_status("Capturing activations and comparing layers") as progress:
            ui.run_analysis(data, data_key, n_samples, max_tokens, pooling, progress=progress)
    except MkaInputError as e:
        st.error(str(e))

analysis = st.session_state.get(ui.ANALYSIS)
if analysis is None:
    st.info("Choose calibration data and press **Capture activations** to see the heatmaps.")
    st.stop()

sim = analysis.similarity
stab = analysis.stability
info = st.session_state[ui.ANALYSIS_INFO]
t = sim.timings
st.caption(
    f"{info['n_samples']} samples × ≤{info['max_tokens']} tokens from **{info['data']}**, "
    f"{info['pooling']} pooling → {info['n_rows']} rows per layer · capture "
    f"{t.get('capture', 0):.1f} s, NPIB {t.get('npib', 0):.1f} s, stability "
    f"{t.get('stability', 0):.1f} s · NPIB clusters k = {sim.params.get('k')}"
)

# a click on any heatmap chooses the pair (and moves the selectors below)
ui.absorb_heatmap_clicks()
ui.init_pair_selectors(sim.n_layers)
st.markdown("**Layer pair for the planner** — click a cell of any heatmap, or choose here:")
c1, c2, c3, c4 = st.columns([1, 1, 1, 2], vertical_alignment="bottom")
a = c1.selectbox("Layer A", sim.layers, key=ui.W_PAIR_A)
b = c2.selectbox("Layer B", sim.layers, key=ui.W_PAIR_B)
pair = (min(a, b), max(a, b))
ui.set_pair(a, b)
if a != b:
    vals = " · ".join(f"{m}: {sim.matrices[m][a, b]:.3f}" for m in ui.MEASURES)
    c4.caption(f"layer {pair[0]} vs {pair[1]} — {vals}")
adjacent = b - a in (1, -1)
if c3.button(
    "Add merge to plan" if adjacent or a == b else f"Add layers {pair[0]}–{pair[1]}…",
    key="add_pair_pick",
    disabled=a == b,
):
    if adjacent:
        try:
            pick = ui.pair_picks(pair, "merge")
            ui.add_pick(pick)
            st.toast(f"Added: {ui.describe_pick(pick)} (see the Plan page)")
        except MkaInputError as e:
            st.error(str(e))
    else:
        st.session_state[ui.PENDING_PAIR] = pair
ui.pending_pair_choice(sim)

c1, c2 = st.columns([1, 1])
layout = c1.radio("Layout", ["Side by side", "Tabs"], key="heatmap_layout", horizontal=True)
show_spread = c2.toggle(
    "Show the spread maps (how much each cell moves between resamples)",
    False,
    key="heatmap_spread",
    disabled=stab is None,
)


def draw(measure, container):
    if show_spread and stab is not None:
        container.plotly_chart(
            spread_figure(measure, stab.spread[measure], sim.layers),
            key=f"spread_{measure}",
            config={"displayModeBar": False},
        )
    else:
        fig = heatmap_figure(measure, sim.matrices[measure], sim.layers, pair if a != b else None)
        container.plotly_chart(
            fig,
            key=ui.heatmap_chart_key(measure),
            on_select="rerun",
            selection_mode="points",
            config={"displayModeBar": False},
        )
    ui.stability_note(container, stab, measure)
    container.caption(ui.MEASURE_HELP[measure])


if layout == "Tabs":
    for measure, tab in zip(ui.MEASURES, st.tabs([ui.MEASURE_NAMES[m] for m in ui.MEASURES])):
        draw(measure, tab)
else:
    for row in (ui.MEASURES[:2], ui.MEASURES[2:]):
        for measure, col in zip(row, st.columns(2)):
            draw(measure, col)

st.plotly_chart(bi_figure(sim.bi, sim.layers, pair if a != b else None), key="bi_chart")
st.caption("Orange: the lowest fifth (ShortGPT drops these first); red: the chosen pair.")
ui.stability_note(st, stab, "bi")

st.subheader("Downloads")
cols = st.columns(len(ui.MEASURES) + 1)
for measure, col in zip(ui.MEASURES, cols):
    col.download_button(
        f"{measure}.csv",
        ui.matrix_csv(sim, measure),
        file_name=f"{measure}.csv",
        mime="text/csv",
        key=f"dl_{measure}",
    )
cols[-1].download_button(
    "Full result (.zip)",
    ui.similarity_zip(sim),
    file_name="mka-similarity.zip",
    mime="application/zip",
    key="dl_similarity_zip",
    help="similarity.npz (matrices, BI, diffusion embeddings), similarity.json (parameters), CSVs",
)
st.page_link(
    "pages/7_Importance.py",
    label="Check which measure predicts the real damage of removing a layer",
    icon=":material/troubleshoot:",
)
st.page_link(
    "pages/3_Manifold.py",
    label="Next: look at the layers' manifolds",
    icon=":material/arrow_forward:",
)
st.page_link("pages/4_Plan.py", label="Or go straight to planning", icon=":material/arrow_forward:")
