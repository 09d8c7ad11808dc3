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


def resolve_spec(
    source: str, device: str = "auto", dtype: str = "auto", seed: int = 0
) -> ModelSpec:
    """Resolve "auto" device and dtype now, so the cache key says what really runs."""
    from .models import pick_device, pick_dtype

    if not isinstance(source, str) or not source.strip():
        raise MkaInputError("model source is empty; choose the bundled model or give a path or id")
    dev = pick_device(device)
    dt = str(pick_dtype(dev, dtype)).replace("torch.", "")
    return ModelSpec(source.strip(), dev, dt, int(seed))


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


def _cached_model(source: str, device: str, dtype: str, seed: int, progress=None):
    """The model for this exact (source, device, dtype, seed), loaded once per server."""
    from .models import load_model

    key = (source, device, dtype, seed)
    loaded = _store().get("model", key)
    if loaded is None:
        loaded = load_model(source, device=device, dtype=dtype, seed=seed, progress=progress)
        _store().put("model", key, loaded, MAX_MODELS)
    return loaded


def load_model(
    source: str,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    progress: ProgressFn | None = None,
):
    """Load (or fetch from the cache) a model and make it the session's model.

    Loading a different model forgets the analysis, picks and plan made for the previous one
    (they name its layers); the history of runs stays."""
    spec = resolve_spec(source, device, dtype, seed)
    loaded = _cached_model(spec.source, spec.device, spec.dtype, spec.seed, progress)
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
    key = (spec.source, spec.device, spec.dtype, spec.seed)
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
    run = _run(
        loaded,
        plan,
        eval_data=eval_data,
        budget_tokens=int(budget_tokens),
        window=int(window),
        with_speed=with_speed,
        with_generations=with_generations,
        progress=progress,
    )
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


def export_run(run_index: int, out_dir: str, overwrite: bool = False) -> Path:
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
    path = _export(
        run, out_dir.strip(), overwrite=overwrite, loaded_from=spec.source if spec else None
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
