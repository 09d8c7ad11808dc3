"""Benchmark section `scale`: the command-line chain on models bigger than memory.

For each model — the bundled SmolLM2-135M, a random model of TinyLlama-1.1B's shape and one of
Llama-3-8B's exact shape (32 layers, d_model 4096, MLP 14336, 32/8 heads, vocabulary 128 256,
untied; 16 GB of bf16), both written tensor by tensor with the bundled tokenizer — it runs, each as
its own process: ``analyze`` (16 samples × 64 tokens), ``plan`` with shortgpt and with mka (8
layers, from the saved analysis), ``apply`` of the mka plan (an export with merged layers) and
``export-gguf`` of that export at Q8_0, ``evaluate`` of the export against its original (512
tokens), streamed (--offload) and, where the
model fits, in memory (--no-offload). Every row records wall time and the child's peak resident
memory (its VmHWM, read by the child itself at exit). The page cache is dropped before each command
where this process may (root), so reads come from the disk.

The analysis is compared with what it cannot beat: reading the weights once (bytes / the disk's
measured read speed) plus the forward pass' FLOPs (2 × block parameters × tokens) at the measured
bf16 matmul throughput. 70B is estimated by arithmetic from the 8B measurement, and measured on
a random model of **Llama-3-70B's widths** with 4 of its 80 layers (d_model 8192, MLP 28672, 64/8
heads, vocabulary 128 256, untied; 11 GB of bf16): one block, the embedding and the LM head are
70B's own, so every command's memory is what it is on 70B (the time is not: 4 blocks, not 80).
Its chain removes 1 of the 4 layers (the first and the last are protected).

``python -m bench.scale --model llama3-70b-wide-4l`` runs one model's chain alone: its rows in
scale.csv are replaced and the scale section of BENCHMARKS.md is rewritten (nothing else). The
models and the chains' outputs (exports of 8-15 GB) go under $MKA_SCALE_DIR (default
bench/results/tmp, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .common import DEFAULT_OUT, REPO, Settings, read_csv, read_json, say, write_csv, write_json

SCALE_DIR = Path(os.environ.get("MKA_SCALE_DIR") or REPO / "bench" / "results" / "tmp")
MODELS_DIR = SCALE_DIR / "models"
WORK_DIR = SCALE_DIR / "scale"
COLUMNS = ["model", "mode", "command", "seconds", "peak_gb", "rc", "note"]
SAMPLES, TOKENS, REMOVE, EVAL_TOKENS = 16, 64, 8, 512
WIDE_70B, REMOVE_WIDE = "llama3-70b-wide-4l", 1  # 4 layers, the first and last protected
LLAMA_70B = dict(
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=128256,
)

# the child reads its own peak (VmHWM) at exit: ru_maxrss would include this process' memory,
# which Linux carries into a forked child
_CHILD = (
    "import sys, time; t0 = time.perf_counter(); from mka_core.cli.main import main; "
    "rc = main(sys.argv[1:]); "
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
    "print('MKA-BENCH', int(hwm.split()[1]) * 1024, time.perf_counter() - t0, file=sys.stderr); "
    "sys.exit(rc)"
)


def drop_caches() -> bool:
    """Empty the page cache (root only), so the next command reads the weights from the disk."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def run_cli(args: list[str], timeout: float = 3600) -> dict:
    """One `python -m mka_core` command in a child process: wall seconds, peak bytes, exit code."""
    cold = drop_caches()
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-c", _CHILD, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    wall = time.perf_counter() - t0
    peak = None
    for line in p.stderr.splitlines():
        if line.startswith("MKA-BENCH"):
            peak = int(line.split()[1])
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    return {
        "seconds": round(wall, 1),
        "peak_gb": round(peak / 1e9, 3) if peak else None,
        "rc": p.returncode,
        "cold": cold,
        "stdout": p.stdout,
        "error": err[-1] if err else (p.stderr[-500:] if p.returncode else ""),
    }


def _bundled_tokenizer():
    from transformers import AutoTokenizer

    from mka_core.models.cache import bundled_gguf_path, gguf_folder

    return AutoTokenizer.from_pretrained(str(gguf_folder(bundled_gguf_path())))


def ensure_model(shape: str) -> tuple[Path, float | None]:
    """The random model of `shape` (written once, tensor by tensor) and the seconds it took."""
    from mka_core.models.synthetic import SHAPES, llama_config, write_random_model

    folder = MODELS_DIR / shape
    if (folder / "config.json").is_file():
        return folder, None
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    say(f"scale: writing a random {shape} model to {folder} (once)")
    t0 = time.perf_counter()
    write_random_model(llama_config(**SHAPES[shape]), folder, tokenizer=_bundled_tokenizer())
    return folder, time.perf_counter() - t0


def bf16_gflops() -> float:
    """bf16 matmul throughput of this CPU (or GPU) on a Llama-3-8B MLP shape, GFLOP/s."""
    import torch

    from mka_core.models.loading import pick_device, pick_dtype

    device = pick_device()
    dtype = pick_dtype(device)
    x = torch.randn(SAMPLES * TOKENS, 4096, dtype=dtype, device=device)
    w = torch.randn(14336, 4096, dtype=dtype, device=device)
    torch.nn.functional.linear(x, w)
    best = math.inf
    for _ in range(8):
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * x.shape[0] * 4096 * 14336 / best / 1e9


def disk_read_gbps(folder: Path) -> float:
    """Cold read speed of the model's shards, read the way the engine reads them
    (`weights.read_range`: O_DIRECT where allowed), the page cache dropped first where allowed;
    the best of two reads of 4 GB."""
    from mka_core.engine.weights import read_range

    best = 0.0
    piece = 256 * 1024**2
    for _ in range(2):
        drop_caches()
        total, t0 = 0, time.perf_counter()
        for shard in sorted(folder.glob("*.safetensors")):
            size = shard.stat().st_size
            for off in range(0, size, piece):
                total += read_range(shard, off, min(piece, size - off)).numel()
                if total > 4e9:
                    break
            if total > 4e9:
                break
        best = max(best, total / (time.perf_counter() - t0) / 1e9)
    return best


def _block_params(cfg: dict) -> int:
    d, mlp = cfg["hidden_size"], cfg["intermediate_size"]
    hd = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    return 2 * d * d + 2 * d * kv + 3 * d * mlp + 2 * d


def chain(
    name: str, source: str, modes: list[str], rows: list, runs: dict, remove: int = REMOVE
) -> None:
    for mode in modes:
        flag = "--offload" if mode == "streamed" else "--no-offload"
        work = WORK_DIR / f"{name}-{mode}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        common = ["--model", source, flag, "--quiet"]
        steps = [
            (
                "analyze",
                ["analyze", *common, "--samples", str(SAMPLES), "--tokens", str(TOKENS)]
                + ["--out", str(work / "analysis")],
            ),
            (
                "plan shortgpt",
                ["plan", *common, "--analysis", str(work / "analysis"), "--planner", "shortgpt"]
                + ["--layers-to-remove", str(remove), "--out", str(work / "shortgpt.json")],
            ),
            (
                "plan mka",
                ["plan", *common, "--analysis", str(work / "analysis"), "--planner", "mka"]
                + ["--layers-to-remove", str(remove), "--out", str(work / "mka.json")],
            ),
            (
                "plan shortgpt+linear → export",
                ["plan", *common, "--analysis", str(work / "analysis"), "--planner", "shortgpt"]
                + ["--layers-to-remove", str(remove), "--compensation", "linear"]
                + ["--samples", str(SAMPLES), "--tokens", str(TOKENS)]
                + ["--out", str(work / "linear.json"), "--apply", str(work / "linear")],
            ),
            (
                "apply mka → export",
                ["apply", str(work / "mka.json"), *common, "--out", str(work / "merged")],
            ),
            (
                "export-gguf Q8_0 of the export",
                ["export-gguf", "--model", str(work / "merged"), "--quant", "Q8_0", "--quiet"]
                + ["--out", str(work / "merged-Q8_0.gguf")],
            ),
            (
                "evaluate export vs original",
                ["evaluate", "--model", str(work / "merged"), flag, "--quiet", "--json"]
                + ["--budget", str(EVAL_TOKENS), "--window", str(EVAL_TOKENS)]
                + ["--out", str(work / "eval.json")],
            ),
            (
                "transact → export",
                ["transact", *common, "--samples", str(SAMPLES), "--tokens", str(TOKENS)]
                + ["--mlp-keep", "0.9", "--heads-keep", "1.0", "--shots", "1"]
                + ["--out", str(work / "pruned")],
            ),
        ]
        for label, args in steps:
            say(f"scale: {name} {mode}: {label}")
            r = run_cli(args)
            note = r["error"] if r["rc"] else ""
            if label.startswith("evaluate") and r["rc"] == 0:
                res = json.loads(r["stdout"])
                note = (
                    f"perplexity {res['original']['perplexity']:.4g} → {res['perplexity']:.4g}, "
                    f"KL {res['kl']:.3g}, top-1 {res['top1']:.1%}"
                )
            written_to = {"apply": "merged", "transact": "pruned"}.get(label.split()[0])
            written_to = "linear" if "+linear" in label else written_to
            if label.startswith("export-gguf") and r["rc"] == 0:
                gguf = work / "merged-Q8_0.gguf"
                note = f"{gguf.stat().st_size / 1e9:.2f} GB written"
                gguf.unlink()
            if written_to and r["rc"] == 0:
                files = (work / written_to).rglob("*")
                note = f"{sum(f.stat().st_size for f in files if f.is_file()) / 1e9:.2f} GB written"
            rows.append(
                dict(
                    model=name,
                    mode=mode,
                    command=label,
                    seconds=r["seconds"],
                    peak_gb=r["peak_gb"],
                    rc=r["rc"],
                    note=note + ("" if r["cold"] else " (page cache not dropped)"),
                )
            )
            runs[(name, mode, label)] = {**r, "args": args}
            say(f"scale:   {r['seconds']} s, peak {r['peak_gb']} GB, rc {r['rc']} {note}")
            if r["rc"]:
                break
            if label.startswith("evaluate"):  # the export is needed no more: free its disk space
                shutil.rmtree(work / "merged", ignore_errors=True)
        shutil.rmtree(work / "merged", ignore_errors=True)
        shutil.rmtree(work / "pruned", ignore_errors=True)
        shutil.rmtree(work / "linear", ignore_errors=True)


def run(settings: Settings, out: Path) -> dict:
    from mka_core.engine.weights import SafetensorsStore
    from mka_core.models.synthetic import SHAPES

    rows: list[dict] = []
    runs: dict = {}
    written = {}
    chain("smollm2-135m", "bundled:smollm2-135m", ["in memory", "streamed"], rows, runs)
    folder_1b, s1 = ensure_model("llama-1b")
    chain("llama-1b", str(folder_1b), ["in memory", "streamed"], rows, runs)
    folder_8b, s8 = ensure_model("llama3-8b")
    written = {"llama-1b": s1, "llama3-8b": s8}
    # the machine's best: measured before and after the chain (this VM's disk and cores vary by
    # 2x over minutes), so the comparison is with the fastest reading and computing seen
    gflops, read = bf16_gflops(), disk_read_gbps(folder_8b)
    chain("llama3-8b", str(folder_8b), ["streamed"], rows, runs)
    gflops, read = max(gflops, bf16_gflops()), max(read, disk_read_gbps(folder_8b))
    folder_70, s70 = ensure_model(WIDE_70B)
    written[WIDE_70B] = s70
    chain(WIDE_70B, str(folder_70), ["streamed"], rows, runs, remove=REMOVE_WIDE)
    cfg8 = SHAPES["llama3-8b"]
    block8 = _block_params(cfg8)
    model_bytes = SafetensorsStore(folder_8b).n_bytes
    tokens = SAMPLES * TOKENS
    predicted = model_bytes / 1e9 / read + 2 * block8 * cfg8["num_hidden_layers"] * tokens / (
        gflops * 1e9
    )
    analysis = runs.get(("llama3-8b", "streamed", "analyze"), {})
    ratio = analysis.get("seconds", math.nan) / predicted
    peaks8 = [r["peak_gb"] for r in rows if r["model"] == "llama3-8b" and r["peak_gb"]]
    # 70B's sizes by arithmetic (its memory is measured on the 70B-wide model)
    block70 = _block_params(LLAMA_70B)
    head70 = 2 * LLAMA_70B["vocab_size"] * 8192
    summary = {
        "bf16_gflops": round(gflops, 1),
        "disk_read_gbps": round(read, 3),
        "llama3_8b_bytes": model_bytes,
        "llama3_8b_block_bytes_bf16": 2 * block8,
        "analysis_predicted_s": round(predicted, 1),
        "analysis_measured_s": analysis.get("seconds"),
        "analysis_ratio": round(ratio, 2),
        "analysis_target_ratio": 1.5,
        "max_peak_gb_8b": max(peaks8) if peaks8 else None,
        "peak_target_gb": 4.0,
        "llama_70b": {
            "block_bytes_bf16": 2 * block70,
            "lm_head_bytes_bf16": head70,
            "weights_bytes_bf16": 2
            * (block70 * LLAMA_70B["num_hidden_layers"] + 2 * LLAMA_70B["vocab_size"] * 8192),
        },
        **wide_summary(rows, runs, folder_70),
        "written_s": written,
        "samples": SAMPLES,
        "tokens": TOKENS,
        "remove": REMOVE,
        "eval_tokens": EVAL_TOKENS,
    }
    write_csv(out / "scale.csv", rows, COLUMNS)
    write_json(out / "scale.json", summary)
    return summary


def wide_summary(rows: list[dict], runs: dict, folder: Path) -> dict:
    """scale.json's facts about the 70B-wide chain: size, largest peak, the exact commands."""
    from mka_core.engine.weights import SafetensorsStore
    from mka_core.models.synthetic import SHAPES

    peaks = [r["peak_gb"] for r in rows if r["model"] == WIDE_70B and r["peak_gb"]]
    commands = {
        label: "python -m mka_core " + " ".join(r["args"])
        for (model, _, label), r in runs.items()
        if model == WIDE_70B
    }
    return {
        "wide_70b": {
            "shape": WIDE_70B,
            "n_layers": SHAPES[WIDE_70B]["num_hidden_layers"],
            "bytes": SafetensorsStore(folder).n_bytes,
            "remove": REMOVE_WIDE,
            "max_peak_gb": max(peaks) if peaks else None,
            "commands": commands,
        }
    }


def main(argv: list[str] | None = None) -> int:
    """One model's chain alone: its rows of scale.csv replaced, scale.json updated, and the scale
    section of BENCHMARKS.md rewritten (the other sections are left as they are)."""
    from .render_scale import splice_scale_section

    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=main.__doc__)
    ap.add_argument("--model", choices=[WIDE_70B], default=WIDE_70B)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    ap.add_argument("--md", type=Path, default=REPO / "BENCHMARKS.md", help="report to update")
    args = ap.parse_args(argv)
    folder, seconds = ensure_model(args.model)
    rows: list[dict] = []
    runs: dict = {}
    chain(args.model, str(folder), ["streamed"], rows, runs, remove=REMOVE_WIDE)
    old = read_csv(args.out / "scale.csv") if (args.out / "scale.csv").exists() else []
    write_csv(args.out / "scale.csv", [r for r in old if r["model"] != args.model] + rows, COLUMNS)
    summary = read_json(args.out / "scale.json", {}) or {}
    summary.update(wide_summary(rows, runs, folder))
    if seconds is not None:
        summary.setdefault("written_s", {})[args.model] = seconds
    write_json(args.out / "scale.json", summary)
    splice_scale_section(args.out, args.md)
    say(f"scale: {args.model} done: {args.out / 'scale.csv'}, {args.md}")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
