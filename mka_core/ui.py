"""What the Streamlit pages share: session-state keys, cached loaders, progress, figures, formatting.

The only module of mka_core that imports Streamlit. Pages stay thin: a guard, inputs, one call into
this module (which calls the library), and rendering. Nothing here touches torch directly; the
library does the work and reports progress through the usual ``progress(fraction, message)``.

Caching: models live in ``st.cache_resource`` (shared, read-only; the key holds the source, the
*resolved* device and dtype, and the seed). Analyses are cached the same way, keyed by the model key
and every capture parameter. Per-user state (the chosen model, the analysis in use, the plan, the
runs) lives in ``st.session_state`` under the keys below, so moving between pages never recomputes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import tempfile
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from .errors import MkaInputError, ProgressFn

# ---------------------------------------------------------------------------------------------
# session-state keys: spelled here once, used everywhere

MODEL_SPEC = "mka_model_spec"  # ModelSpec of the loaded (original) model
ANALYSIS = "mka_analysis"  # pipeline.Analysis in use
ANALYSIS_INFO = "mka_analysis_info"  # dict: what the analysis was made from (shown to the user)
PAIR = "mka_pair"  # (layer_a, layer_b) chosen on a heatmap or with the selectors
CLICKS_SEEN = "mka_clicks_seen"  # chart key -> last selection absorbed (so a click acts once)
PICKS = "mka_picks"  # manual picks for the planner: [{"op": "merge"|"drop", "layers": [...]}]
PLAN = "mka_plan"  # plan.Plan to run
# how the plan was made: "budget: mka", "manual", "imported: f.json"
PLAN_ORIGIN = "mka_plan_origin"
RUNS = "mka_runs"  # list of pipeline.Run, oldest first (only the newest keep their model)
HISTORY = "mka_history"  # list of dict rows, one per run of the session (MKA, TransAct, ...)
EXPORTS = "mka_exports"  # run index -> folder it was exported to
TRANSACT = "mka_transact"  # {"run": index into RUNS, "report": TransActReport}: the latest prune
HEAL = "mka_heal"  # {"run": healed run index, "from": its source index, "report": HealReport}
SIDEBAR_SLOT = "mka_sidebar_slot"  # this run's sidebar placeholder for the session status

# widget keys that other code sets (a click on a heatmap moves the layer selectors)
W_PAIR_A = "w_pair_a"
W_PAIR_B = "w_pair_b"

KEEP_MODELS = 3  # compressed models kept in memory for export; older runs keep their numbers only
ZIP_LIMIT = 200 * 2**20  # offer a zip download of an exported model up to this size

DEFAULT_SOURCE = "bundled:smollm2-135m"
TINY_SOURCE = "tiny:llama"
MEASURES = ("npib", "cosine", "angular", "cka")
MEASURE_NAMES = {
    "npib": "NPIB (MKA)",
    "cosine": "Cosine similarity",
    "angular": "Angular distance",
    "cka": "Linear CKA",
}
MEASURE_HELP = {
    "npib": "Normalised mutual information between the cluster codes of the two layers' "
    "diffusion-map embeddings: 1 = the layers organise the samples the same way.",
    "cosine": "Mean cosine between the two layers' pooled outputs, sample by sample.",
    "angular": "arccos(cosine)/π: 0 = same direction. The colour scale is reversed so that "
    "similar layers are bright here too.",
    "cka": "Linear centred kernel alignment: 1 = the representations match up to rotation "
    "and scale.",
}


# ---------------------------------------------------------------------------------------------
# page scaffolding


def page_setup(title: str, icon: str) -> None:
    """Page config (wide layout), the title and the sidebar status; call first on every page.

    icon: a Material Symbols name such as ":material/hub:" (a font Streamlit ships, so it shows
    in any browser, unlike emoji)."""
    st.set_page_config(page_title=f"{title} · MKA Studio", page_icon=icon, layout="wide")
    _init_state()
    st.session_state[SIDEBAR_SLOT] = st.sidebar.empty()
    sidebar_status()
    st.title(f"{icon} {title}")


def _init_state() -> None:
    for key, value in (
        (PICKS, []),
        (RUNS, []),
        (HISTORY, []),
        (CLICKS_SEEN, {}),
        (EXPORTS, {}),
    ):
        if key not in st.session_state:
            st.session_state[key] = value


def explain(text: str) -> None:
    """The short "what is this?" note beside a step, for teaching demos."""
    with st.expander("What is this?", expanded=False):
        st.markdown(text)


def state_steps() -> list[tuple[str, bool, str]]:
    """(step, done, detail) for the four stages of the flow, for the home page and the sidebar."""
    spec = st.session_state.get(MODEL_SPEC)
    info = st.session_state.get(ANALYSIS_INFO)
    plan = st.session_state.get(PLAN)
    history = st.session_state.get(HISTORY, [])
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
        (
            "Plan",
            plan is not None,
            f"{plan.model.num_layers} → {plan.n_layers_out} layers "
            f"({st.session_state.get(PLAN_ORIGIN, '')})"
            if plan is not None
            else "none yet",
        ),
        (
            "Results",
            bool(history),
            f"{len(history)} run(s) this session" if history else "no runs yet",
        ),
    ]


DONE_ICON = ":material/check_circle:"
TODO_ICON = ":material/radio_button_unchecked:"


def sidebar_status() -> None:
    """(Re)draw the session's progress in the sidebar; called again whenever a step completes,
    so the sidebar never lags behind the page."""
    slot = st.session_state.get(SIDEBAR_SLOT)
    if slot is None:
        return
    with slot.container():
        st.markdown("**This session**")
        for name, done, detail in state_steps():
            icon = f":green[{DONE_ICON}]" if done else f":gray[{TODO_ICON}]"
            st.caption(f"{icon} **{name}**: {detail}")


def require_model():
    """The loaded model, or a pointer to the Model page and st.stop()."""
    loaded = current_model()
    if loaded is None:
        st.info(
            "No model loaded yet. Start on the **Model** page (or the home page's one-click start)."
        )
        st.page_link(
            "pages/1_Model.py", label="Go to the Model page", icon=":material/arrow_forward:"
        )
        st.stop()
    return loaded


def require_analysis():
    """The current analysis, or a pointer to the Similarity page and st.stop()."""
    require_model()
    analysis = st.session_state.get(ANALYSIS)
    if analysis is None:
        st.info("No activations captured yet. Capture them on the **Similarity** page first.")
        st.page_link(
            "pages/2_Similarity.py",
            label="Go to the Similarity page",
            icon=":material/arrow_forward:",
        )
        st.stop()
    return analysis


def require_plan():
    require_model()
    plan = st.session_state.get(PLAN)
    if plan is None:
        st.info("No plan yet. Make one on the **Plan** page (a budget, manual picks or a file).")
        st.page_link(
            "pages/4_Plan.py", label="Go to the Plan page", icon=":material/arrow_forward:"
        )
        st.stop()
    return plan


@contextlib.contextmanager
def progress_status(label: str) -> Iterator[ProgressFn]:
    """A status box with a progress bar; yields the library's progress callback.

    On success the box collapses to "label: done"; on an error it turns red and the error
    propagates (the page shows MkaInputError with st.error)."""
    status = st.status(label, expanded=True)
    bar = status.progress(0.0, text="starting…")

    def progress(fraction: float, message: str) -> None:
        bar.progress(min(max(float(fraction), 0.0), 1.0), text=message)

    try:
        yield progress
    except BaseException:
        status.update(label=f"{label}: failed", state="error", expanded=False)
        raise
    bar.progress(1.0, text="done")
    status.update(label=f"{label}: done", state="complete", expanded=False)


# ---------------------------------------------------------------------------------------------
# models


@dataclass(frozen=True)
class ModelSpec:
    """Everything that decides which model a load gives: the cache key."""

    source: str
    device: str  # resolved: cpu, cuda, cuda:1, mps
    dtype: str  # resolved: float32, bfloat16, float16
    seed: int
    offload: bool | None = None  # None: by the memory rule; True: streamed; False: in memory


OFFLOAD_CHOICES = {
    "auto": None,
    "in memory": False,
    "streamed from disk": True,
}


def resolve_spec(
    source: str, device: str = "auto", dtype: str = "auto", seed: int = 0, offload=None
) -> ModelSpec:
    """Resolve "auto" device and dtype now, so the cache key says what really runs."""
    from .models import pick_device, pick_dtype

    if not isinstance(source, str) or not source.strip():
        raise MkaInputError("model source is empty; choose the bundled model or give a path or id")
    dev = pick_device(device)
    dt = str(pick_dtype(dev, dtype)).replace("torch.", "")
    return ModelSpec(source.strip(), dev, dt, int(seed), offload)


class _Store:
    """Models and analyses shared by every session of this server, newest last.

    Held by st.cache_resource (one per process). The library's work runs outside any cached
    function, so its progress callback can drive a progress bar on the page (a cached function
    may not write into page elements made outside it)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.tables: dict[str, OrderedDict] = {"model": OrderedDict(), "analysis": OrderedDict()}

    def get(self, table: str, key):
        with self.lock:
            entries = self.tables[table]
            if key in entries:
                entries.move_to_end(key)
                return entries[key]
        return None

    def put(self, table: str, key, value, limit: int):
        with self.lock:
            entries = self.tables[table]
            entries[key] = value
            entries.move_to_end(key)
            while len(entries) > limit:
                entries.popitem(last=False)
        return value


@st.cache_resource
def _store() -> _Store:
    return _Store()


MAX_MODELS = 3
MAX_ANALYSES = 4


def _cached_model(source: str, device: str, dtype: str, seed: int, offload=None, progress=None):
    """The model for this exact (source, device, dtype, seed, offload), loaded once per server."""
    from .models import load_model

    key = (source, device, dtype, seed, offload)
    loaded = _store().get("model", key)
    if loaded is None:
        loaded = load_model(
            source, device=device, dtype=dtype, seed=seed, progress=progress, offload=offload
        )
        _store().put("model", key, loaded, MAX_MODELS)
    return loaded


def load_model(
    source: str,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    progress: ProgressFn | None = None,
    offload=None,
):
    """Load (or fetch from the cache) a model and make it the session's model.

    Loading a different model forgets the analysis, picks and plan made for the previous one
    (they name its layers); the history of runs stays."""
    spec = resolve_spec(source, device, dtype, seed, offload)
    loaded = _cached_model(
        spec.source, spec.device, spec.dtype, spec.seed, spec.offload, progress=progress
    )
    if st.session_state.get(MODEL_SPEC) != spec:
        for key in (ANALYSIS, ANALYSIS_INFO, PAIR, PLAN, PLAN_ORIGIN, W_PAIR_A, W_PAIR_B):
            st.session_state.pop(key, None)
        st.session_state[PICKS] = []
        st.session_state[CLICKS_SEEN] = {}
        st.session_state[MODEL_SPEC] = spec
    sidebar_status()
    return loaded


def current_model():
    """The session's model (from the cache, so instant), or None before any load."""
    spec = st.session_state.get(MODEL_SPEC)
    if spec is None:
        return None
    key = (spec.source, spec.device, spec.dtype, spec.seed, spec.offload)
    if _store().get("model", key) is None:  # evicted by other loads: load it again
        with st.spinner(f"Reloading {spec.source}…"):
            return _cached_model(*key)
    return _cached_model(*key)


def model_summary(loaded):
    from .models import summarize

    return summarize(loaded)


def on_gpu(loaded=None) -> bool:
    spec = st.session_state.get(MODEL_SPEC)
    device = loaded.device if loaded is not None else (spec.device if spec else "cpu")
    return not str(device).startswith("cpu")


# ---------------------------------------------------------------------------------------------
# calibration data and analysis


def analysis_defaults(loaded) -> dict:
    """Capture defaults: the spec's 128 × 128 on a GPU, a lighter 64 × 32 on a CPU (NPIB needs
    rows more than long samples: k = min(8, rows / 8) clusters, and too few saturate it at 1)."""
    if on_gpu(loaded):
        return {"n_samples": 128, "max_tokens": 128}
    return {"n_samples": 64, "max_tokens": 32}


def eval_defaults(loaded) -> dict:
    """Evaluation defaults: the spec's 8192 tokens in 512-token windows on a GPU; on a CPU a
    lighter 1024 in 256, and no speed timing (it repeats prefill and generation several times
    per model, minutes on a small CPU)."""
    if on_gpu(loaded):
        return {"budget_tokens": 8192, "window": 512, "with_speed": True}
    return {"budget_tokens": 1024, "window": 256, "with_speed": False}


def calibration_from_upload(uploaded) -> tuple[list, str]:
    """Documents from an uploaded .txt/.jsonl, and a key naming its content for the cache."""
    from .data import parse_text

    if uploaded is None:
        raise MkaInputError("no file uploaded; choose a .txt or .jsonl file")
    raw_bytes = uploaded.getvalue()
    if not raw_bytes.strip():
        raise MkaInputError(f"{uploaded.name} is empty")
    try:
        raw = raw_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise MkaInputError(f"{uploaded.name} is not UTF-8 text") from None
    kind = "jsonl" if uploaded.name.lower().endswith(".jsonl") else "txt"
    docs = parse_text(raw, uploaded.name, kind=kind)
    digest = hashlib.sha256(raw_bytes).hexdigest()[:16]
    return docs, f"upload:{uploaded.name}:{digest}"


def calibration_from_folder(folder: str) -> tuple[str, str]:
    """An MMLU-format folder path, checked; the path doubles as the data argument and cache key."""
    from .data import is_mmlu_folder

    path = Path(folder.strip()).expanduser() if folder else None
    if not folder or not folder.strip():
        raise MkaInputError("MMLU folder path is empty; type the folder that holds test/ and dev/")
    if not path.exists():
        raise MkaInputError(f"MMLU folder not found: {path}")
    if not is_mmlu_folder(path):
        raise MkaInputError(f"{path} is not an MMLU folder (expected a test/ sub-folder of CSVs)")
    return str(path), f"mmlu:{path.resolve()}"


def _cached_analysis(key: tuple, loaded, data, n_samples, max_tokens, pooling, seed, progress):
    from .pipeline import analyze

    analysis = _store().get("analysis", key)
    if analysis is None:
        analysis = analyze(
            loaded,
            data=data,
            n_samples=n_samples,
            max_tokens=max_tokens,
            pooling=pooling,
            seed=seed,
            progress=progress,
        )
        _store().put("analysis", key, analysis, MAX_ANALYSES)
    return analysis


def run_analysis(
    data,
    data_key: str,
    n_samples: int,
    max_tokens: int,
    pooling: str = "mean",
    seed: int = 0,
    progress: ProgressFn | None = None,
):
    """Capture activations of the session's model and compute every measure (cached)."""
    loaded = current_model()
    if loaded is None:
        raise MkaInputError("load a model first (Model page)")
    spec = st.session_state[MODEL_SPEC]
    key = (spec, data_key, int(n_samples), int(max_tokens), pooling, int(seed))
    analysis = _cached_analysis(
        key, loaded, data, int(n_samples), int(max_tokens), pooling, int(seed), progress
    )
    st.session_state[ANALYSIS] = analysis
    st.session_state[ANALYSIS_INFO] = {
        "data": data_key.split(":")[0] if ":" in data_key else data_key,
        "data_key": data_key,
        "n_samples": int(n_samples),
        "max_tokens": int(max_tokens),
        "pooling": pooling,
        "n_rows": analysis.activations.n_rows,
    }
    for key in (PAIR, W_PAIR_A, W_PAIR_B):
        st.session_state.pop(key, None)
    st.session_state[CLICKS_SEEN] = {}
    sidebar_status()
    return analysis


def analysis_key() -> str:
    """A string naming the current analysis (for st.cache_data of things derived from it)."""
    spec = st.session_state.get(MODEL_SPEC)
    info = st.session_state.get(ANALYSIS_INFO) or {}
    return repr((spec, sorted(info.items())))


# ---------------------------------------------------------------------------------------------
# heatmaps and the layer pair


def heatmap_chart_key(measure: str) -> str:
    return f"heatmap_{measure}"


def _scale_for(measure: str, m: np.ndarray) -> dict:
    if measure == "angular":
        return {"colorscale": "Viridis_r", "zmin": 0.0, "zmax": max(0.5, float(np.nanmax(m)))}
    if measure == "cosine":
        return {"colorscale": "Viridis", "zmin": min(0.0, float(np.nanmin(m))), "zmax": 1.0}
    return {"colorscale": "Viridis", "zmin": 0.0, "zmax": 1.0}


def heatmap_figure(measure: str, m: np.ndarray, layers: list[int], pair=None) -> go.Figure:
    """A square heatmap of one (L, L) measure, "layer i vs j: value" on hover.

    Plotly cannot select cells of a heatmap, so a grid of invisible markers lies over the cells:
    clicking a cell selects its marker, which Streamlit reports as the chosen layer pair."""
    n = len(layers)
    tick = max(1, -(-n // 16))  # at most ~16 labelled layers per axis
    fig = go.Figure()
    fig.add_trace(
        go.Heatmap(
            z=m,
            x=layers,
            y=layers,
            hoverinfo="skip",
            colorbar={"thickness": 12, "len": 0.9},
            **_scale_for(measure, m),
        )
    )
    xs, ys = np.meshgrid(layers, layers)  # row = y, column = x
    fig.add_trace(
        go.Scatter(
            x=xs.ravel(),
            y=ys.ravel(),
            mode="markers",
            marker={
                "size": max(5, min(28, 340 // max(n, 1))),
                "color": "rgba(0,0,0,0)",
                "symbol": "square",
            },
            customdata=np.asarray(m).ravel(),
            hovertemplate="layer %{y} vs %{x}: %{customdata:.3f}<extra></extra>",
            selected={"marker": {"color": "rgba(255,60,60,0.9)"}},
            unselected={"marker": {"opacity": 0}},
            showlegend=False,
        )
    )
    if pair is not None:
        a, b = pair
        for x, y in ((a, b), (b, a)):
            fig.add_shape(
                type="rect",
                x0=x - 0.5,
                x1=x + 0.5,
                y0=y - 0.5,
                y1=y + 0.5,
                line={"color": "#ff3c3c", "width": 2},
            )
    fig.update_layout(
        title={"text": MEASURE_NAMES[measure], "x": 0.5, "xanchor": "center"},
        height=430,
        margin={"l": 50, "r": 10, "t": 40, "b": 45},
        xaxis={"title": "layer", "range": [-0.5, n - 0.5], "constrain": "domain", "dtick": tick},
        yaxis={
            "title": "layer",
            "dtick": tick,
            "range": [n - 0.5, -0.5],  # layer 0 at the top, like a matrix
            "scaleanchor": "x",
            "constrain": "domain",
        },
        dragmode=False,
        hovermode="closest",
    )
    return fig


def absorb_heatmap_clicks() -> tuple[int, int] | None:
    """Turn a new click on any heatmap into the chosen pair (moving the layer selectors).

    Run before the selectors are drawn: a widget's value may only be set before it exists."""
    seen = st.session_state.setdefault(CLICKS_SEEN, {})
    for measure in MEASURES:
        key = heatmap_chart_key(measure)
        state = st.session_state.get(key)
        points = _selected_points(state)
        if not points:
            seen.pop(key, None)
            continue
        p = points[-1]
        pair = (int(round(float(p["y"]))), int(round(float(p["x"]))))
        if seen.get(key) == pair:
            continue
        seen[key] = pair
        if pair[0] == pair[1]:
            continue  # the diagonal: a layer with itself says nothing
        a, b = sorted(pair)
        st.session_state[W_PAIR_A] = a
        st.session_state[W_PAIR_B] = b
        st.session_state[PAIR] = (a, b)
    return st.session_state.get(PAIR)


def _selected_points(state) -> list:
    if not state:
        return []
    try:
        selection = state["selection"]
        return list(selection["points"] or [])
    except (KeyError, TypeError):
        return []


def init_pair_selectors(n_layers: int) -> None:
    """Give the layer selectors a starting pair (the middle of the model) unless one is chosen."""
    a = st.session_state.get(W_PAIR_A)
    b = st.session_state.get(W_PAIR_B)
    if not (isinstance(a, int) and isinstance(b, int) and 0 <= a < n_layers and 0 <= b < n_layers):
        mid = max(0, min(n_layers - 2, n_layers // 2))
        st.session_state[W_PAIR_A] = mid
        st.session_state[W_PAIR_B] = min(mid + 1, n_layers - 1)


def pair_picks(pair: tuple[int, int], op: str) -> dict:
    """A manual pick from a heatmap pair: the layers a..b (merges need consecutive layers)."""
    a, b = sorted(int(x) for x in pair)
    if op == "merge" and a == b:
        raise MkaInputError(f"a merge needs two different layers, got layer {a} twice")
    return {"op": op, "layers": list(range(a, b + 1))}


def add_pick(pick: dict) -> None:
    picks = st.session_state.setdefault(PICKS, [])
    if pick in picks:
        raise MkaInputError(f"{describe_pick(pick)} is already in the list")
    picks.append(pick)


def describe_pick(pick: dict) -> str:
    layers = pick["layers"]
    span = (
        f"layers {layers[0]}–{layers[-1]}"
        if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1))
        else "layers " + ", ".join(map(str, layers))
        if len(layers) > 1
        else f"layer {layers[0]}"
    )
    return f"{pick['op']} {span}"


def bi_figure(bi: np.ndarray, layers: list[int], pair=None) -> go.Figure:
    order = np.argsort(bi)
    colors = ["#4c6ef5"] * len(layers)
    for i in order[: max(1, len(layers) // 5)]:
        colors[i] = "#fab005"  # the lowest fifth: ShortGPT's first candidates
    if pair is not None:
        for i in pair:
            if 0 <= i < len(colors):
                colors[i] = "#ff3c3c"
    fig = go.Figure(
        go.Bar(
            x=layers,
            y=bi,
            marker_color=colors,
            hovertemplate="layer %{x}: BI %{y:.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        height=300,
        margin={"l": 50, "r": 10, "t": 30, "b": 45},
        xaxis={"title": "layer", "dtick": 1 if len(layers) <= 32 else None},
        yaxis={"title": "Block Influence"},
        title={
            "text": "Block Influence per layer (low = the block changes little)",
            "x": 0.5,
            "xanchor": "center",
        },
    )
    return fig


def matrix_csv(sim, measure: str) -> str:
    from .similarity import matrix_csv as _csv

    return _csv(sim.matrices[measure], sim.layers)


@st.cache_data(show_spinner=False, max_entries=4)
def _similarity_zip(key: str, _sim) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        out = _sim.save(tmp)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(Path(out).iterdir()):
                zf.write(f, f"mka-similarity/{f.name}")
    return buf.getvalue()


def similarity_zip(sim) -> bytes:
    """The full result (NPZ with matrices, BI and embeddings; JSON with parameters; CSVs) zipped."""
    return _similarity_zip(analysis_key(), sim)


# ---------------------------------------------------------------------------------------------
# manifolds


PROJECTION_NAMES = {"diffusion": "Diffusion map", "umap": "UMAP", "pca": "PCA"}


@st.cache_data(show_spinner=False, max_entries=64)
def _projection(key: str, layer: int, method: str, _analysis=None) -> np.ndarray:
    from .manifold import project_2d

    if method == "diffusion":
        # the analysis already holds each layer's diffusion coordinates: show the first two
        return np.asarray(_analysis.similarity.embeddings[layer][:, :2], dtype=np.float32)
    return project_2d(_analysis.activations.outputs[layer], method)


def projection(analysis, layer: int, method: str) -> np.ndarray:
    """(n_rows, 2) coordinates of one layer's rows (cached per analysis, layer and method)."""
    if not 0 <= layer < analysis.similarity.n_layers:
        raise MkaInputError(
            f"layer {layer} is out of range (0..{analysis.similarity.n_layers - 1})"
        )
    return _projection(analysis_key(), int(layer), method, _analysis=analysis)


def all_projections(analysis, method: str, progress: ProgressFn | None = None) -> list[np.ndarray]:
    """Every layer's 2-D view, signs aligned layer to layer so an animation does not flicker
    (an eigenvector's or a component's sign is arbitrary)."""
    n = analysis.similarity.n_layers
    out = []
    for layer in range(n):
        y = projection(analysis, layer, method).copy()
        if out and method != "umap":
            prev = out[-1]
            for c in range(2):
                if float(np.dot(y[:, c], prev[:, c])) < 0:
                    y[:, c] = -y[:, c]
        out.append(y)
        if progress:
            progress((layer + 1) / n, f"{PROJECTION_NAMES[method]}: layer {layer + 1}/{n}")
    return out


def align_signs(reference: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Flip y's axes to match `reference` (same rows): a diffusion or PCA axis's sign is arbitrary."""
    y = y.copy()
    for c in range(min(y.shape[1], reference.shape[1])):
        if float(np.dot(y[:, c], reference[:, c])) < 0:
            y[:, c] = -y[:, c]
    return y


def row_colors(analysis) -> tuple[list[str], bool]:
    """Colour per row: the label (document / MMLU subject) when there are few, else a document
    number; second value True when the colours are categories."""
    labels = list(analysis.activations.labels)
    distinct = list(dict.fromkeys(labels))
    if len(distinct) <= 12:
        return labels, True
    return [str(distinct.index(x)) for x in labels], False


def manifold_figure(y: np.ndarray, analysis, title: str, height: int = 420) -> go.Figure:
    labels = list(analysis.activations.labels)
    colors, categorical = row_colors(analysis)
    fig = go.Figure()
    if categorical:
        for name in dict.fromkeys(colors):
            idx = [i for i, c in enumerate(colors) if c == name]
            fig.add_trace(
                go.Scatter(
                    x=y[idx, 0],
                    y=y[idx, 1],
                    mode="markers",
                    name=name,
                    text=[labels[i] for i in idx],
                    hovertemplate="%{text}<extra></extra>",
                    marker={"size": 8, "opacity": 0.85},
                )
            )
    else:
        fig.add_trace(
            go.Scatter(
                x=y[:, 0],
                y=y[:, 1],
                mode="markers",
                text=labels,
                hovertemplate="document: %{text}<extra></extra>",
                marker={
                    "size": 8,
                    "opacity": 0.85,
                    "color": [int(c) for c in colors],
                    "colorscale": "Turbo",
                    "colorbar": {"title": "doc #", "thickness": 10},
                },
                showlegend=False,
            )
        )
    fig.update_layout(
        title={"text": title, "x": 0.5, "xanchor": "center"},
        height=height,
        margin={"l": 40, "r": 10, "t": 40, "b": 40},
        xaxis={"title": "dimension 1", "zeroline": False},
        yaxis={"title": "dimension 2", "zeroline": False},
        legend={"font": {"size": 10}},
    )
    return fig


def manifold_animation(frames: list[np.ndarray], analysis, method: str) -> go.Figure:
    """All layers as animation frames with a play button and a layer slider."""
    colors, categorical = row_colors(analysis)
    codes = (
        [list(dict.fromkeys(colors)).index(c) for c in colors]
        if categorical
        else [int(c) for c in colors]
    )
    labels = list(analysis.activations.labels)
    lo = np.min([f.min(axis=0) for f in frames], axis=0)
    hi = np.max([f.max(axis=0) for f in frames], axis=0)
    pad = (hi - lo) * 0.05 + 1e-9

    def scatter(y):
        return go.Scatter(
            x=y[:, 0],
            y=y[:, 1],
            mode="markers",
            text=labels,
            hovertemplate="%{text}<extra></extra>",
            marker={"size": 8, "opacity": 0.85, "color": codes, "colorscale": "Turbo"},
        )

    fig = go.Figure(
        data=[scatter(frames[0])],
        frames=[go.Frame(data=[scatter(y)], name=str(i)) for i, y in enumerate(frames)],
    )
    steps = [
        {
            "label": str(i),
            "method": "animate",
            "args": [[str(i)], {"mode": "immediate", "frame": {"duration": 0, "redraw": True}}],
        }
        for i in range(len(frames))
    ]
    fig.update_layout(
        title={
            "text": f"{PROJECTION_NAMES[method]} through the layers",
            "x": 0.5,
            "xanchor": "center",
        },
        height=520,
        margin={"l": 40, "r": 10, "t": 40, "b": 40},
        xaxis={"range": [lo[0] - pad[0], hi[0] + pad[0]], "title": "dimension 1"},
        yaxis={"range": [lo[1] - pad[1], hi[1] + pad[1]], "title": "dimension 2"},
        updatemenus=[
            {
                "type": "buttons",
                "x": 0.0,
                "y": -0.12,
                "xanchor": "left",
                "showactive": False,
                "buttons": [
                    {
                        "label": "▶ play",
                        "method": "animate",
                        "args": [
                            None,
                            {"frame": {"duration": 400, "redraw": True}, "fromcurrent": True},
                        ],
                    },
                    {
                        "label": "❚❚ pause",
                        "method": "animate",
                        "args": [[None], {"mode": "immediate", "frame": {"duration": 0}}],
                    },
                ],
            }
        ],
        sliders=[
            {"active": 0, "currentvalue": {"prefix": "layer "}, "pad": {"t": 40}, "steps": steps}
        ],
    )
    return fig


# ---------------------------------------------------------------------------------------------
# plans


def planners() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from .planners import ALPHA_RULES, PLANNERS

    return PLANNERS, ALPHA_RULES


PLANNER_HELP = {
    "mka": "MKA: greedily merge the adjacent pair with the highest NPIB.",
    "mka-tail": "The released MKA code's rule: always merge the last two layers.",
    "shortgpt": "ShortGPT: drop the layers with the lowest Block Influence.",
    "angular": "Gromov et al.: drop the n consecutive layers with the smallest angular distance.",
    "laco": "LaCo: collapse following layers into one (θ_l + Σ(θ_l+k − θ_l)) while the output stays close.",
}
ALPHA_HELP = {
    "similarity": "α = NPIB of the pair (the paper)",
    "rowmean": "α = sigmoid of the row means of S (the released code)",
    "fixed": "α = the value you choose",
    "search": "α in [0, 1] that minimises calibration loss (slower)",
}


def make_budget_plan(
    planner: str,
    n_remove: int | None = None,
    ratio: float | None = None,
    alpha_rule: str = "similarity",
    alpha: float = 0.5,
    protect_first: bool = True,
    protect_last: bool = True,
    progress: ProgressFn | None = None,
):
    from .pipeline import make_budget_plan as _make

    plan = _make(
        current_model(),
        st.session_state[ANALYSIS],
        planner=planner,
        n_remove=n_remove,
        ratio=ratio,
        alpha_rule=alpha_rule,
        alpha=alpha,
        protect_first=protect_first,
        protect_last=protect_last,
        progress=progress,
    )
    set_plan(plan, f"budget: {planner}")
    return plan


def make_manual_plan(picks: list[dict], alpha_rule: str = "similarity", alpha: float = 0.5):
    from .pipeline import make_manual_plan as _make

    plan = _make(
        current_model(),
        st.session_state.get(ANALYSIS),
        list(picks),
        alpha_rule=alpha_rule,
        alpha=alpha,
    )
    set_plan(plan, "manual")
    return plan


def import_plan(uploaded) -> tuple[object, str | None]:
    """A Plan from an uploaded JSON file, validated; plus a warning when it names another model."""
    import json

    from .plan import Plan, check_fingerprint

    if uploaded is None:
        raise MkaInputError("no plan file uploaded")
    raw = uploaded.getvalue()
    if not raw.strip():
        raise MkaInputError(f"{uploaded.name} is empty")
    try:
        d = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise MkaInputError(f"{uploaded.name} is not a text file; expected a plan JSON") from None
    except json.JSONDecodeError as e:
        raise MkaInputError(
            f"{uploaded.name} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from None
    try:
        plan = Plan.from_dict(d)
    except MkaInputError as e:
        raise MkaInputError(f"{uploaded.name}: {e}") from None
    loaded = current_model()
    if plan.model.num_layers != loaded.n_layers:
        raise MkaInputError(
            f"{uploaded.name}: the plan is for a {plan.model.num_layers}-layer model "
            f"({plan.model.source}), the loaded model has {loaded.n_layers} layers"
        )
    set_plan(plan, f"imported: {uploaded.name}")
    return plan, check_fingerprint(plan, loaded)


def set_plan(plan, origin: str) -> None:
    st.session_state[PLAN] = plan
    st.session_state[PLAN_ORIGIN] = origin
    sidebar_status()


def plan_table(plan) -> pd.DataFrame:
    rows = []
    for g, group in enumerate(plan.layers):
        sources = [i for i, _ in group]
        rows.append(
            {
                "output layer": g,
                "original layers": ", ".join(map(str, sources)),
                "weights": ", ".join(f"{w:.3f}" for _, w in group),
                "what": "kept" if len(group) == 1 else f"merge of {len(group)}",
            }
        )
    return pd.DataFrame(rows)


def steps_table(plan) -> pd.DataFrame:
    rows = []
    for s, step in enumerate(plan.steps):
        rows.append(
            {
                "step": s + 1,
                "op": step.op,
                "layers": ", ".join(map(str, step.layers)),
                "weights": ", ".join(f"{w:.3f}" for w in step.weights) if step.weights else "",
                "score": f"{step.score:.4f}" if step.score is not None else "",
            }
        )
    return pd.DataFrame(rows, columns=["step", "op", "layers", "weights", "score"])


def plan_figure(plan) -> go.Figure:
    """Which original layers flow into which output layer, line width ∝ weight."""
    n_in, n_out = plan.model.num_layers, plan.n_layers_out
    used = {i for group in plan.layers for i, _ in group}
    scale = (n_in - 1) / max(n_out - 1, 1)  # spread the output column over the same height
    fig = go.Figure()
    for g, group in enumerate(plan.layers):
        merged = len(group) > 1
        for i, w in group:
            fig.add_trace(
                go.Scatter(
                    x=[0, 1],
                    y=[i, g * scale],
                    mode="lines",
                    line={"width": 1 + 7 * abs(w), "color": "#e8590c" if merged else "#adb5bd"},
                    hovertemplate=f"layer {i} → output {g}: weight {w:.3f}<extra></extra>",
                    showlegend=False,
                )
            )
    kept = [i for i in range(n_in) if i in used]
    dropped = [i for i in range(n_in) if i not in used]
    fig.add_trace(
        go.Scatter(
            x=[0] * len(kept),
            y=kept,
            mode="markers+text",
            text=[str(i) for i in kept],
            textposition="middle left",
            marker={"size": 11, "color": "#4c6ef5"},
            name="original layer",
            hovertemplate="original layer %{y}<extra></extra>",
        )
    )
    if dropped:
        fig.add_trace(
            go.Scatter(
                x=[0] * len(dropped),
                y=dropped,
                mode="markers+text",
                text=[f"{i} dropped" for i in dropped],
                textposition="middle left",
                marker={"size": 12, "color": "#fa5252", "symbol": "x"},
                name="dropped",
                hovertemplate="layer %{y}: dropped<extra></extra>",
            )
        )
    merged_out = [g for g, group in enumerate(plan.layers) if len(group) > 1]
    fig.add_trace(
        go.Scatter(
            x=[1] * n_out,
            y=[g * scale for g in range(n_out)],
            mode="markers+text",
            text=[str(g) for g in range(n_out)],
            textposition="middle right",
            marker={
                "size": 11,
                "color": ["#e8590c" if g in merged_out else "#37b24d" for g in range(n_out)],
            },
            name="output layer (orange: merged)",
            customdata=[" + ".join(f"{w:.2f}·L{i}" for i, w in group) for group in plan.layers],
            hovertemplate="output layer %{text} = %{customdata}<extra></extra>",
        )
    )
    fig.update_layout(
        height=max(320, 22 * n_in + 80),
        margin={"l": 20, "r": 20, "t": 40, "b": 20},
        xaxis={
            "tickvals": [0, 1],
            "ticktext": [f"original ({n_in} layers)", f"compressed ({n_out} layers)"],
            "range": [-0.45, 1.3],
            "side": "top",
            "showgrid": False,
            "zeroline": False,
        },
        yaxis={"autorange": "reversed", "visible": False},
        legend={"orientation": "h", "y": -0.02, "yanchor": "top"},
        plot_bgcolor="white",
    )
    return fig


def mergekit_yaml(plan) -> tuple[str | None, str | None]:
    """(yaml, None), or (None, why mergekit cannot express the plan)."""
    from .export import mergekit_yaml as _yaml

    try:
        return _yaml(plan), None
    except MkaInputError as e:
        return None, str(e)


def plan_filename(plan, ext: str = "json") -> str:
    src = plan.model.source.replace(":", "-").replace("/", "-")
    return f"plan-{src}-{plan.method.get('planner', 'plan')}-{plan.n_layers_out}L.{ext}"


# ---------------------------------------------------------------------------------------------
# runs, history, export


ORIGINAL_EVAL = "mka_original_eval"  # {settings key: (original EvalResult, logits cache)}
REFERENCE_CACHE_MAX_BYTES = 1 << 30  # keep the original's log-probs when they fit in 1 GiB


def _original_reuse(loaded, **settings) -> tuple:
    """The original model's result and log-prob cache for these evaluation settings, if an
    earlier run measured them: every later run then evaluates only the compressed model."""
    key = (loaded.fingerprint, loaded.device, str(loaded.dtype), tuple(sorted(settings.items())))
    store = st.session_state.setdefault(ORIGINAL_EVAL, {})
    if key not in store:
        vocab = int(loaded.model.config.vocab_size)
        size = int(settings.get("budget_tokens", 0)) * vocab * 4
        store.clear()  # one original at a time: the cache can be large
        store[key] = [None, {} if size <= REFERENCE_CACHE_MAX_BYTES else None]
    return key, store[key]


def _remember_original(key, run) -> None:
    entry = st.session_state.get(ORIGINAL_EVAL, {}).get(key)
    if entry is not None and entry[0] is None:
        entry[0] = run.original


def run_plan(
    plan,
    budget_tokens: int,
    window: int,
    with_speed: bool = True,
    with_generations: bool = True,
    eval_data: str = "builtin",
    progress: ProgressFn | None = None,
):
    """Apply the plan to a copy of the original, evaluate both, and record the run."""
    from .pipeline import run_plan as _run

    loaded = current_model()
    settings = dict(
        eval_data=eval_data,
        budget_tokens=int(budget_tokens),
        window=int(window),
        with_speed=with_speed,
        with_generations=with_generations,
    )
    key, (original, cache) = _original_reuse(loaded, **settings)
    run = _run(
        loaded, plan, **settings, original=original, reference_cache=cache, progress=progress
    )
    _remember_original(key, run)
    record_run(run, {"eval_tokens": int(budget_tokens), "window": int(window)})
    return run


def record_run(run, extra: dict | None = None) -> int:
    """Add a run (MKA, TransAct, healed, …) to the session's history; returns its index.

    Only the newest KEEP_MODELS runs keep their compressed model in memory (for export); older
    ones keep their numbers."""
    runs = st.session_state.setdefault(RUNS, [])
    history = st.session_state.setdefault(HISTORY, [])
    runs.append(run)
    for old in runs[:-KEEP_MODELS]:
        old.model = None
    row = {"run": len(runs), "time": datetime.now().strftime("%H:%M:%S")}
    row.update(run.to_row())
    row["model"] = run.source
    row.update(extra or {})
    history.append(row)
    sidebar_status()
    return len(runs) - 1


def latest_run():
    runs = st.session_state.get(RUNS) or []
    return runs[-1] if runs else None


def history_frame() -> pd.DataFrame:
    rows = st.session_state.get(HISTORY) or []
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    front = [
        c
        for c in ("run", "time", "kind", "planner", "label", "layers", "layers_removed")
        if c in df
    ]
    return df[front + [c for c in df.columns if c not in front]]


def history_figure(df: pd.DataFrame) -> go.Figure:
    """Perplexity against layers removed, one series per planner (and kind), original at 0."""
    fig = go.Figure()
    for name, part in df.groupby(
        df["kind"].astype(str) + ": " + df["planner"].astype(str), sort=True
    ):
        part = part.sort_values("layers_removed")
        # every series starts at the original model (0 layers removed)
        xs = [0, *part["layers_removed"]]
        ys = [float(part["perplexity_original"].iloc[0]), *part["perplexity"]]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines+markers",
                name=name.replace("merge: ", ""),
                text=["original", *part["label"]],
                hovertemplate="%{text}<br>%{x} removed: perplexity %{y:.2f}<extra></extra>",
            )
        )
    base = df["perplexity_original"].iloc[-1]
    fig.add_hline(y=base, line_dash="dot", line_color="#868e96", annotation_text="original")
    fig.update_layout(
        height=360,
        margin={"l": 50, "r": 10, "t": 30, "b": 45},
        xaxis={"title": "layers removed", "dtick": 1},
        yaxis={"title": "perplexity"},
        legend={"title": "planner"},
    )
    return fig


def fmt_params(n) -> str:
    return "–" if n is None else f"{n / 1e6:,.2f} M"


def fmt_mb(n) -> str:
    return "–" if n is None else f"{n / 2**20:,.1f} MB"


def fmt_num(x, digits: int = 2) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def fmt_pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def before_after_table(run) -> pd.DataFrame:
    """Metric | original | compressed | change, formatted for reading."""
    o, c = run.original, run.compressed

    def change(a, b, lower_is_better=True):
        if a in (None, 0) or b is None:
            return "–"
        r = b / a - 1
        arrow = "↑" if r > 0 else "↓" if r < 0 else "="
        return f"{arrow} {abs(r) * 100:.1f} %"

    rows = [
        ("layers", str(o.n_layers), str(c.n_layers), f"−{o.n_layers - c.n_layers}"),
    ]
    if o.intermediate_size and c.intermediate_size:
        rows.append(
            (
                "MLP width (intermediate)",
                str(o.intermediate_size),
                str(c.intermediate_size),
                change(o.intermediate_size, c.intermediate_size),
            )
        )
    if o.n_heads and c.n_heads:
        rows.append(
            (
                "attention heads (query / KV)",
                f"{o.n_heads} / {o.n_kv_heads}",
                f"{c.n_heads} / {c.n_kv_heads}",
                change(o.n_heads, c.n_heads),
            )
        )
    rows += [
        ("parameters", fmt_params(o.params), fmt_params(c.params), change(o.params, c.params)),
        ("size in memory", fmt_mb(o.bytes), fmt_mb(c.bytes), change(o.bytes, c.bytes)),
        (
            "perplexity",
            fmt_num(o.perplexity),
            fmt_num(c.perplexity),
            change(o.perplexity, c.perplexity),
        ),
        ("KL from original (nats)", "0", fmt_num(c.kl, 4), ""),
        ("top-1 agreement", "100.0 %", fmt_pct(c.top1), ""),
        (
            "prefill (tokens/s)",
            fmt_num(o.prefill_tps, 0),
            fmt_num(c.prefill_tps, 0),
            change(o.prefill_tps, c.prefill_tps),
        ),
        (
            "decode (tokens/s)",
            fmt_num(o.decode_tps, 1),
            fmt_num(c.decode_tps, 1),
            change(o.decode_tps, c.decode_tps),
        ),
    ]
    if o.mmlu and c.mmlu:
        rows.append(
            ("MMLU accuracy", fmt_pct(o.mmlu.get("accuracy")), fmt_pct(c.mmlu.get("accuracy")), "")
        )
    return pd.DataFrame(rows, columns=["metric", "original", "compressed", "change"])


def before_after_figure(run) -> go.Figure:
    """Compressed relative to the original (original = 100 %) for each measured quantity."""
    o, c = run.original, run.compressed
    items = [
        ("perplexity", o.perplexity, c.perplexity),
        ("parameters", o.params, c.params),
        ("size (MB)", o.bytes, c.bytes),
        ("prefill tok/s", o.prefill_tps, c.prefill_tps),
        ("decode tok/s", o.decode_tps, c.decode_tps),
    ]
    items = [(n, a, b) for n, a, b in items if a and b is not None][::-1]  # top to bottom
    colors = {"perplexity": "#e8590c", "parameters": "#4c6ef5", "size (MB)": "#4c6ef5"}
    fig = go.Figure(
        go.Bar(
            y=[n for n, _, _ in items],
            x=[100 * b / a for _, a, b in items],
            orientation="h",
            text=[f"{100 * b / a:.0f} %" for _, a, b in items],
            textposition="outside",
            cliponaxis=False,
            marker_color=[colors.get(n, "#37b24d") for n, _, _ in items],
            hovertemplate="%{y}: %{x:.1f} % of the original<extra></extra>",
        )
    )
    fig.add_vline(x=100, line_dash="dot", line_color="#868e96")
    top = max([100 * b / a for _, a, b in items] + [100])
    fig.update_layout(
        title={
            "text": "compressed as % of the original (dotted: 100 %)",
            "x": 0.5,
            "xanchor": "center",
            "font": {"size": 13},
        },
        height=320,
        margin={"l": 100, "r": 40, "t": 40, "b": 40},
        xaxis={"title": "% of original", "range": [0, top * 1.2]},
    )
    return fig


OUT_DTYPES = {"the source's": None, "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def export_run(
    run_index: int,
    out_dir: str,
    overwrite: bool = False,
    out_dtype: str | None = None,
    progress: ProgressFn | None = None,
) -> Path:
    from .pipeline import export_run as _export

    if not out_dir or not out_dir.strip():
        raise MkaInputError("output folder is empty; type a folder path such as ./out/compressed")
    runs = st.session_state.get(RUNS) or []
    if not 0 <= run_index < len(runs):
        raise MkaInputError(f"run {run_index + 1} does not exist")
    run = runs[run_index]
    if run.model is None:
        raise MkaInputError(
            f"run {run_index + 1} is too old: only the last {KEEP_MODELS} compressed models are kept "
            f"in memory; run its plan again to export it"
        )
    spec = st.session_state.get(MODEL_SPEC)
    loaded = current_model()
    if out_dtype is None and loaded is not None:
        out_dtype = loaded.source_dtype
    path = _export(
        run,
        out_dir.strip(),
        overwrite=overwrite,
        loaded_from=spec.source if spec else None,
        out_dtype=out_dtype,
        progress=progress,
    )
    st.session_state.setdefault(EXPORTS, {})[run_index] = str(path)
    return path


def folder_zip(folder: str | Path) -> bytes | None:
    """A zip of an exported model folder, or None when it is larger than ZIP_LIMIT."""
    folder = Path(folder)
    files = [f for f in sorted(folder.rglob("*")) if f.is_file()]
    if sum(f.stat().st_size for f in files) > ZIP_LIMIT:
        return None
    return _zip_folder(str(folder), max(f.stat().st_mtime for f in files) if files else 0.0)


@st.cache_data(show_spinner="Zipping…", max_entries=2)
def _zip_folder(folder: str, mtime: float) -> bytes:
    root = Path(folder)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(root.rglob("*")):
            if f.is_file():
                zf.write(f, f"{root.name}/{f.relative_to(root)}")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# shared widgets for a run: before/after and export (the Results and TransAct pages)


def before_after_section(run, key: str = "") -> None:
    """A run's before/after table and chart, four headline metrics and the generations.

    key: a prefix for the widget keys, so two pages can show the section side by side."""
    c1, c2 = st.columns([3, 2])
    with c1:
        st.table(before_after_table(run), hide_index=True, border="horizontal")
    with c2:
        st.plotly_chart(
            before_after_figure(run),
            key=f"{key}before_after_chart",
            config={"displayModeBar": False},
        )
    o, c = run.original, run.compressed
    m = st.columns(4)
    m[0].metric(
        "Perplexity",
        fmt_num(c.perplexity),
        fmt_num(c.perplexity - o.perplexity),
        delta_color="inverse",
    )
    m[1].metric("Top-1 agreement", fmt_pct(c.top1))
    m[2].metric(
        "Parameters",
        fmt_params(c.params),
        f"{100 * (c.params / o.params - 1):.1f} %",
        delta_color="inverse",
    )
    m[3].metric(
        "Decode speed", f"{fmt_num(c.decode_tps, 1)} tok/s" if c.decode_tps else "not measured"
    )
    if o.generations and c.generations:
        st.markdown("**Generations** (greedy, same prompts)")
        left, right = st.columns(2)
        left.caption("original")
        right.caption(f"compressed: {run.label}")
        for a, b in zip(o.generations, c.generations):
            left, right = st.columns(2)
            left.container(border=True).text(a)
            right.container(border=True).text(b)


WIDGET_OPTIONS = "mka_widget_options"  # widget key -> the options it was last drawn with


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


def export_section(key: str = "", default_index: int | None = None) -> None:
    """Save a run's compressed model as a Hugging Face folder, then offer it as a zip.

    key: a prefix for the widget keys; default_index: the run selected first (the newest)."""
    runs = st.session_state.get(RUNS) or []
    if not runs:
        return
    default = len(runs) - 1 if default_index is None else default_index
    seen = st.session_state.get(WIDGET_OPTIONS, {}).get(f"{key}export_run")
    if seen != list(range(len(runs))) or f"{key}export_folder" not in st.session_state:
        # a new run (or back from another page, which drops widget state): the default folder
        st.session_state[f"{key}export_folder"] = f"out/run-{default + 1}"
    follow_newest(f"{key}export_run", range(len(runs)), default)
    with st.form(f"{key}export_form"):
        c1, c2 = st.columns([1, 2])
        index = c1.selectbox(
            "Run",
            list(range(len(runs))),
            format_func=lambda i: f"{i + 1}: {runs[i].label}",
            key=f"{key}export_run",
        )
        folder = c2.text_input("Output folder", key=f"{key}export_folder")
        c3, c4 = st.columns([1, 2])
        dtype_name = c3.selectbox(
            "Weights dtype",
            list(OUT_DTYPES),
            key=f"{key}export_dtype",
            help="The source's dtype by default (bf16 for a GGUF, whose dequantised values have "
            "no float type of their own); fp32 doubles the folder's size.",
        )
        overwrite = c4.checkbox(
            "Replace the folder if it exists", False, key=f"{key}export_overwrite"
        )
        do_export = st.form_submit_button("Export", key=f"{key}export_submit")
    if do_export:
        try:
            with progress_status("Saving the model, shard by shard") as progress:
                path = export_run(
                    index,
                    folder,
                    overwrite=overwrite,
                    out_dtype=OUT_DTYPES[dtype_name],
                    progress=progress,
                )
            st.success(f"Saved to {path}")
        except MkaInputError as e:
            st.error(str(e))
    exports = st.session_state.get(EXPORTS, {})
    if index in exports:
        data = folder_zip(exports[index])
        if data is None:
            st.caption("The folder is too large for a download here; copy it from the path above.")
        else:
            st.download_button(
                f"Download {exports[index]} as .zip ({fmt_mb(len(data))})",
                data,
                file_name=f"{runs[index].label.replace(' ', '_')}.zip",
                mime="application/zip",
                key=f"{key}dl_model_zip",
            )


def _series_name(kind: str, planner: str) -> str:
    """The comparison chart's series of a run: the method, whether or not it was healed."""
    kind = kind.replace("+heal", "")
    if kind == "merge":
        return f"merge: {planner}"
    if kind == "transact":
        return "TransAct"
    if kind == "merge+transact":
        return f"merge ({planner}) + TransAct"
    return f"{kind}: {planner}"


SERIES_COLORS = ("#4c6ef5", "#e8590c", "#37b24d", "#ae3ec9", "#1098ad", "#f59f00", "#d6336c")


def comparison_figure(df: pd.DataFrame) -> go.Figure:
    """Perplexity against parameters removed (%): layer merging and intra-module pruning on one
    axis, so runs of equal size can be compared. One series per method (each starts at the
    original model, 0 % removed); healed runs are stars joined to the run they healed."""
    fig = go.Figure()
    df = df.copy()
    df["series"] = [_series_name(str(k), str(p)) for k, p in zip(df["kind"], df["planner"])]
    healed = df["healed"].astype(bool) if "healed" in df else pd.Series(False, index=df.index)
    for i, (name, part) in enumerate(df.groupby("series", sort=True)):
        color = SERIES_COLORS[i % len(SERIES_COLORS)]
        plain = part[~healed[part.index]].sort_values("params_removed_pct")
        if not plain.empty:
            fig.add_trace(
                go.Scatter(
                    x=[0.0, *plain["params_removed_pct"]],
                    y=[float(plain["perplexity_original"].iloc[0]), *plain["perplexity"]],
                    mode="lines+markers",
                    name=name,
                    legendgroup=name,
                    line={"color": color},
                    marker={"size": 9},
                    text=[
                        "original",
                        *(f"run {r}: {lab}" for r, lab in zip(plain["run"], plain["label"])),
                    ],
                    hovertemplate="%{text}<br>%{x:.1f} % of the parameters removed: "
                    "perplexity %{y:.2f}<extra></extra>",
                )
            )
        cured = part[healed[part.index]]
        if cured.empty:
            continue
        for _, row in cured.iterrows():
            src = df[df["run"] == row.get("healed_from")] if "healed_from" in df else df.iloc[:0]
            if not src.empty:  # a dotted line from the run that was healed to its healed copy
                fig.add_trace(
                    go.Scatter(
                        x=[float(src["params_removed_pct"].iloc[0]), row["params_removed_pct"]],
                        y=[float(src["perplexity"].iloc[0]), row["perplexity"]],
                        mode="lines",
                        line={"color": color, "dash": "dot"},
                        hoverinfo="skip",
                        showlegend=False,
                        legendgroup=name,
                    )
                )
        fig.add_trace(
            go.Scatter(
                x=cured["params_removed_pct"],
                y=cured["perplexity"],
                mode="markers",
                name=f"{name}, healed",
                legendgroup=name,
                marker={"size": 15, "symbol": "star", "color": color, "line": {"width": 1}},
                text=[f"run {r}: {lab}" for r, lab in zip(cured["run"], cured["label"])],
                hovertemplate="%{text}<br>%{x:.1f} % of the parameters removed: "
                "perplexity %{y:.2f}<extra></extra>",
            )
        )
    base = float(df["perplexity_original"].iloc[-1])
    fig.add_hline(y=base, line_dash="dot", line_color="#868e96", annotation_text="original")
    ppl = pd.concat([df["perplexity"], df["perplexity_original"]]).astype(float)
    log_y = bool(ppl.min() > 0 and ppl.max() / ppl.min() > 20)  # a collapse would flatten the rest
    fig.update_layout(
        title={
            "text": "Perplexity against parameters removed (stars: healed)",
            "x": 0.5,
            "xanchor": "center",
            "font": {"size": 14},
        },
        height=400,
        margin={"l": 60, "r": 10, "t": 40, "b": 45},
        xaxis={"title": "parameters removed (%)", "rangemode": "tozero", "ticksuffix": " %"},
        yaxis={
            "title": "perplexity" + (" (log scale)" if log_y else ""),
            "type": "log" if log_y else "linear",
        },
        legend={"title": "method"},
        showlegend=True,  # name the method even when there is one series
    )
    return fig


# ---------------------------------------------------------------------------------------------
# TransAct and healing


def _model_of(run_index: int | None):
    """The module to prune (a run's compressed model, or the session's original) and its params."""
    if run_index is None:
        loaded = current_model()
        return loaded.model, model_summary(loaded).n_params
    run = st.session_state[RUNS][run_index]
    return run.model, run.compressed.params


def transact_preview(mlp_keep: float, heads_keep: float, base_index: int | None = None) -> dict:
    """The shape a TransAct prune would give, without pruning: the kept intermediate size and
    query heads (rounded the way `transact.prune` rounds), and about how many parameters go."""
    from .transact import target_shape

    model, params_start = _model_of(base_index)
    t = target_shape(model, float(mlp_keep), float(heads_keep))
    cfg = model.config
    d = int(cfg.hidden_size)
    n_layers = int(cfg.num_hidden_layers)
    (inter0, inter), (h0, h), (kv0, g) = t["intermediate"], t["n_heads"], t["n_kv_heads"]
    p = t["per_group"]
    hd = t["head_dim"]
    # gate/up/down lose 3·d weights per neuron; q/o lose 2·d·head_dim per query head, k/v the
    # same per KV head (biases, where a model has any, are a rounding error here)
    per_layer = lambda i, h, kv: 3 * d * i + 2 * d * hd * (h + kv)  # noqa: E731
    removed = n_layers * (per_layer(inter0, h0, kv0) - per_layer(inter, g * p, g))
    original = model_summary(current_model()).n_params
    heads = (
        f"heads {h0} → {h} ({p} per KV group)"
        if g == kv0
        else f"heads {h0} → {h} (whole KV groups go: {g} of {kv0} left, 1 head each)"
    )
    return {
        "text": f"intermediate {inter0} → {inter}, {heads}",
        "intermediate": (inter0, inter),
        "n_heads": (h0, h),
        "n_kv_heads": (kv0, g),
        "params_removed_pct": 100.0 * (original - (params_start - removed)) / original,
        "layers_equivalent": removed / per_layer(inter0, h0, kv0),
    }


def latest_merge_index() -> int | None:
    """The newest merge run (healed or not) of the current model whose model is still in memory:
    the base for "TransAct after the current merge"."""
    for i in reversed(heal_candidates()):
        run = st.session_state[RUNS][i]
        if run.plan is not None and "transact" not in run.kind:
            return i
    return None


def heal_candidates() -> list[int]:
    """Indices of the runs that can be healed (or pruned further): their compressed model is
    still in memory and was made from the model loaded now (the calibration text is its)."""
    loaded = current_model()
    runs = st.session_state.get(RUNS) or []
    return [
        i
        for i, run in enumerate(runs)
        if run.model is not None and loaded is not None and run.source == loaded.source
    ]


def _analysis_batch():
    analysis = st.session_state.get(ANALYSIS)
    if current_model() is None or analysis is None:
        raise MkaInputError(
            "no calibration batch: capture activations on the Similarity page first"
        )
    return analysis.batch


def run_transact(
    mlp_keep: float,
    heads_keep: float,
    shots: int = 4,
    after_merge: bool = False,
    budget_tokens: int = 8192,
    window: int = 512,
    with_speed: bool = True,
    with_generations: bool = True,
    eval_data: str = "builtin",
    progress: ProgressFn | None = None,
):
    """Prune the original (or the newest merge) on the analysis's calibration batch, evaluate it
    against the original and record the run; returns (run, TransActReport)."""
    from .pipeline import run_transact as _run

    batch = _analysis_batch()
    base_index = None
    if after_merge:
        base_index = latest_merge_index()
        if base_index is None:
            raise MkaInputError(
                "no merge to prune after: run a plan on the Results page first (its model must "
                "still be in memory), or untick 'TransAct after the current merge'"
            )
    runs = st.session_state[RUNS]
    loaded = current_model()
    settings = dict(
        eval_data=eval_data,
        budget_tokens=int(budget_tokens),
        window=int(window),
        with_speed=with_speed,
        with_generations=with_generations,
    )
    key, (original, cache) = _original_reuse(loaded, **settings)
    run, rep = _run(
        loaded,
        batch,
        mlp_keep=float(mlp_keep),
        heads_keep=float(heads_keep),
        shots=int(shots),
        base=runs[base_index] if base_index is not None else None,
        **settings,
        original=original,
        reference_cache=cache,
        progress=progress,
    )
    _remember_original(key, run)
    index = record_run(
        run,
        {
            "eval_tokens": int(budget_tokens),
            "window": int(window),
            "mlp_keep": float(mlp_keep),
            "heads_keep": float(heads_keep),
            "shots": int(shots),
            "intermediate_size": rep.new_intermediate_size,
            "n_heads": rep.new_n_heads,
            "n_kv_heads": rep.new_n_kv_heads,
            "base_run": base_index + 1 if base_index is not None else None,
        },
    )
    st.session_state[TRANSACT] = {"run": index, "report": rep}
    return run, rep


def heal_defaults(loaded) -> dict:
    """Heal defaults: 30 steps on a CPU (each AdamW step of a 135M model takes seconds there),
    100 on a GPU; learning rate 1e-4."""
    return {"steps": 100 if on_gpu(loaded) else 30, "lr": 1e-4}


HEAL_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3)


def run_heal(run_index: int | None, steps: int, lr: float, progress: ProgressFn | None = None):
    """Fine-tune a run's compressed model on the calibration batch, evaluate it the way its
    source run was evaluated (so perplexity before → after compares like with like), record it.
    Returns (healed run, HealReport)."""
    from .pipeline import run_heal as _heal

    batch = _analysis_batch()
    if run_index is None:
        raise MkaInputError(
            "no compressed model in memory to heal: prune one above, or run a plan on the "
            "Results page first"
        )
    if run_index not in heal_candidates():
        raise MkaInputError(
            f"run {run_index + 1} cannot be healed: its model is no longer in memory (only the "
            f"last {KEEP_MODELS} are kept) or was made from another model"
        )
    run = st.session_state[RUNS][run_index]
    row = st.session_state[HISTORY][run_index]
    loaded = current_model()
    defaults = eval_defaults(loaded)
    settings = dict(
        eval_data=row.get("eval_data", "builtin"),
        budget_tokens=int(row.get("eval_tokens") or defaults["budget_tokens"]),
        window=int(row.get("window") or defaults["window"]),
        with_speed=run.compressed.decode_tps is not None,
        with_generations=bool(run.compressed.generations),
    )
    key, (original, cache) = _original_reuse(loaded, **settings)
    healed, rep = _heal(
        loaded,
        run,
        batch,
        steps=int(steps),
        lr=float(lr),
        **settings,
        original=original,
        reference_cache=cache,
        progress=progress,
    )
    _remember_original(key, healed)
    extra = {k: row[k] for k in ("eval_tokens", "window") if k in row}
    extra.update(healed_from=run_index + 1, heal_steps=int(steps), heal_lr=float(lr))
    index = record_run(healed, extra)
    st.session_state[HEAL] = {"run": index, "from": run_index, "report": rep}
    return healed, rep


def heal_loss_figure(rep) -> go.Figure:
    """The training loss of every heal step, with a running mean when there are many steps."""
    losses = np.asarray(rep.losses, dtype=float)  # (steps,)
    steps = np.arange(1, len(losses) + 1)
    fig = go.Figure(
        go.Scatter(
            x=steps,
            y=losses,
            mode="lines+markers" if len(losses) <= 60 else "lines",
            name="loss per step",
            line={"color": "#adb5bd" if len(losses) >= 10 else "#4c6ef5"},
            hovertemplate="step %{x}: loss %{y:.3f}<extra></extra>",
        )
    )
    if len(losses) >= 10:
        w = max(3, len(losses) // 10)
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        fig.add_trace(
            go.Scatter(
                x=steps[w - 1 :],
                y=smooth,
                mode="lines",
                name=f"mean of {w} steps",
                line={"color": "#4c6ef5", "width": 3},
                hovertemplate="step %{x}: mean loss %{y:.3f}<extra></extra>",
            )
        )
    fig.update_layout(
        title={"text": "Training loss while healing", "x": 0.5, "xanchor": "center"},
        height=320,
        margin={"l": 50, "r": 10, "t": 40, "b": 45},
        xaxis={"title": "step", "rangemode": "tozero"},
        yaxis={"title": "loss (nats per token)"},
        legend={"orientation": "h", "y": 1.0, "yanchor": "bottom", "x": 1, "xanchor": "right"},
    )
    return fig


def _kept_share(scores: np.ndarray, index: list, kept: list) -> float:
    """Share of a layer's score sum that the kept units carry."""
    total = float(scores.sum())
    return float(scores[np.isin(index, kept)].sum()) / total if total > 0 else 0.0


def transact_figures(rep) -> tuple[go.Figure, go.Figure, go.Figure]:
    """Three views of the last scoring pass of a prune: MLP neuron scores sorted per layer with
    the cut, head scores per layer with the kept heads marked, and the score mass kept per layer.

    The last pass scores the units that survived the earlier shots; units pruned before it have
    no score there."""
    n_layers = len(rep.mlp_scores)
    layers = list(range(n_layers))
    mlp = np.asarray(rep.mlp_scores, dtype=float)  # (n_layers, neurons scored in the last pass)
    ranked = -np.sort(-mlp, axis=1)  # each layer's scores, largest first
    top = np.maximum(ranked[:, :1], 1e-12)
    keep = rep.new_intermediate_size
    mlp_fig = go.Figure(
        go.Heatmap(
            z=np.round(ranked / top, 3),
            x=np.arange(1, ranked.shape[1] + 1),
            y=layers,
            customdata=np.round(ranked, 3),
            colorscale="Viridis",
            zmin=0,
            zmax=1,
            colorbar={"title": {"text": "÷ layer max", "side": "right"}, "thickness": 12},
            hovertemplate="layer %{y}, rank %{x}: score %{customdata} (%{z:.2f} of the "
            "layer's top)<extra></extra>",
        )
    )
    mlp_fig.add_vline(x=keep + 0.5, line_color="#ff3c3c", line_width=2)
    mlp_fig.add_annotation(  # above the plot, where the heatmap's colours cannot hide it
        x=keep + 0.5,
        y=1.0,
        yref="paper",
        yanchor="bottom",
        text=f"cut: keep the top {keep}",
        showarrow=False,
        font={"color": "#e03131", "size": 12},
    )
    mlp_fig.update_layout(
        title={
            "text": "MLP neuron scores, sorted in each layer",
            "x": 0.5,
            "xanchor": "center",
            "font": {"size": 14},
        },
        height=max(320, 16 * n_layers + 130),
        margin={"l": 50, "r": 10, "t": 60, "b": 45},
        xaxis={"title": "neuron rank in its layer"},
        yaxis={"title": "layer", "autorange": "reversed", "dtick": 1 if n_layers <= 16 else 2},
    )

    n_heads, n_kv = rep.original_n_heads, rep.original_n_kv_heads
    per_group = n_heads // n_kv
    z = np.full((n_layers, n_heads), np.nan)  # (n_layers, original heads): NaN = pruned before
    raw = np.full((n_layers, n_heads), np.nan)
    marks = [[""] * n_heads for _ in layers]
    for i in layers:
        s = np.asarray(rep.head_scores[i], dtype=float)
        raw[i, rep.head_scores_index[i]] = s
        z[i, rep.head_scores_index[i]] = s / max(float(s.max()), 1e-12)
        for h in rep.heads_kept[i]:
            marks[i][h] = "✓"
    heads_fig = go.Figure(
        go.Heatmap(
            z=np.round(z, 3),
            x=list(range(n_heads)),
            y=layers,
            text=marks,
            texttemplate="%{text}",
            textfont={"color": "#212529", "size": 13},  # kept heads are the bright cells
            customdata=np.round(raw, 3),
            colorscale="Viridis",
            zmin=0,
            zmax=1,
            colorbar={"title": {"text": "÷ layer max", "side": "right"}, "thickness": 12},
            hovertemplate="layer %{y}, head %{x}: score %{customdata}<extra></extra>",
        )
    )
    for g in range(1, n_kv):  # KV group boundaries
        heads_fig.add_vline(x=g * per_group - 0.5, line_color="white", line_width=3)
    heads_fig.update_layout(
        title={
            "text": f"Query head scores (✓ kept; {n_kv} KV groups of {per_group})",
            "x": 0.5,
            "xanchor": "center",
            "font": {"size": 14},
        },
        height=max(320, 16 * n_layers + 130),
        margin={"l": 50, "r": 10, "t": 60, "b": 45},
        xaxis={"title": "query head", "dtick": 1},
        yaxis={"title": "layer", "autorange": "reversed", "dtick": 1 if n_layers <= 16 else 2},
        plot_bgcolor="#e9ecef",  # heads pruned in earlier shots show as grey
    )

    mass_fig = go.Figure()
    for name, scores, index, kept, color in (
        ("MLP neurons", rep.mlp_scores, rep.mlp_scores_index, rep.mlp_kept, "#4c6ef5"),
        ("attention heads", rep.head_scores, rep.head_scores_index, rep.heads_kept, "#e8590c"),
    ):
        share = len(kept[0]) / max(len(index[0]), 1)  # of the units scored in the last pass
        kept_mass = [
            100 * _kept_share(np.asarray(scores[i], dtype=float), index[i], kept[i]) for i in layers
        ]
        mass_fig.add_trace(
            go.Scatter(
                x=layers,
                y=kept_mass,
                mode="lines+markers",
                name=f"{name}: score kept",
                line={"color": color},
                hovertemplate=f"layer %{{x}}: the kept {name} carry %{{y:.1f}} % of the "
                "score<extra></extra>",
            )
        )
        mass_fig.add_trace(
            go.Scatter(
                x=[layers[0], layers[-1]],
                y=[100 * share, 100 * share],
                mode="lines",
                name=f"{name}: share of units kept",
                line={"color": color, "dash": "dash", "width": 1},
                hoverinfo="skip",
            )
        )
    mass_fig.update_layout(
        title={
            "text": "Score mass kept per layer in the last shot (dashed: share of units kept)",
            "x": 0.5,
            "xanchor": "center",
            "font": {"size": 14},
        },
        height=340,
        margin={"l": 50, "r": 10, "t": 40, "b": 45},
        xaxis={"title": "layer", "dtick": 1 if n_layers <= 32 else 2},
        yaxis={"title": "% of the layer's score", "range": [0, 105]},
        legend={"orientation": "h", "y": -0.25, "yanchor": "top"},
    )
    return mlp_fig, heads_fig, mass_fig
