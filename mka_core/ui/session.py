"""The session's work kept in a workspace on disk (`mka_core.workspace`): bound through the page
URL (``?ws=name``), so a reload or a server restart resumes it; saved after every action.

A session starts without a workspace and gets one on its first action (loading a model); the
home page lists workspaces to resume or start. Opening another workspace clears everything of the
previous one from the session before restoring, so nothing leaks between them.
"""

from __future__ import annotations

import logging

import streamlit as st

from ..errors import MkaInputError
from ..workspace import Workspace, new_name
from . import state as S

log = logging.getLogger(__name__)

_SESSION_KEYS = (
    S.MODEL_SPEC,
    S.ANALYSIS,
    S.ANALYSIS_INFO,
    S.PAIR,
    S.PENDING_PAIR,
    S.CLICKS_SEEN,
    S.PICKS,
    S.PLAN,
    S.PLAN_ORIGIN,
    S.RUNS,
    S.HISTORY,
    S.EXPORTS,
    S.TRANSACT,
    S.HEAL,
    S.COMPARE,
    S.W_PAIR_A,
    S.W_PAIR_B,
    "mka_original_eval",
)


def current() -> Workspace | None:
    name = st.session_state.get(S.WORKSPACE)
    if not name:
        return None
    try:
        return Workspace(name)
    except MkaInputError:  # deleted behind our back: start afresh on the next action
        st.session_state.pop(S.WORKSPACE, None)
        return None


def ensure() -> Workspace:
    """This session's workspace, created (and put in the URL) on first use."""
    ws = current()
    if ws is None:
        ws = Workspace(new_name(), create=True)
        st.session_state[S.WORKSPACE] = ws.name
        _set_url(ws.name)
    return ws


def _set_url(name: str | None) -> None:
    try:
        if name:
            st.query_params["ws"] = name
        elif "ws" in st.query_params:
            del st.query_params["ws"]
    except Exception:  # noqa: BLE001 - AppTest and old versions may lack query params
        pass


def bind_workspace() -> None:
    """Called by every page: resume the URL's workspace in a new session, keep the URL naming
    the session's workspace after page switches."""
    name = st.session_state.get(S.WORKSPACE)
    if name is None:
        try:
            wanted = st.query_params.get("ws")
        except Exception:  # noqa: BLE001
            wanted = None
        if wanted:
            try:
                open_workspace(wanted)
            except MkaInputError as e:
                st.warning(f"Could not resume workspace {wanted!r}: {e}")
                _set_url(None)
        return
    _set_url(name)


def clear_session() -> None:
    for key in _SESSION_KEYS:
        st.session_state.pop(key, None)
    S._init_state()


def new_workspace() -> Workspace:
    clear_session()
    st.session_state.pop(S.WORKSPACE, None)
    return ensure()


def open_workspace(name: str) -> None:
    """Make `name` this session's workspace and restore what it holds (the model is loaded
    again from its spec; the analysis, plan and runs are read from their files)."""
    from .resources import load_model

    ws = Workspace(name)
    state = ws.load_state()
    clear_session()
    st.session_state[S.WORKSPACE] = ws.name
    _set_url(ws.name)
    restored = []
    spec = state.get("model")
    loaded = None
    if spec:
        try:
            with st.spinner(f"Reopening workspace {name}: loading {spec['source']}…"):
                loaded = load_model(
                    spec["source"],
                    device=spec.get("device", "auto"),
                    dtype=spec.get("dtype", "auto"),
                    seed=int(spec.get("seed", 0)),
                    offload=spec.get("offload"),
                    save=False,
                )
            restored.append("the model")
        except MkaInputError as e:
            st.error(f"Workspace {name}: the model {spec['source']} could not be loaded: {e}")
    info = state.get("analysis")
    if loaded is not None and info:
        docs = ws.load_documents() if info.get("data") == "upload" else None
        data = docs if docs is not None else info.get("data_arg", "builtin")
        try:
            analysis = ws.load_analysis(loaded, data=data)
        except MkaInputError as e:
            analysis = None
            st.warning(f"Workspace {name}: its analysis could not be read back ({e})")
        if analysis is not None:
            st.session_state[S.ANALYSIS] = analysis
            st.session_state[S.ANALYSIS_INFO] = info
            restored.append("the analysis")
    if state.get("pair"):
        a, b = state["pair"]
        st.session_state[S.PAIR] = (a, b)
        st.session_state[S.W_PAIR_A], st.session_state[S.W_PAIR_B] = a, b
    st.session_state[S.PICKS] = list(state.get("picks") or [])
    plan = ws.load_plan()
    if plan is not None:
        st.session_state[S.PLAN] = plan
        st.session_state[S.PLAN_ORIGIN] = state.get("plan_origin", "restored")
        restored.append("the plan")
    runs = ws.load_runs()
    st.session_state[S.RUNS] = runs
    st.session_state[S.HISTORY] = list(state.get("history") or [])[: len(runs)]
    st.session_state[S.EXPORTS] = {int(k): v for k, v in (state.get("exports") or {}).items()}
    if runs:
        restored.append(f"{len(runs)} run(s)")
    _restore_reports(ws, state, len(runs))
    if restored:
        st.session_state[S.RESTORE_NOTE] = f"Resumed workspace {name}: " + ", ".join(restored)


def _restore_reports(ws: Workspace, state: dict, n_runs: int) -> None:
    from ..heal import HealReport
    from ..transact import TransActReport

    t = state.get("transact")
    if t and t.get("run", n_runs) < n_runs:
        rep = ws.load_report(f"transact-{t['run'] + 1:04d}", TransActReport)
        if rep is not None:
            st.session_state[S.TRANSACT] = {"run": t["run"], "report": rep}
    h = state.get("heal")
    if h and h.get("run", n_runs) < n_runs:
        rep = ws.load_report(f"heal-{h['run'] + 1:04d}", HealReport)
        if rep is not None:
            st.session_state[S.HEAL] = {"run": h["run"], "from": h["from"], "report": rep}


def save() -> None:
    """Write the session's choices into its workspace's state.json."""
    ws = ensure()
    spec = st.session_state.get(S.MODEL_SPEC)
    pair = st.session_state.get(S.PAIR)
    transact = st.session_state.get(S.TRANSACT)
    heal = st.session_state.get(S.HEAL)
    ws.save_state(
        {
            "model": spec.to_dict() if spec else None,
            "analysis": st.session_state.get(S.ANALYSIS_INFO),
            "pair": list(pair) if pair else None,
            "picks": st.session_state.get(S.PICKS) or [],
            "plan_origin": st.session_state.get(S.PLAN_ORIGIN),
            "history": st.session_state.get(S.HISTORY) or [],
            "exports": {str(k): v for k, v in (st.session_state.get(S.EXPORTS) or {}).items()},
            "transact": {"run": transact["run"]} if transact else None,
            "heal": {"run": heal["run"], "from": heal["from"]} if heal else None,
        }
    )


def save_analysis(analysis, docs=None) -> None:
    ws = ensure()
    ws.save_analysis(analysis)
    if docs is not None:
        ws.save_documents(docs)
    save()


def save_plan(plan) -> None:
    ensure().save_plan(plan)
    save()


def save_run(index: int, run, report=None, kind: str | None = None) -> None:
    ws = ensure()
    ws.save_run(index, run)
    if report is not None and kind:
        ws.save_report(f"{kind}-{index + 1:04d}", report)
    save()


def exports_dir():
    return ensure().exports_dir
