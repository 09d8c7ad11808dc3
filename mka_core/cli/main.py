"""The command line: `python -m mka_core <command>`. Every command defaults to the bundled model and
the built-in corpus, prints progress on stderr, writes machine-readable output, and exits non-zero
with a one-line error on bad input."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import transformers

from mka_core.cli.commands import (
    cmd_analyze,
    cmd_apply,
    cmd_evaluate,
    cmd_export_mergekit,
    cmd_plan,
)
from mka_core.cli.deploy import add_export_gguf
from mka_core.cli.methods import cmd_compare, cmd_heal, cmd_transact
from mka_core.compression.planners import (
    ALPHA_RULES,
    NPIB_KINDS,
    PLANNERS,
    SEARCH_SAMPLES,
    PlanSettings,
    budget_names,
    names,
)
from mka_core.compression.refinement import (
    COMPENSATION_HELP,
    COMPENSATIONS,
    MERGE_HELP,
    MERGE_MODES,
)
from mka_core.engine.quant import QUANT_HELP, check_quant
from mka_core.errors import MkaInputError
from mka_core.workflows.sweep import TRANSACT, default_specs

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {v}")
    return v


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="bundled:smollm2-135m",
        help="bundled:smollm2-135m (default), a model folder, a .gguf file, a hub id, or tiny:llama",
    )
    p.add_argument(
        "--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:N, mps"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        help="compute dtype: auto (bf16/fp16 on GPU, the CPU default on CPU), fp32, bf16, fp16",
    )
    p.add_argument(
        "--offload",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="stream the weights from disk one block at a time (--offload), or hold them in "
        "memory (--no-offload); default: streamed when the model takes more than 40%% of the "
        "available memory",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for tiny models, sampling and k-means")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _add_out_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out-dtype",
        default="auto",
        choices=["auto", "bf16", "fp16", "fp32"],
        help="dtype of the written weights (default: the source's; bf16 for a GGUF)",
    )


def _add_gguf(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gguf",
        default=None,
        type=_quant_type,
        metavar="Q",
        help=f"also write the model as OUT/model-Q.gguf (llama.cpp), Q one of "
        f"{', '.join(QUANT_HELP)}; see export-gguf --help",
    )


def _quant_type(text: str) -> str:
    try:
        return check_quant(text)
    except MkaInputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", default="builtin", help="builtin (default), a .txt/.jsonl file or an MMLU folder"
    )
    p.add_argument("--samples", type=_positive_int, default=128, help="calibration samples N (128)")
    p.add_argument("--tokens", type=_positive_int, default=128, help="tokens per sample T (128)")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--eval-data", default="builtin", help="evaluation text (default: built-in split)"
    )
    p.add_argument("--budget", type=_positive_int, default=8192, help="evaluation tokens (8192)")
    p.add_argument("--window", type=_positive_int, default=512, help="evaluation window (512)")


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(
        prog="python -m mka_core",
        description="MKA Studio: layer similarity, merge plans (MKA) and intra-module pruning (TransAct).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_analyze,
        _add_evaluate,
        _add_plan,
        _add_apply,
        _add_transact,
        _add_heal,
        _add_compare,
        _add_export_mergekit,
        add_export_gguf,
    ):
        add(sub)
    return parser


def _add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="capture activations and compute layer-similarity matrices")
    _add_model_args(p)
    _add_calib_args(p)
    p.add_argument("--pooling", default="mean", choices=["mean", "last", "tokens"])
    p.add_argument(
        "--tokens-per-sample",
        type=_positive_int,
        default=8,
        help="rows per sample (tokens pooling)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument(
        "--k", type=int, default=8, help="clusters per layer for NPIB (8, capped at N/8)"
    )
    p.add_argument("--d", type=int, default=4, help="diffusion-map dimensions (4)")
    p.add_argument(
        "--no-stability", action="store_true", help="skip the split-half / bootstrap stability"
    )
    p.add_argument(
        "--n-boot",
        type=_positive_int,
        default=None,
        help="bootstrap replicates (default: what fits in 20%% of the analysis' time, 4 to 32)",
    )
    p.add_argument(
        "--importance",
        action="store_true",
        help="also measure the loss of dropping each layer and merging each adjacent pair",
    )
    p.add_argument(
        "--importance-samples",
        type=_positive_int,
        default=32,
        help="calibration samples the importance is measured on (32)",
    )
    p.add_argument("--out", default="mka-analysis", help="output folder (default ./mka-analysis)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=cmd_analyze)


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="perplexity, fidelity (KL, top-1), size, speed, generations"
    )
    _add_model_args(p)
    _add_eval_args(p)
    p.add_argument("--plan", default=None, help="apply this plan JSON to --model first")
    p.add_argument(
        "--reference",
        default=None,
        help="original model to compare with (default: read from the folder's records)",
    )
    p.add_argument("--no-reference", action="store_true", help="evaluate the model alone")
    _add_quant(p, "the model is also evaluated (against the reference, else against itself)")
    p.add_argument(
        "--mmlu", default=None, help="an MMLU-format folder for multiple-choice accuracy"
    )
    p.add_argument("--no-speed", action="store_true", help="skip the prefill/decode timing")
    p.add_argument("--no-generations", action="store_true", help="skip the sample generations")
    _add_tasks(p, "on the original and on the compressed model")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--out", default=None, help="also write the results JSON to this file")
    p.set_defaults(func=cmd_evaluate)


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="plan which layers to merge or drop (writes a plan JSON)")
    _add_model_args(p)
    _add_calib_args(p)
    p.add_argument("--pooling", default="mean", choices=["mean", "last", "tokens"])
    _add_planner_args(p)
    p.add_argument("--layers-to-remove", type=int, default=None, help="budget: layers to remove")
    p.add_argument("--ratio", type=float, default=None, help="budget: removed / original layers")
    p.add_argument("--target-layers", type=int, default=None, help="budget: layers to keep")
    p.add_argument("--picks", default=None, help="manual picks, e.g. 'merge:15,16;drop:27'")
    p.add_argument(
        "--analysis",
        default=None,
        help="a folder written by analyze --out, to plan from instead of capturing again",
    )
    p.add_argument("--no-protect-first", action="store_true", help="allow touching layer 0")
    p.add_argument("--no-protect-last", action="store_true", help="allow touching the last layer")
    p.add_argument("--out", default="plan.json", help="plan file to write (default plan.json)")
    p.add_argument(
        "--apply",
        default=None,
        metavar="FOLDER",
        help="also apply the plan and write the compressed model folder (one command)",
    )
    _add_out_dtype(p)
    _add_gguf(p)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_plan)


def _add_planner_args(p: argparse.ArgumentParser) -> None:
    """The planner and its options, with the choices and help of the registry."""
    default = PlanSettings()
    p.add_argument(
        "--planner",
        default=default.planner,
        choices=names(),
        help="; ".join(f"{planner.name}: {planner.help}" for planner in PLANNERS),
    )
    p.add_argument(
        "--npib",
        default=default.npib,
        choices=NPIB_KINDS,
        help=f"{', '.join(names(lambda q: q.npib_kinds))}: the analysis' NPIB (single, the "
        "paper) or NPIB averaged over bootstrap resamples (steadier)",
    )
    p.add_argument(
        "--loss-samples",
        type=_positive_int,
        default=None,
        help=f"calibration samples {', '.join(names(lambda q: q.needs_batch))} and the search "
        f"α rule score with ({SEARCH_SAMPLES})",
    )
    p.add_argument(
        "--alpha", default=default.alpha_rule, choices=ALPHA_RULES, help="α rule for merges"
    )
    p.add_argument("--alpha-value", type=float, default=default.alpha, help="α for --alpha fixed")
    p.add_argument("--recompute", action="store_true", help="mka: recompute NPIB after each merge")
    p.add_argument(
        "--merge-mode",
        default=default.merge_mode,
        choices=MERGE_MODES,
        help="; ".join(f"{k}: {v}" for k, v in MERGE_HELP.items()),
    )
    p.add_argument(
        "--compensation",
        default=default.compensation,
        choices=COMPENSATIONS,
        help="; ".join(f"{k}: {v}" for k, v in COMPENSATION_HELP.items())
        + " (estimated on the calibration data, recorded in the plan)",
    )


def _add_apply(sub) -> None:
    p = sub.add_parser("apply", help="apply a plan JSON and write the compressed model folder")
    p.add_argument("plan", help="the plan JSON")
    _add_model_args(p)
    p.set_defaults(model=None)
    p.add_argument("--force", action="store_true", help="apply even if the fingerprint differs")
    p.add_argument(
        "--data",
        default=None,
        help="calibration text for a plan that flattens or compensates "
        "(default: what the plan records)",
    )
    p.add_argument("--samples", type=_positive_int, default=None, help="calibration samples")
    p.add_argument("--tokens", type=_positive_int, default=None, help="tokens per sample")
    p.add_argument("--out", required=True, help="output model folder")
    _add_out_dtype(p)
    _add_gguf(p)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_apply)


def _add_transact(sub) -> None:
    p = sub.add_parser("transact", help="TransAct: prune MLP neurons / attention heads")
    _add_model_args(p)
    _add_calib_args(p)
    p.add_argument("--mlp-keep", default="1.0", help="MLP neurons kept: ratio (0.5) or count (768)")
    p.add_argument("--heads-keep", default="1.0", help="query heads kept: ratio or count")
    p.add_argument("--shots", type=_positive_int, default=4, help="iterative pruning shots (4)")
    p.add_argument("--out", required=True, help="output model folder")
    _add_out_dtype(p)
    _add_gguf(p)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_transact)


def _add_heal(sub) -> None:
    p = sub.add_parser("heal", help="short fine-tune of a compressed model on calibration text")
    _add_model_args(p)
    _add_calib_args(p)
    _add_eval_args(p)
    p.add_argument("--steps", type=_positive_int, default=50, help="AdamW steps (50)")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="samples per step (4)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (1e-4)")
    p.add_argument(
        "--loss",
        choices=["ce", "kd"],
        default="ce",
        help="ce: next-token cross-entropy on the calibration text (default); kd: distillation "
        "from the original model, the KL of the model's next-token distribution from the "
        "original's (Hinton et al. 2015; used to heal pruned LLMs by Minitron, arXiv 2407.14679, "
        "and Sheared-LLaMA, arXiv 2310.06694), on the original's top-k logits per position "
        "(plus one bucket for the other tokens), computed once",
    )
    p.add_argument(
        "--kd-top-k",
        type=_positive_int,
        default=64,
        help="kd: the original's logits kept per position (64); the vocabulary size gives the "
        "exact KL",
    )
    p.add_argument(
        "--teacher",
        default=None,
        help="kd: the original model (default: read from the folder's records)",
    )
    p.add_argument("--out", required=True, help="output model folder")
    _add_out_dtype(p)
    _add_gguf(p)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_heal)


def _add_tasks(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--tasks",
        default=None,
        help=f"lm-evaluation-harness tasks, comma-separated (e.g. arc_easy,hellaswag), scored with "
        f"lm-eval {what}",
    )
    p.add_argument(
        "--tasks-dir",
        default=None,
        help="a folder of lm-eval task YAMLs for --tasks (e.g. reading local JSONL files)",
    )
    p.add_argument(
        "--limit", type=_positive_int, default=None, help="--tasks: score only N examples each"
    )


def _add_quant(p: argparse.ArgumentParser, what: str) -> None:
    types = ", ".join(f"{q} ({h})" for q, h in QUANT_HELP.items())
    p.add_argument(
        "--quant",
        default="",
        metavar="Q[,Q...]",
        help=f"{what} after a quantize -> dequantize round trip of its weights with the GGUF "
        f"export's quantizers, and its GGUF size given; types: {types}",
    )


def _add_compare(sub) -> None:
    p = sub.add_parser(
        "compare", help="planners x budgets (+ TransAct) in one table, locally or on Ray"
    )
    _add_model_args(p)
    _add_calib_args(p)
    _add_eval_args(p)
    specs = [
        name + (f"[:{'|'.join(options)}]" if (options := PLANNERS.get(name).spec_options) else "")
        for name in budget_names()
    ]
    p.add_argument(
        "--planners",
        default=default_specs(),
        help=f"comma-separated planner specs: {', '.join(specs)}, {TRANSACT} "
        f"(default: {default_specs()})",
    )
    p.add_argument("--budgets", default="3,6,10", help="layers removed, e.g. 3,6,10")
    p.add_argument("--transact", action="store_true", help="add TransAct at equal parameters")
    p.add_argument("--analysis", default=None, help="a folder written by analyze --out")
    p.add_argument("--loss-samples", type=_positive_int, default=None, help="see plan --help")
    p.add_argument("--speed", action="store_true", help="also time decoding (in memory only)")
    _add_quant(p, "every row (the original's too: quantization alone) is also measured")
    _add_tasks(p, "on every row (not the quantized ones) and the original")
    p.add_argument("--executor", default="local", choices=["local", "ray"])
    p.add_argument("--address", default=None, help="a Ray cluster's address (default: local Ray)")
    p.add_argument("--json", action="store_true", help="print the table as JSON on stdout")
    p.add_argument("--out", default="mka-compare", help="output folder (default ./mka-compare)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_compare)


def _add_export_mergekit(sub) -> None:
    p = sub.add_parser("export-mergekit", help="write a mergekit YAML for a plan")
    p.add_argument("plan", help="the plan JSON")
    p.add_argument("--model-path", default=None, help="model path to write into the YAML")
    _add_out_dtype(p)
    p.add_argument("--out", default=None, help="YAML file (default: stdout)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export_mergekit)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(message)s")
    _quiet_libraries()
    try:
        return args.func(args)
    except MkaInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if args.debug:
            raise
        print(f"error: {e.strerror or e} ({e.filename or ''})", file=sys.stderr)
        return 1
    except Exception as e:  # a bug, not bad input: still one line, the traceback on --debug
        if args.debug:
            raise
        print(
            f"error: internal error {type(e).__name__}: {e} (rerun with --debug)", file=sys.stderr
        )
        return 1
