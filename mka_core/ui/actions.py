"""The user's actions in the app, one function each, calling the library (`pipeline`, `compare`)
and keeping the results in the session and its workspace: runs of plans, TransAct, healing,
measured importance and comparison sweeps (plans are in `plans`, exports in `exports`)."""

from __future__ import annotations

from datetime import datetime

import streamlit as st

from mka_core.compression.importance import measure_importance as _measure
from mka_core.compression.transact import target_shape
from mka_core.errors import MkaInputError, ProgressFn
from mka_core.evaluation.harness import parse_tasks
from mka_core.figures.tables import history_frame as _frame
from mka_core.ui import guards, session
from mka_core.ui import state as S
from mka_core.ui.resources import current_model, eval_defaults, model_summary, on_gpu
from mka_core.workflows import pipeline
from mka_core.workflows.compare import compare_sweep
from mka_core.workflows.pipeline import EvalSettings
from mka_core.workflows.pipeline import run_heal as _heal

# ---------------------------------------------------------------------------------------------
# runs: the original's evaluation is measured once per settings and reused


ORIGINAL_EVAL = "mka_original_eval"  # {settings key: [original EvalResult, reference cache]}


def eval_settings(
    budget_tokens,
    window,
    with_speed,
    with_generations,
    gen_tokens=None,
    eval_data="builtin",
    tasks: str = "",
    tasks_dir: str = "",
):
    """The one object that says how runs are evaluated (pipeline.EvalSettings); `tasks`: lm-eval
    task names, comma-separated, with an optional folder of task YAMLs."""

    loaded = current_model()
    gen = gen_tokens or eval_defaults(loaded)["gen_tokens"]
    names = tuple(parse_tasks(tasks)) if tasks and tasks.strip() else ()
    return EvalSettings(
        eval_data=eval_data,
        budget_tokens=int(budget_tokens),
        window=int(window),
        with_speed=bool(with_speed),
        with_generations=bool(with_generations),
        gen_tokens=int(gen),
        tasks=names,
        tasks_dir=(tasks_dir.strip() or None) if names and tasks_dir else None,
    )


def _original_reuse(loaded, settings) -> tuple:
    """The original model's result and reference cache for these settings, if an earlier run
    measured them: every later run then evaluates only the compressed model."""
    key = (loaded.fingerprint, loaded.device, str(loaded.dtype), settings.key())
    store = st.session_state.setdefault(ORIGINAL_EVAL, {})
    if key not in store:
        store.clear()  # one original at a time
        store[key] = [None, {}]
    return key, store[key]


def _remember_original(key, run) -> None:
    entry = st.session_state.get(ORIGINAL_EVAL, {}).get(key)
    if entry is not None and entry[0] is None:
        entry[0] = run.original


def estimate_seconds(settings) -> float | None:
    """A rough wall time of a run on this machine: the last run with the same evaluation size
    (less when the original is already measured for these settings); None before there is one."""
    rows = [
        r
        for r in st.session_state.get(S.HISTORY) or []
        if r.get("eval_tokens") == settings.budget_tokens and r.get("seconds") is not None
    ]
    if not rows:
        return None
    original_known = _original_reuse(current_model(), settings)[1][0] is not None
    return float(rows[-1]["seconds"]) * (0.6 if original_known else 1.0)


def run_plan(plan, settings, progress: ProgressFn | None = None):
    """Apply the plan to a copy of the original, evaluate both, and record the run."""

    loaded = current_model()
    key, (original, cache) = _original_reuse(loaded, settings)
    analysis = st.session_state.get(S.ANALYSIS)
    batch = analysis.batch if analysis is not None and plan.needs_data else None
    run = pipeline.run_plan(
        loaded,
        plan,
        settings,
        original=original,
        reference_cache=cache,
        progress=progress,
        batch=batch,
    )
    _remember_original(key, run)
    record_run(run, {"eval_tokens": settings.budget_tokens, "window": settings.window})
    return run


def record_run(run, extra: dict | None = None, report=None, kind: str | None = None) -> int:
    """Add a run (MKA, TransAct, healed, …) to the history and the workspace; its index.

    Only the newest KEEP_MODELS runs keep their compressed model in memory (for export); older
    ones keep their numbers."""
    runs = st.session_state.setdefault(S.RUNS, [])
    history = st.session_state.setdefault(S.HISTORY, [])
    runs.append(run)
    for old in runs[: -S.KEEP_MODELS]:
        old.model = None
    row = {"run": len(runs), "time": datetime.now().strftime("%H:%M:%S")}
    row.update(run.to_row())
    row["model"] = run.source
    row.update(extra or {})
    history.append(row)
    session.save_run(len(runs) - 1, run, report, kind)
    guards.sidebar_status()
    return len(runs) - 1


def latest_run():
    runs = st.session_state.get(S.RUNS) or []
    return runs[-1] if runs else None


def history_frame():

    return _frame(st.session_state.get(S.HISTORY) or [])


# ---------------------------------------------------------------------------------------------
# TransAct and healing


def _model_of(run_index: int | None):
    """The module to prune (a run's compressed model, or the session's original) and its params."""
    if run_index is None:
        loaded = current_model()
        return loaded.model, model_summary(loaded).n_params
    run = st.session_state[S.RUNS][run_index]
    return run.model, run.compressed.params


def transact_preview(mlp_keep: float, heads_keep: float, base_index: int | None = None) -> dict:
    """The shape a TransAct prune would give, without pruning: the kept intermediate size and
    query heads (rounded the way `transact.prune` rounds), and about how many parameters go."""

    model, params_start = _model_of(base_index)
    t = target_shape(model, float(mlp_keep), float(heads_keep))
    cfg = model.config
    d = int(cfg.hidden_size)
    n_layers = int(cfg.num_hidden_layers)
    (inter0, inter), (h0, h), (kv0, g) = t["intermediate"], t["n_heads"], t["n_kv_heads"]
    p = t["per_group"]
    hd = t["head_dim"]
    # gate/up/down lose 3·d weights per neuron; q/o lose 2·d·head_dim per query head, k/v the
    # same per KV head (biases, where a model has any, are a rounding error here)
    per_layer = lambda i, h, kv: 3 * d * i + 2 * d * hd * (h + kv)  # noqa: E731
    removed = n_layers * (per_layer(inter0, h0, kv0) - per_layer(inter, g * p, g))
    original = model_summary(current_model()).n_params
    heads = (
        f"heads {h0} → {h} ({p} per KV group)"
        if g == kv0
        else f"heads {h0} → {h} (whole KV groups go: {g} of {kv0} left, 1 head each)"
    )
    return {
        "text": f"intermediate {inter0} → {inter}, {heads}",
        "intermediate": (inter0, inter),
        "n_heads": (h0, h),
        "n_kv_heads": (kv0, g),
        "params_removed_pct": 100.0 * (original - (params_start - removed)) / original,
        "layers_equivalent": removed / per_layer(inter0, h0, kv0),
    }


def latest_merge_index() -> int | None:
    """The newest merge run (healed or not) of the current model whose model is still in memory:
    the base for "TransAct after the current merge"."""
    for i in reversed(heal_candidates()):
        run = st.session_state[S.RUNS][i]
        if run.plan is not None and "transact" not in run.kind:
            return i
    return None


def heal_candidates() -> list[int]:
    """Indices of the runs that can be healed (or pruned further): their compressed model is
    still in memory and was made from the model loaded now (the calibration text is its)."""
    loaded = current_model()
    runs = st.session_state.get(S.RUNS) or []
    return [
        i
        for i, run in enumerate(runs)
        if run.model is not None and loaded is not None and run.source == loaded.source
    ]


def _analysis_batch():
    analysis = st.session_state.get(S.ANALYSIS)
    if current_model() is None or analysis is None:
        raise MkaInputError(
            "no calibration batch: capture activations on the Similarity page first"
        )
    return analysis.batch


# TransAct settings the benchmark measured as destructive on the bundled model (BENCHMARKS.md):
# keeping half the MLP neurons and half the heads in one shot took perplexity from ~15 to ~11 000
DESTRUCTIVE = {"mlp_keep": 0.7, "heads_keep": 0.75}


def transact_warning(mlp_keep: float, heads_keep: float, shots: int) -> str | None:
    """A plain warning for settings known to wreck a model, None otherwise."""
    bad = []
    if mlp_keep < DESTRUCTIVE["mlp_keep"]:
        bad.append(f"keeping {mlp_keep:.0%} of the MLP neurons")
    if heads_keep < DESTRUCTIVE["heads_keep"]:
        bad.append(f"keeping {heads_keep:.0%} of the heads")
    if not bad:
        return None
    shot_note = " in one shot" if shots == 1 else ""
    return (
        f"{' and '.join(bad).capitalize()}{shot_note} is known to wreck a small model: on the "
        "bundled SmolLM2-135M, 50 % of both in one shot took the perplexity from about 15 to "
        "over 11 000 (gibberish). Healing recovers part of it; 80–90 % of the neurons and all "
        "heads keep the model usable."
    )


def run_transact(
    mlp_keep: float,
    heads_keep: float,
    shots: int,
    settings,
    after_merge: bool = False,
    progress: ProgressFn | None = None,
):
    """Prune the original (or the newest merge) on the analysis's calibration batch, evaluate it
    against the original and record the run; returns (run, TransActReport)."""

    batch = _analysis_batch()
    base_index = None
    if after_merge:
        base_index = latest_merge_index()
        if base_index is None:
            raise MkaInputError(
                "no merge to prune after: run a plan on the Results page first (its model must "
                "still be in memory), or untick 'TransAct after the current merge'"
            )
    runs = st.session_state[S.RUNS]
    loaded = current_model()
    key, (original, cache) = _original_reuse(loaded, settings)
    run, rep = pipeline.run_transact(
        loaded,
        batch,
        mlp_keep=float(mlp_keep),
        heads_keep=float(heads_keep),
        shots=int(shots),
        base=runs[base_index] if base_index is not None else None,
        settings=settings,
        original=original,
        reference_cache=cache,
        progress=progress,
    )
    _remember_original(key, run)
    extra = {
        "eval_tokens": settings.budget_tokens,
        "window": settings.window,
        "mlp_keep": float(mlp_keep),
        "heads_keep": float(heads_keep),
        "shots": int(shots),
        "intermediate_size": rep.new_intermediate_size,
        "n_heads": rep.new_n_heads,
        "n_kv_heads": rep.new_n_kv_heads,
        "base_run": base_index + 1 if base_index is not None else None,
    }
    index = record_run(run, extra, report=rep, kind="transact")
    st.session_state[S.TRANSACT] = {"run": index, "report": rep}
    session.save_state()
    return run, rep


def heal_defaults(loaded) -> dict:
    """Heal defaults: 30 steps on a CPU (each AdamW step of a 135M model takes seconds there),
    100 on a GPU; learning rate 1e-4; plain next-token loss ("ce"; "kd" distills from the
    original)."""
    return {"steps": 100 if on_gpu(loaded) else 30, "lr": 1e-4, "loss": "ce"}


HEAL_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3)


def run_heal(
    run_index: int | None,
    steps: int,
    lr: float,
    progress: ProgressFn | None = None,
    loss: str = "ce",
):
    """Fine-tune a run's compressed model on the calibration batch, with next-token loss ("ce")
    or by distillation from the current (original) model ("kd"), evaluate it the way its source
    run was evaluated (so perplexity before → after compares like with like), record it.
    Returns (healed run, HealReport)."""

    batch = _analysis_batch()
    if run_index is None:
        raise MkaInputError(
            "no compressed model in memory to heal: prune one above, or run a plan on the "
            "Results page first"
        )
    if run_index not in heal_candidates():
        raise MkaInputError(
            f"run {run_index + 1} cannot be healed: its model is no longer in memory (only the "
            f"last {S.KEEP_MODELS} are kept) or was made from another model"
        )
    run = st.session_state[S.RUNS][run_index]
    row = st.session_state[S.HISTORY][run_index]
    loaded = current_model()
    defaults = eval_defaults(loaded)
    settings = eval_settings(
        row.get("eval_tokens") or defaults["budget_tokens"],
        row.get("window") or defaults["window"],
        run.compressed.decode_tps is not None,
        bool(run.compressed.generations),
    )
    key, (original, cache) = _original_reuse(loaded, settings)
    healed, rep = _heal(
        loaded,
        run,
        batch,
        steps=int(steps),
        lr=float(lr),
        settings=settings,
        original=original,
        reference_cache=cache,
        progress=progress,
        loss=loss,
    )
    _remember_original(key, healed)
    extra = {k: row[k] for k in ("eval_tokens", "window") if k in row}
    extra.update(
        healed_from=run_index + 1, heal_steps=int(steps), heal_lr=float(lr), heal_loss=rep.loss
    )
    index = record_run(healed, extra, report=rep, kind="heal")
    st.session_state[S.HEAL] = {"run": index, "from": run_index, "report": rep}
    session.save_state()
    return healed, rep


# ---------------------------------------------------------------------------------------------
# what really matters


def importance_defaults(loaded) -> dict:
    """Samples for the measured importance: 32 on a GPU, 8 on a CPU (each of the 2L - 1
    candidates runs the blocks above its change and the LM head on them)."""
    return {"n_samples": 32 if on_gpu(loaded) else 8}


def measure_importance(n_samples: int, alpha_rule: str = "similarity", progress=None):
    """Drop-one and merge-one loss of the session's model, kept with its analysis."""

    analysis = st.session_state.get(S.ANALYSIS)
    if analysis is None:
        raise MkaInputError("capture activations on the Similarity page first")
    imp = _measure(
        current_model(),
        analysis.batch,
        analysis.similarity,
        alpha_rule=alpha_rule,
        n_samples=min(int(n_samples), analysis.batch.n_samples),
        progress=progress,
    )
    analysis.importance = imp
    session.save_analysis(analysis)
    return imp


# ---------------------------------------------------------------------------------------------
# compare


def run_compare(
    planners_spec,
    budgets,
    transact: bool,
    settings,
    progress: ProgressFn | None = None,
    quants=(),
):
    """The compare sweep on the session's analysis and model, kept in the session; with `quants`
    every row is also measured quantized (GGUF types)."""

    analysis = st.session_state.get(S.ANALYSIS)
    if analysis is None:
        raise MkaInputError("capture activations on the Similarity page first")
    result = compare_sweep(
        current_model(),
        analysis,
        planners_spec,
        budgets,
        transact=transact,
        eval_budget=settings.budget_tokens,
        eval_window=settings.window,
        quants=quants,
        progress=progress,
    )
    st.session_state[S.COMPARE] = result
    return result


def compare_csv() -> str | None:
    result = st.session_state.get(S.COMPARE)
    return result.csv() if result is not None else None
