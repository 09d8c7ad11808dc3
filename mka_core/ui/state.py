"""Per-session state of the app: the session-state keys (spelled here once), the model spec, and progress boxes that can be stopped.

A long computation reports progress through `progress_status`, whose callback also stops the work
when the user presses **Stop** (any click reruns the script, and Streamlit interrupts the running
one at its next call) or when the browser session has gone away (a reload or a closed tab): the
callback raises `WorkStopped`, which unwinds the library's loops, so no core stays busy for a page
nobody sees.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import streamlit as st
from streamlit.runtime import Runtime
from streamlit.runtime.scriptrunner import get_script_run_ctx

from mka_core.errors import MkaInputError, ProgressFn
from mka_core.models.loading import pick_device, pick_dtype

# ---------------------------------------------------------------------------------------------
# session-state keys

WORKSPACE = "mka_workspace"  # name of the workspace this session works in
MODEL_SPEC = "mka_model_spec"  # ModelSpec of the loaded (original) model
ANALYSIS = "mka_analysis"  # pipeline.Analysis in use
ANALYSIS_INFO = "mka_analysis_info"  # dict: what the analysis was made from (shown to the user)
PAIR = "mka_pair"  # (layer_a, layer_b) chosen on a heatmap or with the selectors
PENDING_PAIR = "mka_pending_pair"  # a non-adjacent pair clicked: what to do is asked first
CLICKS_SEEN = "mka_clicks_seen"  # chart key -> last selection absorbed (so a click acts once)
PICKS = "mka_picks"  # manual picks for the planner: [{"op": "merge"|"drop", "layers": [...]}]
PLAN = "mka_plan"  # plan.Plan to run
PLAN_ORIGIN = "mka_plan_origin"  # how the plan was made: "budget: mka", "manual", "imported: f"
RUNS = "mka_runs"  # list of pipeline.Run, oldest first (only the newest keep their model)
HISTORY = "mka_history"  # list of dict rows, one per run (MKA, TransAct, ...)
EXPORTS = "mka_exports"  # run index -> folder it was exported to
TRANSACT = "mka_transact"  # {"run": index into RUNS, "report": TransActReport}: the latest prune
HEAL = "mka_heal"  # {"run": healed run index, "from": its source index, "report": HealReport}
COMPARE = "mka_compare"  # compare.CompareResult of the last sweep
SIDEBAR_SLOT = "mka_sidebar_slot"  # this run's sidebar placeholder for the session status
WIDGET_OPTIONS = "mka_widget_options"  # widget key -> the options it was last drawn with
RESTORE_NOTE = "mka_restore_note"  # what was restored from the workspace (shown once)

# widget keys that other code sets (a click on a heatmap moves the layer selectors)
W_PAIR_A = "w_pair_a"
W_PAIR_B = "w_pair_b"

KEEP_MODELS = 3  # compressed models kept in memory for export; older runs keep their numbers only
ZIP_LIMIT = 200 * 2**20  # offer a zip download of an exported model up to this size
DEFAULT_SOURCE = "bundled:smollm2-135m"
TINY_SOURCE = "tiny:llama"
MEASURES = ("npib", "cosine", "angular", "cka")
MEASURE_HELP = {
    "npib": "Normalised mutual information between the cluster codes of the two layers' "
    "diffusion-map embeddings: 1 = the layers organise the samples the same way.",
    "cosine": "Mean cosine between the two layers' pooled outputs, sample by sample.",
    "angular": "arccos(cosine)/π: 0 = same direction. The colour scale is reversed so that "
    "similar layers are bright here too.",
    "cka": "Linear centred kernel alignment: 1 = the representations match up to rotation "
    "and scale.",
}
DONE_ICON = ":material/check_circle:"
TODO_ICON = ":material/radio_button_unchecked:"


class WorkStopped(MkaInputError):
    """The user pressed Stop, or the browser session went away: the work was abandoned."""


# ---------------------------------------------------------------------------------------------
# the model's identity


@dataclass(frozen=True)
class ModelSpec:
    """Everything that decides which model a load gives: the cache key."""

    source: str
    device: str  # resolved: cpu, cuda, cuda:1, mps
    dtype: str  # resolved: float32, bfloat16, float16
    seed: int
    offload: bool | None = None  # None: by the memory rule; True: streamed; False: in memory

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "device": self.device,
            "dtype": self.dtype,
            "seed": self.seed,
            "offload": self.offload,
        }


OFFLOAD_CHOICES = {"auto": None, "in memory": False, "streamed from disk": True}


def resolve_spec(
    source: str, device: str = "auto", dtype: str = "auto", seed: int = 0, offload=None
) -> ModelSpec:
    """Resolve "auto" device and dtype now, so the cache key says what really runs."""

    if not isinstance(source, str) or not source.strip():
        raise MkaInputError("model source is empty; choose the bundled model or give a path or id")
    dev = pick_device(device)
    dt = str(pick_dtype(dev, dtype)).replace("torch.", "")
    return ModelSpec(source.strip(), dev, dt, int(seed), offload)


# ---------------------------------------------------------------------------------------------
# page scaffolding


def init_state() -> None:
    for key, value in ((PICKS, []), (RUNS, []), (HISTORY, []), (CLICKS_SEEN, {}), (EXPORTS, {})):
        if key not in st.session_state:
            st.session_state[key] = value


def explain(text: str) -> None:
    """The short "what is this?" note beside a step, for teaching demos."""
    with st.expander("What is this?", expanded=False):
        st.markdown(text)


# ---------------------------------------------------------------------------------------------
# progress that can be stopped


def _session_alive() -> bool:
    """False once this script run's browser session has disconnected (a reload, a closed tab)."""
    ctx = get_script_run_ctx()
    if ctx is None or not Runtime.exists():
        return True  # AppTest and bare scripts run without a server
    return Runtime.instance().is_active_session(ctx.session_id)


@contextlib.contextmanager
def progress_status(label: str, stop: bool = True) -> Iterator[ProgressFn]:
    """A status box with a progress bar (and a Stop button); yields the library's progress
    callback. On success the box collapses to "label: done"; on an error it turns red and the
    error propagates (pages show MkaInputError, WorkStopped included, with st.error)."""
    status = st.status(label, expanded=True)
    if stop:
        # a click reruns the script: Streamlit interrupts this run at its next call, here the
        # next progress update, and the rerun no longer asks for the work
        status.button("Stop", icon=":material/stop_circle:", key=f"stop_{label}")
    bar = status.progress(0.0, text="starting…")

    def progress(fraction: float, message: str) -> None:
        if not _session_alive():
            raise WorkStopped(f"{label}: stopped, the browser session went away")
        bar.progress(min(max(float(fraction), 0.0), 1.0), text=message)

    try:
        yield progress
    except BaseException:
        status.update(label=f"{label}: stopped or failed", state="error", expanded=False)
        raise
    bar.progress(1.0, text="done")
    status.update(label=f"{label}: done", state="complete", expanded=False)


def follow_newest(widget_key: str, options: list, newest=None) -> None:
    """Point a selectbox at `newest` (default: the last option) whenever its options change.

    Call before drawing the widget, and draw it without `index`. A selectbox keyed by the user
    keeps its value when its options change (a new run would not be selected) and keeps None
    when it was first drawn with no options."""
    seen = st.session_state.setdefault(WIDGET_OPTIONS, {})
    options = list(options)
    if seen.get(widget_key) != options or st.session_state.get(widget_key) not in options:
        seen[widget_key] = options
        pick = newest if newest in options else (options[-1] if options else None)
        st.session_state[widget_key] = pick
