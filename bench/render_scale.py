"""BENCHMARKS.md sections for models bigger than memory (`scale`) and the CPU dtype (`dtype`),
from scale.csv / scale.json and dtype.csv / dtype.json (see bench/scale.py, bench/dtype.py)."""

from __future__ import annotations

from pathlib import Path

from .common import read_csv, read_json


def _f(x, digits: int = 1) -> str:
    if x is None or x == "":
        return "–"
    if isinstance(x, float | int):
        return f"{x:,.{digits}f}"
    return str(x)


def scale_section(out: Path) -> list[str]:
    if not (out / "scale.csv").exists():
        return []
    rows = read_csv(out / "scale.csv")
    s = read_json(out / "scale.json", {}) or {}
    L = [
        "## Models bigger than memory",
        "",
        "`python -m bench.run --only scale` (bench/scale.py): the command-line chain, each command "
        f"its own process, on the bundled SmolLM2-135M, a random model of TinyLlama-1.1B's shape "
        "(2.2 GB of bf16) and a random model of **Llama-3-8B's exact shape** (32 layers, d_model "
        "4096, MLP 14336, 32/8 heads, vocabulary 128 256, untied: "
        f"{_f((s.get('llama3_8b_bytes') or 0) / 1e9, 2)} GB of bf16 on disk), written tensor by "
        f"tensor. analyze = {s.get('samples')} samples × {s.get('tokens')} tokens; plan = shortgpt "
        f"and mka removing {s.get('remove')} layers from the saved analysis; apply = the mka plan "
        f"(merged layers) exported shard by shard in the source dtype; evaluate = the export "
        f"against its original on {s.get('eval_tokens')} tokens (in memory it also times decoding "
        "and writes sample generations of both models, which a streamed evaluation skips: hence "
        "its longer times); transact = TransAct scored on "
        "the same calibration samples (one shot), keeping 90 % of every MLP's neurons and every "
        "head, exported. *peak GB* is the child's own "
        "high-water mark of resident memory (VmHWM), page cache dropped before each command. "
        "Random weights: the perplexities are meaningless, the sizes, memory and times are real.",
        "",
        "| model | mode | command | s | peak GB | note |",
        "|---|---|---|---:|---:|---|",
    ]
    for r in rows:
        bad = f" **(exit {r['rc']})**" if r.get("rc") else ""
        L.append(
            f"| {r['model']} | {r['mode']} | {r['command']} | {_f(r['seconds'])} | "
            f"{_f(r['peak_gb'], 2)} | {r.get('note') or ''}{bad} |"
        )
    peak, target = s.get("max_peak_gb_8b"), s.get("peak_target_gb", 4.0)
    ratio, tr = s.get("analysis_ratio"), s.get("analysis_target_ratio", 1.5)
    L += ["", "**Targets.**", ""]
    if peak is not None:
        verdict = "met" if peak <= target else f"missed by {peak - target:.2f} GB"
        L.append(
            f"- Peak memory of every Llama-3-8B command ≤ {target:g} GB: largest "
            f"**{peak:.2f} GB** ({verdict})."
        )
    if ratio is not None:
        verdict = "met" if ratio <= tr else f"missed: {ratio:.2f}× against {tr}×"
        L.append(
            f"- The 8B analysis ≤ {tr}× what it cannot beat: reading the weights once at the disk's "
            f"measured cold speed ({_f(s.get('disk_read_gbps'), 2)} GB/s, O_DIRECT) plus the "
            f"forward FLOPs (2 × block parameters × tokens) at the measured bf16 matmul throughput "
            f"({_f(s.get('bf16_gflops'), 0)} GFLOP/s) = **{_f(s.get('analysis_predicted_s'))} s**; "
            f"measured **{_f(s.get('analysis_measured_s'))} s**, {ratio:.2f}× ({verdict}). The "
            "measurement is the whole process: Python and library imports, the empty skeleton, "
            "tokenising, and the similarity measures."
        )
        gbps, size = s.get("disk_read_gbps"), s.get("llama3_8b_bytes")
        if gbps and size and s.get("analysis_predicted_s"):
            read_s = size / 1e9 / gbps
            compute_s = s["analysis_predicted_s"] - read_s
            L.append(
                f"  The sum is the issue's yardstick, not a floor: the next block is read while "
                f"the current one computes, so the floor is the larger of the two parts (reading "
                f"{read_s:.1f} s, computing {compute_s:.1f} s), and the measurement is "
                f"{s['analysis_measured_s'] / max(read_s, compute_s):.2f}× that."
            )
    b70 = s.get("llama_70b") or {}
    if b70:
        L.append(
            f"- 70 B by arithmetic (Llama-3-70B's shape: 80 layers, d_model 8192, MLP 28672): one "
            f"block is {_f(b70['block_bytes_bf16'] / 1e9, 2)} GB of bf16, the LM head "
            f"{_f(b70['lm_head_bytes_bf16'] / 1e9, 2)} GB, the model "
            f"{_f(b70['weights_bytes_bf16'] / 1e9, 0)} GB. The engine holds one block (and "
            "reads the next), so the 8B peaks scale to about "
            f"**{_f(b70.get('analyze_peak_gb'), 1)} GB** for analyze and "
            f"**{_f(b70.get('evaluate_peak_gb'), 1)} GB** for evaluate (which holds the original's "
            "and the compressed model's LM heads side by side); the time scales with the bytes "
            "read and the FLOPs, about 9× the 8B figures."
        )
    L += [
        "",
        "How: `engine.LayerPass` runs block by block over all samples (llm-compressor's sequential "
        "loop): each block is built on an empty skeleton from its safetensors tensors, read with "
        "O_DIRECT by a second thread while the previous block computes, used for every sample and "
        "dropped; embeddings are read row by row for the tokens present; the LM head is applied "
        "a few hundred positions at a time. Exports write each shard's header first and every "
        "tensor as it is computed (merged ones summed in fp32).",
        "",
    ]
    return L


def dtype_section(out: Path) -> list[str]:
    if not (out / "dtype.csv").exists():
        return []
    rows = read_csv(out / "dtype.csv")
    s = read_json(out / "dtype.json", {}) or {}
    L = [
        "## bf16 or fp32 on this CPU",
        "",
        f"`python -m bench.run --only dtype` (bench/dtype.py), on `{s.get('model', '?')}` in "
        f"memory, times best of {s.get('repeats', '?')}. What it decides: the CPU default compute "
        "dtype (`models.CPU_DTYPE`).",
        "",
        "| measurement | fp32 | bf16 | ratio | note |",
        "|---|---|---|---:|---|",
    ]
    for r in rows:
        L.append(
            f"| {r['what']} | {_f(r['fp32'], 4)} | {_f(r['bf16'], 4)} | {_f(r['ratio'], 3)} | "
            f"{r.get('note') or ''} |"
        )
    if s:
        L += [
            "",
            f"**Reading.** bf16 captures {s['capture_speedup']:.1f}× and evaluates "
            f"{s['eval_speedup']:.1f}× faster than fp32 here (the CPU has AVX512-BF16), and moves "
            f"the perplexity from {s['perplexity_fp32']:.3f} to {s['perplexity_bf16']:.3f}. "
            "Cosine, angular distance, CKA and Block Influence keep their rankings (Spearman ≥ "
            "0.999 between the dtypes); NPIB's ranking moves, as it moves between two halves of "
            "the calibration data (see the stability of the measures). So the CPU default is "
            "**bf16**; `--dtype fp32` (and the app's dtype choice) gives fp32.",
            "",
        ]
    return L
