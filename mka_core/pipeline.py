"""The user-level actions, one function each, shared by the command line and the app:
analyse a model's layers, and (through the other modules) plan, apply, prune and evaluate."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .activations import Activations, capture_activations
from .data import BUILTIN, CalibrationBatch, Document, load_documents, make_calibration
from .errors import ProgressFn, report
from .models import LoadedModel
from .similarity import SimilarityResult, compute_similarity

log = logging.getLogger(__name__)


@dataclass
class Analysis:
    batch: CalibrationBatch
    activations: Activations
    similarity: SimilarityResult


def _scaled(progress: ProgressFn | None, lo: float, hi: float) -> ProgressFn | None:
    """A callback that maps a sub-task's [0, 1] onto [lo, hi] of the caller's bar."""
    if progress is None:
        return None
    return lambda f, msg: progress(lo + (hi - lo) * f, msg)


def analyze(
    loaded: LoadedModel,
    data: str | list[Document] = BUILTIN,
    n_samples: int = 128,
    max_tokens: int = 128,
    pooling: str = "mean",
    tokens_per_sample: int = 8,
    batch_size: int = 16,
    k: int = 8,
    d: int = 4,
    t: float = 1.0,
    alpha: float = 0.5,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> Analysis:
    """Calibration text → one capture pass → every similarity measure, with stage timings."""
    docs = load_documents(data, "calibration") if isinstance(data, str) else data
    batch = make_calibration(loaded.tokenizer, docs, n_samples=n_samples, max_tokens=max_tokens)
    t0 = time.perf_counter()
    acts = capture_activations(
        loaded.model,
        batch,
        pooling=pooling,
        batch_size=batch_size,
        tokens_per_sample=tokens_per_sample,
        seed=seed,
        progress=_scaled(progress, 0.0, 0.85),
    )
    capture_s = time.perf_counter() - t0
    sim = compute_similarity(
        acts, k=k, d=d, t=t, alpha=alpha, seed=seed, progress=_scaled(progress, 0.85, 1.0)
    )
    sim.timings = {"capture": capture_s, **sim.timings}
    sim.params.update(
        model=loaded.source,
        fingerprint=loaded.fingerprint,
        device=loaded.device,
        data=data if isinstance(data, str) else "documents",
    )
    report(progress, 1.0, "analysis done")
    return Analysis(batch, acts, sim)
