"""Home page: what the app does, workspaces to resume or start, and a one-click start."""

import streamlit as st

from mka_core import ui
from mka_core.errors import MkaInputError
from mka_core.workflows.workspace import list_workspaces, root

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
   (NPIB from the MKA paper, cosine, angular distance, CKA), with how far each can be trusted.
3. **Manifold** — look at how each layer arranges the samples (diffusion maps, UMAP, PCA).
4. **Plan** — choose layers to merge or drop: by hand from the heatmap, or a budget and a planner.
5. **Results** — apply the plan to a copy of the model, compare perplexity, fidelity, size and
   speed, and export the compressed model, the plan JSON or a mergekit config.
6. **TransAct**, **What matters** (the real damage of each layer against each measure's
   prediction) and **Compare** (every planner at several budgets, in one table).
"""
)

st.subheader("Where you are")
cols = st.columns(4)
for col, (name, done, detail) in zip(cols, ui.state_steps()):
    with col.container(border=True):
        st.markdown(f"{ui.DONE_ICON if done else ui.TODO_ICON} **{name}**")
        st.caption(detail)

st.subheader("Workspaces")
st.caption(
    f"Your work (the model, the analysis, plans, runs and their numbers) is kept on disk in a "
    f"workspace, so a reload or a restart of the server resumes it. Folder: `{root()}` (set "
    "`MKA_STUDIO_WORKSPACES` to move it)."
)
current = st.session_state.get(ui.WORKSPACE)
spaces = list_workspaces()
c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
if spaces:
    names = [w["name"] for w in spaces]
    by = {w["name"]: w for w in spaces}
    pick = c1.selectbox(
        "Resume a workspace",
        names,
        index=names.index(current) if current in names else 0,
        key="home_workspace",
        format_func=lambda n: (
            f"{n} — {by[n]['model'] or 'no model'}, {by[n]['runs']} run(s), "
            f"updated {by[n]['updated'][:16].replace('T', ' ')}"
            + (" (open)" if n == current else "")
        ),
    )
    if c2.button("Open", key="home_open_ws", disabled=pick == current):
        try:
            ui.open_workspace(pick)
            st.rerun()
        except MkaInputError as e:
            st.error(str(e))
else:
    c1.caption("No workspace yet: the first model you load starts one.")
if st.button("Start a new workspace", key="home_new_ws", icon=":material/add:"):
    ui.new_workspace()
    st.rerun()

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
    "al. 2024; angular distance — Gromov et al. 2024; LaCo — Yang et al. 2024; SLEB — Song et "
    "al. 2024; TransAct — Shen et al. 2024. Everything runs locally; nothing is uploaded anywhere."
)
