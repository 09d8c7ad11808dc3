"""The commands that work after (or instead of) a plan: TransAct's pruning inside the layers,
healing by a short fine-tune, and `compare`'s sweep of methods × budgets."""

from __future__ import annotations

import json

from mka_core.cli.commands import Progress, _analysis, _export, _load, _prior_record
from mka_core.compression.distill import check_teacher, check_top_k, head_rows, teacher_topk
from mka_core.compression.heal import heal
from mka_core.compression.transact import prune
from mka_core.data.corpus import load_documents, make_calibration
from mka_core.errors import MkaInputError
from mka_core.evaluation.evaluate import perplexity
from mka_core.evaluation.harness import check_tasks
from mka_core.files import check_out_dir
from mka_core.models.loading import load_model
from mka_core.workflows.compare import compare_sweep, parse_quants
from mka_core.workflows.pipeline import Run, eval_windows
from mka_core.workflows.sweep import parse_budgets, parse_planners


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
    source, stages = _prior_record(args.model)
    targets = None
    if args.loss == "kd":
        # the original's top-k, computed once; the original (streamed if it does not fit) is
        # dropped before the student trains
        teacher_source = args.teacher or (source if source != args.model else None)
        if teacher_source is None:
            raise MkaInputError(
                f"heal --loss kd needs the original model: {args.model} has no record of the "
                "model it was compressed from, so name it with --teacher"
            )
        check_top_k(args.kd_top_k, head_rows(loaded.model))  # before loading the original
        teacher = load_model(
            teacher_source,
            device=loaded.device,
            dtype=args.dtype,
            seed=args.seed,
            offload=args.offload,
        )
        check_teacher(teacher, loaded.model, loaded.tokenizer)
        targets = teacher_topk(teacher, batch, args.kd_top_k, progress=progress)
        del teacher
    model, rep = heal(
        loaded.model,
        loaded.tokenizer,
        batch,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        progress=progress,
        seed=args.seed,
        loss=args.loss,
        teacher=targets,
    )
    after = perplexity(model, windows)
    info = {**rep.to_dict(), "perplexity_before": before, "perplexity_after": after}
    stages.append({"stage": "heal", "report": info})
    kind = "+".join([s["stage"] for s in stages])
    plan = None
    label = f"heal {args.steps}" + (" kd" if args.loss == "kd" else "")
    run = Run(kind, label, model, loaded.tokenizer, source, stages, None, None, plan)
    out = _export(run, args, loaded)
    summary = {k: v for k, v in info.items() if k not in ("losses", "loss_curve")}
    print(json.dumps({"out": str(out), **summary}, indent=2, default=str))
    return 0


def cmd_compare(args) -> int:
    """planners × budgets (+ TransAct) on one analysis and one evaluation of the original."""

    progress = Progress(args.quiet)
    parse_planners(args.planners)  # bad specs fail before anything is loaded
    parse_quants(args.quant)
    check_tasks(args.tasks, args.tasks_dir, args.limit)  # unknown lm-eval tasks, before loading
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
        tasks=args.tasks,
        tasks_dir=args.tasks_dir,
        task_limit=args.limit,
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
