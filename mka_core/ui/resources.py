"""Cached resources of the app and the analysis stage: models and analyses shared by every session
(`st.cache_resource`, keyed by everything that changes them), the calibration data a user gives,
the capture, and the derived views (projections, downloads) of the current analysis."""

from __future__ import annotations

import contextlib
import hashlib
import io
import tempfile
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import streamlit as st

# The machinery every model load uses, imported now, with the app, instead of lazily by the
# first load: transformers' packages replace themselves in sys.modules when imported, and CPython
# hands a thread that imports such a package while another thread is still running its __init__
# the module being replaced ("cannot import name 'AutoConfig' from 'transformers'"). Each
# session's script runs in its own thread, and a rerun starts a new one before the previous run
# has stopped, so the app must never leave a first import to two threads at once.
from transformers import GenerationMixin, PreTrainedModel  # noqa: F401
from transformers.integrations import ggml  # noqa: F401

from mka_core.analysis.manifold import project_2d
from mka_core.analysis.similarity import matrix_csv as _csv
from mka_core.data.corpus import is_mmlu_folder, parse_text
from mka_core.errors import MkaInputError, ProgressFn, report
from mka_core.figures.manifold import PROJECTION_NAMES
from mka_core.models.loading import load_model as _load
from mka_core.models.loading import summarize
from mka_core.ui import state as S
from mka_core.workflows.pipeline import analyze

MAX_MODELS = 3
MAX_ANALYSES = 4


class _Store:
    """Models and analyses shared by every session of this server, newest last.

    Held by st.cache_resource (one per process). The library's work runs outside any cached
    function, so its progress callback can drive a progress bar on the page (a cached function
    may not write into page elements made outside it)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.loading = threading.Lock()  # one model load at a time (see `_cached_model`)
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


@contextlib.contextmanager
def _one_load_at_a_time(store: _Store, progress: ProgressFn | None):
    """Hold the store's load lock. While waiting, say so: a progress update is also where
    Streamlit stops a run that a rerun has replaced, so a replaced run stops instead of waiting."""
    while not store.loading.acquire(timeout=0.5):
        report(progress, 0.0, "waiting for another model load on this server to finish")
    try:
        yield
    finally:
        store.loading.release()


def _cached_model(source: str, device: str, dtype: str, seed: int, offload=None, progress=None):
    """The model for this exact (source, device, dtype, seed, offload), loaded once per server.

    Loads run one at a time: every session's script runs in its own thread (and a rerun starts a
    new thread while the replaced run is still loading), and a model is built under process-wide
    patches (accelerate's init_empty_weights, which the engine's skeletons use, makes every new
    parameter a meta tensor; transformers switches weight initialisation and tying off) and
    imports its architecture's code on first use, so two loads at once break each other
    ("Cannot copy out of meta tensor"). A request for a model another thread is loading waits
    for it and then finds it in the store."""

    key = (source, device, dtype, seed, offload)
    store = _store()
    loaded = store.get("model", key)
    if loaded is None:
        with _one_load_at_a_time(store, progress):
            loaded = store.get("model", key)
            if loaded is None:
                loaded = _load(
                    source,
                    device=device,
                    dtype=dtype,
                    seed=seed,
                    progress=progress,
                    offload=offload,
                )
                store.put("model", key, loaded, MAX_MODELS)
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

    path = Path(folder.strip()).expanduser() if folder else None
    if not folder or not folder.strip():
        raise MkaInputError("MMLU folder path is empty; type the folder that holds test/ and dev/")
    if not path.exists():
        raise MkaInputError(f"MMLU folder not found: {path}")
    if not is_mmlu_folder(path):
        raise MkaInputError(f"{path} is not an MMLU folder (expected a test/ sub-folder of CSVs)")
    return str(path), f"mmlu:{path.resolve()}"


def _cached_analysis(key: tuple, loaded, data, n_samples, max_tokens, pooling, seed, progress):

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


def analysis_key() -> str:
    """A string naming the current analysis (for st.cache_data of things derived from it)."""
    spec = st.session_state.get(S.MODEL_SPEC)
    info = st.session_state.get(S.ANALYSIS_INFO) or {}
    return repr((spec, sorted((k, str(v)) for k, v in info.items())))


def matrix_csv(sim, measure: str) -> str:

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

    return PROJECTION_NAMES[method]
