"""Quality: every planner (MKA with each α rule, mka-tail, ShortGPT, angular, LaCo) and TransAct at
the same parameter counts, at each budget of layers removed, with and without healing, all on the
same calibration batch and the same evaluation windows (bench/results/quality.csv).

Everything goes through the product's own code: `pipeline.analyze`, `pipeline.make_budget_plan`
(→ `planners.plan_layers`), `merge.apply_plan`, `transact.prune`, `heal.heal`, and
`evaluate.fidelity` / `evaluate.size` (decode speed is timed here, see `decode_speed`). The
original model's log-probabilities on the evaluation windows are computed once and reused for the
KL and top-1 agreement of every row (`fidelity(..., reference_cache=...)`), instead of running the
original again for each row.
"""

from __future__ import annotations

import copy
import gc
import time
from pathlib import Path

from .common import Measure, Settings, say, write_csv, write_json

COLUMNS = [
    "method",
    "alpha_rule",
    "layers_removed",
    "n_layers",
    "params",
    "params_removed_pct",
    "healed",
    "perplexity",
    "kl",
    "top1",
    "decode_tps",
    "prefill_tps",
    "alpha_mean",
    "intermediate_size",
    "n_heads",
    "plan_s",
    "build_s",
    "heal_s",
    "eval_s",
    "heal_from_perplexity",
    "steps",
]
BASELINES = ("mka-tail", "shortgpt", "angular", "laco")  # the other layer-removal planners


def _steps_text(plan) -> str:
    """A compact, readable form of a plan's steps: "merge 21+22 (0.87/0.13); drop 25"."""
    out = []
    for s in plan.steps:
        layers = (
            "+".join(str(i) for i in s.layers)
            if s.op != "drop"
            else ",".join(str(i) for i in s.layers)
        )
        if s.op == "merge" and s.weights:
            out.append(f"merge {layers} ({'/'.join(f'{w:.2f}' for w in s.weights)})")
        else:
            out.append(f"{s.op} {layers}")
    return "; ".join(out)


def _alpha_mean(plan) -> float | None:
    """Mean weight on the first group of each merge step (α of the spec); None without merges."""
    alphas = [s.weights[0] for s in plan.steps if s.op == "merge" and s.weights]
    return sum(alphas) / len(alphas) if alphas else None


def _mlp_unit_params(model) -> int:
    """Parameters one intermediate MLP neuron holds in one layer (a row of gate and up, a column
    of down, and their biases if any)."""
    from mka_core.models import get_layers

    mlp = get_layers(model)[0].mlp
    n = mlp.gate_proj.in_features + mlp.up_proj.in_features + mlp.down_proj.out_features
    n += sum(1 for lin in (mlp.gate_proj, mlp.up_proj) if lin.bias is not None)
    return n


def transact_target(model, target_params: int) -> tuple[int, int]:
    """The MLP intermediate size that brings TransAct's pruned model closest to `target_params`
    with every attention head kept: (intermediate size, the parameter count it gives).

    TransAct keeps the layers and shrinks every layer's MLP by the same number of neurons, so the
    count is exact arithmetic: params(I') = params − n_layers · unit · (I − I')."""
    from mka_core.models import count_params, get_layers

    total = count_params(model)
    n_layers = len(get_layers(model))
    inter = int(model.config.intermediate_size)
    per_neuron = n_layers * _mlp_unit_params(model)
    cut = round((total - target_params) / per_neuron)
    new = min(max(inter - cut, 1), inter)
    return new, total - per_neuron * (inter - new)


def decode_speed(model, tokenizer, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    """Greedy decoding speed with the KV cache, batch 1, on the product's fixed speed prompt.

    decode tokens/s = (new_tokens − 1) / (t(new_tokens) − t(1)), where t(k) is the best-of-
    `repeats` time of `generate` for exactly k new tokens: both runs include the same prefill,
    so the difference is pure decoding. (evaluate.speed subtracts a separate forward pass over the
    prompt instead, which computes logits at every prompt position while generate computes them
    at the last one only, so its decode time comes out too short, even negative, see
    BENCHMARKS.md.) prefill_tps is prompt_tokens / t(1), the time to the first new token."""
    import torch
    from transformers import GenerationConfig

    from mka_core.evaluate import speed_prompt

    device = next(model.parameters()).device
    ids = speed_prompt(tokenizer, prompt_tokens).to(device)  # (1, P)
    eos = model.config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos

    def generate(k: int) -> float:
        cfg = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=k,
            min_new_tokens=k,
            use_cache=True,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == prompt_tokens + k, out.shape
        return time.perf_counter() - t0

    with torch.inference_mode():
        generate(2)  # warm-up
        t_first = min(generate(1) for _ in range(repeats))
        t_all = min(generate(new_tokens) for _ in range(repeats))
        for _ in range(3):  # another process stole the cores during a t(1) run: measure again
            if t_all > t_first:
                break
            t_first = min(t_first, generate(1))
            t_all = min(t_all, generate(new_tokens))
    dt = t_all - t_first
    return {
        "decode_tps": (new_tokens - 1) / dt if dt > 0 else None,
        "prefill_tps": prompt_tokens / t_first,
    }


class _Evaluator:
    """Perplexity, KL and top-1 against the original (its log-probs computed once), decode speed
    and size of one model, measured the same way for every row."""

    def __init__(self, loaded, windows, settings: Settings):
        self.loaded = loaded
        self.windows = windows
        self.s = settings
        self.cache: dict = {}

    def reference(self) -> dict:
        """The original's row without its perplexity, which the first fidelity pass (filling the
        cache) gives for free; its KL is 0 and its top-1 agreement 1 by definition."""
        from mka_core import evaluate

        t0 = time.perf_counter()
        model = self.loaded.model
        spd = decode_speed(
            model,
            self.loaded.tokenizer,
            prompt_tokens=self.s.speed_prompt_tokens,
            new_tokens=self.s.decode_tokens,
            repeats=self.s.speed_repeats,
        )
        sz = evaluate.size(model)
        return {
            "perplexity": None,
            "kl": 0.0,
            "top1": 1.0,
            "decode_tps": spd["decode_tps"],
            "prefill_tps": spd["prefill_tps"],
            "params": sz["params"],
            "n_layers": sz["n_layers"],
            "intermediate_size": sz["intermediate_size"],
            "n_heads": sz["n_heads"],
            "eval_s": time.perf_counter() - t0,
        }

    def __call__(self, model) -> dict:
        from mka_core import evaluate

        t0 = time.perf_counter()
        fid = evaluate.fidelity(self.loaded.model, model, self.windows, reference_cache=self.cache)
        spd = decode_speed(
            model,
            self.loaded.tokenizer,
            prompt_tokens=self.s.speed_prompt_tokens,
            new_tokens=self.s.decode_tokens,
            repeats=self.s.speed_repeats,
        )
        sz = evaluate.size(model)
        return {
            "perplexity": fid["perplexity_compressed"],
            "perplexity_original": fid["perplexity_original"],
            "kl": fid["kl"],
            "top1": fid["top1"],
            "decode_tps": spd["decode_tps"],
            "prefill_tps": spd["prefill_tps"],
            "params": sz["params"],
            "n_layers": sz["n_layers"],
            "intermediate_size": sz["intermediate_size"],
            "n_heads": sz["n_heads"],
            "eval_s": time.perf_counter() - t0,
            "n_positions": fid["n_positions"],
        }


class PlanningTooLong(Exception):
    """Raised from a planner's progress callback when it runs past the benchmark's limit."""


def _plan(loaded, analysis, planner: str, n_remove: int, rule: str | None, settings: Settings):
    """One budget plan through the product's planner, timed, under a time limit.

    Returns (plan, seconds, marks): marks are (seconds, message) of every progress report, so
    the time at which a greedy planner completed each step is known."""
    from mka_core import pipeline

    alpha_rule, alpha = rule or "similarity", settings.fixed_alpha
    if rule == "drop":  # the same pairs as mka, the second layer of each dropped (α = 1)
        alpha_rule, alpha = "fixed", 1.0
    limit = settings.search_limit_s if rule == "search" else settings.plan_limit_s
    marks: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    said = [t0]

    def progress(fraction: float, msg: str) -> None:
        now = time.perf_counter()
        el = now - t0
        marks.append((el, msg))
        if now - said[0] > 15:  # a sign of life on long plans, not every candidate
            say(f"quality:   {el:.0f} s: {msg}")
            said[0] = now
        if el > limit:
            raise PlanningTooLong(f"stopped after {el:.0f} s (limit {limit:.0f} s) at: {msg}")

    plan = pipeline.make_budget_plan(
        loaded,
        analysis,
        planner,
        n_remove=n_remove,
        alpha_rule=alpha_rule,
        alpha=alpha,
        progress=progress,
    )
    return plan, time.perf_counter() - t0, marks


def _search_prefixes(loaded, analysis, settings: Settings) -> dict[int, tuple[object, float]]:
    """mka with the `search` α rule at every budget, from ONE run at the largest budget.

    The mka planner is greedy and, without recompute, picks its pairs from the analysis' NPIB
    alone; the α searched for merge r depends only on the merges before it. So the plan for b
    layers is exactly the first b steps of the plan for more, and the time it takes is the time
    the big run took to reach step b. This is checked on the `similarity` rule (same selection)
    before it is relied on; if the check fails, every budget is searched on its own."""
    from mka_core.plan import make_plan

    budgets = sorted(settings.budgets)
    big = {}
    for n in budgets:
        big[n] = _plan(loaded, analysis, "mka", n, "similarity", settings)[0]
    top = big[budgets[-1]]
    if not all(tuple(big[n].steps) == tuple(top.steps[:n]) for n in budgets):
        say("quality: mka plans are not prefixes of each other; searching every budget")
        return {}
    say(f"quality: planning mka (search α) once for {budgets[-1]} layers")
    plan, seconds, marks = _plan(loaded, analysis, "mka", budgets[-1], "search", settings)
    done = [t for t, msg in marks if msg.startswith("mka: merged")]
    out = {}
    for n in budgets:
        if n == budgets[-1]:
            out[n] = (plan, seconds)
            continue
        method = copy.deepcopy(plan.method)
        method["params"]["n_remove"] = n
        method["params"]["note"] = f"the first {n} steps of the {budgets[-1]}-layer plan"
        out[n] = (
            make_plan(loaded, plan.steps[:n], method),
            done[n - 1] if len(done) >= n else None,
        )
    return out


def _plan_specs(settings: Settings) -> list[tuple[str, str | None]]:
    """(planner, α rule) of every layer-removal row, in table order."""
    specs: list[tuple[str, str | None]] = [("mka", r) for r in settings.alpha_rules]
    specs += [("mka-tail", "similarity")]
    specs += [(p, None) for p in BASELINES if p != "mka-tail"]
    return specs


def run(settings: Settings, out: Path) -> dict:
    """The quality section; writes quality.csv and quality_plans.json to `out`."""
    from mka_core import pipeline
    from mka_core.data import BUILTIN, load_documents
    from mka_core.heal import heal
    from mka_core.merge import apply_plan
    from mka_core.models import get_layers, load_model
    from mka_core.transact import prune

    t_section = time.perf_counter()
    say(f"quality: loading {settings.model}")
    loaded = load_model(settings.model)
    calib_docs = load_documents(BUILTIN, "calibration")
    say(
        f"quality: analysing {settings.calib_samples} calibration samples x "
        f"<= {settings.calib_tokens} tokens"
    )
    with Measure() as m_an:
        analysis = pipeline.analyze(
            loaded,
            calib_docs,
            n_samples=settings.calib_samples,
            max_tokens=settings.calib_tokens,
        )
    windows = pipeline.eval_windows(
        loaded, BUILTIN, budget_tokens=settings.eval_tokens, window=settings.eval_window
    )
    evaluate_row = _Evaluator(loaded, windows, settings)
    n_total = loaded.n_layers
    rows: list[dict] = []
    plans: list[dict] = []

    def flush():
        write_csv(out / "quality.csv", rows, COLUMNS)
        write_json(out / "quality_plans.json", {"format": "mka-bench-plans", "plans": plans})

    say(f"quality: the original model ({n_total} layers) on {windows.numel()} evaluation tokens")
    ref = evaluate_row.reference()
    params_orig = ref["params"]
    layer_params = sum(p.numel() for p in get_layers(loaded.model)[0].parameters())
    rows.append(
        {
            "method": "original",
            "alpha_rule": None,
            "layers_removed": 0,
            "healed": False,
            "params_removed_pct": 0.0,
            "steps": "",
            **ref,
        }
    )
    say(f"quality: original decodes {ref['decode_tps'] or 0:.1f} tok/s")
    flush()

    def record(method, rule, n_remove, metrics, healed=False, **extra) -> dict:
        if rows[0]["perplexity"] is None:
            rows[0]["perplexity"] = ref["perplexity"] = metrics["perplexity_original"]
            rows[0]["n_positions"] = ref["n_positions"] = metrics["n_positions"]
            say(f"quality: original perplexity {ref['perplexity']:.3f}")
        row = {
            "method": method,
            "alpha_rule": rule,
            "layers_removed": n_remove,
            "healed": healed,
            "params_removed_pct": 100.0 * (1 - metrics["params"] / params_orig),
            **metrics,
            **extra,
        }
        rows.append(row)
        flush()
        say(
            f"quality: -{n_remove} {method}{f' ({rule})' if rule else ''}"
            f"{' +heal' if healed else ''}: ppl {metrics['perplexity']:.3f}, "
            f"KL {metrics['kl']:.4f}, top-1 {metrics['top1']:.3f}, "
            f"decode {metrics['decode_tps'] or 0:.1f} tok/s"
        )
        return row

    too_long: dict[tuple, str] = {}  # planners stopped at a smaller budget are not run again
    search_plans: dict = {}
    if "search" in settings.alpha_rules:
        try:
            search_plans = _search_prefixes(loaded, analysis, settings)
        except PlanningTooLong as e:
            say(f"quality: mka (search α) {e}")
            search_plans = {n: e for n in settings.budgets}  # reported below, not retried

    for n_remove in settings.budgets:
        budget_rows: list[tuple[dict, object]] = []  # (row, how to rebuild its model)
        for planner, rule in _plan_specs(settings):
            say(f"quality: -{n_remove} planning {planner}{f' ({rule})' if rule else ''}")
            if (planner, rule) in too_long:  # it could not plan fewer layers in time either
                e = PlanningTooLong(f"not run: {too_long[(planner, rule)]}")
                rows.append(
                    {
                        "method": planner,
                        "alpha_rule": rule,
                        "layers_removed": n_remove,
                        "healed": False,
                        "steps": f"planning {e}",
                    }
                )
                flush()
                continue
            try:
                if planner == "mka" and rule == "search" and n_remove in search_plans:
                    if isinstance(search_plans[n_remove], PlanningTooLong):
                        raise search_plans[n_remove]
                    plan, plan_s = search_plans[n_remove]
                else:
                    plan, plan_s, _ = _plan(loaded, analysis, planner, n_remove, rule, settings)
            except PlanningTooLong as e:
                rows.append(
                    {
                        "method": planner,
                        "alpha_rule": rule,
                        "layers_removed": n_remove,
                        "healed": False,
                        "plan_s": None,
                        "steps": f"planning {e}",
                    }
                )
                flush()
                say(f"quality: -{n_remove} {planner}: planning {e}")
                if not str(e).startswith("not run"):
                    too_long[(planner, rule)] = f"planning {n_remove} layers {e}"
                continue
            t0 = time.perf_counter()
            model = apply_plan(loaded.model, plan)
            build_s = time.perf_counter() - t0
            metrics = evaluate_row(model)
            del model
            gc.collect()
            row = record(
                planner,
                rule,
                n_remove,
                metrics,
                plan_s=plan_s,
                build_s=build_s,
                alpha_mean=_alpha_mean(plan),
                steps=_steps_text(plan),
            )
            plans.append(
                {
                    "method": planner,
                    "alpha_rule": rule,
                    "layers_removed": n_remove,
                    **plan.to_dict(),
                }
            )
            budget_rows.append((row, plan))

        # TransAct at the parameter count of the layer-removed models (all equal at one budget)
        target = params_orig - n_remove * layer_params  # = the params of every row above
        inter, predicted = transact_target(loaded.model, target)
        t_batch = analysis.batch.subset(settings.transact_samples)
        say(
            f"quality: -{n_remove} TransAct: intermediate {loaded.model.config.intermediate_size}"
            f" -> {inter} to match {target} parameters ({t_batch.n_samples} samples, "
            f"{settings.transact_shots} shots)"
        )
        t0 = time.perf_counter()
        t_model, rep = prune(
            loaded.model,
            t_batch,
            mlp_keep=inter,
            heads_keep=1.0,
            shots=settings.transact_shots,
        )
        build_s = time.perf_counter() - t0
        assert rep.params_after == predicted, (rep.params_after, predicted)
        metrics = evaluate_row(t_model)
        row = record(
            "transact",
            None,
            n_remove,
            metrics,
            build_s=build_s,
            steps=f"MLP {rep.original_intermediate_size}->{rep.new_intermediate_size}, "
            f"heads {rep.original_n_heads}->{rep.new_n_heads}; params matched to {target}",
        )
        budget_rows.append((row, t_model))

        # heal: the best MKA merge row, the best other planner's row, and TransAct
        if settings.heal_steps > 0 and n_remove in settings.heal_budgets:
            merges = [
                (r, p) for r, p in budget_rows if r["method"] == "mka" and r["alpha_rule"] != "drop"
            ]
            others = [(r, p) for r, p in budget_rows if r["method"] in BASELINES]
            picks = [
                min(group, key=lambda rp: rp[0]["perplexity"])
                for group in (merges, others)
                if group
            ]
            picks.append((row, t_model))
            for base, how in picks:
                model = how if base["method"] == "transact" else apply_plan(loaded.model, how)
                say(
                    f"quality: -{n_remove} healing {base['method']} "
                    f"({settings.heal_steps} steps, batch {settings.heal_batch})"
                )
                t0 = time.perf_counter()
                healed, _ = heal(
                    model,
                    loaded.tokenizer,
                    analysis.batch,
                    steps=settings.heal_steps,
                    lr=settings.heal_lr,
                    batch_size=settings.heal_batch,
                    inplace=True,
                )
                heal_s = time.perf_counter() - t0
                metrics = evaluate_row(healed)
                record(
                    base["method"],
                    base["alpha_rule"],
                    n_remove,
                    metrics,
                    healed=True,
                    plan_s=base.get("plan_s"),
                    build_s=base.get("build_s"),
                    heal_s=heal_s,
                    alpha_mean=base.get("alpha_mean"),
                    heal_from_perplexity=base["perplexity"],
                    steps=base["steps"],
                )
                del model, healed
                gc.collect()
        del t_model, budget_rows
        gc.collect()

    evaluate_row.cache.clear()
    return {
        "wall_s": round(time.perf_counter() - t_section, 1),
        "analysis_s": round(m_an.seconds, 1),
        "analysis_timings": {k: round(v, 3) for k, v in analysis.similarity.timings.items()},
        "calibration_tokens": analysis.batch.n_tokens,
        "eval_tokens": int(windows.numel()),
        "eval_positions": ref["n_positions"],
        "original_perplexity": ref["perplexity"],
        "rows": len(rows),
    }
