"""Manifold page: 2-D views (diffusion map, UMAP, PCA) of each layer's rows, two layers side by
side, and an animation through the layers."""

import streamlit as st

from mka_core import ui
from mka_core.errors import MkaInputError
from mka_core.figures.manifold import manifold_animation, manifold_figure

ui.page_setup("Layer manifolds", ":material/scatter_plot:")
ui.explain(
    "Each dot is one calibration sample as a layer sees it (its pooled hidden state, hundreds "
    "of dimensions), drawn in 2-D. The **diffusion map** is what MKA uses: it keeps the shape "
    "of the data as a random walk between nearby samples sees it, so clusters and curves "
    "survive. NPIB compares two layers by clustering these embeddings. If two layers arrange "
    "the samples alike, their pictures look alike (up to a flip or rotation: an axis's sign "
    "means nothing). UMAP and PCA are shown for comparison only. The axes cover the bulk of the "
    "points; the few outliers a diffusion map often has are drawn at the edge as open diamonds."
)
analysis = ui.require_analysis()
if analysis.activations is None:
    st.info("This analysis was read back without its activations: capture again to see them.")
    st.stop()
sim = analysis.similarity
labels = list(analysis.activations.labels)
n = sim.n_layers

c1, c2 = st.columns([1, 2])
method = c1.selectbox(
    "Projection",
    list(ui.PROJECTION_NAMES),
    format_func=ui.PROJECTION_NAMES.get,
    key="manifold_method",
)
pair = st.session_state.get(ui.PAIR) or (max(0, n // 2 - 1), min(n - 1, n // 2))
layer = c2.slider("Layer", 0, n - 1, pair[0], key="manifold_layer")
if method == "umap" and not ui.umap_cached(layer):
    st.info(
        "UMAP compiles itself the first time it runs in this server (about 20 s on this kind of "
        "CPU), then takes a second or two per layer; views already computed are cached."
    )

try:
    with st.spinner(f"{ui.PROJECTION_NAMES[method]} of layer {layer}…"):
        y = ui.projection(analysis, layer, method)
    st.plotly_chart(
        manifold_figure(y, labels, f"layer {layer} — {ui.PROJECTION_NAMES[method]}", height=460),
        key="manifold_single",
    )
except MkaInputError as e:
    st.error(str(e))

st.subheader("Two layers side by side")
st.caption("Starts from the pair chosen on the Similarity page.")
c1, c2 = st.columns(2)
la = c1.number_input("Left layer", 0, n - 1, pair[0], key="manifold_left")
lb = c2.number_input("Right layer", 0, n - 1, pair[1], key="manifold_right")
try:
    with st.spinner("projecting…"):
        ya, yb = ui.projection(analysis, la, method), ui.projection(analysis, lb, method)
        if method != "umap":
            yb = ui.align_signs(ya, yb)
    c1.plotly_chart(manifold_figure(ya, labels, f"layer {la}"), key="manifold_left_chart")
    c2.plotly_chart(manifold_figure(yb, labels, f"layer {lb}"), key="manifold_right_chart")
    if la != lb:
        st.caption(
            f"NPIB {sim.matrices['npib'][la, lb]:.3f} · cosine "
            f"{sim.matrices['cosine'][la, lb]:.3f} · CKA {sim.matrices['cka'][la, lb]:.3f} "
            f"between layers {la} and {lb}"
        )
except MkaInputError as e:
    st.error(str(e))

with st.expander("Animate through all layers"):
    st.caption("Press play, or drag the slider under the chart. Axes are fixed across layers.")
    if st.button("Build the animation", key="manifold_animate"):
        try:
            with ui.progress_status(f"{ui.PROJECTION_NAMES[method]} of every layer") as progress:
                frames = ui.all_projections(analysis, method, progress=progress)
            st.plotly_chart(manifold_animation(frames, labels, method), key="manifold_anim_chart")
        except MkaInputError as e:
            st.error(str(e))
