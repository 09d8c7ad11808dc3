"""BENCHMARKS.md's "From plan to deployment" section: GGUF files read back (gguf.json), layer
removal with and without quantization against quantization alone (quant.csv), and healing by
distillation against plain healing (distill.csv)."""

from __future__ import annotations

from .render_common import _num, _ppl


def _mb(v) -> str:
    return f"{v / 1e6:.1f}" if isinstance(v, int | float) else "–"


def gguf_lines(g: dict | None) -> list[str]:
    if not g or not g.get("files"):
        return []
    files = g["files"]
    L = [
        "### GGUF files, read back",
        "",
        f"`python -m bench.run --only gguf` (`bench/results/gguf.json`): the bundled model with "
        f"{g['layers_removed']} layers removed ({g['plan']}), exported as a bf16 folder and as "
        "GGUF files (`export-gguf`), each file loaded back through transformers' GGUF reader and "
        "gguf-py's dequantizers (what `evaluate --model FILE.gguf` does) and scored on the same "
        "8192 evaluation tokens as the folder.",
        "",
        "| file | perplexity | vs the bf16 folder | size (MB) | export s |",
        "|---|---|---|---|---|",
    ]
    base = files.get("bf16", {}).get("perplexity")
    for name, f in files.items():
        ratio = f.get("ratio_to_bf16")
        rel = f"{100 * (ratio - 1):+.2f} %" if ratio is not None else "–"
        L.append(
            f"| {name} | {_ppl(f.get('perplexity'))} | {rel} | {_mb(f.get('bytes'))} | "
            f"{_num(f.get('export_s'), 1)} |"
        )
    q8 = files.get("Q8_0", {}).get("ratio_to_bf16")
    if q8 is not None and base:
        miss = abs(q8 - 1) - 0.01
        L += [
            "",
            "Target: the Q8_0 file within 1 % of the bf16 folder's perplexity: "
            + ("**met**" if miss <= 0 else f"**missed** by {100 * miss:.2f} points")
            + f" ({100 * (q8 - 1):+.2f} %).",
        ]
    mem = g.get("memory")
    if mem:
        runs = mem["runs"]
        cells = ", ".join(
            f"{q}: peak {_num(r['peak_gb'], 2)} GB in {_num(r['seconds'], 0)} s"
            + (f" ({_mb(r['bytes'])} MB written)" if r.get("bytes") else f" (failed: {r['error']})")
            for q, r in runs.items()
        )
        peak = max((r["peak_gb"] or 0) for r in runs.values())
        L += [
            "",
            f"Memory (`python -m bench.run --only gguf_memory`): `export-gguf` of a random model of "
            f"Llama-3-8B's widths with 4 of its layers ({_mb(mem['source_bytes'])} MB of bf16: "
            f"every tensor one of the 8B's own shapes, the 1 GB embedding and head included), "
            f"peak resident memory of the child process: {cells}. Target: within the chain's 4 GB "
            + ("— **met**." if peak <= 4 else f"— **missed** by {peak - 4:.2f} GB."),
        ]
    return L + [""]


def quant_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    L = [
        "### Layer removal and quantization, against quantization alone",
        "",
        "`python -m bench.run --only quant` (`bench/results/quant.csv`): each row as computed "
        "(bf16) and after a quantize → dequantize round trip of every weight matrix with the GGUF "
        "export's own quantizers (`compare --quant Q8_0,Q4_0`); KL and top-1 against the "
        "unquantized original; size = the GGUF file's tensors (bf16 for unquantized rows).",
        "",
        "| config | quant | size (MB) | perplexity | KL | top-1 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        L.append(
            f"| {r['config']} | {r['quant']} | {_mb(r.get('gguf_bytes'))} | "
            f"{_ppl(r.get('perplexity'))} | {_num(r.get('kl'), 4)} | {_num(r.get('top1'), 3)} |"
        )
    L += ["", *_quant_reading(rows)]
    return L + [""]


def _quant_reading(rows: list[dict]) -> list[str]:
    """At each quantization's file size of the original alone, the best row no larger."""
    orig = {r["quant"]: r for r in rows if r["config"] == "original"}
    out = []
    for q, o in orig.items():
        if q == "bf16" or o.get("gguf_bytes") is None:
            continue
        smaller = [
            r
            for r in rows
            if r["config"] != "original"
            and r.get("perplexity") is not None
            and r["gguf_bytes"] is not None
            and r["gguf_bytes"] < o["gguf_bytes"]
        ]
        if not smaller:
            continue
        best = min(smaller, key=lambda r: r["perplexity"])
        verdict = "better" if best["perplexity"] < o["perplexity"] else "worse"
        out.append(
            f"- Smaller than the original at {q} ({_mb(o['gguf_bytes'])} MB, perplexity "
            f"{_ppl(o['perplexity'])}): the best is {best['config']} at {best['quant']} "
            f"({_mb(best['gguf_bytes'])} MB, perplexity {_ppl(best['perplexity'])}), {verdict}."
        )
    comp = [r for r in rows if r["config"] != "original" and r.get("perplexity")]
    # rows the original has a file no larger than, and those of them it also beats
    comparable = [r for r in comp if any(o["gguf_bytes"] <= r["gguf_bytes"] for o in orig.values())]
    beaten = [
        r
        for r in comparable
        if any(
            o["gguf_bytes"] <= r["gguf_bytes"] and o["perplexity"] <= r["perplexity"]
            for o in orig.values()
        )
    ]
    if comparable:
        ahead = [r for r in comparable if r not in beaten]
        named = ", ".join(f"{r['config']} at {r['quant']} ({_ppl(r['perplexity'])})" for r in ahead)
        out.append(
            f"- Of the {len(comparable)} layer-removed rows at least as large as some quantized "
            f"original, {len(beaten)} lose to an original file no larger with a perplexity no "
            f"higher" + (f"; ahead of every original file no larger: {named}." if ahead else ".")
        )
    base = {r["config"]: r["perplexity"] for r in rows if r["quant"] == "bf16"}
    moves = sorted(
        (abs(r["perplexity"] / base[r["config"]] - 1), r["config"])
        for r in rows
        if r["quant"] == "Q8_0" and r.get("perplexity") and base.get(r["config"])
    )
    if moves:
        (worst, who), rest = moves[-1], [m for m, _ in moves[:-1]]
        out.append(
            f"- Q8_0 changes a row's perplexity by at most {100 * worst:.2f} % ({who}), the "
            f"others by at most {100 * max(rest or [0]):.2f} %; Q4_0 costs far more on a model "
            "this small."
        )
    return out


def distill_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    L = [
        "### Healing by distillation",
        "",
        "`python -m bench.run --only distill` (`bench/results/distill.csv`): the frontier's best "
        "quickly planned row at 6 and 10 layers removed, healed with the same steps, learning "
        "rate, batch, draws and seed by next-token loss (`heal`) and by distillation from the "
        "original (`heal --loss kd`, its top-64 logits per position, computed once). Scored on "
        "the held-out evaluation windows and on text of another kind.",
        "",
        "| config | loss | steps | perplexity before → after | KL before → after | "
        "top-1 after | other text: perplexity | other text: KL | heal s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("error"):
            L.append(f"| {r['config']} | – | – | {r['error']} | | | |")
            continue
        L.append(
            f"| {r['config']} | {r['loss']} | {r['steps']} | {_ppl(r['perplexity_before'])} → "
            f"{_ppl(r['perplexity_after'])} | {_num(r['kl_before'], 3)} → "
            f"{_num(r['kl_after'], 3)} | {_num(r['top1_after'], 3)} | "
            f"{_ppl(r.get('ood_perplexity_before'))} → {_ppl(r.get('ood_perplexity_after'))} | "
            f"{_num(r.get('ood_kl_before'), 3)} → {_num(r.get('ood_kl_after'), 3)} | "
            f"{_num(r['heal_s'], 0)} |"
        )
    reading = []
    for cfg in dict.fromkeys(r["config"] for r in rows if not r.get("error")):
        by = {r["loss"]: r for r in rows if r["config"] == cfg and not r.get("error")}
        if "ce" in by and "kd" in by:
            ce, kd = by["ce"]["perplexity_after"], by["kd"]["perplexity_after"]
            k, c = by["kd"], by["ce"]
            reading.append(
                f"- {cfg}: the KL to the original goes {_num(k['kl_before'], 3)} → "
                f"{_num(k['kl_after'], 3)} by distillation and → {_num(c['kl_after'], 3)} by plain "
                f"healing (top-1 agreement {_num(k['top1_after'], 3)} against "
                f"{_num(c['top1_after'], 3)}); perplexity ends at {_ppl(kd)} against {_ppl(ce)} "
                f"({100 * (kd / ce - 1):+.1f} %)."
                + (
                    f" On the other text: perplexity {_ppl(k['ood_perplexity_before'])} → "
                    f"{_ppl(k['ood_perplexity_after'])} (kd) and → "
                    f"{_ppl(c['ood_perplexity_after'])} (ce), the original "
                    f"{_ppl(k['ood_perplexity_original'])}."
                    if k.get("ood_perplexity_after") is not None
                    else ""
                )
            )
    ce_rows = [r for r in rows if r.get("loss") == "ce" and not r.get("error")]
    ce_drifts = ce_rows and all(r["kl_after"] > r["kl_before"] for r in ce_rows)
    if reading and ce_drifts:
        reading.append(
            "- Read the two measures apart: the evaluation windows are held-out documents of the "
            "same corpus as the calibration text the heals train on, so plain next-token "
            "training lowers their perplexity by fitting the corpus while moving the model away "
            "from the original (its KL rises); distillation moves it back towards the original. "
            "The *other text* columns score text of another kind that neither heal saw (Debian's "
            "copy of the GPL-3, `/usr/share/common-licenses/GPL-3`), against the original's "
            "perplexity there."
        )
    return L + ["", *reading, ""]


def deploy_section(gguf: dict | None, quant: list[dict], distill: list[dict]) -> list[str]:
    body = gguf_lines(gguf) + quant_lines(quant) + distill_lines(distill)
    if not body:
        return []
    return ["## From plan to deployment", "", *body]
