"""MKA Studio: the home page. `streamlit run app.py`."""

import streamlit as st

from mka_core import ui
from mka_core.errors import MkaInputError

ui.page_setup("MKA Studio", ":material/hub:")

st.markdown(
    "How redundant are the layers of a language model? Measure how similar they are, merge or "
    "drop the most similar ones, and see what it costs and what it saves — on a real model, "
    "on this machine."
)

st.markdown(
    """
1. **Model** — load a causal language model (the bundled SmolLM2-135M by default).
2. **Similarity** — run calibration text through it once and compare every pair of layers
   (NPIB from the MKA paper, cosine, angular distance, CKA).
3. **Manifold** — look at how each layer arranges the samples (diffusion maps, UMAP, PCA).
4. **Plan** — choose layers to merge or drop: by hand from the heatmap, or a budget and a planner.
5. **Results** — apply the plan to a copy of the model, compare perplexity, fidelity, size and
   speed, and export the compressed model, the plan JSON or a mergekit config.
"""
)

st.subheader("Where you are")
cols = st.columns(4)
for col, (name, done, detail) in zip(cols, ui.state_steps()):
    with col.container(border=True):
        st.markdown(f"{ui.DONE_ICON if done else ui.TODO_ICON} **{name}**")
        st.caption(detail)

st.subheader("Start")
left, right = st.columns(2)
with left.container(border=True):
    st.markdown("**One click: the bundled model**")
    st.caption(
        "Loads SmolLM2-135M-Instruct (30 layers) and captures activations on the built-in corpus "
        "with default settings, then opens the heatmaps. The first load converts the bundled "
        "GGUF file (~30 s); later loads take seconds."
    )
    start_bundled = st.button(
        "Start with SmolLM2-135M",
        type="primary",
        icon=":material/play_arrow:",
        key="home_start_bundled",
    )
with right.container(border=True):
    st.markdown("**Instant demo: a tiny random model**")
    st.caption(
        "A 6-layer random Llama built in code: every page works in seconds, the numbers mean "
        "nothing. Good for a first tour."
    )
    start_tiny = st.button(
        "Start with the tiny model", icon=":material/play_arrow:", key="home_start_tiny"
    )

if start_bundled or start_tiny:
    source = ui.DEFAULT_SOURCE if start_bundled else ui.TINY_SOURCE
    try:
        with ui.progress_status(f"Loading {source}") as progress:
            loaded = ui.load_model(source, progress=progress)
        defaults = ui.analysis_defaults(loaded)
        with ui.progress_status("Capturing activations and comparing layers") as progress:
            ui.run_analysis("builtin", "builtin", progress=progress, **defaults)
    except MkaInputError as e:
        st.error(str(e))
    else:
        st.switch_page("pages/2_Similarity.py")

st.divider()
st.caption(
    "Methods: MKA — Liu et al. 2024, *Pruning via Merging* (arXiv 2406.16330); ShortGPT — Men et "
    "al. 2024; angular distance — Gromov et al. 2024; LaCo — Yang et al. 2024. Everything runs "
    "locally; nothing is uploaded anywhere."
)
