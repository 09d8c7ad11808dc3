"""BENCHMARKS.md sections for models bigger than memory (`scale`) and the CPU dtype (`dtype`),
from scale.csv / scale.json and dtype.csv / dtype.json (see bench/scale.py, bench/dtype.py)."""

from __future__ import annotations

from pathlib import Path

from .common import read_csv, read_json, write_atomic

SCALE_TITLE = "## Models bigger than memory"


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
    wide = s.get("wide_70b") or {}
    L = [
        SCALE_TITLE,
        "",
        "`python -m bench.run --only scale` (bench/scale.py): the command-line chain, each command "
        f"its own process, on the bundled SmolLM2-135M, a random model of TinyLlama-1.1B's shape "
        "(2.2 GB of bf16), a random model of **Llama-3-8B's exact shape** (32 layers, d_model "
        "4096, MLP 14336, 32/8 heads, vocabulary 128 256, untied: "
        f"{_f((s.get('llama3_8b_bytes') or 0) / 1e9, 2)} GB of bf16 on disk) and one of "
        "**Llama-3-70B's widths** with 4 of its 80 layers (d_model 8192, MLP 28672, 64/8 heads, "
        f"vocabulary 128 256, untied: {_f((wide.get('bytes') or 0) / 1e9, 2)} GB; its blocks, "
        "embedding and LM head are 70B's own, so its memory is 70B's), written tensor by "
        f"tensor. analyze = {s.get('samples')} samples × {s.get('tokens')} tokens; plan = shortgpt "
        f"and mka removing {s.get('remove')} layers (1 of the 70B-wide model's 4) from the saved "
        "analysis; apply = the mka plan "
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
    wpeak = wide.get("max_peak_gb")
    if wpeak is not None:
        verdict = "met" if wpeak <= target else f"missed by {wpeak - target:.2f} GB"
        L.append(
            f"- 70 B-wide blocks in {target:g} GB: every command on the model of Llama-3-70B's "
            f"widths under {target:g} GB of peak memory: largest **{wpeak:.2f} GB** ({verdict})."
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
            f"{_f(b70['weights_bytes_bf16'] / 1e9, 0)} GB. "
            + (
                "Its memory per command is measured on the 70B-wide model above (the same "
                "block, embedding and LM head; more layers add time, not memory)"
                if wpeak is not None
                else f"The 8B peaks scale to about **{_f(b70.get('analyze_peak_gb'), 1)} GB** "
                f"for analyze and **{_f(b70.get('evaluate_peak_gb'), 1)} GB** for evaluate"
            )
            + "; the time scales with the bytes read and the FLOPs, about 9× the 8B figures."
        )
    if wide.get("commands"):
        L += [
            "",
            f"The {wide.get('shape')} rows, command by command (the model folder and "
            "outputs under `$MKA_SCALE_DIR`; `python -m bench.scale` reruns this chain alone):",
            "",
        ]
        L += [f"- {label}: `{cmd}`" for label, cmd in wide["commands"].items()]
    L += [
        "",
        "How: `engine.LayerPass` runs block by block over all samples (llm-compressor's sequential "
        "loop): each block is built on an empty skeleton from its safetensors tensors, read with "
        "O_DIRECT (up to 1 GiB of it by a second thread while the previous block computes, the "
        "rest once that block is dropped, so a pass holds one block and 1 GiB, not two blocks), "
        "used for every sample and dropped; embeddings are read row by row for the tokens "
        "present; evaluation reads each LM head a vocabulary slice at a time (64 MB of bf16; "
        "both models' heads in step, with log-sum-exp, target, argmax and KL kept as running sums "
        "per position), so neither head is ever held whole. Exports write each shard's header "
        "first and every tensor as it is computed (merged ones summed in fp32).",
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


def splice_scale_section(out: Path, md: Path) -> Path:
    """Rewrite the scale section of an existing report from scale.csv / scale.json, leaving every
    other section as it is (after a chain run alone; a full run renders the whole report)."""
    lines = md.read_text(encoding="utf-8").split("\n") if md.exists() else []
    new = scale_section(out)
    if SCALE_TITLE in lines:
        start = lines.index(SCALE_TITLE)
        end = next(
            (
                i
                for i in range(start + 1, len(lines))
                if lines[i].startswith("## ") or lines[i].startswith("Interactive versions")
            ),
            len(lines),
        )
        lines = lines[:start] + new + lines[end:]
    else:
        lines = lines + [""] + new
    write_atomic(md, "\n".join(lines).rstrip() + "\n")
    return md
