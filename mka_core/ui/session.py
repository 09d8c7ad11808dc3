"""The session's work kept in a workspace on disk (`mka_core.workflows.workspace`): bound through the page
URL (``?ws=name``), so a reload or a server restart resumes it; saved after every action.

A session starts without a workspace and gets one on its first action (loading a model); the
home page lists workspaces to resume or start. Opening another workspace clears everything of the
previous one from the session before restoring, so nothing leaks between them.
"""

from __future__ import annotations

import logging

import streamlit as st

from mka_core.compression.heal import HealReport
from mka_core.compression.transact import TransActReport
from mka_core.errors import MkaInputError, ProgressFn
from mka_core.ui import state as S
from mka_core.ui.resources import _cached_analysis, _cached_model, current_model
from mka_core.workflows.workspace import Workspace, new_name

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
    S.init_state()


def new_workspace() -> Workspace:
    clear_session()
    st.session_state.pop(S.WORKSPACE, None)
    return ensure()


def open_workspace(name: str) -> None:
    """Make `name` this session's workspace and restore what it holds (the model is loaded
    again from its spec; the analysis, plan and runs are read from their files)."""

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


def save_state() -> None:
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
    save_state()


def save_plan(plan) -> None:
    ensure().save_plan(plan)
    save_state()


def save_run(index: int, run, report=None, kind: str | None = None) -> None:
    ws = ensure()
    ws.save_run(index, run)
    if report is not None and kind:
        ws.save_report(f"{kind}-{index + 1:04d}", report)
    save_state()


def exports_dir():
    return ensure().exports_dir


def load_model(
    source: str,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    progress: ProgressFn | None = None,
    offload=None,
    save: bool = True,
):
    """Load (or fetch from the cache) a model and make it the session's model.

    Loading a different model forgets the analysis, picks and plan made for the previous one
    (they name its layers); the history of runs stays. Every loading failure is a one-line
    MkaInputError (a garbage file included), never a traceback."""
    spec = S.resolve_spec(source, device, dtype, seed, offload)
    try:
        loaded = _cached_model(
            spec.source, spec.device, spec.dtype, spec.seed, spec.offload, progress=progress
        )
    except MkaInputError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise MkaInputError(
            f"could not load {spec.source}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        ) from None
    if st.session_state.get(S.MODEL_SPEC) != spec:
        for key in (
            S.ANALYSIS,
            S.ANALYSIS_INFO,
            S.PAIR,
            S.PLAN,
            S.PLAN_ORIGIN,
            S.W_PAIR_A,
            S.W_PAIR_B,
            S.PENDING_PAIR,
        ):
            st.session_state.pop(key, None)
        st.session_state[S.PICKS] = []
        st.session_state[S.CLICKS_SEEN] = {}
        st.session_state[S.MODEL_SPEC] = spec
    if save:
        save_state()
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
    """Capture activations of the session's model and compute every measure (cached, and kept
    in the workspace so a reload does not capture again)."""
    loaded = current_model()
    if loaded is None:
        raise MkaInputError("load a model first (Model page)")
    spec = st.session_state[S.MODEL_SPEC]
    key = (spec, data_key, int(n_samples), int(max_tokens), pooling, int(seed))
    analysis = _cached_analysis(
        key, loaded, data, int(n_samples), int(max_tokens), pooling, int(seed), progress
    )
    st.session_state[S.ANALYSIS] = analysis
    kind = data_key.split(":")[0] if ":" in data_key else data_key
    st.session_state[S.ANALYSIS_INFO] = {
        "data": kind,
        "data_key": data_key,
        "data_arg": data if isinstance(data, str) else None,
        "n_samples": int(n_samples),
        "max_tokens": int(max_tokens),
        "pooling": pooling,
        "n_rows": analysis.activations.n_rows,
    }
    for k in (S.PAIR, S.W_PAIR_A, S.W_PAIR_B, S.PENDING_PAIR):
        st.session_state.pop(k, None)
    st.session_state[S.CLICKS_SEEN] = {}
    save_analysis(analysis, docs=None if isinstance(data, str) else data)
    return analysis
