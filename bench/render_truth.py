"""BENCHMARKS.md: how the quality rows were made (`method_section`), and how far each similarity
measure can be trusted and what really matters (`truth_section`, from truth.json and the quality
rows): stability of every measure, proxy against measured damage, the targets of the loss-guided
planners."""

from __future__ import annotations

from pathlib import Path

from .common import read_json


def _f(x, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float | int):
        return f"{x:.{digits}f}"
    return str(x)


def method_section(s: dict, sections: dict) -> list[str]:
    q = sections.get("quality", {})
    return [
        "## Method",
        "",
        f"- **Model**: `{s.get('model')}`, in the CPU default dtype (bf16; see “bf16 or fp32”).",
        f"- **Calibration** (analysis, planning, TransAct scoring, healing): the built-in "
        f"corpus's calibration split, {s.get('calib_samples')} samples of at most "
        f"{s.get('calib_tokens')} tokens ({q.get('calibration_tokens', '?')} tokens), mean "
        "pooling, NPIB with k = 8 clusters (at most N/8) of a 4-D diffusion map. The same batch "
        "for every row; the loss-guided planners (`sleb`, `mka-loss`, `laco`, the `search` α "
        f"rule) score on {s.get('loss_samples')} of its samples.",
        f"- **Evaluation**: the disjoint evaluation split, "
        f"{q.get('eval_tokens', s.get('eval_tokens'))} tokens in non-overlapping windows of "
        f"{s.get('eval_window')} ({q.get('eval_positions', '?')} predicted positions), the same "
        "for every row. KL(original ‖ compressed) and top-1 agreement are measured against the "
        "original's final hidden states, computed once. *halves* is the perplexity on the even "
        "and on the odd windows: two rows whose difference is smaller than the gap between "
        "halves could swap places on other text.",
        "- **Decode speed**: `evaluate.speed` — greedy `generate` with the KV cache, batch 1, "
        "after the fixed 128-token speed prompt; (N − 1) / (t(N new tokens) − t(1)), so the "
        "prefill cancels out.",
        f"- **Budgets**: {', '.join(str(b) for b in s.get('budgets', []))} layers removed; the "
        "first and last layers are protected. **Parameters** count unique tensors (tied "
        "embeddings once).",
        "- **Planners**, all through `python -m mka_core compare` (`compare.compare_sweep`): "
        "`mka` merges the adjacent pair with the highest NPIB, greedily, with each α rule — "
        f"`similarity` (α = NPIB, the paper), `rowmean` (the released code), `fixed` (α = "
        f"{s.get('fixed_alpha')}), `search` (α minimising the calibration loss) — a control, "
        "`drop` (the same pairs, the second layer dropped), and `bootstrap` (NPIB averaged over "
        "the bootstrap resamples of the stability check); `mka-tail` merges the last two "
        "unprotected layers; `shortgpt` drops the lowest Block Influence; `angular` drops the run "
        "of consecutive layers with the smallest angular distance; `laco` collapses layers "
        "top-down while the final hidden states stay close; `sleb` drops, one at a time, the "
        "layer whose removal raises the calibration loss least; `mka-loss` merges the pair whose "
        "merge raises it least (α searched). Greedy planners are planned once at the largest "
        "budget and the smaller budgets take the first steps (their choices never look ahead; "
        "tested), so *plan s* of a smaller budget is when that step was done.",
        "- **TransAct** keeps every layer and head and shrinks every MLP to the parameter count "
        f"of the layer-removed models of the same budget, scored on {s.get('transact_samples')} "
        f"samples, {s.get('transact_shots')} shots.",
        f"- **Healing**: {s.get('heal_steps')} AdamW steps, batch {s.get('heal_batch')}, lr "
        f"{s.get('heal_lr')}, at {' and '.join(str(b) for b in s.get('heal_budgets', []))} "
        "layers removed, for the best merge row, the best other planner's row and TransAct.",
        f"- **Time limit**: a planner still running after {s.get('plan_limit_s', 0):.0f} s is "
        "stopped and its row says so.",
        "",
    ]


def truth_section(out: Path, quality: list[dict]) -> list[str]:
    t = read_json(out / "truth.json", None)
    if not t:
        return []
    st, imp, pvt = t["stability"], t["importance"], t["proxy_vs_truth"]
    names = {
        "npib": "NPIB (MKA)",
        "cosine": "cosine",
        "angular": "angular distance",
        "cka": "linear CKA",
        "bi": "Block Influence",
    }
    from mka_core.analysis.stability import reading

    L = [
        "## Which layers really matter",
        "",
        "### How far each measure can be trusted",
        "",
        "The same measure recomputed on resamples of the captured rows (no forward pass): the "
        f"two halves of the calibration documents ({st['params'].get('half_rows')} rows, split "
        f"by {st['params'].get('split')}), and {st['n_boot']} bootstrap resamples of the samples "
        "(mean Spearman between replicates). *Adjacent* pairs are what the merge planners read. "
        f"Cost: {st['seconds']:.1f} s, against {t['analysis_timings'].get('capture', 0):.1f} s "
        "for the capture.",
        "",
        "| measure | split-half, all pairs | split-half, adjacent | bootstrap, all | bootstrap, "
        "adjacent | reading |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for m in ("npib", "cosine", "angular", "cka", "bi"):
        sh, bs = st["split_half"][m], st["bootstrap"][m]
        key = sh["all"] if m == "bi" else sh["adjacent"]
        L.append(
            f"| {names[m]} | {_f(sh['all'])} | {_f(sh['adjacent'])} | {_f(bs['all'])} | "
            f"{_f(bs['adjacent'])} | {reading(key)} |"
        )
    n = len(imp["drop"])
    L += [
        "",
        "### Proxy against the real damage",
        "",
        f"Measured on {imp['n_samples']} calibration samples ({imp['n_tokens']} tokens): the "
        f"loss increase of dropping each layer alone and of merging each adjacent pair (α by "
        f"{imp['alpha_rule']}), base loss {imp['base_loss']:.3f}. Spearman between each measure's "
        "prediction (drop: how much layer l changes its input, layers 1…L−1; merge: how "
        "dissimilar the pair is) and the measured damage — 1 would mean the measure ranks the "
        "layers exactly as the loss does:",
        "",
        "| measure | drop-one | merge-one |",
        "|---|---:|---:|",
    ]
    for m, v in pvt.items():
        L.append(f"| {names.get(m, m)} | {_f(v['drop'])} | {_f(v['merge'])} |")
    worst = sorted(range(n), key=lambda i: -imp["drop"][i])[:5]
    L += [
        "",
        "Largest drop-one damage (nats): "
        + ", ".join(f"layer {i} {imp['drop'][i]:+.2f}" for i in worst)
        + f"; median {sorted(imp['drop'])[n // 2]:+.2f}.",
        "",
        f"Cost: drop-one {imp['drop_seconds']:.1f} s and merge-one {imp['merge_seconds']:.1f} s, "
        f"against {n} full forward passes of the same samples = "
        f"{n * imp['full_pass_seconds']:.1f} s: **{imp['drop_seconds'] / (n * imp['full_pass_seconds']):.2f}×** "
        f"for the drop-one losses of {n} layers (target ≤ 0.6×, by running only the blocks above "
        f"each change) and {imp['merge_seconds'] / ((n - 1) * imp['full_pass_seconds']):.2f}× for "
        f"the {n - 1} merges.",
        "",
    ]
    L += _targets(quality)
    return L


def _targets(rows: list[dict]) -> list[str]:
    """The issue's targets, read off the quality rows: the best layer-removal planner against
    ShortGPT (≤ 0.8×) and against the planners the product had before (≤ the best of them),
    mka-loss against sleb, and TransAct at the same parameters for reference."""
    plain = [r for r in rows if not r.get("healed") and r.get("perplexity")]
    budgets = sorted({r["layers_removed"] for r in plain if r["layers_removed"]})
    old = {"mka", "mka-tail", "shortgpt", "angular", "laco"}
    L = ["### Targets", ""]
    for b in budgets:
        at = [r for r in plain if r["layers_removed"] == b and r["method"] != "transact"]
        if not at:
            continue
        best = min(at, key=lambda r: r["perplexity"])
        sg = next((r for r in at if r["method"] == "shortgpt"), None)
        prev = [r for r in at if r["method"] in old and r.get("alpha_rule") != "bootstrap"]
        bp = min(prev, key=lambda r: r["perplexity"]) if prev else None
        sleb = next((r for r in at if r["method"] == "sleb"), None)
        ml = next((r for r in at if r["method"] == "mka-loss"), None)
        ta = next(
            (r for r in plain if r["layers_removed"] == b and r["method"] == "transact"), None
        )
        s = f"- **{b} layers removed**: the best layer-removal plan is `{_lab(best)}` at {best['perplexity']:.2f}"
        if sg:
            ratio = best["perplexity"] / sg["perplexity"]
            s += (
                f", {ratio:.2f}× ShortGPT's {sg['perplexity']:.2f} (target ≤ 0.8×: "
                f"{'met' if ratio <= 0.8 else f'missed, {ratio / 0.8:.2f}× the target'})"
            )
        if bp:
            ok = best["perplexity"] <= bp["perplexity"]
            s += (
                f"; the best of the earlier planners is `{_lab(bp)}` at {bp['perplexity']:.2f} "
                f"(≤ it: {'met' if ok else 'missed'})"
            )
        if sleb and ml:
            verdict = (
                "merging beats dropping here"
                if ml["perplexity"] <= sleb["perplexity"]
                else "merging does not beat dropping here"
            )
            s += (
                f"; mka-loss {ml['perplexity']:.2f} vs sleb {sleb['perplexity']:.2f} at equal "
                f"parameters: {verdict}"
            )
        if ta and sg:
            s += (
                f". TransAct at the same parameter count: {ta['perplexity']:.2f}, "
                f"{ta['perplexity'] / sg['perplexity']:.2f}× ShortGPT's"
            )
        L.append(s + ".")
    L.append("")
    return L


def _lab(r: dict) -> str:
    rule = r.get("alpha_rule")
    return f"{r['method']}:{rule}" if rule and r["method"] in ("mka", "mka-tail") else r["method"]
