"""One config of a `compare` sweep: a planner spec at a budget, planned, built and evaluated on
one analysis and one evaluation of the original. Shared by the local loop (`compare`) and the
Ray executor (`compare_ray`)."""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import dataclass
from typing import NamedTuple

from mka_core.compression.merge import apply_plan
from mka_core.compression.plan import layers_to_remove, make_plan
from mka_core.compression.planners import PLANNERS, PlanSettings, budget_names
from mka_core.compression.refinement import COMPENSATIONS, Refine
from mka_core.compression.transact import prune
from mka_core.engine.layerpass import as_stack
from mka_core.engine.quant import gguf_bytes, quantized
from mka_core.errors import MkaInputError
from mka_core.evaluation.evaluate import _exp, fidelity
from mka_core.evaluation.generation import speed
from mka_core.evaluation.harness import require_in_memory, run_tasks
from mka_core.evaluation.results import size
from mka_core.models.loading import count_params
from mka_core.workflows.pipeline import make_budget_plan

log = logging.getLogger(__name__)


TRANSACT = "transact"  # not a planner: MLP neurons pruned to the layer-removed parameter count

STEP_MESSAGES = ("merged layers", "dropped layer")  # a greedy step completed (progress text)


class PlanningTooLong(Exception):
    """Raised from a planner's progress when it runs past the sweep's time limit."""


@dataclass(frozen=True)
class Config:
    planner: str  # a registered planner's name, or TRANSACT
    option: str | None  # one of the planner's spec_options (an α rule, an NPIB kind, ...)
    budget: int  # layers removed (TransAct: the same number of layers' parameters)
    refine: Refine = Refine()  # merge mode and compensation (spec ":flatten", "+linear")

    @property
    def label(self) -> str:
        return f"{self.spec} -{self.budget}"

    @property
    def spec(self) -> str:
        return f"{self.planner}{':' + self.option if self.option else ''}{self.refine.label}"


class Spec(NamedTuple):
    """One parsed planner spec: ``planner[:option][:flatten][+linear|+scale]``."""

    planner: str
    option: str | None
    refine: Refine = Refine()


def planner_specs() -> tuple[str, ...]:
    """Every spec `parse_planners` accepts: each budget planner, with each of its options, and
    with each merge mode (planners that merge) and compensation."""
    out = []
    for name in budget_names():
        planner = PLANNERS.get(name)
        heads = [name, *(f"{name}:{o}" for o in planner.spec_options)]
        if "merge" in planner.does:
            heads += [f"{h}:flatten" for h in heads]
        out += [f"{h}{'+' + c if c != 'none' else ''}" for h in heads for c in COMPENSATIONS]
    return (*out, TRANSACT)


def default_specs() -> str:
    """compare's default planners (the registry's `in_compare_default` ones)."""
    return ",".join(n for n in budget_names() if PLANNERS.get(n).in_compare_default)


def parse_planners(specs) -> list[tuple[str, str | None]]:
    """ "mka,mka:search,sleb" (or a list) → [(planner, option)], checked against the registry."""

    if isinstance(specs, str):
        specs = [p for p in specs.split(",") if p.strip()]
    out = []
    for spec in specs:
        head, *comps = spec.strip().split("+")
        name, *options = head.split(":")
        merge = "flatten" if "flatten" in options else "average"
        options = [o for o in options if o != "flatten"]
        if len(options) > 1 or len(comps) > 1 or any(c not in COMPENSATIONS[1:] for c in comps):
            raise MkaInputError(
                f"{spec!r}: expected planner[:option][:flatten][+{'|+'.join(COMPENSATIONS[1:])}]"
            )
        option = options[0] if options else None
        refine = Refine(merge, comps[0] if comps else "none")
        planners = budget_names()
        if name != TRANSACT and name not in planners:
            raise MkaInputError(
                f"unknown planner {name!r} in {spec!r}; expected {', '.join(planners)} or "
                f"{TRANSACT}"
            )
        allowed = tuple(PLANNERS.get(name).spec_options) if name != TRANSACT else ()
        if option is not None and option not in allowed:
            raise MkaInputError(
                f"{spec!r}: {name} takes "
                + (f"one of {', '.join(allowed)} after ':'" if allowed else "no option")
            )
        if name == TRANSACT and not refine.is_default:
            raise MkaInputError(f"{spec!r}: transact takes no merge mode or compensation")
        if merge == "flatten" and "merge" not in PLANNERS.get(name).does:
            raise MkaInputError(f"{spec!r}: {name} does not merge layers; flatten is for merges")
        out.append(Spec(name, option, refine))
    if not out:
        raise MkaInputError(f"no planners given; e.g. --planners {default_specs()}")
    return out


def parse_budgets(text, n_layers: int, protect_first=True, protect_last=True) -> list[int]:
    """ "3,6,10" (or a list) → layer counts, each checked against the model."""

    if isinstance(text, str):
        try:
            text = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise MkaInputError(f"budgets must be whole numbers of layers, got {text!r}") from None
    budgets = sorted(set(int(b) for b in text))
    if not budgets or budgets[0] < 1:
        raise MkaInputError(f"budgets must be layer counts >= 1, got {text!r}")
    for b in budgets:
        layers_to_remove(n_layers, remove=b, protect_first=protect_first, protect_last=protect_last)
    return budgets


def make_configs(planners, budgets, transact: bool = False) -> list[Config]:
    planners = [Spec(*p) for p in planners]
    configs = [Config(p, o, b, r) for b in budgets for p, o, r in planners if p != TRANSACT]
    if transact or any(p.planner == TRANSACT for p in planners):
        configs += [Config(TRANSACT, None, b) for b in budgets]
    return configs


def _steps_text(plan) -> str:
    out = []
    for s in plan.steps:
        sep = "+" if s.op != "drop" else ","
        layers = sep.join(str(i) for i in s.layers)
        if s.op == "merge" and s.weights:
            out.append(f"merge {layers} ({'/'.join(f'{w:.2f}' for w in s.weights)})")
        else:
            out.append(f"{s.op} {layers}")
    return "; ".join(out)


def transact_target(model, target_params: int) -> tuple[int, int]:
    """The MLP intermediate size that brings TransAct's model closest to `target_params` with
    every head kept, and the parameter count it gives: params(I') = params − L · unit · (I − I'),
    where a neuron's unit is a row of gate and up and a column of down (plus biases)."""

    stack = as_stack(model)
    cfg = stack.config
    inter, d = int(cfg.intermediate_size), int(cfg.hidden_size)
    infos = {i.name: i for i in stack.recipe.infos()}
    bias = sum(1 for p in ("gate_proj", "up_proj") if f"model.layers.0.mlp.{p}.bias" in infos)
    unit = 3 * d + bias
    total, n_layers = count_params(model), stack.n_layers
    cut = round((total - target_params) / (n_layers * unit))
    new = min(max(inter - cut, 1), inter)
    return new, total - n_layers * unit * (inter - new)


def _block_params(model) -> int:

    infos = as_stack(model).recipe.infos()
    return sum(i.numel for i in infos if i.name.startswith("model.layers.0."))


def config_settings(base: PlanSettings, cfg: Config) -> PlanSettings:
    """The PlanSettings of a config: the sweep's `base`, its planner and budget, and what its
    spec option sets (registry `spec_options`, e.g. mka:drop = fixed α 1)."""
    changes = dict(PLANNERS.get(cfg.planner).spec_options[cfg.option]) if cfg.option else {}
    return base.replace(
        planner=cfg.planner,
        n_remove=cfg.budget,
        ratio=None,
        merge_mode=cfg.refine.merge,
        compensation=cfg.refine.compensation,
        **changes,
    )


def _plan(loaded, analysis, settings: PlanSettings, limit_s):
    """(plan, seconds, step_times): step_times[k] is when greedy step k + 1 was done."""

    t0 = time.perf_counter()
    steps_done: list[float] = []

    def progress(fraction: float, msg: str) -> None:
        el = time.perf_counter() - t0
        if any(m in msg for m in STEP_MESSAGES):
            steps_done.append(el)
        if limit_s is not None and el > limit_s:
            raise PlanningTooLong(f"stopped after {limit_s:.0f} s at: {msg}")

    plan = make_budget_plan(loaded, analysis, settings, progress=progress)
    return plan, time.perf_counter() - t0, steps_done


class _Planned:
    """Plans for every budget of one planner spec: greedy ones (registry `greedy_prefix`: their
    plan for b layers is the first b steps of their plan for more, their choices never look
    ahead) from a single run at the largest budget that fits in the time limit (prefixes, with
    the time each prefix took), the others at each budget.

    fixed_alpha and loss_samples are the sweep's own plan settings (the α of the fixed rule, the
    calibration samples loss-guided planners score with)."""

    def __init__(self, loaded, analysis, fixed_alpha=0.5, limit_s=None, loss_samples=None):
        self.loaded, self.analysis, self.limit_s = loaded, analysis, limit_s
        self.base = PlanSettings(alpha=fixed_alpha, loss_samples=loss_samples)
        self.runs: dict[tuple, tuple] = {}  # (planner, option) -> (plan, steps_done) or error

    def _plan(self, cfg: Config):
        return _plan(self.loaded, self.analysis, config_settings(self.base, cfg), self.limit_s)

    def get(self, cfg: Config, budgets: list[int]):
        """(plan, seconds) for `cfg`, or raises PlanningTooLong."""

        if not PLANNERS.get(cfg.planner).greedy_prefix:
            plan, seconds, _ = self._plan(cfg)
            return plan, seconds
        # one run serves every merge mode and compensation of a spec, unless its search scores
        # them (registry `scored`): then one per what it scores
        planner = PLANNERS.get(cfg.planner)
        scored = planner.scored(cfg.refine.merge, cfg.refine.compensation) if planner.scored else ""
        key = (cfg.planner, cfg.option, scored)
        if key not in self.runs:
            error = None
            for b in sorted((b for b in budgets if b >= cfg.budget), reverse=True):
                try:
                    self.runs[key] = self._plan(Config(cfg.planner, cfg.option, b, cfg.refine))
                    break
                except PlanningTooLong as e:
                    error = e
            else:
                self.runs[key] = error
        got = self.runs[key]
        if isinstance(got, PlanningTooLong) or got is None:
            raise got or PlanningTooLong("not planned")
        plan, seconds, done = got
        if cfg.budget > plan.n_removed:
            raise PlanningTooLong(f"a {plan.n_removed}-layer plan was the most within the limit")
        if cfg.budget == plan.n_removed:
            return plan.with_refine(cfg.refine), seconds
        method = json.loads(json.dumps(plan.method))
        method["params"]["n_remove"] = cfg.budget
        method["params"]["note"] = (
            f"the first {cfg.budget} steps of the {plan.n_removed}-layer plan"
        )
        t = done[cfg.budget - 1] if len(done) >= cfg.budget else None
        return make_plan(self.loaded, plan.steps[: cfg.budget], method, cfg.refine), t


def _evaluate(loaded, model, windows, cache, with_speed: bool) -> dict:

    t0 = time.perf_counter()
    fid = fidelity(loaded.model, model, windows, reference_cache=cache)
    width = int(windows.shape[1]) - 1
    halves = {}
    for name, part in (
        ("a", fid["window_nll_compressed"][0::2]),
        ("b", fid["window_nll_compressed"][1::2]),
    ):
        halves[f"perplexity_half_{name}"] = _exp(sum(part) / (len(part) * width)) if part else None
    out = {
        "perplexity": fid["perplexity_compressed"],
        "perplexity_original": fid["perplexity_original"],
        "kl": fid["kl"],
        "top1": fid["top1"],
        **halves,
        "original_halves": [
            _exp(sum(p) / (len(p) * width)) if p else None
            for p in (fid["window_nll_original"][0::2], fid["window_nll_original"][1::2])
        ],
    }
    sz = size(model)
    out.update(
        params=sz["params"], n_layers=sz["n_layers"], intermediate_size=sz["intermediate_size"]
    )
    if with_speed and not loaded.streamed:
        out["decode_tps"] = speed(model, loaded.tokenizer)["decode_tps"]
    out["gguf_bytes"] = gguf_bytes(model, "BF16")
    out["eval_s"] = time.perf_counter() - t0
    return out


TASK_PREFIX = "lm-eval "  # row keys of lm-eval scores: "lm-eval <task> <metric>"


def task_scores(model, tokenizer, tasks) -> dict:
    """lm-eval's accuracies of `model` for a row ({} without tasks); `tasks`: (names, folder,
    limit) as `evaluation.harness.run_tasks` takes them."""
    if not tasks or not tasks[0]:
        return {}
    names, folder, limit = tasks
    (module,) = require_in_memory(model)
    summary = run_tasks(module, tokenizer, names, folder, limit)
    return {
        f"{TASK_PREFIX}{name} {metric}": value
        for name, t in summary["tasks"].items()
        for metric, value in t["metrics"].items()
        if metric in ("acc", "acc_norm")
    }


def quant_results(loaded, model, windows, cache, quants) -> dict:
    """`model` after a quantize → dequantize round trip of its weights, per type in `quants`
    (`engine.quant`, the GGUF export's own rule): perplexity, KL and top-1 against the unquantized
    original, and the size of its GGUF tensors. The quantized copy is dropped after each type."""
    out = {}
    for q in quants:
        t0 = time.perf_counter()
        qmodel = quantized(model, q)
        fid = fidelity(loaded.model, qmodel, windows, reference_cache=cache)
        del qmodel
        gc.collect()
        out[q] = {
            "perplexity": fid["perplexity_compressed"],
            "kl": fid["kl"],
            "top1": fid["top1"],
            "gguf_bytes": gguf_bytes(model, q),
            "eval_s": time.perf_counter() - t0,
        }
    return out


def run_config(
    loaded,
    analysis,
    cfg: Config,
    windows,
    cache: dict,
    *,
    params_original: int,
    planned: _Planned | None = None,
    budgets: list[int] | None = None,
    fixed_alpha: float = 0.5,
    with_speed: bool = False,
    plan_limit_s: float | None = None,
    loss_samples: int | None = None,
    transact_samples: int = 32,
    transact_shots: int = 4,
    keep_model: bool = False,
    quants: tuple[str, ...] = (),
    tasks: tuple | None = None,
) -> tuple[dict, object]:
    """One row (and, with keep_model, the compressed model, e.g. for healing); with `quants`,
    the row's "quantized" holds `quant_results` for each type."""

    row = {
        "config": cfg.label,
        "planner": cfg.planner,
        "option": cfg.option,
        "merge_mode": cfg.refine.merge,
        "compensation": cfg.refine.compensation,
        "layers_removed": cfg.budget,
        "healed": False,
    }
    plan = None
    try:
        if cfg.planner == TRANSACT:
            target = params_original - cfg.budget * _block_params(loaded.model)
            inter, _ = transact_target(loaded.model, target)
            t0 = time.perf_counter()
            model, rep = prune(
                loaded.model,
                analysis.batch.subset(transact_samples),
                mlp_keep=inter,
                heads_keep=1.0,
                shots=transact_shots,
            )
            row["build_s"] = time.perf_counter() - t0
            row["steps"] = (
                f"MLP {rep.original_intermediate_size}->{rep.new_intermediate_size}, heads kept; "
                f"parameters of {cfg.budget} layers removed"
            )
        else:
            planned = planned or _Planned(loaded, analysis, fixed_alpha, plan_limit_s, loss_samples)
            plan, row["plan_s"] = planned.get(cfg, budgets or [cfg.budget])
            t0 = time.perf_counter()
            batch = analysis.batch if plan.needs_data else None
            model = apply_plan(loaded.model, plan, batch=batch)
            row["build_s"] = time.perf_counter() - t0
            row["steps"] = _steps_text(plan)
            alphas = [s.weights[0] for s in plan.steps if s.op == "merge" and s.weights]
            row["alpha_mean"] = sum(alphas) / len(alphas) if alphas else None
    except PlanningTooLong as e:
        row["error"] = f"planning {e}"
        return row, None
    row.update(_evaluate(loaded, model, windows, cache, with_speed))
    if quants:
        row["quantized"] = quant_results(loaded, model, windows, cache, quants)
    row.update(task_scores(model, loaded.tokenizer, tasks))
    row["params_removed_pct"] = 100.0 * (1 - row["params"] / params_original)
    if plan is not None:
        row["plan"] = plan.to_dict()
    if not keep_model:
        del model
        gc.collect()
        model = None
    return row, model


def row_brief(row: dict) -> str:
    if row.get("error"):
        return row["error"]
    return f"perplexity {row['perplexity']:.3f}, KL {row['kl']:.4f}, top-1 {row['top1']:.3f}"
