"""The command line's commands, one function each (`cmd_<name>`): load, call the library, write
machine-readable output. `main.py` holds the parser and the error handling around them; the
commands after a plan (transact, heal, compare) are in `methods.py`, export-gguf in `deploy.py`."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from mka_core.compression.importance import proxy_vs_truth
from mka_core.compression.merge import apply_plan
from mka_core.compression.plan import Plan, check_fingerprint
from mka_core.compression.planners import ALPHA_NEEDS, MANUAL, PLANNERS, PlanSettings
from mka_core.engine.layerpass import as_stack
from mka_core.engine.quant import gguf_bytes, quantized
from mka_core.errors import MkaInputError
from mka_core.evaluation.evaluate import compare, evaluate_model
from mka_core.evaluation.harness import attach_tasks, check_tasks, require_in_memory, tasks_report
from mka_core.evaluation.results import save_results
from mka_core.files import atomic_dir, check_out_dir, write_text_atomic
from mka_core.models.loading import load_model
from mka_core.workflows.compare import parse_quants
from mka_core.workflows.export import mergekit_yaml
from mka_core.workflows.gguf_export import write_gguf_beside
from mka_core.workflows.gguf_layout import check_config, family_of
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
    parse_quants(args.quant)
    tasks = check_tasks(args.tasks, args.tasks_dir, args.limit)  # and on unknown lm-eval tasks
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
    ref = None
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
        scored = require_in_memory(ref.model, model) if tasks else []
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
        scored = require_in_memory(model) if tasks else []
        results = [evaluate_model(model, loaded.tokenizer, windows, label=label, **common)]
    results = attach_tasks(
        results, scored, loaded.tokenizer, tasks, args.tasks_dir, args.limit, progress
    )
    results += _quantized_results(args, loaded, model, ref, label, results, windows, progress)
    if args.out:
        save_results(args.out, results)
    compressed = results[-1].to_dict()
    if len(results) == 2:
        compressed["original"] = results[0].to_dict()
    if args.json:
        print(json.dumps(compressed, indent=2))
    else:
        _print_table([r.to_dict() for r in results])
        if tasks:
            print(*tasks_report(results), sep="\n")
    return 0


def _quantized_results(args, loaded, model, ref, label, results, windows, progress) -> list:
    """`evaluate --quant`: the model again after a quantize → dequantize round trip per type,
    against the reference `ref` when there is one (else against the unquantized model itself),
    with the size of its GGUF tensors as `disk_bytes`."""
    against = ref if ref is not None else (model, loaded.tokenizer)
    first = results[0]  # the reference's result, or the unquantized model's
    out, cache = [], {}
    for q in parse_quants(args.quant):
        _, res = compare(
            against,
            quantized(model, q),
            windows,
            tokenizer=loaded.tokenizer,
            label=f"{label} @{q}",
            original_label=first.label,
            with_speed=False,
            with_generations=False,
            meta={"model": args.model, "eval_data": args.eval_data, "quant": q},
            progress=progress,
            original_result=first,
            reference_cache=cache,
        )
        out.append(dataclasses.replace(res, disk_bytes=gguf_bytes(model, q)))
    return out


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
    there are any), in --out-dtype or the source's dtype; with --gguf, also a GGUF file in it."""

    if getattr(args, "gguf", None):  # a family GGUF cannot hold fails before the folder
        config = as_stack(run.model).config
        check_config(config, family_of(config.to_dict()))
    path = export_run(
        run,
        args.out,
        overwrite=args.overwrite,
        loaded_from=_local(args.model),
        out_dtype=args.out_dtype if args.out_dtype != "auto" else loaded.source_dtype,
        progress=Progress(args.quiet),
    )
    if getattr(args, "gguf", None):  # --gguf Q: the folder again as one GGUF file in it
        gguf = write_gguf_beside(path, args.gguf, progress=Progress(args.quiet))
        print(f"wrote {gguf}", file=sys.stderr)
    return path


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
