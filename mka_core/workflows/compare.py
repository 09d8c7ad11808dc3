"""`compare`: planners × budgets (and TransAct at equal parameters) on one analysis and one
evaluation of the original, in one table.

A *config* is one planner spec at one budget: a registered planner's name, or ``name:option``
with one of the options it registers, optionally built another way: ``:flatten`` (merges flattened,
for planners that merge) and ``+linear`` or ``+scale`` (each cut compensated), e.g. ``sleb+linear``,
``mka-loss:flatten+linear`` (``mka:search``, ``mka:drop``: the same pairs with the second
layer dropped, ``mka:bootstrap``; `sweep.planner_specs` lists them all); and ``transact``, which
prunes MLP neurons until the model has the parameters of the layer-removed ones at that budget. Every row is
evaluated against the original's final hidden states, computed once; its perplexity is also given
on the two halves of the evaluation windows (even / odd), so a reader sees which differences are
larger than the text's own spread.

Configs run one after another (``executor="local"``), or each as a Ray task with its resources
declared (a GPU each where the cluster has GPUs), so a cluster sweeps many configs at once.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from mka_core.compression.heal import heal
from mka_core.compression.planners import PLANNERS
from mka_core.engine.quant import check_quant
from mka_core.errors import MkaInputError, ProgressFn, report
from mka_core.evaluation.harness import check_tasks
from mka_core.evaluation.results import size
from mka_core.figures.compare import compare_figure
from mka_core.files import atomic_dir
from mka_core.workflows.compare_ray import check_ray_address, run_ray
from mka_core.workflows.pipeline import eval_windows
from mka_core.workflows.sweep import (
    TASK_PREFIX,
    TRANSACT,
    _evaluate,
    _Planned,
    make_configs,
    parse_budgets,
    parse_planners,
    quant_results,
    row_brief,
    run_config,
    task_scores,
)

log = logging.getLogger(__name__)

FORMAT = "mka-compare"
VERSION = 1
COLUMNS = [
    "config",
    "planner",
    "option",
    "merge_mode",
    "compensation",
    "layers_removed",
    "healed",
    "quant",
    "n_layers",
    "params",
    "params_removed_pct",
    "perplexity",
    "perplexity_half_a",
    "perplexity_half_b",
    "kl",
    "top1",
    "decode_tps",
    "gguf_bytes",
    "intermediate_size",
    "plan_s",
    "build_s",
    "heal_s",
    "eval_s",
    "heal_from_perplexity",
    "alpha_mean",
    "steps",
    "error",
]


@dataclass
class CompareResult:
    rows: list[dict]  # the original first, then one per config (and healed ones)
    plans: list[dict] = field(default_factory=list)  # plan JSON of every planned row
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "meta": self.meta, "rows": self.rows}

    def csv(self) -> str:

        cols = COLUMNS + sorted({k for r in self.rows for k in r if k.startswith(TASK_PREFIX)})
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: _cell(r.get(k)) for k in cols})
        return buf.getvalue()

    def save(self, out_dir, overwrite: bool = False) -> Path:
        """compare.csv, compare.json, plans.json and compare.html (the figure) into a new folder,
        written whole or not at all."""

        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            (tmp / "compare.csv").write_text(self.csv(), encoding="utf-8")
            (tmp / "compare.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")
            (tmp / "plans.json").write_text(json.dumps({"plans": self.plans}, indent=2) + "\n")
            compare_figure(self.rows).write_html(tmp / "compare.html", include_plotlyjs="directory")
        return Path(out_dir)


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


# ---------------------------------------------------------------------------------------------
# configs


# ---------------------------------------------------------------------------------------------
# one config


# ---------------------------------------------------------------------------------------------
# the sweep


def compare_sweep(
    loaded,
    analysis,
    planners,
    budgets,
    *,
    transact: bool = False,
    windows=None,
    eval_budget: int = 8192,
    eval_window: int = 512,
    eval_data="builtin",
    fixed_alpha: float = 0.5,
    with_speed: bool = False,
    plan_limit_s: float | None = None,
    loss_samples: int | None = None,
    transact_samples: int = 32,
    transact_shots: int = 4,
    heal_steps: int = 0,
    heal_budgets=(),
    heal_batch: int = 4,
    heal_lr: float = 1e-4,
    quants=(),
    tasks=None,
    tasks_dir=None,
    task_limit: int | None = None,
    executor: str = "local",
    address: str | None = None,
    progress: ProgressFn | None = None,
) -> CompareResult:
    """Run every config (see the module docstring) and return the table.

    quants: GGUF quantization types (e.g. "Q8_0,Q4_0"); every unhealed row, the original's
    included (quantization alone), gains a row per type measured after a quantize → dequantize
    round trip of its weights (see `engine.quant`), with its GGUF size in `gguf_bytes`.
    tasks (lm-eval task names; tasks_dir, task_limit as `evaluate --tasks`): every unquantized
    row, the original's included, gains "lm-eval <task> acc" (and acc_norm) columns.

    Bad input — an unknown planner, a budget beyond the model, a Ray address that does not
    answer, an unknown quantization type — is refused before anything runs."""

    specs = parse_planners(planners)
    quants = parse_quants(quants)
    task_names = check_tasks(tasks, tasks_dir, task_limit) if tasks else None
    budgets = parse_budgets(budgets, loaded.n_layers)
    if executor not in ("local", "ray"):
        raise MkaInputError(f"unknown executor {executor!r}; expected local or ray")
    if executor == "ray":
        check_ray_address(address or "local")
    configs = make_configs(specs, budgets, transact)
    if windows is None:
        windows = eval_windows(loaded, eval_data, eval_budget, eval_window)
    t_start = time.perf_counter()

    cache: dict = {}
    kw = dict(
        params_original=size(loaded.model)["params"],
        fixed_alpha=fixed_alpha,
        with_speed=with_speed,
        plan_limit_s=plan_limit_s,
        loss_samples=loss_samples,
        transact_samples=transact_samples,
        transact_shots=transact_shots,
        quants=quants,
        tasks=(task_names, tasks_dir, task_limit) if task_names else None,
    )
    report(progress, 0.0, f"compare: the original on {windows.numel()} tokens")
    rows = [_original_row(loaded, analysis, windows, cache, with_speed, quants)]
    rows[0].update(task_scores(loaded.model, loaded.tokenizer, kw["tasks"]))
    models = {}  # config -> compressed model, kept for healing
    if executor == "ray":
        rows += run_ray(loaded, analysis, configs, windows, cache, kw, address, progress)
    else:
        keep = set(heal_budgets) if heal_steps > 0 else set()
        rows += _run_local(
            loaded, analysis, configs, budgets, windows, cache, kw, keep, models, progress
        )
    if heal_steps > 0:
        heal_args = (heal_steps, heal_batch, heal_lr, heal_budgets)
        rows += _heal_rows(loaded, analysis, rows, models, windows, cache, kw, *heal_args)
    rows = quant_rows(rows)
    plans = [dict(config=r["config"], **r.pop("plan")) for r in rows if "plan" in r]
    meta = {
        "model": loaded.source,
        "fingerprint": loaded.fingerprint,
        "eval_tokens": int(windows.numel()),
        "eval_positions": int(windows.shape[0] * (windows.shape[1] - 1)),
        "calibration": {"samples": analysis.batch.n_samples, "tokens": analysis.batch.n_tokens},
        "executor": executor,
        "seconds": round(time.perf_counter() - t_start, 1),
        "configs": [c.label for c in configs],
        "quants": list(quants),
    }
    return CompareResult(rows, plans, meta)


def _run_local(loaded, analysis, configs, budgets, windows, cache, kw, keep, models, progress):
    """Every config one after another; the models of the budgets in `keep` go into `models`."""
    planned = _Planned(loaded, analysis, kw["fixed_alpha"], kw["plan_limit_s"], kw["loss_samples"])
    rows = []
    for i, cfg in enumerate(configs):
        row, model = run_config(
            loaded,
            analysis,
            cfg,
            windows,
            cache,
            keep_model=cfg.budget in keep,
            planned=planned,
            budgets=budgets,
            **kw,
        )
        rows.append(row)
        if model is not None:
            models[cfg] = model
        report(progress, (i + 1) / len(configs), f"compare: {cfg.label}: {row_brief(row)}")
    return rows


def _original_row(loaded, analysis, windows, cache, with_speed, quants=()) -> dict:
    """The original's row; its fidelity against itself fills the reference cache."""
    row = _evaluate(loaded, loaded.model, windows, cache, with_speed)
    if quants:
        row["quantized"] = quant_results(loaded, loaded.model, windows, cache, quants)
    row.update(config="original", planner="original", layers_removed=0, healed=False)
    row.update(kl=0.0, top1=1.0, params_removed_pct=0.0)
    halves = row.pop("original_halves")
    row["perplexity_half_a"], row["perplexity_half_b"] = halves
    return row


def _heal_rows(loaded, analysis, rows, models, windows, cache, kw, steps, batch, lr, budgets):
    """Heal, at each heal budget, the best merge row, the best other planner's row and
    TransAct, with the same short fine-tune."""

    out = []
    for b in budgets:
        at = [r for r in rows[1:] if r["layers_removed"] == b and not r.get("error")]
        planned = [r for r in at if r["planner"] != TRANSACT]
        merges = [r for r in planned if _merges(r) and r.get("option") != "drop"]
        others = [r for r in planned if not _merges(r)]  # (mka:drop, a control, in neither)
        picks = [min(g, key=lambda r: r["perplexity"]) for g in (merges, others) if g]
        picks += [r for r in at if r["planner"] == TRANSACT]
        for base in picks:
            cfg = next(c for c in models if c.label == base["config"])
            t0 = time.perf_counter()
            healed, _ = heal(
                models[cfg], loaded.tokenizer, analysis.batch, steps=steps, lr=lr, batch_size=batch
            )
            heal_s = time.perf_counter() - t0
            row = {
                k: base.get(k)
                for k in (
                    "config",
                    "planner",
                    "option",
                    "layers_removed",
                    "plan_s",
                    "build_s",
                    "steps",
                    "alpha_mean",
                )
            }
            row.update(_evaluate(loaded, healed, windows, cache, kw["with_speed"]))
            row.pop("original_halves", None)
            row.update(healed=True, heal_s=heal_s, heal_from_perplexity=base["perplexity"])
            row["params_removed_pct"] = 100.0 * (1 - row["params"] / kw["params_original"])
            out.append(row)
            del healed
    for r in rows:
        r.pop("original_halves", None)
    models.clear()
    return out


def parse_quants(quants) -> tuple[str, ...]:
    """ "Q8_0,Q4_0" (or a list) → canonical quantization types, each checked."""
    if isinstance(quants, str):
        quants = [q for q in quants.split(",") if q.strip()]
    return tuple(dict.fromkeys(check_quant(q) for q in quants or ()))


def quant_rows(rows: list[dict]) -> list[dict]:
    """Each row followed by one row per quantization type it was measured at (same config,
    `quant` set; sizes and fidelity of the quantized model)."""
    out = []
    for r in rows:
        measured = r.pop("quantized", None) or {}
        out.append(r)
        for q, m in measured.items():
            row = {k: r.get(k) for k in COLUMNS if k not in QUANT_FIELDS}
            row.pop("plan", None)
            row.update(m, quant=q)
            out.append(row)
    return out


QUANT_FIELDS = (
    "perplexity",
    "perplexity_half_a",
    "perplexity_half_b",
    "kl",
    "top1",
    "eval_s",
    "decode_tps",
)


def _merges(row: dict) -> bool:
    """A row of a planner that merges layers (registry `does`)."""
    return "merge" in PLANNERS.get(row["planner"]).does


def best_rows(rows: list[dict]) -> dict[int, dict]:
    """The lowest-perplexity unhealed row at each budget."""
    out: dict[int, dict] = {}
    for r in rows:
        if r.get("healed") or r.get("quant") or r.get("error") or not r.get("layers_removed"):
            continue
        b = r["layers_removed"]
        if b not in out or r["perplexity"] < out[b]["perplexity"]:
            out[b] = r
    return out
