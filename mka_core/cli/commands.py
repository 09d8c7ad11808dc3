"""The command line's commands, one function each (`cmd_<name>`): load, call the library, write
machine-readable output. `cli.py` holds the parser and the error handling around them."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from mka_core.compression.heal import heal
from mka_core.compression.importance import proxy_vs_truth
from mka_core.compression.merge import apply_plan
from mka_core.compression.plan import Plan, check_fingerprint
from mka_core.compression.planners import ALPHA_NEEDS, MANUAL, PLANNERS, PlanSettings
from mka_core.compression.transact import prune
from mka_core.data.corpus import load_documents, make_calibration
from mka_core.errors import MkaInputError
from mka_core.evaluation.evaluate import compare, evaluate_model, perplexity
from mka_core.evaluation.results import save_results
from mka_core.files import atomic_dir, check_out_dir, write_text_atomic
from mka_core.models.loading import load_model
from mka_core.workflows.compare import compare_sweep, parse_quants
from mka_core.workflows.export import mergekit_yaml
from mka_core.workflows.pipeline import (
    Run,
    analyze,
    eval_windows,
    export_run,
    load_analysis,
    make_budget_plan,
    plan_batch,
    read_run_record,
)
from mka_core.workflows.sweep import parse_budgets, parse_planners

log = logging.getLogger(__name__)


class Progress:
    """Prints `[ 42%] message` lines on stderr, at most one per second plus the last one."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.last = 0.0

    def __call__(self, fraction: float, message: str) -> None:
        now = time.monotonic()
        if self.quiet or (fraction < 1.0 and now - self.last < 1.0):
            return
        self.last = now
        print(f"[{fraction * 100:3.0f}%] {message}", file=sys.stderr, flush=True)


def _load(args, progress):

    loaded = load_model(
        args.model,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        progress=progress,
        offload=args.offload,
    )
    if not args.quiet:
        print(f"model: {loaded.residency}", file=sys.stderr)
    return loaded


def _analysis(args, loaded, progress):
    """What a planning command works from: the folder named by --analysis, or a fresh analysis of
    the calibration arguments (compare has no --pooling: it takes analyze's default)."""

    if args.analysis:
        return load_analysis(loaded, args.analysis)
    pooling = {"pooling": args.pooling} if hasattr(args, "pooling") else {}
    return analyze(
        loaded,
        data=args.data,
        n_samples=args.samples,
        max_tokens=args.tokens,
        seed=args.seed,
        progress=progress,
        **pooling,
    )


# ---------------------------------------------------------------------------------------------
# commands


def cmd_analyze(args) -> int:

    progress = Progress(args.quiet)
    check_out_dir(args.out, args.overwrite, protect=[args.model])
    loaded = _load(args, progress)
    t0 = time.perf_counter()
    result = analyze(
        loaded,
        data=args.data,
        n_samples=args.samples,
        max_tokens=args.tokens,
        pooling=args.pooling,
        tokens_per_sample=args.tokens_per_sample,
        batch_size=args.batch_size,
        k=args.k,
        d=args.d,
        seed=args.seed,
        progress=progress,
        stability=not args.no_stability,
        n_boot=args.n_boot,
        importance=args.importance,
        importance_samples=args.importance_samples,
    )
    sim = result.similarity
    sim.timings["total"] = time.perf_counter() - t0
    with atomic_dir(args.out, args.overwrite, protect=[args.model]) as tmp:
        result.save(tmp)
    summary = {
        "out": str(Path(args.out)),
        "n_layers": sim.n_layers,
        "measures": list(sim.matrices) + ["bi"],
        "timings": {k: round(v, 3) for k, v in sim.timings.items()},
    }
    if result.stability is not None:
        st = result.stability
        summary["stability"] = {
            m: {
                "split_half": st.split_half[m],
                "bootstrap": st.bootstrap[m],
                "reading": st.reading(m),
            }
            for m in st.split_half
        }
        summary["stability_bootstrap_replicates"] = st.n_boot
    if result.importance is not None:
        imp = result.importance
        summary["importance"] = {
            "base_loss": imp.base_loss,
            "drop": imp.drop,
            "merge": imp.merge,
            "proxy_vs_truth_spearman": proxy_vs_truth(sim, imp),
        }
    print(json.dumps(summary, indent=2))
    return 0


def _windows(args, loaded):

    return eval_windows(loaded, args.eval_data, budget_tokens=args.budget, window=args.window)


def cmd_evaluate(args) -> int:
    """One model alone, or (when it was written by this tool, or --reference is given) against
    the original it was compressed from: then KL and top-1 agreement too."""

    progress = Progress(args.quiet)
    reference = args.reference
    if reference is None and not args.no_reference:
        record = read_run_record(args.model) if Path(args.model).is_dir() else None
        plan_file = Path(args.model) / "plan.json"
        if record:
            reference = record.get("source")
        elif plan_file.is_file():
            reference = Plan.load(plan_file).model.source
    if args.plan:
        plan = Plan.load(args.plan)  # fail on a bad plan before loading anything
    loaded = _load(args, progress)
    model, label = loaded.model, args.model
    if args.plan:
        warning = check_fingerprint(plan, loaded)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        reference = reference or args.model
        model = apply_plan(loaded.model, plan)
        label = f"{args.model} + {args.plan}"
    windows = _windows(args, loaded)
    common = dict(
        with_speed=not args.no_speed,
        with_generations=not args.no_generations,
        mmlu_folder=args.mmlu,
        meta={"model": args.model, "eval_data": args.eval_data},
        progress=progress,
    )
    if reference and not args.no_reference:
        if args.plan and reference == args.model:
            ref = loaded
        else:
            ref = load_model(
                reference,
                device=loaded.device,
                dtype=args.dtype,
                seed=args.seed,
                offload=args.offload,
            )
        results = list(
            compare(
                ref,
                model,
                windows,
                tokenizer=loaded.tokenizer,
                label=label,
                original_label=reference,
                **common,
            )
        )
    else:
        results = [evaluate_model(model, loaded.tokenizer, windows, label=label, **common)]
    if args.out:
        save_results(args.out, results)
    compressed = results[-1].to_dict()
    if len(results) == 2:
        compressed["original"] = results[0].to_dict()
    if args.json:
        print(json.dumps(compressed, indent=2))
    else:
        _print_table([r.to_dict() for r in results])
    return 0


def cmd_plan(args) -> int:

    progress = Progress(args.quiet)
    picks = _parse_picks(args.picks) if args.picks else None
    settings = _plan_settings(args, picks)  # checked before anything is loaded
    planner = PLANNERS.get(settings.planner)
    given = [x for x in (args.layers_to_remove, args.ratio, args.target_layers) if x is not None]
    if not planner.takes_picks and len(given) != 1:
        raise MkaInputError(
            "give exactly one budget: --layers-to-remove N, --ratio R or --target-layers N "
            "(or --picks for a manual plan)"
        )
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise MkaInputError(f"{out} exists (use --overwrite)")
    if args.apply:
        check_out_dir(args.apply, args.overwrite, protect=[args.model])  # before any work
    loaded = _load(args, progress)
    if args.target_layers is not None and not planner.takes_picks:
        n_remove = loaded.n_layers - args.target_layers
        if n_remove < 0:
            raise MkaInputError(
                f"--target-layers {args.target_layers} is more than the "
                f"model's {loaded.n_layers} layers"
            )
        settings = settings.replace(n_remove=n_remove)
    analysis = None
    if args.analysis or not planner.takes_picks or ALPHA_NEEDS[settings.alpha_rule]:
        analysis = _analysis(args, loaded, progress)
    plan = make_budget_plan(loaded, analysis, settings, progress=progress)
    if plan.needs_data:  # the calibration its merges or cuts are built on, for apply
        calibration = {"data": args.data, "samples": args.samples, "tokens": args.tokens}
        plan = plan.with_refine(dataclasses.replace(plan.refine, calibration=calibration))
    write_text_atomic(out, plan.to_json(), overwrite=args.overwrite)
    exported = None
    if args.apply:
        exported = str(_apply_and_export(plan, loaded, args, args.apply, progress))
    print(
        json.dumps(
            {
                "plan": str(out),
                **({"out": exported} if exported else {}),
                "planner": plan.method["planner"],
                "layers_removed": plan.n_removed,
                "layers_out": plan.n_layers_out,
                "compression_ratio": plan.compression_ratio,
                "steps": [st.to_dict() for st in plan.steps],
            },
            indent=2,
        )
    )
    return 0


def _plan_settings(args, picks: list[dict] | None) -> PlanSettings:
    """The command line's PlanSettings: --picks make a manual plan whatever --planner says."""
    return PlanSettings(
        planner=MANUAL if picks is not None else args.planner,
        n_remove=args.layers_to_remove,
        ratio=args.ratio,
        alpha_rule=args.alpha,
        alpha=args.alpha_value,
        npib=args.npib,
        recompute=args.recompute,
        protect_first=not args.no_protect_first,
        protect_last=not args.no_protect_last,
        loss_samples=args.loss_samples,
        picks=picks,
        merge_mode=args.merge_mode,
        compensation=args.compensation,
    )


def _parse_picks(text: str) -> list[dict]:
    """`merge:3,4;drop:7` → [{"op": "merge", "layers": [3, 4]}, {"op": "drop", "layers": [7]}]."""
    picks = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        op, _, rest = part.partition(":")
        if op not in ("merge", "drop") or not rest:
            raise MkaInputError(f"--picks: {part!r} is not op:layers (e.g. merge:3,4 or drop:7)")
        try:
            layers = [int(x) for x in rest.split(",")]
        except ValueError:
            raise MkaInputError(
                f"--picks: {rest!r} is not a comma-separated list of layers"
            ) from None
        picks.append({"op": op, "layers": layers})
    if not picks:
        raise MkaInputError("--picks is empty")
    return picks


def _apply_and_export(plan, loaded, args, out_dir, progress):
    """Apply `plan` to the loaded model (streamed when it is) and write the model folder."""

    batch = _plan_batch(plan, loaded, args) if plan.needs_data else None
    model = apply_plan(loaded.model, plan, progress=progress, batch=batch)
    stages = [{"stage": "merge", "plan": plan.to_dict()}]
    label = f"{plan.method.get('planner')} -{plan.n_removed}"
    run = Run("merge", label, model, loaded.tokenizer, loaded.source, stages, None, None, plan=plan)
    args.out = out_dir
    return _export(run, args, loaded)


def _plan_batch(plan, loaded, args):
    """A flattening or compensating plan's calibration: the command's options, else the plan's."""
    return plan_batch(
        loaded,
        plan,
        getattr(args, "data", None),
        getattr(args, "samples", None),
        getattr(args, "tokens", None),
    )


def cmd_apply(args) -> int:

    progress = Progress(args.quiet)
    plan = Plan.load(args.plan)  # a malformed plan fails here, before any model is loaded
    model_source = args.model or plan.model.source
    check_out_dir(args.out, args.overwrite, protect=[model_source])
    args.model = model_source
    loaded = _load(args, progress)
    warning = check_fingerprint(plan, loaded)
    if warning:
        if plan.model.num_layers != loaded.n_layers or not args.force:
            raise MkaInputError(
                f"{warning} (use --force to apply anyway)"
                if plan.model.num_layers == loaded.n_layers
                else warning
            )
        print(f"warning: {warning}", file=sys.stderr)
    out = _apply_and_export(plan, loaded, args, args.out, progress)
    print(
        json.dumps(
            {"out": str(out), "layers": plan.n_layers_out, "layers_removed": plan.n_removed},
            indent=2,
        )
    )
    return 0


def _export(run, args, loaded):
    """Write the run's model folder (mka-run.json records the stages, and the evaluations when
    there are any), in --out-dtype or the source's dtype."""

    return export_run(
        run,
        args.out,
        overwrite=args.overwrite,
        loaded_from=_local(args.model),
        out_dtype=args.out_dtype if args.out_dtype != "auto" else loaded.source_dtype,
        progress=Progress(args.quiet),
    )


def _local(source: str):
    """The model's source path (a folder or a file), when it is one."""
    p = Path(source).expanduser()
    return str(p) if p.exists() else None


def _prior_record(source: str) -> tuple[str, list]:
    """The original source and earlier stages when the input model was written by this tool."""

    record = read_run_record(source) if Path(source).expanduser().is_dir() else None
    if record:
        return record.get("source", source), list(record.get("stages", []))
    return source, []


def cmd_transact(args) -> int:

    progress = Progress(args.quiet)
    check_out_dir(args.out, args.overwrite, protect=[args.model])
    mlp_keep, heads_keep = (
        _keep(args.mlp_keep, "--mlp-keep"),
        _keep(args.heads_keep, "--heads-keep"),
    )
    loaded = _load(args, progress)
    docs = load_documents(args.data, "calibration")
    batch = make_calibration(loaded.tokenizer, docs, n_samples=args.samples, max_tokens=args.tokens)
    model, rep = prune(
        loaded.model,
        batch,
        mlp_keep=mlp_keep,
        heads_keep=heads_keep,
        shots=args.shots,
        progress=progress,
    )
    source, stages = _prior_record(args.model)
    stages.append(
        {
            "stage": "transact",
            "mlp_keep": mlp_keep,
            "heads_keep": heads_keep,
            "shots": args.shots,
            "report": {k: v for k, v in rep.to_dict().items() if "score" not in k},
        }
    )
    kind = "+".join([s["stage"] for s in stages])
    run = Run(
        kind,
        f"transact mlp {mlp_keep} heads {heads_keep}",
        model,
        loaded.tokenizer,
        source,
        stages,
        None,
        None,
    )
    out = _export(run, args, loaded)
    print(json.dumps({"out": str(out), **stages[-1]["report"]}, indent=2))
    return 0


def _keep(text: str, flag: str):
    """A keep amount: a ratio in (0, 1] or a whole count."""
    try:
        v = float(text)
    except ValueError:
        raise MkaInputError(
            f"{flag}: expected a ratio like 0.5 or a count like 768, got {text!r}"
        ) from None
    if v > 1:
        if v != int(v):
            raise MkaInputError(f"{flag}: a count must be a whole number, got {text}")
        return int(v)
    return v


def cmd_heal(args) -> int:

    progress = Progress(args.quiet)
    check_out_dir(args.out, args.overwrite, protect=[args.model])
    loaded = _load(args, progress)
    if loaded.streamed:
        raise MkaInputError(
            "heal trains the whole model in memory (about 16 bytes per parameter for fp32 "
            "weights, gradients and AdamW state); this model is streamed from disk because it "
            "does not fit, so it cannot be healed here"
        )
    docs = load_documents(args.data, "calibration")
    batch = make_calibration(loaded.tokenizer, docs, n_samples=args.samples, max_tokens=args.tokens)
    windows = eval_windows(loaded, args.eval_data, args.budget, args.window)
    before = perplexity(loaded.model, windows)
    model, rep = heal(
        loaded.model,
        loaded.tokenizer,
        batch,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        progress=progress,
        seed=args.seed,
    )
    after = perplexity(model, windows)
    source, stages = _prior_record(args.model)
    info = {**rep.to_dict(), "perplexity_before": before, "perplexity_after": after}
    stages.append({"stage": "heal", "report": info})
    kind = "+".join([s["stage"] for s in stages])
    plan = None
    run = Run(kind, f"heal {args.steps}", model, loaded.tokenizer, source, stages, None, None, plan)
    out = _export(run, args, loaded)
    summary = {k: v for k, v in info.items() if k not in ("losses", "loss_curve")}
    print(json.dumps({"out": str(out), **summary}, indent=2, default=str))
    return 0


def cmd_compare(args) -> int:
    """planners × budgets (+ TransAct) on one analysis and one evaluation of the original."""

    progress = Progress(args.quiet)
    parse_planners(args.planners)  # bad specs fail before anything is loaded
    parse_quants(args.quant)
    check_out_dir(args.out, args.overwrite, protect=[args.model])
    loaded = _load(args, progress)
    parse_budgets(args.budgets, loaded.n_layers)
    analysis = _analysis(args, loaded, progress)
    result = compare_sweep(
        loaded,
        analysis,
        args.planners,
        args.budgets,
        transact=args.transact,
        eval_budget=args.budget,
        eval_window=args.window,
        eval_data=args.eval_data,
        with_speed=args.speed,
        loss_samples=args.loss_samples,
        quants=args.quant,
        executor=args.executor,
        address=args.address,
        progress=progress,
    )
    out = result.save(args.out, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(f"wrote {out}/compare.csv, compare.json, plans.json, compare.html")
        _print_compare(result.rows)
    return 0


def _print_compare(rows: list[dict]) -> None:
    cols = [
        "config",
        "params_removed_pct",
        "perplexity",
        "perplexity_half_a",
        "perplexity_half_b",
        "kl",
        "top1",
    ]
    heads = ["config", "params -%", "perplexity", "half a", "half b", "KL", "top-1"]
    if any(r.get("quant") for r in rows):
        cols.insert(1, "quant")
        cols.append("gguf_bytes")
        heads.insert(1, "quant")
        heads.append("GGUF MB")
    print("  ".join(f"{h:>14}" for h in heads))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c) if not r.get("error") or c == "config" else None
            v = v / 1e6 if c == "gguf_bytes" and v else v
            v = (v or "-") if c == "quant" else v
            cells.append(f"{v:>14.4g}" if isinstance(v, float) else f"{str(v or '')[:14]:>14}")
        print("  ".join(cells) + (f"  ({r['error']})" if r.get("error") else ""))


def cmd_export_mergekit(args) -> int:

    plan = Plan.load(args.plan)
    text = mergekit_yaml(
        plan,
        model_path=args.model_path,
        out_dtype=None if args.out_dtype == "auto" else args.out_dtype,
    )
    if args.out:
        write_text_atomic(args.out, text, overwrite=args.overwrite)
        print(json.dumps({"out": args.out}))
    else:
        print(text, end="")
    return 0


def _print_table(rows: list[dict]) -> None:
    cols = ["label", "n_layers", "params", "perplexity", "kl", "top1", "decode_tps"]
    print("  ".join(f"{c:>12}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:>12.4g}" if isinstance(v, float) else f"{str(v)[-12:]:>12}")
        print("  ".join(cells))
