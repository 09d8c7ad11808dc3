"""MKA Studio: `streamlit run app.py`. The pages and their order in the sidebar."""

import streamlit as st

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
