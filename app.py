"""MKA Studio: `streamlit run app.py`. The pages and their order in the sidebar."""

import streamlit as st

# Every session runs this script in its own thread, and a rerun starts a new thread before the
# replaced run has stopped, so several threads may start at once on a cold server. The first
# import of the app's library (and of transformers under it) happens here, before anything else:
# the other threads wait on this one package's import lock until it is complete, holding no
# other import lock, instead of racing through transformers' lazy packages (see
# mka_core.ui.resources).
import mka_core.ui  # noqa: F401

PAGES = [
    st.Page("pages/0_Home.py", title="Home", icon=":material/hub:", default=True),
    st.Page("pages/1_Model.py", title="Model", icon=":material/memory:"),
    st.Page("pages/2_Similarity.py", title="Similarity", icon=":material/grid_on:"),
    st.Page("pages/3_Manifold.py", title="Manifold", icon=":material/scatter_plot:"),
    st.Page("pages/4_Plan.py", title="Plan", icon=":material/account_tree:"),
    st.Page("pages/5_Results.py", title="Results", icon=":material/monitoring:"),
    st.Page("pages/6_TransAct.py", title="TransAct", icon=":material/content_cut:"),
    st.Page("pages/7_Importance.py", title="What matters", icon=":material/troubleshoot:"),
    st.Page("pages/8_Compare.py", title="Compare", icon=":material/compare_arrows:"),
]

st.navigation(PAGES).run()
