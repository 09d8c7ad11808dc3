"""Benchmark section `dtype`: bf16 against fp32 on this CPU, for the choice of the CPU default.

On the bundled model, in memory: the time of a capture (analysis' forward pass) and of an
evaluation (perplexity over the evaluation tokens) in each dtype, best of `repeats`; how far the
similarity matrices move (Spearman between the dtypes over all layer pairs and over adjacent pairs,
the largest absolute difference), whether the planners pick the same layers, and how far the
perplexity moves. Writes dtype.csv (one row per measurement) and dtype.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .common import Settings, say, write_csv, write_json

COLUMNS = ["what", "fp32", "bf16", "ratio", "note"]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run(settings: Settings, out: Path) -> dict:
    import torch

    from mka_core.analysis.activations import capture_activations
    from mka_core.analysis.similarity import compute_similarity
    from mka_core.data.corpus import load_documents, make_calibration
    from mka_core.evaluation.evaluate import perplexity
    from mka_core.models.loading import load_model
    from mka_core.workflows.pipeline import Analysis, eval_windows, make_budget_plan

    repeats = 2
    n, t = settings.calib_samples, settings.calib_tokens
    rows, runs = [], {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        say(f"dtype: {settings.model} in {name}")
        loaded = load_model(settings.model, device="cpu", dtype=dtype, offload=False)
        batch = make_calibration(loaded.tokenizer, load_documents(), n_samples=n, max_tokens=t)
        windows = eval_windows(
            loaded, budget_tokens=settings.eval_tokens, window=settings.eval_window
        )
        model = loaded.model
        cap_s, acts = _best(lambda m=model, b=batch: capture_activations(m, b), repeats)
        ppl_s, ppl = _best(lambda m=model, w=windows: perplexity(m, w), repeats)
        sim = compute_similarity(acts)

        analysis = Analysis(batch, acts, sim)
        n_remove = min(6, loaded.n_layers - 3)
        picks = {
            p: [st.layers for st in make_budget_plan(loaded, analysis, p, n_remove=n_remove).steps]
            for p in ("mka", "shortgpt", "angular")
        }
        runs[name] = dict(capture_s=cap_s, eval_s=ppl_s, perplexity=ppl, sim=sim, picks=picks)
        say(f"dtype: {name}: capture {cap_s:.2f} s, perplexity {ppl:.3f} in {ppl_s:.2f} s")

    f, b = runs["fp32"], runs["bf16"]
    rows.append(
        dict(
            what=f"capture {n}x{t} tokens (s)",
            fp32=f["capture_s"],
            bf16=b["capture_s"],
            ratio=f["capture_s"] / b["capture_s"],
            note="speed-up of bf16",
        )
    )
    rows.append(
        dict(
            what=f"perplexity on {settings.eval_tokens} tokens (s)",
            fp32=f["eval_s"],
            bf16=b["eval_s"],
            ratio=f["eval_s"] / b["eval_s"],
            note="speed-up of bf16",
        )
    )
    rows.append(
        dict(
            what="perplexity",
            fp32=f["perplexity"],
            bf16=b["perplexity"],
            ratio=b["perplexity"] / f["perplexity"],
            note="bf16 / fp32",
        )
    )
    n_l = f["sim"].n_layers
    iu = np.triu_indices(n_l, 1)
    adj = (np.arange(n_l - 1), np.arange(1, n_l))
    for m in f["sim"].matrices:
        a, c = f["sim"].matrices[m], b["sim"].matrices[m]
        rows.append(
            dict(
                what=f"{m}: Spearman fp32 vs bf16, all pairs / adjacent pairs",
                fp32=_spearman(a[iu], c[iu]),
                bf16=_spearman(a[adj], c[adj]),
                ratio=None,
                note=f"largest |difference| {np.abs(a - c).max():.4f}",
            )
        )
    rows.append(
        dict(
            what="bi: Spearman fp32 vs bf16 over layers",
            fp32=_spearman(f["sim"].bi, b["sim"].bi),
            bf16=None,
            ratio=None,
            note=f"largest |difference| {np.abs(f['sim'].bi - b['sim'].bi).max():.4f}",
        )
    )
    for p in f["picks"]:
        same = f["picks"][p] == b["picks"][p]
        rows.append(
            dict(
                what=f"{p} picks at {min(6, f['sim'].n_layers - 3)} layers",
                fp32=str(f["picks"][p]),
                bf16=str(b["picks"][p]),
                ratio=None,
                note="same" if same else "different",
            )
        )
    write_csv(out / "dtype.csv", rows, COLUMNS)
    summary = {
        "model": settings.model,
        "capture_speedup": rows[0]["ratio"],
        "eval_speedup": rows[1]["ratio"],
        "perplexity_fp32": f["perplexity"],
        "perplexity_bf16": b["perplexity"],
        "repeats": repeats,
    }
    write_json(out / "dtype.json", summary)
    return summary
