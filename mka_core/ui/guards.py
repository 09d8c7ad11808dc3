"""Page scaffolding: page setup (binding the workspace), the sidebar's steps, the guards that stop
a page whose prerequisite is missing, and the user actions that refresh the sidebar after they
change what the session holds (loading a model, running an analysis)."""

from __future__ import annotations

import streamlit as st

from mka_core.errors import ProgressFn
from mka_core.ui import session
from mka_core.ui import state as S
from mka_core.ui.resources import current_model
from mka_core.ui.session import bind_workspace


def page_setup(title: str, icon: str) -> None:
    """Page config (wide layout), the session's workspace, the title and the sidebar status;
    call first on every page. icon: a Material Symbols name such as ":material/hub:"."""

    st.set_page_config(page_title=f"{title} · MKA Studio", page_icon=icon, layout="wide")
    S.init_state()
    bind_workspace()
    st.session_state[S.SIDEBAR_SLOT] = st.sidebar.empty()
    sidebar_status()
    st.title(f"{icon} {title}")
    note = st.session_state.pop(S.RESTORE_NOTE, None)
    if note:
        st.toast(note, icon=":material/restore:")
    for key in [k for k in st.session_state if str(k).startswith("stop_")]:
        if st.session_state.get(key) is True:  # this rerun was a click on a Stop button
            st.warning(
                f"Stopped: {key[len('stop_') :]}. Nothing of it was kept.",
                icon=":material/stop_circle:",
            )


def state_steps() -> list[tuple[str, bool, str]]:
    """(step, done, detail) for the stages of the flow, for the home page and the sidebar."""
    spec = st.session_state.get(S.MODEL_SPEC)
    info = st.session_state.get(S.ANALYSIS_INFO)
    plan = st.session_state.get(S.PLAN)
    history = st.session_state.get(S.HISTORY, [])
    picks = st.session_state.get(S.PICKS) or []
    if plan is not None:
        plan_text = (
            f"{plan.model.num_layers} → {plan.n_layers_out} layers "
            f"({st.session_state.get(S.PLAN_ORIGIN, '')})"
        )
    elif picks:
        plan_text = f"{len(picks)} pick{'s' if len(picks) != 1 else ''}, no plan made yet"
    else:
        plan_text = "none yet"
    return [
        (
            "Model",
            spec is not None,
            f"{spec.source} on {spec.device} ({spec.dtype})" if spec else "not loaded",
        ),
        (
            "Activations",
            info is not None,
            f"{info['n_samples']} samples × {info['max_tokens']} tokens, {info['data']}"
            if info
            else "not captured",
        ),
        ("Plan", plan is not None, plan_text),
        (
            "Results",
            bool(history),
            f"{len(history)} run(s) in this workspace" if history else "no runs yet",
        ),
    ]


def sidebar_status() -> None:
    """(Re)draw the session's progress in the sidebar; called again whenever a step completes,
    so the sidebar never lags behind the page."""
    slot = st.session_state.get(S.SIDEBAR_SLOT)
    if slot is None:
        return
    with slot.container():
        ws = st.session_state.get(S.WORKSPACE)
        st.markdown(f"**Workspace** `{ws}`" if ws else "**This session**")
        for name, done, detail in state_steps():
            icon = f":green[{S.DONE_ICON}]" if done else f":gray[{S.TODO_ICON}]"
            st.caption(f"{icon} **{name}**: {detail}")


def _stop_with_link(message: str, page: str, name: str) -> None:
    """What a page cannot do yet: say so, link the page that does it first, and st.stop()."""
    st.info(message)
    st.page_link(page, label=f"Go to the {name} page", icon=":material/arrow_forward:")
    st.stop()


def require_model():
    """The loaded model, or a pointer to the Model page and st.stop()."""

    loaded = current_model()
    if loaded is None:
        _stop_with_link(
            "No model loaded yet. Start on the **Model** page (or the home page's one-click start).",
            "pages/1_Model.py",
            "Model",
        )
    return loaded


def require_analysis():
    """The current analysis, or a pointer to the Similarity page and st.stop()."""
    require_model()
    analysis = st.session_state.get(S.ANALYSIS)
    if analysis is None:
        _stop_with_link(
            "No activations captured yet. Capture them on the **Similarity** page first.",
            "pages/2_Similarity.py",
            "Similarity",
        )
    return analysis


def require_plan():
    """The current plan, or a pointer to the Plan page and st.stop()."""
    require_model()
    plan = st.session_state.get(S.PLAN)
    if plan is None:
        _stop_with_link(
            "No plan yet. Make one on the **Plan** page (a budget, manual picks or a file).",
            "pages/4_Plan.py",
            "Plan",
        )
    return plan


def load_model(
    source: str,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    progress: ProgressFn | None = None,
    offload=None,
    save: bool = True,
):
    """`session.load_model`, then the sidebar shows the new state."""
    loaded = session.load_model(source, device, dtype, seed, progress, offload, save)
    sidebar_status()
    return loaded


def run_analysis(
    data,
    data_key: str,
    n_samples: int,
    max_tokens: int,
    pooling: str = "mean",
    seed: int = 0,
    progress: ProgressFn | None = None,
):
    """`session.run_analysis`, then the sidebar shows the new state."""
    analysis = session.run_analysis(data, data_key, n_samples, max_tokens, pooling, seed, progress)
    sidebar_status()
    return analysis
