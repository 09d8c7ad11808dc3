"""BENCHMARKS.md's "Quality frontier" section: flattened merges and compensated removals
(bench/results/frontier.csv) read against the quality section's rows at the same budgets
(ShortGPT, the best plain drop, the best plain MKA merge, TransAct at equal parameters), with the
issue's targets checked."""

from __future__ import annotations

from .render_common import _num, _ppl

MERGE_PLANNERS = ("mka", "mka-tail", "mka-loss", "manual")


def _unhealed(rows, budget):
    return [
        r
        for r in rows
        if r.get("layers_removed") == budget
        and not r.get("healed")
        and r.get("perplexity") is not None
        and r["method"] not in ("original",)
    ]


def _name(r: dict) -> str:
    """The compare spec of a row: planner[:α rule][:flatten][+compensation]."""
    name = r["method"]
    if r.get("alpha_rule") and name == "mka":
        name += f":{r['alpha_rule']}"
    if r.get("merge_mode") == "flatten":
        name += ":flatten"
    if r.get("compensation") not in (None, "", "none"):
        name += f"+{r['compensation']}"
    return name


def _best(rows, keep):
    picked = [r for r in rows if keep(r)]
    return min(picked, key=lambda r: r["perplexity"]) if picked else None


def frontier_section(
    frontier: list[dict], quality: list[dict], cost: dict | None = None
) -> list[str]:
    if not frontier:
        return []
    budgets = sorted({r["layers_removed"] for r in frontier if r.get("layers_removed")})
    L = ["## Quality frontier: flattened merges and compensated removals", ""]
    L += [
        "Rows from `python -m bench.run --only frontier` (`bench/results/frontier.csv`): the same "
        "model, calibration batch (128 × 128 tokens) and 8192 evaluation tokens as the quality "
        "section, whose rows they are read against. `:flatten`: merged layers flattened side by "
        "side and pruned back with least-squares refits (FlattenGPT); `+linear`: ReplaceMe's "
        "least-squares map fused into the down projection below each cut; `+scale`: Prune&Comp's "
        "magnitude rescaling. *plan s* is the planner's own time (shared by every way of building "
        "its plan, except mka-loss's flattened merges, which it searches as they are built: "
        "`:flatten` alone, and `:flatten+linear` with each candidate's map fitted on the loss "
        "samples and scored on as many others); *build s* is the flattening/compensation pass and the build. A greedy "
        "planner's smaller budgets reuse its largest plan, so their *plan s* is that whole run.",
        "",
    ]
    targets = []
    for b in budgets:
        new = _unhealed(frontier, b)
        old = _unhealed(quality, b)
        if not new or not old:
            continue
        shortgpt = _best(old, lambda r: r["method"] == "shortgpt")
        transact = _best(old, lambda r: r["method"] == "transact")
        drop = _best(old, lambda r: r["method"] not in (*MERGE_PLANNERS, "transact", "laco"))
        merge = _best(old, lambda r: r["method"] in MERGE_PLANNERS)
        best_new = _best(new, lambda r: True)
        best_new_merge = _best(new, lambda r: r["method"] in MERGE_PLANNERS)
        best_new_drop = _best(new, lambda r: r["method"] not in MERGE_PLANNERS)
        L += [f"### {b} layers removed", ""]
        L += [
            "| method | perplexity | vs ShortGPT | vs TransAct (equal params) | KL (nats) | top-1 | "
            "plan s | build s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        refs = [r for i, r in enumerate((shortgpt, drop, merge, transact)) if r is not None]
        refs = [r for i, r in enumerate(refs) if all(r is not q for q in refs[:i])]
        ref = [("**reference** " + _name(r), r) for r in refs]
        for label, r in [
            *ref,
            *((_name(r), r) for r in sorted(new, key=lambda r: r["perplexity"])),
        ]:
            L.append(
                f"| {label} | {_ppl(r['perplexity'])} | "
                f"{r['perplexity'] / shortgpt['perplexity']:.2f}× | "
                f"{r['perplexity'] / transact['perplexity']:.2f}× | {_num(r.get('kl'), 3)} | "
                f"{100 * float(r.get('top1') or 0):.1f} % | {_num(r.get('plan_s'), 1)} | "
                f"{_num(r.get('build_s'), 1)} |"
            )
        failed = [
            r for r in frontier if r.get("layers_removed") == b and r.get("perplexity") is None
        ]
        if failed:
            L.append(
                "Not in this table: "
                + "; ".join(f"{_name(r)} ({r.get('steps') or 'no result'})" for r in failed)
                + " (the planner's time limit, on a machine shared with the test suite)."
            )
        L.append("")
        best_merge = min((r for r in (merge, best_new_merge) if r), key=lambda r: r["perplexity"])
        best_drop = min((r for r in (drop, best_new_drop) if r), key=lambda r: r["perplexity"])
        best_all = min((best_new, drop, merge), key=lambda r: r["perplexity"])
        targets.append(
            f"- **{b} removed**: best layer removal **{_name(best_all)}** "
            f"{_ppl(best_all['perplexity'])} = "
            f"{best_all['perplexity'] / shortgpt['perplexity']:.3f}× ShortGPT (target ≤ 0.80×: "
            f"{'met' if best_all['perplexity'] <= 0.8 * shortgpt['perplexity'] else 'missed'}), "
            f"{best_all['perplexity'] / transact['perplexity']:.3f}× TransAct at equal "
            f"parameters (target ≤ 1.3×: "
            f"{'met' if best_all['perplexity'] <= 1.3 * transact['perplexity'] else 'missed'}); "
            f"best merge **{_name(best_merge)}** {_ppl(best_merge['perplexity'])} vs best drop "
            f"**{_name(best_drop)}** {_ppl(best_drop['perplexity'])} "
            f"({100 * (best_merge['perplexity'] / best_drop['perplexity'] - 1):+.1f} %: the merge "
            f"{'wins' if best_merge['perplexity'] < best_drop['perplexity'] else 'loses'})."
        )
    L += ["### Reading", "", *targets, ""]
    if cost:
        two = 2 * cost["forward_s"]
        L += [
            "**Cost** (`python -m bench.run --only frontier_cost`, timed alone, best of 3, on "
            f"the {cost['calibration_tokens']} calibration tokens): one forward pass of the batch "
            f"block by block takes {cost['forward_s']:.2f} s; compensating ShortGPT's "
            f"{cost['cuts']} cuts takes {cost['linear_s']:.2f} s (linear) and "
            f"{cost['scale_s']:.2f} s (scale), against the target of two passes plus the solves "
            f"({two:.2f} s plus solves: "
            f"{'met' if max(cost['linear_s'], cost['scale_s']) <= two * 1.1 else 'missed'}). "
            f"Flattening one pair takes {cost['flatten_pair_s']:.2f} s against TransAct's "
            f"scoring of one block, {cost['transact_block_s']:.2f} s (its whole-model pass, "
            f"{cost['transact_scoring_s']:.2f} s, over {cost['n_layers']} layers): "
            f"{cost['flatten_pair_s'] / cost['transact_block_s']:.1f}× it (the wide block is "
            "two blocks' work, plus its Gram matrices).",
            "",
        ]
    return L
