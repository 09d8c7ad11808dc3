"""Plan page: a budget with a planner, manual picks, or an imported plan file; the plan as a layer
diagram and a table; downloads of the plan JSON and a mergekit YAML."""

import streamlit as st

from mka_core import ui
from mka_core.errors import MkaInputError
from mka_core.figures.plans import plan_figure

ui.page_setup("Plan", ":material/account_tree:")
ui.explain(
    "A **plan** says what each layer of the compressed model is made of: kept as is, a weighted "
    "**merge** of neighbouring layers (θ = α·θ_a + (1−α)·θ_b, every weight of the block), or "
    "**dropped**. It is plain data: inspect it, download it as JSON, and apply it later here or "
    "with `python -m mka_core apply`. Nothing changes in the model until you run it on the "
    "Results page. Give a **budget** (how many layers to remove) and let a planner choose, or "
    "pick pairs yourself from the heatmaps."
)
loaded = ui.require_model()
analysis = st.session_state.get(ui.ANALYSIS)
n = loaded.n_layers
planners, alpha_rules = ui.planners()


def _build_choices(where, key: str, merges: bool) -> tuple[str, str]:
    """How merged layers are built and what corrects each cut (both need calibration data: the
    analysis' batch, when the plan is run on the Results page)."""
    c1, c2 = where.columns(2)
    merge = c1.radio(
        "Merged layers are built by",
        list(ui.MERGE_MODES),
        key=f"{key}_merge_mode",
        horizontal=True,
        disabled=not merges,
        help="; ".join(f"**{k}**: {v}" for k, v in ui.MERGE_MODES.items()),
    )
    comp = c2.radio(
        "Compensation of each cut",
        list(ui.COMPENSATIONS),
        key=f"{key}_compensation",
        horizontal=True,
        help="; ".join(f"**{k}**: {v}" for k, v in ui.COMPENSATIONS.items()),
    )
    where.caption(
        f"{merge if merges else 'average'}: {ui.MERGE_MODES[merge if merges else 'average']}. "
        f"{comp}: {ui.COMPENSATIONS[comp]}."
    )
    return (merge if merges else "average"), comp


tab_budget, tab_manual, tab_import = st.tabs(
    ["Budget + planner", "Manual picks", "Import a plan file"]
)

with tab_budget:
    if analysis is None:
        st.info(
            "A planner needs the similarity analysis: capture activations on the Similarity page."
        )
        st.page_link(
            "pages/2_Similarity.py",
            label="Go to the Similarity page",
            icon=":material/arrow_forward:",
        )
    else:
        c1, c2 = st.columns(2)
        planner = c1.selectbox(
            "Planner",
            planners,
            key="plan_planner",
            format_func=lambda p: f"{p} — {ui.planner_help(p)}",
        )
        budget_kind = c2.radio(
            "Budget as",
            ["layers to remove", "compression ratio"],
            key="plan_budget_kind",
            horizontal=True,
        )
        st.caption(
            "Which planner? `sleb` and `mka-loss` measure the damage of each candidate on "
            "calibration data; the others predict it from a similarity measure. On the bundled "
            "model the benchmark found `sleb` (or `angular`) best or within 1 % of best at 3, 6 "
            "and 10 layers removed, the paper's `mka` behind, and TransAct (the TransAct page) "
            "better than any plain layer removal at the same parameter count; with the `linear` "
            "compensation below, removals come within about 1.1× of TransAct and flattened "
            "`mka-loss` merges close to the best drop (BENCHMARKS.md, Quality frontier). For your "
            "model, "
            "**What matters** shows how well each measure predicts the real damage and **Compare** "
            "runs the planners side by side."
        )
        info = ui.planner_info(planner)
        if info.reads:  # how well the measure it ranks by reproduces on other rows
            ui.stability_note(st, analysis.stability, info.reads)
        if info.needs_batch:
            st.caption(
                "This planner measures the calibration loss of its candidates (16 samples): "
                "slower than the similarity planners, seconds per layer on a CPU."
            )
        with st.form("budget_form"):
            if budget_kind == "layers to remove":
                n_remove = st.slider(
                    "Layers to remove",
                    1,
                    max(1, n - 2),
                    min(max(1, n // 5), n - 2) if n > 2 else 1,
                    key="plan_n_remove",
                )
                ratio = None
            else:
                ratio = st.slider(
                    "Compression ratio (removed / original)",
                    0.0,
                    0.95,
                    0.2,
                    step=0.05,
                    key="plan_ratio",
                    help="The paper's definition: 14 of 32 layers = 43.75 %",
                )
                n_remove = None
            merges = bool(info.alpha_rules)
            c1, c2, c3 = st.columns(3)
            alpha_rule = c1.selectbox(
                "α rule (merges)",
                alpha_rules,
                key="plan_alpha_rule",
                format_func=lambda r: f"{r}: {ui.ALPHA_HELP.get(r, '')}",
                disabled=not merges,
                help=None if merges else "This planner drops layers or sets its own weights.",
            )
            alpha = c2.slider("α (fixed rule)", 0.0, 1.0, 0.5, step=0.05, key="plan_alpha")
            npib = c2.selectbox(
                "NPIB",
                ui.npib_kinds(),
                key="plan_npib",
                disabled=not info.npib_kinds,
                help="single: the analysis' NPIB, as the paper; bootstrap: NPIB averaged over "
                "resamples of the rows (steadier; see the stability notes)",
            )
            protect_first = c3.checkbox("Protect the first layer", True, key="plan_protect_first")
            protect_last = c3.checkbox("Protect the last layer", True, key="plan_protect_last")
            merge_mode, compensation = _build_choices(st, "plan", "merge" in info.does)
            make = st.form_submit_button("Make the plan", type="primary", key="plan_make")
        if make:
            try:
                settings = ui.PlanSettings(
                    planner=planner,
                    n_remove=n_remove,
                    ratio=ratio,
                    alpha_rule=alpha_rule,
                    alpha=alpha,
                    npib=npib,
                    protect_first=protect_first,
                    protect_last=protect_last,
                    merge_mode=merge_mode,
                    compensation=compensation,
                )
                with ui.progress_status(f"Planning with {planner}") as progress:
                    ui.make_budget_plan(settings, progress=progress)
            except MkaInputError as e:
                st.error(str(e))

with tab_manual:
    st.caption(
        "Add pairs from the Similarity page (click a cell, then *Add merge to plan*) or here. "
        "Picks apply in order; a merge takes consecutive layers."
    )
    with st.form("pick_form", clear_on_submit=False):
        c1, c2, c3, c4 = st.columns([1, 1, 1, 1], vertical_alignment="bottom")
        op = c1.selectbox("Operation", ["merge", "drop"], key="pick_op")
        first = c2.number_input("From layer", 0, n - 1, max(0, n // 2 - 1), key="pick_first")
        last = c3.number_input("To layer", 0, n - 1, max(0, n // 2), key="pick_last")
        add = c4.form_submit_button("Add pick", key="pick_add")
    if add:
        try:
            ui.add_pick(ui.pair_picks((first, last), op))
        except MkaInputError as e:
            st.error(str(e))
    if op == "merge" and abs(int(last) - int(first)) > 1:
        lo, hi = sorted((int(first), int(last)))
        st.caption(
            f"A merge of layers {lo}–{hi} makes {hi - lo + 1} layers into one (equal weights)."
        )
    picks = st.session_state[ui.PICKS]
    if not picks:
        st.info("No picks yet.")
    else:
        for i, pick in enumerate(picks):
            c1, c2 = st.columns([4, 1])
            c1.markdown(f"{i + 1}. **{ui.describe_pick(pick)}**")
            if c2.button("Remove", key=f"pick_remove_{i}"):
                ui.remove_pick(i)
                st.rerun()
        c1, c2, c3 = st.columns(3, vertical_alignment="bottom")
        manual_rule = c1.selectbox(
            "α rule",
            [r for r in alpha_rules if r != "search"] + ["search"],
            key="manual_alpha_rule",
        )
        manual_alpha = c2.slider("α (fixed rule)", 0.0, 1.0, 0.5, step=0.05, key="manual_alpha")
        manual_merge, manual_comp = _build_choices(st, "manual", True)
        if c3.button("Make the plan from these picks", type="primary", key="manual_make"):
            try:
                ui.make_manual_plan(
                    picks,
                    alpha_rule=manual_rule,
                    alpha=manual_alpha,
                    merge_mode=manual_merge,
                    compensation=manual_comp,
                )
            except MkaInputError as e:
                st.error(str(e))
        if st.button("Clear all picks", key="picks_clear"):
            ui.clear_picks()
            st.rerun()

with tab_import:
    uploaded = st.file_uploader(
        "Plan JSON (format mka-plan, version 1 or 2)", type=["json"], key="plan_upload"
    )
    if st.button("Import", key="plan_import", disabled=uploaded is None):
        try:
            _, warning = ui.import_plan(uploaded)
            st.success(f"Imported {uploaded.name}.")
            if warning:
                st.warning(warning)
        except MkaInputError as e:
            st.error(str(e))

plan = st.session_state.get(ui.PLAN)
st.divider()
if plan is None:
    st.info("No plan yet: make one above.")
    st.stop()

st.subheader("The plan")
m = st.columns(3)
m[0].metric("Layers", f"{plan.model.num_layers} → {plan.n_layers_out}")
m[1].metric("Removed", plan.n_removed)
m[2].metric("Compression ratio", f"{100 * plan.compression_ratio:.1f} %")
if not plan.refine.is_default:
    st.caption(
        f"Built with merges **{plan.refine.merge}** and compensation **{plan.refine.compensation}**"
        " on calibration data when it runs (Results page, `apply`)."
    )
method = plan.method
alpha_text = method.get("alpha") or "none (no merges)"
st.caption(
    f"made by **{st.session_state.get(ui.PLAN_ORIGIN, '?')}** · planner "
    f"**{method.get('planner', '?')}** · chosen by {method.get('similarity') or '–'} · α rule "
    f"{alpha_text} · for {plan.model.source} ({plan.model.architecture})"
)
c1, c2 = st.columns([3, 2])
with c1:
    st.plotly_chart(plan_figure(plan), key="plan_diagram", config={"displayModeBar": False})
with c2:
    st.markdown("**Output layers**")
    st.table(ui.plan_table(plan), hide_index=True, border="horizontal")
    st.markdown("**Steps** (on original layer indices, in order)")
    st.table(ui.steps_table(plan), hide_index=True, border="horizontal")

st.subheader("Downloads")
c1, c2 = st.columns(2)
c1.download_button(
    "Plan JSON",
    plan.to_json(),
    file_name=ui.plan_filename(plan),
    mime="application/json",
    key="dl_plan_json",
    type="primary",
    help="Apply it later: python -m mka_core apply FILE --out FOLDER",
)
yaml_text, why = ui.mergekit_yaml(plan)
if yaml_text is not None:
    c2.download_button(
        "mergekit YAML",
        yaml_text,
        file_name=ui.plan_filename(plan, "yaml"),
        mime="text/yaml",
        key="dl_plan_yaml",
    )
else:
    c2.caption(f"No mergekit YAML: {why}")
with st.expander("Plan JSON"):
    st.code(plan.to_json(), language="json")
st.page_link(
    "pages/5_Results.py", label="Next: run the plan and compare", icon=":material/arrow_forward:"
)
