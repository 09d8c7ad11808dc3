"""Analysis cost: seconds and peak memory of every stage a user goes through (load cold / load
cached, capture, diffusion maps, NPIB, the other similarity measures, planning, applying,
evaluating) at several numbers of calibration samples N (bench/results/cost.csv), and how the
per-layer stages grow with the number of layers (bench/results/cost_layers.csv).

Stages are timed one by one through the product's functions, in the order
`pipeline.analyze` → `similarity.compute_similarity` runs them: `activations.capture_activations`,
`manifold.diffusion_maps`, `similarity.cluster_codes` + `npib_from_codes` (NPIB), and
`row_cosines` / `cka_matrix` (cosine, angular distance, Block Influence, CKA). Stages that do not
depend on N (loading, evaluating) are measured once and written with n_samples = 0.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import Measure, Settings, say, write_csv

COLUMNS = ["stage", "n_samples", "seconds", "peak_mb", "added_mb", "n_layers", "tokens", "detail"]
STAGES_N = ("capture", "diffusion", "npib", "other_measures", "plan", "apply")


def _similarity_stages(acts, seed: int = 0) -> dict[str, Measure]:
    """Time each similarity stage on one capture, as compute_similarity runs them."""
    from mka_core.analysis.manifold import diffusion_maps
    from mka_core.analysis.similarity import cka_matrix, cluster_codes, npib_from_codes, row_cosines

    out: dict[str, Measure] = {}
    with Measure() as m:
        maps = diffusion_maps(acts.outputs, d=4, t=1.0, alpha=0.5)
    out["diffusion"] = m
    with Measure() as m:
        npib_from_codes(cluster_codes([d.embedding for d in maps], k=8, seed=seed))
    out["npib"] = m
    with Measure() as m:
        cos_all = row_cosines(acts.states)  # (L+1, L+1, N)
        cos_all[1:, 1:].mean(axis=-1)  # cosine
        (np.arccos(cos_all) / np.pi).mean(axis=-1)  # angular distance, all block boundaries
        1.0 - np.array([cos_all[i, i + 1].mean() for i in range(acts.n_layers)])  # BI
        cka_matrix(acts.outputs)
    out["other_measures"] = m
    return out


def _row(stage: str, n: int, m: Measure, **extra) -> dict:
    return {
        "stage": stage,
        "n_samples": n,
        "seconds": m.seconds,
        "peak_mb": m.peak_mb,
        "added_mb": m.added_mb,
        **extra,
    }


def run(settings: Settings, out: Path) -> dict:
    from mka_core.analysis.activations import capture_activations
    from mka_core.analysis.similarity import compute_similarity
    from mka_core.compression.merge import apply_plan
    from mka_core.compression.planners.search import model_view
    from mka_core.data.corpus import BUILTIN, load_documents, make_calibration
    from mka_core.evaluation import evaluate
    from mka_core.models.loading import load_model
    from mka_core.workflows import pipeline

    t_section = time.perf_counter()
    rows: list[dict] = []
    layer_rows: list[dict] = []

    def flush():
        write_csv(out / "cost.csv", rows, COLUMNS)
        write_csv(out / "cost_layers.csv", layer_rows, COLUMNS)

    # -- loading: cold (an empty converted-model cache) and cached
    say(f"cost: cold load of {settings.model} (empty cache folder)")
    tmp = tempfile.mkdtemp(prefix="mka-bench-cache-")
    old = os.environ.get("MKA_STUDIO_CACHE")
    os.environ["MKA_STUDIO_CACHE"] = tmp
    try:
        with Measure() as m:
            cold = load_model(settings.model)
        rows.append(_row("load_cold", 0, m, n_layers=cold.n_layers, detail="empty cache"))
        del cold
    finally:
        if old is None:
            os.environ.pop("MKA_STUDIO_CACHE", None)
        else:
            os.environ["MKA_STUDIO_CACHE"] = old
        shutil.rmtree(tmp, ignore_errors=True)
    gc.collect()
    say("cost: cached load")
    with Measure() as m:
        loaded = load_model(settings.model)
    rows.append(_row("load_cached", 0, m, n_layers=loaded.n_layers, detail="converted cache"))
    flush()
    n_layers = loaded.n_layers
    docs = load_documents(BUILTIN, "calibration")

    # an untimed warm-up: the first k-means, BLAS and capture calls of a process pay one-off
    # set-up costs that would otherwise land on the smallest N
    warm = make_calibration(loaded.tokenizer, docs, n_samples=16, max_tokens=settings.cost_tokens)
    _similarity_stages(capture_activations(loaded.model, warm))

    # -- the N sweep
    plan = None
    for n in settings.cost_samples:
        batch = make_calibration(
            loaded.tokenizer, docs, n_samples=n, max_tokens=settings.cost_tokens
        )
        say(f"cost: N = {n}: capture ({batch.n_tokens} tokens)")
        with Measure() as m:
            acts = capture_activations(loaded.model, batch)
        rows.append(_row("capture", n, m, n_layers=n_layers, tokens=batch.n_tokens))
        say(f"cost: N = {n}: similarity stages")
        for stage, m in _similarity_stages(acts).items():
            rows.append(_row(stage, n, m, n_layers=n_layers, tokens=batch.n_tokens))
        sim = compute_similarity(acts)  # the product's own call, for the planner below
        analysis = pipeline.Analysis(batch, acts, sim)
        with Measure() as m:
            plan = pipeline.make_budget_plan(
                loaded, analysis, "mka", n_remove=settings.cost_plan_remove
            )
        rows.append(
            _row("plan", n, m, n_layers=n_layers, detail=f"mka, similarity α, -{plan.n_removed}")
        )
        with Measure() as m:
            model = apply_plan(loaded.model, plan)
        rows.append(_row("apply", n, m, n_layers=n_layers, detail=f"-{plan.n_removed} layers"))
        flush()
        del acts, sim, analysis
        if n != settings.cost_samples[-1]:
            del model
        gc.collect()

    # -- evaluating the last compressed model against the original, as run_plan does
    windows = pipeline.eval_windows(
        loaded, BUILTIN, budget_tokens=settings.eval_tokens, window=settings.eval_window
    )
    say(f"cost: evaluate (compare on {windows.numel()} tokens, speed, generations)")
    with Measure() as m:
        evaluate.compare(loaded, model, windows, tokenizer=loaded.tokenizer)
    rows.append(
        _row(
            "evaluate",
            0,
            m,
            n_layers=n_layers,
            tokens=int(windows.numel()),
            detail="fidelity of both models, speed, generations",
        )
    )
    del model
    gc.collect()
    flush()

    # -- growth with the number of layers: the first L blocks of the same model
    n = settings.cost_layers_samples
    batch = make_calibration(loaded.tokenizer, docs, n_samples=n, max_tokens=settings.cost_tokens)
    for n_l in settings.cost_layers:
        n_l = min(n_l, n_layers)
        view = model_view(loaded.model, [[(i, 1.0)] for i in range(n_l)])
        say(f"cost: {n_l} layers, N = {n}")
        with Measure() as m:
            acts = capture_activations(view, batch)
        layer_rows.append(_row("capture", n, m, n_layers=n_l, tokens=batch.n_tokens))
        for stage, m in _similarity_stages(acts).items():
            layer_rows.append(_row(stage, n, m, n_layers=n_l, tokens=batch.n_tokens))
        flush()
        del view, acts
        gc.collect()
    return {"wall_s": round(time.perf_counter() - t_section, 1), "rows": len(rows)}
