"""Cached resources of the app and the analysis stage: models and analyses shared by every session
(`st.cache_resource`, keyed by everything that changes them), the calibration data a user gives,
the capture, and the derived views (projections, downloads) of the current analysis."""

from __future__ import annotations

import hashlib
import io
import tempfile
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import streamlit as st

from ..errors import MkaInputError, ProgressFn
from . import session
from . import state as S

MAX_MODELS = 3
MAX_ANALYSES = 4


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


def _cached_model(source: str, device: str, dtype: str, seed: int, offload=None, progress=None):
    """The model for this exact (source, device, dtype, seed, offload), loaded once per server."""
    from ..models import load_model as _load

    key = (source, device, dtype, seed, offload)
    loaded = _store().get("model", key)
    if loaded is None:
        loaded = _load(
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
        session.save()
    S.sidebar_status()
    return loaded


def current_model():
    """The session's model (from the cache, so instant), or None before any load."""
    spec = st.session_state.get(S.MODEL_SPEC)
    if spec is None:
        return None
    key = (spec.source, spec.device, spec.dtype, spec.seed, spec.offload)
    if _store().get("model", key) is None:  # evicted by other loads: load it again
        with st.spinner(f"Reloading {spec.source}…"):
            return _cached_model(*key)
    return _cached_model(*key)


def model_summary(loaded):
    from ..models import summarize

    return summarize(loaded)


def on_gpu(loaded=None) -> bool:
    spec = st.session_state.get(S.MODEL_SPEC)
    device = loaded.device if loaded is not None else (spec.device if spec else "cpu")
    return not str(device).startswith("cpu")


def analysis_defaults(loaded) -> dict:
    """Capture defaults: the spec's 128 × 128 on a GPU, a lighter 64 × 32 on a CPU (NPIB needs
    rows more than long samples: k = min(8, rows / 8) clusters, and too few saturate it at 1)."""
    if on_gpu(loaded):
        return {"n_samples": 128, "max_tokens": 128}
    return {"n_samples": 64, "max_tokens": 32}


def eval_defaults(loaded) -> dict:
    """Evaluation defaults: the spec's 8192 tokens in 512-token windows on a GPU; on a CPU a
    classroom-sized 1024 in 256, no speed timing (it repeats prefill and generation several
    times), and two short generations, so a run takes seconds."""
    if on_gpu(loaded):
        return {"budget_tokens": 8192, "window": 512, "with_speed": True, "gen_tokens": 32}
    return {"budget_tokens": 1024, "window": 256, "with_speed": False, "gen_tokens": 16}


def calibration_from_upload(uploaded) -> tuple[list, str]:
    """Documents from an uploaded .txt/.jsonl, and a key naming its content for the cache."""
    from ..data import parse_text

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
    from ..data import is_mmlu_folder

    path = Path(folder.strip()).expanduser() if folder else None
    if not folder or not folder.strip():
        raise MkaInputError("MMLU folder path is empty; type the folder that holds test/ and dev/")
    if not path.exists():
        raise MkaInputError(f"MMLU folder not found: {path}")
    if not is_mmlu_folder(path):
        raise MkaInputError(f"{path} is not an MMLU folder (expected a test/ sub-folder of CSVs)")
    return str(path), f"mmlu:{path.resolve()}"


def _cached_analysis(key: tuple, loaded, data, n_samples, max_tokens, pooling, seed, progress):
    from ..pipeline import analyze

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
    session.save_analysis(analysis, docs=None if isinstance(data, str) else data)
    S.sidebar_status()
    return analysis


def analysis_key() -> str:
    """A string naming the current analysis (for st.cache_data of things derived from it)."""
    spec = st.session_state.get(S.MODEL_SPEC)
    info = st.session_state.get(S.ANALYSIS_INFO) or {}
    return repr((spec, sorted((k, str(v)) for k, v in info.items())))


def matrix_csv(sim, measure: str) -> str:
    from ..similarity import matrix_csv as _csv

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


@st.cache_data(show_spinner=False, max_entries=64)
def _projection(key: str, layer: int, method: str, _analysis=None) -> np.ndarray:
    from ..manifold import project_2d

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
    y = _projection(analysis_key(), int(layer), method, _analysis=analysis)
    _projection_done[(analysis_key(), int(layer), method)] = True
    return y


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
            progress((layer + 1) / n, f"{_name(method)}: layer {layer + 1}/{n}")
    return out


def align_signs(reference: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Flip y's axes to match `reference` (same rows): a diffusion or PCA axis's sign is arbitrary."""
    y = y.copy()
    for c in range(min(y.shape[1], reference.shape[1])):
        if float(np.dot(y[:, c], reference[:, c])) < 0:
            y[:, c] = -y[:, c]
    return y


def umap_cached(layer: int) -> bool:
    """Whether layer's UMAP view is already computed (the first one also compiles UMAP: slow)."""
    return _projection_done.get((analysis_key(), int(layer), "umap"), False)


_projection_done: dict = {}


def _name(method: str) -> str:
    from ..figures import PROJECTION_NAMES

    return PROJECTION_NAMES[method]
