"""What matters: how far each similarity measure can be trusted (stability), and what removing
each layer really costs against what each measure predicts (proxy against truth)."""

import pandas as pd
import streamlit as st

from mka_core import ui
from mka_core.compression.importance import proxies, proxy_vs_truth
from mka_core.errors import MkaInputError
from mka_core.figures.similarity import importance_figure

ui.page_setup("What really matters", ":material/troubleshoot:")
ui.explain(
    "A similarity heatmap is a **proxy**: it guesses which layers can go. Two questions decide "
    "whether to trust it. **Is it stable?** Recompute it on other rows of the same data: a "
    "measure whose ranking changes between two halves of the calibration text is describing the "
    "sample, not the model. **Does it predict the damage?** Remove each layer for real and "
    "measure how much the calibration loss rises: that is the truth the proxy stands in for. "
    "The Spearman correlation between the proxy and the real damage says how well a planner "
    "using that proxy can do; the loss-guided planners (`sleb`, `mka-loss`) skip the proxy and "
    "use the damage itself."
)
analysis = ui.require_analysis()
loaded = ui.require_model()
sim, stab = analysis.similarity, analysis.stability
names = {**ui.MEASURE_NAMES, "bi": "Block Influence"}

st.subheader("How far each measure can be trusted")
if stab is None:
    st.info("Stability needs at least 32 rows: capture more samples on the Similarity page.")
else:
    rows = []
    for m in ("npib", "cosine", "angular", "cka", "bi"):
        sh, bs = stab.split_half[m], stab.bootstrap[m]
        rows.append(
            {
                "measure": names[m],
                "split-half, all pairs": sh["all"],
                "split-half, adjacent pairs": sh["adjacent"],
                "bootstrap, all pairs": bs["all"],
                "bootstrap, adjacent pairs": bs["adjacent"],
                "reading": stab.reading(m),
            }
        )
    st.dataframe(
        pd.DataFrame(rows),
        hide_index=True,
        key="stability_table",
        column_config={
            c: st.column_config.NumberColumn(c, format="%.2f")
            for c in (
                "split-half, all pairs",
                "split-half, adjacent pairs",
                "bootstrap, all pairs",
                "bootstrap, adjacent pairs",
            )
        },
    )
    st.caption(
        f"Spearman between the measure on two halves of the calibration documents "
        f"({stab.params.get('half_rows')} rows), and the mean between {stab.n_boot} bootstrap "
        f"resamples. Adjacent pairs are what the merge planners read. {stab.seconds:.1f} s, no "
        "forward pass."
    )

st.subheader("The real damage of removing each layer")
imp = analysis.importance
defaults = ui.importance_defaults(loaded)
with st.form("importance_form"):
    c1, c2 = st.columns(2)
    n_samples = c1.number_input(
        "Calibration samples",
        2,
        max(2, analysis.batch.n_samples),
        min(defaults["n_samples"], analysis.batch.n_samples),
        key="imp_samples",
        help="Each layer is dropped alone (and each adjacent pair merged) and the loss measured "
        "on these samples; the unchanged layers below are computed once.",
    )
    rule = c2.selectbox(
        "α of the merges", ["similarity", "fixed"], key="imp_alpha", help="similarity: α = NPIB"
    )
    go = st.form_submit_button("Measure the real damage", type="primary", key="imp_run")
if go:
    try:
        with ui.progress_status("Dropping each layer and merging each pair") as progress:
            imp = ui.measure_importance(n_samples, rule, progress=progress)
    except MkaInputError as e:
        st.error(str(e))
if imp is None:
    st.info(
        "Press **Measure the real damage** (on a CPU it takes about a minute on the bundled "
        "model with 8 samples)."
    )
    st.stop()

table = proxy_vs_truth(sim, imp)
pred = proxies(sim)
c1, c2 = st.columns([1, 2])
measure = c1.selectbox(
    "Compare with",
    list(pred),
    format_func=lambda m: names.get(m, m),
    key="imp_measure",
)
c1.metric(
    "Spearman (proxy, drop-one damage)",
    "–" if table[measure]["drop"] is None else f"{table[measure]['drop']:.2f}",
    help="1: the measure ranks the layers exactly as removing them hurts; 0: no relation.",
)
c1.metric(
    "Spearman (proxy, merge damage)",
    "–" if table[measure]["merge"] is None else f"{table[measure]['merge']:.2f}",
)
c2.plotly_chart(
    importance_figure(imp.drop, pred[measure]["drop"], sim.layers, names.get(measure, measure)),
    key="importance_chart",
    config={"displayModeBar": False},
)
st.dataframe(
    pd.DataFrame(
        [
            {"measure": names.get(m, m), "drop-one": v["drop"], "merge-one": v["merge"]}
            for m, v in table.items()
        ]
    ),
    hide_index=True,
    key="proxy_table",
    column_config={
        "drop-one": st.column_config.NumberColumn("Spearman with drop-one damage", format="%.2f"),
        "merge-one": st.column_config.NumberColumn("Spearman with merge damage", format="%.2f"),
    },
)
st.caption(
    f"Base loss {imp.base_loss:.3f} on {imp.n_samples} samples ({imp.n_tokens} tokens); "
    f"drop-one {imp.drop_seconds:.1f} s, merge-one {imp.merge_seconds:.1f} s (one full pass "
    f"{imp.full_pass_seconds:.1f} s). Predictions: how much layer l changes the previous "
    "layer's output (Block Influence and angular: its own input and output), layers 1 and up."
)
st.page_link(
    "pages/4_Plan.py",
    label="Plan with the damage itself: the sleb and mka-loss planners",
    icon=":material/arrow_forward:",
)
