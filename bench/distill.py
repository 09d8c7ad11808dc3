"""Healing by distillation against plain healing (bench/results/distill.csv).

At 6 and 10 layers removed, the best row of the quality frontier (bench/results/frontier.csv,
lowest perplexity among planners that plan within a minute; ShortGPT with the linear map where
the file is missing) are healed twice
with the same step budget, learning rate, batch, draws and seed: with next-token loss ("ce") and
by distillation from the original ("kd": the KL from the original's next-token distribution on
its top-64 logits per position, computed once for the calibration batch and shared by every
heal). Each row gives perplexity, KL to the original and top-1 agreement on the held-out
evaluation windows before and after, on the quality section's calibration batch and windows.

--quick runs it on the tiny model at its heal budget with its few heal steps (numbers meaningless).
"""

from __future__ import annotations

import time
from pathlib import Path

from .common import Settings, loaded_analysis, read_csv, say, write_csv

BUDGETS = (6, 10)  # layers removed (full run)
PER_BUDGET = 1  # frontier rows healed at each budget
MAX_PLAN_S = 60  # rows whose planner took longer are left out (each heal replans them)
FALLBACK_SPECS = ("shortgpt+linear", "sleb+linear")
STEPS, LR, BATCH, TOP_K = 100, 1e-4, 4, 64
# text of another kind than the corpus the heals train on: Debian's copy of the GPL, version 3
OTHER_TEXT = Path("/usr/share/common-licenses/GPL-3")
LOSSES = ("ce", "kd")

COLUMNS = [
    "config",
    "layers_removed",
    "loss",
    "steps",
    "lr",
    "batch_size",
    "top_k",
    "params_removed_pct",
    "perplexity_original",
    "perplexity_before",
    "kl_before",
    "top1_before",
    "perplexity_after",
    "kl_after",
    "top1_after",
    "ood_perplexity_original",
    "ood_perplexity_before",
    "ood_kl_before",
    "ood_perplexity_after",
    "ood_kl_after",
    "train_loss_first",
    "train_loss_last",
    "heal_s",
    "teacher_s",
    "error",
]


def spec_of(row: dict) -> str:
    """The compare spec of a frontier.csv row, e.g. ``mka-loss:flatten+linear``."""
    name = str(row["method"])
    if row.get("alpha_rule"):
        name += f":{row['alpha_rule']}"
    if row.get("merge_mode") == "flatten":
        name += ":flatten"
    if row.get("compensation") and row["compensation"] != "none":
        name += f"+{row['compensation']}"
    return name


def frontier_specs(path: Path, budgets, n: int = PER_BUDGET) -> dict[int, list[str]]:
    """The `n` lowest-perplexity unhealed frontier specs at each budget; the fallback specs
    where the file or the budget's rows are missing."""
    from mka_core.errors import MkaInputError
    from mka_core.workflows.sweep import parse_planners

    rows = read_csv(path) if path.is_file() else []
    out = {}
    for b in budgets:
        at = [
            r
            for r in rows
            if r.get("layers_removed") == b
            and not r.get("healed")
            and r.get("perplexity")
            and (r.get("plan_s") or 0) <= MAX_PLAN_S
        ]
        specs = []
        for r in sorted(at, key=lambda r: r["perplexity"]):
            spec = spec_of(r)
            try:
                parse_planners(spec)
            except MkaInputError:
                continue
            if spec not in specs:
                specs.append(spec)
        out[b] = specs[:n] or list(FALLBACK_SPECS)
    return out


def _other_windows(loaded, settings: Settings):
    """Evaluation windows of OTHER_TEXT (None where the file is missing)."""
    from mka_core.data.corpus import load_text_file, make_eval_windows

    if not OTHER_TEXT.is_file():
        say(f"distill: {OTHER_TEXT} is missing: no out-of-corpus columns")
        return None
    docs = load_text_file(OTHER_TEXT)
    return make_eval_windows(
        loaded.tokenizer, docs, budget_tokens=settings.eval_tokens, window=settings.eval_window
    )


def _other(loaded, model, windows, cache: dict, when: str) -> dict:
    """Perplexity and KL to the original on OTHER_TEXT's windows (text the heals never saw)."""
    from mka_core.evaluation.evaluate import fidelity

    if windows is None or model is None:
        return {}
    fid = fidelity(loaded.model, model, windows, reference_cache=cache)
    return {
        "ood_perplexity_original": fid["perplexity_original"],
        f"ood_perplexity_{when}": fid["perplexity_compressed"],
        f"ood_kl_{when}": fid["kl"],
    }


def run(settings: Settings, out: Path) -> dict:
    from mka_core.compression.distill import teacher_topk
    from mka_core.compression.heal import heal
    from mka_core.evaluation.evaluate import fidelity
    from mka_core.evaluation.results import size
    from mka_core.workflows import pipeline
    from mka_core.workflows.sweep import make_configs, parse_planners, run_config

    quick = settings.name == "quick"
    budgets = tuple(settings.heal_budgets) if quick else BUDGETS
    steps = settings.heal_steps if quick else STEPS
    t_section = time.perf_counter()
    say(f"distill: loading {settings.model}")
    loaded, analysis = loaded_analysis(settings)
    batch = analysis.batch
    windows = pipeline.eval_windows(loaded, "builtin", settings.eval_tokens, settings.eval_window)
    cache: dict = {}  # the original's final hidden states on the windows, computed once
    other = _other_windows(loaded, settings)
    other_cache: dict = {}
    targets = teacher_topk(loaded, batch, TOP_K)
    say(f"distill: the original's top-{TOP_K} on {batch.n_tokens} tokens in {targets.seconds} s")
    params_original = size(loaded.model)["params"]
    picks = frontier_specs(out / "frontier.csv", budgets)
    rows = []
    for b in budgets:
        for cfg in make_configs(parse_planners(",".join(picks[b])), [b]):
            base, model = run_config(
                loaded,
                analysis,
                cfg,
                windows,
                cache,
                params_original=params_original,
                fixed_alpha=settings.fixed_alpha,
                plan_limit_s=settings.plan_limit_s,
                loss_samples=settings.loss_samples,
                keep_model=True,
            )
            common = {
                "config": cfg.label,
                "layers_removed": b,
                "steps": steps,
                "lr": LR,
                "batch_size": BATCH,
                "params_removed_pct": 100.0
                * (1 - base.get("params", params_original) / params_original),
                "perplexity_original": base.get("perplexity_original"),
                "perplexity_before": base.get("perplexity"),
                "kl_before": base.get("kl"),
                "top1_before": base.get("top1"),
                **_other(loaded, model, other, other_cache, "before"),
            }
            if model is None:
                rows.append({**common, "error": base.get("error", "no model")})
                say(f"distill: {cfg.label}: {rows[-1]['error']}")
                continue
            for loss in LOSSES:
                t0 = time.perf_counter()
                healed, rep = heal(
                    model,
                    loaded.tokenizer,
                    batch,
                    steps=steps,
                    lr=LR,
                    batch_size=BATCH,
                    loss=loss,
                    teacher=targets if loss == "kd" else None,
                )
                heal_s = time.perf_counter() - t0
                fid = fidelity(loaded.model, healed, windows, reference_cache=cache)
                rows.append(
                    {
                        **common,
                        "loss": loss,
                        "top_k": rep.top_k,
                        "perplexity_after": fid["perplexity_compressed"],
                        "kl_after": fid["kl"],
                        "top1_after": fid["top1"],
                        **_other(loaded, healed, other, other_cache, "after"),
                        "train_loss_first": rep.first_loss,
                        "train_loss_last": rep.last_loss,
                        "heal_s": round(heal_s, 1),
                        "teacher_s": targets.seconds if loss == "kd" else None,
                    }
                )
                r = rows[-1]
                say(
                    f"distill: {cfg.label} {loss}: perplexity {r['perplexity_before']:.2f} -> "
                    f"{r['perplexity_after']:.2f}, KL {r['kl_before']:.3f} -> {r['kl_after']:.3f}"
                    + (
                        f"; other text: perplexity {r['ood_perplexity_before']:.2f} -> "
                        f"{r['ood_perplexity_after']:.2f}, KL {r['ood_kl_before']:.3f} -> "
                        f"{r['ood_kl_after']:.3f}"
                        if "ood_kl_after" in r
                        else ""
                    )
                )
                del healed
            del model
    write_csv(out / "distill.csv", rows, COLUMNS)
    return {
        "wall_s": round(time.perf_counter() - t_section, 1),
        "calibration_tokens": batch.n_tokens,
        "eval_positions": int(windows.shape[0] * (windows.shape[1] - 1)),
        "steps": steps,
        "top_k": TOP_K,
        "teacher_s": targets.seconds,
        "configs": {str(b): picks[b] for b in budgets},
        "rows": len(rows),
    }
