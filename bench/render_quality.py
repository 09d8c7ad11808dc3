"""The written reading of the quality results: who wins at each budget, merging vs dropping,
the α rules, decode speed, healing, and the per-budget tables."""

from __future__ import annotations

import statistics
from collections import defaultdict

from .render_common import _label, _mparams, _num, _pct, _ppl, _ratio


def _reading_quality(rows: list[dict], budgets: list[int], fixed_alpha) -> list[str]:
    out: list[str] = []
    orig = next((r for r in rows if r["method"] == "original"), None)
    if orig is None:
        return out
    p0 = orig["perplexity"]

    def lab(r):
        return f"**{_label(r, fixed_alpha)}**"

    for n in budgets:
        plain = [
            r for r in rows if r["layers_removed"] == n and not r["healed"] and r["perplexity"]
        ]
        failed = [
            r for r in rows if r["layers_removed"] == n and not r["healed"] and not r["perplexity"]
        ]
        if not plain:
            continue
        plain.sort(key=lambda r: r["perplexity"])
        best = plain[0]
        pct_params = 100 * n / orig["n_layers"]
        s = (
            f"- **{n} layer{'s' if n != 1 else ''} removed** ({pct_params:.0f} % of the layers, "
            f"{best['params_removed_pct']:.1f} % of the parameters): the lowest perplexity is "
            f"{lab(best)} at {_ppl(best['perplexity'])} ({best['perplexity'] / p0:.2f}× the "
            f"original's {_num(p0)})"
        )
        if len(plain) > 1:
            second = plain[1]
            s += (
                f"; next {lab(second)} at {_ppl(second['perplexity'])} "
                f"({_pct(second['perplexity'], best['perplexity']):+.1f} %)"
            )
        worst = plain[-1]
        s += f"; the worst is {lab(worst)} at {_ppl(worst['perplexity'])}."
        merges = [r for r in plain if r["method"] == "mka" and r["alpha_rule"] != "drop"]
        others = [r for r in plain if r["method"] != "mka"]
        if merges and others:
            bm = min(merges, key=lambda r: r["perplexity"])
            bo = min(others, key=lambda r: r["perplexity"])
            d = _pct(bm["perplexity"], bo["perplexity"])
            if d < 0:
                s += (
                    f" MKA's merging wins against every other method: its best α rule "
                    f"({bm['alpha_rule']}, {_ppl(bm['perplexity'])}) is {d:+.1f} % against the "
                    f"best other, {lab(bo)} ({_ppl(bo['perplexity'])})."
                )
            else:
                s += (
                    f" MKA's merging loses here: its best α rule ({bm['alpha_rule']}) gives "
                    f"{_ppl(bm['perplexity'])}, {d:+.1f} % against {lab(bo)} "
                    f"({_ppl(bo['perplexity'])})."
                )
        if best["method"] == "mka" and best["alpha_rule"] == "drop":
            s += (
                " The lowest of all is the *drop* control (MKA's pairs, the second layer dropped "
                "instead of merged)."
            )
        sg = next((r for r in plain if r["method"] == "shortgpt"), None)
        if sg is not None and sg is not best:
            s += (
                f" Against ShortGPT ({_ppl(sg['perplexity'])}) the winner is "
                f"{_pct(best['perplexity'], sg['perplexity']):+.1f} %."
            )
        kl_best = min(plain, key=lambda r: r["kl"])
        t1_best = max(plain, key=lambda r: r["top1"])
        s += (
            f" Closest to the original: lowest KL {lab(kl_best)} ({kl_best['kl']:.3f} nats), "
            f"highest top-1 agreement {lab(t1_best)} ({100 * t1_best['top1']:.1f} %)."
        )
        ta = next((r for r in plain if r["method"] == "transact"), None)
        layer_rows = [r for r in plain if r["method"] != "transact"]
        if ta is not None and layer_rows:
            bl = min(layer_rows, key=lambda r: r["perplexity"])
            word = "better" if ta["perplexity"] < bl["perplexity"] else "worse"
            s += (
                f" TransAct at the same parameter count ({ta['params'] / 1e6:.1f} M vs "
                f"{bl['params'] / 1e6:.1f} M) reaches {_ppl(ta['perplexity'])}: {word} than the "
                f"best layer removal ({_pct(ta['perplexity'], bl['perplexity']):+.1f} %)."
            )
        if failed:
            s += " Not measured: " + ", ".join(
                f"{_label(r, fixed_alpha)} ({r['steps']})" for r in failed
            )
            s += "."
        out.append(s)
    return out


def _merge_alphas(steps: str) -> list[float]:
    """The α (first weight) of every merge in a row's steps text, e.g. "merge 2+3 (0.95/0.05)"."""
    import re

    return [float(m) for m in re.findall(r"merge [\d+]+ \(([\d.]+)/", steps)]


def _reading_merge_vs_drop(rows: list[dict], budgets: list[int], fixed_alpha) -> list[str]:
    out = []
    for n in budgets:
        plain = {
            r["alpha_rule"]: r
            for r in rows
            if r["method"] == "mka" and r["layers_removed"] == n and not r["healed"]
        }
        drop = plain.get("drop")
        if drop is None or not drop["perplexity"]:
            continue
        parts = []
        for rule in ("similarity", "rowmean", "fixed", "search"):
            r = plain.get(rule)
            if r is None or not r["perplexity"]:
                continue
            d = _pct(r["perplexity"], drop["perplexity"])
            alphas = _merge_alphas(r.get("steps") or "")
            n_real = sum(1 for a in alphas if 0.02 < a < 0.98)
            if alphas and n_real == 0:
                verdict = (
                    "every α is ≤ 0.02 or ≥ 0.98: no real merge, one layer of each pair is kept"
                )
            else:
                verdict = "helps" if d < -1 else ("hurts" if d > 1 else "no clear difference")
                verdict = f"merging {verdict}"
                if alphas and n_real < len(alphas) / 2:
                    verdict = (
                        f"mostly not a merge: only {n_real} of {len(alphas)} merges have "
                        "0.02 < α < 0.98, the others keep one layer of the pair"
                    )
                elif alphas and n_real < len(alphas):
                    verdict += f"; {n_real} of {len(alphas)} merges have 0.02 < α < 0.98"
            a = f", mean α {r['alpha_mean']:.2f}" if r.get("alpha_mean") is not None else ""
            parts.append(
                f"{_label(r, fixed_alpha).split(' · ', 1)[1]} {_ppl(r['perplexity'])} "
                f"({d:+.1f} %{a}: {verdict})"
            )
        out.append(
            f"- {n} removed: dropping the second layer of each MKA pair gives "
            f"{_ppl(drop['perplexity'])}; merging instead: " + "; ".join(parts) + "."
        )
    return out


def _reading_alpha(plans: list[dict], rows: list[dict]) -> list[str]:
    out = []
    by_rule = defaultdict(list)
    for p in plans:
        if p.get("method") == "mka" and p.get("alpha_rule") not in (None, "drop"):
            ws = [s["weights"][0] for s in p.get("steps", []) if s.get("op") == "merge"]
            by_rule[p["alpha_rule"]].append((p.get("layers_removed"), ws))
    for rule in ("similarity", "rowmean", "fixed", "search"):
        if rule not in by_rule:
            continue
        n, ws = max(by_rule[rule], key=lambda t: t[0] or 0)
        if not ws:
            continue
        extreme = sum(1 for w in ws if w <= 0.02 or w >= 0.98)
        s = (
            f"- **{rule}**: at {n} removed the α of the {len(ws)} merges range from "
            f"{min(ws):.2f} to {max(ws):.2f} (mean {sum(ws) / len(ws):.2f})"
        )
        if extreme:
            s += f"; {extreme} of them are ≤ 0.02 or ≥ 0.98, i.e. effectively keep one layer"
        out.append(s + ".")
    return out


def _reading_speed(rows: list[dict], budgets: list[int], fixed_alpha) -> list[str]:
    orig = next((r for r in rows if r["method"] == "original"), None)
    if orig is None or not orig.get("decode_tps") or not budgets:
        return []
    out = []
    for n in budgets:
        plain = [
            r for r in rows if r["layers_removed"] == n and not r["healed"] and r.get("decode_tps")
        ]
        lr = [r["decode_tps"] for r in plain if r["method"] != "transact"]
        ta = next((r["decode_tps"] for r in plain if r["method"] == "transact"), None)
        if not lr:
            continue
        s = (
            f"- {n} removed: layer removal decodes at {_num(min(lr), 1)}–{_num(max(lr), 1)} "
            f"tokens/s (median {_num(statistics.median(lr), 1)}, "
            f"{_pct(statistics.median(lr), orig['decode_tps']):+.0f} % vs the original's "
            f"{_num(orig['decode_tps'], 1)})"
        )
        if ta:
            s += f"; TransAct at the same parameter count {_num(ta, 1)}"
        out.append(s + ".")
    return out


def _reading_heal(rows: list[dict], fixed_alpha) -> list[str]:
    out = []
    for r in rows:
        if not r["healed"] or not r.get("heal_from_perplexity") or not r["perplexity"]:
            continue
        out.append(
            f"- {r['layers_removed']} removed, **{_label(r, fixed_alpha)}**: "
            f"{_num(r['heal_from_perplexity'])} → {_ppl(r['perplexity'])} "
            f"({_pct(r['perplexity'], r['heal_from_perplexity']):+.1f} %) in "
            f"{_num(r.get('heal_s'), 0)} s of healing"
        )
    return out


# ---------------------------------------------------------------------------------------------
# the report


def _laco_notes(plans: list[dict]) -> dict[int, str]:
    """For each budget, how LaCo met it: collapses forced below its cosine threshold."""
    out = {}
    for p in plans:
        params = (p.get("method") or {}).get("params") or {}
        if (p.get("method") or {}).get("planner") != "laco" or "laco_forced" not in params:
            continue
        n_collapse = sum(1 for s in p.get("steps", []) if s.get("op") == "collapse")
        out[p.get("layers_removed")] = (
            f"{params['laco_forced']} of {n_collapse} collapses below the cosine threshold "
            f"{params.get('laco_threshold')} (taken as the best candidate of their pass), "
            f"{params.get('laco_candidates', '?')} candidates scored"
        )
    return out


def _quality_table(
    rows: list[dict], n: int, fixed_alpha, p0: float, notes: dict | None = None
) -> list[str]:
    sel = [r for r in rows if r["layers_removed"] == n]
    sel.sort(key=lambda r: (r["perplexity"] is None, r["perplexity"] or 0, r["healed"]))
    lines = [
        "| method | healed | params (M) | perplexity | halves | vs original | KL (nats) | "
        "top-1 | decode tok/s | plan s | steps |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in sel:
        ppl = r["perplexity"]
        lines.append(
            f"| {_label(r, fixed_alpha)} | {'yes' if r['healed'] else ''} | "
            f"{_mparams(r['params'])} | {_ppl(ppl)} | "
            f"{_ppl(r.get('perplexity_half_a'))} / {_ppl(r.get('perplexity_half_b'))} | "
            f"{_ratio(ppl / p0) if ppl else '—'} | {_num(r['kl'], 3)} | "
            f"{_num(100 * r['top1'], 1) + ' %' if r['top1'] is not None else '—'} | "
            f"{_num(r['decode_tps'], 1)} | {_num(r.get('plan_s'), 1)} | "
            f"{(r.get('steps') or '').replace('|', '/')}"
            f"{'; ' + notes[n] if notes and r['method'] == 'laco' and n in notes else ''} |"
        )
    return lines
