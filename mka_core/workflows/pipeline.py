"""The user-level actions, one function each, shared by the command line and the app:
analyse a model's layers, and (through the other modules) plan, apply, prune and evaluate."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from mka_core.analysis.activations import Activations, capture_activations
from mka_core.analysis.similarity import SimilarityResult, compute_similarity
from mka_core.analysis.stability import MIN_ROWS, StabilityResult, compute_stability
from mka_core.compression.heal import heal
from mka_core.compression.importance import ImportanceResult, measure_importance
from mka_core.compression.merge import apply_plan
from mka_core.compression.plan import Plan, check_fingerprint
from mka_core.compression.planners import MANUAL, PlanSettings, plan_layers
from mka_core.compression.transact import prune
from mka_core.data.corpus import (
    BUILTIN,
    CalibrationBatch,
    Document,
    load_documents,
    make_calibration,
    make_eval_windows,
)
from mka_core.errors import MkaInputError, ProgressFn, report
from mka_core.evaluation.evaluate import compare
from mka_core.evaluation.harness import attach_tasks, check_tasks, require_in_memory
from mka_core.evaluation.provenance import describe
from mka_core.evaluation.results import EvalResult
from mka_core.models.loading import LoadedModel
from mka_core.workflows.export import save_model

log = logging.getLogger(__name__)


@dataclass
class Analysis:
    batch: CalibrationBatch
    activations: Activations | None  # None when loaded from a saved analysis
    similarity: SimilarityResult
    stability: object = None  # stability.StabilityResult, None when there were too few rows
    importance: object = None  # importance.ImportanceResult, when it was measured

    def save(self, out_dir) -> None:
        """similarity.* (+ stability.*, importance.json) into an existing folder."""
        self.similarity.save(out_dir)
        if self.stability is not None:
            self.stability.save(out_dir)
        if self.importance is not None:
            self.importance.save(out_dir)


def _scaled(progress: ProgressFn | None, lo: float, hi: float) -> ProgressFn | None:
    """A callback that maps a sub-task's [0, 1] onto [lo, hi] of the caller's bar."""
    if progress is None:
        return None
    return lambda f, msg: progress(lo + (hi - lo) * f, msg)


def analyze(
    loaded: LoadedModel,
    data: str | list[Document] = BUILTIN,
    n_samples: int = 128,
    max_tokens: int = 128,
    pooling: str = "mean",
    tokens_per_sample: int = 8,
    batch_size: int = 16,
    k: int = 8,
    d: int = 4,
    t: float = 1.0,
    alpha: float = 0.5,
    seed: int = 0,
    progress: ProgressFn | None = None,
    stability: bool = True,
    n_boot: int | None = None,
    importance: bool = False,
    importance_samples: int = 32,
    importance_alpha: str = "similarity",
) -> Analysis:
    """Calibration text → one capture pass → every similarity measure, with stage timings;
    then how stable each measure is on resamples of the rows (no forward pass; bootstrap sized to
    about 20 % of the analysis' time unless `n_boot` is given), and, with `importance`, the
    measured loss of dropping each layer and merging each pair (`importance_samples` samples)."""

    docs = load_documents(data, "calibration") if isinstance(data, str) else data
    batch = make_calibration(loaded.tokenizer, docs, n_samples=n_samples, max_tokens=max_tokens)
    t0 = time.perf_counter()
    hi = 0.7 if importance else 0.85
    acts = capture_activations(
        loaded.model,
        batch,
        pooling=pooling,
        batch_size=batch_size,
        tokens_per_sample=tokens_per_sample,
        seed=seed,
        progress=_scaled(progress, 0.0, hi),
    )
    capture_s = time.perf_counter() - t0
    sim = compute_similarity(
        acts, k=k, d=d, t=t, alpha=alpha, seed=seed, progress=_scaled(progress, hi, hi + 0.05)
    )
    sim.timings = {"capture": capture_s, **sim.timings}
    sim.params.update(
        model=loaded.source,
        fingerprint=loaded.fingerprint,
        device=loaded.device,
        data=data if isinstance(data, str) else "documents",
    )
    stab = None
    if stability and acts.n_rows >= 2 * MIN_ROWS:
        budget = 0.2 * sum(sim.timings.values())
        stab = compute_stability(
            acts,
            sim.params,
            n_boot=n_boot,
            budget_s=budget,
            seed=seed,
            progress=_scaled(progress, hi + 0.05, hi + 0.15),
        )
        sim.timings["stability"] = stab.seconds
    elif stability:
        log.info("stability skipped: %d rows, it needs %d", acts.n_rows, 2 * MIN_ROWS)
    imp = None
    if importance:
        imp = measure_importance(
            loaded,
            batch,
            sim,
            alpha_rule=importance_alpha,
            n_samples=min(importance_samples, batch.n_samples),
            progress=_scaled(progress, 0.85, 1.0),
        )
        sim.timings["importance"] = imp.seconds
    report(progress, 1.0, "analysis done")
    return Analysis(batch, acts, sim, stab, imp)


def load_analysis(loaded: LoadedModel, folder, data=None) -> Analysis:
    """An analysis saved by `analyze` (the CLI's analyze --out), for this model: its similarity
    result, and the calibration batch rebuilt from the settings it records (tokenising is cheap;
    the capture is what is saved). Refused when it was made on another model."""

    sim = SimilarityResult.load(folder)
    p = sim.params
    if (
        sim.n_layers != loaded.n_layers
        or p.get("fingerprint", loaded.fingerprint) != loaded.fingerprint
    ):
        raise MkaInputError(
            f"the analysis in {folder} was made on {p.get('model', '?')} ({sim.n_layers} layers, "
            f"fingerprint {p.get('fingerprint')}), not on this model ({loaded.n_layers} layers, "
            f"{loaded.fingerprint})"
        )
    if data is None:
        data = p.get("data", BUILTIN)
        if data == "documents":
            raise MkaInputError(
                f"the analysis in {folder} was made on text given in memory; redo it"
            )
    docs = load_documents(data, "calibration") if isinstance(data, str) else data
    batch = make_calibration(
        loaded.tokenizer, docs, n_samples=int(p["n_samples"]), max_tokens=int(p["max_tokens"])
    )

    return Analysis(batch, None, sim, StabilityResult.load(folder), ImportanceResult.load(folder))


# ---------------------------------------------------------------------------------------------
# planning, compressing, evaluating, exporting: one function per user action


RUN_FORMAT = "mka-run"


@dataclass
class Run:
    """One compression of the original model, evaluated against it.

    `stages` records what was done, in order (a merge plan, a TransAct pass, a heal), so a
    TransAct pass after an MKA merge (or the reverse) is described in one place."""

    kind: str  # "merge", "transact", "merge+transact", "...+heal"
    label: str
    model: object  # the compressed nn.Module (a new model; the original is untouched)
    tokenizer: object
    source: str  # the original model's source
    stages: list  # [{"stage": "merge", "plan": {...}}, {"stage": "transact", "report": {...}}, ...]
    original: object  # EvalResult of the original model
    compressed: object  # EvalResult of this model
    plan: object = None  # the Plan of the merge stage, if any
    seconds: float = 0.0

    @property
    def planner(self) -> str:
        if self.plan is not None:
            return self.plan.method.get("planner", "?")
        return self.kind

    def to_row(self) -> dict:
        """A flat row for the history table."""
        o, c = self.original, self.compressed
        return {
            "label": self.label,
            "kind": self.kind,
            "planner": self.planner,
            "alpha": (self.plan.method.get("alpha") if self.plan is not None else None),
            "layers": c.n_layers,
            "layers_removed": o.n_layers - c.n_layers,
            "params": c.params,
            "params_removed_pct": 100.0 * (1 - c.params / o.params),
            "perplexity": c.perplexity,
            "perplexity_original": o.perplexity,
            "kl": c.kl,
            "top1": c.top1,
            "decode_tps": c.decode_tps,
            "healed": any(s["stage"] == "heal" for s in self.stages),
            "seconds": self.seconds,
            "provenance": describe(c.meta),
        }

    def to_dict(self) -> dict:
        d = {
            "format": RUN_FORMAT,
            "version": 1,
            "source": self.source,
            "kind": self.kind,
            "label": self.label,
            "stages": self.stages,
            "seconds": round(self.seconds, 3),
        }
        if self.original is not None:  # a run exported without an evaluation records its stages
            d.update(original=self.original.to_dict(), compressed=self.compressed.to_dict())
        return d


def read_run_record(folder) -> dict | None:
    """The mka-run.json that `export_run` writes beside a compressed model, if any."""

    p = Path(folder).expanduser() / "mka-run.json"
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError:
        return None
    return d if isinstance(d, dict) and d.get("format") == RUN_FORMAT else None


def make_budget_plan(
    loaded: LoadedModel,
    analysis: Analysis | None,
    settings: PlanSettings | str | None = None,
    progress: ProgressFn | None = None,
    **changes,
) -> Plan:
    """The plan `settings` asks for (a PlanSettings, or a planner name and PlanSettings fields:
    `make_budget_plan(loaded, analysis, "sleb", n_remove=3)`), on the analysis' similarity and
    calibration data: a number of layers removed (n_remove) or a compression ratio (removed /
    original), or, for the manual planner, the user's picks. No settings: PlanSettings()."""

    settings = PlanSettings.of(settings or PlanSettings(), **changes)
    if analysis is None:
        return plan_layers(loaded, None, None, settings, progress=progress)
    return plan_layers(
        loaded,
        analysis.similarity,
        analysis.batch,
        settings,
        progress=progress,
        stability=analysis.stability,
    )


def make_manual_plan(
    loaded: LoadedModel,
    analysis: Analysis | None,
    picks: list[dict],
    alpha_rule: str = "similarity",
    alpha: float = 0.5,
    merge_mode: str = "average",
    compensation: str = "none",
) -> Plan:
    """A plan from the user's picks ({"op": "merge"|"drop", "layers": [...]}), in order."""

    settings = PlanSettings(
        planner=MANUAL,
        picks=picks,
        alpha_rule=alpha_rule,
        alpha=alpha,
        merge_mode=merge_mode,
        compensation=compensation,
    )
    return make_budget_plan(loaded, analysis, settings)


def plan_batch(loaded: LoadedModel, plan, data=None, samples=None, tokens=None):
    """The calibration batch a plan that flattens or compensates is built on: `data`, `samples`
    and `tokens` where given, else what the plan records, else the defaults (built-in text, 128
    samples of 128 tokens)."""
    rec = plan.refine.calibration or {}
    docs = load_documents(data or rec.get("data", BUILTIN), "calibration")
    return make_calibration(
        loaded.tokenizer,
        docs,
        n_samples=samples or rec.get("samples", 128),
        max_tokens=tokens or rec.get("tokens", 128),
    )


def eval_windows(
    loaded: LoadedModel, eval_data=BUILTIN, budget_tokens: int = 8192, window: int = 512
):

    docs = load_documents(eval_data, "evaluation") if isinstance(eval_data, str) else eval_data
    return make_eval_windows(loaded.tokenizer, docs, budget_tokens=budget_tokens, window=window)


@dataclass(frozen=True)
class EvalSettings:
    """How a run is evaluated (the same for the original and every compressed model)."""

    eval_data: object = BUILTIN  # builtin, a file path, or a list of Documents
    budget_tokens: int = 8192
    window: int = 512
    with_speed: bool = True
    with_generations: bool = True
    gen_tokens: int = 32
    mmlu_folder: object = None
    tasks: tuple = ()  # lm-eval task names (evaluation.harness), with their folder and limit
    tasks_dir: object = None
    task_limit: int | None = None

    def key(self) -> tuple:
        """What decides the original's result (to reuse it across runs)."""
        data = self.eval_data if isinstance(self.eval_data, str) else id(self.eval_data)
        return (
            data,
            self.budget_tokens,
            self.window,
            self.with_speed,
            self.with_generations,
            self.gen_tokens,
            str(self.mmlu_folder),
            (self.tasks, str(self.tasks_dir), self.task_limit),
        )


def _evaluate_pair(
    loaded, model, label, settings: EvalSettings, progress, original=None, reference_cache=None
):
    """(original, compressed) results. `original`: the original's EvalResult from an earlier run
    with the same settings (reused, not re-measured); `reference_cache`: a dict that keeps the
    original's final states across runs (see evaluate.fidelity)."""

    s = settings
    windows = eval_windows(loaded, s.eval_data, s.budget_tokens, s.window)
    if s.tasks:  # before the evaluation, not after it
        require_in_memory(loaded.model, model)
        check_tasks(list(s.tasks), s.tasks_dir, s.task_limit)
    orig, comp = compare(
        loaded,
        model,
        windows,
        tokenizer=loaded.tokenizer,
        label=label,
        original_label=loaded.source,
        with_speed=s.with_speed,
        with_generations=s.with_generations,
        gen_tokens=s.gen_tokens,
        mmlu_folder=s.mmlu_folder,
        meta={
            "eval_data": s.eval_data if isinstance(s.eval_data, str) else "documents",
            "split": "evaluation",
            "budget_tokens": s.budget_tokens,
        },
        progress=progress,
        original_result=original,
        reference_cache=reference_cache,
    )
    if not s.tasks:
        return orig, comp
    task_args = (loaded.tokenizer, list(s.tasks), s.tasks_dir, s.task_limit)
    if orig.tasks is None:  # a reused original result keeps its scores
        (orig,) = attach_tasks([orig], [loaded.model], *task_args)
    (comp,) = attach_tasks([comp], [model], *task_args)
    return orig, comp


def run_plan(
    loaded: LoadedModel,
    plan,
    settings: EvalSettings | None = None,
    label: str | None = None,
    original=None,
    reference_cache: dict | None = None,
    progress: ProgressFn | None = None,
    batch: CalibrationBatch | None = None,
) -> Run:
    """Apply a plan to a copy of the model (streamed when the model is) and evaluate it against
    the original. A plan that flattens or compensates is built on `batch` (default: the
    calibration the plan records, see `plan_batch`)."""

    settings = settings or EvalSettings()
    t0 = time.perf_counter()
    warning = check_fingerprint(plan, loaded)
    if warning:
        log.warning(warning)
    if plan.needs_data and batch is None:
        batch = plan_batch(loaded, plan)
    model = apply_plan(loaded.model, plan, progress=_scaled(progress, 0.0, 0.3), batch=batch)
    label = label or (
        f"{plan.method.get('planner', 'plan')}{plan.refine.label} -{plan.n_removed} layers"
    )
    orig, comp = _evaluate_pair(
        loaded, model, label, settings, _scaled(progress, 0.3, 1.0), original, reference_cache
    )
    return Run(
        kind="merge",
        label=label,
        model=model,
        tokenizer=loaded.tokenizer,
        source=loaded.source,
        stages=[{"stage": "merge", "plan": plan.to_dict()}],
        original=orig,
        compressed=comp,
        plan=plan,
        seconds=time.perf_counter() - t0,
    )


def run_transact(
    loaded: LoadedModel,
    batch: CalibrationBatch,
    mlp_keep: float = 1.0,
    heads_keep: float = 1.0,
    shots: int = 4,
    base: Run | None = None,
    settings: EvalSettings | None = None,
    label: str | None = None,
    original=None,
    reference_cache: dict | None = None,
    progress: ProgressFn | None = None,
) -> tuple[Run, object]:
    """TransAct pruning of the original model (or of `base`, an earlier run such as a merge),
    evaluated against the original. Returns the run and the TransAct report (with scores)."""

    settings = settings or EvalSettings()
    t0 = time.perf_counter()
    start = base.model if base is not None else loaded.model
    model, rep = prune(
        start,
        batch,
        mlp_keep=mlp_keep,
        heads_keep=heads_keep,
        shots=shots,
        progress=_scaled(progress, 0.0, 0.5),
    )
    kind = f"{base.kind}+transact" if base is not None else "transact"
    label = label or f"transact mlp {mlp_keep:g} heads {heads_keep:g}" + (
        f" after {base.label}" if base is not None else ""
    )
    orig, comp = _evaluate_pair(
        loaded, model, label, settings, _scaled(progress, 0.5, 1.0), original, reference_cache
    )
    stages = (list(base.stages) if base is not None else []) + [
        {
            "stage": "transact",
            "mlp_keep": mlp_keep,
            "heads_keep": heads_keep,
            "shots": shots,
            "report": _report_summary(rep),
        }
    ]
    run = Run(
        kind,
        label,
        model,
        loaded.tokenizer,
        loaded.source,
        stages,
        orig,
        comp,
        plan=base.plan if base is not None else None,
        seconds=time.perf_counter() - t0,
    )
    return run, rep


def _report_summary(rep) -> dict:
    """A TransAct report without its (large) per-unit scores."""
    d = rep.to_dict()
    return {k: v for k, v in d.items() if "score" not in k}


def run_heal(
    loaded: LoadedModel,
    run: Run,
    batch: CalibrationBatch,
    steps: int = 100,
    lr: float = 1e-4,
    batch_size: int = 4,
    settings: EvalSettings | None = None,
    original=None,
    reference_cache: dict | None = None,
    progress: ProgressFn | None = None,
    loss: str = "ce",
    top_k: int = 64,
) -> tuple[Run, object]:
    """A short fine-tune of a compressed model on calibration text, evaluated again.

    loss: "ce" (next-token) or "kd" (distillation from `loaded`, the original, on its `top_k`
    logits per position; `loaded` may be streamed from disk)."""

    if not isinstance(run.model, nn.Module):
        raise MkaInputError(
            "heal trains the whole model in memory (fp32 weights, gradients and AdamW state: "
            "about 16 bytes per parameter); this model is streamed from disk because it does not "
            "fit, so it cannot be healed here"
        )
    settings = settings or EvalSettings()
    t0 = time.perf_counter()
    model, rep = heal(
        run.model,
        loaded.tokenizer,
        batch,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        progress=_scaled(progress, 0.0, 0.6),
        loss=loss,
        teacher=loaded if loss == "kd" else None,
        top_k=top_k if loss == "kd" else None,
    )
    label = f"{run.label} +heal{steps}" + ("kd" if loss == "kd" else "")
    orig, comp = _evaluate_pair(
        loaded, model, label, settings, _scaled(progress, 0.6, 1.0), original, reference_cache
    )
    heal_info = rep.to_dict()
    heal_info["perplexity_before"] = run.compressed.perplexity
    heal_info["perplexity_after"] = comp.perplexity
    stages = list(run.stages) + [{"stage": "heal", "report": heal_info}]
    healed = Run(
        f"{run.kind}+heal",
        label,
        model,
        loaded.tokenizer,
        loaded.source,
        stages,
        orig,
        comp,
        plan=run.plan,
        seconds=run.seconds + time.perf_counter() - t0,
    )
    return healed, rep


def run_from_dict(d: dict) -> Run:
    """A run read back from its mka-run record (without its compressed model)."""

    if not isinstance(d, dict) or d.get("format") != RUN_FORMAT:
        raise MkaInputError(f"not an {RUN_FORMAT} record")
    plan = None
    for stage in d.get("stages", []):
        if stage.get("stage") == "merge":
            plan = Plan.from_dict(stage["plan"])
    return Run(
        d.get("kind", "?"),
        d.get("label", "?"),
        None,
        None,
        d.get("source", "?"),
        list(d.get("stages", [])),
        EvalResult.from_dict(d["original"]) if d.get("original") else None,
        EvalResult.from_dict(d["compressed"]) if d.get("compressed") else None,
        plan=plan,
        seconds=float(d.get("seconds", 0.0)),
    )


def export_run(
    run: Run,
    out_dir,
    overwrite: bool = False,
    loaded_from=None,
    out_dtype=None,
    progress: ProgressFn | None = None,
):
    """Save the compressed model as a folder plain transformers loads (plus plan.json when the
    run has a merge plan, and mka-run.json with every stage and both evaluations), shard by shard,
    in `out_dtype` (default: the weights' dtype)."""

    return save_model(
        run.model,
        run.tokenizer,
        out_dir,
        plan=run.plan,
        overwrite=overwrite,
        loaded_from=loaded_from,
        extra_files={"mka-run.json": json.dumps(run.to_dict(), indent=2)},
        out_dtype=out_dtype,
        progress=progress,
    )
