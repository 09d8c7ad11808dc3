"""From plan to deployment: quantization on top of layer removal, and GGUF files.

Section `quant` (bench/results/quant.csv): the frontier's best removal rows and plain ShortGPT at
the quality budgets, each measured as computed and after a quantize → dequantize round trip of its
weights at Q8_0 and Q4_0 (the GGUF export's own quantizers), beside the original quantized alone:
"MKA + quantization against quantization alone". One `compare_sweep` call with ``quants``.

Section `gguf` (bench/results/gguf.json): the acceptance check of the GGUF export. The bundled
model with 6 layers removed (ShortGPT's cuts, compensated by the linear map) is exported as a
bf16 folder and as Q8_0 / Q4_0 GGUF files; each file is loaded back (transformers' GGUF reader
and gguf-py's dequantizers, as `evaluate --model FILE.gguf` does) and evaluated on the same
windows as the folder. Target: the Q8_0 file within 1 % of the folder's perplexity.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .common import (
    Settings,
    loaded_analysis,
    read_json,
    say,
    sweep_progress,
    write_csv,
    write_json,
)

QUANTS = ("Q8_0", "Q4_0")
SPECS = ("shortgpt", "shortgpt+linear", "sleb+linear")
GGUF_BUDGET = 6
QUANT_COLUMNS = [
    "config",
    "quant",
    "layers_removed",
    "params_removed_pct",
    "gguf_bytes",
    "perplexity",
    "kl",
    "top1",
    "eval_s",
]


def run(settings: Settings, out: Path) -> dict:
    from mka_core.workflows.compare import compare_sweep

    t0 = time.perf_counter()
    loaded, analysis = loaded_analysis(settings)
    result = compare_sweep(
        loaded,
        analysis,
        list(SPECS),
        list(settings.budgets),
        quants=QUANTS,
        eval_budget=settings.eval_tokens,
        eval_window=settings.eval_window,
        loss_samples=settings.loss_samples,
        plan_limit_s=settings.plan_limit_s,
        progress=sweep_progress("quant"),
    )
    rows = [{k: r.get(k) for k in QUANT_COLUMNS} for r in result.rows]
    for r in rows:
        r["quant"] = r["quant"] or "bf16"
    write_csv(out / "quant.csv", rows, QUANT_COLUMNS)
    return {"wall_s": round(time.perf_counter() - t0, 1), "rows": len(rows)}


def run_gguf(settings: Settings, out: Path) -> dict:
    from mka_core.compression.merge import apply_plan
    from mka_core.engine.weights import SafetensorsStore
    from mka_core.evaluation.evaluate import perplexity
    from mka_core.models.loading import load_model
    from mka_core.workflows.export import save_model
    from mka_core.workflows.gguf_export import export_gguf
    from mka_core.workflows.pipeline import eval_windows, make_budget_plan

    loaded, analysis = loaded_analysis(settings)
    budget = min(GGUF_BUDGET, max(settings.budgets))
    plan = make_budget_plan(loaded, analysis, "shortgpt", n_remove=budget, compensation="linear")
    model = apply_plan(loaded.model, plan, batch=analysis.batch)
    windows = eval_windows(loaded, "builtin", settings.eval_tokens, settings.eval_window)
    result: dict = {"layers_removed": budget, "plan": "shortgpt+linear", "files": {}}
    with tempfile.TemporaryDirectory(prefix="mka-bench-gguf-") as tmp:
        folder = Path(tmp) / "bf16"
        save_model(model, loaded.tokenizer, folder, plan=plan, out_dtype="bf16")
        del model
        t = time.perf_counter()
        ref = load_model(str(folder))
        ppl_bf16 = perplexity(ref.model, windows)
        result["files"]["bf16"] = {
            "perplexity": ppl_bf16,
            "bytes": SafetensorsStore(folder).n_bytes,
            "eval_s": round(time.perf_counter() - t, 1),
        }
        say(f"gguf: bf16 folder perplexity {ppl_bf16:.3f}")
        del ref
        for q in QUANTS:
            path = Path(tmp) / f"model-{q}.gguf"
            t = time.perf_counter()
            summary = export_gguf(str(folder), path, q)
            export_s = time.perf_counter() - t
            back = load_model(str(path))
            ppl = perplexity(back.model, windows)
            result["files"][q] = {
                "perplexity": ppl,
                "ratio_to_bf16": ppl / ppl_bf16,
                "bytes": path.stat().st_size,
                "export_s": round(export_s, 1),
                "tensor_types": summary.get("tensor_types"),
            }
            say(f"gguf: {q} file perplexity {ppl:.3f} ({ppl / ppl_bf16 - 1:+.2%} vs bf16)")
            del back
    result["q8_within_1pct"] = abs(result["files"]["Q8_0"]["ratio_to_bf16"] - 1) <= 0.01
    kept = (read_json(out / "gguf.json", {}) or {}).get("memory")  # run_gguf_memory's
    write_json(out / "gguf.json", {**result, **({"memory": kept} if kept else {})})
    return result


def run_gguf_memory(settings: Settings, out: Path) -> dict:
    """`export-gguf` of a model of Llama-3-8B's widths (4 of its 32 layers: every tensor is one
    of the 8B's own shapes, the 1 GB embedding and LM head included) in a child process, at Q8_0
    and Q4_0: its peak resident memory (target: within the 4 GB of the rest of the chain) and
    seconds. Adds "memory" to bench/results/gguf.json."""
    from mka_core.models.synthetic import SHAPES, llama_config, write_random_model

    from .scale import MODELS_DIR, WORK_DIR, _bundled_tokenizer, run_cli

    name = "llama3-8b-wide-4l"
    folder = MODELS_DIR / name
    if not (folder / "config.json").is_file():
        MODELS_DIR.mkdir(parents=True, exist_ok=True)
        say(f"gguf memory: writing a random {name} model to {folder} (once)")
        config = llama_config(**{**SHAPES["llama3-8b"], "num_hidden_layers": 4})
        write_random_model(config, folder, tokenizer=_bundled_tokenizer())
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    rows = {}
    for q in QUANTS:
        target = WORK_DIR / f"{name}-{q}.gguf"
        r = run_cli(
            ["export-gguf", "--model", str(folder), "--quant", q, "--quiet"]
            + ["--out", str(target), "--overwrite"]
        )
        size = target.stat().st_size if target.is_file() else None
        target.unlink(missing_ok=True)
        rows[q] = {
            "seconds": r["seconds"],
            "peak_gb": r["peak_gb"],
            "rc": r["rc"],
            "bytes": size,
            "error": r["error"],
        }
        say(f"gguf memory: {name} {q}: {r['seconds']} s, peak {r['peak_gb']} GB, rc {r['rc']}")
    doc = read_json(out / "gguf.json", {}) or {}
    doc["memory"] = {
        "model": name,
        "source_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
        "runs": rows,
    }
    write_json(out / "gguf.json", doc)
    return doc["memory"]
